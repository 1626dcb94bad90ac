//! `termtune train`: the training engine on its own thread, its events printed for a person
//! (a progress line on a terminal, plain log lines otherwise), Ctrl-C handled gracefully, and the
//! terminal's hang-up ignored so an SSH drop does not kill a run.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::config::Loaded;
use crate::trainer::protocol::{StepMetrics, TrainCommand, TrainEvent};
use crate::trainer::run::Outcome;
use crate::trainer::runlog::format_duration;

/// Exit status after Ctrl-C (128 + SIGINT), as shells expect.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Writes a line to stderr, ignoring failures (after an SSH hang-up stderr may be gone; the run
/// must go on and the log file still records everything).
fn say(line: &str) {
    let mut e = std::io::stderr();
    let _ = writeln!(e, "{line}");
}

/// Runs `loaded` to the end and reports; returns the process exit status.
pub fn train(loaded: Loaded) -> ExitCode {
    let after = loaded
        .preset
        .do_predict
        .then(|| trained_preset(&loaded.preset));
    let code = train_only(loaded);
    match after {
        // LLaMA-Factory's `do_predict` after `do_train`: predict with what was just trained.
        Some(preset) if code == ExitCode::SUCCESS => {
            say("termtune: do_predict: predicting with the trained model");
            predict(&preset)
        }
        _ => code,
    }
}

/// The preset that chats with what training `p` leaves in its output_dir: the adapter (LoRA) or the
/// fine-tuned model (full, freeze).
pub fn trained_preset(p: &crate::config::Preset) -> crate::config::Preset {
    let mut out = p.clone();
    if p.finetuning_type == crate::config::preset::FinetuningType::Lora {
        // As training built it: earlier adapters merged (all of them with `create_new_adapter`, else all but
        // the last, which training continued), then the adapter it saved.
        let mut adapters: Vec<String> = p
            .adapter_name_or_path
            .as_deref()
            .map(crate::engine::adapter::parse_adapter_list)
            .unwrap_or_default()
            .iter()
            .map(|a| a.display().to_string())
            .collect();
        if !p.create_new_adapter {
            adapters.pop();
        }
        adapters.push(p.output_dir.clone());
        out.adapter_name_or_path = Some(adapters.join(","));
    } else {
        out.model_name_or_path = p.output_dir.clone();
    }
    out
}

