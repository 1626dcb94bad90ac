//! An estimate of a training run's peak device memory from config.json and the preset alone, before any weight is
//! read: out-of-memory after minutes of loading is LLaMA-Factory users' most common surprise. `termtune check`
//! prints it against the GPU's free memory, and a run warns before it loads when the estimate does not fit.
//!
//! What it counts (bytes): the base weights in the training dtype, or as a GGUF file stores them when they stay
//! quantized ([`BaseStorage::Ggml`]: the linears and the embedding in their block type, the norms in f32); trainable parameters with their gradient and
//! AdamW's two f32 moments (LoRA A/B are f32); the activations the backward keeps (every layer's with
//! checkpointing off, each layer's input plus one recomputed layer with it on); the attention scores of one layer,
//! which this path materialises (batch × heads × seq²) in f32, three times in the backward; and the lm_head's
//! logits chunk in f32 with its gradient. It is an estimate: allocator slack and candle's temporaries come on top,
//! which the 10 % margin in [`MemoryEstimate::fits`] covers in the cases measured.

use candle_core::DType;
use candle_core::quantized::GgmlDType;

use super::arch::ModelConfig;
use super::model::Finetune;

/// The parts of a run's peak memory, bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    /// Trainable parameters' gradients and optimizer state (and the LoRA weights themselves).
    pub trainable: u64,
    /// Activations kept for the backward.
    pub activations: u64,
    /// One layer's attention scores and their gradients (the largest transient).
    pub attention: u64,
    /// lm_head logits (one chunk) and their gradient.
    pub logits: u64,
    /// A preference stage's frozen reference model beside the policy (0 when it has none, or when it is the base
    /// with the adapter off).
    pub reference: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights
            + self.trainable
            + self.activations
            + self.attention
            + self.logits
            + self.reference
    }

    /// Whether the estimate, with a 10 % margin, fits in `free` bytes.
    pub fn fits(&self, free: u64) -> bool {
        self.total() + self.total() / 10 <= free
    }

    /// "14.2 GiB (weights 13.0, trainable 0.2, activations 0.6, attention 0.3, logits 0.1)".
    pub fn describe(&self) -> String {
        let g = |b: u64| {
            #[allow(clippy::cast_precision_loss)]
            let x = b as f64 / f64::from(1u32 << 30);
            x
        };
        let reference = if self.reference > 0 {
            format!(", reference model {:.1}", g(self.reference))
        } else {
            String::new()
        };
        format!(
            "{:.1} GiB (weights {:.1}, trainable + optimizer {:.1}, activations {:.1}, attention {:.1}, logits {:.1}{reference})",
            g(self.total()),
            g(self.weights),
            g(self.trainable),
            g(self.activations),
            g(self.attention),
            g(self.logits)
        )
    }
}

/// How the frozen base weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseStorage {
    /// In the training dtype (a safetensors base).
    Dense,
    /// The linears and the embedding in a GGML block type (a GGUF base: Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, …),
    /// the norms in f32; trainable ones (freeze, full) are dequantized into the training dtype.
    Ggml(GgmlDType),
    /// `quantization_bit`: the decoder layers' linears in a GGML block type, everything else in the training dtype.
    Linears(GgmlDType),
    /// `quantization_bit: 4`: the decoder layers' linears in bitsandbytes' 4-bit layout (4 bits per weight, a
    /// float32 absmax per 64, or with double quantization (`true`) an 8-bit one plus a float32 per 256 blocks),
    /// everything else in the training dtype.
    Bnb4(super::bnb4::FourBit, bool),
}

