//! The Export pane's state and its transitions: start (refused while the preset has problems,
//! then a confirmation that names the target folder), progress lines, the report or the refusal.
//! Pure: fed by keys and [`ExportEvent`]s; the export itself runs on a thread the TUI's effect runner owns.
//!
//! Export during a run: allowed only from a complete adapter. The trainer writes
//! `checkpoint-N` folders atomically (`.checkpoint-N.tmp` renamed at the end), so any
//! `checkpoint-N` of the running run may be exported while it trains; the run's own `output_dir`
//! (its final adapter, written non-atomically when the run ends) is refused until the run has
//! finished. `L` points `adapter_name_or_path` at the latest saved checkpoint.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::{Action, App, Effect, Overlay, Question, Tab};
use crate::config::Purpose;
use crate::export::ExportReport;
use crate::export::job::{ExportEvent, ExportRequest};

/// Progress lines kept.
pub const MAX_LINES: usize = 200;

/// Where the export is.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportPhase {
    Idle,
    Running,
    Finished(Box<ExportReport>),
    Failed(String),
    /// Cancelled on request; nothing was written.
    Cancelled,
}

/// The Export pane.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportState {
    pub phase: ExportPhase,
    /// Export the adapter alone (PEFT folder + model card) instead of a merged model.
    pub adapter_only: bool,
    /// Progress lines of the current or last export.
    pub lines: VecDeque<String>,
    /// Lines scrolled up from the newest.
    pub scroll: usize,
    /// The export waiting for the user's confirmation.
    pub pending: Option<ExportRequest>,
    /// Quit asked during an export: leave once it has ended.
    pub quit_when_done: bool,
    /// Cancel asked; the export stops at its next step.
    pub cancelling: bool,
}

impl Default for ExportState {
    fn default() -> Self {
        Self {
            phase: ExportPhase::Idle,
            adapter_only: false,
            lines: VecDeque::new(),
            scroll: 0,
            pending: None,
            quit_when_done: false,
            cancelling: false,
        }
    }
}

impl ExportState {
    pub fn is_running(&self) -> bool {
        self.phase == ExportPhase::Running
    }

    fn note(&mut self, line: impl Into<String>) {
        if self.lines.len() == MAX_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.into());
    }
}

/// What an export of this preset writes, in words ("merged model, safetensors in bfloat16").
pub fn describe_output(
    format: &str,
    gguf_type: &str,
    infer_dtype: &str,
    adapter_only: bool,
) -> String {
    if adapter_only {
        "the adapter alone: PEFT folder + model card README.md".into()
    } else if format == "gguf" {
        format!("merged model as one GGUF file ({gguf_type}) + Ollama Modelfile")
    } else {
        let dtype = if infer_dtype.is_empty() || infer_dtype == "auto" {
            "dtype auto (base's; f32→bf16)".to_string()
        } else {
            infer_dtype.to_string()
        };
        format!("merged HF folder, {dtype} + Ollama Modelfile")
    }
}

/// The rule for exporting while a run trains into `output_dir`: an adapter path that is the
/// run's `output_dir` itself is refused (its final adapter is written when the run ends);
/// `checkpoint-N` folders are complete by construction and allowed. `None` when allowed.
pub fn adapter_problem_during_run(
    adapters: &[PathBuf],
    output_dir: &Path,
    latest: Option<&Path>,
) -> Option<String> {
    let same = |a: &Path| a.components().eq(output_dir.components());
    let bad = adapters.iter().find(|a| same(a))?;
    let hint = match latest {
        Some(c) => format!(
            "export a saved checkpoint instead (L uses the latest: {})",
            c.display()
        ),
        None => "wait for the first checkpoint (save_steps) or for the run to end".into(),
    };
    Some(format!(
        "cannot export {} while its run is training: the final adapter is written when the run ends; {hint}",
        bad.display()
    ))
}

