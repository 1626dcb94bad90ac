//! The control channel of a detached run: a Unix socket in the run folder (owner-only, local only),
//! JSON lines both ways. A client sends [`Request`]s; the run answers with [`Reply`]s: its status,
//! then every [`TrainEvent`] as it happens (after a replay of what happened before the client came).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RunRecord, RunState, SOCKET_FILE};
use crate::trainer::protocol::{TrainCommand, TrainEvent};

/// What a client asks of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Pause,
    Resume,
    /// Save a checkpoint after the current step.
    Save,
    /// Stop after the current step, with a checkpoint.
    Stop,
    /// Stop after the current step without a checkpoint (the last one saved is kept).
    Abandon,
    Status,
}

impl Request {
    /// The engine command this request becomes (`Status` is answered by the run itself).
    pub fn command(self) -> Option<TrainCommand> {
        match self {
            Self::Pause => Some(TrainCommand::Pause),
            Self::Resume => Some(TrainCommand::Resume),
            Self::Save => Some(TrainCommand::SaveCheckpoint),
            Self::Stop => Some(TrainCommand::Stop { save: true }),
            Self::Abandon => Some(TrainCommand::Stop { save: false }),
            Self::Status => None,
        }
    }

    /// The request that asks a run for `command` (the TUI's engine commands, sent to its run).
    pub fn of_command(command: &TrainCommand) -> Self {
        match command {
            TrainCommand::Pause => Self::Pause,
            TrainCommand::Resume => Self::Resume,
            TrainCommand::SaveCheckpoint => Self::Save,
            TrainCommand::Stop { save: true } => Self::Stop,
            TrainCommand::Stop { save: false } => Self::Abandon,
        }
    }
}

/// What a run tells its clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Status(RunRecord),
    Event(TrainEvent),
    /// The replay of what happened before this client came is over: what follows is live.
    Live,
    /// A request line that did not parse.
    Error(String),
}

/// Why a client cannot talk to the run in a folder.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{dir}: no such run folder; `termtune runs` lists your runs")]
    NoFolder { dir: PathBuf },
    #[error(
        "{dir} belongs to user id {owner} (you are {me}): termtune attaches only to your own runs; log in as its owner"
    )]
    OtherUser { dir: PathBuf, owner: u32, me: u32 },
    #[error(
        "{dir} holds no termtune run ({STATE_FILE} is missing); start one with `termtune train PRESET --detach`",
        STATE_FILE = super::STATE_FILE
    )]
    NoRun { dir: PathBuf },
    #[error("the run in {dir} is {what}; nothing to attach to")]
    Ended { dir: PathBuf, what: String },
    #[error("the run in {dir} is not running ({what}); removed its stale control socket {socket}")]
    Stale {
        dir: PathBuf,
        what: String,
        socket: PathBuf,
    },
    #[error("{socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
}

/// Why a run cannot listen on its folder.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "another run is live in {dir} (its control socket {socket} answers); attach to it with `termtune attach {dir}` or pick another output_dir"
    )]
    Busy { dir: PathBuf, socket: PathBuf },
    #[error(
        "cannot listen on {socket}: {source}{hint}",
        hint = if source.kind() == std::io::ErrorKind::InvalidInput { "; Unix socket paths are limited to about 100 bytes: pick a shorter output_dir" } else { "" }
    )]
    Bind {
        socket: PathBuf,
        source: std::io::Error,
    },
}

pub fn socket_path(output_dir: &Path) -> PathBuf {
    output_dir.join(SOCKET_FILE)
}

