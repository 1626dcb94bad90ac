//! The panic hook: a panic anywhere is logged; a panic on the main thread while the TUI owns the
//! terminal restores the terminal first, so the report prints on a usable screen.

use std::sync::atomic::{AtomicBool, Ordering};

static TERMINAL_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Tells the hook whether the TUI currently holds the terminal (raw mode, alternate screen).
pub fn set_terminal_active(active: bool) {
    TERMINAL_ACTIVE.store(active, Ordering::SeqCst);
}

/// Installs the hook. Call it after `ratatui::init()` when the TUI starts (init installs its own
/// hook, which would otherwise wrap this one).
pub fn install_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name(), %info, "panic");
        let on_main = thread.name() == Some("main");
        if on_main && TERMINAL_ACTIVE.swap(false, Ordering::SeqCst) {
            ratatui::restore();
        }
        previous(info);
        if let Some(log) = crate::logging::log_path() {
            eprintln!("termtune: the log is at {}", log.display());
        }
    }));
}