impl BaseStorage {
    /// The storage of a GGUF file's weights from its most common tensor type's name (`Q4_1`, `Q8_0`, `F16`, as
    /// [`super::gguf::GgufSummary::quantization`] gives it); float types are dequantized, so `Dense`.
    pub fn from_gguf_type_name(name: &str) -> Self {
        let t = match name {
            "Q4_0" => GgmlDType::Q4_0,
            "Q4_1" => GgmlDType::Q4_1,
            "Q5_0" => GgmlDType::Q5_0,
            "Q5_1" => GgmlDType::Q5_1,
            "Q8_0" => GgmlDType::Q8_0,
            "Q8_1" => GgmlDType::Q8_1,
            "Q2K" => GgmlDType::Q2K,
            "Q3K" => GgmlDType::Q3K,
            "Q4K" => GgmlDType::Q4K,
            "Q5K" => GgmlDType::Q5K,
            "Q6K" => GgmlDType::Q6K,
            "Q8K" => GgmlDType::Q8K,
            _ => return Self::Dense,
        };
        Self::Ggml(t)
    }

    /// Bytes per weight of the quantized part (`None`: dense).
    fn bytes_per_weight(self) -> Option<f64> {
        match self {
            Self::Dense => None,
            #[allow(clippy::cast_precision_loss)]
            Self::Ggml(t) | Self::Linears(t) => Some(t.type_size() as f64 / t.block_size() as f64),
            Self::Bnb4(_, true) => Some(0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)),
            Self::Bnb4(_, false) => Some(0.5 + 4.0 / 64.0),
        }
    }

    /// The block format's name for messages (`Q8_0`, `Q4K`, `NF4 (double quantization)`); `None`: dense.
    pub fn format_name(self) -> Option<String> {
        match self {
            Self::Dense => None,
            Self::Ggml(t) | Self::Linears(t) => Some(format!("{t:?}")),
            Self::Bnb4(k, double) => Some(format!(
                "{}{}",
                k.name(),
                if double {
                    " with double quantization"
                } else {
                    ""
                }
            )),
        }
    }
}

/// What shapes the estimate besides the model.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub dtype: DType,
    /// How the frozen base weights are held.
    pub base: BaseStorage,
    pub batch: usize,
    pub seq_len: usize,
    pub checkpointing: bool,
    /// Rows of logits at once (`None`: all).
    pub head_chunk_rows: Option<usize>,
    /// `use_muon`: the hidden matrices keep one f32 momentum buffer instead of AdamW's two moments.
    pub muon: bool,
}

/// Parameters of each linear of one decoder layer: (in, out) in `LINEAR_LEAVES` order (q, k, v, o, gate, up,
/// down).
fn layer_linears(c: &ModelConfig) -> [(usize, usize); 7] {
    let (h, ff) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    [(h, q), (h, kv), (h, kv), (q, h), (h, ff), (h, ff), (ff, h)]
}

