//! Carries out the [`Effect`]s that [`crate::app::App::update`] returns, off the terminal loop:
//! owns the connection to the followed run (a run is a process of its own, started as
//! `termtune train --detach` starts one), the chat and export handles, reads and writes files,
//! and runs the slow look-ups (model probe, dataset preview, export) on their own threads. Every
//! answer comes back to the loop as a [`Msg`].

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;

use crate::app::{Effect, Msg};
use crate::chat::worker::{ChatCommand, ChatHandle};
use crate::config::{self, Loaded, Preset};
use crate::export::job::{ExportEvent, ExportRequest};
use crate::resolve::ModelRef;
use crate::trainer::protocol::{TrainCommand, TrainEvent};

/// The header `SavePreset` writes above the keys.
const SAVED_HEADER: &str = "saved by termtune (LLaMA-Factory keys; runs with `termtune train` and `llamafactory-cli train`)";

/// The effect runner: the background work the app has started, and the channel answers go to.
pub struct Effects {
    tx: UnboundedSender<Msg>,
    run: Arc<Mutex<RunLink>>,
    chat: Option<ChatHandle>,
    /// The cancel flag of the latest export thread.
    export_cancel: Option<Arc<AtomicBool>>,
    /// The cancel flag of the latest prediction thread.
    predict_cancel: Option<Arc<AtomicBool>>,
    /// The stop flag of the thread following a run folder's log.
    folder_stop: Option<Arc<AtomicBool>>,
}

impl Effects {
    /// A runner that answers on `tx`.
    pub fn new(tx: UnboundedSender<Msg>) -> Self {
        Self {
            tx,
            run: Arc::default(),
            chat: None,
            export_cancel: None,
            predict_cancel: None,
            folder_stop: None,
        }
    }

