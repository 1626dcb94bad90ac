//! Throughput benchmark (not a timed test; `#[ignore]`d): tokenise a generated 100 000-row alpaca file
//! with SmolLM2's vocabulary and merges (from the GGUF metadata) under the `smollm2` template, then
//! reload it from the cache. Run with
//! `cargo test --test integration data_bench -- --ignored --nocapture`.

use crate::data_util;

use std::io::Write;
use std::time::Instant;

use serde_json::json;
use termtune::data::{Encoder, prepare_dataset};

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
    let tok = data_util::smollm2_tokenizer();
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
