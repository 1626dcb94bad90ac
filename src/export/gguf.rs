//! GGUF export for llama.cpp / Ollama: llama.cpp's names and metadata keys, the Q/K row permutation of the llama
//! architecture re-applied (the inverse of what `engine::gguf` undoes on load), tensors in f32, f16 or q8_0
//! (1-D tensors stay f32, as `convert_hf_to_gguf.py` keeps them), and the tokenizer as `tokenizer.ggml.*`
//! metadata: copied verbatim from a GGUF base, or converted from a byte-level BPE `tokenizer.json`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use super::ExportError;
use crate::config::GgufType;
use crate::data::encoder::{config_chat_template, config_token};
use crate::engine::arch::{ArchKind, ModelConfig, RopeScaling};
use crate::engine::gguf::permute_qk;
use crate::engine::tokenizer::{SUPPORTED_PRE, tokenizer_json_from_gguf};

/// llama.cpp's token types.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
}

/// What [`write_gguf`] writes.
pub struct GgufInput<'a> {
    /// HF `config.json`.
    pub config: &'a Json,
    /// HF-named merged weights, HF row order.
    pub tensors: &'a HashMap<String, Tensor>,
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// `tokenizer_config.json` of the export (bos/eos strings, add_bos_token, chat_template).
    pub tokenizer_config: &'a Json,
    /// The base's GGUF metadata when the base was a GGUF: its `tokenizer.*` keys are copied verbatim.
    pub source_metadata: Option<&'a HashMap<String, Value>>,
    /// `general.name`.
    pub name: &'a str,
}

/// `f32`, `f16`, `q8_0`, `q4_0`, `q4_1`, `q4_k_m`.
pub fn type_name(t: GgufType) -> &'static str {
    match t {
        GgufType::F32 => "f32",
        GgufType::F16 => "f16",
        GgufType::Q8_0 => "q8_0",
        GgufType::Q4_0 => "q4_0",
        GgufType::Q4_1 => "q4_1",
        GgufType::Q4KM => "q4_k_m",
    }
}

/// llama.cpp's `general.file_type` (`LLAMA_FTYPE_ALL_F32` = 0, `MOSTLY_F16` = 1, `MOSTLY_Q4_0` = 2,
/// `MOSTLY_Q4_1` = 3, `MOSTLY_Q8_0` = 7, `MOSTLY_Q4_K_M` = 15).
fn file_type(t: GgufType) -> u32 {
    match t {
        GgufType::F32 => 0,
        GgufType::F16 => 1,
        GgufType::Q4_0 => 2,
        GgufType::Q4_1 => 3,
        GgufType::Q8_0 => 7,
        GgufType::Q4KM => 15,
    }
}

/// llama.cpp's `use_more_bits`: the layers a `_M` mix gives more bits (the first and last eighth, and every
/// third one between).
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let first = layers / 8;
    layer < first || layer >= 7 * layers / 8 || (layer - first) % 3 == 2
}

