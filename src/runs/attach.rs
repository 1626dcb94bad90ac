//! `termtune attach [OUTPUT_DIR]`: a headless client of a detached run. It prints the run's
//! progress as `termtune train` does and takes `p` (pause), `r` (resume), `s` (save a checkpoint),
//! `x` (stop with a checkpoint) and `q` (detach) on stdin; or, with `--pause`, `--resume`, `--save`
//! or `--stop`, sends that one request and waits until the run has done it.

use std::io::{BufRead, IsTerminal};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::control::{self, Reply, Request};
use super::{RunState, RunView};
use crate::headless::Printer;
use crate::trainer::protocol::TrainEvent;
use crate::trainer::runlog::LogLine;

/// Picks the run folder: the one named, else the only live run of this user.
fn pick(dir: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(d) = dir {
        return Ok(std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf()));
    }
    let live: Vec<RunView> = super::list()
        .into_iter()
        .filter(|r| !r.state.is_final())
        .collect();
    match live.as_slice() {
        [] => Err("no live run to attach to; `termtune runs` lists your runs, `termtune train PRESET --detach` starts one".into()),
        [one] => Ok(one.output_dir.clone()),
        many => Err(format!(
            "{} live runs; name one: {}",
            many.len(),
            many.iter()
                .map(|r| format!("`termtune attach {}`", r.output_dir.display()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Runs `termtune attach`; `action` is the one request of `--pause`/`--resume`/`--save`/`--stop`.
pub fn attach(dir: Option<&Path>, action: Option<Request>) -> ExitCode {
    let dir = match pick(dir) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("termtune: {msg}");
            return ExitCode::FAILURE;
        }
    };
    if !super::RunRecord::path(&dir).exists() && dir.join("trainer_log.jsonl").exists() {
        // No termtune run here, but a run's log: a LLaMA-Factory run folder, followed read-only.
        if action.is_some() {
            eprintln!(
                "termtune: {} is not a termtune run (no {}): it can be followed, not paused or stopped; use the tool that started it",
                dir.display(),
                super::STATE_FILE
            );
            return ExitCode::FAILURE;
        }
        return follow_log(&dir);
    }
    let stream = match control::connect(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("termtune: {e}");
            return ExitCode::FAILURE;
        }
    };
    match action {
        Some(req) => one_request(&dir, stream, req),
        None => follow(&dir, stream),
    }
}

/// The event that shows `req` was done.
fn done(req: Request, ev: &TrainEvent) -> bool {
    match req {
        Request::Pause => matches!(ev, TrainEvent::Paused),
        Request::Resume => matches!(ev, TrainEvent::Resumed),
        Request::Save => matches!(ev, TrainEvent::CheckpointSaved { .. }),
        // A stop is done when the run ends and closes the connection.
        Request::Stop | Request::Abandon | Request::Status => false,
    }
}

fn one_request(dir: &Path, mut stream: std::os::unix::net::UnixStream, req: Request) -> ExitCode {
    if let Err(e) = control::send_line(&mut stream, &req) {
        eprintln!("termtune: cannot reach the run in {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let Ok(reader) = stream.try_clone() else {
        return ExitCode::FAILURE;
    };
    let mut printer = Printer::new(false);
    let mut live = false;
    let mut ok = false;
    let mut ended = false;
    control::read_replies(reader, |reply| match reply {
        Reply::Status(record) => {
            // Nothing would happen (the engine ignores a pause while paused): say so and stop.
            let already = match req {
                Request::Pause => record.state == RunState::Paused,
                Request::Resume => record.state == RunState::Running,
                _ => false,
            };
            if already {
                eprintln!(
                    "termtune: the run in {} is already {}",
                    dir.display(),
                    record.state.as_str()
                );
                ok = true;
                return false;
            }
            true
        }
        Reply::Live => {
            live = true;
            true
        }
        Reply::Event(ev) => {
            if live && !matches!(ev, TrainEvent::StepFinished(_)) {
                printer.event(&ev);
            }
            if matches!(ev, TrainEvent::Finished(_) | TrainEvent::Failed(_)) {
                ended = true;
            }
            if live && done(req, &ev) {
                ok = true;
                return false;
            }
            true
        }
        Reply::Error(e) => {
            eprintln!("termtune: the run says: {e}");
            true
        }
    });
    let _ = stream.shutdown(Shutdown::Both);
    if matches!(req, Request::Stop | Request::Abandon) {
        let view = super::view(dir);
        match view.as_ref().map(|v| v.state) {
            Some(RunState::Stopped | RunState::Finished) => {
                if let Some(v) = view {
                    eprintln!(
                        "termtune: the run in {} is {}",
                        dir.display(),
                        v.note.unwrap_or_else(|| v.state.as_str().into())
                    );
                }
                return ExitCode::SUCCESS;
            }
            _ if ended => return ExitCode::SUCCESS,
            _ => {}
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "termtune: the run in {} ended before it could {}",
            dir.display(),
            match req {
                Request::Pause => "pause",
                Request::Resume => "resume",
                Request::Save => "save a checkpoint",
                Request::Stop | Request::Abandon => "stop",
                Request::Status => "answer",
            }
        );
        ExitCode::FAILURE
    }
}

fn follow(dir: &Path, stream: std::os::unix::net::UnixStream) -> ExitCode {
    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "termtune: attached to the run in {}: p pause, r resume, s save a checkpoint, x stop (with a checkpoint), q detach (the run goes on); each followed by Enter",
        dir.display()
    );
    if let Some(summary) = crate::trainer::runlog::read_log(dir)
        .ok()
        .and_then(|lines| history_summary(&lines))
    {
        eprintln!("termtune: {summary}");
    }
    if let Ok(mut writer) = stream.try_clone() {
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    let req = match line.trim() {
                        "p" => Request::Pause,
                        "r" => Request::Resume,
                        "s" => Request::Save,
                        "x" => Request::Stop,
                        "q" => {
                            let _ = writer.shutdown(Shutdown::Both);
                            return;
                        }
                        "" => continue,
                        other => {
                            eprintln!("termtune: unknown key {other:?}: p, r, s, x or q");
                            continue;
                        }
                    };
                    if control::send_line(&mut writer, &req).is_err() {
                        return;
                    }
                }
                // stdin closed (e.g. /dev/null): keep following the run until it ends.
            });
    }
    let mut printer = Printer::new(tty);
    control::read_replies(stream, |reply| {
        match reply {
            Reply::Status(record) => {
                printer.end_line();
                eprintln!(
                    "termtune: run pid {} is {}{}",
                    record.pid,
                    record.state.as_str(),
                    record
                        .device
                        .map_or_else(String::new, |d| format!(" on {d}"))
                );
            }
            Reply::Event(ev) => printer.event(&ev),
            Reply::Live => {}
            Reply::Error(e) => {
                printer.end_line();
                eprintln!("termtune: the run says: {e}");
            }
        }
        true
    });
    printer.end_line();
    match super::view(dir) {
        Some(v) if v.state.is_final() => eprintln!(
            "termtune: the run in {} is {}",
            dir.display(),
            v.note.unwrap_or_else(|| v.state.as_str().into())
        ),
        _ => eprintln!(
            "termtune: detached; the run goes on (`termtune attach {}`)",
            dir.display()
        ),
    }
    ExitCode::SUCCESS
}

