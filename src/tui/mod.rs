//! The terminal loop: owns the terminal and the telemetry thread; turns terminal input, signals,
//! background answers and frame ticks into [`Msg`]s, hands the [`Effect`]s `update` returns to
//! the [`effects`] runner, and redraws at a fixed frame rate when something changed.

mod effects;

use std::io::Stdout;
use std::path::{Path, PathBuf};
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
    if let Some(line) = &app.farewell {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{line}");
    }
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
    let mut effects = effects::Effects::new(tx.clone());
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
        pending.extend(app.update(msg));
        for effect in std::mem::take(&mut pending) {
            if effects.run(effect).is_break() {
                return Ok(());
            }
        }
        if tick && !terminal_gone && app.take_dirty() {
            let theme = themes.get(app.theme_index).unwrap_or(&fallback);
            if let Err(e) = terminal.draw(|f| ui::render(f, app, theme)) {
                // The terminal went away (SSH dropped): leave; a run goes on in its own process.
                tracing::warn!("cannot draw: {e}; leaving");
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

/// SIGHUP (the SSH connection dropped) and SIGTERM become [`Msg::Terminate`]: termtune exits and
/// a run it started goes on in its own process.
fn watch_signals(tx: UnboundedSender<Msg>) {
    use signal_hook::consts::{SIGHUP, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM]) else {
        tracing::warn!(
            "cannot install signal handlers; a hang-up ends termtune at once (a run goes on)"
        );
        return;
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::warn!("signal {sig}: leaving (a run goes on in its own process)");
                if tx.send(Msg::Terminate).is_err() {
                    break;
                }
            }
        });
}