/// The GGML type of one exported tensor (llama.cpp name `name`, `cols` values per row, `layers` blocks), as
/// `llama-quantize` picks it (`llama_tensor_get_type`): 1-D tensors stay f32; the 4-bit types give the output (the
/// embedding when it is tied) Q6_K, or Q8_0 when its rows do not fill 256-wide blocks; Q4_K_M also gives Q6_K to
/// the attn_v and ffn_down of the [`use_more_bits`] layers and Q4_K to the rest; other rows that do not fill whole
/// blocks fall back as llama.cpp does (Q4_K → Q5_0, Q6_K → Q8_0; f16 when even 32-wide blocks do not fit).
pub fn tensor_type(
    t: GgufType,
    name: &str,
    rank: usize,
    cols: usize,
    layers: usize,
    tied: bool,
) -> GgmlDType {
    if rank < 2 {
        return GgmlDType::F32;
    }
    let four_bit = matches!(t, GgufType::Q4_0 | GgufType::Q4_1 | GgufType::Q4KM);
    let output = name == "output.weight" || (tied && name == "token_embd.weight");
    let want = if four_bit && output {
        if cols.is_multiple_of(GgmlDType::Q6K.block_size()) {
            GgmlDType::Q6K
        } else {
            GgmlDType::Q8_0
        }
    } else {
        match t {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
            GgufType::Q4KM => {
                let layer = name
                    .strip_prefix("blk.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok());
                let more = layer.is_some_and(|l| use_more_bits(l, layers))
                    && (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight"));
                if more { GgmlDType::Q6K } else { GgmlDType::Q4K }
            }
        }
    };
    if cols.is_multiple_of(want.block_size()) {
        return want;
    }
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// The metadata of a GGUF file (header only).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, Value>, ExportError> {
    let file =
        File::open(path).map_err(|e| ExportError::io(format!("opening {}", path.display()), e))?;
    let ct = gguf_file::Content::read(&mut BufReader::new(file)).map_err(|e| {
        ExportError::Unsupported(format!("{}: not a readable GGUF file: {e}", path.display()))
    })?;
    Ok(ct.metadata)
}

/// The Hugging Face id a GGUF names for its weights, when it does: `general.source.huggingface.repository`, or
/// a `https://huggingface.co/ORG/NAME` in `general.source.url` / `general.base_model.0.repo_url`.
pub fn hub_id_from_metadata(md: &HashMap<String, Value>) -> Option<String> {
    let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    if let Some(r) = s("general.source.huggingface.repository")
        && r.split('/').count() == 2
    {
        return Some(r);
    }
    for k in ["general.source.url", "general.base_model.0.repo_url"] {
        if let Some(url) = s(k)
            && let Some(rest) = url.strip_prefix("https://huggingface.co/")
        {
            let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
            if parts.len() == 2 && parts.iter().all(|p| !p.is_empty()) {
                return Some(parts.join("/"));
            }
        }
    }
    None
}

/// The GGUF name of an HF tensor (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`); the inverse
/// of [`crate::engine::gguf::hf_tensor_name`].
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    gguf_tensor_name_for("llama", hf)
}

/// [`gguf_tensor_name`] for the GGUF architecture `arch` (Gemma 3's four norms have their own names); the inverse
/// of [`crate::engine::gguf::hf_tensor_name_for`].
pub fn gguf_tensor_name_for(arch: &str, hf: &str) -> Option<String> {
    let gemma = arch == "gemma3";
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

fn u32v(x: usize) -> Value {
    Value::U32(u32::try_from(x).unwrap_or(u32::MAX))
}

#[allow(clippy::cast_possible_truncation)]
fn f32v(x: f64) -> Value {
    Value::F32(x as f32)
}

/// Writes the GGUF file.
pub fn write_gguf(
    path: &Path,
    input: &GgufInput<'_>,
    gtype: GgufType,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ExportError> {
    let cfg = ModelConfig::from_hf_config(input.config)?;
    let arch = match cfg.arch {
        ArchKind::Llama | ArchKind::Mistral => "llama",
        ArchKind::Qwen2 => "qwen2",
        ArchKind::Qwen3 => "qwen3",
        ArchKind::Gemma3 => "gemma3",
    };
    let gemma = arch == "gemma3";
    let permute = arch == "llama";
    let k = |s: &str| format!("{arch}.{s}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(input.name.into())),
        ("general.file_type".into(), Value::U32(file_type(gtype))),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("context_length"), u32v(cfg.max_position_embeddings)),
        (k("embedding_length"), u32v(cfg.hidden_size)),
        (k("feed_forward_length"), u32v(cfg.intermediate_size)),
        (k("block_count"), u32v(cfg.num_layers)),
        (k("attention.head_count"), u32v(cfg.num_heads)),
        (k("attention.head_count_kv"), u32v(cfg.num_kv_heads)),
        (k("rope.freq_base"), f32v(cfg.rope_theta)),
        (
            k("attention.layer_norm_rms_epsilon"),
            f32v(cfg.rms_norm_eps),
        ),
        (k("rope.dimension_count"), u32v(cfg.head_dim)),
        (k("vocab_size"), u32v(cfg.vocab_size)),
    ];
    if gemma || cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        md.push((k("attention.key_length"), u32v(cfg.head_dim)));
        md.push((k("attention.value_length"), u32v(cfg.head_dim)));
    }
    if gemma {
        md.extend(gemma3_metadata(&cfg)?);
    }
    if input.config.get("gguf_rope_freqs").is_some() {
        return Err(ExportError::Unsupported(
            "the base carries GGUF rope factors that are not Llama 3's (`gguf_rope_freqs`); GGUF export of such a model is not supported".into(),
        ));
    }

    if let Some(RopeScaling::Yarn(_)) = cfg.rope_scaling {
        return Err(ExportError::Unsupported(
            "the model's RoPE has YaRN scaling (rope_scaling: yarn), which GGUF export does not write yet; export safetensors (export_format: safetensors), or use linear scaling".into(),
        ));
    }
    // Linear rope scaling: llama.cpp's own metadata keys (read back by termtune's GGUF loader).
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        md.push((k("rope.scaling.type"), Value::String("linear".into())));
        md.push((k("rope.scaling.factor"), f32v(factor)));
    }

    // Tensors, in llama.cpp's names and row order.
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    if matches!(cfg.rope_scaling, Some(RopeScaling::Llama3(_))) {
        // Llama 3 rope scaling: llama.cpp reads the per-frequency divisors from `rope_freqs.weight`.
        let base: Vec<f64> = (0..cfg.head_dim / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64))
            .collect();
        #[allow(clippy::cast_possible_truncation)]
        let factors: Vec<f32> = base
            .iter()
            .zip(cfg.rope_inv_freq())
            .map(|(b, s)| (b / s) as f32)
            .collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &Device::Cpu)?;
        qtensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let names = super::hf::ordered_names(input.tensors);
    let total = names.len();
    // No separate output tensor: llama.cpp treats the embedding as the output when picking types.
    let tied = !input.tensors.contains_key("lm_head.weight");
    for (i, hf) in names.iter().enumerate() {
        let g = gguf_tensor_name_for(arch, hf).ok_or_else(|| {
            ExportError::Unsupported(format!(
                "tensor `{hf}` has no llama.cpp name; GGUF export supports llama, mistral, qwen2, qwen3 and gemma3 weights"
            ))
        })?;
        let mut t = input.tensors[hf]
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        if gemma && g.ends_with("norm.weight") {
            // llama.cpp's Gemma norms multiply by the stored weight: convert_hf_to_gguf.py stores 1 + w.
            t = (t + 1.0)?;
        }
        if permute {
            if g.ends_with(".attn_q.weight") || g.ends_with(".attn_q.bias") {
                t = permute_qk(&t, cfg.num_heads)?;
            } else if g.ends_with(".attn_k.weight") || g.ends_with(".attn_k.bias") {
                t = permute_qk(&t, cfg.num_kv_heads)?;
            }
        }
        let cols = t.dims().last().copied().unwrap_or(0);
        let want = tensor_type(gtype, &g, t.rank(), cols, cfg.num_layers, tied);
        if (i + 1) % 32 == 0 || i + 1 == total {
            progress(&format!(
                "converting tensors to {} ({}/{total})",
                type_name(gtype),
                i + 1
            ));
        }
        qtensors.push((g, QTensor::quantize(&t, want)?));
    }

    // Tokenizer.
    let tok_md = match input.source_metadata {
        Some(src) => copy_tokenizer_metadata(src),
        None => tokenizer_metadata(
            input.tokenizer,
            input.tokenizer_config,
            input.config,
            cfg.vocab_size,
        )?,
    };
    md.extend(tok_md);
    if let Some(t) = config_chat_template(input.tokenizer_config) {
        md.retain(|(k, _)| k != "tokenizer.chat_template");
        md.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    let n_tokens = md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| match v {
            Value::Array(a) => Some(a.len()),
            _ => None,
        })
        .unwrap_or(0);
    if n_tokens != cfg.vocab_size {
        return Err(ExportError::Unsupported(format!(
            "the tokenizer has {n_tokens} tokens but the embeddings have {} rows; llama.cpp needs them equal",
            cfg.vocab_size
        )));
    }

    progress(&format!(
        "writing {}",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().to_string())
    ));
    let file = File::create(path)
        .map_err(|e| ExportError::io(format!("creating {}", path.display()), e))?;
    let mut w = BufWriter::new(file);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &md_refs, &t_refs).map_err(|e| match e {
        candle_core::Error::Io(io) => ExportError::io(format!("writing {}", path.display()), io),
        other => ExportError::Candle(other),
    })?;
    use std::io::Write as _;
    w.flush()
        .map_err(|e| ExportError::io(format!("writing {}", path.display()), e))?;
    Ok(())
}