/// One line on a run's history so far (from its `trainer_log.jsonl`): the steps logged, the loss
/// from first to last with its minimum, and the evaluations.
pub fn history_summary(lines: &[LogLine]) -> Option<String> {
    let losses: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l.current_steps, l.loss?)))
        .collect();
    let (&(first_step, first), &(last_step, last)) = (losses.first()?, losses.last()?);
    let (min_step, min) = losses
        .iter()
        .copied()
        .fold((first_step, first), |m, p| if p.1 < m.1 { p } else { m });
    let evals: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l.current_steps, l.eval_loss?)))
        .collect();
    let mut out = format!(
        "history: {} steps logged ({first_step} to {last_step}); loss {first:.4} → {last:.4}, lowest {min:.4} at step {min_step}",
        losses.len()
    );
    if let Some((step, e)) = evals.last() {
        out.push_str(&format!(
            "; {} evaluation{}, last eval_loss {e:.4} at step {step}",
            evals.len(),
            if evals.len() == 1 { "" } else { "s" }
        ));
    }
    Some(out)
}

/// A log line as `termtune train` prints a step (or an evaluation).
fn log_line_text(l: &LogLine) -> String {
    match (l.loss, l.eval_loss) {
        (None, Some(e)) => format!(
            "termtune: eval at step {}: eval_loss {e:.4}",
            l.current_steps
        ),
        (loss, _) => format!(
            "step {}/{} | loss {} | lr {} | epoch {:.2} | {} < {}",
            l.current_steps,
            l.total_steps,
            loss.map_or_else(|| "-".into(), |v| format!("{v:.4}")),
            l.lr.map_or_else(|| "-".into(), |v| format!("{v:.2e}")),
            l.epoch,
            l.elapsed_time,
            l.remaining_time
        ),
    }
}

/// Follows a folder that holds no termtune run (a LLaMA-Factory run's `output_dir`) from its
/// `trainer_log.jsonl`, read-only, until the last step is logged.
fn follow_log(dir: &Path) -> ExitCode {
    use super::follow::{LogFollower, POLL_INTERVAL, reached_the_end};
    eprintln!(
        "termtune: following {}/trainer_log.jsonl read-only (no termtune run here; a LLaMA-Factory run?) until its last step; Ctrl-C stops following",
        dir.display()
    );
    let mut follower = LogFollower::new(dir);
    let mut first = true;
    loop {
        let polled = match follower.poll() {
            Ok(p) => p,
            Err(e) => {
                eprintln!(
                    "termtune: cannot read {}/trainer_log.jsonl: {e}",
                    dir.display()
                );
                return ExitCode::FAILURE;
            }
        };
        if polled.restarted {
            eprintln!("termtune: trainer_log.jsonl started over (a new run in this folder)");
        }
        if first && let Some(summary) = history_summary(&polled.lines) {
            eprintln!("termtune: {summary}");
        }
        first = false;
        let mut end = None;
        for l in &polled.lines {
            eprintln!("{}", log_line_text(l));
            if reached_the_end(l) {
                end = Some((l.current_steps, l.total_steps));
            }
        }
        if let Some((step, total)) = end {
            eprintln!("termtune: the run logged its last step ({step}/{total})");
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