/// Freeze fine-tuning's trainable parameters of `cfg` (the weights [`Finetune::trains`] picks, by their Hugging Face
/// names; the estimate's parameter set: linears, embedding, lm_head, the two norms per layer and the final one):
/// (all, those in matrices, those in matrices other than the embedding and lm_head).
fn freeze_trainable(cfg: &ModelConfig, ft: &Finetune) -> (usize, usize, usize) {
    let (h, l, v) = (cfg.hidden_size, cfg.num_layers, cfg.vocab_size);
    let mut matrices = vec![("model.embed_tokens.weight".to_string(), v * h)];
    if !cfg.tie_word_embeddings {
        matrices.push(("lm_head.weight".to_string(), v * h));
    }
    let mut norms = vec!["model.norm.weight".to_string()];
    for i in 0..l {
        for ((inp, out), leaf) in layer_linears(cfg).iter().zip(super::arch::LINEAR_LEAVES) {
            let part = if matches!(leaf, "gate_proj" | "up_proj" | "down_proj") {
                "mlp"
            } else {
                "self_attn"
            };
            matrices.push((format!("model.layers.{i}.{part}.{leaf}.weight"), inp * out));
        }
        norms.push(format!("model.layers.{i}.input_layernorm.weight"));
        norms.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    let trained = || matrices.iter().filter(|(n, _)| ft.trains(n, l));
    let m: usize = trained().map(|(_, c)| c).sum();
    let hidden: usize = trained()
        .filter(|(n, _)| n.starts_with("model.layers."))
        .map(|(_, c)| c)
        .sum();
    let n = norms.iter().filter(|n| ft.trains(n, l)).count() * h;
    (m + n, m, hidden)
}

/// The trainable parameters Muon updates (the optimizer's rule: 2-D, neither embedding nor lm_head): LoRA's A and B, or the decoder layers' trained matrices.
fn muon_params(cfg: &ModelConfig, ft: &Finetune) -> usize {
    let l = cfg.num_layers;
    match ft {
        Finetune::Frozen => 0,
        Finetune::Lora(spec) => {
            l * layer_linears(cfg)
                .iter()
                .zip(super::arch::LINEAR_LEAVES)
                .filter(|(_, name)| spec.targets.contains(name))
                .map(|((i, o), _)| spec.r * (i + o))
                .sum::<usize>()
        }
        Finetune::Freeze { .. } => freeze_trainable(cfg, ft).2,
        Finetune::Full => l * layer_linears(cfg).iter().map(|(i, o)| i * o).sum::<usize>(),
    }
}

fn u(x: usize) -> u64 {
    x as u64
}

/// Parameter counts of `cfg` trained as `ft`: (trainable, base model). LoRA's trainable parameters are the
/// adapters' A and B, which the base count leaves out.
pub fn param_counts(cfg: &ModelConfig, ft: &Finetune) -> (u64, u64) {
    let (h, l, v) = (cfg.hidden_size, cfg.num_layers, cfg.vocab_size);
    let per_layer: usize = layer_linears(cfg).iter().map(|(i, o)| i * o).sum::<usize>() + 2 * h;
    let embed = v * h;
    let params = embed + if cfg.tie_word_embeddings { 0 } else { embed } + l * per_layer + h;
    let trainable = match ft {
        Finetune::Frozen => 0,
        Finetune::Lora(spec) => {
            let per_layer_lora: usize = layer_linears(cfg)
                .iter()
                .zip(super::arch::LINEAR_LEAVES)
                .filter(|(_, name)| spec.targets.contains(name))
                .map(|((i, o), _)| spec.r * (i + o) + if spec.use_dora { *o } else { 0 })
                .sum();
            l * per_layer_lora
        }
        Finetune::Freeze { .. } => freeze_trainable(cfg, ft).0,
        Finetune::Full => params,
    };
    (u(trainable), u(params))
}

/// Bytes of the base model's weights trained as `ft` in `dtype`, held as `base`: quantized linears and embedding
/// stay in their block type unless trainable (freeze, full: dequantized into `dtype`); norms are f32 in a GGUF.
pub fn base_weight_bytes(cfg: &ModelConfig, ft: &Finetune, dtype: DType, base: BaseStorage) -> u64 {
    let bytes = u(dtype.size_in_bytes());
    let (_, params) = param_counts(cfg, ft);
    let Some(per_weight) = base.bytes_per_weight() else {
        return params * bytes;
    };
    let (h, l) = (cfg.hidden_size, cfg.num_layers);
    if let BaseStorage::Linears(_) | BaseStorage::Bnb4(..) = base {
        // Only LoRA trains over it (validation): every decoder linear quantized, the rest dense.
        let linears = u(l * layer_linears(cfg).iter().map(|(i, o)| i * o).sum::<usize>());
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let quantized = (linears as f64 * per_weight).ceil() as u64;
        return quantized + (params - linears) * bytes;
    }
    let norms = u(2 * l * h + h);
    let matrices = params - norms;
    // Trainable matrices are dense (dtype); the rest stay quantized.
    let dense_matrices = match ft {
        Finetune::Frozen | Finetune::Lora(_) => 0,
        Finetune::Full => matrices,
        Finetune::Freeze { .. } => u(freeze_trainable(cfg, ft).1),
    };
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let quantized = ((matrices - dense_matrices) as f64 * per_weight).ceil() as u64;
    quantized + dense_matrices * bytes + norms * 4
}

/// The estimate for `cfg` trained as `ft` in the shape `run`.
pub fn estimate(cfg: &ModelConfig, ft: &Finetune, run: &RunShape) -> MemoryEstimate {
    let bytes = u(run.dtype.size_in_bytes());
    let (h, l, v) = (cfg.hidden_size, cfg.num_layers, cfg.vocab_size);
    let (trainable_params, _) = param_counts(cfg, ft);
    let weights = base_weight_bytes(cfg, ft, run.dtype, run.base);
    // Per trainable parameter: its gradient (its dtype) + AdamW m and v (f32); LoRA's own f32 weights too.
    let trainable = match ft {
        Finetune::Frozen => 0,
        Finetune::Lora(_) => trainable_params * 16,
        Finetune::Freeze { .. } | Finetune::Full => trainable_params * (bytes + 8),
    } - if run.muon {
        u(muon_params(cfg, ft)) * 4
    } else {
        0
    };
    let tokens = u(run.batch * run.seq_len);
    let (q, kv, ff) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    );
    // What the hand-written backward keeps per token and layer: x, both normed inputs, q, k, v, the attention
    // output, the residual, gate, up and their product (LoRA's x·Aᵀ is small); with DoRA also each adapted
    // linear's output before its factor (f32).
    let dora_outputs = match ft {
        Finetune::Lora(spec) if spec.use_dora => layer_linears(cfg)
            .iter()
            .zip(super::arch::LINEAR_LEAVES)
            .filter(|(_, name)| spec.targets.contains(name))
            .map(|((_, o), _)| *o)
            .sum::<usize>(),
        _ => 0,
    };
    // Layers the hand-written backward does not cover keep a little more in candle's graph: q and k before their
    // norms (qwen3, gemma3), the attention and MLP outputs before Gemma's norms around them, GeGLU's GELU output.
    let graph_extra = if cfg.qk_norm { q + kv } else { 0 }
        + if cfg.sandwich_norms { 2 * h } else { 0 }
        + if cfg.activation == super::arch::Activation::GeluTanh {
            ff
        } else {
            0
        };
    let kept_per_token =
        u(4 * h + 2 * q + 2 * kv + 3 * ff + graph_extra) * bytes + u(dora_outputs) * 4;
    let activations = if run.checkpointing {
        tokens * u(l * h) * bytes + tokens * kept_per_token
    } else {
        tokens * u(l) * kept_per_token
    };
    let scores = u(run.batch * cfg.num_heads) * u(run.seq_len) * u(run.seq_len) * 4;
    let attention = 3 * scores;
    let rows = run.head_chunk_rows.map_or(tokens, |r| u(r).min(tokens));
    let logits = 3 * rows * u(v) * 4;
    MemoryEstimate {
        weights,
        trainable,
        activations,
        attention,
        logits,
        reference: 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::engine::model::{LoraSpec, LoraTargets};

    fn llama_8b() -> ModelConfig {
        ModelConfig::from_hf_config(&serde_json::json!({
            "model_type": "llama", "vocab_size": 128_256, "hidden_size": 4096, "intermediate_size": 14_336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0, "max_position_embeddings": 131_072, "tie_word_embeddings": false
        }))
        .unwrap()
    }

    fn lora_all(r: usize) -> Finetune {
        Finetune::Lora(LoraSpec {
            r,
            alpha: 2.0 * r as f64,
            dropout: 0.0,
            targets: LoraTargets::parse("all").unwrap(),
            use_rslora: false,
            use_dora: false,
            seed: 0,
            init: Default::default(),
        })
    }

    /// DoRA adds one magnitude per adapted output row (q, k, v, o, gate, up, down: 4096 + 1024 + 1024 + 4096 +
    /// 14336 + 14336 + 4096 per layer) and keeps each adapted linear's pre-factor output (f32) for the backward.
    #[test]
    fn dora_adds_its_magnitudes_and_kept_outputs() {
        let c = llama_8b();
        let dora = match lora_all(16) {
            Finetune::Lora(spec) => Finetune::Lora(LoraSpec {
                use_dora: true,
                ..spec
            }),
            other => other,
        };
        let outputs = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096;
        assert_eq!(
            param_counts(&c, &dora).0,
            param_counts(&c, &lora_all(16)).0 + 32 * outputs
        );
        let run = RunShape {
            dtype: DType::BF16,
            base: BaseStorage::Dense,
            batch: 2,
            seq_len: 1024,
            checkpointing: false,
            head_chunk_rows: Some(1024),
            muon: false,
        };
        let (a, b) = (estimate(&c, &lora_all(16), &run), estimate(&c, &dora, &run));
        assert_eq!(b.activations - a.activations, 2 * 1024 * 32 * outputs * 4);
    }

    #[test]
    fn llama_8b_parameter_count_and_lora_size_are_right() {
        let c = llama_8b();
        let run = RunShape {
            dtype: DType::BF16,
            base: BaseStorage::Dense,
            batch: 4,
            seq_len: 2048,
            checkpointing: true,
            head_chunk_rows: Some(1024),
            muon: false,
        };
        assert_eq!(param_counts(&c, &lora_all(16)), (41_943_040, 8_030_261_248));
        assert_eq!(param_counts(&c, &Finetune::Full).0, 8_030_261_248);
        let e = estimate(&c, &lora_all(16), &run);
        // Llama-3.1-8B has 8.03 B parameters (16.06 GB in bf16).
        assert_eq!(e.weights, 8_030_261_248 * 2);
        // LoRA r 16 on all 7 linears: 41.9 M parameters (PEFT's print_trainable_parameters), 16 bytes each.
        assert_eq!(e.trainable, 41_943_040 * 16);
        // Muon keeps one buffer for each of LoRA's A and B instead of AdamW's two moments.
        let muon = estimate(&c, &lora_all(16), &RunShape { muon: true, ..run });
        assert_eq!(muon.trainable, 41_943_040 * 12);
        let off = estimate(
            &c,
            &lora_all(16),
            &RunShape {
                checkpointing: false,
                ..run
            },
        );
        assert!(off.activations > 10 * e.activations);
        assert!(e.fits(80 << 30) && !e.fits(16 << 30));
        assert!(
            e.describe().contains("GiB (weights 15.0"),
            "{}",
            e.describe()
        );
    }

    #[test]
    fn a_quantized_base_counts_its_block_bytes() {
        let c = llama_8b();
        let norms = 2 * 32 * 4096 + 4096;
        let matrices = 8_030_261_248 - norms;
        // Q4_K: 144 bytes per 256 weights (4.5 bits); Q8_0: 34 bytes per 32; norms stay f32.
        let q4k = base_weight_bytes(
            &c,
            &lora_all(16),
            DType::BF16,
            BaseStorage::Ggml(GgmlDType::Q4K),
        );
        assert_eq!(q4k, matrices * 144 / 256 + norms * 4);
        let q8 = base_weight_bytes(
            &c,
            &Finetune::Frozen,
            DType::BF16,
            BaseStorage::from_gguf_type_name("Q8_0"),
        );
        assert_eq!(q8, matrices * 34 / 32 + norms * 4);
        // 4.5 bits vs 16: the base takes 0.28× its bf16 size.
        let bf16 = base_weight_bytes(&c, &lora_all(16), DType::BF16, BaseStorage::Dense);
        assert!(
            q4k * 100 < 29 * bf16 && q4k * 100 > 27 * bf16,
            "{q4k} vs {bf16}"
        );
        // Full fine-tuning dequantizes every matrix into the training dtype.
        let full = base_weight_bytes(
            &c,
            &Finetune::Full,
            DType::BF16,
            BaseStorage::Ggml(GgmlDType::Q4K),
        );
        assert_eq!(full, matrices * 2 + norms * 4);
        assert_eq!(BaseStorage::from_gguf_type_name("F16"), BaseStorage::Dense);
    }
}