/// Gemma 3's settings in llama.cpp's keys (what `convert_hf_to_gguf.py` writes, read back as
/// [`crate::engine::gguf`] reads them): the sliding window, the local RoPE base, and the per-layer pattern when it is
/// not llama.cpp's default (every 6th layer global). llama.cpp fixes the score scale (1/√head_dim; 1/√(hidden/heads)
/// for the 62-layer 27B): a model with another `query_pre_attn_scalar` is refused, not exported to other numbers.
fn gemma3_metadata(cfg: &ModelConfig) -> Result<Vec<(String, Value)>, ExportError> {
    let k = |s: &str| format!("gemma3.{s}");
    let scalar = if cfg.num_layers == 62 {
        (cfg.hidden_size / cfg.num_heads) as f64
    } else {
        cfg.head_dim as f64
    };
    if (cfg.attn_scale * scalar.sqrt() - 1.0).abs() > 1e-9 {
        return Err(ExportError::Unsupported(format!(
            "llama.cpp scales a Gemma 3's attention scores by 1/√{scalar}, this model by {}; GGUF export would change its numbers: export safetensors instead",
            cfg.attn_scale
        )));
    }
    let mut md = Vec::new();
    let windows: Vec<usize> = cfg.layer_windows.iter().flatten().copied().collect();
    if let Some(&w) = windows.first() {
        if windows.iter().any(|&x| x != w) {
            return Err(ExportError::Unsupported(
                "the layers have different sliding windows; llama.cpp's gemma3 takes one".into(),
            ));
        }
        md.push((k("attention.sliding_window"), u32v(w)));
        let sliding: Vec<bool> = cfg.layer_windows.iter().map(Option::is_some).collect();
        let default: Vec<bool> = (0..cfg.num_layers).map(|i| i % 6 < 5).collect();
        if sliding != default {
            md.push((
                k("attention.sliding_window_pattern"),
                Value::Array(sliding.into_iter().map(Value::Bool).collect()),
            ));
        }
    }
    if let Some(theta) = cfg.local_rope_theta {
        md.push((k("rope.freq_base_swa"), f32v(theta)));
    }
    Ok(md)
}

