//! Model architecture description parsed from a Hugging Face `config.json`.

use serde_json::Value;

use super::error::{EngineError, Result};

/// Leaf names of the linear layers inside a decoder layer (LoRA targets for `all`).
pub const LINEAR_LEAVES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The decoder families the engine can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchKind {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Gemma 3's text model (`gemma3_text`: gemma-3-270m, gemma-3-1b): (1 + w) RMSNorms, norms before and after
    /// attention and MLP, GeGLU, q/k norms, √hidden-scaled embeddings, sliding-window layers with their own RoPE base.
    Gemma3,
}

impl ArchKind {
    /// `model_type` strings accepted in config.json.
    pub const SUPPORTED: &'static [&'static str] = &[
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma3_text",
        "gemma3",
    ];

    pub fn from_model_type(s: &str) -> Result<Self> {
        match s {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            // Gemma 3's image-and-text checkpoints: termtune runs their text model (see `ModelConfig::image_text`).
            "gemma3_text" | "gemma3" => Ok(Self::Gemma3),
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
            Self::Gemma3 => "gemma3_text",
        }
    }
}

/// The MLP gate's activation (`hidden_act`; Gemma's `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU with the tanh approximation).
    GeluTanh,
}

impl Activation {
    /// The activation names termtune computes.
    pub const SUPPORTED: &'static str = "silu, gelu_pytorch_tanh";

    fn parse(key: &str, name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            // transformers' `gelu_new` is the same tanh formula.
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Self::GeluTanh),
            other => Err(EngineError::key(
                key,
                format!(
                    "activation {other:?} is not supported (supported: {})",
                    Self::SUPPORTED
                ),
            )),
        }
    }
}

/// Llama 3 style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// YaRN RoPE scaling (`rope_type: "yarn"`), its optional keys resolved as transformers 5 resolves them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnRopeScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    /// `beta_fast` (32 when absent): rotations below which a frequency is interpolated.
    pub beta_fast: f64,
    /// `beta_slow` (1 when absent): rotations above which a frequency is kept.
    pub beta_slow: f64,
    /// cos and sin are multiplied by it: `attention_factor`, else 0.1·ln(factor) + 1 (with `mscale` and
    /// `mscale_all_dim`, the ratio of the two such values).
    pub attention_factor: f64,
    /// `truncate` (true when absent): the correction range rounded outwards to whole frequencies.
    pub truncate: bool,
}

impl YarnRopeScaling {
    /// transformers' `yarn_get_mscale`.
    pub fn mscale(scale: f64, mscale: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    }
}

/// RoPE frequency scaling, from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "linear"`: every inverse frequency divided by `factor`
    /// (transformers `_compute_linear_scaling_rope_parameters`).
    Linear { factor: f64 },
    /// `rope_type: "llama3"` (transformers `_compute_llama3_parameters`).
    Llama3(Llama3RopeScaling),
    /// `rope_type: "yarn"` (transformers `_compute_yarn_parameters`): the only kind with an attention factor.
    Yarn(YarnRopeScaling),
}

impl RopeScaling {
    /// The scaling factor.
    pub fn factor(&self) -> f64 {
        match self {
            Self::Linear { factor } => *factor,
            Self::Llama3(s) => s.factor,
            Self::Yarn(s) => s.factor,
        }
    }
}

/// The `rope_type`s termtune computes (`default` is plain RoPE).
pub const SUPPORTED_ROPE_TYPES: &str = "default, linear, llama3, yarn";

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
    pub rope_scaling: Option<RopeScaling>,
    /// Per-frequency divisors of the inverse frequencies that a GGUF file carried (`rope_freqs.weight`, passed on
    /// as `gguf_rope_freqs` when they are not Llama 3's), applied as llama.cpp does.
    pub rope_freq_factors: Option<Vec<f64>>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (qwen2 always; llama/mistral with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// The MLP gate's activation.
    pub activation: Activation,
    /// Every RMSNorm multiplies by (1 + weight), in float32 (Gemma).
    pub norm_offset: bool,
    /// Gemma 3's four norms per layer: the attention output and the MLP output are normalised before their residual
    /// adds (`post_attention_layernorm`, `post_feedforward_layernorm`), and the MLP input norm is
    /// `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// The input embeddings are multiplied by this, rounded to the model dtype (Gemma: √hidden_size).
    pub embed_scale: Option<f64>,
    /// Scale of the attention scores: 1/√head_dim, Gemma's 1/√query_pre_attn_scalar.
    pub attn_scale: f64,
    /// Per layer, its sliding window: a query sees the `w` positions that end at itself (transformers'
    /// `kv_idx > q_idx - sliding_window`); none: every earlier position.
    pub layer_windows: Vec<Option<usize>>,
    /// The RoPE base of the sliding-window layers, unscaled, where it is not `rope_theta` (Gemma 3's local base).
    pub local_rope_theta: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub torch_dtype: Option<String>,
    /// The text model of an image-and-text checkpoint (Gemma 3 4B and larger, `Gemma3ForConditionalGeneration`):
    /// its weights are stored under `language_model.` ([`text_tensor_name`], [`checkpoint_name`]), the vision
    /// tower and projector are left on disk (and copied through by an export), adapters name its modules as PEFT
    /// does on that checkpoint.
    pub image_text: bool,
}

/// Whether a config.json is an image-and-text checkpoint whose text model termtune runs.
pub fn is_image_text(config: &Value) -> bool {
    config.get("model_type").and_then(Value::as_str) == Some("gemma3")
}

