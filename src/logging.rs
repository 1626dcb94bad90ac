//! Logging with `tracing` to a file: stdout and stderr belong to the TUI and to command output.

use std::path::{Path, PathBuf};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// The default log file: `<cache>/logs/termtune.log`.
pub fn default_log_path() -> PathBuf {
    crate::fsutil::cache_dir().join("logs").join("termtune.log")
}

/// Starts logging to `path` (or [`default_log_path`]); the filter comes from `TERMTUNE_LOG`
/// (default `info`). Keep the guard alive for the whole run: dropping it flushes the log.
/// Returns `None`, logging nothing, when the log file cannot be opened.
pub fn init(path: Option<&Path>) -> Option<WorkerGuard> {
    let path = path.map_or_else(default_log_path, Path::to_path_buf);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .ok()?;
    let (writer, guard) = tracing_appender::non_blocking(file);
    let filter = EnvFilter::try_from_env("TERMTUNE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init()
        .ok()?;
    LOG_PATH.set(path).ok();
    Some(guard)
}

static LOG_PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Where this process logs, once [`init`] has succeeded (for error messages: "see <log>").
pub fn log_path() -> Option<&'static Path> {
    LOG_PATH.get().map(PathBuf::as_path)
}
