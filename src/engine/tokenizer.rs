//! Tokenizers for every model source: a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`) or the
//! metadata of a GGUF file (`tokenizer.ggml.*`).
//!
//! From GGUF we build the same `tokenizer.json` document that the model's Hugging Face repository ships (model,
//! normalizer, pre-tokenizer, post-processor, decoder, added tokens) and let `tokenizers` parse it, so the result
//! can be read side by side with a real `tokenizer.json`. The pre-tokenizer depends on `tokenizer.ggml.pre`, the
//! name llama.cpp gives to the regex family of the original tokenizer; an unknown name is refused instead of
//! guessed, because a wrong guess tokenizes digits, spaces or apostrophes differently without any visible error.
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE) with `pre` in [`SUPPORTED_PRE`], and
//! `tokenizer.ggml.model = llama` (SentencePiece BPE with byte fallback, the Llama 2 / TinyLlama / Mistral family),
//! converted the way Hugging Face converts a SentencePiece model (merges recovered from the scored vocabulary).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, Value as Json, json};
use tokenizers::Tokenizer;

/// `tokenizer.ggml.pre` values this module knows how to reproduce.
pub const SUPPORTED_PRE: &[&str] = &[
    "gpt-2",
    "gpt2",
    "smollm",
    "starcoder",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
];

/// The split regexes of Llama 3's and Qwen2's tokenizer.json (digits in groups of up to 3, or one by one).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's `llama_token_type` values (`tokenizer.ggml.token_type`).
mod token_type {
    pub const UNKNOWN: u32 = 2;
    pub const CONTROL: u32 = 3;
    pub const USER_DEFINED: u32 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "gguf metadata: missing key `{0}`; this file has no embedded tokenizer, load a folder with tokenizer.json instead"
    )]
    MissingKey(String),
    #[error("gguf metadata: key `{key}` has the wrong type ({why})")]
    BadValue { key: String, why: String },
    #[error(
        "gguf tokenizer: `tokenizer.ggml.model` = `{0}` is not supported (supported: gpt2, llama); load a folder with tokenizer.json instead"
    )]
    UnsupportedModel(String),
    #[error(
        "gguf tokenizer: `tokenizer.ggml.pre` = `{pre}` is not supported (supported: {supported}); refusing to guess the pre-tokenizer, load a folder with tokenizer.json instead"
    )]
    UnsupportedPre { pre: String, supported: String },
    #[error(
        "gguf tokenizer: `tokenizer.ggml.pre` is missing, so the pre-tokenizer cannot be told; load a folder with tokenizer.json instead"
    )]
    MissingPre,
    #[error("gguf tokenizer: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: cannot build the tokenizer: {message}")]
    Build { path: PathBuf, message: String },
}

/// A tokenizer and its `tokenizer_config.json` (chat_template, bos_token, eos_token, add_bos_token, …).
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub tokenizer_config: Json,
}

/// Loads `tokenizer.json` and `tokenizer_config.json` from a Hugging Face model folder. A missing
/// `tokenizer_config.json` gives an empty object; a separate `chat_template.jinja` (newer transformers) fills in
/// `chat_template` when the config has none.
pub fn from_folder(dir: &Path) -> Result<LoadedTokenizer, TokenizerError> {
    let tok_path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&tok_path).map_err(|source| TokenizerError::Io {
        path: tok_path.clone(),
        source,
    })?;
    let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Build {
        path: tok_path.clone(),
        message: e.to_string(),
    })?;
    let cfg_path = dir.join("tokenizer_config.json");
    let mut tokenizer_config = match std::fs::read(&cfg_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|source| TokenizerError::Json {
            path: cfg_path.clone(),
            source,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json::Object(Map::new()),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: cfg_path,
                source,
            });
        }
    };
    let jinja = dir.join("chat_template.jinja");
    if let Json::Object(map) = &mut tokenizer_config
        && !map.contains_key("chat_template")
        && jinja.is_file()
    {
        let t = std::fs::read_to_string(&jinja).map_err(|source| TokenizerError::Io {
            path: jinja.clone(),
            source,
        })?;
        map.insert("chat_template".into(), Json::String(t));
    }
    Ok(LoadedTokenizer {
        tokenizer,
        tokenizer_config,
    })
}