/// The current user id.
pub fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Listens on `output_dir/.termtune.sock` (mode 0600). A socket left by a dead run (nothing
/// answers) is removed first; a live one is refused.
pub fn listen(output_dir: &Path) -> Result<UnixListener, ListenError> {
    let socket = socket_path(output_dir);
    if socket.exists() {
        if UnixStream::connect(&socket).is_ok() {
            return Err(ListenError::Busy {
                dir: output_dir.to_path_buf(),
                socket,
            });
        }
        tracing::warn!("removing the stale control socket {}", socket.display());
        let _ = std::fs::remove_file(&socket);
    }
    let bind = || -> std::io::Result<UnixListener> {
        let listener = UnixListener::bind(&socket)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    };
    bind().map_err(|source| ListenError::Bind {
        socket: socket.clone(),
        source,
    })
}

/// Connects to the run in `output_dir`: refuses another user's folder, explains a run that has
/// ended, and removes the socket of a run that died.
pub fn connect(output_dir: &Path) -> Result<UnixStream, AttachError> {
    let dir = output_dir.to_path_buf();
    let meta =
        std::fs::metadata(output_dir).map_err(|_| AttachError::NoFolder { dir: dir.clone() })?;
    let me = my_uid();
    if meta.uid() != me {
        return Err(AttachError::OtherUser {
            dir,
            owner: meta.uid(),
            me,
        });
    }
    let socket = socket_path(output_dir);
    if let Ok(m) = std::fs::symlink_metadata(&socket)
        && m.uid() != me
    {
        return Err(AttachError::OtherUser {
            dir,
            owner: m.uid(),
            me,
        });
    }
    let what = || {
        super::view(output_dir).map(|v| match v.note {
            Some(note) if !note.is_empty() => note,
            _ => format!("{} at step {}", v.state.as_str(), v.step),
        })
    };
    if !socket.exists() {
        return Err(match RunRecord::load(output_dir) {
            Err(_) => AttachError::NoRun { dir },
            Ok(r) if r.state == RunState::Starting => AttachError::Io {
                socket,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the run is starting and not listening yet; try again in a moment",
                ),
            },
            Ok(_) => AttachError::Ended {
                dir,
                what: what().unwrap_or_else(|| "over".into()),
            },
        });
    }
    // A process being killed may still accept on its socket for a moment after it reads as gone
    // (its main thread exits first): its record decides.
    if RunRecord::load(output_dir).is_ok_and(|r| !r.state.is_final() && !super::is_alive(&r)) {
        let _ = std::fs::remove_file(&socket);
        return Err(AttachError::Stale {
            dir,
            what: what().unwrap_or_else(|| "its process is gone".into()),
            socket,
        });
    }
    match UnixStream::connect(&socket) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(AttachError::Io { socket, source: e })
        }
        Err(_) => {
            let _ = std::fs::remove_file(&socket);
            Err(AttachError::Stale {
                dir,
                what: what().unwrap_or_else(|| "its process is gone".into()),
                socket,
            })
        }
    }
}

/// Writes one JSON line.
pub fn send_line(stream: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
    let mut text = serde_json::to_string(value).map_err(std::io::Error::other)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    stream.flush()
}

/// Reads replies from `stream` until it closes, handing each to `on_reply` (lines that do not
/// parse are skipped: a newer run may send kinds this client does not know).
pub fn read_replies(stream: UnixStream, mut on_reply: impl FnMut(Reply) -> bool) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Ok(reply) = serde_json::from_str::<Reply>(&line)
            && !on_reply(reply)
        {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_and_replies_are_json_lines() {
        assert_eq!(
            serde_json::to_string(&Request::Stop).unwrap(),
            r#"{"cmd":"stop"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"save"}"#).unwrap(),
            Request::Save
        );
        let text = serde_json::to_string(&Reply::Event(TrainEvent::Paused)).unwrap();
        assert_eq!(text, r#"{"event":"Paused"}"#);
        assert_eq!(
            serde_json::from_str::<Reply>(&text).unwrap(),
            Reply::Event(TrainEvent::Paused)
        );
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(UnixListener::bind(socket_path(dir.path())).unwrap()); // leaves the file behind
        let live = listen(dir.path()).unwrap();
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = listen(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another run is live"), "{err}");
        drop(live);
    }
}
