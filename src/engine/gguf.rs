//! GGUF files as a model source: an HF `config.json` equivalent from the metadata, every tensor under its Hugging
//! Face name (in HF row order), dequantized to the compute dtype ([`load_gguf`]) or, for quantized weights, kept
//! in their GGML type ([`load_gguf_quantized`], what the program uses), and the tokenizer built from the metadata.
//!
//! llama.cpp's converter permutes the rows of the Q and K projections of llama-architecture models so that its
//! interleaved ("GPT-J") RoPE applies; [`unpermute_qk`] undoes that, so the HF half-rotation ("NeoX") RoPE used for
//! Hugging Face checkpoints applies to GGUF weights as well. qwen2/qwen3 are converted without a permutation.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value as Json, json};
use tokenizers::Tokenizer;

use super::qweight::QWeight;
use super::tokenizer::{self, TokenizerError, as_u64};

/// `general.architecture` values [`load_gguf`] accepts (Mistral GGUFs are written as `llama`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable GGUF file: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: GGUF metadata key `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: GGUF metadata key `{key}` has the wrong type ({why})")]
    BadValue {
        path: PathBuf,
        key: String,
        why: String,
    },
    #[error(
        "{path}: architecture `{arch}` is not supported (supported: {supported}); convert the model to one of those or use its Hugging Face folder"
    )]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    #[error(
        "{path}: tensor `{name}` has no Hugging Face equivalent for architecture `{arch}`; this GGUF holds parts termtune does not model"
    )]
    UnknownTensor {
        path: PathBuf,
        name: String,
        arch: String,
    },
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
}

/// A GGUF model in Hugging Face terms.
pub struct GgufModel {
    /// Equivalent of HF `config.json`: `model_type`, `architectures`, sizes, `rope_theta`, `rms_norm_eps`,
    /// `tie_word_embeddings`, `bos_token_id`/`eos_token_id`, `max_position_embeddings`, `head_dim`, … A Llama 3.1+
    /// file whose `rope_freqs` factors match the standard llama3 rope scaling gets `rope_scaling`; other factors are
    /// passed on as `gguf_rope_freqs` (divide the inverse frequencies by them, as llama.cpp does).
    pub config: Json,
    /// HF tensor names (`model.layers.N.self_attn.q_proj.weight`, …) in HF row order, in the requested dtype.
    pub tensors: HashMap<String, Tensor>,
    /// With [`load_gguf_quantized`]: the 2-D tensors stored in a quantized GGML type (Q4_0, Q4_1, Q4_K, Q5_K,
    /// Q6_K, Q8_0, …), kept in that type under their HF names, in HF row order (none of them is in `tensors`;
    /// Q4_0, Q5_0 and Q8_0 on the CPU packed, [`QWeight::new`]).
    pub quantized: HashMap<String, QWeight>,
    pub tokenizer: Tokenizer,
    /// Equivalent of HF `tokenizer_config.json`: `chat_template`, `bos_token`, `eos_token`, `add_bos_token`, …
    pub tokenizer_config: Json,
}

/// What the UI shows about a GGUF file without loading its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    pub path: PathBuf,
    pub architecture: String,
    pub name: Option<String>,
    /// Total number of weights over all tensors.
    pub parameters: u64,
    pub context_length: Option<u64>,
    pub block_count: Option<u64>,
    pub embedding_length: Option<u64>,
    /// Most common tensor type by weight count (`Q4_1`, `Q8_0`, `F16`, …).
    pub quantization: String,
    pub has_chat_template: bool,
    pub tokenizer_model: Option<String>,
    pub tokenizer_pre: Option<String>,
    pub file_size: u64,
    /// Whether [`load_gguf`] supports this architecture.
    pub supported: bool,
}

