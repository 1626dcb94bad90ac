//! `termtune train PRESET --detach`: the caller starts the same program again as the run process
//! (`train … --run-child`, stdin from /dev/null, stdout and stderr into `output_dir/termtune-run.log`),
//! waits until it listens on its control socket, prints where it is and returns. The run process
//! leaves the caller's session (`setsid`: no controlling terminal, so no hang-up reaches it), keeps
//! its state file, serves its clients and drives the engine thread.

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::control::{self, Reply, Request};
use super::{LOG_FILE, RunRecord, RunState};
use crate::config::Loaded;
use crate::headless::Printer;
use crate::trainer::protocol::{StepMetrics, TrainCommand, TrainEvent};
use crate::trainer::run::Outcome;

/// The hidden flag the run process is started with.
pub const CHILD_FLAG: &str = "--run-child";

/// How long the caller waits for the run process to listen before it gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Non-step events kept for clients that attach later.
const HISTORY_LIMIT: usize = 200;

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A run process just started: it listens on its control socket.
pub struct Spawned {
    pub output_dir: PathBuf,
    pub pid: u32,
    pub log: PathBuf,
    /// The process, for the caller to reap when it ends (a TUI outlives its runs' exits).
    pub child: std::process::Child,
}

/// The caller's side of `termtune train PRESET --detach`: starts the run process with this
/// command's own arguments and reports where it runs.
pub fn start(loaded: &Loaded) -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let spawned = match spawn(loaded, args) {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("termtune: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let out = &spawned.output_dir;
    println!("termtune: training in the background");
    println!("  output_dir: {}", out.display());
    println!("  pid:        {}", spawned.pid);
    println!("  log:        {}", spawned.log.display());
    println!("  attach:     termtune attach {}", out.display());
    println!("  stop:       termtune attach {} --stop", out.display());
    println!("  list:       termtune runs");
    ExitCode::SUCCESS
}

/// The preset a run started by a client (the TUI) trains on, written into its folder: the form
/// may hold edits that are in no file.
pub const CLIENT_PRESET_FILE: &str = "termtune-run.yaml";

/// Starts a run process for `loaded` on behalf of a client (the TUI): its preset is written to
/// `output_dir/termtune-run.yaml` and the process runs `termtune train` on that file. The same
/// process, state file, log and socket as `termtune train --detach`.
pub fn start_for_client(loaded: &Loaded) -> Result<Spawned, String> {
    let out = absolute(Path::new(&loaded.preset.output_dir));
    check_folder(&out)?;
    let preset = out.join(CLIENT_PRESET_FILE);
    crate::config::save(
        loaded,
        &preset,
        Some("the preset of the run the termtune TUI started in this folder"),
    )
    .map_err(|e| format!("cannot write {}: {e}", preset.display()))?;
    let device = crate::engine::device::preferred().to_string();
    spawn(
        loaded,
        vec![
            "--device".into(),
            device.into(),
            "train".into(),
            preset.into_os_string(),
        ],
    )
}

/// Creates `out` and refuses a folder of another user.
fn check_folder(out: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(out).map_err(|e| {
        format!(
            "cannot create output_dir {}: {e}; pick another output_dir",
            out.display()
        )
    })?;
    let me = control::my_uid();
    if let Ok(m) = std::fs::metadata(out)
        && m.uid() != me
    {
        return Err(format!(
            "output_dir {} belongs to user id {} (you are {me}); pick an output_dir of your own",
            out.display(),
            m.uid()
        ));
    }
    Ok(())
}

/// Starts this program again with `args` and the hidden [`CHILD_FLAG`] as the run process of
/// `loaded`, and waits until it listens on its control socket.
fn spawn(loaded: &Loaded, mut args: Vec<std::ffi::OsString>) -> Result<Spawned, String> {
    let out = absolute(Path::new(&loaded.preset.output_dir));
    check_folder(&out)?;
    let socket = control::socket_path(&out);
    if UnixStream::connect(&socket).is_ok() {
        return Err(format!(
            "a run is already live in {} (its control socket answers); attach with `termtune attach {}` or pick another output_dir",
            out.display(),
            out.display()
        ));
    }
    let log_path = out.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .and_then(|mut f| {
            writeln!(
                f,
                "termtune: ---- detached run started at {} (seconds since the epoch) ----",
                super::now_unix()
            )?;
            Ok(f)
        });
    let (log, log2) = log
        .and_then(|f| Ok((f.try_clone()?, f)))
        .map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this program's own path to start the run: {e}"))?;
    args.push(CHILD_FLAG.into());
    // The stale socket of an earlier run must not pass for the new one.
    if socket.exists() {
        let _ = std::fs::remove_file(&socket);
    }
    let mut child = std::process::Command::new(&exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    let began = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the run process ended at once ({status}); the end of {}:\n{}",
                log_path.display(),
                tail(&log_path, 20).trim_end()
            ));
        }
        // Listening, registered and its record written: `termtune runs` shows it from now on.
        if UnixStream::connect(&socket).is_ok() && RunRecord::load(&out).is_ok_and(|r| r.pid == pid)
        {
            break;
        }
        if began.elapsed() > START_TIMEOUT {
            return Err(format!(
                "the run process (pid {pid}) has not opened {} after {} s; it may still be starting: see {} and `termtune runs`",
                socket.display(),
                START_TIMEOUT.as_secs(),
                log_path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Spawned {
        output_dir: out,
        pid,
        log: log_path,
        child,
    })
}

/// The last `n` lines of a text file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

/// What the run process's main loop hears.
enum Msg {
    Event(Box<TrainEvent>),
    Connected(UnixStream),
    Request(u64, Request),
    Gone(u64),
    /// SIGINT or SIGTERM: stop with a checkpoint.
    Terminate,
    EngineExited,
}

/// The run process: `termtune train PRESET --run-child` (started by [`start`]).
pub fn run_child(loaded: Loaded, preset: &Path) -> ExitCode {
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!("setsid: {e}; the run stays in the caller's session");
    }
    let out = absolute(Path::new(&loaded.preset.output_dir));
    let _ = std::fs::create_dir_all(&out);
    let listener = match control::listen(&out) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("termtune: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pid = std::process::id();
    let mut record = RunRecord {
        output_dir: out.clone(),
        state: RunState::Starting,
        pid,
        process_start: super::process_start(pid).unwrap_or_else(super::now_unix),
        started: super::now_unix(),
        preset: absolute(preset),
        device: None,
        total_steps: None,
        message: None,
    };
    // Registered before its record is written: the caller returns once the record is there.
    if let Err(e) = super::register(&out) {
        eprintln!(
            "termtune: warning: cannot register the run in {}: {e}; `termtune runs` will not list it",
            super::registry_dir().display()
        );
    }
    save(&record);

    let (tx, rx) = mpsc::channel::<Msg>();
    install_signal_handlers(tx.clone());
    let accept_tx = tx.clone();
    let _ = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if accept_tx.send(Msg::Connected(s)).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            }
        });
    let (event_tx, exit_tx) = (tx.clone(), tx.clone());
    let engine = crate::trainer::thread::spawn(
        loaded,
        move |ev| {
            let _ = event_tx.send(Msg::Event(Box::new(ev)));
        },
        move || {
            let _ = exit_tx.send(Msg::EngineExited);
        },
    );
    let engine = match engine {
        Ok(e) => e,
        Err(e) => {
            eprintln!("termtune: cannot start the engine thread: {e}");
            record.state = RunState::Failed;
            record.message = Some(format!("cannot start the engine thread: {e}"));
            save(&record);
            let _ = std::fs::remove_file(control::socket_path(&out));
            return ExitCode::FAILURE;
        }
    };

    let mut host = Host {
        record,
        clients: Vec::new(),
        next_id: 1,
        history: Vec::new(),
        last_step: None,
        printer: Printer::new(false),
        tx,
    };
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Event(ev) => host.event(*ev),
            Msg::Connected(stream) => host.connected(stream),
            Msg::Request(id, Request::Status) => {
                let status = Reply::Status(host.record.clone());
                host.send_to(id, &status);
            }
            Msg::Request(_, req) => {
                if let Some(cmd) = req.command() {
                    engine.send(cmd);
                }
            }
            Msg::Gone(id) => host.clients.retain(|(i, _)| *i != id),
            Msg::Terminate => engine.send(TrainCommand::Stop { save: true }),
            Msg::EngineExited => break,
        }
    }
    host.printer.end_line();
    let (state, code) = match engine.join() {
        Ok(Outcome::Finished(_)) => (RunState::Finished, ExitCode::SUCCESS),
        Ok(Outcome::Stopped(_)) => (RunState::Stopped, ExitCode::SUCCESS),
        Err(msg) => {
            host.record.message = Some(msg);
            (RunState::Failed, ExitCode::FAILURE)
        }
    };
    host.record.state = state;
    save(&host.record);
    let _ = std::fs::remove_file(control::socket_path(&out));
    code
}

