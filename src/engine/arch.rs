//! Model architecture description parsed from a Hugging Face `config.json`.

use serde_json::Value;

use super::error::{EngineError, Result};

/// The decoder families the engine can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchKind {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl ArchKind {
    /// `model_type` strings accepted in config.json.
    pub const SUPPORTED: &'static [&'static str] = &["llama", "mistral", "qwen2", "qwen3"];

    pub fn from_model_type(s: &str) -> Result<Self> {
        match s {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(EngineError::UnsupportedModelType {
                found: other.to_string(),
                supported: Self::SUPPORTED.join(", "),
            }),
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything the model builder needs from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: ArchKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (qwen2 always; llama/mistral with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub torch_dtype: Option<String>,
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| EngineError::key(key, "expected a non-negative integer"))
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| EngineError::key(key, "expected a non-negative integer or null")),
    }
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| EngineError::key(key, "expected a number")),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| EngineError::key(key, "expected true or false")),
    }
}

/// `eos_token_id` may be an integer or a list of integers.
fn token_ids(v: &Value, key: &str) -> Result<Vec<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| EngineError::key(key, "expected token ids"))
            })
            .collect(),
        Some(x) => x
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(|x| vec![x])
            .ok_or_else(|| EngineError::key(key, "expected a token id or a list of ids")),
    }
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json` value.
    pub fn from_hf_config(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).ok_or_else(|| {
            EngineError::key(
                "model_type",
                "missing; expected one of llama, mistral, qwen2, qwen3",
            )
        })?;
        let arch = ArchKind::from_model_type(model_type)?;
        let hidden_size = get_usize(v, "hidden_size")?;
        let num_heads = get_usize(v, "num_attention_heads")?;
        if num_heads == 0 {
            return Err(EngineError::key("num_attention_heads", "must be > 0"));
        }
        let num_kv_heads = opt_usize(v, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(EngineError::key(
                "num_key_value_heads",
                format!("{num_kv_heads} must divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match opt_usize(v, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(EngineError::key(
                        "head_dim",
                        "absent and hidden_size is not divisible by num_attention_heads",
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(EngineError::key("head_dim", "must be even for RoPE"));
        }
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            rs.get(k).and_then(Value::as_f64).ok_or_else(|| {
                                EngineError::key(format!("rope_scaling.{k}"), "expected a number")
                            })
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => {
                        return Err(EngineError::key(
                            "rope_scaling",
                            format!(
                                "rope_type {other:?} is not supported (supported: default, llama3)"
                            ),
                        ));
                    }
                }
            }
        };
        let attention_bias = opt_bool(v, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            ArchKind::Qwen2 => (true, false),
            ArchKind::Qwen3 => (attention_bias, attention_bias),
            ArchKind::Llama | ArchKind::Mistral => (attention_bias, attention_bias),
        };
        let mlp_bias = opt_bool(v, "mlp_bias")?.unwrap_or(false);
        let default_tie = false;
        Ok(Self {
            arch,
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            num_layers: get_usize(v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: opt_f64(v, "rope_theta")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: opt_usize(v, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(default_tie),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: arch == ArchKind::Qwen3,
            bos_token_id: token_ids(v, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(v, "eos_token_id")?,
            torch_dtype: v
                .get("torch_dtype")
                .or_else(|| v.get("dtype"))
                .and_then(Value::as_str)
                .map(String::from),
        })
    }

    /// Inverse RoPE frequencies (length head_dim/2), with llama3 scaling applied as in
    /// transformers `_compute_llama3_parameters`.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let Some(s) = self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_smollm2_like_llama() {
        let v = serde_json::json!({"model_type":"llama","vocab_size":49152,"hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "rms_norm_eps":1e-5,"rope_theta":100000.0,"max_position_embeddings":8192,"tie_word_embeddings":true,
            "bos_token_id":1,"eos_token_id":2,"torch_dtype":"bfloat16"});
        let c = ModelConfig::from_hf_config(&v).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_kv_heads, 3);
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn qwen_variants_and_explicit_head_dim() {
        let v = serde_json::json!({"model_type":"qwen3","vocab_size":10,"hidden_size":32,"head_dim":16,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,
            "eos_token_id":[5,6]});
        let c = ModelConfig::from_hf_config(&v).unwrap();
        assert_eq!(c.head_dim, 16);
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        let mut v2 = v.clone();
        v2["model_type"] = "qwen2".into();
        assert!(ModelConfig::from_hf_config(&v2).unwrap().qkv_bias);
    }

    #[test]
    fn unsupported_model_type_lists_supported() {
        let v = serde_json::json!({"model_type":"gpt2"});
        let e = ModelConfig::from_hf_config(&v).unwrap_err().to_string();
        assert!(
            e.contains("gpt2") && e.contains("llama, mistral, qwen2, qwen3"),
            "{e}"
        );
    }

    #[test]
    fn llama3_rope_scaling_matches_transformers() {
        // Llama 3.1 8B settings. Expected values computed by hand from transformers'
        // `_compute_llama3_parameters` formula: the highest frequency (i=0) is unchanged (wavelen 2π < 2048),
        // the lowest (i=63, wavelen ≈ 3.9e5 > 8192) is divided by factor 8.
        let v = serde_json::json!({"model_type":"llama","vocab_size":10,"hidden_size":4096,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":32,"num_key_value_heads":8,
            "rope_theta":500000.0,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}});
        let c = ModelConfig::from_hf_config(&v).unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert!((f[0] - 1.0).abs() < 1e-12);
        let raw_last = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((f[63] - raw_last / 8.0).abs() < 1e-18);
    }
}