/// The tokenizer of a GGUF file, reading only its header (no tensors): for previews and dataset work that
/// need the tokenizer but not the weights.
pub fn from_gguf_file(path: &Path) -> Result<LoadedTokenizer, TokenizerError> {
    let io = |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let ct = candle_core::quantized::gguf_file::Content::read(&mut reader).map_err(|e| {
        TokenizerError::Build {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        }
    })?;
    from_gguf_metadata(&ct.metadata).map_err(|e| TokenizerError::Build {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Builds the tokenizer and a `tokenizer_config.json` equivalent from GGUF metadata.
pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<LoadedTokenizer, TokenizerError> {
    let json = tokenizer_json_from_gguf(md)?;
    let bytes = serde_json::to_vec(&json).map_err(|e| TokenizerError::Invalid(e.to_string()))?;
    let tokenizer = Tokenizer::from_bytes(&bytes)
        .map_err(|e| TokenizerError::Invalid(format!("building the tokenizer failed: {e}")))?;
    let tokenizer_config = tokenizer_config_from_gguf(md)?;
    Ok(LoadedTokenizer {
        tokenizer,
        tokenizer_config,
    })
}

/// The Hugging Face `tokenizer.json` document equivalent to the GGUF tokenizer metadata.
pub fn tokenizer_json_from_gguf(md: &HashMap<String, Value>) -> Result<Json, TokenizerError> {
    let kind = get_str(md, "tokenizer.ggml.model")?.to_lowercase();
    let tokens = get_str_array(md, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(TokenizerError::Invalid(
            "`tokenizer.ggml.tokens` is empty".into(),
        ));
    }
    let types = match md.get("tokenizer.ggml.token_type") {
        Some(_) => {
            let t = get_u32_array(md, "tokenizer.ggml.token_type")?;
            if t.len() != tokens.len() {
                return Err(TokenizerError::Invalid(format!(
                    "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                    t.len(),
                    tokens.len()
                )));
            }
            t
        }
        None => vec![1; tokens.len()],
    };
    let special = SpecialIds::read(md, tokens.len())?;

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A duplicated token string keeps its first id, as llama.cpp's text→id map does.
        vocab.entry(t.clone()).or_insert(json!(i));
    }

    let (model, normalizer, pre_tokenizer, decoder, base_post) = match kind.as_str() {
        "gpt2" => {
            let merges = get_merges(md)?;
            let pre = match md.get("tokenizer.ggml.pre") {
                Some(v) => v
                    .to_string()
                    .map_err(|e| bad("tokenizer.ggml.pre", e))?
                    .clone(),
                None => return Err(TokenizerError::MissingPre),
            };
            let p = byte_level_pipeline(&pre)?;
            let model = json!({
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": p.ignore_merges,
                "vocab": vocab, "merges": merges,
            });
            (
                model,
                p.normalizer,
                p.pre_tokenizer,
                p.decoder,
                Some(p.post),
            )
        }
        "llama" => {
            let scores = get_f32_array(md, "tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                return Err(TokenizerError::Invalid(format!(
                    "`tokenizer.ggml.scores` has {} entries but `tokenizer.ggml.tokens` has {}",
                    scores.len(),
                    tokens.len()
                )));
            }
            let merges = match md.get("tokenizer.ggml.merges") {
                Some(_) => get_merges(md)?,
                None => spm_merges(&tokens, &scores),
            };
            let unk = special.unk.map(|id| tokens[id as usize].clone());
            let model = json!({
                "type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            });
            // SentencePiece's dummy prefix (`add_dummy_prefix`) unless the GGUF says there is none.
            let prefix = get_bool_or(md, "tokenizer.ggml.add_space_prefix", true)?;
            let replace =
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
            let normalizer = if prefix {
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"}, replace,
                ]})
            } else {
                json!({"type": "Sequence", "normalizers": [replace]})
            };
            let decoder = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": usize::from(prefix), "stop": 0},
            ]});
            (model, normalizer, Json::Null, decoder, None)
        }
        other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
    };

    // Added tokens: control and unknown tokens are special, user-defined ones are plain added tokens (llama.cpp's
    // converter writes special tokenizer.json entries as CONTROL and the others as USER_DEFINED).
    let mut added = Vec::new();
    for (i, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        let id = i as u32;
        let is_special_id = special.all().contains(&id);
        let special_flag = match *ty {
            token_type::CONTROL | token_type::UNKNOWN => true,
            token_type::USER_DEFINED => false,
            _ if is_special_id => true,
            _ => continue,
        };
        added.push(json!({
            "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special_flag,
        }));
    }

    let post_processor = post_processor(md, &tokens, &special, base_post)?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    }))
}