impl GgufSummary {
    /// One line for the UI: `llama · 134.5M params · Q4_1 · ctx 8192 · chat template`.
    pub fn describe(&self) -> String {
        let params = self.parameters as f64;
        let size = if params >= 1e9 {
            format!("{:.1}B", params / 1e9)
        } else {
            format!("{:.1}M", params / 1e6)
        };
        let mut parts = vec![
            self.architecture.clone(),
            format!("{size} params"),
            self.quantization.clone(),
        ];
        if let Some(c) = self.context_length {
            parts.push(format!("ctx {c}"));
        }
        parts.push(if self.has_chat_template {
            "chat template".into()
        } else {
            "no chat template".into()
        });
        if !self.supported {
            parts.push("unsupported architecture".into());
        }
        parts.join(" · ")
    }
}

fn read_content(path: &Path) -> Result<(Content, BufReader<File>), GgufError> {
    let file = File::open(path).map_err(|source| GgufError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| GgufError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok((content, reader))
}

/// Each tensor's GGML type (llama.cpp names), from the header only.
pub fn tensor_types(path: &Path) -> Result<Vec<(String, GgmlDType)>, GgufError> {
    let (ct, _) = read_content(path)?;
    let mut v: Vec<_> = ct
        .tensor_infos
        .iter()
        .map(|(n, i)| (n.clone(), i.ggml_dtype))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Reads only the header (metadata and tensor table) of a GGUF file.
pub fn gguf_metadata(path: &Path) -> Result<GgufSummary, GgufError> {
    let (ct, _) = read_content(path)?;
    let md = Meta {
        path,
        md: &ct.metadata,
    };
    let architecture = md.str("general.architecture")?.to_string();
    let opt_u64 = |key: String| md.opt_u64(&key);
    let mut by_type: HashMap<String, u64> = HashMap::new();
    let mut parameters = 0u64;
    for info in ct.tensor_infos.values() {
        let n = info.shape.elem_count() as u64;
        parameters += n;
        *by_type.entry(format!("{:?}", info.ggml_dtype)).or_default() += n;
    }
    let mut types: Vec<_> = by_type.into_iter().collect();
    types.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let file_size = std::fs::metadata(path)
        .map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    Ok(GgufSummary {
        path: path.to_path_buf(),
        name: md.opt_str("general.name")?,
        parameters,
        context_length: opt_u64(format!("{architecture}.context_length"))?,
        block_count: opt_u64(format!("{architecture}.block_count"))?,
        embedding_length: opt_u64(format!("{architecture}.embedding_length"))?,
        quantization: types.first().map(|t| t.0.clone()).unwrap_or_default(),
        has_chat_template: ct.metadata.contains_key("tokenizer.chat_template"),
        tokenizer_model: md.opt_str("tokenizer.ggml.model")?,
        tokenizer_pre: md.opt_str("tokenizer.ggml.pre")?,
        file_size,
        supported: SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()),
        architecture,
    })
}

/// Loads a GGUF file: config, dequantized tensors with HF names, tokenizer and tokenizer config.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel, GgufError> {
    read_gguf(path, dtype, device, false)
}

