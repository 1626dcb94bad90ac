//! The Run dashboard's state: the run's phase, its metric history (bounded), evaluation points,
//! the event log and the telemetry history. Pure: fed by `TrainEvent`s and telemetry samples.
//! The run's own actions (start, pause, stop, open a run folder) and engine facts are handled
//! here too.

use std::collections::VecDeque;
use std::path::PathBuf;

use super::{Action, App, Effect, Overlay, Question, Tab};
use crate::telemetry::{GpuReading, SystemSample, TelemetrySample};
use crate::trainer::protocol::{StepMetrics, TrainCommand, TrainEvent};
use crate::trainer::runlog::{LogLine, format_duration};

/// Points kept per series; older ones are dropped (a long run keeps its last 20 000 steps).
pub const MAX_POINTS: usize = 20_000;
/// Telemetry samples kept (at 1 Hz: two minutes).
pub const MAX_SAMPLES: usize = 120;
/// Event log lines kept.
pub const MAX_LOG: usize = 500;
/// Smoothing of the loss curve (TensorBoard's 0.9 would lag too much on 20-step runs).
pub const EMA_SMOOTHING: f64 = 0.8;

/// Where the run is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Nothing started (or a finished run's folder is shown).
    Idle,
    /// The engine is loading (model, data); the text says what.
    Loading(String),
    Running,
    Paused,
    /// Stop asked; waiting for the engine (saving a checkpoint when `save`).
    Stopping {
        save: bool,
    },
    Finished,
    Stopped,
    Failed(String),
}

impl Phase {
    /// The engine thread is alive and owns a run.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Phase::Loading(_) | Phase::Running | Phase::Paused | Phase::Stopping { .. }
        )
    }

    pub fn label(&self) -> String {
        match self {
            Phase::Idle => "idle".into(),
            Phase::Loading(_) => "loading".into(),
            Phase::Running => "running".into(),
            Phase::Paused => "paused".into(),
            Phase::Stopping { save: true } => "stopping (saving checkpoint)".into(),
            Phase::Stopping { save: false } => "stopping".into(),
            Phase::Finished => "finished".into(),
            Phase::Stopped => "stopped".into(),
            Phase::Failed(_) => "failed".into(),
        }
    }
}

/// One optimizer step as the charts use it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    pub smoothed: f64,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    /// A preference or reward stage's `rewards/margins` with `rewards/accuracies` (dpo, rm) or `kl` (kto).
    pub reward: Option<Reward>,
}

/// A preference or reward step's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reward {
    pub margin: f64,
    pub accuracy: Option<f64>,
    /// KTO's KL estimate.
    pub kl: Option<f64>,
}

impl Reward {
    /// From a step's metrics under TRL's names; `None` without a margin (not a preference stage).
    pub fn from_metrics(get: impl Fn(&str) -> Option<f64>) -> Option<Reward> {
        Some(Reward {
            margin: get("rewards/margins")?,
            accuracy: get("rewards/accuracies"),
            kl: get("kl"),
        })
    }
}

/// The dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub phase: Phase,
    pub total_steps: u64,
    pub points: VecDeque<Point>,
    pub evals: Vec<(u64, f64)>,
    pub last: Option<StepMetrics>,
    pub log: VecDeque<String>,
    /// Lines scrolled up from the newest.
    pub log_scroll: usize,
    pub log_scale: bool,
    pub output_dir: Option<PathBuf>,
    /// A finished run's folder is shown instead of a live run.
    pub from_folder: Option<PathBuf>,
    pub last_checkpoint: Option<(u64, PathBuf)>,
    pub gpu: Option<GpuReading>,
    /// Per GPU: memory used (bytes) history.
    pub gpu_memory_history: Vec<VecDeque<u64>>,
    pub system: Option<SystemSample>,
    pub cpu_history: VecDeque<u64>,
    pub rss_history: VecDeque<u64>,
    pub trainable: Option<(usize, usize)>,
    /// The pid of the run process followed (the run is its own process; the TUI is a client).
    pub run_pid: Option<u32>,
}