/// `tokenizer_config.json` equivalent: chat template, special token strings and the add_bos/add_eos flags.
pub fn tokenizer_config_from_gguf(md: &HashMap<String, Value>) -> Result<Json, TokenizerError> {
    let tokens = get_str_array(md, "tokenizer.ggml.tokens")?;
    let special = SpecialIds::read(md, tokens.len())?;
    let name = |id: Option<u32>| match id {
        Some(id) => Json::String(tokens[id as usize].clone()),
        None => Json::Null,
    };
    let kind = get_str(md, "tokenizer.ggml.model")?.to_lowercase();
    let mut cfg = Map::new();
    cfg.insert(
        "add_bos_token".into(),
        json!(get_bool_or(
            md,
            "tokenizer.ggml.add_bos_token",
            kind == "llama"
        )?),
    );
    cfg.insert(
        "add_eos_token".into(),
        json!(get_bool_or(md, "tokenizer.ggml.add_eos_token", false)?),
    );
    cfg.insert("bos_token".into(), name(special.bos));
    cfg.insert("eos_token".into(), name(special.eos));
    cfg.insert("unk_token".into(), name(special.unk));
    cfg.insert("pad_token".into(), name(special.pad));
    if let Some(v) = md.get("tokenizer.chat_template") {
        let t = v
            .to_string()
            .map_err(|e| bad("tokenizer.chat_template", e))?;
        cfg.insert("chat_template".into(), Json::String(t.clone()));
    }
    if let Some(arch) = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        && let Some(ctx) = md
            .get(&format!("{arch}.context_length"))
            .and_then(|v| as_u64(v).ok())
    {
        cfg.insert("model_max_length".into(), json!(ctx));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    cfg.insert(
        "tokenizer_class".into(),
        json!(if kind == "llama" {
            "LlamaTokenizerFast"
        } else {
            "PreTrainedTokenizerFast"
        }),
    );
    Ok(Json::Object(cfg))
}

struct BytePipeline {
    normalizer: Json,
    pre_tokenizer: Json,
    post: Json,
    decoder: Json,
    ignore_merges: bool,
}

/// The tokenizer.json pieces of the byte-level BPE families, one per `tokenizer.ggml.pre` name. Each mirrors the
/// original model's tokenizer.json; the matching regexes are llama.cpp's `llama-vocab.cpp` lists for that name.
fn byte_level_pipeline(pre: &str) -> Result<BytePipeline, TokenizerError> {
    let byte_level = |add_prefix_space: bool, trim_offsets: bool, use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space,
               "trim_offsets": trim_offsets, "use_regex": use_regex})
    };
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        // GPT-2 itself: the GPT-2 regex inside ByteLevel.
        "gpt-2" | "gpt2" => BytePipeline {
            normalizer: Json::Null,
            pre_tokenizer: byte_level(false, true, true),
            post: byte_level(true, false, true),
            decoder: byte_level(true, true, true),
            ignore_merges: false,
        },
        // SmolLM/SmolLM2 and StarCoder: every digit alone, then the GPT-2 regex (llama.cpp: "\p{N}" + GPT-2).
        "smollm" | "starcoder" => BytePipeline {
            normalizer: Json::Null,
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true, true),
            ]}),
            post: byte_level(true, false, true),
            decoder: byte_level(true, true, true),
            ignore_merges: false,
        },
        // Llama 3: digits in groups of up to three; Llama 3's tokenizer.json sets ignore_merges.
        "llama-bpe" | "llama3" | "llama-v3" => BytePipeline {
            normalizer: Json::Null,
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                split(REGEX_LLAMA3), byte_level(false, true, false),
            ]}),
            post: byte_level(true, false, true),
            decoder: byte_level(true, true, true),
            ignore_merges: true,
        },
        // Qwen2/2.5/3: NFC, single digits.
        "qwen2" => BytePipeline {
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                split(REGEX_QWEN2), byte_level(false, false, false),
            ]}),
            post: byte_level(false, false, false),
            decoder: byte_level(false, false, false),
            ignore_merges: false,
        },
        other => {
            return Err(TokenizerError::UnsupportedPre {
                pre: other.to_string(),
                supported: SUPPORTED_PRE.join(", "),
            });
        }
    })
}