/// [`load_gguf`], keeping every quantized 2-D tensor in its GGML type ([`GgufModel::quantized`]): a Q4 file
/// then takes about its file size in memory, and matrix products run on candle's quantized kernels. Tensors
/// stored as F32/F16/BF16 (norms, biases, unquantized files) are dense in `dtype` as with [`load_gguf`].
pub fn load_gguf_quantized(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<GgufModel, GgufError> {
    read_gguf(path, dtype, device, true)
}

/// Whether a GGML type is a block-quantized format (not a plain float type).
pub fn is_quantized_type(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

fn read_gguf(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep_quantized: bool,
) -> Result<GgufModel, GgufError> {
    let (ct, mut reader) = read_content(path)?;
    let config = hf_config(path, &ct.metadata, &ct.tensor_infos)?;
    let arch = config["model_type"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let n_head = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let n_kv_head = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;
    let tensor_err = |name: &str, e: candle_core::Error| GgufError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        message: e.to_string(),
    };

    let mut config = config;
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        let name = "rope_freqs.weight";
        let factors: Vec<f32> = ct
            .tensor(&mut reader, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| tensor_err(name, e))?;
        let theta = config["rope_theta"].as_f64().unwrap_or(10000.0);
        let head_dim = config["head_dim"].as_u64().unwrap_or(0) as usize;
        if let Json::Object(map) = &mut config {
            match llama3_rope_scaling(&factors, theta, head_dim) {
                Some(s) => map.insert("rope_scaling".into(), s),
                None => map.insert("gguf_rope_freqs".into(), json!(factors)),
            };
        }
    }
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    let mut quantized = HashMap::new();
    for name in names {
        if name == "rope_freqs.weight" {
            continue; // folded into the config (rope_scaling / gguf_rope_freqs)
        }
        let Some(hf) = hf_tensor_name_for(&arch, name) else {
            return Err(GgufError::UnknownTensor {
                path: path.to_path_buf(),
                name: name.clone(),
                arch,
            });
        };
        let heads = if arch != "llama" {
            None
        } else if name.ends_with(".attn_q.weight") || name.ends_with(".attn_q.bias") {
            Some(n_head)
        } else if name.ends_with(".attn_k.weight") || name.ends_with(".attn_k.bias") {
            Some(n_kv_head)
        } else {
            None
        };
        let info = &ct.tensor_infos[name];
        if keep_quantized && is_quantized_type(info.ggml_dtype) && info.shape.rank() == 2 {
            // Rows are whole blocks, so the Q/K row permutation moves bytes (read on the CPU for that).
            let q = match heads {
                Some(h) => {
                    let q = ct
                        .tensor(&mut reader, name, &Device::Cpu)
                        .map_err(|e| tensor_err(name, e))?;
                    unpermute_qk_quantized(&q, h, device).map_err(|e| tensor_err(name, e))?
                }
                None => ct
                    .tensor(&mut reader, name, device)
                    .map_err(|e| tensor_err(name, e))?,
            };
            let q = QWeight::new(Arc::new(q)).map_err(|e| tensor_err(name, e))?;
            quantized.insert(hf, q);
            continue;
        }
        let q = ct
            .tensor(&mut reader, name, device)
            .map_err(|e| tensor_err(name, e))?;
        let mut t = q.dequantize(device).map_err(|e| tensor_err(name, e))?;
        if let Some(h) = heads {
            t = unpermute_qk(&t, h).map_err(|e| tensor_err(name, e))?;
        }
        if arch == "gemma3_text" && name.ends_with("norm.weight") {
            // llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (its norm multiplies by the weight).
            t = (t - 1.0).map_err(|e| tensor_err(name, e))?;
        }
        let t = t.to_dtype(dtype).map_err(|e| tensor_err(name, e))?;
        tensors.insert(hf, t);
    }
    let loaded =
        tokenizer::from_gguf_metadata(&ct.metadata).map_err(|source| GgufError::Tokenizer {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(GgufModel {
        config,
        tensors,
        quantized,
        tokenizer: loaded.tokenizer,
        tokenizer_config: loaded.tokenizer_config,
    })
}

/// The HF name of a GGUF tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`) of the llama
/// family's layout.
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    hf_tensor_name_for("llama", gguf)
}

/// [`hf_tensor_name`] for the HF `model_type` `arch`: Gemma 3's `ffn_norm` is its pre-feedforward norm, and its
/// `post_attention_norm` / `post_ffw_norm` the norms after attention and MLP.
pub fn hf_tensor_name_for(arch: &str, gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let gemma = arch == "gemma3_text";
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// llama.cpp's `permute` from `convert_hf_to_gguf.py` (HF rows → GGUF rows):
/// `w.reshape(n_head, 2, rows/n_head/2, …).swapaxes(1, 2).reshape(w.shape)`. Works for weights `(rows, in)`
/// and biases `(rows)`.
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    regroup_rows(w, n_head, true)
}

/// Inverse of [`permute_qk`] (GGUF rows → HF rows).
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    regroup_rows(w, n_head, false)
}

/// [`unpermute_qk`] on a quantized (rows, in) weight: every row is a run of whole blocks, so the rows move as
/// bytes and no value changes (dequantizing the result equals unpermuting the dequantized weight). The result
/// lives on `device`.
pub fn unpermute_qk_quantized(
    q: &QTensor,
    n_head: usize,
    device: &Device,
) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("cannot regroup {rows} rows into {n_head} heads of two halves");
    }
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(data.len());
    // HF row (h, j, i) is GGUF row (h, i, j) (the reshape/transpose of `regroup_rows`, inverse direction).
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * half + i) * 2 + j;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, q.dtype())?;
    QTensor::new(storage, (rows, cols))
}

