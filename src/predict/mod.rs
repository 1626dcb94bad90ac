//! Evaluate and predict as LLaMA-Factory does after training (`do_predict` + `predict_with_generate`): generate an
//! answer for each example of the evaluation data and score it against the label with LF's metrics.

pub mod metrics;