/// Combines the family's post-processor with bos/eos insertion when the GGUF asks for it.
fn post_processor(
    md: &HashMap<String, Value>,
    tokens: &[String],
    special: &SpecialIds,
    base: Option<Json>,
) -> Result<Json, TokenizerError> {
    let is_spm = base.is_none();
    let add_bos = get_bool_or(md, "tokenizer.ggml.add_bos_token", is_spm)?;
    let add_eos = get_bool_or(md, "tokenizer.ggml.add_eos_token", false)?;
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    let mut piece = |id: Option<u32>, key: &str| -> Result<Option<String>, TokenizerError> {
        let Some(id) = id else {
            return Err(TokenizerError::Invalid(format!(
                "`{key}` is true but the matching token id is missing"
            )));
        };
        let t = tokens[id as usize].clone();
        specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        Ok(Some(t))
    };
    let bos = if add_bos {
        piece(special.bos, "tokenizer.ggml.add_bos_token")?
    } else {
        None
    };
    let eos = if add_eos {
        piece(special.eos, "tokenizer.ggml.add_eos_token")?
    } else {
        None
    };
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        if let Some(b) = &bos {
            pair.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            if seq == "A" {
                single.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
            }
        }
        pair.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if seq == "A" {
            single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        }
        if let Some(e) = &eos {
            pair.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            if seq == "A" {
                single.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
            }
        }
    }
    let template = (bos.is_some() || eos.is_some()).then(|| {
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    });
    Ok(match (base, template) {
        (None, None) => Json::Null,
        (Some(b), None) => b,
        (None, Some(t)) => t,
        (Some(b), Some(t)) => json!({"type": "Sequence", "processors": [b, t]}),
    })
}

/// Merges for a SentencePiece BPE vocabulary, the way Hugging Face's `SentencePieceExtractor` recovers them: every
/// split of a vocabulary piece into two vocabulary pieces is a merge, ranked by the merged piece's score (higher
/// first), ties by the id of the left then right piece.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<[String; 2]> {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (merged, &mid) in &ids {
        for (split, _) in merged.char_indices().skip(1) {
            let (l, r) = merged.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[mid], mid, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(_, _, l, r)| [tokens[l].clone(), tokens[r].clone()])
        .collect()
}

#[derive(Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    sep: Option<u32>,
}