fn save(record: &RunRecord) {
    if let Err(e) = record.save() {
        eprintln!(
            "termtune: warning: cannot write {}: {e}",
            RunRecord::path(&record.output_dir).display()
        );
    }
}

/// The run process's state: its record, its clients and what they missed.
struct Host {
    record: RunRecord,
    clients: Vec<(u64, UnixStream)>,
    next_id: u64,
    history: Vec<TrainEvent>,
    last_step: Option<StepMetrics>,
    printer: Printer,
    tx: mpsc::Sender<Msg>,
}

impl Host {
    fn event(&mut self, ev: TrainEvent) {
        self.printer.event(&ev);
        if self.record.on_event(&ev) {
            save(&self.record);
        }
        match &ev {
            TrainEvent::StepFinished(m) => self.last_step = Some(m.clone()),
            other => {
                if self.history.len() >= HISTORY_LIMIT {
                    self.history.remove(0);
                }
                self.history.push(other.clone());
            }
        }
        let reply = Reply::Event(ev);
        self.clients
            .retain_mut(|(_, s)| control::send_line(s, &reply).is_ok());
    }

    /// A new client: its status, the story so far, then live events; its requests are read on
    /// a thread of their own.
    fn connected(&mut self, mut stream: UnixStream) {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let mut replay = vec![Reply::Status(self.record.clone())];
        replay.extend(self.history.iter().cloned().map(Reply::Event));
        if let Some(m) = &self.last_step {
            replay.push(Reply::Event(TrainEvent::StepFinished(m.clone())));
        }
        replay.push(Reply::Live);
        if replay
            .iter()
            .any(|r| control::send_line(&mut stream, r).is_err())
        {
            return;
        }
        let Ok(reader) = stream.try_clone() else {
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        self.clients.push((id, stream));
        let tx = self.tx.clone();
        let _ = std::thread::Builder::new()
            .name(format!("client-{id}"))
            .spawn(move || {
                let mut stream = reader;
                for line in std::io::BufReader::new(&mut stream).lines() {
                    let Ok(line) = line else { break };
                    if line.trim().is_empty() {
                        continue;
                    }
                    let msg = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => Msg::Request(id, req),
                        Err(e) => {
                            tracing::warn!("control client {id}: bad request {line:?}: {e}");
                            continue;
                        }
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Msg::Gone(id));
            });
    }

    fn send_to(&mut self, id: u64, reply: &Reply) {
        if let Some((_, s)) = self.clients.iter_mut().find(|(i, _)| *i == id) {
            let _ = control::send_line(s, reply);
        }
    }
}

/// SIGINT and SIGTERM stop the run with a checkpoint; SIGHUP is only logged (the run has no
/// terminal, but a `kill -HUP` must not end it either).
fn install_signal_handlers(tx: mpsc::Sender<Msg>) {
    crate::headless::on_stop_signals("SIGHUP ignored: a detached run goes on", move || {
        tx.send(Msg::Terminate).is_ok()
    });
}