fn train_only(loaded: Loaded) -> ExitCode {
    let interrupts = Arc::new(AtomicUsize::new(0));
    install_signal_handlers(&interrupts);

    // A folder whose detached run died: this run carries its record on.
    let mut record =
        crate::runs::RunRecord::take_over(std::path::Path::new(&loaded.preset.output_dir));
    let (ev_tx, ev_rx) = mpsc::channel::<TrainEvent>();
    let engine = crate::trainer::thread::spawn(
        loaded,
        move |ev| {
            let _ = ev_tx.send(ev);
        },
        || {},
    );
    let engine = match engine {
        Ok(e) => e,
        Err(e) => {
            say(&format!("termtune: cannot start the engine thread: {e}"));
            return ExitCode::FAILURE;
        }
    };

    let tty = std::io::stderr().is_terminal();
    let mut printer = Printer {
        tty,
        line_open: false,
    };
    let mut asked_stop = false;
    loop {
        let n = interrupts.load(Ordering::SeqCst);
        if n >= 2 {
            printer.end_line();
            say(
                "termtune: interrupted twice: abandoning the current step; the last checkpoint is kept",
            );
            return ExitCode::from(EXIT_INTERRUPTED);
        }
        if n == 1 && !asked_stop {
            asked_stop = true;
            printer.end_line();
            say(
                "termtune: Ctrl-C: stopping after the current step and saving a checkpoint (Ctrl-C again to abandon)",
            );
            engine.send(TrainCommand::Stop { save: true });
        }
        match ev_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => {
                if let Some(r) = record.as_mut()
                    && r.on_event(&ev)
                {
                    let _ = r.save();
                }
                printer.event(&ev);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    printer.end_line();
    // A failure was printed as the engine's last event (`TrainEvent::Failed`).
    let outcome = engine.join();
    if let Some(mut r) = record {
        r.state = match &outcome {
            Ok(Outcome::Finished(_)) => crate::runs::RunState::Finished,
            Ok(Outcome::Stopped(_)) => crate::runs::RunState::Stopped,
            Err(_) => crate::runs::RunState::Failed,
        };
        let _ = r.save();
    }
    match outcome {
        Ok(Outcome::Finished(_)) => ExitCode::SUCCESS,
        Ok(Outcome::Stopped(_)) => {
            if asked_stop {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// `termtune predict`: generates for the evaluation data with a progress bar (a line per batch when stderr is not
/// a terminal), prints LF's metrics and writes its files into `output_dir`. Ctrl-C stops between tokens, writing
/// nothing.
pub fn predict(preset: &crate::config::Preset) -> ExitCode {
    use crate::predict::{PredictEvent, run};
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    on_stop_signals(
        "SIGHUP (terminal closed): prediction continues",
        move || {
            flag.store(true, Ordering::SeqCst);
            false
        },
    );
    let device = match crate::engine::device::chosen() {
        Ok(d) => d,
        Err(e) => {
            say(&format!("termtune: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let tty = std::io::stderr().is_terminal();
    let mut line_open = false;
    let started = std::time::Instant::now();
    let mut on_event = |ev: PredictEvent| match ev {
        PredictEvent::Note(line) => say(&format!("termtune: {line}")),
        PredictEvent::Started { total, batch_size } => say(&format!(
            "termtune: predicting {total} examples in batches of {batch_size}"
        )),
        PredictEvent::Progress {
            done,
            total,
            tokens,
        } => {
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            #[allow(clippy::cast_precision_loss)]
            let text = format!(
                "{done}/{total} examples | {tokens} tokens | {:.1} tokens/s",
                tokens as f64 / secs
            );
            if tty {
                #[allow(clippy::cast_precision_loss)]
                let frac = done as f64 / total.max(1) as f64;
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let filled = ((frac * 20.0).round() as usize).min(20);
                let bar = "#".repeat(filled) + &"-".repeat(20 - filled);
                let mut e = std::io::stderr();
                let _ = write!(e, "\r\x1b[2K[{bar}] {text}");
                let _ = e.flush();
                line_open = true;
            } else {
                say(&text);
            }
        }
    };
    let result = run(preset, &device, Some(&cancel), &mut on_event);
    if line_open {
        say("");
    }
    let outcome = match result {
        Ok(o) => o,
        Err(e @ crate::predict::PredictError::Cancelled { .. }) => {
            say(&format!("termtune: {e}"));
            return ExitCode::from(EXIT_INTERRUPTED);
        }
        Err(e) => {
            say(&format!("termtune: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if outcome.skipped > 0 {
        say(&format!(
            "termtune: warning: {} row(s) skipped; first: {}",
            outcome.skipped,
            outcome.first_skip.as_deref().unwrap_or("?")
        ));
    }
    let dir = std::path::Path::new(&preset.output_dir);
    match outcome.write(dir) {
        Ok(files) => {
            print!("{}", outcome.summary());
            for f in files {
                say(&format!("termtune: wrote {}", f.display()));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("termtune: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// SIGINT/SIGTERM count as interrupts; SIGHUP (the SSH connection dropped) is only logged, so
/// training goes on writing its log and checkpoints.
fn install_signal_handlers(interrupts: &Arc<AtomicUsize>) {
    let counter = Arc::clone(interrupts);
    on_stop_signals(
        "SIGHUP (terminal closed): training continues; follow it in trainer_log.jsonl",
        move || {
            counter.fetch_add(1, Ordering::SeqCst);
            true
        },
    );
}

/// A thread that calls `on_stop` for each SIGINT or SIGTERM (until it returns false) and only logs
/// `hup_note` for SIGHUP: a run goes on when its terminal goes away. Used by foreground and detached runs.
pub(crate) fn on_stop_signals(
    hup_note: &'static str,
    mut on_stop: impl FnMut() -> bool + Send + 'static,
) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        tracing::warn!("cannot install signal handlers; Ctrl-C will stop the process at once");
        return;
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    tracing::warn!("{hup_note}");
                } else if !on_stop() {
                    break;
                }
            }
        });
}

/// Prints training events for a person: a progress line on a terminal (`tty`), plain lines
/// otherwise (also used by the detached run for its log and by `termtune attach`).
pub(crate) struct Printer {
    tty: bool,
    line_open: bool,
}

impl Printer {
    pub(crate) fn new(tty: bool) -> Self {
        Self {
            tty,
            line_open: false,
        }
    }

    pub(crate) fn end_line(&mut self) {
        if self.line_open {
            say("");
            self.line_open = false;
        }
    }

    pub(crate) fn event(&mut self, ev: &TrainEvent) {
        match ev {
            TrainEvent::StepFinished(m) => self.step(m),
            other => {
                self.end_line();
                if let Some(line) = describe(other) {
                    say(&line);
                }
            }
        }
    }

    fn step(&mut self, m: &StepMetrics) {
        let text = format!(
            "step {}/{} | loss {:.4} | lr {:.2e} | grad {:.3} | {:.0} tok/s | epoch {:.2} | {} < {}",
            m.step,
            m.total_steps,
            m.loss,
            m.lr,
            m.grad_norm,
            m.tokens_per_sec,
            m.epoch,
            format_duration(m.elapsed.as_secs_f64()),
            format_duration(m.eta.as_secs_f64()),
        );
        if self.tty {
            #[allow(clippy::cast_precision_loss)]
            let frac = m.step as f64 / m.total_steps.max(1) as f64;
            let width = 20usize;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let filled = ((frac * width as f64).round() as usize).min(width);
            let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[2K[{bar}] {text}");
            let _ = e.flush();
            self.line_open = true;
        } else {
            say(&text);
        }
    }
}

/// The line printed for a non-step event.
fn describe(ev: &TrainEvent) -> Option<String> {
    Some(match ev {
        TrainEvent::Loading { what } => format!("termtune: {what}"),
        TrainEvent::Warning(w) => format!("termtune: warning: {w}"),
        TrainEvent::Note(n) => format!("termtune: {n}"),
        TrainEvent::Resuming {
            checkpoint,
            step,
            why,
        } => format!(
            "termtune: resuming from {} (step {step}): {why}",
            checkpoint.display()
        ),
        TrainEvent::Started {
            total_steps,
            examples,
            eval_examples,
            trainable_params,
            total_params,
            start_step,
            device,
        } => {
            #[allow(clippy::cast_precision_loss)]
            let pct = *trainable_params as f64 / (*total_params).max(1) as f64 * 100.0;
            format!(
                "termtune: training {total_steps} steps on {examples} examples ({eval_examples} for evaluation) on {device}; trainable params {trainable_params} of {total_params} ({pct:.3}%){}",
                if *start_step > 0 {
                    format!("; starting at step {start_step}")
                } else {
                    String::new()
                }
            )
        }
        TrainEvent::StepFinished(_) => return None,
        TrainEvent::EvalFinished { step, eval_loss } => {
            format!("termtune: eval at step {step}: eval_loss {eval_loss:.4}")
        }
        TrainEvent::CheckpointSaved { step, dir } => {
            format!(
                "termtune: checkpoint for step {step} saved to {}",
                dir.display()
            )
        }
        TrainEvent::Paused => "termtune: paused".into(),
        TrainEvent::Resumed => "termtune: resumed".into(),
        TrainEvent::Finished(s) => format!(
            "termtune: done: {} steps in {}, {:.1} tokens/s; final loss {}{}; output in {}",
            s.steps,
            format_duration(s.elapsed.as_secs_f64()),
            s.tokens_per_sec,
            s.final_loss
                .map_or_else(|| "n/a".into(), |l| format!("{l:.4}")),
            s.eval_loss
                .map_or_else(String::new, |l| format!(", eval loss {l:.4}")),
            s.output_dir.display()
        ),
        TrainEvent::Failed(msg) => format!("termtune: training failed: {msg}"),
    })
}