/// Every `tokenizer.*` key of a GGUF base, as is.
fn copy_tokenizer_metadata(src: &HashMap<String, Value>) -> Vec<(String, Value)> {
    let mut keys: Vec<&String> = src.keys().filter(|k| k.starts_with("tokenizer.")).collect();
    keys.sort();
    keys.into_iter()
        .map(|k| (k.clone(), src[k].clone()))
        .collect()
}

/// The `tokenizer.ggml.pre` name whose pre-tokenizer (and normalizer) is exactly the one of `tok_json`, found by
/// building each supported family's tokenizer.json with `engine::tokenizer` and comparing the two after the same
/// `tokenizers` serialisation.
pub fn detect_pre(tok_json: &Json) -> Option<&'static str> {
    let norm = |doc: &Json| -> Option<(Json, Json)> {
        let bytes = serde_json::to_vec(doc).ok()?;
        let t = tokenizers::Tokenizer::from_bytes(&bytes).ok()?;
        let back: Json = serde_json::from_str(&t.to_string(false).ok()?).ok()?;
        Some((back["pre_tokenizer"].clone(), back["normalizer"].clone()))
    };
    let want = norm(tok_json)?;
    for pre in SUPPORTED_PRE {
        let md: HashMap<String, Value> = HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String((*pre).into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
            ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ]);
        if let Ok(doc) = tokenizer_json_from_gguf(&md)
            && norm(&doc).as_ref() == Some(&want)
        {
            return Some(pre);
        }
    }
    None
}

