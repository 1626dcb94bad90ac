//! What the UI (or the headless CLI) and a training run say to each other: plain data only, never a
//! tensor or a device, so it crosses threads freely.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request to a running training job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainCommand {
    Pause,
    Resume,
    /// Write a checkpoint after the current optimizer step.
    SaveCheckpoint,
    /// Stop after the current optimizer step, saving a checkpoint first when `save`.
    Stop {
        save: bool,
    },
}

/// Metrics of one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done (1-based).
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Mean loss per label token of this step.
    pub loss: f64,
    /// Learning rate after this step (Hugging Face logs the rate the next step will use).
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens in this step.
    pub tokens: u64,
    /// Label tokens the loss was computed on.
    pub label_tokens: u64,
    /// Real tokens seen since the run began.
    pub tokens_seen: u64,
    pub step_time: Duration,
    /// Time trained so far (across resumes).
    pub elapsed: Duration,
    pub eta: Duration,
    /// Real tokens per second of this step.
    pub tokens_per_sec: f64,
    /// Examples per second of this step.
    pub samples_per_sec: f64,
    /// Stages dpo, kto and rm: the step's metrics under TRL's names (`rewards/margins`, `rewards/accuracies`, `kl`, …).
    #[serde(default)]
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub elapsed: Duration,
    pub tokens_seen: u64,
    /// Mean real tokens per second over the run.
    pub tokens_per_sec: f64,
    /// Where the trained adapter (or model) was written.
    pub output_dir: PathBuf,
    /// The run ended on request before `total_steps`.
    pub stopped_early: bool,
}

/// A fact reported by a run, in the order things happen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainEvent {
    /// A loading phase began or progressed ("reading model.gguf", "tokenising 999 rows").
    Loading {
        what: String,
    },
    /// Something the user should know but that does not stop the run.
    Warning(String),
    /// What the run decided on its own (early stopping, the best checkpoint's weights).
    Note(String),
    /// Resuming from a checkpoint (and why it was chosen).
    Resuming {
        checkpoint: PathBuf,
        step: u64,
        why: String,
    },
    /// Training starts: the plan.
    Started {
        total_steps: u64,
        examples: usize,
        eval_examples: usize,
        trainable_params: usize,
        total_params: usize,
        start_step: u64,
        /// The device it trains on, for people: `cpu`, `cuda:0 (NVIDIA H200)`.
        device: String,
    },
    StepFinished(StepMetrics),
    EvalFinished {
        step: u64,
        eval_loss: f64,
    },
    CheckpointSaved {
        step: u64,
        dir: PathBuf,
    },
    Paused,
    Resumed,
    Finished(RunSummary),
    /// The run could not go on; the message says why and what was kept.
    Failed(String),
}
