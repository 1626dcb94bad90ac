//! A dashboard's connection to a run process (the TUI's Run pane): the run's history from
//! `trainer_log.jsonl`, then its events as they happen, and requests (pause, resume, save, stop)
//! the other way. Dropping the client detaches: the run goes on.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::control::{self, AttachError, Reply, Request};
use super::{RunRecord, RunView};
use crate::trainer::protocol::TrainEvent;
use crate::trainer::runlog::LogLine;

/// What a client hears, in order: `Attached` once, `Event`s, then `Ended` once (unless the
/// client detached first).
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// Connected: the run's state file, and every line of its `trainer_log.jsonl` so far.
    Attached {
        output_dir: PathBuf,
        record: Box<RunRecord>,
        history: Vec<LogLine>,
    },
    Event(TrainEvent),
    /// The run closed the connection (it ended, or its process died): how it stands now.
    Ended(Option<Box<RunView>>),
}

/// A connection to the run in one folder.
pub struct Client {
    output_dir: PathBuf,
    writer: UnixStream,
    detached: Arc<AtomicBool>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("output_dir", &self.output_dir)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the run in `output_dir` (see [`control::connect`] for the refusals) and
    /// hands what it hears to `on_heard` on a thread of its own, until the connection ends or
    /// `on_heard` returns false.
    pub fn attach(
        output_dir: &Path,
        mut on_heard: impl FnMut(Heard) -> bool + Send + 'static,
    ) -> Result<Self, AttachError> {
        let output_dir = std::path::absolute(output_dir).unwrap_or_else(|_| output_dir.into());
        let stream = control::connect(&output_dir)?;
        let io = |source| AttachError::Io {
            socket: control::socket_path(&output_dir),
            source,
        };
        let reader = stream.try_clone().map_err(io)?;
        let detached = Arc::new(AtomicBool::new(false));
        let quiet = Arc::clone(&detached);
        let dir = output_dir.clone();
        std::thread::Builder::new()
            .name("run-client".into())
            .spawn(move || {
                // Read after connecting: the replay that follows carries the last step, so
                // nothing between the two is missed (a step logged twice is shown once).
                let history = crate::trainer::runlog::read_log(&dir).unwrap_or_default();
                let mut history = Some(history);
                let mut go_on = true;
                control::read_replies(reader, |reply| {
                    if quiet.load(Ordering::SeqCst) {
                        return false;
                    }
                    let heard = match reply {
                        Reply::Status(record) => match history.take() {
                            Some(history) => Heard::Attached {
                                output_dir: dir.clone(),
                                record: Box::new(record),
                                history,
                            },
                            None => return true,
                        },
                        Reply::Event(ev) => Heard::Event(ev),
                        Reply::Live => return true,
                        Reply::Error(e) => Heard::Event(TrainEvent::Warning(format!(
                            "the run did not understand a request: {e}"
                        ))),
                    };
                    go_on = on_heard(heard);
                    go_on
                });
                if go_on && !quiet.load(Ordering::SeqCst) {
                    on_heard(Heard::Ended(super::view(&dir).map(Box::new)));
                }
            })
            .map_err(io)?;
        Ok(Self {
            output_dir,
            writer: stream,
            detached,
        })
    }

    pub fn output_dir(&self) -> &Path {
        &self.output_dir
    }

    /// Sends `request` to the run.
    pub fn send(&mut self, request: Request) -> std::io::Result<()> {
        control::send_line(&mut self.writer, &request)
    }
}

impl Drop for Client {
    /// Detaches: the connection closes, nothing more is heard, the run goes on.
    fn drop(&mut self) {
        self.detached.store(true, Ordering::SeqCst);
        let _ = self.writer.shutdown(Shutdown::Both);
    }
}
