//! GGUF tokenizers of every supported family against independent implementations, on small vocabularies trained
//! by scripts/tokenizer_families_reference.py (byte-level BPE: llama.cpp per `tokenizer.ggml.pre`; SentencePiece
//! BPE with byte fallback: sentencepiece itself). Fixtures: tests/fixtures/toy_{bpe,spm}.gguf and
//! toy_tokenizer_reference.json.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::Value as Json;
use termtune::engine::tokenizer::from_gguf_metadata;

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn metadata(name: &str) -> HashMap<String, Value> {
    let mut f = std::fs::File::open(fixture_path(name)).unwrap();
    Content::read(&mut f).unwrap().metadata
}

fn reference() -> Json {
    serde_json::from_str(
        &std::fs::read_to_string(fixture_path("toy_tokenizer_reference.json")).unwrap(),
    )
    .unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn byte_level_families_match_llama_cpp() {
    let r = reference();
    let corpus: Vec<&str> = r["corpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut failures = Vec::new();
    for (pre, want_all) in r["bpe"].as_object().unwrap() {
        let mut md = metadata("toy_bpe.gguf");
        md.insert("tokenizer.ggml.pre".into(), Value::String(pre.clone()));
        let tok = from_gguf_metadata(&md).unwrap().tokenizer;
        assert_eq!(corpus.len(), want_all.as_array().unwrap().len(), "{pre}");
        for (text, want) in corpus.iter().zip(want_all.as_array().unwrap()) {
            let got = tok.encode(*text, true).unwrap().get_ids().to_vec();
            if got != ids(want) {
                failures.push(format!(
                    "{pre} {text:?}\n  termtune  {got:?}\n  llama.cpp {:?}",
                    ids(want)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn families_differ_where_their_regexes_differ() {
    // Guards the test above against a builder that ignores `pre`: on the digits line the four families give
    // four different answers in llama.cpp.
    let r = reference();
    let line: Vec<Vec<u32>> = ["gpt-2", "smollm", "llama-bpe", "qwen2"]
        .iter()
        .map(|p| ids(&r["bpe"][p][4]))
        .collect();
    assert_ne!(line[0], line[1]);
    assert_ne!(line[1], line[2]);
    assert_ne!(line[0], line[2]);
}

#[test]
fn sentencepiece_bpe_matches_sentencepiece() {
    let r = reference();
    let md = metadata("toy_spm.gguf");
    let tok = from_gguf_metadata(&md).unwrap().tokenizer;
    let spm = &r["spm"];
    let mut failures = Vec::new();
    let n = spm["texts"].as_array().unwrap().len();
    assert_eq!(spm["sentencepiece"].as_array().unwrap().len(), n);
    assert_eq!(spm["llama_cpp"].as_array().unwrap().len(), n);
    for ((text, want), lc) in spm["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(spm["sentencepiece"].as_array().unwrap())
        .zip(spm["llama_cpp"].as_array().unwrap())
    {
        let text = text.as_str().unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        if got != ids(want) {
            failures.push(format!(
                "{text:?}\n  termtune      {got:?}\n  sentencepiece {:?}\n  llama.cpp     {:?}",
                ids(want),
                ids(lc)
            ));
        }
        // bos is added by default for SentencePiece GGUFs (tokenizer.ggml.add_bos_token = true in the fixture).
        let with_bos = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(with_bos.first(), Some(&1));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
