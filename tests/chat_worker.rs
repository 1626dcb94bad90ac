//! The chat worker thread on the tiny seeded model: load the base, stream an answer, switch to a
//! trained adapter (its B ≠ 0) and get a different greedy answer, compare two slots, regenerate,
//! clear, stop, and a bad adapter folder reported as an event (never a panic).

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::tiny_util::*;
use candle_core::Device;
use termtune::chat::targets::{ChatTarget, list_targets};
use termtune::chat::worker::{AnswerStats, ChatCommand, ChatEvent, ChatHandle, LoadedTarget};
use termtune::config::{self, Preset, Purpose};
use termtune::engine::generate::{GenerationParams, StopReason};
use termtune::trainer::run::{Outcome, run_training};

const WAIT: Duration = Duration::from_secs(120);

/// The tiny model and a toy dataset whose answers are all "ok the cat and the hat".
fn fixture(root: &Path) {
    tiny_model_and_toy_data(root, &same_answer_rows(4, "ok the cat and the hat"));
}

/// The training preset of a rank-4 LoRA on the fixture, into `root/out`.
fn train_preset(root: &Path, out: &str, max_steps: u64, save_steps: u64) -> config::Loaded {
    let text = format!(
        "model_name_or_path: {m}\ndataset: toy\ndataset_dir: {d}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {o}\nlogging_steps: 1\nsave_steps: {save_steps}\nper_device_train_batch_size: 2\n\
         learning_rate: 2.0e-2\nlora_rank: 4\nlr_scheduler_type: constant\nmax_steps: {max_steps}\nseed: 3\n\
         tokenized_path: {t}\n",
        m = root.join("model").display(),
        d = root.join("data").display(),
        o = root.join(out).display(),
        t = root.join("tok").display(),
    );
    config::parse(&text, &[], Purpose::Train).unwrap()
}

/// The greedy chat preset on the fixture's model.
fn chat_preset(root: &Path) -> Preset {
    let chat = format!(
        "model_name_or_path: {}\ntemplate: chatml\ndo_sample: false\nmax_new_tokens: 12\n",
        root.join("model").display()
    );
    config::parse(&chat, &[], Purpose::Chat).unwrap().preset
}

/// Trains 7 steps (checkpoints at 3 and 6, final at 7); returns the chat preset (greedy) and the
/// run folder.
fn trained(root: &Path) -> (Preset, std::path::PathBuf) {
    fixture(root);
    let loaded = train_preset(root, "run", 7, 3);
    let (_tx, rx) = mpsc::channel();
    let outcome = run_training(&loaded, &Device::Cpu, &rx, &mut |_| {}).unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)));
    (chat_preset(root), root.join("run"))
}

struct Worker {
    handle: ChatHandle,
    events: mpsc::Receiver<ChatEvent>,
}

impl Worker {
    fn start() -> Self {
        Self::start_on(Device::Cpu)
    }

    fn start_on(device: Device) -> Self {
        let (tx, rx) = mpsc::channel();
        let handle = ChatHandle::spawn(device, move |ev| tx.send(ev).is_ok()).unwrap();
        Self { handle, events: rx }
    }

    fn next(&self) -> ChatEvent {
        self.events
            .recv_timeout(WAIT)
            .expect("the worker went quiet")
    }

