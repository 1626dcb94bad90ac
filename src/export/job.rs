//! One export as a job for a background thread: a plain-data request in, plain-data events out
//! (progress lines, then the report or the refusal). The TUI's export thread calls [`run`]; so do
//! the tests, so the path the user takes is the path tested. Never imports the UI.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

use super::{ExportError, ExportReport, export_adapter_cancellable, export_cancellable};
use crate::config::Preset;

/// What to export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRequest {
    /// The preset as validated for export (its `export_dir`, format, adapters).
    pub preset: Preset,
    /// Copy the (last) adapter as a PEFT folder with a model card instead of merging
    /// (`termtune export --adapter-only`).
    pub adapter_only: bool,
}

/// What an export job reports, in order: any number of `Progress`, then one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportEvent {
    /// One line per long step (loading, merging, writing a shard…).
    Progress(String),
    Finished(ExportReport),
    /// The export was refused or failed; the message says why and what to do. Nothing partial
    /// is left in `export_dir`.
    Failed(String),
    /// `cancel` was set; whatever was written is removed.
    Cancelled,
}

/// Runs the export `request` describes on `device`, sending every event to `emit`; setting
/// `cancel` stops it at its next step. A panic in the export becomes `Failed` (the UI must hear
/// an end either way).
pub fn run(
    request: &ExportRequest,
    device: &Device,
    cancel: &AtomicBool,
    emit: &mut dyn FnMut(ExportEvent),
) {
    let cancelled = || cancel.load(Ordering::SeqCst);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut progress = |line: &str| emit(ExportEvent::Progress(line.to_string()));
        if request.adapter_only {
            export_adapter_cancellable(&request.preset, &mut progress, &cancelled)
        } else {
            export_cancellable(&request.preset, device, &mut progress, &cancelled)
        }
    }));
    emit(match result {
        Ok(Ok(report)) => ExportEvent::Finished(report),
        Ok(Err(ExportError::Cancelled)) => ExportEvent::Cancelled,
        Ok(Err(e)) => {
            tracing::warn!("export refused: {e}");
            ExportEvent::Failed(e.to_string())
        }
        Err(_) => ExportEvent::Failed("the export panicked; see the log file".into()),
    });
}
