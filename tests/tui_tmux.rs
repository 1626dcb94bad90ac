//! End to end: the real `termtune` binary in a detached tmux session at 80×24, driven with
//! `send-keys` and read with `capture-pane`, on a tiny random llama (CPU, seconds): open a preset,
//! start training, watch the step counter and the loss move, stop with a checkpoint, quit, and
//! check that the terminal is restored and the checkpoint is on disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::tiny_util::*;

struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is needed by this test: apt-get install -y tmux")
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        assert!(self.cmd(&args).status.success());
        std::thread::sleep(Duration::from_millis(150));
    }

    fn screen(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-t", &self.session]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `pred` holds for the screen; panics with the screen after `secs`.
    fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// "step N/" on the status bar → N.
fn step_on_screen(screen: &str) -> Option<u64> {
    let i = screen.find("step ")?;
    let rest = &screen[i + 5..];
    let end = rest.find('/')?;
    rest[..end].trim().parse().ok()
}

/// The loss value shown in the throughput panel.
fn loss_on_screen(screen: &str) -> Option<String> {
    let i = screen
        .find("loss 0")
        .or_else(|| screen.find("loss 1"))
        .or_else(|| screen.find("loss 2"))
        .or_else(|| screen.find("loss 3"))
        .or_else(|| screen.find("loss 4"))
        .or_else(|| screen.find("loss 5"))
        .or_else(|| screen.find("loss 6"))?;
    Some(screen[i + 5..].chars().take(6).collect())
}

fn fixture(root: &Path) -> PathBuf {
    tiny_model_and_toy_data(root, &varied_rows(64));
    // Enough steps that the run is still going when the test stops it (a step takes milliseconds).
    let preset = format!(
        "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {}\nlogging_steps: 1\nsave_steps: 100000\nper_device_train_batch_size: 2\n\
         gradient_accumulation_steps: 1\nlearning_rate: 1.0e-2\nlora_rank: 4\n\
         lr_scheduler_type: constant\nmax_steps: 100000\ntokenized_path: {}\nseed: 3\n",
        root.join("model").display(),
        root.join("data").display(),
        root.join("out").display(),
        root.join("tokcache").display(),
    );
    let path = root.join("tiny.yaml");
    std::fs::write(&path, preset).unwrap();
    path
}

impl Tmux {
    /// A new detached 80×24 session named `tt` on its own socket, running `shell_cmd`.
    fn start(socket_prefix: &str, shell_cmd: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("{socket_prefix}-{}", std::process::id()),
            session: "tt".into(),
        };
        let out = tmux.cmd(&[
            "new-session",
            "-d",
            "-s",
            "tt",
            "-x",
            "80",
            "-y",
            "24",
            shell_cmd,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }
}

#[test]
fn train_stop_with_checkpoint_and_quit_in_tmux() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let preset = fixture(root);
    let tmux = Tmux::start(
        "termtune-test",
        &format!(
            "TERM=xterm-256color TERMTUNE_CACHE={} {} --log-file {} {}; echo TERMTUNE_EXIT=$?; sleep 60",
            root.join("cache").display(),
            env!("CARGO_BIN_EXE_termtune"),
            root.join("app.log").display(),
            preset.display()
        ),
    );

    let s = tmux.wait_for("the Model tab with the model resolved", 30, |s| {
        s.contains("model_name_or_path") && s.contains("folder: llama")
    });
    assert!(s.contains("tiny.yaml"), "{s}");
    assert_eq!(
        tmux.cmd(&["display", "-p", "-t", "tt", "#{alternate_on}"])
            .stdout,
        b"1\n",
        "the TUI runs on the alternate screen"
    );

    tmux.keys(&["s"]);
    let s = tmux.wait_for("a few steps", 120, |s| {
        step_on_screen(s).is_some_and(|n| n >= 3)
    });
    let first_step = step_on_screen(&s).unwrap();
    let first_loss = loss_on_screen(&s);
    let s = tmux.wait_for("the step counter to move", 60, |s| {
        step_on_screen(s).is_some_and(|n| n >= first_step + 5)
    });
    let later_loss = loss_on_screen(&s);
    assert!(later_loss.is_some(), "no loss shown:\n{s}");
    assert_ne!(first_loss, later_loss, "the loss did not change:\n{s}");

    tmux.keys(&["x"]);
    tmux.wait_for("the stop question", 10, |s| {
        s.contains("Save a checkpoint?")
    });
    tmux.keys(&["y"]);
    let s = tmux.wait_for("the run to stop", 60, |s| {
        s.contains("│ stopped") && s.contains("checkpoint saved")
    });
    let stopped_at = step_on_screen(&s).unwrap();

    tmux.keys(&["q"]);
    let s = tmux.wait_for("termtune to exit", 30, |s| s.contains("TERMTUNE_EXIT="));
    assert!(s.contains("TERMTUNE_EXIT=0"), "{s}");
    // Restored: back on the normal screen, no TUI left on it.
    assert_eq!(
        tmux.cmd(&["display", "-p", "-t", "tt", "#{alternate_on}"])
            .stdout,
        b"0\n"
    );
    assert!(!s.contains("model_name_or_path"), "{s}");
    let out = tmux.cmd(&["display", "-p", "-t", "tt", "#{cursor_flag}"]);
    assert_eq!(out.stdout, b"1\n", "the cursor is shown again");

    let ckpt = root.join("out").join(format!("checkpoint-{stopped_at}"));
    assert!(
        ckpt.join("adapter_model.safetensors").is_file(),
        "no checkpoint at {}; out/ has {:?}",
        ckpt.display(),
        std::fs::read_dir(root.join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
}

/// `termtune runs --json` (on the test's own registry) → the entry for `out`.
fn run_entry(cache: &Path, out: &Path) -> Option<serde_json::Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .args(["runs", "--json"])
        .env("TERMTUNE_CACHE", cache)
        .output()
        .unwrap();
    assert!(o.status.success());
    let all: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    all.into_iter()
        .find(|r| r["output_dir"].as_str() == Some(out.to_str().unwrap()))
}

fn log_len(out: &Path) -> u64 {
    std::fs::metadata(out.join("trainer_log.jsonl")).map_or(0, |m| m.len())
}

/// Kills the run process if the test ends early.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A run started in the TUI is a process of its own: the tmux session (the terminal) is killed,
/// the TUI goes, the run trains on; `termtune runs` shows it; the TUI in a new tmux session lists
/// it on the Run pane (`a`), follows it with its history, and `x` stops it with a checkpoint.
#[test]
fn a_run_started_in_the_tui_outlives_its_terminal_and_a_new_tui_attaches_and_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let preset = fixture(root);
    let cache = root.join("cache");
    let out = root.join("out");
    let tui = |name: &str, log: &str| {
        Tmux::start(
            name,
            &format!(
                "TERM=xterm-256color TERMTUNE_CACHE={} exec {} --log-file {} {}",
                cache.display(),
                env!("CARGO_BIN_EXE_termtune"),
                root.join(log).display(),
                preset.display()
            ),
        )
    };
    let first = tui("termtune-hup", "app.log");
    first.wait_for("the Model tab", 30, |s| s.contains("model_name_or_path"));
    let tui_pid: i32 = String::from_utf8_lossy(
        &first
            .cmd(&["display", "-p", "-t", "tt", "#{pane_pid}"])
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    first.keys(&["s"]);
    first.wait_for("a few steps", 120, |s| {
        step_on_screen(s).is_some_and(|n| n >= 3)
    });
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("termtune-run.json")).unwrap())
            .unwrap();
    let run_pid = u32::try_from(record["pid"].as_u64().unwrap()).unwrap();
    let _guard = KillOnDrop(run_pid);
    assert_ne!(
        i64::from(run_pid),
        i64::from(tui_pid),
        "the run is its own process"
    );

    // Closing the session hangs up the terminal (SIGHUP), as a dropped SSH connection does.
    assert!(first.cmd(&["kill-session", "-t", "tt"]).status.success());
    let start = Instant::now();
    let alive = |pid: i32| {
        Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    while alive(tui_pid) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the TUI did not leave after the hang-up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let len = log_len(&out);
    let start = Instant::now();
    while log_len(&out) <= len {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run stopped with its terminal; its log:\n{}",
            std::fs::read_to_string(out.join("termtune-run.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let entry = run_entry(&cache, &out).unwrap();
    assert_eq!(entry["state"], "running", "{entry}");
    assert_eq!(entry["pid"], run_pid);
    let step_before = entry["step"].as_u64().unwrap();

    // A new terminal: the Run pane lists the run; Enter follows it.
    let second = tui("termtune-attach", "app2.log");
    second.wait_for("the Model tab", 30, |s| s.contains("model_name_or_path"));
    second.keys(&["5"]);
    second.keys(&["a"]);
    second.wait_for("the list of runs", 20, |s| {
        s.contains("runs of this machine") && s.contains("running ")
    });
    second.keys(&["Enter"]);
    let s = second.wait_for("the dashboard of the run", 30, |s| {
        s.contains(&format!("run pid {run_pid}"))
            && step_on_screen(s).is_some_and(|n| n > step_before)
    });
    assert!(s.contains("attached to the run"), "{s}");

    second.keys(&["x"]);
    second.wait_for("the stop question", 10, |s| {
        s.contains("Save a checkpoint?")
    });
    second.keys(&["y"]);
    let s = second.wait_for("the run to stop", 60, |s| {
        s.contains("│ stopped") && s.contains("checkpoint saved")
    });
    let stopped_at = step_on_screen(&s).unwrap();
    let entry = run_entry(&cache, &out).unwrap();
    assert_eq!(entry["state"], "stopped", "{entry}");
    let ckpt = out.join(format!("checkpoint-{stopped_at}"));
    assert!(ckpt.join("adapter_model.safetensors").is_file(), "{s}");
    assert!(ckpt.join("trainer_state.json").is_file());
    assert_eq!(entry["checkpoint"], ckpt.to_str().unwrap());
    // Nothing live: quit asks nothing.
    second.keys(&["q"]);
    let start = Instant::now();
    while second.cmd(&["has-session", "-t", "tt"]).status.success() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "termtune did not quit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The mouse in the real binary: a click (an SGR mouse report, as a terminal sends it) on the
/// "7 Export" title switches tab; the export of the base runs from the pane with keys; on quit
/// the terminal's mouse reporting is off again.
#[test]
fn mouse_click_export_and_mouse_released_on_quit_in_tmux() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let preset = fixture(root);
    let tmux = Tmux::start(
        "termtune-mouse",
        &format!(
            "TERM=xterm-256color {} --log-file {} {}; echo TERMTUNE_EXIT=$?; sleep 60",
            env!("CARGO_BIN_EXE_termtune"),
            root.join("app.log").display(),
            preset.display()
        ),
    );
    let flag = |name: &str| {
        tmux.cmd(&["display", "-p", "-t", "tt", &format!("#{{{name}}}")])
            .stdout
    };
    tmux.wait_for("the Model tab", 30, |s| s.contains("model_name_or_path"));
    assert_eq!(flag("mouse_any_flag"), b"1\n", "mouse reporting is on");
    assert_eq!(flag("mouse_sgr_flag"), b"1\n");

    // Left button down and up at column 67, row 1 (1-based): the "7 Export" title.
    tmux.keys(&["-l", "\x1b[<0;67;1M\x1b[<0;67;1m"]);
    tmux.wait_for("the Export pane after the click", 10, |s| {
        s.contains("export_gguf_type") && s.contains("e starts")
    });

    // export_dir is the first field: type it, export, confirm.
    let out = root.join("exported");
    tmux.keys(&["Enter"]);
    tmux.keys(&["-l", &out.display().to_string()]);
    tmux.keys(&["Enter"]);
    tmux.keys(&["e"]);
    tmux.wait_for("the confirmation naming the folder", 10, |s| {
        s.contains("Write merged") && s.contains("exported?")
    });
    tmux.keys(&["y"]);
    let s = tmux.wait_for("the export to finish", 60, |s| s.contains("export: done"));
    assert!(s.contains("model.safetensors"), "{s}");
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("config.json").is_file());

    // Quit (the preset has an unsaved edit: confirm), then the terminal is restored.
    tmux.keys(&["q"]);
    tmux.wait_for("the discard question", 10, |s| s.contains("unsaved edits"));
    tmux.keys(&["y"]);
    let s = tmux.wait_for("termtune to exit", 30, |s| s.contains("TERMTUNE_EXIT="));
    assert!(s.contains("TERMTUNE_EXIT=0"), "{s}");
    assert_eq!(flag("alternate_on"), b"0\n");
    for f in [
        "mouse_any_flag",
        "mouse_button_flag",
        "mouse_standard_flag",
        "mouse_sgr_flag",
    ] {
        assert_eq!(flag(f), b"0\n", "{f} is still on after quitting");
    }
}

/// The tiny model with a LoRA trained 7 steps to answer "ok the cat and the hat" (run folder
/// `run/`: the final adapter and checkpoint-5), and a greedy chat preset on it.
fn chat_fixture(root: &Path) -> PathBuf {
    tiny_model_and_toy_data(root, &same_answer_rows(4, "ok the cat and the hat"));
    let text = format!(
        "model_name_or_path: {m}\ndataset: toy\ndataset_dir: {d}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {o}\nlogging_steps: 1\nsave_steps: 5\nper_device_train_batch_size: 2\n\
         learning_rate: 2.0e-2\nlora_rank: 4\nlr_scheduler_type: constant\nmax_steps: 7\nseed: 3\n\
         tokenized_path: {t}\ndo_sample: false\nmax_new_tokens: 16\n",
        m = root.join("model").display(),
        d = root.join("data").display(),
        o = root.join("run").display(),
        t = root.join("tok").display(),
    );
    let loaded = termtune::config::parse(&text, &[], termtune::config::Purpose::Train).unwrap();
    let (_tx, rx) = std::sync::mpsc::channel();
    termtune::trainer::run::run_training(&loaded, &candle_core::Device::Cpu, &rx, &mut |_| {})
        .unwrap();
    let path = root.join("chat.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn chat_with_the_tiny_model_in_tmux() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let preset = chat_fixture(root);
    let tmux = Tmux::start(
        "termtune-chat",
        &format!(
            "TERM=xterm-256color {} --log-file {} {}; echo TERMTUNE_EXIT=$?; sleep 60",
            env!("CARGO_BIN_EXE_termtune"),
            root.join("app.log").display(),
            preset.display()
        ),
    );
    tmux.wait_for("the Model tab", 30, |s| s.contains("model_name_or_path"));
    tmux.keys(&["6"]);
    tmux.wait_for("the Chat pane", 10, |s| s.contains("nothing loaded yet"));
    // The picker lists the run folder: base, final adapter, checkpoint-5.
    tmux.keys(&["o"]);
    tmux.wait_for("the picker", 10, |s| {
        s.contains("final adapter (step 7)") && s.contains("checkpoint-5")
    });
    tmux.keys(&["Down"]);
    tmux.keys(&["Enter"]);
    tmux.wait_for("the adapter in the header", 60, |s| {
        s.contains("A ▸ adapter") && s.contains("step 7 · r 4")
    });
    tmux.keys(&["i"]);
    tmux.keys(&["-l", "hello"]);
    // Ctrl-j adds a line in the input (it reaches the app through tmux as Ctrl-j).
    tmux.keys(&["C-j"]);
    tmux.keys(&["-l", "there"]);
    let s = tmux.screen();
    assert!(
        s.contains("│hello") && s.contains("│there"),
        "two input lines:\n{s}"
    );
    tmux.keys(&["Enter"]);
    let s = tmux.wait_for("the answer and its numbers", 120, |s| s.contains("tok/s"));
    assert!(s.contains("you › hello"), "{s}");
    assert!(
        s.contains("model › ok the cat"),
        "the adapter's answer:\n{s}"
    );
    assert!(s.contains(" tokens · "), "{s}");
    // A bracketed paste with a newline fills the input and sends nothing.
    assert!(
        tmux.cmd(&["set-buffer", "-b", "p", "pasted one\npasted two"])
            .status
            .success()
    );
    assert!(
        tmux.cmd(&["paste-buffer", "-p", "-b", "p", "-t", "tt"])
            .status
            .success()
    );
    let s = tmux.wait_for("the pasted lines in the input", 10, |s| {
        s.contains("│pasted one") && s.contains("│pasted two")
    });
    assert_eq!(
        s.matches("you › ").count(),
        1,
        "the paste sent nothing:\n{s}"
    );
    // Leave the input and copy the answer: OSC 52 reaches tmux, which (with set-clipboard on)
    // keeps it as a paste buffer.
    assert!(
        tmux.cmd(&["set", "-g", "set-clipboard", "on"])
            .status
            .success()
    );
    tmux.keys(&["Escape"]);
    tmux.keys(&["y"]);
    tmux.wait_for("the copy message", 10, |s| s.contains("copied via OSC 52"));
    let buffer = String::from_utf8(tmux.cmd(&["show-buffer"]).stdout).unwrap();
    assert!(buffer.starts_with("ok the cat"), "clipboard: {buffer:?}");
    // A second turn reads only what follows the tokens the first one left in the KV cache.
    tmux.keys(&["i"]);
    tmux.keys(&["-l", "again"]);
    tmux.keys(&["Enter"]);
    let s = tmux.wait_for("the second answer's numbers", 120, |s| {
        s.contains(" cached) · ")
    });
    assert!(s.matches("you › ").count() >= 2, "{s}");
    tmux.keys(&["Escape"]);
    // Quit (the preset is unchanged, so no question).
    tmux.keys(&["q"]);
    let s = tmux.wait_for("termtune to exit", 30, |s| s.contains("TERMTUNE_EXIT="));
    assert!(s.contains("TERMTUNE_EXIT=0"), "{s}");
}