impl Default for RunState {
    fn default() -> Self {
        Self {
            phase: Phase::Idle,
            total_steps: 0,
            points: VecDeque::new(),
            evals: Vec::new(),
            last: None,
            log: VecDeque::new(),
            log_scroll: 0,
            log_scale: false,
            output_dir: None,
            from_folder: None,
            last_checkpoint: None,
            gpu: None,
            gpu_memory_history: Vec::new(),
            system: None,
            cpu_history: VecDeque::new(),
            rss_history: VecDeque::new(),
            trainable: None,
            run_pid: None,
        }
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(v);
}

impl RunState {
    /// A fresh dashboard for a run writing to `output_dir`; keeps telemetry history.
    pub fn start(&mut self, output_dir: PathBuf) {
        let keep = std::mem::take(self);
        *self = Self {
            phase: Phase::Loading("starting the engine".into()),
            output_dir: Some(output_dir),
            log_scale: keep.log_scale,
            gpu: keep.gpu,
            gpu_memory_history: keep.gpu_memory_history,
            system: keep.system,
            cpu_history: keep.cpu_history,
            rss_history: keep.rss_history,
            ..Self::default()
        };
        self.note("starting the run process: it loads the model and the dataset");
    }

    /// Follows the run in `dir`: its history from `trainer_log.jsonl` (the chart from step one),
    /// then live events; the phase is the one its state file gives.
    pub fn attach(&mut self, dir: PathBuf, record: &crate::runs::RunRecord, history: &[LogLine]) {
        use crate::runs::RunState as S;
        let starting = matches!(self.phase, Phase::Loading(_))
            && self.run_pid.is_none()
            && self
                .output_dir
                .as_ref()
                .is_some_and(|d| dir == *d || dir.ends_with(d));
        if starting {
            // The run this dashboard just started: keep its notes.
            self.run_pid = Some(record.pid);
            self.output_dir = Some(dir);
            return;
        }
        self.load_folder(dir, history);
        self.from_folder = None;
        self.run_pid = Some(record.pid);
        if let Some(t) = record.total_steps {
            self.total_steps = self.total_steps.max(t);
        }
        self.phase = match record.state {
            S::Starting => Phase::Loading("the run is starting".into()),
            S::Running => Phase::Running,
            S::Paused => Phase::Paused,
            S::Finished => Phase::Finished,
            S::Stopped => Phase::Stopped,
            S::Failed | S::Died => Phase::Failed(record.message.clone().unwrap_or_default()),
        };
        self.note(format!(
            "attached to the run in {} (pid {}); it goes on when termtune quits",
            record.output_dir.display(),
            record.pid
        ));
    }

    /// The followed run closed the connection; `view` is how it stands now.
    pub fn on_final(&mut self, view: &crate::runs::RunView) {
        use crate::runs::RunState as S;
        let note = view.note.clone().filter(|n| !n.is_empty());
        match view.state {
            S::Finished => {
                if self.phase.is_active() {
                    self.phase = Phase::Finished;
                }
            }
            S::Stopped => {
                self.phase = Phase::Stopped;
                self.note(note.unwrap_or_else(|| "stopped".into()));
            }
            S::Failed => {
                if !matches!(self.phase, Phase::Failed(_)) {
                    let msg = note.unwrap_or_else(|| "the run failed; see termtune-run.log".into());
                    self.note(format!("failed: {msg}"));
                    self.phase = Phase::Failed(msg);
                }
            }
            S::Died => {
                let msg = format!(
                    "the run process is gone: {}",
                    note.unwrap_or_else(|| "died".into())
                );
                self.note(msg.clone());
                self.phase = Phase::Failed(msg);
            }
            S::Starting | S::Running | S::Paused => {
                let msg = format!(
                    "lost the connection to the run in {} (pid {}); it may still be going: `termtune runs`",
                    view.output_dir.display(),
                    view.pid
                );
                self.note(msg.clone());
                self.phase = Phase::Failed(msg);
            }
        }
    }

    pub fn note(&mut self, line: impl Into<String>) {
        push_bounded(&mut self.log, line.into(), MAX_LOG);
    }

    fn push_point(
        &mut self,
        step: u64,
        loss: f64,
        lr: f64,
        grad: Option<f64>,
        tps: Option<f64>,
        reward: Option<Reward>,
    ) {
        if self.points.back().is_some_and(|p| p.step >= step) {
            // Already shown: an attached client hears the last logged step again in the replay.
            return;
        }
        let smoothed = match self.points.back() {
            Some(p) if loss.is_finite() => {
                EMA_SMOOTHING * p.smoothed + (1.0 - EMA_SMOOTHING) * loss
            }
            _ => loss,
        };
        push_bounded(
            &mut self.points,
            Point {
                step,
                loss,
                smoothed,
                lr,
                grad_norm: grad,
                tokens_per_sec: tps,
                reward,
            },
            MAX_POINTS,
        );
    }