/// termtune's name for a tensor or module of a checkpoint (`model.layers.0…`, `lm_head…`), or `None` for what
/// termtune does not run (an image-and-text checkpoint's vision tower and projector). The text model's names as
/// transformers 4 stores them (`language_model.model.…`, also how transformers 5 saves) and as transformers 5
/// names them in memory (`model.language_model.…`, what PEFT 0.21 writes into an adapter) both map.
pub fn text_tensor_name(image_text: bool, name: &str) -> Option<String> {
    if let Some(rest) = name
        .strip_prefix("language_model.model.")
        .or_else(|| name.strip_prefix("model.language_model."))
    {
        return Some(format!("model.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("language_model.lm_head") {
        return Some(format!("lm_head{rest}"));
    }
    if image_text && !name.starts_with("lm_head") {
        return None;
    }
    Some(name.to_string())
}

/// The checkpoint's name of termtune's tensor or module `name` (inverse of [`text_tensor_name`], in the stored
/// layout: transformers 4's, which transformers 5 reads and writes too).
pub fn checkpoint_name(image_text: bool, name: &str) -> String {
    if image_text {
        format!("language_model.{name}")
    } else {
        name.to_string()
    }
}

/// Gemma3TextConfig's defaults for the keys an image-and-text checkpoint's `text_config` may leave out (its
/// config.json writes only what differs from them).
fn gemma3_text_defaults() -> Value {
    serde_json::json!({
        "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": 1,
    })
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
                format!(
                    "missing; expected one of {}",
                    ArchKind::SUPPORTED.join(", ")
                ),
            )
        })?;
        let arch = ArchKind::from_model_type(model_type)?;
        if model_type == "gemma3" {
            // The text model of Gemma3ForConditionalGeneration: its `text_config` over Gemma3TextConfig's defaults,
            // the checkpoint's own token ids and dtype where it gives them.
            let Some(Value::Object(text)) = v.get("text_config") else {
                return Err(EngineError::key(
                    "text_config",
                    "missing; a `gemma3` (image-and-text) config.json keeps its language model's settings there",
                ));
            };
            let mut merged = gemma3_text_defaults();
            if let Value::Object(m) = &mut merged {
                m.extend(text.clone());
                for k in ["bos_token_id", "eos_token_id", "torch_dtype", "dtype"] {
                    if let Some(x) = v.get(k).filter(|x| !x.is_null()) {
                        m.insert(k.to_string(), x.clone());
                    }
                }
                match m.get("model_type").and_then(Value::as_str) {
                    None | Some("gemma3_text") => {}
                    Some(other) => {
                        return Err(EngineError::key(
                            "text_config.model_type",
                            format!("{other:?}: expected gemma3_text"),
                        ));
                    }
                }
                m.insert("model_type".into(), Value::String("gemma3_text".into()));
            }
            let mut c = Self::from_hf_config(&merged)?;
            c.image_text = true;
            return Ok(c);
        }
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
            // Gemma3TextConfig's default.
            None if arch == ArchKind::Gemma3 => 256,
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
        let (rope_theta, rope_scaling, local_rope_theta) = if arch == ArchKind::Gemma3 {
            gemma3_rope_settings(v)?
        } else {
            let (t, s) = rope_settings(v)?;
            (t, s, None)
        };
        let rope_freq_factors = match v.get("gguf_rope_freqs") {
            None | Some(Value::Null) => None,
            Some(Value::Array(xs)) => {
                let fs: Option<Vec<f64>> = xs
                    .iter()
                    .map(|x| x.as_f64().filter(|f| f.is_finite() && *f > 0.0))
                    .collect();
                match fs {
                    Some(fs) if fs.len() == head_dim / 2 => Some(fs),
                    _ => {
                        return Err(EngineError::key(
                            "gguf_rope_freqs",
                            format!("expected {} positive numbers (head_dim / 2)", head_dim / 2),
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(EngineError::key(
                    "gguf_rope_freqs",
                    "expected a list of numbers",
                ));
            }
        };
        let attention_bias = opt_bool(v, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            ArchKind::Qwen2 => (true, false),
            ArchKind::Qwen3 | ArchKind::Gemma3 => (attention_bias, attention_bias),
            ArchKind::Llama | ArchKind::Mistral => (attention_bias, attention_bias),
        };
        let mlp_bias = opt_bool(v, "mlp_bias")?.unwrap_or(false);
        let gemma = arch == ArchKind::Gemma3;
        // transformers' defaults where a key is absent: Gemma3TextConfig ties the embeddings, the others do not.
        let default_tie = gemma;
        let num_layers = get_usize(v, "num_hidden_layers")?;
        let activation = if gemma {
            // Gemma3TextConfig reads `hidden_activation` only.
            let name = opt_str(v, "hidden_activation")?.unwrap_or("gelu_pytorch_tanh");
            Activation::parse("hidden_activation", name)?
        } else {
            Activation::parse("hidden_act", opt_str(v, "hidden_act")?.unwrap_or("silu"))?
        };
        let attn_scale = if gemma {
            for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if opt_f64(v, key)?.is_some() {
                    return Err(EngineError::key(
                        key,
                        "logit soft-capping (Gemma 2) is not supported; Gemma 3 checkpoints have it null",
                    ));
                }
            }
            if opt_bool(v, "use_bidirectional_attention")? == Some(true) {
                return Err(EngineError::key(
                    "use_bidirectional_attention",
                    "bidirectional attention (an embedding model's) is not supported: termtune trains causal language models",
                ));
            }
            let s = opt_f64(v, "query_pre_attn_scalar")?.unwrap_or(256.0);
            if !(s.is_finite() && s > 0.0) {
                return Err(EngineError::key("query_pre_attn_scalar", "must be > 0"));
            }
            1.0 / s.sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        let layer_windows = layer_windows(v, arch, num_layers)?;
        Ok(Self {
            arch,
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors,
            max_position_embeddings: opt_usize(v, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(default_tie),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: matches!(arch, ArchKind::Qwen3 | ArchKind::Gemma3),
            activation,
            norm_offset: gemma,
            sandwich_norms: gemma,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            attn_scale,
            layer_windows,
            local_rope_theta,
            bos_token_id: token_ids(v, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(v, "eos_token_id")?,
            torch_dtype: v
                .get("torch_dtype")
                .or_else(|| v.get("dtype"))
                .and_then(Value::as_str)
                .map(String::from),
            image_text: false,
        })
    }

    /// Inverse RoPE frequencies (length head_dim/2), with the scaling applied as in transformers
    /// (`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`, `_compute_yarn_parameters`),
    /// then a GGUF file's per-frequency divisors.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let scaled = match self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.into_iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3(s)) => llama3_inv_freq(base, &s),
            Some(RopeScaling::Yarn(s)) => yarn_inv_freq(base, &s, self.rope_theta),
        };
        match &self.rope_freq_factors {
            Some(fs) => scaled.iter().zip(fs).map(|(f, d)| f / d).collect(),
            None => scaled,
        }
    }

    /// What the global layers' cos and sin are multiplied by (transformers' `attention_scaling`): YaRN's attention
    /// factor, else 1.
    pub fn rope_attention_factor(&self) -> f64 {
        match self.rope_scaling {
            Some(RopeScaling::Yarn(s)) => s.attention_factor,
            _ => 1.0,
        }
    }

    /// Inverse RoPE frequencies of the sliding-window layers when they have their own base (unscaled).
    pub fn local_rope_inv_freq(&self) -> Option<Vec<f64>> {
        let d = self.head_dim;
        self.local_rope_theta.map(|theta| {
            (0..d / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
                .collect()
        })
    }

    /// Whether layer `i` uses the sliding-window layers' RoPE base.
    pub fn layer_is_local(&self, i: usize) -> bool {
        self.local_rope_theta.is_some() && self.layer_windows.get(i).is_some_and(Option::is_some)
    }
}

fn opt_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(EngineError::key(key, "expected a text")),
    }
}

/// Each layer's sliding window, as transformers builds its masks: Gemma 3 from `layer_types` (or the older
/// `sliding_window_pattern`: every n-th layer full) with `sliding_window`; Mistral every layer when
/// `sliding_window` is set (transformers' default 4096 when the key is absent); Qwen2/Qwen3 only with
/// `use_sliding_window`, the layers `layer_types` marks (or those from `max_window_layers` on); Llama none.
fn layer_windows(v: &Value, arch: ArchKind, n: usize) -> Result<Vec<Option<usize>>> {
    let layer_types = match v.get("layer_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(xs)) => {
            let kinds = xs
                .iter()
                .map(|x| match x.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(EngineError::key(
                        "layer_types",
                        format!(
                            "{x} is not a layer type termtune knows (sliding_attention, full_attention)"
                        ),
                    )),
                })
                .collect::<Result<Vec<bool>>>()?;
            if kinds.len() != n {
                return Err(EngineError::key(
                    "layer_types",
                    format!("{} entries for {n} layers (num_hidden_layers)", kinds.len()),
                ));
            }
            Some(kinds)
        }
        Some(_) => return Err(EngineError::key("layer_types", "expected a list")),
    };
    let window = |default: Option<usize>| -> Result<Option<usize>> {
        let w = match v.get("sliding_window") {
            None => default,
            Some(Value::Null) => None,
            Some(_) => opt_usize(v, "sliding_window")?,
        };
        if w == Some(0) {
            return Err(EngineError::key("sliding_window", "must be > 0"));
        }
        Ok(w)
    };
    let every = |w: Option<usize>, sliding: &dyn Fn(usize) -> bool| -> Vec<Option<usize>> {
        (0..n).map(|i| w.filter(|_| sliding(i))).collect()
    };
    Ok(match arch {
        ArchKind::Llama => vec![None; n],
        ArchKind::Mistral => every(window(Some(4096))?, &|_| true),
        ArchKind::Qwen2 | ArchKind::Qwen3 => {
            let w = if opt_bool(v, "use_sliding_window")?.unwrap_or(false) {
                window(Some(4096))?
            } else {
                None
            };
            let from = opt_usize(v, "max_window_layers")?.unwrap_or(28);
            match &layer_types {
                Some(kinds) => every(w, &|i| kinds[i]),
                None => every(w, &|i| i >= from),
            }
        }
        ArchKind::Gemma3 => {
            let w = window(Some(4096))?;
            let kinds = match layer_types {
                Some(kinds) => kinds,
                None => {
                    let pattern = opt_usize(v, "sliding_window_pattern")?.unwrap_or(6);
                    if pattern == 0 {
                        return Err(EngineError::key("sliding_window_pattern", "must be > 0"));
                    }
                    (0..n).map(|i| (i + 1) % pattern != 0).collect()
                }
            };
            if w.is_none() && kinds.iter().any(|s| *s) {
                return Err(EngineError::key(
                    "sliding_window",
                    "null, but `layer_types` has sliding_attention layers: set the window size",
                ));
            }
            every(w, &|i| kinds[i])
        }
    })
}