impl App {
    /// The Export pane's actions; None passes the action on.
    pub(super) fn export_action(&mut self, action: Action) -> Option<Vec<Effect>> {
        Some(match action {
            Action::StartExport => self.start_export(),
            Action::CancelExport => self.cancel_export(),
            Action::ToggleExportMode => {
                self.toggle_export_mode();
                Vec::new()
            }
            Action::UseLatestCheckpoint => {
                self.use_latest_checkpoint();
                Vec::new()
            }
            Action::ScrollUp | Action::ScrollDown => {
                self.scroll_export(action == Action::ScrollUp, 10);
                Vec::new()
            }
            _ => return None,
        })
    }

    /// `e` on the Export pane: check the preset for export, then ask to confirm the target.
    fn start_export(&mut self) -> Vec<Effect> {
        if self.export.is_running() {
            self.say("an export is already running; its progress is below");
            return Vec::new();
        }
        let loaded = match self.form.check(Purpose::Export) {
            Ok(l) => l,
            Err(issues) => {
                self.refuse("export", &issues);
                return Vec::new();
            }
        };
        let preset = loaded.preset;
        let adapters = preset
            .adapter_name_or_path
            .as_deref()
            .map(|list| {
                crate::config::comma_list(list)
                    .into_iter()
                    .map(PathBuf::from)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if self.export.adapter_only && adapters.is_empty() {
            self.focus_key("adapter_name_or_path");
            self.complain(
                "cannot export the adapter alone: set `adapter_name_or_path` to the adapter folder (m switches to a merged model)",
            );
            return Vec::new();
        }
        if self.run.phase.is_active()
            && let Some(out) = self.run.output_dir.clone()
        {
            let latest = self.run.last_checkpoint.as_ref().map(|(_, d)| d.as_path());
            if let Some(problem) = adapter_problem_during_run(&adapters, &out, latest) {
                self.focus_key("adapter_name_or_path");
                self.complain(problem);
                return Vec::new();
            }
        }
        self.export.pending = Some(ExportRequest {
            preset,
            adapter_only: self.export.adapter_only,
        });
        self.overlay = Overlay::Confirm(Question::StartExport);
        Vec::new()
    }

    /// The confirmation was answered.
    pub(super) fn answer_export(&mut self, yes: bool) -> Vec<Effect> {
        let Some(request) = self.export.pending.take() else {
            return Vec::new();
        };
        if !yes {
            self.say("export cancelled; nothing was written");
            return Vec::new();
        }
        let dir = request.preset.export_dir.clone().unwrap_or_default();
        self.export.phase = ExportPhase::Running;
        self.export.cancelling = false;
        self.export.lines.clear();
        self.export.scroll = 0;
        self.export.note(format!("exporting to {dir}"));
        self.tab = Tab::Export;
        self.say(format!("exporting to {dir}…"));
        vec![Effect::Export(Box::new(request))]
    }

    /// The confirmation's text, naming the folder that will be written.
    pub fn export_question(&self) -> String {
        match &self.export.pending {
            Some(r) => {
                let dir = r.preset.export_dir.as_deref().unwrap_or("");
                let what = describe_output(
                    &self.form.value("export_format"),
                    &self.form.value("export_gguf_type"),
                    &self.form.value("infer_dtype"),
                    r.adapter_only,
                );
                format!(
                    "Write {what} to the folder {dir}? It must not exist or be empty; nothing partial is left if the export fails. (y: export, n/Esc: cancel)"
                )
            }
            None => Question::StartExport.text().to_string(),
        }
    }

    /// A fact from the export thread.
    pub(super) fn on_export(&mut self, ev: ExportEvent) -> Vec<Effect> {
        match ev {
            ExportEvent::Progress(line) => {
                self.export.note(line);
                if self.export.scroll > 0 {
                    // Keep the same lines in view; `scroll_export` caps it at the log's length.
                    self.scroll_export(true, 1);
                }
                return Vec::new();
            }
            ExportEvent::Finished(report) => {
                self.say(format!(
                    "exported to {} ({} files)",
                    report.dir.display(),
                    report.files.len()
                ));
                self.export.phase = ExportPhase::Finished(Box::new(report));
            }
            ExportEvent::Failed(message) => {
                self.complain(format!("export refused: {message}"));
                self.export.phase = ExportPhase::Failed(message);
            }
            ExportEvent::Cancelled => {
                self.say("export cancelled; nothing was written to export_dir");
                self.export.phase = ExportPhase::Cancelled;
            }
        }
        self.export.cancelling = false;
        self.export.scroll = 0;
        if self.export.quit_when_done && !self.run.phase.is_active() {
            return vec![Effect::Quit];
        }
        Vec::new()
    }

    /// `m`: merged model ⇄ adapter alone.
    fn toggle_export_mode(&mut self) {
        self.export.adapter_only = !self.export.adapter_only;
        self.say(if self.export.adapter_only {
            "export: the adapter alone (PEFT folder + model card)"
        } else {
            "export: a merged model (export_format decides safetensors or GGUF)"
        });
    }

    /// `L`: `adapter_name_or_path` ← the run's latest saved checkpoint.
    fn use_latest_checkpoint(&mut self) {
        match self.run.last_checkpoint.clone() {
            Some((step, dir)) => {
                self.form
                    .set("adapter_name_or_path", &dir.display().to_string());
                self.say(format!(
                    "adapter_name_or_path = {} (checkpoint of step {step})",
                    dir.display()
                ));
            }
            None => self.complain("no checkpoint saved yet in this session"),
        }
    }

    /// Scrolls the export log (`up` towards older lines).
    pub(super) fn scroll_export(&mut self, up: bool, lines: usize) {
        let max = self.export.lines.len().saturating_sub(1);
        self.export.scroll = if up {
            (self.export.scroll + lines).min(max)
        } else {
            self.export.scroll.saturating_sub(lines)
        };
    }

    /// `x` on the Export pane: cancel a running export (it stops at its next step and removes
    /// what it wrote); without one, `x` stops a run as everywhere else.
    fn cancel_export(&mut self) -> Vec<Effect> {
        if !self.export.is_running() {
            self.ask_stop_run();
            return Vec::new();
        }
        if self.export.cancelling {
            self.say("cancelling: the export stops after its current step…");
            return Vec::new();
        }
        self.export.cancelling = true;
        self.say("cancelling the export after its current step…");
        vec![Effect::CancelExport]
    }

    /// `q` while an export runs (and no training): ask whether to cancel it and quit. While
    /// waiting for the cancel, `q` again leaves at once.
    pub(super) fn quit_during_export(&mut self) -> Option<Vec<Effect>> {
        if !self.export.is_running() || self.run.phase.is_active() {
            return None;
        }
        if self.export.quit_when_done {
            return Some(vec![Effect::Quit]);
        }
        self.overlay = Overlay::Confirm(Question::QuitDuringExport);
        Some(Vec::new())
    }

    /// Quit confirmed (or the terminal went away) during an export: cancel it, leave when it ends.
    pub(super) fn cancel_export_and_quit(&mut self) -> Vec<Effect> {
        self.export.quit_when_done = true;
        self.export.cancelling = true;
        self.say("cancelling the export, then quitting…");
        vec![Effect::CancelExport]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_runs_output_dir_is_refused_and_its_checkpoints_allowed() {
        let out = Path::new("saves/run");
        let latest = Path::new("saves/run/checkpoint-20");
        assert!(
            adapter_problem_during_run(&[PathBuf::from("saves/run/")], out, Some(latest))
                .is_some_and(|m| m.contains("checkpoint-20"))
        );
        assert!(
            adapter_problem_during_run(&[PathBuf::from("saves/run/checkpoint-10")], out, None)
                .is_none()
        );
        assert!(adapter_problem_during_run(&[], out, None).is_none());
        assert!(adapter_problem_during_run(&[PathBuf::from("other")], out, None).is_none());
    }
}
