//! Runs that outlive the terminal: `termtune train --detach` starts a run in a process (and
//! session) of its own; the run keeps a small state file in its folder, registers the folder in
//! termtune's cache, and listens on a Unix socket there (`termtune attach`).
//!
//! - [`RunRecord`]: `output_dir/termtune-run.json`, written by the run process on every change of
//!   state (not per step: step, loss and throughput are read from `trainer_log.jsonl`).
//! - the registry: `<cache>/runs/<id>.json`, one pointer to a run folder each ([`register`]).
//! - [`list`] / [`RunView`]: what `termtune runs` shows, with runs whose process is gone as "died".
//! - [`control`]: the socket protocol (server side in the run, client side in `attach`).
//! - [`detach`]: starting the run process and its main loop; [`attach`]: the headless client;
//!   [`client`]: the TUI's connection to a run; [`follow`]: any run folder's `trainer_log.jsonl`
//!   followed read-only as it grows (LLaMA-Factory's runs too).

#[cfg(unix)]
pub mod attach;
#[cfg(unix)]
pub mod client;
#[cfg(unix)]
pub mod control;
#[cfg(unix)]
pub mod detach;
pub mod follow;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::trainer::protocol::TrainEvent;
use crate::trainer::runlog::LogLine;

/// The state file of a run, in its folder.
pub const STATE_FILE: &str = "termtune-run.json";
/// The detached run's own output (what `termtune train` would print), in its folder.
pub const LOG_FILE: &str = "termtune-run.log";
/// The control socket, in the run folder.
pub const SOCKET_FILE: &str = ".termtune.sock";

/// Where a run stands, as its process last wrote it ([`RunState::Died`] is only ever inferred).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Starting,
    Running,
    Paused,
    Finished,
    /// Stopped on request before the last step (a checkpoint was saved).
    Stopped,
    Failed,
    /// The process is gone but never wrote a final state (killed, crashed, machine rebooted).
    Died,
}

impl RunState {
    /// The run process wrote this as its last word.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Finished | Self::Stopped | Self::Failed | Self::Died
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Finished => "finished",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Died => "died",
        }
    }
}

/// `output_dir/termtune-run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub output_dir: PathBuf,
    pub state: RunState,
    pub pid: u32,
    /// The process's start time (seconds since the Unix epoch, as the OS reports it), so a pid
    /// reused by another process does not pass for the run.
    pub process_start: u64,
    /// When the run was started (seconds since the Unix epoch).
    pub started: u64,
    /// The preset file it was started from.
    pub preset: PathBuf,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub total_steps: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub message: Option<String>,
}

impl RunRecord {
    pub fn path(output_dir: &Path) -> PathBuf {
        output_dir.join(STATE_FILE)
    }

    pub fn load(output_dir: &Path) -> std::io::Result<Self> {
        let path = Self::path(output_dir);
        let text = std::fs::read_to_string(&path)?;
        serde_json::from_str(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }

    pub fn save(&self) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&Self::path(&self.output_dir), text.as_bytes())
    }

    /// Follows `ev` (state, total steps, device, why it failed); true when the record changed.
    pub fn on_event(&mut self, ev: &TrainEvent) -> bool {
        let before = (self.state, self.total_steps);
        match ev {
            TrainEvent::Started {
                total_steps,
                device,
                ..
            } => {
                self.state = RunState::Running;
                self.total_steps = Some(*total_steps);
                self.device = Some(device.clone());
                return true;
            }
            TrainEvent::Paused => self.state = RunState::Paused,
            TrainEvent::Resumed => self.state = RunState::Running,
            TrainEvent::Failed(msg) => self.message = Some(msg.clone()),
            _ => {}
        }
        before != (self.state, self.total_steps)
    }

    /// A run in the foreground (`termtune train`) in a folder whose detached run has ended or
    /// died: the folder's record becomes this process's, so `termtune runs` tells how it goes
    /// on rather than "died". `None` when the folder has no record or its run is alive.
    pub fn take_over(output_dir: &Path) -> Option<Self> {
        let dir = std::path::absolute(output_dir).unwrap_or_else(|_| output_dir.to_path_buf());
        let mut record = Self::load(&dir).ok()?;
        if !record.state.is_final() && is_alive(&record) {
            return None;
        }
        let pid = std::process::id();
        record.pid = pid;
        record.process_start = process_start(pid).unwrap_or_else(now_unix);
        record.started = now_unix();
        record.state = RunState::Starting;
        record.message = None;
        record.save().ok()?;
        Some(record)
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The start time (seconds since the epoch) of process `pid` when it is alive and not a zombie.
pub fn process_start(pid: u32) -> Option<u64> {
    use sysinfo::{Pid, ProcessStatus, ProcessesToUpdate, System};
    let pid = Pid::from_u32(pid);
    let mut sys = System::new().ok()?;
    sys.refresh_processes(ProcessesToUpdate::Some(&[pid]), true);
    let p = sys.process(pid)?;
    if matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead) {
        return None;
    }
    Some(p.start_time())
}