/// Gemma 3's two RoPE settings: (global base, global scaling, local base). transformers 4 wrote `rope_theta`
/// (default 1 000 000), `rope_local_base_freq` (default 10 000) and `rope_scaling` (the global layers'); transformers 5
/// writes `rope_parameters` with one object per layer type (`full_attention`, `sliding_attention`). Where both
/// layouts give a value they must agree. The sliding layers' RoPE is never scaled.
fn gemma3_rope_settings(v: &Value) -> Result<(f64, Option<RopeScaling>, Option<f64>)> {
    let mut legacy = serde_json::Map::new();
    for k in [
        "rope_theta",
        "rope_scaling",
        "partial_rotary_factor",
        "max_position_embeddings",
        "original_max_position_embeddings",
    ] {
        if let Some(x) = v.get(k) {
            legacy.insert(k.to_string(), x.clone());
        }
    }
    let (mut global, mut scaling) = rope_settings(&Value::Object(legacy))?;
    let global_given = opt_f64(v, "rope_theta")?.is_some();
    if !global_given {
        global = 1_000_000.0;
    }
    let mut local = opt_f64(v, "rope_local_base_freq")?;
    let nested = match v.get("rope_parameters") {
        Some(Value::Object(m))
            if m.contains_key("full_attention") || m.contains_key("sliding_attention") =>
        {
            Some(m)
        }
        Some(Value::Object(_)) => {
            return Err(EngineError::key(
                "rope_parameters",
                "Gemma 3 keeps one RoPE object per layer type: expected `full_attention` and `sliding_attention`",
            ));
        }
        None | Some(Value::Null) => None,
        Some(_) => return Err(EngineError::key("rope_parameters", "expected an object")),
    };
    if let Some(m) = nested {
        for k in m.keys() {
            if k != "full_attention" && k != "sliding_attention" {
                return Err(EngineError::key(
                    format!("rope_parameters.{k}"),
                    "not a layer type (full_attention, sliding_attention)",
                ));
            }
        }
        let part = |k: &str| -> Result<Option<(Option<f64>, Option<RopeScaling>)>> {
            match m.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(o)) => {
                    Ok(Some(rope_object(o, &format!("rope_parameters.{k}"), v)?))
                }
                Some(_) => Err(EngineError::key(
                    format!("rope_parameters.{k}"),
                    "expected an object",
                )),
            }
        };
        if let Some((theta, s)) = part("full_attention")? {
            if let Some(t) = theta {
                if global_given && t != global {
                    return Err(EngineError::key(
                        "rope_theta",
                        format!(
                            "`rope_theta` {global} and `rope_parameters.full_attention.rope_theta` {t} disagree; keep one"
                        ),
                    ));
                }
                global = t;
            }
            if scaling.is_some() && s != scaling {
                return Err(EngineError::key(
                    "rope_scaling",
                    "`rope_scaling` and `rope_parameters.full_attention` give different RoPE scaling; keep one",
                ));
            }
            scaling = s;
        }
        if let Some((theta, s)) = part("sliding_attention")? {
            if s.is_some() {
                return Err(EngineError::key(
                    "rope_parameters.sliding_attention.rope_type",
                    "scaled RoPE on the sliding-window layers is not supported (Gemma 3 uses the default there)",
                ));
            }
            if let Some(t) = theta {
                if local.is_some_and(|l| l != t) {
                    return Err(EngineError::key(
                        "rope_local_base_freq",
                        "`rope_local_base_freq` and `rope_parameters.sliding_attention.rope_theta` disagree; keep one",
                    ));
                }
                local = Some(t);
            }
        }
    }
    let local = local.unwrap_or(10_000.0);
    if !(local.is_finite() && local > 0.0) {
        return Err(EngineError::key("rope_local_base_freq", "must be > 0"));
    }
    Ok((global, scaling, Some(local)))
}

