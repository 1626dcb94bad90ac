//! termtune's own model and generation on the real SmolLM2-135M-Instruct GGUF, against independent
//! implementations: dequantized (`gguf_dequantize: true`) against transformers
//! (tests/fixtures/smollm2_greedy_reference.json, made by `scripts/smollm2_reference.py` with transformers 5.24 +
//! torch 2.15 loading the same GGUF dequantized to float32), and kept quantized (the default) against llama.cpp
//! (tests/fixtures/smollm2_llamacpp_greedy.json, `scripts/smollm2_llamacpp_reference.py`).

use std::process::Command;

use candle_core::Device;
use termtune::chat::ChatSession;
use termtune::config::{self, Purpose};

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smollm2_greedy_reference.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

#[test]
fn greedy_answer_matches_transformers_token_for_token() {
    let r = reference();
    let gguf = termtune::testing::smollm2_gguf();
    let system = r["messages"][0]["content"].as_str().unwrap();
    let user = r["messages"][1]["content"].as_str().unwrap();
    let text = format!(
        "model_name_or_path: {}\ngguf_dequantize: true\ndefault_system: {:?}\ndo_sample: false\nmax_new_tokens: 24\n",
        gguf.display(),
        system
    );
    let loaded = config::parse(&text, &[], Purpose::Chat).unwrap();
    let mut session = ChatSession::load(&loaded.preset, &Device::Cpu, &mut |_| {}).unwrap();
    // Same prompt text and ids as the reference (the tokenizer's own chat template).
    assert_eq!(
        session.rendered_prompt(user).unwrap(),
        r["prompt_text"].as_str().unwrap()
    );
    let answer = session
        .answer(user, None, |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    let expected = ids(&r, "continuation_until_eos_ids");
    // The answer stops at eos (id 2), which is not part of the returned tokens.
    assert_eq!(
        answer.tokens,
        expected[..expected.len() - 1],
        "{}",
        answer.text
    );
    assert_eq!(answer.text, r["answer_text"].as_str().unwrap());
}

fn llama_cpp_reference() -> serde_json::Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smollm2_llamacpp_greedy.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The file kept quantized (the default for a named GGUF) answers as llama.cpp does on it, token for token:
/// tests/fixtures/smollm2_llamacpp_greedy.json, made by `scripts/smollm2_llamacpp_reference.py` with
/// llama-cpp-python. Both round the activations to 8 bits for each quantized product; the dequantized model's
/// answer (transformers', above) is a different one.
#[test]
fn kept_quantized_greedy_answer_matches_llama_cpp_token_for_token() {
    let r = llama_cpp_reference();
    let gguf = termtune::testing::smollm2_gguf();
    let text = format!(
        "model_name_or_path: {}\ndefault_system: {:?}\ndo_sample: false\nmax_new_tokens: 24\n",
        gguf.display(),
        r["system"].as_str().unwrap()
    );
    let loaded = config::parse(&text, &[], Purpose::Chat).unwrap();
    let mut session = ChatSession::load(&loaded.preset, &Device::Cpu, &mut |_| {}).unwrap();
    assert!(session.info.quantized_base);
    assert!(
        session
            .info
            .to_string()
            .contains("GGUF, weights kept quantized"),
        "{}",
        session.info
    );
    let user = r["user"].as_str().unwrap();
    assert_eq!(
        session.rendered_prompt(user).unwrap(),
        r["prompt"].as_str().unwrap()
    );
    let answer = session
        .answer(user, None, |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(answer.tokens, ids(&r, "greedy_ids"), "{}", answer.text);
    assert_eq!(answer.text, r["greedy_text"].as_str().unwrap());
}

/// SmolLM2 (dequantized: dense f32 weights, transformers' numbers): the next turn's logits after a KV cache that
/// holds the first turn's prompt (read as a prompt) and answer (read a token at a time, as decoding reads it, in
/// the session's own answer) equal those of the whole second prompt read afresh, up to the order of float
/// additions. (Kept quantized, the activations' 8-bit rounding per product makes the two reads differ more: 0.65–
/// 0.84 of a largest logit of 26.7 on the Q4_1 file; llama.cpp's incremental read of the same tokens differs from
/// its fresh read by 0.51 of 26.8.)
#[test]
fn a_kept_kv_cache_gives_the_logits_of_a_fresh_read() {
    use termtune::engine::{KvCache, Model};
    let r = llama_cpp_reference();
    let gguf = termtune::testing::smollm2_gguf();
    let text = format!(
        "model_name_or_path: {}\ngguf_dequantize: true\ndo_sample: false\nmax_new_tokens: 24\n",
        gguf.display()
    );
    let loaded = config::parse(&text, &[], Purpose::Chat).unwrap();
    let mut session = ChatSession::load(&loaded.preset, &Device::Cpu, &mut |_| {}).unwrap();
    assert!(!session.info.quantized_base);
    let user = r["user"].as_str().unwrap();
    let first = session.rendered_prompt(user).unwrap();
    let answer = session
        .answer(user, None, |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    let second = session.rendered_prompt("Tell me more.").unwrap();
    let ids = |t: &str| {
        session
            .encoder
            .tokenizer
            .encode(t, false)
            .unwrap()
            .get_ids()
            .to_vec()
    };
    let (first, second) = (ids(&first), ids(&second));
    assert!(second.starts_with(&first));
    let m = &session.model;
    let logits = |cache: &mut KvCache, ids: &[u32]| {
        let x = candle_core::Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        Model::last_logits(&m.forward_cached(&x, cache, true).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let fresh = logits(&mut KvCache::new(m.layers.len()), &second);
    let mut cache = KvCache::new(m.layers.len());
    logits(&mut cache, &first);
    // The answer's tokens as decoding read them, as far as the second prompt repeats them, then its rest.
    let shared = second
        .iter()
        .zip(first.iter().chain(&answer.tokens))
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > first.len() + answer.tokens.len() / 2, "{shared}");
    for &id in &second[first.len()..shared] {
        logits(&mut cache, &[id]);
    }
    let kept = logits(&mut cache, &second[shared..]);
    let top = fresh.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = fresh
        .iter()
        .zip(&kept)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("max |Δ| {diff} against a largest logit of {top}");
    assert!(
        diff < 1e-5 * top,
        "max |Δ| {diff} against a largest logit of {top}"
    );
    // The session's second turn (its cache kept from the first) answers as a fresh read of the prompt does.
    let mut turns = session.history.clone();
    turns.push(termtune::data::Message::new(
        termtune::data::Role::User,
        "Tell me more.",
    ));
    let prompt = session.prompt(session.system.as_deref(), &turns).unwrap();
    assert_eq!(prompt.ids, second);
    let (fresh_answer, _, _) = termtune::engine::generate::generate_timed(
        m,
        &second,
        &session.params,
        &prompt.stop_ids,
        None,
        |_| std::ops::ControlFlow::Continue(()),
    )
    .unwrap();
    let (turn, _) = session
        .answer_counted("Tell me more.", None, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(turn.timing.cached_tokens, shared);
    assert_eq!(turn.tokens, fresh_answer);
}

#[test]
fn chat_prompt_prints_only_the_answer_on_stdout() {
    let r = llama_cpp_reference();
    let gguf = termtune::testing::smollm2_gguf();
    let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
        .args(["chat", "--model"])
        .arg(&gguf)
        .args([
            "--system",
            r["system"].as_str().unwrap(),
            "--prompt",
            r["user"].as_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The file kept quantized: llama.cpp's answer.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", r["greedy_text"].as_str().unwrap())
    );
    // What is loaded is said on stderr, never mixed into the answer.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("adapter: none (base model)"), "{stderr}");
    assert!(stderr.contains("GGUF, weights kept quantized"), "{stderr}");
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let gguf = termtune::testing::smollm2_gguf();
    let run = |seed: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_termtune"))
            .args(["chat", "--model"])
            .arg(&gguf)
            .args([
                "--prompt",
                "Write one sentence about the sea.",
                "--temperature",
                "0.9",
            ])
            .args(["--top-p", "0.9", "--max-new-tokens", "20", "--seed", seed])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let a = run("7");
    assert!(!a.trim().is_empty());
    assert_eq!(a, run("7"));
}

/// The same greedy answer on CUDA in float32: token for token the transformers reference and the CPU's answer.
/// Runs when a CUDA device is present (and the SmolLM2 GGUF can be had); otherwise "no CUDA device: skipped".
#[test]
fn cuda_greedy_answer_matches_transformers_and_the_cpu() {
    if termtune::engine::device::cuda_device_count() == 0 {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let dev = termtune::engine::device::select(termtune::engine::device::DeviceSpec::Cuda(0))
        .expect("a visible CUDA device starts");
    let r = reference();
    let gguf = termtune::testing::smollm2_gguf();
    let system = r["messages"][0]["content"].as_str().unwrap();
    let user = r["messages"][1]["content"].as_str().unwrap();
    let text = format!(
        "model_name_or_path: {}\ngguf_dequantize: true\ndefault_system: {:?}\ndo_sample: false\nmax_new_tokens: 24\ninfer_dtype: float32\n",
        gguf.display(),
        system
    );
    let loaded = config::parse(&text, &[], Purpose::Chat).unwrap();
    let answer_on = |device: &Device| {
        let mut session = ChatSession::load(&loaded.preset, device, &mut |_| {}).unwrap();
        session
            .answer(user, None, |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
    };
    let gpu = answer_on(&dev);
    let cpu = answer_on(&Device::Cpu);
    let expected = ids(&r, "continuation_until_eos_ids");
    assert_eq!(gpu.tokens, expected[..expected.len() - 1], "{}", gpu.text);
    assert_eq!(gpu.tokens, cpu.tokens);
    assert_eq!(gpu.text, r["answer_text"].as_str().unwrap());
    eprintln!(
        "CUDA f32 greedy answer = transformers = CPU: {:?}",
        gpu.text
    );
}