/// `tokenizer.ggml.*` from a Hugging Face byte-level BPE tokenizer (what `convert_hf_to_gguf.py`'s
/// `_set_vocab_gpt2` writes): tokens padded to the embedding rows with `[PADn]` (unused), token types, merges,
/// `pre`, special ids and the add-bos/eos flags.
pub fn tokenizer_metadata(
    tokenizer: &tokenizers::Tokenizer,
    tokenizer_config: &Json,
    config: &Json,
    n_vocab: usize,
) -> Result<Vec<(String, Value)>, ExportError> {
    let doc: Json = tokenizer
        .to_string(false)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| ExportError::Unsupported("cannot serialise the tokenizer".into()))?;
    let model = &doc["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(ExportError::Unsupported(
            "GGUF export converts byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 families) from tokenizer.json; this one is a SentencePiece-style or non-BPE tokenizer: export safetensors and convert with llama.cpp's convert_hf_to_gguf.py, or start from a GGUF base".into(),
        ));
    }
    let pre = detect_pre(&doc).ok_or_else(|| {
        ExportError::Unsupported(format!(
            "the tokenizer's pre-tokenizer matches none of the families termtune can name for llama.cpp ({}); a wrong `tokenizer.ggml.pre` would tokenize silently differently, so the GGUF export is refused: export safetensors and convert with llama.cpp's convert_hf_to_gguf.py",
            SUPPORTED_PRE.join(", ")
        ))
    })?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n_vocab];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<(), ExportError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            ExportError::Unsupported(format!(
                "token `{text}` has id {id}, outside the {n_vocab} embedding rows"
            ))
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    if let Some(vocab) = model["vocab"].as_object() {
        for (text, id) in vocab {
            if let Some(id) = id.as_u64() {
                put(id, text, token_type::NORMAL)?;
            }
        }
    }
    if let Some(added) = doc["added_tokens"].as_array() {
        for a in added {
            let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
                continue;
            };
            let ty = if a["special"].as_bool() == Some(true) {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
            put(id, text, ty)?;
        }
    }
    let mut texts = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for (i, t) in tokens.into_iter().enumerate() {
        let (text, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED));
        texts.push(Value::String(text));
        types.push(Value::I32(ty));
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(p) if p.len() == 2 => {
                        Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                    }
                    _ => None,
                })
                .map(Value::String)
                .collect()
        })
        .unwrap_or_default();
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let id_of = |key: &str, cfg_key: &str| -> Option<u32> {
        config_token(tokenizer_config, key)
            .and_then(|t| tokenizer.token_to_id(&t))
            .or_else(|| {
                config
                    .get(cfg_key)
                    .and_then(|v| v.as_u64().or_else(|| v.get(0)?.as_u64()))
                    .and_then(|v| u32::try_from(v).ok())
            })
    };
    for (gkey, tkey, ckey) in [
        ("bos", "bos_token", "bos_token_id"),
        ("eos", "eos_token", "eos_token_id"),
        ("unknown", "unk_token", "unk_token_id"),
        ("padding", "pad_token", "pad_token_id"),
    ] {
        if let Some(id) = id_of(tkey, ckey) {
            md.push((format!("tokenizer.ggml.{gkey}_token_id"), Value::U32(id)));
        }
    }
    let flag = |k: &str| {
        tokenizer_config
            .get(k)
            .and_then(Json::as_bool)
            .unwrap_or(false)
    };
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(flag("add_bos_token")),
    ));
    md.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(flag("add_eos_token")),
    ));
    Ok(md)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::engine::gguf::hf_tensor_name;

    /// Q4_K_M on Llama-3.1-8B's shapes (32 layers, 4096-wide rows): Q6_K for the output and for the attn_v and
    /// ffn_down of layers 0–3, 6, 9, …, 27 and 28–31 (`use_more_bits`), Q4_K elsewhere, as llama-quantize
    /// (an untied embedding stays Q4_K); the 4-bit types' output is Q6_K; 1-D tensors f32.
    #[test]
    fn q4_k_m_picks_llama_quantize_types() {
        let ty = |t, name: &str, cols| tensor_type(t, name, 2, cols, 32, false);
        let more: Vec<usize> = (0..32).filter(|&l| use_more_bits(l, 32)).collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        for l in 0..32 {
            let want = if more.contains(&l) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            };
            assert_eq!(
                ty(GgufType::Q4KM, &format!("blk.{l}.attn_v.weight"), 4096),
                want
            );
            assert_eq!(
                ty(GgufType::Q4KM, &format!("blk.{l}.ffn_down.weight"), 14336),
                want
            );
            assert_eq!(
                ty(GgufType::Q4KM, &format!("blk.{l}.attn_q.weight"), 4096),
                GgmlDType::Q4K
            );
            assert_eq!(
                ty(GgufType::Q4KM, &format!("blk.{l}.ffn_up.weight"), 4096),
                GgmlDType::Q4K
            );
        }
        assert_eq!(ty(GgufType::Q4KM, "output.weight", 4096), GgmlDType::Q6K);
        assert_eq!(
            ty(GgufType::Q4KM, "token_embd.weight", 4096),
            GgmlDType::Q4K
        );
        assert_eq!(ty(GgufType::Q4_0, "output.weight", 4096), GgmlDType::Q6K);
        assert_eq!(
            ty(GgufType::Q4_0, "blk.0.attn_v.weight", 4096),
            GgmlDType::Q4_0
        );
        assert_eq!(ty(GgufType::Q8_0, "output.weight", 4096), GgmlDType::Q8_0);
        assert_eq!(
            tensor_type(GgufType::Q4KM, "blk.0.attn_norm.weight", 1, 4096, 32, false),
            GgmlDType::F32
        );
        // Rows that do not fill 256-wide blocks (SmolLM2: 576): Q4_K → Q5_0, Q6_K → Q8_0; a tied embedding is
        // the output.
        let smol = |name: &str, cols| tensor_type(GgufType::Q4KM, name, 2, cols, 30, true);
        assert_eq!(smol("token_embd.weight", 576), GgmlDType::Q8_0);
        assert_eq!(smol("blk.5.attn_q.weight", 576), GgmlDType::Q5_0);
        assert_eq!(smol("blk.0.attn_v.weight", 576), GgmlDType::Q8_0);
        assert_eq!(smol("blk.0.ffn_down.weight", 1536), GgmlDType::Q6K);
        assert_eq!(smol("blk.4.ffn_down.weight", 1536), GgmlDType::Q4K);
        // Not even 32-wide blocks: f16.
        assert_eq!(smol("blk.0.attn_q.weight", 48), GgmlDType::F16);
    }

    #[test]
    fn tensor_names_invert_the_loader_map() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.7.self_attn.q_proj.weight",
            "model.layers.7.self_attn.k_proj.bias",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.self_attn.q_norm.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.12.input_layernorm.weight",
            "model.layers.12.post_attention_layernorm.weight",
        ] {
            let g = gguf_tensor_name(hf).unwrap();
            assert_eq!(hf_tensor_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_tensor_name("model.layers.0.mlp.other.weight"), None);
    }

    #[test]
    fn the_tiny_tokenizer_is_gpt2_and_each_family_is_recognised() {
        let tok = crate::engine::testing::tiny_tokenizer().unwrap();
        let doc: Json = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        assert_eq!(detect_pre(&doc), Some("gpt-2"));
        // A tokenizer.json built for each family by the loader is recognised as that family (aliases map to
        // the first name of their group).
        for (pre, want) in [
            ("smollm", "smollm"),
            ("llama-bpe", "llama-bpe"),
            ("qwen2", "qwen2"),
        ] {
            let md: HashMap<String, Value> = HashMap::from([
                ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
                ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
                (
                    "tokenizer.ggml.tokens".into(),
                    Value::Array(vec![Value::String("x".into()), Value::String("y".into())]),
                ),
                ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
            ]);
            let doc = tokenizer_json_from_gguf(&md).unwrap();
            assert_eq!(detect_pre(&doc), Some(want));
        }
    }

    #[test]
    fn hub_ids_come_from_the_source_keys() {
        let md = HashMap::from([(
            "general.base_model.0.repo_url".to_string(),
            Value::String("https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct".into()),
        )]);
        assert_eq!(
            hub_id_from_metadata(&md).as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
        assert_eq!(hub_id_from_metadata(&HashMap::new()), None);
    }
}
