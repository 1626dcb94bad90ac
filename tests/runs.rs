//! Runs that outlive the terminal, with the real binary on a tiny random llama (CPU, seconds):
//! `train --detach` returns at once and the run goes on by itself; `runs --json` follows it;
//! `kill -9` reads as "died" with the checkpoint to resume from; `attach` streams events to several
//! clients and pauses, resumes, checkpoints and stops the run; a stale socket is cleaned up; a
//! folder of another user is refused; killing the tmux server that started a run does not stop it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::tiny_util::*;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    cache: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    tiny_model_and_toy_data(&root, &varied_rows(8));
    let cache = root.join("cache");
    Fixture {
        _dir: dir,
        root,
        cache,
    }
}

impl Fixture {
    /// A preset training into `root/<out>`; returns (preset path, output_dir).
    fn preset(&self, out: &str, max_steps: u64, save_steps: u64) -> (PathBuf, PathBuf) {
        let out_dir = self.root.join(out);
        let path = self.root.join(format!("{out}.yaml"));
        std::fs::write(
            &path,
            format!(
                "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
                 output_dir: {}\nlogging_steps: 1\nsave_steps: {save_steps}\nper_device_train_batch_size: 2\n\
                 max_steps: {max_steps}\nlearning_rate: 1.0e-3\ntokenized_path: {}\nnum_threads: 1\n",
                self.root.join("model").display(),
                self.root.join("data").display(),
                out_dir.display(),
                self.root.join("tokcache").display(),
            ),
        )
        .unwrap();
        (path, out_dir)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_termtune"));
        c.args(args)
            .env("TERMTUNE_CACHE", &self.cache)
            .env("TERMTUNE_DEVICE", "cpu")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// `termtune train PRESET --detach`: the run's pid (killed when the guard drops).
    fn detach(&self, preset: &Path) -> (RunGuard, Output) {
        let started = Instant::now();
        let out = self.run(&["train", preset.to_str().unwrap(), "--detach"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "--detach took {:?}",
            started.elapsed()
        );
        let pid: u32 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("pid:"))
            .unwrap_or_else(|| panic!("no pid in {text}"))
            .trim()
            .parse()
            .unwrap();
        (RunGuard(pid), out)
    }

    /// The entry of `runs --json` for `out_dir`.
    fn run_entry(&self, out_dir: &Path) -> Option<Value> {
        let out = self.run(&["runs", "--json"]);
        assert!(out.status.success());
        let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        all.into_iter()
            .find(|r| r["output_dir"].as_str() == Some(out_dir.to_str().unwrap()))
    }

    fn state(&self, out_dir: &Path) -> String {
        self.run_entry(out_dir)
            .and_then(|r| r["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn wait_state(&self, out_dir: &Path, state: &str, secs: u64) -> Value {
        wait_for(&format!("state {state}"), secs, || {
            self.run_entry(out_dir).filter(|r| r["state"] == state)
        })
    }
}

/// Kills the run process if a test ends early, so no training outlives a failed test.
struct RunGuard(u32);

impl Drop for RunGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_len(out_dir: &Path) -> u64 {
    std::fs::metadata(out_dir.join("trainer_log.jsonl")).map_or(0, |m| m.len())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_detached_run_returns_at_once_and_finishes_on_its_own() {
    let f = fixture();
    let (preset, out) = f.preset("bg", 500, 1000);
    let (_guard, o) = f.detach(&preset);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(out.to_str().unwrap()), "{text}");
    assert!(text.contains("termtune attach"), "{text}");
    let first = f.state(&out);
    assert!(first == "starting" || first == "running", "{first}");
    let mut seen_running = first == "running";
    // The log grows while the caller is long gone.
    let len = wait_for("trainer_log.jsonl", 120, || {
        let n = log_len(&out);
        (n > 0).then_some(n)
    });
    wait_for("the log to grow", 60, || {
        (log_len(&out) > len).then_some(())
    });
    let done = wait_for("finished", 300, || {
        let r = f.run_entry(&out)?;
        seen_running |= r["state"] == "running";
        (r["state"] == "finished").then_some(r)
    });
    assert!(seen_running, "runs never showed the run as running");
    assert_eq!(done["step"], 500);
    assert_eq!(done["total_steps"], 500);
    assert_eq!(done["device"], "cpu");
    assert!(done["loss"].as_f64().unwrap() > 0.0, "{done}");
    assert!(done["tokens_per_sec"].as_f64().unwrap() > 0.0, "{done}");
    assert!(!out.join(".termtune.sock").exists());
    let log = std::fs::read_to_string(out.join("termtune-run.log")).unwrap();
    assert!(
        log.contains("step 500/500") && log.contains("done:"),
        "{log}"
    );
    let table = String::from_utf8_lossy(&f.run(&["runs"]).stdout).into_owned();
    assert!(
        table.contains("finished") && table.contains("500/500"),
        "{table}"
    );
}

#[test]
fn a_killed_run_reads_as_died_with_its_checkpoint_and_its_stale_socket_is_removed() {
    let f = fixture();
    let (preset, out) = f.preset("killed", 100_000, 5);
    let (guard, _) = f.detach(&preset);
    wait_for("checkpoint-5", 120, || {
        out.join("checkpoint-5").exists().then_some(())
    });
    assert!(
        Command::new("kill")
            .args(["-9", &guard.0.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let died = f.wait_state(&out, "died", 30);
    let note = died["note"].as_str().unwrap();
    assert!(note.starts_with("died at step "), "{note}");
    assert!(note.contains("resumable from checkpoint-"), "{note}");
    let table = String::from_utf8_lossy(&f.run(&["runs"]).stdout).into_owned();
    assert!(table.contains(note), "{table}");

    // The socket is left behind by the killed process: attach finds nobody and removes it.
    let sock = out.join(".termtune.sock");
    assert!(sock.exists());
    let o = f.run(&["attach", out.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("is not running (died at step")
            && err.contains("removed its stale control socket"),
        "{err}"
    );
    assert!(!sock.exists());

    // A stale socket does not block the next run either; it resumes from the checkpoint.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let (_guard2, _) = f.detach(&preset);
    wait_for("the resumed run", 120, || {
        (f.state(&out) == "running").then_some(())
    });
    let log = std::fs::read_to_string(out.join("termtune-run.log")).unwrap();
    assert!(log.contains("resuming from"), "{log}");
    let o = f.run(&["attach", out.to_str().unwrap(), "--stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    f.wait_state(&out, "stopped", 30);
}

/// A follower: `termtune attach DIR` with its stderr read line by line on a thread.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn start(f: &Fixture, out: &Path) -> Self {
        let mut child = f
            .cmd(&["attach", out.to_str().unwrap()])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_line(&mut self, needle: &str, secs: u64) {
        let start = Instant::now();
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = Duration::from_secs(secs).saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line with {needle:?} in {:#?}", self.seen),
            }
        }
    }

    /// Step numbers printed after line `from`.
    fn steps_since(&self, from: usize) -> Vec<u64> {
        self.seen[from..]
            .iter()
            .filter_map(|l| l.strip_prefix("step ")?.split('/').next()?.parse().ok())
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_clients_follow_one_run_and_attach_pauses_resumes_saves_and_stops_it() {
    let f = fixture();
    let (preset, out) = f.preset("ctl", 100_000, 100_000);
    let (_guard, _) = f.detach(&preset);
    let dir = out.to_str().unwrap();
    let mut a = Follower::start(&f, &out);
    let mut b = Follower::start(&f, &out);
    // The tiny run trains ~100 steps a second: each client sees some step first, then every
    // following step, in order.
    // (Step lines, not the history line that names a step.)
    a.wait_line("| loss ", 120);
    b.wait_line("| loss ", 120);
    let (na, nb) = (a.seen.len() - 1, b.seen.len() - 1);
    let later = a.steps_since(na)[0].max(b.steps_since(nb)[0]) + 20;
    a.wait_line(&format!("step {later}/"), 60);
    b.wait_line(&format!("step {later}/"), 60);
    for s in [a.steps_since(na), b.steps_since(nb)] {
        assert!(
            s.len() > 20 && s.windows(2).all(|w| w[1] == w[0] + 1),
            "{s:?}"
        );
    }

    let o = f.run(&["attach", dir, "--pause"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(f.state(&out), "paused");
    a.wait_line("termtune: paused", 10);
    b.wait_line("termtune: paused", 10);
    let len = log_len(&out);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(log_len(&out), len, "a paused run trains on");
    let o = f.run(&["attach", dir, "--pause"]);
    assert!(stderr(&o).contains("already paused"), "{}", stderr(&o));
    let o = f.run(&["attach", dir, "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(f.state(&out), "running");
    a.wait_line("termtune: resumed", 10);

    let o = f.run(&["attach", dir, "--save"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("checkpoint for step"), "{}", stderr(&o));
    let (saved, _) = termtune::trainer::checkpoint::latest_checkpoint(&out).unwrap();

    let o = f.run(&["attach", dir, "--stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("checkpoint for step"), "{err}");
    assert!(err.contains("stopped at step"), "{err}");
    let stopped = f.wait_state(&out, "stopped", 30);
    let (last, dir_last) = termtune::trainer::checkpoint::latest_checkpoint(&out).unwrap();
    assert!(last > saved, "{last} {saved}");
    assert_eq!(stopped["checkpoint"], dir_last.to_str().unwrap());
    termtune::engine::adapter::read_adapter(&dir_last, &candle_core::Device::Cpu).unwrap();
    // Both followers saw the stop and ended by themselves.
    for fl in [&mut a, &mut b] {
        fl.wait_line("checkpoint for step", 30);
        fl.wait_line("stopped at step", 30);
        let status = wait_for("the follower to end", 30, || fl.child.try_wait().unwrap());
        assert!(status.success());
    }
    assert!(!out.join(".termtune.sock").exists());
    let o = f.run(&["attach", dir]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("nothing to attach to"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_run_folder_of_another_user_is_refused() {
    if nix::unistd::getuid().as_raw() != 0 {
        eprintln!("skipped: only root can make a folder of another user");
        return;
    }
    let f = fixture();
    let (preset, out) = f.preset("theirs", 10, 1000);
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(65534), Some(65534)).unwrap();
    let o = f.run(&["attach", out.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("belongs to user id 65534"), "{err}");
    let o = f.run(&["train", preset.to_str().unwrap(), "--detach"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("belongs to user id 65534"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn killing_the_tmux_server_that_started_a_run_does_not_stop_it() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped: tmux is not installed");
        return;
    }
    let f = fixture();
    let (preset, out) = f.preset("tmux", 100_000, 100_000);
    let socket = format!("termtune-runs-{}", std::process::id());
    let line = format!(
        "{} train {} --detach; sleep 600",
        env!("CARGO_BIN_EXE_termtune"),
        preset.display()
    );
    let cache = format!("TERMTUNE_CACHE={}", f.cache.display());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &socket])
            .args(args)
            .output()
            .unwrap()
    };
    let o = tmux(&[
        "new-session",
        "-d",
        "-s",
        "run",
        "-x",
        "100",
        "-y",
        "20",
        "-e",
        &cache,
        "-e",
        "TERMTUNE_DEVICE=cpu",
        &line,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pid: u32 = wait_for("the run to register", 120, || {
        let r = f.run_entry(&out)?;
        (r["state"] == "running").then(|| r["pid"].as_u64())?
    })
    .try_into()
    .unwrap();
    let _guard = RunGuard(pid);
    assert!(tmux(&["kill-server"]).status.success());
    std::thread::sleep(Duration::from_millis(500));
    let len = log_len(&out);
    wait_for("the log to grow after the tmux server is gone", 60, || {
        (log_len(&out) > len).then_some(())
    });
    assert_eq!(f.state(&out), "running");
    let o = f.run(&["attach", out.to_str().unwrap(), "--stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    f.wait_state(&out, "stopped", 30);
}

/// The loss logged for each step of `out/trainer_log.jsonl` (a step logged again after a resume
/// counts with its last value).
fn logged_losses(out: &Path) -> std::collections::BTreeMap<u64, f64> {
    termtune::trainer::runlog::read_log(out)
        .unwrap()
        .into_iter()
        .filter_map(|l| Some((l.current_steps, l.loss?)))
        .collect()
}

#[test]
fn a_run_killed_with_sigkill_resumes_in_the_foreground_with_the_losses_of_an_uninterrupted_run() {
    let f = fixture();
    let steps = 600;
    let (straight, straight_out) = f.preset("straight", steps, 5);
    let o = f.run(&["train", straight.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let (preset, out) = f.preset("sigkill", steps, 5);
    let (guard, _) = f.detach(&preset);
    wait_for("checkpoint-5", 120, || {
        out.join("checkpoint-5/trainer_state.json")
            .exists()
            .then_some(())
    });
    assert!(
        Command::new("kill")
            .args(["-9", &guard.0.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let died = f.wait_state(&out, "died", 30);
    let at: u64 = died["step"].as_u64().unwrap();
    assert!(at < steps, "the run finished before it was killed");
    let (resume_from, ckpt) = termtune::trainer::checkpoint::latest_checkpoint(&out).unwrap();
    assert_eq!(died["checkpoint"], ckpt.to_str().unwrap());

    // The next `termtune train` of the preset resumes from the newest complete checkpoint.
    let o = f.run(&["train", preset.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("resuming from {}", ckpt.display()))
            && err.contains(&format!("(step {resume_from})")),
        "{err}"
    );
    // The foreground run carried the folder's record on: no longer "died".
    assert_eq!(f.state(&out), "finished");
    let (resumed, uninterrupted) = (logged_losses(&out), logged_losses(&straight_out));
    assert_eq!(resumed.len(), usize::try_from(steps).unwrap());
    assert_eq!(resumed, uninterrupted);
}

/// A LLaMA-Factory run folder (no termtune run in it): `termtune attach` follows its
/// `trainer_log.jsonl` read-only as a test appends it line by line (one line cut in two), prints
/// each step and the evaluation, and ends at the last step; it cannot be stopped from here.
#[test]
fn attach_follows_a_llamafactory_run_folder_as_its_log_grows() {
    use std::io::Write;
    let f = fixture();
    let out = f.root.join("lf-run");
    std::fs::create_dir_all(&out).unwrap();
    // As LLaMA-Factory's LogCallback writes them (keys with null values dropped).
    let line = |step: u64| {
        format!(
            "{{\"current_steps\": {step}, \"total_steps\": 4, \"loss\": {:.4}, \"lr\": 9.6e-05, \"epoch\": {:.2}, \"percentage\": {:.2}, \"elapsed_time\": \"0:00:0{step}\", \"remaining_time\": \"0:00:0{}\", \"throughput\": 1530.12, \"total_tokens\": 62740}}\n",
            2.0 - 0.25 * step as f64,
            0.25 * step as f64,
            25.0 * step as f64,
            4 - step
        )
    };
    let mut log = std::fs::File::create(out.join("trainer_log.jsonl")).unwrap();
    log.write_all(line(1).as_bytes()).unwrap();
    let dir = out.to_str().unwrap();
    let o = f.run(&["attach", dir, "--stop"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not a termtune run"),
        "{}",
        stderr(&o)
    );

    let mut a = Follower::start(&f, &out);
    a.wait_line("read-only", 30);
    a.wait_line("step 1/4 | loss 1.7500", 30);
    for step in 2..=3 {
        let text = line(step);
        let (head, tail) = text.split_at(text.len() / 2);
        log.write_all(head.as_bytes()).unwrap();
        log.flush().unwrap();
        std::thread::sleep(Duration::from_millis(700));
        log.write_all(tail.as_bytes()).unwrap();
        a.wait_line(&format!("step {step}/4 | loss "), 30);
    }
    log.write_all(b"{\"current_steps\": 3, \"total_steps\": 4, \"eval_loss\": 1.2345, \"epoch\": 0.75, \"percentage\": 75.0, \"elapsed_time\": \"0:00:03\", \"remaining_time\": \"0:00:01\"}\n").unwrap();
    a.wait_line("eval at step 3: eval_loss 1.2345", 30);
    log.write_all(line(4).as_bytes()).unwrap();
    a.wait_line("step 4/4 | loss 1.0000", 30);
    a.wait_line("logged its last step (4/4)", 30);
    let status = wait_for("the follower to end", 30, || a.child.try_wait().unwrap());
    assert!(status.success());
    // Each step printed once, in order; nothing printed from a half line.
    assert_eq!(a.steps_since(0), [1, 2, 3, 4]);
}
