//! What goes into [`super::App::update`] ([`Msg`]) and what comes out ([`Effect`]).

use std::path::PathBuf;

use crossterm::event::KeyEvent;

use super::Target;
use crate::chat::targets::TargetEntry;
use crate::chat::worker::{ChatCommand, ChatEvent};
use crate::config::{Loaded, Preset};
use crate::data::stats::Preview;
use crate::export::job::{ExportEvent, ExportRequest};
use crate::resolve::ModelRef;
use crate::runs::{RunRecord, RunView};
use crate::telemetry::TelemetrySample;
use crate::trainer::protocol::{TrainCommand, TrainEvent};
use crate::trainer::runlog::LogLine;

/// An input to the app: a key, time, or a fact from a background thread or an effect.
#[derive(Debug, Clone)]
pub enum Msg {
    Key(KeyEvent),
    /// The terminal was resized (a redraw is due).
    Resize,
    /// Text pasted into the terminal (bracketed paste): typed into the field being edited.
    Paste(String),
    /// A frame tick.
    Tick,
    /// The terminal is gone or SIGHUP/SIGTERM arrived: leave (a run goes on in its own process).
    Terminate,
    /// A fact from the run the Run pane follows.
    Engine(TrainEvent),
    /// The connection to the run ended (after its last event).
    EngineExited,
    /// Attached to the run in `output_dir`: its state file and its `trainer_log.jsonl` so far
    /// (its events follow as [`Msg::Engine`]).
    RunAttached {
        output_dir: PathBuf,
        record: Box<RunRecord>,
        history: Vec<LogLine>,
    },
    /// How the followed run stands after it closed the connection (before [`Msg::EngineExited`]).
    RunFinal(Box<RunView>),
    /// The runs of this machine and user (answer to [`Effect::ListRuns`]).
    RunList(Vec<RunView>),
    Telemetry(TelemetrySample),
    /// A preset file's text was read (after load or save).
    PresetLoaded {
        path: PathBuf,
        text: String,
    },
    /// Loading or saving a preset failed.
    PresetFailed(String),
    /// The preset files the picker offers.
    PresetList(Vec<PathBuf>),
    /// A run folder's `trainer_log.jsonl` was read (a finished run, or one followed read-only:
    /// what it logs next comes as [`Msg::RunLog`]).
    RunFolder(Result<(PathBuf, Vec<LogLine>), String>),
    /// Lines logged since in the run folder followed read-only.
    RunLog {
        dir: PathBuf,
        polled: crate::runs::follow::Polled,
    },
    /// What `model_name_or_path` resolves to (the name probed, then a description or why not).
    ModelInfo {
        name: String,
        info: Result<String, String>,
        /// What the memory estimate needs, when the model's config.json is at hand without a download.
        memory: Option<Box<crate::app::MemoryBasis>>,
    },
    /// The entries of `dataset_dir/dataset_info.json`.
    Datasets(Result<Vec<String>, String>),
    /// Statistics of the whole dataset (rows, lengths, truncation, steps per epoch).
    DatasetStats(Result<Box<crate::data::stats::DatasetStats>, String>),
    /// A dataset example was prepared for the preview.
    Preview(Result<Box<Preview>, String>),
    /// A fact from the chat worker.
    Chat(ChatEvent),
    /// What the run folder offers to chat with (answer to [`Effect::ListChatTargets`]).
    ChatTargets(Vec<TargetEntry>),
    /// A fact from the export thread (progress, then the report or the refusal).
    Export(ExportEvent),
    /// A fact from the prediction thread (progress, then the outcome).
    Predict(super::PredictMsg),
    /// A left click on what `ui::mouse::target_at` found under the pointer.
    Click(Target),
    /// One mouse-wheel notch over a target (`down`: towards newer lines / later fields).
    Wheel {
        target: Target,
        down: bool,
    },
}

/// A side effect for the terminal loop to perform (`update` never does I/O).
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start a run process on this preset (as `termtune train --detach` does) and follow it.
    StartRun(Box<Loaded>),
    /// Send a command to the followed run.
    Engine(TrainCommand),
    /// List the runs of this machine and user (answered by [`Msg::RunList`]).
    ListRuns,
    /// Write the preset (then read it back as [`Msg::PresetLoaded`]).
    SavePreset { loaded: Box<Loaded>, path: PathBuf },
    /// Read a preset file (answered by [`Msg::PresetLoaded`] or [`Msg::PresetFailed`]).
    LoadPreset(PathBuf),
    /// List the preset files (answered by [`Msg::PresetList`]).
    ListPresets,
    /// Open a run folder: follow the termtune run live in it ([`Msg::RunAttached`], then its
    /// events), else read its `trainer_log.jsonl` (answered by [`Msg::RunFolder`]) and follow it
    /// as it grows ([`Msg::RunLog`]).
    OpenRunFolder(PathBuf),
    /// Prepare example `index` of the preset's dataset (answered by [`Msg::Preview`]).
    /// With `stats`, also answered by [`Msg::DatasetStats`] for the whole dataset.
    LoadPreview {
        preset: Box<Preset>,
        index: usize,
        stats: bool,
    },
    /// Describe what this model resolves to, without loading weights or using the network
    /// (answered by [`Msg::ModelInfo`]).
    ProbeModel(ModelRef),
    /// List the entries of `dataset_info.json` in this folder (answered by [`Msg::Datasets`]).
    ListDatasets(PathBuf),
    /// Send a command to the chat worker (started on first use).
    Chat(ChatCommand),
    /// List base, final adapter and checkpoints of this `output_dir` (answered by
    /// [`Msg::ChatTargets`]).
    ListChatTargets(PathBuf),
    /// Put text on the clipboard with the OSC 52 escape (works over SSH; tmux needs
    /// `set-clipboard on`).
    CopyToClipboard(String),
    /// Run this export on a background thread (answered by [`Msg::Export`] events).
    Export(Box<ExportRequest>),
    /// Ask the running export to stop at its next step (answered by `ExportEvent::Cancelled`).
    CancelExport,
    /// Predict with this preset on a background thread, writing into `output_dir/eval_<time>` (answered by
    /// [`Msg::Predict`]).
    Predict(Box<Preset>),
    /// Ask the running prediction to stop (answered by `PredictMsg::Cancelled`).
    CancelPredict,
    /// Leave: restore the terminal and exit.
    Quit,
}