fn regroup_rows(w: &Tensor, n_head: usize, forward: bool) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("cannot regroup {rows} rows into {n_head} heads of two halves");
    }
    let half = rows / n_head / 2;
    let cols: usize = dims[1..].iter().product();
    let grouped = if forward {
        w.reshape((n_head, 2, half, cols))?
    } else {
        w.reshape((n_head, half, 2, cols))?
    };
    grouped.transpose(1, 2)?.contiguous()?.reshape(dims)
}

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.md.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        })
    }
    fn bad(&self, key: &str, why: impl std::fmt::Display) -> GgufError {
        GgufError::BadValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            why: why.to_string(),
        }
    }
    fn str(&self, key: &str) -> Result<&str, GgufError> {
        Ok(self.get(key)?.to_string().map_err(|e| self.bad(key, e))?)
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>, GgufError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => Ok(Some(v.to_string().map_err(|e| self.bad(key, e))?.clone())),
        }
    }
    fn u64(&self, key: &str) -> Result<u64, GgufError> {
        as_u64(self.get(key)?).map_err(|e| self.bad(key, e))
    }
    fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => Ok(Some(as_u64(v).map_err(|e| self.bad(key, e))?)),
        }
    }
    /// A float as JSON, written through its shortest decimal form so that an f32 `1e-5` reads `1e-05` and not
    /// `9.999999747378752e-06`.
    fn opt_f64(&self, key: &str) -> Result<Option<Json>, GgufError> {
        let v = match self.md.get(key) {
            None => return Ok(None),
            Some(Value::F32(x)) => format!("{x}").parse::<f64>().unwrap_or(f64::from(*x)),
            Some(Value::F64(x)) => *x,
            Some(other) => {
                return Err(self.bad(key, format!("expected a float, found {other:?}")));
            }
        };
        Ok(Some(json!(v)))
    }
}

/// The HF `config.json` equivalent of a GGUF file, from its header alone (no tensor data read).
pub fn config_json(path: &Path) -> Result<Json, GgufError> {
    let (ct, _) = read_content(path)?;
    hf_config(path, &ct.metadata, &ct.tensor_infos)
}