/// transformers `_compute_llama3_parameters` on the unscaled inverse frequencies.
fn llama3_inv_freq(base: Vec<f64>, s: &Llama3RopeScaling) -> Vec<f64> {
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
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// transformers `_compute_yarn_parameters` on the unscaled inverse frequencies (`base[i]` = θ^(−2i/d)): each
/// frequency between the interpolated (÷ factor) and the kept one by a ramp over the correction range.
fn yarn_inv_freq(base: Vec<f64>, s: &YarnRopeScaling, theta: f64) -> Vec<f64> {
    let dim = (base.len() * 2) as f64;
    let old = s.original_max_position_embeddings as f64;
    let correction_dim = |rotations: f64| {
        dim * (old / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction_dim(s.beta_fast), correction_dim(s.beta_slow));
    if s.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(dim - 1.0);
    if low == high {
        high += 0.001;
    }
    base.into_iter()
        .enumerate()
        .map(|(i, f)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            f / s.factor * (1.0 - keep) + f * keep
        })
        .collect()
}

/// The keys a `rope_type` reads besides `rope_type`/`type`, `rope_theta` and a neutral `partial_rotary_factor`;
/// `None` for a type termtune does not compute.
fn rope_type_keys(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "default" => Some(&[]),
        "linear" => Some(&["factor"]),
        "llama3" => Some(&[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ]),
        "yarn" => Some(&[
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ]),
        _ => None,
    }
}

