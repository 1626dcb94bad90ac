//! Evaluate and predict as LLaMA-Factory does after training (`do_predict` + `predict_with_generate`): generate an
//! answer for each example of the evaluation data and score it against the label with LF's metrics.
//!
//! [`run`] loads the preset's model (adapters merged, the one chat loader), reads `eval_dataset` (or the
//! `val_size` split) as LF's unsupervised processor encodes it, generates in left-padded batches of
//! `per_device_eval_batch_size` with a KV cache, and [`PredictOutcome::write`] leaves LF's files in `output_dir`:
//! `generated_predictions.jsonl` (`{"prompt", "predict", "label"}` per line), `predict_results.json` and
//! `all_results.json` (merged with what is there, as the HF Trainer's `save_metrics` does).

pub mod metrics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Device;

use crate::chat::{ChatError, ChatSession};
use crate::config::Preset;
use crate::data::DataError;
use crate::data::pipeline::load_eval_examples;
use crate::data::process::encode_unsupervised;
use crate::engine::generate::{StopReason, generate_batch};
use crate::engine::source::SourceProgress;
use crate::resolve;

pub use metrics::Scores;

/// File names as LLaMA-Factory / the HF Trainer write them.
pub const PREDICTIONS_FILE: &str = "generated_predictions.jsonl";
pub const PREDICT_RESULTS_FILE: &str = "predict_results.json";
pub const ALL_RESULTS_FILE: &str = "all_results.json";

/// Why a prediction run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no example of the evaluation data could be encoded ({skipped} skipped; first: {first})"
    )]
    NoExamples { skipped: usize, first: String },
    #[error("cancelled after {done} of {total} examples; nothing was written")]
    Cancelled { done: usize, total: usize },
}

/// Progress of [`run`], for a progress bar or the TUI's Evaluate pane.
#[derive(Debug, Clone, PartialEq)]
pub enum PredictEvent {
    /// Loading the model or the data (a line to show).
    Note(String),
    /// Generation starts: `total` examples in batches of `batch_size`.
    Started { total: usize, batch_size: usize },
    /// `done` of `total` examples have their answer; `tokens` generated so far.
    Progress {
        done: usize,
        total: usize,
        tokens: usize,
    },
}

/// One scored example: the texts as LF writes them, and its own scores.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictRow {
    /// The prompt as the model read it (special tokens kept, as LF decodes `input_ids`).
    pub prompt: String,
    pub predict: String,
    pub label: String,
    pub scores: Scores,
    /// Generated tokens, and whether generation hit `max_new_tokens` before a stop token.
    pub new_tokens: usize,
    pub truncated: bool,
}

/// What a prediction run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictOutcome {
    pub rows: Vec<PredictRow>,
    /// LF's keys: `predict_rouge-1`, `predict_rouge-2`, `predict_rouge-l`, `predict_bleu-4`,
    /// `predict_runtime`, `predict_samples_per_second`, `predict_steps_per_second`.
    pub metrics: BTreeMap<String, f64>,
    /// Rows of the data that could not be used (with the first reason).
    pub skipped: usize,
    pub first_skip: Option<String>,
    /// What was loaded (model, adapters, template, device).
    pub loaded: String,
}