impl SpecialIds {
    fn read(md: &HashMap<String, Value>, n_tokens: usize) -> Result<Self, TokenizerError> {
        let get = |name: &str| -> Result<Option<u32>, TokenizerError> {
            let key = format!("tokenizer.ggml.{name}_token_id");
            let Some(v) = md.get(&key) else {
                return Ok(None);
            };
            let id = as_u64(v).map_err(|why| TokenizerError::BadValue {
                key: key.clone(),
                why,
            })?;
            if id as usize >= n_tokens {
                return Err(TokenizerError::Invalid(format!(
                    "`{key}` = {id} is outside the vocabulary of {n_tokens} tokens"
                )));
            }
            Ok(Some(id as u32))
        };
        Ok(Self {
            bos: get("bos")?,
            eos: get("eos")?,
            unk: get("unknown").and_then(|u| match u {
                Some(u) => Ok(Some(u)),
                None => get("unk"),
            })?,
            pad: get("padding").and_then(|p| match p {
                Some(p) => Ok(Some(p)),
                None => get("pad"),
            })?,
            sep: get("seperator").and_then(|p| match p {
                Some(p) => Ok(Some(p)),
                None => get("sep"),
            })?,
        })
    }

    fn all(&self) -> Vec<u32> {
        [self.bos, self.eos, self.unk, self.pad, self.sep]
            .into_iter()
            .flatten()
            .collect()
    }
}

fn bad(key: &str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::BadValue {
        key: key.to_string(),
        why: e.to_string(),
    }
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value, TokenizerError> {
    md.get(key)
        .ok_or_else(|| TokenizerError::MissingKey(key.to_string()))
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a String, TokenizerError> {
    get(md, key)?.to_string().map_err(|e| bad(key, e))
}

fn get_bool_or(
    md: &HashMap<String, Value>,
    key: &str,
    default: bool,
) -> Result<bool, TokenizerError> {
    match md.get(key) {
        None => Ok(default),
        Some(v) => v.to_bool().map_err(|e| bad(key, e)),
    }
}

fn get_str_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, TokenizerError> {
    get(md, key)?
        .to_vec()
        .map_err(|e| bad(key, e))?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| bad(key, e)))
        .collect()
}

fn get_u32_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<u32>, TokenizerError> {
    get(md, key)?
        .to_vec()
        .map_err(|e| bad(key, e))?
        .iter()
        .map(|v| {
            as_u64(v)
                .map(|x| x as u32)
                .map_err(|why| TokenizerError::BadValue {
                    key: key.to_string(),
                    why,
                })
        })
        .collect()
}

fn get_f32_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<f32>, TokenizerError> {
    get(md, key)?
        .to_vec()
        .map_err(|e| bad(key, e))?
        .iter()
        .map(|v| match v {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => Err(bad(key, format!("expected a float, found {other:?}"))),
        })
        .collect()
}

fn get_merges(md: &HashMap<String, Value>) -> Result<Vec<[String; 2]>, TokenizerError> {
    get_str_array(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok([a.to_string(), b.to_string()]),
            None => Err(TokenizerError::Invalid(format!(
                "`tokenizer.ggml.merges` entry `{m}` is not two tokens separated by a space"
            ))),
        })
        .collect()
}

/// Any GGUF integer as u64 (ids and lengths are written with different widths by different converters).
pub(crate) fn as_u64(v: &Value) -> Result<u64, String> {
    match v {
        Value::U8(x) => Ok(u64::from(*x)),
        Value::U16(x) => Ok(u64::from(*x)),
        Value::U32(x) => Ok(u64::from(*x)),
        Value::U64(x) => Ok(*x),
        Value::I8(x) if *x >= 0 => Ok(*x as u64),
        Value::I16(x) if *x >= 0 => Ok(*x as u64),
        Value::I32(x) if *x >= 0 => Ok(*x as u64),
        Value::I64(x) if *x >= 0 => Ok(*x as u64),
        other => Err(format!("expected a non-negative integer, found {other:?}")),
    }
}