/// HF `config.json` equivalent from GGUF metadata (and the tensor table, for tied embeddings and biases).
pub fn hf_config(
    path: &Path,
    md: &HashMap<String, Value>,
    infos: &HashMap<String, TensorInfo>,
) -> Result<Json, GgufError> {
    let m = Meta { path, md };
    let arch = m.str("general.architecture")?.to_string();
    let (hf_arch, class) = match arch.as_str() {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
        "gemma3" => ("gemma3_text", "Gemma3ForCausalLM"),
        other => {
            return Err(GgufError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            });
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = m.u64(&k("embedding_length"))?;
    let n_head = m.u64(&k("attention.head_count"))?;
    let n_kv = m.opt_u64(&k("attention.head_count_kv"))?.unwrap_or(n_head);
    if n_head == 0 || n_kv == 0 || n_head % n_kv != 0 {
        return Err(GgufError::Invalid {
            path: path.to_path_buf(),
            message: format!("head counts {n_head}/{n_kv} (query/key-value) are inconsistent"),
        });
    }
    let head_dim = m
        .opt_u64(&k("attention.key_length"))?
        .unwrap_or(hidden / n_head);
    if let Some(rot) = m.opt_u64(&k("rope.dimension_count"))?
        && rot != head_dim
    {
        return Err(GgufError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "`{arch}.rope.dimension_count` = {rot} but the head size is {head_dim}: partial rotary embeddings are not supported"
            ),
        });
    }
    let embd = infos
        .get("token_embd.weight")
        .ok_or_else(|| GgufError::Invalid {
            path: path.to_path_buf(),
            message: "tensor `token_embd.weight` is missing".into(),
        })?;
    let vocab = match m.opt_u64(&k("vocab_size"))? {
        Some(v) => v,
        None => embd.shape.dims().first().copied().unwrap_or(0) as u64,
    };
    let mut cfg = Map::new();
    cfg.insert("architectures".into(), json!([class]));
    cfg.insert("model_type".into(), json!(hf_arch));
    cfg.insert("hidden_size".into(), json!(hidden));
    cfg.insert(
        "intermediate_size".into(),
        json!(m.u64(&k("feed_forward_length"))?),
    );
    cfg.insert("num_hidden_layers".into(), json!(m.u64(&k("block_count"))?));
    cfg.insert("num_attention_heads".into(), json!(n_head));
    cfg.insert("num_key_value_heads".into(), json!(n_kv));
    cfg.insert("head_dim".into(), json!(head_dim));
    if arch == "gemma3" {
        gemma3_settings(&m, hidden, n_head, head_dim, &mut cfg)?;
    } else {
        cfg.insert("hidden_act".into(), json!("silu"));
    }
    cfg.insert(
        "rms_norm_eps".into(),
        m.opt_f64(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(json!(1e-6)),
    );
    cfg.insert(
        "rope_theta".into(),
        m.opt_f64(&k("rope.freq_base"))?.unwrap_or(json!(10000.0)),
    );
    cfg.insert(
        "max_position_embeddings".into(),
        json!(m.opt_u64(&k("context_length"))?.unwrap_or(2048)),
    );
    cfg.insert("vocab_size".into(), json!(vocab));
    cfg.insert(
        "tie_word_embeddings".into(),
        json!(!infos.contains_key("output.weight")),
    );
    let has_qkv_bias = infos.contains_key("blk.0.attn_q.bias");
    match arch.as_str() {
        "llama" => {
            cfg.insert("attention_bias".into(), json!(has_qkv_bias));
            cfg.insert("mlp_bias".into(), json!(false));
        }
        "qwen3" => {
            cfg.insert("attention_bias".into(), json!(has_qkv_bias));
        }
        _ => {}
    }
    if arch.starts_with("qwen") {
        cfg.insert("use_sliding_window".into(), json!(false));
    }
    for (hf, key) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = m.opt_u64(key)? {
            cfg.insert(hf.into(), json!(id));
        }
    }
    // The dtype GGUF weights dequantize to (load_gguf then casts to the requested compute dtype).
    cfg.insert("torch_dtype".into(), json!("float32"));
    rope_scaling(&m, &arch, &mut cfg)?;
    Ok(Json::Object(cfg))
}