    /// Carries out `effect`. `Break` when the app quits (after any engine has stopped).
    pub fn run(&mut self, effect: Effect) -> ControlFlow<()> {
        match effect {
            Effect::Quit => {
                self.quit();
                return ControlFlow::Break(());
            }
            Effect::StartRun(loaded) => self.start_run(*loaded),
            Effect::Engine(command) => self.command_run(&command),
            Effect::ListRuns => {
                if let Err(e) = self.background("runs", |tx| {
                    let _ = tx.send(Msg::RunList(crate::runs::list()));
                }) {
                    tracing::warn!("cannot list the runs: {e}");
                }
            }
            Effect::Export(request) => self.export(*request),
            Effect::CancelExport => {
                if let Some(c) = &self.export_cancel {
                    c.store(true, Ordering::SeqCst);
                }
            }
            Effect::Predict(preset) => self.predict(*preset),
            Effect::CancelPredict => {
                if let Some(c) = &self.predict_cancel {
                    c.store(true, Ordering::SeqCst);
                }
            }
            Effect::Chat(command) => self.chat(command),
            Effect::ListChatTargets(dir) => {
                self.send(Msg::ChatTargets(crate::chat::targets::list_targets(&dir)));
            }
            Effect::CopyToClipboard(text) => copy_to_clipboard(&text),
            Effect::SavePreset { loaded, path } => self.send(save_preset(&loaded, &path)),
            Effect::LoadPreset(path) => self.send(read_preset(&path)),
            Effect::ListPresets => self.send(Msg::PresetList(config::list_presets())),
            Effect::OpenRunFolder(dir) => self.open_run_folder(dir),
            Effect::ListDatasets(dir) => self.send(Msg::Datasets(
                if dir == std::path::Path::new(crate::data::registry::ONLINE) {
                    Err("dataset_dir ONLINE: type Hugging Face Hub dataset ids (org/name) in `dataset`".into())
                } else {
                    crate::data::registry::load_registry(&dir)
                        .map(|m| m.keys().cloned().collect())
                        .map_err(|e| e.to_string())
                },
            )),
            Effect::ProbeModel(model) => {
                if let Err(e) = self.background("probe", move |tx| probe(&model, tx)) {
                    tracing::warn!("cannot start the model probe: {e}");
                }
            }
            Effect::LoadPreview {
                preset,
                index,
                stats,
            } => {
                let started =
                    self.background("preview", move |tx| preview(&preset, index, stats, tx));
                if let Err(e) = started {
                    self.send(Msg::Preview(Err(format!("cannot start: {e}"))));
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn send(&self, msg: Msg) {
        let _ = self.tx.send(msg);
    }

    /// Runs `job` on a thread named `name`; it answers on the channel it is given.
    fn background(
        &self,
        name: &str,
        job: impl FnOnce(&UnboundedSender<Msg>) + Send + 'static,
    ) -> std::io::Result<()> {
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || job(&tx))
            .map(drop)
    }

    /// Opens a run folder: a live termtune run in it is followed through its socket; any other
    /// (a finished run, a LLaMA-Factory run) is read from `trainer_log.jsonl` and followed as
    /// the file grows, read-only.
    fn open_run_folder(&mut self, dir: PathBuf) {
        self.stop_following_folder();
        #[cfg(unix)]
        if crate::runs::RunRecord::load(&dir)
            .is_ok_and(|r| !r.state.is_final() && crate::runs::is_alive(&r))
        {
            self.attach_run(dir);
            return;
        }
        if let Ok(mut link) = self.run.lock() {
            link.detach();
        }
        let first = open_run_folder(dir.clone());
        let opened = matches!(first, Msg::RunFolder(Ok(_)));
        self.send(first);
        if !opened {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        self.folder_stop = Some(Arc::clone(&stop));
        let started = self.background("follow-log", move |tx| {
            let mut follower = crate::runs::follow::LogFollower::new(&dir);
            // The lines read so far were sent whole: skip them.
            let _ = follower.poll();
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(crate::runs::follow::POLL_INTERVAL);
                match follower.poll() {
                    Ok(polled) if polled.lines.is_empty() && !polled.restarted => {}
                    Ok(polled) => {
                        let msg = Msg::RunLog {
                            dir: dir.clone(),
                            polled,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("stopped following {}: {e}", dir.display());
                        return;
                    }
                }
            }
        });
        if let Err(e) = started {
            tracing::warn!("cannot follow the run folder: {e}");
        }
    }

    fn stop_following_folder(&mut self) {
        if let Some(stop) = self.folder_stop.take() {
            stop.store(true, Ordering::SeqCst);
        }
    }

    /// Stops any answer and detaches from the followed run (which goes on in its own process).
    fn quit(&mut self) {
        if let Some(c) = self.chat.take() {
            // A model still loading is left to finish on its own.
            c.send(ChatCommand::Stop);
        }
        if let Ok(mut link) = self.run.lock() {
            link.detach();
        }
        self.stop_following_folder();
    }

    /// Sends `command` to the followed run (queued while its process is still starting).
    fn command_run(&mut self, command: &TrainCommand) {
        if let Ok(mut link) = self.run.lock() {
            link.send(command);
        }
    }

    /// Starts a run process on `loaded` (off the loop: it waits until the run listens), then
    /// follows it.
    #[cfg(unix)]
    fn start_run(&mut self, loaded: Loaded) {
        self.stop_following_folder();
        if let Ok(mut link) = self.run.lock() {
            link.detach();
            link.starting = true;
        }
        let run = Arc::clone(&self.run);
        let started = self.background("run-start", move |tx| {
            let spawned = match crate::runs::detach::start_for_client(&loaded) {
                Ok(s) => s,
                Err(e) => {
                    if let Ok(mut link) = run.lock() {
                        link.starting = false;
                        link.queued.clear();
                    }
                    let _ = tx.send(Msg::Engine(TrainEvent::Failed(e)));
                    let _ = tx.send(Msg::EngineExited);
                    return;
                }
            };
            let mut child = spawned.child;
            follow(&run, &spawned.output_dir, tx);
            // Reap the run process when it ends (it is this process's child).
            let _ = child.wait();
        });
        if let Err(e) = started {
            self.send(Msg::Engine(TrainEvent::Failed(format!(
                "cannot start the run: {e}"
            ))));
            self.send(Msg::EngineExited);
        }
    }

    #[cfg(not(unix))]
    fn start_run(&mut self, _: Loaded) {
        self.send(Msg::Engine(TrainEvent::Failed(
            "runs from the TUI need a Unix system (sessions and Unix sockets); use `termtune train` in the foreground".into(),
        )));
        self.send(Msg::EngineExited);
    }

    /// Follows the run in `dir` instead of the one followed so far (which goes on).
    #[cfg(unix)]
    fn attach_run(&mut self, dir: PathBuf) {
        self.stop_following_folder();
        if let Ok(mut link) = self.run.lock() {
            link.detach();
        }
        let run = Arc::clone(&self.run);
        if let Err(e) = self.background("run-attach", move |tx| follow(&run, &dir, tx)) {
            tracing::warn!("cannot attach: {e}");
        }
    }

    fn export(&mut self, request: ExportRequest) {
        let cancel = Arc::new(AtomicBool::new(false));
        self.export_cancel = Some(Arc::clone(&cancel));
        let started = self.background("export", move |tx| {
            let mut emit = |ev| {
                let _ = tx.send(Msg::Export(ev));
            };
            match crate::engine::device::chosen() {
                Ok(device) => crate::export::job::run(&request, &device, &cancel, &mut emit),
                Err(e) => emit(ExportEvent::Failed(e.to_string())),
            }
        });
        if let Err(e) = started {
            self.send(Msg::Export(ExportEvent::Failed(format!(
                "cannot start the export thread: {e}"
            ))));
        }
    }

    /// `termtune predict` on a thread of its own (its own device handle), into `output_dir/eval_<UTC time>` as
    /// LLaMA-Factory's WebUI names its evaluation folders.
    fn predict(&mut self, mut preset: Preset) {
        use crate::app::PredictMsg;
        let cancel = Arc::new(AtomicBool::new(false));
        self.predict_cancel = Some(Arc::clone(&cancel));
        let (y, mo, d, h, mi, s) = crate::data::tools::now_utc();
        let dir = Path::new(&preset.output_dir)
            .join(format!("eval_{y:04}-{mo:02}-{d:02}-{h:02}-{mi:02}-{s:02}"));
        preset.output_dir = dir.display().to_string();
        let started = self.background("predict", move |tx| {
            let mut emit = |ev| {
                let _ = tx.send(Msg::Predict(PredictMsg::Event(ev)));
            };
            let msg = match crate::engine::device::chosen() {
                Err(e) => PredictMsg::Failed(e.to_string()),
                Ok(device) => match crate::predict::run(&preset, &device, Some(&cancel), &mut emit)
                {
                    Err(crate::predict::PredictError::Cancelled { .. }) => PredictMsg::Cancelled,
                    Err(e) => PredictMsg::Failed(e.to_string()),
                    Ok(outcome) => match outcome.write(&dir) {
                        Ok(_) => PredictMsg::Finished {
                            outcome: Box::new(outcome),
                            dir,
                        },
                        Err(e) => PredictMsg::Failed(e.to_string()),
                    },
                },
            };
            let _ = tx.send(Msg::Predict(msg));
        });
        if let Err(e) = started {
            self.send(Msg::Predict(PredictMsg::Failed(format!(
                "cannot start the prediction thread: {e}"
            ))));
        }
    }

    /// Sends `command` to the chat worker, started on first use on the chosen device (its own
    /// handle: a run may train on the same GPU).
    fn chat(&mut self, command: ChatCommand) {
        if self.chat.is_none() {
            let tx = self.tx.clone();
            let started = crate::engine::device::chosen()
                .map_err(|e| e.to_string())
                .and_then(|device| {
                    ChatHandle::spawn(device, move |ev| tx.send(Msg::Chat(ev)).is_ok())
                        .map_err(|e| format!("cannot start the chat thread: {e}"))
                });
            match started {
                Ok(h) => self.chat = Some(h),
                Err(e) => self.send(Msg::PresetFailed(e)),
            }
        }
        if let Some(c) = &self.chat {
            c.send(command);
        }
    }
}

/// The connection to the followed run, shared with the threads that start and attach.
#[derive(Debug, Default)]
struct RunLink {
    #[cfg(unix)]
    client: Option<crate::runs::client::Client>,
    /// A run process is being started: commands wait for its connection.
    starting: bool,
    queued: Vec<TrainCommand>,
}

impl RunLink {
    fn send(&mut self, command: &TrainCommand) {
        #[cfg(unix)]
        if let Some(c) = self.client.as_mut() {
            if let Err(e) = c.send(crate::runs::control::Request::of_command(command)) {
                tracing::warn!("cannot reach the run in {}: {e}", c.output_dir().display());
            }
            return;
        }
        if self.starting {
            self.queued.push(command.clone());
        }
    }

    /// Stops following (the run goes on).
    fn detach(&mut self) {
        crate::telemetry::watch_process(None);
        #[cfg(unix)]
        {
            self.client = None;
        }
        self.starting = false;
        self.queued.clear();
    }
}

/// Attaches to the run in `dir` and forwards what it says as messages; commands queued while
/// it started are sent. A refusal (another user's folder, a run that has ended) is reported.
#[cfg(unix)]
fn follow(run: &Arc<Mutex<RunLink>>, dir: &Path, tx: &UnboundedSender<Msg>) {
    use crate::runs::client::{Client, Heard};
    let events = tx.clone();
    let attached = Client::attach(dir, move |heard| {
        let msg = match heard {
            Heard::Attached {
                output_dir,
                record,
                history,
            } => {
                // The dashboard's CPU, memory and GPU figures are the run process's.
                crate::telemetry::watch_process(Some(record.pid));
                Msg::RunAttached {
                    output_dir,
                    record,
                    history,
                }
            }
            Heard::Event(ev) => Msg::Engine(ev),
            Heard::Ended(view) => {
                crate::telemetry::watch_process(None);
                if let Some(v) = view {
                    let _ = events.send(Msg::RunFinal(v));
                }
                Msg::EngineExited
            }
        };
        events.send(msg).is_ok()
    });
    let Ok(mut link) = run.lock() else {
        return;
    };
    match attached {
        Ok(mut client) => {
            for command in std::mem::take(&mut link.queued) {
                let _ = client.send(crate::runs::control::Request::of_command(&command));
            }
            link.starting = false;
            link.client = Some(client);
        }
        Err(e) => {
            let was_starting = std::mem::take(&mut link.starting);
            link.queued.clear();
            drop(link);
            if was_starting {
                let _ = tx.send(Msg::Engine(TrainEvent::Failed(e.to_string())));
                let _ = tx.send(Msg::EngineExited);
            } else {
                let _ = tx.send(Msg::PresetFailed(e.to_string()));
            }
        }
    }
}

/// Puts `text` on the clipboard with the OSC 52 escape.
fn copy_to_clipboard(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout();
    let _ = out.write_all(crate::ui::chat::osc52(text).as_bytes());
    let _ = out.flush();
}

fn read_preset(path: &Path) -> Msg {
    match std::fs::read_to_string(path) {
        Ok(text) => Msg::PresetLoaded {
            path: path.to_path_buf(),
            text,
        },
        Err(e) => Msg::PresetFailed(format!("cannot read the preset {}: {e}", path.display())),
    }
}

/// Writes the preset, then reads it back (the form starts over from the saved file).
fn save_preset(loaded: &Loaded, path: &Path) -> Msg {
    match config::save(loaded, path, Some(SAVED_HEADER)) {
        Ok(()) => read_preset(path),
        Err(e) => Msg::PresetFailed(format!(
            "cannot save {}: {e}; check the folder exists and is writable",
            path.display()
        )),
    }
}

fn open_run_folder(dir: PathBuf) -> Msg {
    match crate::trainer::runlog::read_log(&dir) {
        Ok(lines) => Msg::RunFolder(Ok((dir, lines))),
        Err(e) => Msg::RunFolder(Err(format!(
            "cannot open the run folder {}: {e} (no trainer_log.jsonl yet?)",
            dir.display()
        ))),
    }
}

/// What the model field resolves to, from metadata in the preset's hub cache.
fn probe(model: &ModelRef, tx: &UnboundedSender<Msg>) {
    let hub = model.hub_options();
    let info = crate::engine::source::describe(&model.name_or_path, &hub);
    let memory = crate::engine::source::config_json(&model.name_or_path, &hub)
        .and_then(|c| crate::engine::ModelConfig::from_hf_config(&c).ok())
        .map(|config| {
            Box::new(crate::app::MemoryBasis {
                config,
                source_storage: crate::engine::source::base_storage(&model.name_or_path),
                device: crate::engine::device::chosen_label(),
            })
        });
    let _ = tx.send(Msg::ModelInfo {
        name: model.name_or_path.clone(),
        info,
        memory,
    });
}

/// Example `index` of the preset's dataset as the model sees it (tokenizer only, no weights),
/// then with `stats` the whole dataset's statistics (tokenised through the cache training uses).
fn preview(preset: &Preset, index: usize, stats: bool, tx: &UnboundedSender<Msg>) {
    let send = |msg| {
        let _ = tx.send(msg);
    };
    match crate::resolve::load_encoder(preset, &mut |_| {}) {
        Err(e) => {
            let e = e.to_string();
            send(Msg::Preview(Err(e.clone())));
            if stats {
                send(Msg::DatasetStats(Err(e)));
            }
        }
        Ok((opts, enc)) => {
            send(Msg::Preview(
                crate::data::pipeline::preview(&opts, &enc, index)
                    .map(Box::new)
                    .map_err(|e| e.to_string()),
            ));
            if stats {
                send(Msg::DatasetStats(
                    crate::data::pipeline::prepare_dataset(&opts, &enc)
                        .map(|d| Box::new(d.stats))
                        .map_err(|e| e.to_string()),
                ));
            }
        }
    }
}