/// The run process of `record` is still the one that wrote it.
pub fn is_alive(record: &RunRecord) -> bool {
    // The OS rounds start times to seconds (and sysinfo derives them from boot time): allow 2 s.
    process_start(record.pid).is_some_and(|s| s.abs_diff(record.process_start) <= 2)
}

/// The folder of registry entries.
pub fn registry_dir() -> PathBuf {
    crate::fsutil::cache_dir().join("runs")
}

/// One registry entry: a pointer to a run folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RegistryEntry {
    output_dir: PathBuf,
}

/// The registry id of a run folder: the same folder always has the same entry.
fn registry_id(output_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(output_dir.as_os_str().as_encoded_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds `output_dir` (absolute) to this user's registry of runs.
pub fn register(output_dir: &Path) -> std::io::Result<()> {
    let entry = RegistryEntry {
        output_dir: output_dir.to_path_buf(),
    };
    let text = serde_json::to_string(&entry).map_err(std::io::Error::other)?;
    let path = registry_dir().join(format!("{}.json", registry_id(output_dir)));
    crate::fsutil::write_atomic(&path, text.as_bytes())
}

/// A run as `termtune runs` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunView {
    pub output_dir: PathBuf,
    pub state: RunState,
    /// The last logged step.
    pub step: u64,
    pub total_steps: Option<u64>,
    pub loss: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    pub device: Option<String>,
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// The newest complete checkpoint (what the next `termtune train` of the preset resumes from).
    pub checkpoint: Option<PathBuf>,
    /// A sentence for people: "died at step 12, resumable from checkpoint-10".
    pub note: Option<String>,
}

/// What `termtune runs` shows for the run in `output_dir`; `None` when it holds no state file.
pub fn view(output_dir: &Path) -> Option<RunView> {
    let record = RunRecord::load(output_dir).ok()?;
    let mut state = record.state;
    if !state.is_final() && !is_alive(&record) {
        state = RunState::Died;
    }
    let tail = last_log_lines(output_dir);
    let last = tail.iter().rev().find(|l| l.loss.is_some());
    let step = tail.iter().map(|l| l.current_steps).max().unwrap_or(0);
    let checkpoint = crate::trainer::checkpoint::latest_checkpoint(output_dir);
    let resumable = checkpoint.as_ref().map_or_else(
        || "no checkpoint: the next run starts afresh".to_string(),
        |(_, dir)| {
            format!(
                "resumable from {}",
                dir.file_name().unwrap_or_default().to_string_lossy()
            )
        },
    );
    let note = match state {
        RunState::Died => Some(format!("died at step {step}, {resumable}")),
        RunState::Stopped => Some(format!("stopped at step {step}, {resumable}")),
        RunState::Failed => Some(record.message.clone().unwrap_or_default()),
        _ => None,
    };
    Some(RunView {
        output_dir: record.output_dir.clone(),
        state,
        step,
        total_steps: record
            .total_steps
            .or_else(|| tail.last().map(|l| l.total_steps)),
        loss: last.and_then(|l| l.loss),
        tokens_per_sec: tail.iter().rev().find_map(|l| l.throughput),
        device: record
            .device
            .clone()
            .or_else(|| tail.iter().rev().find_map(|l| l.device.clone())),
        pid: record.pid,
        started: record.started,
        checkpoint: checkpoint.map(|(_, dir)| dir),
        note,
    })
}

/// The complete lines at the end of `trainer_log.jsonl` (the last 64 KiB: enough for the latest
/// step, loss and throughput without reading a long run's whole log).
fn last_log_lines(output_dir: &Path) -> Vec<LogLine> {
    const TAIL_BYTES: u64 = 64 * 1024;
    let Ok(mut f) = std::fs::File::open(output_dir.join("trainer_log.jsonl")) else {
        return Vec::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let from = len.saturating_sub(TAIL_BYTES);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every registered run of this user, newest first. Registry entries whose folder no longer
/// holds a state file are skipped.
pub fn list() -> Vec<RunView> {
    let Ok(entries) = std::fs::read_dir(registry_dir()) else {
        return Vec::new();
    };
    let mut runs: Vec<RunView> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let entry: RegistryEntry = serde_json::from_str(&text).ok()?;
            view(&entry.output_dir)
        })
        .collect();
    runs.sort_by(|a, b| {
        b.started
            .cmp(&a.started)
            .then(a.output_dir.cmp(&b.output_dir))
    });
    runs
}

/// The table `termtune runs` prints.
pub fn table(runs: &[RunView], now: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:>13} {:>8} {:>9} {:<10} {:>8} {:>9}  OUTPUT_DIR",
        "STATE", "STEP", "LOSS", "TOK/S", "DEVICE", "PID", "STARTED"
    );
    for r in runs {
        let steps = match r.total_steps {
            Some(t) => format!("{}/{t}", r.step),
            None => r.step.to_string(),
        };
        #[allow(clippy::cast_precision_loss)]
        let age = crate::trainer::runlog::format_duration(now.saturating_sub(r.started) as f64);
        let _ = writeln!(
            out,
            "{:<10} {:>13} {:>8} {:>9} {:<10} {:>8} {:>9}  {}",
            r.state.as_str(),
            steps,
            r.loss.map_or_else(|| "-".into(), |l| format!("{l:.4}")),
            r.tokens_per_sec
                .map_or_else(|| "-".into(), |t| format!("{t:.0}")),
            r.device.as_deref().unwrap_or("-"),
            r.pid,
            format!("{age} ago"),
            r.output_dir.display()
        );
        if let Some(note) = r.note.as_deref().filter(|n| !n.is_empty()) {
            let _ = writeln!(out, "{:<10} {note}", "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_live_run_whose_process_is_gone_reads_as_died_with_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_path_buf();
        let record = RunRecord {
            output_dir: out.clone(),
            state: RunState::Running,
            // pid_max on Linux is at most 2^22: this pid never exists.
            pid: 4_194_304 + 7,
            process_start: 1,
            started: 100,
            preset: "p.yaml".into(),
            device: Some("cpu".into()),
            total_steps: Some(40),
            message: None,
        };
        record.save().unwrap();
        // A checkpoint counts once its trainer_state.json is there; checkpoint-12 was cut short.
        std::fs::create_dir_all(out.join("checkpoint-10")).unwrap();
        std::fs::write(out.join("checkpoint-10/trainer_state.json"), "{}").unwrap();
        std::fs::create_dir_all(out.join("checkpoint-12")).unwrap();
        std::fs::write(
            out.join("trainer_log.jsonl"),
            "{\"current_steps\":11,\"total_steps\":40,\"loss\":1.5,\"epoch\":1.0,\"percentage\":27.5,\"elapsed_time\":\"0:00:01\",\"remaining_time\":\"0:00:03\",\"throughput\":123.0}\n{\"current_steps\":12,\"total_st",
        )
        .unwrap();
        let v = view(&out).unwrap();
        assert_eq!(v.state, RunState::Died);
        assert_eq!(v.step, 11);
        assert_eq!(v.loss, Some(1.5));
        assert_eq!(v.tokens_per_sec, Some(123.0));
        assert_eq!(
            v.note.as_deref(),
            Some("died at step 11, resumable from checkpoint-10")
        );
        let t = table(&[v], 160);
        assert!(
            t.contains("died") && t.contains("11/40") && t.contains("0:01:00 ago"),
            "{t}"
        );
    }

    #[test]
    fn this_process_is_alive_with_its_own_start_time() {
        let pid = std::process::id();
        let start = process_start(pid).unwrap();
        let record = RunRecord {
            output_dir: PathBuf::new(),
            state: RunState::Running,
            pid,
            process_start: start,
            started: 0,
            preset: PathBuf::new(),
            device: None,
            total_steps: None,
            message: None,
        };
        assert!(is_alive(&record));
        assert!(!is_alive(&RunRecord {
            process_start: start + 3600,
            ..record
        }));
    }
}