    /// Applies one engine event.
    pub fn on_event(&mut self, ev: &TrainEvent) {
        match ev {
            TrainEvent::Loading { what } => {
                if !matches!(self.phase, Phase::Stopping { .. }) {
                    self.phase = Phase::Loading(what.clone());
                }
                self.note(what.clone());
            }
            TrainEvent::Warning(w) => self.note(format!("warning: {w}")),
            TrainEvent::Note(n) => self.note(n.clone()),
            TrainEvent::Resuming {
                checkpoint, step, ..
            } => self.note(format!(
                "resuming from {} (step {step})",
                checkpoint.display()
            )),
            TrainEvent::Started {
                total_steps,
                examples,
                trainable_params,
                total_params,
                ..
            } => {
                self.total_steps = *total_steps;
                self.trainable = Some((*trainable_params, *total_params));
                if !matches!(self.phase, Phase::Stopping { .. }) {
                    self.phase = Phase::Running;
                }
                self.note(format!(
                    "training {total_steps} steps on {examples} examples; {trainable_params} trainable parameters"
                ));
            }
            TrainEvent::StepFinished(m) => {
                self.total_steps = m.total_steps;
                self.push_point(
                    m.step,
                    m.loss,
                    m.lr,
                    Some(m.grad_norm),
                    Some(m.tokens_per_sec),
                    Reward::from_metrics(|k| m.metrics.get(k).copied()),
                );
                self.last = Some(m.clone());
            }
            TrainEvent::EvalFinished { step, eval_loss } => {
                self.evals.push((*step, *eval_loss));
                self.note(format!("eval at step {step}: eval_loss {eval_loss:.4}"));
            }
            TrainEvent::CheckpointSaved { step, dir } => {
                self.last_checkpoint = Some((*step, dir.clone()));
                self.note(format!("checkpoint saved: {}", dir.display()));
            }
            TrainEvent::Paused => {
                self.phase = Phase::Paused;
                self.note("paused");
            }
            TrainEvent::Resumed => {
                self.phase = Phase::Running;
                self.note("resumed");
            }
            TrainEvent::Finished(s) => {
                self.phase = if s.stopped_early {
                    Phase::Stopped
                } else {
                    Phase::Finished
                };
                self.note(format!(
                    "{}: {} steps in {}, {:.1} tokens/s; output in {}",
                    if s.stopped_early { "stopped" } else { "done" },
                    s.steps,
                    format_duration(s.elapsed.as_secs_f64()),
                    s.tokens_per_sec,
                    s.output_dir.display()
                ));
            }
            TrainEvent::Failed(msg) => {
                self.phase = Phase::Failed(msg.clone());
                self.note(format!("failed: {msg}"));
            }
        }
    }

    /// The engine thread ended. Without a final event first, that is a failure.
    pub fn on_engine_exit(&mut self) {
        // A stop on request ends without a `Finished` event.
        if matches!(self.phase, Phase::Stopping { .. }) {
            self.phase = Phase::Stopped;
            self.note("stopped");
        } else if self.phase.is_active() {
            let msg = "the engine stopped unexpectedly; see the log file".to_string();
            self.note(msg.clone());
            self.phase = Phase::Failed(msg);
        }
    }

    pub fn on_telemetry(&mut self, s: &TelemetrySample) {
        if let GpuReading::Gpus(gpus) = &s.gpu {
            self.gpu_memory_history
                .resize_with(gpus.len(), VecDeque::new);
            for (h, g) in self.gpu_memory_history.iter_mut().zip(gpus) {
                push_bounded(h, g.memory_used_bytes, MAX_SAMPLES);
            }
        }
        self.gpu = Some(s.gpu.clone());
        if let Some(sys) = &s.system {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            push_bounded(
                &mut self.cpu_history,
                sys.system_cpu_percent.max(0.0).round() as u64,
                MAX_SAMPLES,
            );
            push_bounded(&mut self.rss_history, sys.process_rss_bytes, MAX_SAMPLES);
            self.system = Some(sys.clone());
        }
    }

    /// Shows a finished run from its `trainer_log.jsonl`.
    pub fn load_folder(&mut self, dir: PathBuf, lines: &[LogLine]) {
        let keep_log_scale = self.log_scale;
        let gpu = self.gpu.take();
        let system = self.system.take();
        *self = Self {
            log_scale: keep_log_scale,
            gpu,
            system,
            ..Self::default()
        };
        self.add_log_lines(lines);
        let last_step = lines.last().map_or(0, |l| l.current_steps);
        self.note(format!(
            "opened {}: {} log lines, last step {last_step} of {}",
            dir.display(),
            lines.len(),
            self.total_steps
        ));
        self.output_dir = Some(dir.clone());
        self.from_folder = Some(dir);
    }

