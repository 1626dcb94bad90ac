//! Throughput benchmark (not a timed test; `#[ignore]`d): tokenise a generated 100 000-row alpaca file
//! with SmolLM2's vocabulary and merges (from the GGUF metadata) under the `smollm2` template, then
//! reload it from the cache. Run with
//! `cargo test --test data_bench -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

#[path = "data_util/mod.rs"]
mod data_util;

use std::io::Write;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use termtune::data::{Encoder, prepare_dataset};
use tokenizers::Tokenizer;

/// SmolLM2's BPE tokenizer rebuilt from GGUF metadata (tokens, merges, control tokens), with the
/// `smollm` pre-tokenizer (individual digits + byte-level). Good enough for a throughput number.
fn smollm2_tokenizer() -> Tokenizer {
    let mut f = std::fs::File::open(data_util::smollm2_gguf()).unwrap();
    let c = Content::read(&mut f).unwrap();
    let arr = |k: &str| match &c.metadata[k] {
        Value::Array(a) => a.clone(),
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

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn tokenise_100k_alpaca_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 100 000 rows drawn from alpaca_en_demo (cycled, with the row number appended so rows differ).
    let demo: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(data_util::lf_data_dir().join("alpaca_en_demo.json")).unwrap(),
    )
    .unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("big.jsonl")).unwrap());
    for i in 0..100_000 {
        let mut row = demo[i % demo.len()].clone();
        row["instruction"] = json!(format!("{} (#{i})", row["instruction"].as_str().unwrap()));
        writeln!(f, "{row}").unwrap();
    }
    f.flush().unwrap();
    drop(f);
    std::fs::write(
        dir.join("dataset_info.json"),
        r#"{"big": {"file_name": "big.jsonl"}}"#,
    )
    .unwrap();
    let mut opts = data_util::options(dir, &["big"], Some("smollm2"), &dir.join("cache"));
    opts.cutoff_len = 1024;
    let tok = smollm2_tokenizer();
    let enc = Encoder::new(
        &opts,
        &tok,
        &data_util::config(Some("<|im_start|>"), "<|im_end|>", Some("x")),
    )
    .unwrap();

    let t0 = Instant::now();
    let p = prepare_dataset(&opts, &enc).unwrap();
    let cold = t0.elapsed().as_secs_f64();
    assert!(!p.from_cache);
    let tokens = p.stats.tokens_per_epoch;
    let t1 = Instant::now();
    let again = prepare_dataset(&opts, &enc).unwrap();
    let warm = t1.elapsed().as_secs_f64();
    assert!(again.from_cache);
    println!(
        "100000 alpaca rows, {} threads: cold {cold:.2} s ({:.0} rows/s, {:.0} tokens/s, {tokens} tokens, mean {:.1}/example); cached {warm:.2} s",
        rayon::current_num_threads(),
        100_000.0 / cold,
        tokens as f64 / cold,
        p.stats.tokens_mean
    );
}