/// Gemma 3's settings as llama.cpp reads them (`llama_model_gemma3::load_arch_hparams`): a sliding window when
/// `attention.sliding_window` is set, on the layers `attention.sliding_window_pattern` marks (a list, or every
/// n-th layer full; n = 6 when absent), with their own RoPE base `rope.freq_base_swa` (10 000 when absent) and no
/// scaling; scores scaled by 1/√head_dim, or 1/√(hidden / heads) for the 62-layer 27B; logit soft-capping read so
/// that it is refused.
fn gemma3_settings(
    m: &Meta<'_>,
    hidden: u64,
    n_head: u64,
    head_dim: u64,
    cfg: &mut Map<String, Json>,
) -> Result<(), GgufError> {
    let k = |s: &str| format!("gemma3.{s}");
    let layers = m.u64(&k("block_count"))?;
    cfg.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    let scalar = if layers == 62 {
        hidden / n_head
    } else {
        head_dim
    };
    cfg.insert("query_pre_attn_scalar".into(), json!(scalar));
    let window = m
        .opt_u64(&k("attention.sliding_window"))?
        .filter(|&w| w > 0);
    let sliding: Vec<bool> = match (window, m.md.get(&k("attention.sliding_window_pattern"))) {
        (None, _) => vec![false; layers as usize],
        (Some(_), Some(Value::Array(xs))) => xs
            .iter()
            .map(|x| match x {
                Value::Bool(b) => Ok(*b),
                _ => Err(GgufError::BadValue {
                    path: m.path.to_path_buf(),
                    key: k("attention.sliding_window_pattern"),
                    why: "expected a list of booleans".into(),
                }),
            })
            .collect::<Result<_, _>>()?,
        (Some(_), _) => {
            let n = m
                .opt_u64(&k("attention.sliding_window_pattern"))?
                .unwrap_or(6);
            (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
        }
    };
    if sliding.len() != layers as usize {
        return Err(GgufError::Invalid {
            path: m.path.to_path_buf(),
            message: format!(
                "`{}` has {} entries for {layers} layers",
                k("attention.sliding_window_pattern"),
                sliding.len()
            ),
        });
    }
    let types: Vec<&str> = sliding
        .iter()
        .map(|&s| {
            if s {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    cfg.insert("layer_types".into(), json!(types));
    cfg.insert("sliding_window".into(), json!(window));
    cfg.insert(
        "rope_local_base_freq".into(),
        m.opt_f64(&k("rope.freq_base_swa"))?
            .unwrap_or(json!(10000.0)),
    );
    if let Some(cap) = m.opt_f64(&k("final_logit_softcapping"))? {
        cfg.insert("final_logit_softcapping".into(), cap);
    }
    Ok(())
}

fn rope_scaling(m: &Meta<'_>, arch: &str, cfg: &mut Map<String, Json>) -> Result<(), GgufError> {
    let kind = m.opt_str(&format!("{arch}.rope.scaling.type"))?;
    match kind.as_deref() {
        None | Some("none") => {}
        Some("linear") => {
            let factor = m
                .opt_f64(&format!("{arch}.rope.scaling.factor"))?
                .unwrap_or(json!(1.0));
            cfg.insert(
                "rope_scaling".into(),
                json!({"rope_type": "linear", "factor": factor}),
            );
        }
        Some(other) => {
            return Err(GgufError::Invalid {
                path: m.path.to_path_buf(),
                message: format!(
                    "rope scaling `{other}` is not supported (supported: linear, llama3 via rope_freqs)"
                ),
            });
        }
    }
    Ok(())
}

/// Turns llama.cpp's per-frequency rope factors (`rope_freqs.weight`) back into HF's llama3 `rope_scaling` when
/// they are exactly what the standard Llama 3.1/3.2 parameters give (original context 8192, low 1, high 4, factor
/// = the largest factor, or 8/16/32/64 when no frequency reaches it); returns `None` otherwise.
pub fn llama3_rope_scaling(factors: &[f32], rope_theta: f64, head_dim: usize) -> Option<Json> {
    if factors.is_empty() || factors.len() * 2 != head_dim {
        return None;
    }
    let largest = f64::from(factors.iter().copied().fold(f32::MIN, f32::max));
    let (low, high, old_ctx) = (1.0f64, 4.0f64, 8192.0f64);
    let fits = |factor: f64| {
        factors.iter().enumerate().all(|(i, &got)| {
            // convert_hf_to_gguf.py computes the frequencies in float32 and the factors in float64.
            let freq = 1.0f32 / (rope_theta as f32).powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            let want = if wavelen < old_ctx / high {
                1.0
            } else if wavelen > old_ctx / low {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            (f64::from(got) - want).abs() <= 1e-4 * want
        })
    };
    let factor = [largest, 8.0, 16.0, 32.0, 64.0]
        .into_iter()
        .find(|&f| f > 1.0 && fits(f))?;
    Some(json!({
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx as u64,
    }))
}