/// Runs prediction for `preset` on `device`. `cancel` is polled between tokens.
pub fn run(
    preset: &Preset,
    device: &Device,
    cancel: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(PredictEvent),
) -> Result<PredictOutcome, PredictError> {
    let opts = resolve::data_options(preset);
    on_event(PredictEvent::Note("reading the evaluation data".into()));
    let (examples, counts) = load_eval_examples(&opts)?;
    let mut progress = |p: SourceProgress| {
        if let SourceProgress::Note(line) = p {
            on_event(PredictEvent::Note(line));
        }
    };
    let session = ChatSession::load(preset, device, &mut progress)?;
    let loaded = session.info.to_string();
    on_event(PredictEvent::Note(loaded.clone()));
    let enc = &session.encoder;
    let mut encoded = Vec::with_capacity(examples.len());
    let mut skipped = counts.read - counts.kept;
    let mut first_skip = counts.first.first().map(ToString::to_string);
    for ex in &examples {
        match encode_unsupervised(enc, ex, opts.cutoff_len) {
            Ok((prompt, label)) if !prompt.is_empty() => encoded.push((prompt, label)),
            Ok(_) => {
                skipped += 1;
                first_skip.get_or_insert_with(|| {
                    format!(
                        "{} {}: the prompt is empty after cutoff_len {}",
                        ex.file.display(),
                        ex.location,
                        opts.cutoff_len
                    )
                });
            }
            Err(reason) => {
                skipped += 1;
                first_skip.get_or_insert_with(|| {
                    crate::data::reader::SkipRecord {
                        file: ex.file.clone(),
                        location: ex.location,
                        reason,
                    }
                    .to_string()
                });
            }
        }
    }
    if encoded.is_empty() {
        return Err(PredictError::NoExamples {
            skipped,
            first: first_skip.unwrap_or_else(|| "the data has no rows".into()),
        });
    }
    let batch_size = preset.per_device_eval_batch_size.max(1);
    let total = encoded.len();
    on_event(PredictEvent::Started { total, batch_size });
    let params = resolve::generation_params(preset);
    let stop_ids = enc.stop_ids.clone();
    let decode = |ids: &[u32], skip_special: bool| {
        enc.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| crate::engine::EngineError::Tokenizer(e.to_string()))
    };
    let started = Instant::now();
    let mut rows = Vec::with_capacity(total);
    let mut tokens = 0usize;
    let mut steps = 0usize;
    for chunk in encoded.chunks(batch_size) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let outs = generate_batch(
            &session.model,
            &prompts,
            &params,
            &stop_ids,
            cancel,
            |_, _| {},
        )?;
        steps += 1;
        if outs.iter().any(|(_, stop)| *stop == StopReason::Cancelled) {
            return Err(PredictError::Cancelled {
                done: rows.len(),
                total,
            });
        }
        for ((prompt, label), (ids, stop)) in chunk.iter().zip(outs) {
            let predict = decode(&ids, preset.skip_special_tokens)?;
            let label = decode(label, preset.skip_special_tokens)?;
            tokens += ids.len();
            rows.push(PredictRow {
                prompt: decode(prompt, false)?,
                scores: metrics::scores(&predict, &label),
                predict,
                label,
                new_tokens: ids.len(),
                truncated: stop == StopReason::MaxTokens,
            });
        }
        on_event(PredictEvent::Progress {
            done: rows.len(),
            total,
            tokens,
        });
    }
    let runtime = started.elapsed().as_secs_f64();
    let mean = metrics::mean(&rows.iter().map(|r| r.scores).collect::<Vec<_>>());
    #[allow(clippy::cast_precision_loss)]
    let metrics = BTreeMap::from([
        ("predict_rouge-1".to_string(), mean.rouge1),
        ("predict_rouge-2".to_string(), mean.rouge2),
        ("predict_rouge-l".to_string(), mean.rouge_l),
        ("predict_bleu-4".to_string(), mean.bleu4),
        // The HF Trainer's `speed_metrics`: runtime to 4 places, rates to 3.
        ("predict_runtime".to_string(), round_to(runtime, 4)),
        (
            "predict_samples_per_second".to_string(),
            round_to(total as f64 / runtime.max(1e-9), 3),
        ),
        (
            "predict_steps_per_second".to_string(),
            round_to(steps as f64 / runtime.max(1e-9), 3),
        ),
    ]);
    Ok(PredictOutcome {
        rows,
        metrics,
        skipped,
        first_skip,
        loaded,
    })
}

fn round_to(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

impl PredictOutcome {
    /// Writes LF's files into `dir` (created if needed); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, PredictError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PredictError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut lines = String::new();
        for r in &self.rows {
            // LF: json.dumps({"prompt", "predict", "label"}, ensure_ascii=False), one per line.
            let line =
                serde_json::json!({"prompt": r.prompt, "predict": r.predict, "label": r.label});
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        let predictions = dir.join(PREDICTIONS_FILE);
        crate::fsutil::write_atomic(&predictions, lines.as_bytes()).map_err(io(&predictions))?;
        let results = dir.join(PREDICT_RESULTS_FILE);
        crate::fsutil::write_atomic(&results, metrics_json(&self.metrics).as_bytes())
            .map_err(io(&results))?;
        // `save_metrics(combined=True)`: all_results.json keeps the other stages' metrics.
        let all = dir.join(ALL_RESULTS_FILE);
        let mut combined: BTreeMap<String, serde_json::Value> = std::fs::read_to_string(&all)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        for (k, v) in &self.metrics {
            combined.insert(k.clone(), serde_json::json!(v));
        }
        crate::fsutil::write_atomic(&all, metrics_json(&combined).as_bytes()).map_err(io(&all))?;
        Ok(vec![predictions, results, all])
    }

    /// The metrics as LF prints them at the end (`***** predict metrics *****`).
    pub fn summary(&self) -> String {
        let mut s = String::from("***** predict metrics *****\n");
        let width = self.metrics.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in &self.metrics {
            s.push_str(&format!("  {k:<width$} = {v:.4}\n"));
        }
        s
    }
}

/// The HF Trainer's `save_metrics`: `json.dump(metrics, indent=4, sort_keys=True)`.
fn metrics_json(metrics: &impl serde::Serialize) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serialising a map of strings to numbers into memory cannot fail.
    let _ = metrics.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default() + "\n"
}
