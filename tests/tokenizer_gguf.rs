//! Tokenizers built from toy GGUF metadata: one per `tokenizer.ggml.pre` family, special tokens, bos handling,
//! refusals, and loading the same tokenizer back from a folder.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use termtune::engine::tokenizer::{
    TokenizerError, from_folder, from_gguf_metadata, tokenizer_json_from_gguf,
};

const TOKENS: &[&str] = &[
    "<|endoftext|>",
    "a",
    "b",
    "\u{120}",
    "ab",
    "1",
    "2",
    "12",
    "\u{120}ab",
    "<|im_start|>",
];

fn s(x: &str) -> Value {
    Value::String(x.to_string())
}

fn bpe_meta(pre: Option<&str>) -> HashMap<String, Value> {
    let mut md = HashMap::new();
    md.insert("general.architecture".into(), s("llama"));
    md.insert("tokenizer.ggml.model".into(), s("gpt2"));
    if let Some(p) = pre {
        md.insert("tokenizer.ggml.pre".into(), s(p));
    }
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(TOKENS.iter().map(|t| s(t)).collect()),
    );
    let mut types = vec![Value::I32(1); TOKENS.len()];
    types[0] = Value::I32(3);
    types[9] = Value::I32(3);
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(vec![s("a b"), s("\u{120} ab"), s("1 2")]),
    );
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(9));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
    md.insert(
        "tokenizer.chat_template".into(),
        s("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    );
    md.insert("llama.context_length".into(), Value::U32(64));
    md
}

fn ids(md: &HashMap<String, Value>, text: &str) -> Vec<u32> {
    let t = from_gguf_metadata(md).unwrap().tokenizer;
    t.encode(text, true).unwrap().get_ids().to_vec()
}

#[test]
fn pre_tokenizer_families_split_digits_like_their_originals() {
    // Expected ids worked out by hand from each family's regex (llama.cpp llama-vocab.cpp):
    // smollm/starcoder: every digit alone, then GPT-2 → "ab", " ab", " ", "1", "2".
    assert_eq!(ids(&bpe_meta(Some("smollm")), "ab ab 12"), [4, 8, 3, 5, 6]);
    // qwen2: \p{N} single digits, space kept alone before the digits.
    assert_eq!(ids(&bpe_meta(Some("qwen2")), "ab ab 12"), [4, 8, 3, 5, 6]);
    // llama3: digits in groups of up to 3 → "12" whole; the space before it stands alone.
    assert_eq!(ids(&bpe_meta(Some("llama-bpe")), "ab ab 12"), [4, 8, 3, 7]);
    // gpt-2: " 12" is one pre-token; "Ġ12" is not in the vocab, so BPE gives Ġ + 12.
    assert_eq!(ids(&bpe_meta(Some("gpt-2")), "ab ab 12"), [4, 8, 3, 7]);
    // smollm keeps "123"-style runs apart, gpt-2 merges what it can.
    assert_eq!(ids(&bpe_meta(Some("smollm")), "12"), [5, 6]);
    assert_eq!(ids(&bpe_meta(Some("gpt-2")), "12"), [7]);
}

#[test]
fn control_tokens_are_special_and_bos_follows_metadata() {
    let md = bpe_meta(Some("smollm"));
    assert_eq!(ids(&md, "<|im_start|>ab<|endoftext|>"), [9, 4, 0]);
    let t = from_gguf_metadata(&md).unwrap().tokenizer;
    assert_eq!(t.decode(&[9, 4, 0], true).unwrap(), "ab");
    assert_eq!(
        t.decode(&[9, 4, 0], false).unwrap(),
        "<|im_start|>ab<|endoftext|>"
    );

    let mut md = bpe_meta(Some("smollm"));
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
    assert_eq!(ids(&md, "ab"), [9, 4]);
    let t = from_gguf_metadata(&md).unwrap().tokenizer;
    assert_eq!(t.encode("ab", false).unwrap().get_ids(), [4]);
}

#[test]
fn tokenizer_config_carries_template_and_token_strings() {
    let tc = from_gguf_metadata(&bpe_meta(Some("smollm")))
        .unwrap()
        .tokenizer_config;
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|endoftext|>");
    assert_eq!(tc["pad_token"], serde_json::Value::Null);
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["model_max_length"], 64);
    assert!(tc["chat_template"].as_str().unwrap().contains("messages"));
}

#[test]
fn unknown_or_missing_pre_is_refused() {
    let err = from_gguf_metadata(&bpe_meta(Some("falcon"))).err().unwrap();
    assert!(matches!(err, TokenizerError::UnsupportedPre { .. }));
    let msg = err.to_string();
    assert!(msg.contains("`falcon`") && msg.contains("refusing") && msg.contains("smollm"));
    let err = from_gguf_metadata(&bpe_meta(None)).err().unwrap();
    assert!(matches!(err, TokenizerError::MissingPre), "{err}");
}