    fn load(
        &self,
        slot: usize,
        preset: &Preset,
        target: ChatTarget,
    ) -> Result<LoadedTarget, String> {
        self.handle.send(ChatCommand::Load {
            slot,
            preset: Box::new(preset.clone()),
            target,
        });
        loop {
            match self.next() {
                ChatEvent::Loading { .. } => {}
                ChatEvent::Loaded { slot: s, info } if s == slot => return Ok(info),
                ChatEvent::Failed { slot: s, message } if s == slot => return Err(message),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Streamed text and final numbers of the next answer of `slot`.
    fn answer(&self, slot: usize) -> (String, AnswerStats) {
        let mut text = String::new();
        loop {
            match self.next() {
                ChatEvent::Token { slot: s, text: t } if s == slot => text.push_str(&t),
                ChatEvent::Done { slot: s, stats } if s == slot => return (text, stats),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn send(&self, slot: usize, user: &str, params: &GenerationParams) -> (String, AnswerStats) {
        self.handle.send(ChatCommand::Send {
            slot,
            user: user.into(),
            system: None,
            params: params.clone(),
        });
        self.answer(slot)
    }
}

#[test]
fn the_worker_streams_switches_to_an_adapter_compares_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (preset, out) = trained(dir.path());
    let params = termtune::resolve::generation_params(&preset);
    assert_eq!(params.temperature, 0.0, "greedy");
    let w = Worker::start();

    // Base model: the header says no adapter; tokens stream, then Done with the counts.
    let info = w.load(0, &preset, ChatTarget::Base).unwrap();
    assert!(info.adapter.is_none());
    assert_eq!(info.template, "chatml");
    let (base, stats) = w.send(0, "say 1", &params);
    assert!(stats.tokens > 0 && stats.prompt_tokens > 0, "{stats:?}");
    assert!(!base.is_empty());

    // The picker's list: base, final adapter, checkpoints newest first (the last step is checkpointed too, as
    // the HF Trainer does).
    let targets = list_targets(&out);
    let labels: Vec<&str> = targets.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(targets.len(), 5, "{labels:?}");
    assert!(
        labels[2].starts_with("checkpoint-7")
            && labels[3].starts_with("checkpoint-6")
            && labels[4].starts_with("checkpoint-3"),
        "{labels:?}"
    );

    // Switch the same slot to the final adapter, without restarting anything.
    let info = w
        .load(0, &preset, ChatTarget::Adapter(out.clone()))
        .unwrap();
    let a = info.adapter.unwrap();
    assert_eq!((a.r, a.alpha, a.step), (4, 8.0, Some(7)), "{a:?}");
    let (tuned, _) = w.send(0, "say 1", &params);
    assert_ne!(
        base, tuned,
        "a trained adapter (B ≠ 0) changes the greedy answer"
    );

    // Regenerate drops the answer and asks again: greedy, so the same text.
    w.handle.send(ChatCommand::Regenerate {
        slot: 0,
        system: None,
        params: params.clone(),
    });
    assert_eq!(w.answer(0).0, tuned);

    // Compare: slot 1 on the base model; after Clear both answer the first question afresh.
    w.load(1, &preset, ChatTarget::Base).unwrap();
    w.handle.send(ChatCommand::Clear);
    assert_eq!(w.send(0, "say 1", &params).0, tuned);
    assert_eq!(w.send(1, "say 1", &params).0, base);

    // A checkpoint's step comes from its trainer_state.json.
    let info = w
        .load(1, &preset, ChatTarget::Adapter(out.join("checkpoint-3")))
        .unwrap();
    assert_eq!(info.adapter.unwrap().step, Some(3));

    // Stop cancels the answer in progress and the one queued behind it.
    let long = GenerationParams {
        max_new_tokens: 5000,
        ..params.clone()
    };
    for slot in [0, 1] {
        w.handle.send(ChatCommand::Send {
            slot,
            user: "say 2".into(),
            system: None,
            params: long.clone(),
        });
    }
    w.handle.send(ChatCommand::Stop);
    for slot in [0, 1] {
        let (_, stats) = w.answer(slot);
        assert_eq!(stats.stop, StopReason::Cancelled, "slot {slot}: {stats:?}");
        assert!(stats.tokens < 5000);
    }

    // A bad folder is an event naming the problem; the slot is then empty.
    let err = w
        .load(1, &preset, ChatTarget::Adapter(dir.path().join("nope")))
        .unwrap_err();
    assert!(err.contains("no such folder"), "{err}");
    let err = w.load(1, &preset, ChatTarget::Adapter(dir.path().join("data")));
    assert!(err.unwrap_err().contains("adapter_config.json"));
    w.handle.send(ChatCommand::RenderPrompt {
        slot: 1,
        user: "hi".into(),
        system: None,
    });
    assert!(matches!(w.next(), ChatEvent::Failed { slot: 1, .. }));

    // The exact prompt of slot 0 (chatml, with the system prompt given).
    w.handle.send(ChatCommand::RenderPrompt {
        slot: 0,
        user: "hi".into(),
        system: Some("be brief".into()),
    });
    match w.next() {
        ChatEvent::Prompt { slot: 0, text } => {
            assert!(
                text.starts_with("<|im_start|>system\nbe brief<|im_end|>\n"),
                "{text}"
            );
            assert!(
                text.ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
                "{text}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    w.handle.shutdown();
}

#[test]
fn chatting_with_the_latest_checkpoint_during_a_run_leaves_the_run_unchanged() {
    chat_during_a_run(|| Device::Cpu);
}

/// The same on one GPU: the run and the chat each hold their own CUDA handle on the same device.
#[test]
fn cuda_chat_during_a_run_on_the_same_gpu_leaves_the_run_unchanged() {
    if termtune::engine::device::cuda_device_count() == 0 {
        eprintln!("no CUDA device: skipped");
        return;
    }
    chat_during_a_run(|| {
        termtune::engine::device::select(termtune::engine::device::DeviceSpec::Cuda(0)).unwrap()
    });
}

fn chat_during_a_run(device: impl Fn() -> Device + Send + Sync + Copy + 'static) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fixture(root);
    let (_tx, rx) = mpsc::channel();
    let alone = train_preset(root, "alone", 40, 4);
    run_training(&alone, &device(), &rx, &mut |_| {}).unwrap();

    // The same run again, on its own thread, while the chat loads its newest complete checkpoint
    // from disk and answers, over and over, until the run ends.
    let shared = train_preset(root, "shared", 40, 4);
    let trainer = std::thread::spawn(move || {
        let (_tx, rx) = mpsc::channel();
        run_training(&shared, &device(), &rx, &mut |_| {}).unwrap()
    });
    let preset = chat_preset(root);
    let params = termtune::resolve::generation_params(&preset);
    let w = Worker::start_on(device());
    let mut chats_during_run = 0;
    let mut last_step = None;
    while !trainer.is_finished() {
        let newest = list_targets(&root.join("shared"))
            .into_iter()
            .find(|t| t.label.starts_with("checkpoint-"));
        if let Some(t) = newest {
            let info = w.load(0, &preset, t.target).unwrap();
            last_step = info.adapter.and_then(|a| a.step);
            let (_, stats) = w.send(0, "say 1", &params);
            assert!(stats.tokens > 0);
            if !trainer.is_finished() {
                chats_during_run += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(trainer.join().unwrap(), Outcome::Finished(_)));
    assert!(
        chats_during_run > 0 && last_step.is_some(),
        "the chat never overlapped the run"
    );
    eprintln!(
        "{chats_during_run} answers from checkpoints during the run (last at step {last_step:?})"
    );
    // Bit-identical final adapters and logs: the chat never touched the trainer's state.
    let read = |out: &str| std::fs::read(root.join(out).join("adapter_model.safetensors")).unwrap();
    assert!(read("alone") == read("shared"), "final adapters differ");
    let losses = |out: &str| -> Vec<f64> {
        termtune::trainer::runlog::read_log(&root.join(out))
            .unwrap()
            .iter()
            .map(|l| l.loss.unwrap())
            .collect()
    };
    assert_eq!(losses("alone"), losses("shared"));
}
