//! The training engine on its own thread: the one way the TUI and `termtune train` start it.
//!
//! The thread picks its device through the device seam ([`crate::engine::device::chosen`]), runs
//! [`run_training`], and turns every failure, an error or a panic, into a logged
//! [`TrainEvent::Failed`], so whoever listens always hears how the run ended.

use std::sync::mpsc::{Sender, channel};
use std::thread::JoinHandle;

use super::protocol::{TrainCommand, TrainEvent};
use super::run::{Outcome, run_training};
use crate::config::Loaded;

/// What a panic on the engine thread reads as.
pub const PANICKED: &str = "the engine panicked; see the log file";

/// A running engine thread: its command channel and its result.
pub struct EngineThread {
    commands: Sender<TrainCommand>,
    handle: JoinHandle<Result<Outcome, String>>,
}

/// Starts the engine on `loaded` on a thread named `engine`. Every event goes to `emit`, a failure
/// last as [`TrainEvent::Failed`]; then `exited` runs (after the last event, on that thread).
pub fn spawn(
    loaded: Loaded,
    mut emit: impl FnMut(TrainEvent) + Send + 'static,
    exited: impl FnOnce() + Send + 'static,
) -> std::io::Result<EngineThread> {
    let (commands, command_rx) = channel::<TrainCommand>();
    let handle = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let device = crate::engine::device::chosen()?;
                run_training(&loaded, &device, &command_rx, &mut emit)
            }));
            let result = match run {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(e)) => {
                    tracing::error!("training failed: {e}");
                    Err(e.to_string())
                }
                Err(_) => Err(PANICKED.to_string()),
            };
            if let Err(message) = &result {
                emit(TrainEvent::Failed(message.clone()));
            }
            drop(emit);
            exited();
            result
        })?;
    Ok(EngineThread { commands, handle })
}

impl EngineThread {
    /// Sends `command` (ignored once the engine has ended).
    pub fn send(&self, command: TrainCommand) {
        let _ = self.commands.send(command);
    }

    /// Waits for the thread to end: how the run ended, or why it failed.
    pub fn join(self) -> Result<Outcome, String> {
        wait(self.handle)
    }

    /// Closes the command channel (the engine reads that as `Stop { save: true }`) and waits.
    pub fn close(self) -> Result<Outcome, String> {
        drop(self.commands);
        wait(self.handle)
    }
}

fn wait(handle: JoinHandle<Result<Outcome, String>>) -> Result<Outcome, String> {
    handle.join().unwrap_or_else(|_| Err(PANICKED.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::Preset;

    #[test]
    fn a_failure_is_the_last_event_then_exited_runs() {
        // `streaming: true` is refused before anything is loaded.
        let loaded = Loaded {
            preset: Preset {
                streaming: true,
                ..Preset::default()
            },
            passthrough: Default::default(),
            notes: Vec::new(),
        };
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (events, exits) = (Arc::clone(&heard), Arc::clone(&heard));
        let engine = spawn(
            loaded,
            move |ev| events.lock().unwrap().push(format!("{ev:?}")),
            move || exits.lock().unwrap().push("exited".into()),
        )
        .unwrap();
        let err = engine.join().unwrap_err();
        assert!(err.contains("streaming"), "{err}");
        let heard = heard.lock().unwrap();
        assert_eq!(heard.len(), 2, "{heard:?}");
        assert!(
            heard[0].starts_with("Failed(") && heard[0].contains("streaming"),
            "{heard:?}"
        );
        assert_eq!(heard[1], "exited");
    }
}
