//! The run folder's logs in LLaMA-Factory's formats: `trainer_log.jsonl` (one object per logging
//! step, LLaMA-Factory's keys plus `grad_norm` and memory) and the Hugging Face Trainer's
//! `trainer_state.json` / `train_results.json` / `all_results.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line of `trainer_log.jsonl`. `None` fields are left out, as LLaMA-Factory drops nulls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LogLine {
    pub current_steps: u64,
    pub total_steps: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    pub epoch: f64,
    pub percentage: f64,
    pub elapsed_time: String,
    pub remaining_time: String,
    /// Real (non-padding) tokens per second since the start.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub throughput: Option<f64>,
    /// Real tokens seen so far.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub total_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    /// Peak resident memory of the process so far, GiB.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rss_gib: Option<f64>,
    /// Peak GPU memory, GiB (LLaMA-Factory's `vram_allocated` with RECORD_VRAM=1).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vram_allocated: Option<f64>,
    /// The device of the run (`cpu`, `cuda:0`); termtune only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<String>,
    /// LLaMA-Factory's `accuracy`: `rewards/accuracies` of a preference stage.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accuracy: Option<f64>,
    /// The stage's own metrics under TRL's names (`rewards/margins`, `eval_logps/chosen`, …), and any other key a
    /// LLaMA-Factory log line has.
    #[serde(flatten, default)]
    pub metrics: BTreeMap<String, serde_json::Value>,
}

/// `H:MM:SS`, as Python's `str(timedelta(seconds=int(s)))` prints it (days as `N day(s), `).
pub fn format_duration(seconds: f64) -> String {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    let days = total / 86_400;
    let rest = total % 86_400;
    let hms = format!("{}:{:02}:{:02}", rest / 3600, (rest % 3600) / 60, rest % 60);
    match days {
        0 => hms,
        1 => format!("1 day, {hms}"),
        d => format!("{d} days, {hms}"),
    }
}

/// Rounds like Python's `round(x, digits)` for display values.
pub fn round_to(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Appends one line to `trainer_log.jsonl` in `dir`.
pub fn append_log_line(dir: &Path, line: &LogLine) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("trainer_log.jsonl"))?;
    let text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    writeln!(f, "{text}")?;
    f.flush()
}

/// Reads `trainer_log.jsonl` (for the dashboard of a finished run, and for resume). Lines that do
/// not parse are skipped: a crash can leave a half-written last line.
pub fn read_log(dir: &Path) -> std::io::Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(dir.join("trainer_log.jsonl"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// One entry of the Trainer's `log_history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub step: u64,
    pub epoch: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// `compute_accuracy`: the mean token accuracy of the evaluation examples.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub num_input_tokens_seen: Option<u64>,
    /// A stage's own metrics under TRL's names (`rewards/accuracies`, `eval_rewards/margins`, …), and any other key
    /// of a Hugging Face log entry.
    #[serde(flatten, default)]
    pub metrics: BTreeMap<String, serde_json::Value>,
}

/// The Hugging Face Trainer's `trainer_state.json` (the keys its readers look at), plus
/// termtune's resume data under `termtune`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    pub epoch: f64,
    pub eval_steps: u64,
    pub global_step: u64,
    pub is_hyper_param_search: bool,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub log_history: Vec<HistoryEntry>,
    pub logging_steps: u64,
    pub max_steps: u64,
    pub num_input_tokens_seen: u64,
    pub num_train_epochs: f64,
    pub save_steps: u64,
    pub total_flos: f64,
    pub train_batch_size: usize,
    pub trial_name: Option<String>,
    pub trial_params: Option<serde_json::Value>,
    #[serde(default)]
    pub termtune: ResumeState,
}

/// What an exact resume needs beyond the optimizer: where the data order stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ResumeState {
    /// Micro-batches consumed in total (the data order is a pure function of seed and epoch).
    pub micro_batches_done: u64,
    /// Seconds of training before this checkpoint (elapsed time continues across a resume).
    pub elapsed_secs: f64,
    /// Seed of the dropout random stream at this point.
    pub dropout_seed: u64,
    /// `early_stopping_steps`: evaluations since the best one (the Hugging Face EarlyStoppingCallback's
    /// `early_stopping_patience_counter`).
    #[serde(default)]
    pub early_stopping_patience_counter: u64,
}

impl TrainerState {
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_print_like_python_timedelta() {
        assert_eq!(format_duration(41.7), "0:00:41");
        assert_eq!(format_duration(1502.0), "0:25:02");
        assert_eq!(format_duration(3600.0 * 5.0 + 61.0), "5:01:01");
        assert_eq!(format_duration(86_400.0 + 1.0), "1 day, 0:00:01");
        assert_eq!(format_duration(f64::NAN), "0:00:00");
    }

    #[test]
    fn log_lines_use_llamafactory_keys_and_drop_nulls() {
        let line = LogLine {
            current_steps: 10,
            total_steps: 375,
            loss: Some(1.6123),
            lr: Some(9.6e-5),
            epoch: 0.08,
            percentage: 2.67,
            elapsed_time: "0:00:41".into(),
            remaining_time: "0:25:02".into(),
            throughput: Some(1530.12),
            total_tokens: Some(62740),
            ..LogLine::default()
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            r#"{"current_steps":10,"total_steps":375,"loss":1.6123,"lr":0.000096,"epoch":0.08,"percentage":2.67,"elapsed_time":"0:00:41","remaining_time":"0:25:02","throughput":1530.12,"total_tokens":62740}"#
        );
        let dir = tempfile::tempdir().unwrap();
        append_log_line(dir.path(), &line).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("trainer_log.jsonl"))
            .unwrap()
            .write_all(b"{\"current_st")
            .unwrap();
        assert_eq!(read_log(dir.path()).unwrap(), vec![line]);
    }
}