/// Reads one RoPE object, `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5), named `key` in
/// messages: its own `rope_theta`, if any, and its scaling. Every key that is present must be one this
/// `rope_type` reads: an unknown type or key would change the frequencies, so it is an error, never ignored.
///
/// `config` is the whole config.json: where llama3 or yarn lack `original_max_position_embeddings`, transformers 5
/// takes the top-level `original_max_position_embeddings`, else `max_position_embeddings`.
fn rope_object(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    config: &Value,
) -> Result<(Option<f64>, Option<RopeScaling>)> {
    let name = |k: &str| format!("{key}.{k}");
    let text = |k: &str| match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(EngineError::key(name(k), "expected a text")),
    };
    // transformers 4 wrote `type`, later versions `rope_type`; both are read.
    let kind = match (text("rope_type")?, text("type")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(EngineError::key(
                name("rope_type"),
                format!("`{key}.rope_type` {a:?} and `{key}.type` {b:?} disagree; keep one"),
            ));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => "default",
    };
    if kind == "dynamic" {
        return Err(EngineError::key(
            name("rope_type"),
            format!(
                "rope_type \"dynamic\" is not supported: its frequencies change with each batch's length (transformers keeps the longest length seen so far), so no fixed table computes it (supported: {SUPPORTED_ROPE_TYPES})"
            ),
        ));
    }
    let Some(reads) = rope_type_keys(kind) else {
        return Err(EngineError::key(
            name("rope_type"),
            format!(
                "rope_type {kind:?} is not supported (supported: {SUPPORTED_ROPE_TYPES}); termtune will not train or run the model with other RoPE frequencies than it was made with"
            ),
        ));
    };
    let number = |k: &str| match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| EngineError::key(name(k), "expected a number")),
    };
    for (k, value) in obj {
        match k.as_str() {
            "rope_type" | "type" | "rope_theta" => {}
            "partial_rotary_factor" => {
                if number(k)?.is_some_and(|p| p != 1.0) {
                    return Err(EngineError::key(
                        name(k),
                        "partial rotary embeddings are not supported: termtune rotates the whole head (1.0)",
                    ));
                }
            }
            k if reads.contains(&k) => {}
            _ if value.is_null() => {}
            other => {
                let reads = if reads.is_empty() {
                    "only rope_theta".to_string()
                } else {
                    format!("rope_theta, {}", reads.join(", "))
                };
                return Err(EngineError::key(
                    name(other),
                    format!(
                        "not understood for rope_type {kind:?} (termtune reads {reads}); it would change the RoPE frequencies, so termtune does not ignore it"
                    ),
                ));
            }
        }
    }
    let positive = |k: &str| match number(k)? {
        Some(f) if f > 0.0 => Ok(f),
        Some(_) => Err(EngineError::key(name(k), "must be > 0")),
        None => Err(EngineError::key(
            name(k),
            format!("missing; rope_type {kind:?} needs it"),
        )),
    };
    // The pretraining length: this object's, else the config's top-level one, else max_position_embeddings.
    let original = || -> Result<f64> {
        let own = number("original_max_position_embeddings")?;
        let top = opt_f64(config, "original_max_position_embeddings")?;
        let n = match (own, top) {
            (Some(a), Some(b)) if a != b => {
                return Err(EngineError::key(
                    name("original_max_position_embeddings"),
                    format!("{a} and the top-level `original_max_position_embeddings` {b} disagree; keep one"),
                ));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => opt_f64(config, "max_position_embeddings")?.ok_or_else(|| {
                EngineError::key(
                    name("original_max_position_embeddings"),
                    format!("missing, and no max_position_embeddings to take it from; rope_type {kind:?} needs it"),
                )
            })?,
        };
        if n >= 1.0 && n.fract() == 0.0 {
            Ok(n)
        } else {
            Err(EngineError::key(
                name("original_max_position_embeddings"),
                "must be a whole number > 0",
            ))
        }
    };
    let scaling = match kind {
        "linear" => Some(RopeScaling::Linear {
            factor: positive("factor")?,
        }),
        "yarn" => {
            let original = original()?;
            let factor = match number("factor")? {
                Some(f) if f > 0.0 => f,
                Some(_) => return Err(EngineError::key(name("factor"), "must be > 0")),
                // transformers: the ratio of the two lengths when `factor` is null.
                None => opt_f64(config, "max_position_embeddings")?.unwrap_or(original) / original,
            };
            let attention_factor = match number("attention_factor")? {
                Some(a) if a > 0.0 => a,
                Some(_) => return Err(EngineError::key(name("attention_factor"), "must be > 0")),
                None => match (number("mscale")?, number("mscale_all_dim")?) {
                    // transformers tests both for truth: a 0 is as absent.
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        YarnRopeScaling::mscale(factor, m) / YarnRopeScaling::mscale(factor, all)
                    }
                    _ => YarnRopeScaling::mscale(factor, 1.0),
                },
            };
            let truncate = match obj.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(EngineError::key(name("truncate"), "expected true or false"));
                }
            };
            // transformers: `get("beta_fast") or 32`, so a 0 is as absent.
            let beta = |k: &str, default: f64| -> Result<f64> {
                Ok(number(k)?.filter(|b| *b != 0.0).unwrap_or(default))
            };
            let s = YarnRopeScaling {
                factor,
                original_max_position_embeddings: original as usize,
                beta_fast: beta("beta_fast", 32.0)?,
                beta_slow: beta("beta_slow", 1.0)?,
                attention_factor,
                truncate,
            };
            if !(s.beta_fast > 0.0 && s.beta_slow > 0.0) {
                return Err(EngineError::key(
                    name("beta_fast"),
                    "beta_fast and beta_slow must be > 0",
                ));
            }
            Some(RopeScaling::Yarn(s))
        }
        "llama3" => {
            let s = Llama3RopeScaling {
                factor: positive("factor")?,
                low_freq_factor: positive("low_freq_factor")?,
                high_freq_factor: positive("high_freq_factor")?,
                original_max_position_embeddings: original()? as usize,
            };
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(EngineError::key(
                    name("high_freq_factor"),
                    "must be greater than low_freq_factor",
                ));
            }
            Some(RopeScaling::Llama3(s))
        }
        _ => None,
    };
    Ok((number("rope_theta")?, scaling))
}