#[test]
fn malformed_metadata_names_the_key() {
    let mut md = bpe_meta(Some("smollm"));
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(99));
    let msg = from_gguf_metadata(&md).err().unwrap().to_string();
    assert!(
        msg.contains("tokenizer.ggml.bos_token_id") && msg.contains("99"),
        "{msg}"
    );

    let mut md = bpe_meta(Some("smollm"));
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1)]),
    );
    let msg = from_gguf_metadata(&md).err().unwrap().to_string();
    assert!(msg.contains("token_type"), "{msg}");

    let mut md = bpe_meta(Some("smollm"));
    md.insert("tokenizer.ggml.model".into(), s("bert"));
    let msg = from_gguf_metadata(&md).err().unwrap().to_string();
    assert!(
        msg.contains("`bert`") && msg.contains("gpt2, llama"),
        "{msg}"
    );

    let mut md = bpe_meta(Some("smollm"));
    md.remove("tokenizer.ggml.tokens");
    let msg = from_gguf_metadata(&md).err().unwrap().to_string();
    assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");
}

/// A SentencePiece (`tokenizer.ggml.model = llama`) vocabulary: merges are recovered from the scores.
fn spm_meta() -> HashMap<String, Value> {
    let pieces: &[(&str, f32, i32)] = &[
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("<0x21>", 0.0, 6), // "!" only as a byte token
        ("\u{2581}", -1.0, 1),
        ("h", -2.0, 1),
        ("e", -2.0, 1),
        ("l", -2.0, 1),
        ("o", -2.0, 1),
        ("ll", -3.0, 1),
        ("he", -4.0, 1),
        ("llo", -5.0, 1),
        ("hello", -6.0, 1),
        ("\u{2581}hello", -7.0, 1),
    ];
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), s("llama"));
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(pieces.iter().map(|p| s(p.0)).collect()),
    );
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(pieces.iter().map(|p| Value::F32(p.1)).collect()),
    );
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(pieces.iter().map(|p| Value::I32(p.2)).collect()),
    );
    md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    md
}

#[test]
fn sentencepiece_vocab_becomes_byte_fallback_bpe() {
    let md = spm_meta();
    // add_bos_token defaults to true for SentencePiece models (llama.cpp and HF LlamaTokenizer do the same).
    assert_eq!(ids(&md, "hello"), [1, 13]);
    // "hello hello": the space becomes ▁, each word merges to ▁hello.
    assert_eq!(ids(&md, "hello hello"), [1, 13, 13]);
    // "!" is not a piece: byte fallback gives <0x21>.
    assert_eq!(ids(&md, "hello!"), [1, 13, 3]);
    let t = from_gguf_metadata(&md).unwrap().tokenizer;
    assert_eq!(t.decode(&[1, 13, 13, 3], true).unwrap(), "hello hello!");
    let tc = from_gguf_metadata(&md).unwrap().tokenizer_config;
    assert_eq!(tc["add_bos_token"], true);

    // Without the dummy prefix (`add_space_prefix = false`) no ▁ is prepended: "hello" merges to piece 12.
    let mut md = spm_meta();
    md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
    assert_eq!(ids(&md, "hello"), [1, 12]);
    let t = from_gguf_metadata(&md).unwrap().tokenizer;
    assert_eq!(t.decode(&[12, 13], true).unwrap(), "hello hello");
    assert_eq!(tc["unk_token"], "<unk>");
}

#[test]
fn folder_tokenizer_round_trips_and_reads_chat_template_jinja() {
    let md = bpe_meta(Some("smollm"));
    let dir = tempfile::tempdir().unwrap();
    let json = tokenizer_json_from_gguf(&md).unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        serde_json::to_vec(&json).unwrap(),
    )
    .unwrap();
    // No tokenizer_config.json yet: an empty config.
    let loaded = from_folder(dir.path()).unwrap();
    assert_eq!(loaded.tokenizer_config, serde_json::json!({}));
    assert_eq!(
        loaded
            .tokenizer
            .encode("<|im_start|>ab ab 12", true)
            .unwrap()
            .get_ids(),
        [9, 4, 8, 3, 5, 6]
    );
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "{{ x }}").unwrap();
    let loaded = from_folder(dir.path()).unwrap();
    assert_eq!(loaded.tokenizer_config["eos_token"], "<|endoftext|>");
    assert_eq!(loaded.tokenizer_config["chat_template"], "{{ x }}");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{oops").unwrap();
    let msg = from_folder(dir.path()).err().unwrap().to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("JSON"),
        "{msg}"
    );

    let empty = tempfile::tempdir().unwrap();
    let msg = from_folder(empty.path()).err().unwrap().to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}