    /// Lines of `trainer_log.jsonl` (read at once, or as a followed folder's log grows).
    pub fn add_log_lines(&mut self, lines: &[LogLine]) {
        for l in lines {
            self.total_steps = self.total_steps.max(l.total_steps);
            if let Some(loss) = l.loss {
                self.push_point(
                    l.current_steps,
                    loss,
                    l.lr.unwrap_or(0.0),
                    l.grad_norm,
                    l.throughput,
                    Reward::from_metrics(|k| {
                        l.metrics.get(k).and_then(serde_json::Value::as_f64).or(
                            if k == "rewards/accuracies" {
                                l.accuracy
                            } else {
                                None
                            },
                        )
                    }),
                );
            }
            if let Some(e) = l.eval_loss
                && self.evals.last().is_none_or(|(s, _)| *s < l.current_steps)
            {
                self.evals.push((l.current_steps, e));
                if self.from_folder.is_some() {
                    self.note(format!(
                        "eval at step {}: eval_loss {e:.4}",
                        l.current_steps
                    ));
                }
            }
        }
    }

    /// The step shown as progress.
    pub fn step(&self) -> u64 {
        self.last
            .as_ref()
            .map(|m| m.step)
            .or_else(|| self.points.back().map(|p| p.step))
            .unwrap_or(0)
    }
}

impl App {
    /// The run's actions: their keys work on every tab (↑/↓ scroll the event log on the Run tab).
    /// None passes the action on.
    pub(super) fn run_action(&mut self, action: Action) -> Option<Vec<Effect>> {
        Some(match action {
            Action::StartRun => self.start(),
            Action::PauseResume => self.pause_resume(),
            Action::StopRun => {
                self.ask_stop_run();
                Vec::new()
            }
            Action::ToggleLogScale => {
                self.run.log_scale = !self.run.log_scale;
                Vec::new()
            }
            Action::OpenRunFolder => self.open_run_folder(),
            Action::PickRun => vec![Effect::ListRuns],
            Action::Up | Action::Down | Action::PageUp | Action::PageDown
                if self.tab == Tab::Run =>
            {
                match action {
                    Action::Up => self.run.log_scroll += 1,
                    Action::Down => self.run.log_scroll = self.run.log_scroll.saturating_sub(1),
                    _ => {}
                }
                Vec::new()
            }
            _ => return None,
        })
    }

    /// A fact from the engine.
    pub(super) fn on_engine_event(&mut self, ev: &TrainEvent) {
        if let TrainEvent::Started { device, .. } = ev {
            // "cuda:0 (NVIDIA H200)" → "cuda:0" for the status bar.
            self.device = device.split(" (").next().unwrap_or(device).to_string();
        }
        let was_active = self.run.phase.is_active();
        self.run.on_event(ev);
        if was_active && !self.run.phase.is_active() {
            self.status = None;
        }
    }

    /// The engine thread has ended (after its last event): leave now if quitting was asked.
    pub(super) fn on_engine_exited(&mut self) -> Vec<Effect> {
        if self.run.phase.is_active() {
            self.status = None;
        }
        self.run.on_engine_exit();
        if self.quitting && self.export.is_running() {
            // The run has stopped; an export still writing is cancelled, then we leave.
            self.cancel_export_and_quit()
        } else if self.quitting {
            vec![Effect::Quit]
        } else {
            Vec::new()
        }
    }

    /// Follow the run in `dir` (picked from the list of runs): the dashboard shows its history,
    /// then its events. A run followed before goes on by itself.
    pub(super) fn attach_run(&mut self, dir: PathBuf) -> Vec<Effect> {
        if self.quitting {
            return Vec::new();
        }
        self.say(format!("opening the run in {}…", dir.display()));
        self.tab = Tab::Run;
        vec![Effect::OpenRunFolder(dir)]
    }

    /// termtune leaves while a run is live: the run goes on; say where to find it again.
    pub(super) fn leave_run_running(&mut self) {
        if !self.run.phase.is_active() {
            return;
        }
        if let Some(dir) = &self.run.output_dir {
            self.farewell = Some(format!(
                "termtune: the run in {} goes on{}; `termtune attach {}` follows it, `termtune runs` lists runs",
                dir.display(),
                self.run
                    .run_pid
                    .map_or_else(String::new, |p| format!(" (pid {p})")),
                dir.display()
            ));
        }
    }