/// `rope_theta` and the scaling, from either layout: transformers 4's top-level `rope_theta` and
/// `rope_scaling`, or transformers 5's `rope_parameters` object (which holds `rope_theta` too). Where both
/// layouts give a value they must agree; a disagreement is an error naming both keys.
fn rope_settings(v: &Value) -> Result<(f64, Option<RopeScaling>)> {
    let object = |k: &str| match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(EngineError::key(k, "expected an object or null")),
    };
    let legacy = object("rope_scaling")?
        .map(|m| rope_object(m, "rope_scaling", v))
        .transpose()?;
    let params = object("rope_parameters")?
        .map(|m| rope_object(m, "rope_parameters", v))
        .transpose()?;
    if let Some(p) = opt_f64(v, "partial_rotary_factor")?
        && p != 1.0
    {
        return Err(EngineError::key(
            "partial_rotary_factor",
            "partial rotary embeddings are not supported: termtune rotates the whole head (1.0)",
        ));
    }
    let mut theta: Option<(&str, f64)> = None;
    for (k, t) in [
        ("rope_theta", opt_f64(v, "rope_theta")?),
        ("rope_parameters.rope_theta", params.and_then(|p| p.0)),
        ("rope_scaling.rope_theta", legacy.and_then(|l| l.0)),
    ] {
        let Some(t) = t else { continue };
        match theta {
            Some((k0, t0)) if t0 != t => {
                return Err(EngineError::key(
                    k0,
                    format!("`{k0}` {t0} and `{k}` {t} disagree; keep one"),
                ));
            }
            Some(_) => {}
            None => theta = Some((k, t)),
        }
    }
    let theta = match theta {
        Some((k, t)) if !(t.is_finite() && t > 0.0) => {
            return Err(EngineError::key(k, "must be > 0"));
        }
        Some((_, t)) => t,
        None => 10_000.0,
    };
    let scaling = match (legacy, params) {
        (Some((_, a)), Some((_, b))) if a != b => {
            return Err(EngineError::key(
                "rope_scaling",
                "`rope_scaling` and `rope_parameters` give different RoPE scaling; keep one (transformers 5 writes `rope_parameters`)",
            ));
        }
        (Some((_, s)), _) | (None, Some((_, s))) => s,
        (None, None) => None,
    };
    Ok((theta, scaling))
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

    fn tiny(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({"model_type":"llama","vocab_size":10,"hidden_size":64,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":4,"max_position_embeddings":512});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn err(v: &serde_json::Value) -> String {
        ModelConfig::from_hf_config(v).unwrap_err().to_string()
    }

    /// The same RoPE settings in transformers 4's layout (top-level `rope_theta` + `rope_scaling`) and in
    /// transformers 5's (`rope_parameters`), for every supported rope_type.
    fn layout_pairs() -> Vec<(&'static str, serde_json::Value, serde_json::Value)> {
        use serde_json::json;
        vec![
            (
                "default",
                json!({"rope_theta": 100000.0}),
                json!({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}),
            ),
            (
                "linear",
                json!({"rope_theta": 50000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}),
                json!({"rope_parameters": {"rope_theta": 50000.0, "rope_type": "linear", "factor": 4.0}}),
            ),
            (
                "llama3",
                json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
                json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
            ),
        ]
    }

    #[test]
    fn old_and_new_rope_layouts_resolve_identically() {
        for (kind, old, new) in layout_pairs() {
            let a = ModelConfig::from_hf_config(&tiny(old)).unwrap();
            let b = ModelConfig::from_hf_config(&tiny(new)).unwrap();
            assert_eq!(a.rope_theta, b.rope_theta, "{kind}");
            assert_eq!(a.rope_scaling, b.rope_scaling, "{kind}");
            assert_eq!(a.rope_inv_freq(), b.rope_inv_freq(), "{kind}");
            assert_eq!(a, b, "{kind}");
            // The settings are read, not defaulted: theta is not 10000, and a scaled kind has a scaling.
            assert_ne!(b.rope_theta, 10_000.0, "{kind}");
            assert_eq!(b.rope_scaling.is_some(), kind != "default", "{kind}");
        }
        // Both layouts at once, agreeing (a transformers 5 file that kept the old keys too).
        for (kind, old, new) in layout_pairs() {
            let mut both = tiny(old.clone());
            both["rope_parameters"] = new["rope_parameters"].clone();
            let a = ModelConfig::from_hf_config(&tiny(old)).unwrap();
            assert_eq!(ModelConfig::from_hf_config(&both).unwrap(), a, "{kind}");
        }
    }

    #[test]
    fn linear_rope_divides_every_frequency_by_the_factor() {
        // transformers `_compute_linear_scaling_rope_parameters`: inv_freq /= factor, attention factor 1.
        let c = ModelConfig::from_hf_config(&tiny(serde_json::json!(
            {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}
        )))
        .unwrap();
        assert_eq!(c.rope_theta, 10_000.0);
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 8);
        for (i, x) in f.iter().enumerate() {
            let raw = 1.0 / 10_000f64.powf((2 * i) as f64 / 16.0);
            assert!((x - raw / 4.0).abs() < 1e-15, "{i}: {x}");
        }
    }

    #[test]
    fn legacy_type_key_is_read_and_must_agree_with_rope_type() {
        let with = |rs: serde_json::Value| tiny(serde_json::json!({"rope_scaling": rs}));
        let a = ModelConfig::from_hf_config(&with(
            serde_json::json!({"type": "linear", "factor": 2.0}),
        ))
        .unwrap();
        let b = ModelConfig::from_hf_config(&with(
            serde_json::json!({"rope_type": "linear", "factor": 2.0}),
        ))
        .unwrap();
        assert_eq!(a.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(a, b);
        let e = err(&with(
            serde_json::json!({"rope_type": "linear", "type": "dynamic", "factor": 2.0}),
        ));
        assert!(
            e.contains("`rope_scaling.rope_type`") && e.contains("`rope_scaling.type`"),
            "{e}"
        );
    }

    #[test]
    fn yarn_keys_resolve_as_in_transformers_5() {
        let yarn = |obj: serde_json::Value, top: serde_json::Value| {
            let mut v = tiny(serde_json::json!({"rope_scaling": obj}));
            for (k, x) in top.as_object().unwrap() {
                v[k] = x.clone();
            }
            match ModelConfig::from_hf_config(&v).map(|c| c.rope_scaling) {
                Ok(Some(RopeScaling::Yarn(s))) => Ok(s),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        // Defaults: betas 32/1, truncation, attention factor 0.1 ln(factor) + 1, length = max_position_embeddings.
        let s = yarn(
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            serde_json::json!({"max_position_embeddings": 4096}),
        )
        .unwrap();
        assert_eq!(
            (
                s.beta_fast,
                s.beta_slow,
                s.truncate,
                s.original_max_position_embeddings
            ),
            (32.0, 1.0, true, 4096)
        );
        assert!((s.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        // mscale / mscale_all_dim; a null factor is the ratio of the two lengths (DeepSeek's configs).
        let s = yarn(
            serde_json::json!({"type": "yarn", "factor": null, "original_max_position_embeddings": 1024,
                "mscale": 1.0, "mscale_all_dim": 0.5}),
            serde_json::json!({"max_position_embeddings": 8192}),
        )
        .unwrap();
        assert_eq!(s.factor, 8.0);
        let want = (0.1 * 8f64.ln() + 1.0) / (0.05 * 8f64.ln() + 1.0);
        assert!((s.attention_factor - want).abs() < 1e-15);
        // The top-level pretraining length (Phi-3's place) agrees with the object's or is an error.
        let e = yarn(
            serde_json::json!({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
            serde_json::json!({"original_max_position_embeddings": 128}),
        )
        .unwrap_err();
        assert!(
            e.contains("original_max_position_embeddings") && e.contains("disagree"),
            "{e}"
        );
        let e = yarn(
            serde_json::json!({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}),
            serde_json::json!({}),
        )
        .unwrap_err();
        assert!(e.contains("rope_scaling.truncate"), "{e}");
        let e = yarn(
            serde_json::json!({"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "extra": 1}),
            serde_json::json!({}),
        )
        .unwrap_err();
        assert!(e.contains("rope_scaling.extra"), "{e}");
    }

    #[test]
    fn unknown_rope_types_are_errors_naming_them() {
        for kind in ["dynamic", "longrope", "mrope", "proportional", "su"] {
            for key in ["rope_scaling", "rope_parameters"] {
                let v = tiny(serde_json::json!({key: {"rope_type": kind, "factor": 2.0,
                    "original_max_position_embeddings": 64}}));
                let e = err(&v);
                assert!(
                    e.contains(&format!("`{key}.rope_type`"))
                        && e.contains(&format!("{kind:?}"))
                        && e.contains("default, linear, llama3, yarn"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn unknown_keys_inside_the_rope_objects_are_errors_naming_them() {
        let cases = [
            (
                serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                    "mrope_section": [16, 24, 24]}}),
                "rope_parameters.mrope_section",
            ),
            // transformers 5 nests per layer type for some models; termtune's models have one RoPE.
            (
                serde_json::json!({"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
                "rope_parameters.full_attention",
            ),
            // A factor that the default type would silently drop.
            (
                serde_json::json!({"rope_scaling": {"factor": 2.0}}),
                "rope_scaling.factor",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                    "attention_factor": 0.5}}),
                "rope_parameters.attention_factor",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "default",
                    "partial_rotary_factor": 0.5}}),
                "rope_parameters.partial_rotary_factor",
            ),
            (
                serde_json::json!({"partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "linear"}}),
                "rope_parameters.factor",
            ),
        ];
        for (extra, key) in cases {
            let e = err(&tiny(extra));
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
        // Neutral values are fine.
        let ok = tiny(serde_json::json!({"partial_rotary_factor": 1.0,
            "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.0, "attention_factor": null}}));
        assert!(
            ModelConfig::from_hf_config(&ok)
                .unwrap()
                .rope_scaling
                .is_none()
        );
    }

    #[test]
    fn disagreeing_layouts_are_errors_naming_both_keys() {
        let e = err(&tiny(serde_json::json!({"rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}})));
        assert!(
            e.contains("`rope_theta`") && e.contains("`rope_parameters.rope_theta`"),
            "{e}"
        );
        let e = err(&tiny(
            serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ));
        assert!(
            e.contains("`rope_scaling`") && e.contains("`rope_parameters`"),
            "{e}"
        );
        let e = err(&tiny(
            serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
        ));
        assert!(
            e.contains("`rope_scaling`") && e.contains("`rope_parameters`"),
            "{e}"
        );
    }

    #[test]
    fn gguf_rope_factors_divide_the_frequencies() {
        let fs: Vec<f64> = (0..8).map(|i| 1.0 + i as f64).collect();
        let c =
            ModelConfig::from_hf_config(&tiny(serde_json::json!({"gguf_rope_freqs": fs}))).unwrap();
        let plain = ModelConfig::from_hf_config(&tiny(serde_json::json!({}))).unwrap();
        assert_eq!(c.rope_inv_freq().len(), plain.rope_inv_freq().len());
        assert_eq!(c.rope_inv_freq().len(), fs.len());
        for (i, (a, b)) in c
            .rope_inv_freq()
            .iter()
            .zip(plain.rope_inv_freq())
            .enumerate()
        {
            assert_eq!(*a, b / (1.0 + i as f64), "{i}");
        }
        let e = err(&tiny(serde_json::json!({"gguf_rope_freqs": [1.0, 2.0]})));
        assert!(e.contains("`gguf_rope_freqs`"), "{e}");
    }

    /// google/gemma-3-1b-it's config.json (transformers 4.50 layout).
    fn gemma3_1b() -> serde_json::Value {
        serde_json::json!({"architectures":["Gemma3ForCausalLM"],"attention_bias":false,
            "attention_dropout":0.0,"attn_logit_softcapping":null,"bos_token_id":2,"cache_implementation":"hybrid",
            "eos_token_id":[1,106],"final_logit_softcapping":null,"head_dim":256,
            "hidden_activation":"gelu_pytorch_tanh","hidden_size":1152,"initializer_range":0.02,
            "intermediate_size":6912,"max_position_embeddings":32768,"model_type":"gemma3_text",
            "num_attention_heads":4,"num_hidden_layers":26,"num_key_value_heads":1,"pad_token_id":0,
            "query_pre_attn_scalar":256,"rms_norm_eps":1e-06,"rope_local_base_freq":10000,"rope_scaling":null,
            "rope_theta":1000000,"sliding_window":512,"sliding_window_pattern":6,"torch_dtype":"bfloat16",
            "use_cache":true,"vocab_size":262144})
    }

    #[test]
    fn gemma3_1b_reads_every_setting_that_changes_the_numbers() {
        let c = ModelConfig::from_hf_config(&gemma3_1b()).unwrap();
        assert_eq!(c.arch, ArchKind::Gemma3);
        assert_eq!((c.head_dim, c.num_kv_heads), (256, 1));
        assert!(c.tie_word_embeddings && c.qk_norm && c.norm_offset && c.sandwich_norms);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.embed_scale, Some(1152f64.sqrt()));
        assert_eq!(c.attn_scale, 1.0 / 16.0);
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        assert_eq!(c.rope_scaling, None);
        let full: Vec<usize> = (0..26).filter(|&i| c.layer_windows[i].is_none()).collect();
        assert_eq!(full, [5, 11, 17, 23]);
        assert!(c.layer_windows.iter().flatten().all(|&w| w == 512));
        assert!(c.layer_is_local(0) && !c.layer_is_local(5));
        assert_eq!(c.eos_token_ids, [1, 106]);
    }

    /// google/gemma-3-4b-it's config.json: its `text_config` gives only what differs from Gemma3TextConfig.
    #[test]
    fn gemma3_4b_image_text_config_reads_its_text_model() {
        let v = serde_json::json!({"architectures":["Gemma3ForConditionalGeneration"],"boi_token_index":255999,
            "eoi_token_index":256000,"eos_token_id":[1,106],"image_token_index":262144,"initializer_range":0.02,
            "mm_tokens_per_image":256,"model_type":"gemma3","text_config":{"hidden_size":2560,
            "intermediate_size":10240,"model_type":"gemma3_text","num_hidden_layers":34,
            "rope_scaling":{"factor":8.0,"rope_type":"linear"},"sliding_window":1024},"torch_dtype":"bfloat16",
            "vision_config":{"hidden_size":1152,"image_size":896,"intermediate_size":4304,
            "model_type":"siglip_vision_model","num_attention_heads":16,"num_hidden_layers":27,"patch_size":14,
            "vision_use_head":false}});
        let c = ModelConfig::from_hf_config(&v).unwrap();
        assert!(c.image_text && c.arch == ArchKind::Gemma3);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (8, 4, 256));
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.num_layers),
            (262_208, 2560, 34)
        );
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        let full: Vec<usize> = (0..34).filter(|&i| c.layer_windows[i].is_none()).collect();
        assert_eq!(full, [5, 11, 17, 23, 29]);
        assert!(c.layer_windows.iter().flatten().all(|&w| w == 1024));
        assert_eq!(c.eos_token_ids, [1, 106]);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert!(c.tie_word_embeddings && c.attn_scale == 1.0 / 16.0);
        // Names: the text model's (either transformers layout) map, the vision tower and projector do not.
        assert_eq!(
            text_tensor_name(true, "language_model.model.layers.3.mlp.up_proj.weight").as_deref(),
            Some("model.layers.3.mlp.up_proj.weight")
        );
        assert_eq!(
            text_tensor_name(true, "model.language_model.norm.weight").as_deref(),
            Some("model.norm.weight")
        );
        assert_eq!(
            text_tensor_name(true, "vision_tower.vision_model.post_layernorm.weight"),
            None
        );
        assert_eq!(
            text_tensor_name(true, "multi_modal_projector.mm_soft_emb_norm.weight"),
            None
        );
        assert_eq!(
            checkpoint_name(true, "model.layers.3.mlp.up_proj"),
            "language_model.model.layers.3.mlp.up_proj"
        );
        assert_eq!(
            text_tensor_name(false, "model.norm.weight").as_deref(),
            Some("model.norm.weight")
        );
    }

    #[test]
    fn gemma3_transformers_5_layout_reads_as_the_4_layout() {
        // What transformers 5.25 writes for the tiny test model (`save_pretrained` of the 4.x-style config).
        let v4 = serde_json::json!({"model_type":"gemma3_text","vocab_size":320,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":10000.0,"head_dim":16,"hidden_activation":"gelu_pytorch_tanh",
            "query_pre_attn_scalar":24,"sliding_window":3,"layer_types":["sliding_attention","full_attention"],
            "rope_local_base_freq":100.0,"rope_scaling":{"rope_type":"linear","factor":2.0}});
        let v5 = serde_json::json!({"_sliding_window_pattern":6,"attention_bias":false,
            "attn_logit_softcapping":null,"final_logit_softcapping":null,"head_dim":16,
            "hidden_activation":"gelu_pytorch_tanh","hidden_size":64,"intermediate_size":128,
            "layer_types":["sliding_attention","full_attention"],"model_type":"gemma3_text",
            "num_attention_heads":4,"num_hidden_layers":2,"num_key_value_heads":2,"query_pre_attn_scalar":24,
            "rms_norm_eps":1e-06,"rope_parameters":{"full_attention":{"factor":2.0,"rope_theta":10000.0,
            "rope_type":"linear"},"sliding_attention":{"rope_theta":100.0,"rope_type":"default"}},
            "sliding_window":3,"tie_word_embeddings":true,"use_bidirectional_attention":false,"vocab_size":320});
        let (a, b) = (
            ModelConfig::from_hf_config(&v4).unwrap(),
            ModelConfig::from_hf_config(&v5).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(a.local_rope_theta, Some(100.0));
        assert_eq!(a.layer_windows, [Some(3), None]);
        // The two layouts disagreeing is an error naming both keys.
        let mut both = v5.clone();
        both["rope_local_base_freq"] = serde_json::json!(50.0);
        let e = err(&both);
        assert!(
            e.contains("rope_local_base_freq") && e.contains("sliding_attention"),
            "{e}"
        );
    }

    #[test]
    fn gemma_settings_termtune_does_not_compute_are_errors_naming_them() {
        let with = |k: &str, x: serde_json::Value| {
            let mut v = gemma3_1b();
            v[k] = x;
            err(&v)
        };
        let e = with("final_logit_softcapping", serde_json::json!(30.0));
        assert!(e.contains("`final_logit_softcapping`"), "{e}");
        let e = with("attn_logit_softcapping", serde_json::json!(50.0));
        assert!(e.contains("`attn_logit_softcapping`"), "{e}");
        let e = with("use_bidirectional_attention", serde_json::json!(true));
        assert!(e.contains("`use_bidirectional_attention`"), "{e}");
        let e = with("hidden_activation", serde_json::json!("gelu"));
        assert!(
            e.contains("`hidden_activation`") && e.contains("gelu_pytorch_tanh"),
            "{e}"
        );
        let e = with("layer_types", serde_json::json!(["sliding_attention"]));
        assert!(
            e.contains("`layer_types`") && e.contains("26 layers"),
            "{e}"
        );
        let e = with("model_type", serde_json::json!("gemma3"));
        assert!(e.contains("`text_config`"), "{e}");
        // A llama-family config with another activation is refused too (it was silently SwiGLU).
        let e = err(&tiny(serde_json::json!({"hidden_act": "gelu"})));
        assert!(e.contains("`hidden_act`"), "{e}");
    }

    #[test]
    fn sliding_windows_follow_transformers_per_family() {
        let windows = |extra: serde_json::Value| {
            let mut v = tiny(extra);
            v["num_hidden_layers"] = serde_json::json!(2);
            ModelConfig::from_hf_config(&v).unwrap().layer_windows
        };
        // A llama has no windows, whatever the keys say.
        assert_eq!(
            windows(serde_json::json!({"sliding_window": 4})),
            [None, None]
        );
        let mistral = |w: serde_json::Value| {
            windows(serde_json::json!({"model_type": "mistral", "sliding_window": w}))
        };
        assert_eq!(mistral(serde_json::json!(4)), [Some(4), Some(4)]);
        assert_eq!(mistral(serde_json::Value::Null), [None, None]);
        assert_eq!(
            windows(serde_json::json!({"model_type": "mistral"})),
            [Some(4096), Some(4096)]
        );
        let qwen = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"model_type": "qwen2", "sliding_window": 8});
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            windows(v)
        };
        assert_eq!(qwen(serde_json::json!({})), [None, None]);
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": true, "max_window_layers": 1})),
            [None, Some(8)]
        );
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": true,
                "layer_types": ["sliding_attention", "full_attention"]})),
            [Some(8), None]
        );
    }
}