    /// `x`: ask whether to save a checkpoint before stopping.
    pub(super) fn ask_stop_run(&mut self) {
        if self.run.phase.is_active() {
            if !matches!(self.run.phase, Phase::Stopping { .. }) {
                self.overlay = Overlay::Confirm(Question::StopRun);
            }
        } else {
            self.say("no run in progress");
        }
    }

    /// Stop (or quit) confirmed: stop after this step, with a checkpoint when `save`.
    pub(super) fn stop_run(&mut self, save: bool, quit: bool) -> Vec<Effect> {
        if quit {
            self.quitting = true;
        }
        self.run.phase = Phase::Stopping { save };
        self.say(if save {
            "stopping after this step and saving a checkpoint…"
        } else {
            "stopping after this step…"
        });
        vec![Effect::Engine(TrainCommand::Stop { save })]
    }

    /// `s`: start a run on the form's preset (refused, with the first problem focused, while it has any).
    fn start(&mut self) -> Vec<Effect> {
        if self.run.phase.is_active() {
            self.say("a run is already in progress (p pauses, x stops)");
            return Vec::new();
        }
        let Some(loaded) = self.form.loaded.clone() else {
            let issues = self.form.issues.clone();
            self.refuse("start", &issues);
            return Vec::new();
        };
        self.run.start(PathBuf::from(&loaded.preset.output_dir));
        self.tab = Tab::Run;
        self.status = None;
        vec![Effect::StartRun(Box::new(loaded))]
    }

    /// `p`: pause after this step, or resume.
    fn pause_resume(&mut self) -> Vec<Effect> {
        match self.run.phase {
            Phase::Running => {
                self.say("pausing after this step…");
                vec![Effect::Engine(TrainCommand::Pause)]
            }
            Phase::Paused => vec![Effect::Engine(TrainCommand::Resume)],
            _ => {
                self.say("no running run to pause");
                Vec::new()
            }
        }
    }

    /// Shows the curves of the preset's `output_dir` (a finished or another run).
    fn open_run_folder(&mut self) -> Vec<Effect> {
        let dir = self
            .form
            .loaded
            .as_ref()
            .map(|l| PathBuf::from(&l.preset.output_dir))
            .or_else(|| self.run.output_dir.clone());
        match dir {
            Some(d) if !self.run.phase.is_active() => vec![Effect::OpenRunFolder(d)],
            Some(_) => {
                self.say("a run is in progress; its curves are already shown");
                Vec::new()
            }
            None => {
                self.complain("set output_dir (Training tab) to open a run folder");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn step(i: u64, loss: f64) -> TrainEvent {
        TrainEvent::StepFinished(StepMetrics {
            step: i,
            total_steps: 10,
            epoch: 0.1,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 100,
            label_tokens: 50,
            tokens_seen: 100 * i,
            step_time: Duration::from_millis(100),
            elapsed: Duration::from_secs(i),
            eta: Duration::from_secs(10u64.saturating_sub(i)),
            tokens_per_sec: 1000.0,
            samples_per_sec: 10.0,
            metrics: Default::default(),
        })
    }

    #[test]
    fn ema_follows_the_loss() {
        let mut r = RunState::default();
        r.on_event(&step(1, 2.0));
        r.on_event(&step(2, 1.0));
        // 0.8 * 2.0 + 0.2 * 1.0
        assert!((r.points[1].smoothed - 1.8).abs() < 1e-12);
    }

    #[test]
    fn series_are_bounded() {
        let mut r = RunState::default();
        for i in 0..(MAX_POINTS as u64 + 5) {
            r.on_event(&step(i, 1.0));
        }
        assert_eq!(r.points.len(), MAX_POINTS);
        assert_eq!(r.points[0].step, 5);
    }

    #[test]
    fn a_requested_stop_ends_as_stopped() {
        let mut r = RunState::default();
        r.start(PathBuf::from("out"));
        r.phase = Phase::Stopping { save: true };
        r.on_engine_exit();
        assert_eq!(r.phase, Phase::Stopped);
    }

    #[test]
    fn engine_exit_without_final_event_is_a_failure() {
        let mut r = RunState::default();
        r.start(PathBuf::from("out"));
        r.on_engine_exit();
        assert!(matches!(r.phase, Phase::Failed(_)));
    }
}
