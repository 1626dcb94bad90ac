//! The trainable llama-family decoder (llama, mistral, qwen2, qwen3) with LoRA / freeze / full fine-tuning.
//!
//! Two forward passes over the same weights and the same decoder layer ([`layer::forward`]):
//! - [`Model::forward_hidden`] / [`Model::forward_loss`]: every op has a backward; frozen base linears go through
//!   [`ops::FrozenLinear`] (dX only); supports causal, padding and packed (block-diagonal) masks.
//! - [`Model::forward_cached`]: inference with a KV cache, candle-nn's inference kernels, detached weights.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::arch::ModelConfig;
use super::bnb4::Bnb4Tensor;
use super::error::{EngineError, Result};
use super::layer::{self, LayerCtx, LayerIo, Pass};
pub use super::layer::{Dora, Kernels, Layer, Linear, LoraPair, Weight};
use super::ops;
use super::pissa::LoraInit;
use super::qweight::QWeight;

pub use super::arch::LINEAR_LEAVES;

/// Which modules get LoRA adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraTargets {
    /// Every linear layer except lm_head (LLaMA-Factory `lora_target: all`).
    All,
    /// Leaf names, e.g. `q_proj`, `v_proj`.
    Names(Vec<String>),
}

impl LoraTargets {
    /// Parse LLaMA-Factory's `lora_target` (`all` or a comma list of leaf names).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "all" {
            return Ok(Self::All);
        }
        let mut names = Vec::new();
        for n in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !LINEAR_LEAVES.contains(&n) {
                return Err(EngineError::UnknownLoraTarget(n.to_string()));
            }
            if !names.iter().any(|x: &String| x == n) {
                names.push(n.to_string());
            }
        }
        if names.is_empty() {
            return Err(EngineError::UnknownLoraTarget(String::new()));
        }
        Ok(Self::Names(names))
    }

    pub fn contains(&self, leaf: &str) -> bool {
        match self {
            Self::All => LINEAR_LEAVES.contains(&leaf),
            Self::Names(n) => n.iter().any(|x| x == leaf),
        }
    }

    /// The leaf names, in a stable order (for `target_modules`).
    pub fn leaves(&self) -> Vec<String> {
        LINEAR_LEAVES
            .iter()
            .filter(|l| self.contains(l))
            .map(|l| (*l).to_string())
            .collect()
    }
}

/// LoRA hyper-parameters (PEFT semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: LoraTargets,
    pub use_rslora: bool,
    /// DoRA (PEFT's `use_dora`): a trainable magnitude per output row ([`super::layer::Dora`]).
    pub use_dora: bool,
    /// Seed for the kaiming-uniform init of A.
    pub seed: u64,
    /// How A and B start: PEFT's default, or PiSSA (which also turns each adapted base weight into its residual).
    pub init: LoraInit,
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.r, self.use_rslora)
    }
}

pub(crate) fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// What is trainable.
#[derive(Debug, Clone, PartialEq)]
pub enum Finetune {
    /// Nothing trainable (inference).
    Frozen,
    Lora(LoraSpec),
    /// LLaMA-Factory `freeze`: in the last n decoder layers (n < 0: the first |n|) the `modules` (`all`, or names
    /// of a layer's parts: `self_attn`, `mlp`, a norm) are trainable, and the `extra` modules outside the layers
    /// (`embed_tokens`, `norm`, `lm_head`), matched as LLaMA-Factory matches them ([`Finetune::trains`]).
    Freeze {
        trainable_layers: i64,
        modules: Vec<String>,
        extra: Vec<String>,
    },
    Full,
}

impl Finetune {
    /// LLaMA-Factory's default freeze: every part of the last `trainable_layers` layers.
    pub fn freeze(trainable_layers: i64) -> Self {
        Self::Freeze {
            trainable_layers,
            modules: vec!["all".into()],
            extra: Vec::new(),
        }
    }

    /// Whether the base weight `name` (a Hugging Face tensor name) of a model with `num_layers` layers is trained
    /// in place (LoRA's own weights aside). Freeze follows LLaMA-Factory's `_setup_freeze_tuning`: a weight is
    /// trainable when its name contains `.{layer}.{module}` (`.{layer}.` for `all`) for a trainable layer, or an
    /// extra module's name anywhere — so `norm` also takes every layer's norms, as it does there.
    pub fn trains(&self, name: &str, num_layers: usize) -> bool {
        match self {
            Self::Full => true,
            Self::Frozen | Self::Lora(_) => false,
            Self::Freeze {
                trainable_layers,
                modules,
                extra,
            } => {
                let n = *trainable_layers;
                let layers = if n >= 0 {
                    num_layers.saturating_sub(n.unsigned_abs() as usize)..num_layers
                } else {
                    0..(n.unsigned_abs() as usize).min(num_layers)
                };
                let in_layer = layers.into_iter().any(|i| {
                    modules.iter().any(|m| {
                        let part = if m == "all" { "" } else { m.as_str() };
                        name.contains(&format!(".{i}.{part}"))
                    })
                });
                in_layer || extra.iter().any(|e| name.contains(e.as_str()))
            }
        }
    }
}

/// The module names freeze fine-tuning may name for `cfg`, as LLaMA-Factory lists them from the parameters: a
/// layer's parts, and the modules outside the layers (`lm_head` only when it is not the tied embedding).
pub fn freeze_module_names(cfg: &ModelConfig) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut hidden = vec!["self_attn", "mlp", "input_layernorm"];
    if cfg.sandwich_norms {
        hidden.extend(layer::SANDWICH_NORMS);
    } else {
        hidden.push(layer::POST_ATTENTION_NORM);
    }
    let mut outer = vec!["embed_tokens", "norm"];
    if !cfg.tie_word_embeddings {
        outer.push("lm_head");
    }
    (hidden, outer)
}

/// Attention layout of a batch.
#[derive(Debug, Clone)]
pub enum AttnMask {
    /// Plain causal attention, positions 0..t.
    Causal,
    /// Causal + key padding. `attention_mask` (b, t) integer, 1 = token, 0 = padding. Positions 0..t.
    Padding { attention_mask: Tensor },
    /// Neat packing: `seq_ids` (b, t) integer, ≥1 names the example a token belongs to, 0 = padding;
    /// attention is causal and block-diagonal (never across examples). `position_ids` (b, t) restart per example.
    /// With `branch_ids` (b, t) integer, an example is a shared prefix (branch 0) and branches that each see the
    /// prefix and themselves, never each other (preference pairs sharing their prompt).
    Packed {
        seq_ids: Tensor,
        position_ids: Tensor,
        branch_ids: Option<Tensor>,
    },
}

/// Host copies of a batch's inputs, row-major (b·t each): what the trainer built its tensors from. With them
/// [`Model::forward_loss_with`] derives the attention bias, the unpadding and the labelled rows without reading the
/// tensors back from the device (on a GPU every such read waits for all queued work).
#[derive(Debug, Clone, Copy)]
pub struct HostInputs<'a> {
    pub input_ids: &'a [u32],
    pub labels: &'a [i64],
    /// The padding mask (`AttnMask::Padding`).
    pub attention_mask: Option<&'a [u32]>,
    /// The example ids (`AttnMask::Packed`).
    pub sequence_ids: Option<&'a [u32]>,
    /// The branch ids (`AttnMask::Packed` with `branch_ids`).
    pub branch_ids: Option<&'a [u32]>,
    /// The position ids (`AttnMask::Packed`; read for sliding windows).
    pub position_ids: Option<&'a [u32]>,
}

/// Rows of a (b, t) row-major host slice.
fn rows_of(v: &[u32], t: usize) -> Vec<Vec<u32>> {
    v.chunks(t.max(1)).map(<[u32]>::to_vec).collect()
}

/// The labelled positions of a batch: hidden states (n, hidden), target ids, and the batch row of each.
struct Labelled {
    hs: Tensor,
    targets: Vec<u32>,
    batch_rows: Vec<usize>,
}

/// Per-row sums of label log-probabilities ([`Model::sequence_logps`]).
pub struct SequenceLogps {
    /// Σ over the row's labelled positions of log p(label), per batch row (f64 on the host); with
    /// [`SequenceLogps::weight_positions`], the weighted sum.
    pub logps: Vec<f64>,
    /// The row's labelled positions.
    pub tokens: Vec<usize>,
    /// Each labelled position's log p(label) and batch row, in row-major order.
    position_logps: Vec<f64>,
    batch_rows: Vec<usize>,
    /// Each labelled position's weight in its row's sum (all 1 unless [`SequenceLogps::weight_positions`]).
    weights: Vec<f64>,
    grad: Option<LogpsGrad>,
}

enum LogpsGrad {
    /// A frozen head recomputed in chunks by [`layer::head_logps_surrogate`].
    Head {
        hs: Tensor,
        w: Tensor,
        targets: Vec<u32>,
        chunk: usize,
    },
    /// Each labelled position's log-probability as a tracked tensor (n).
    Graph(Tensor),
}

impl SequenceLogps {
    /// Reweights the labelled positions: position `i` of row `r` (its i-th labelled token) counts `weight(r, i)`
    /// times in the row's sum, in `logps` and in [`SequenceLogps::backward`] (LD-DPO's `ld_alpha` on the tokens of the
    /// longer answer past the shorter one's length).
    pub fn weight_positions(&mut self, weight: impl Fn(usize, usize) -> f64) {
        let mut seen = vec![0usize; self.logps.len()];
        self.logps.iter_mut().for_each(|l| *l = 0.0);
        for ((&r, &lp), w) in self
            .batch_rows
            .iter()
            .zip(&self.position_logps)
            .zip(self.weights.iter_mut())
        {
            *w = weight(r, seen[r]);
            seen[r] += 1;
            self.logps[r] += *w * lp;
        }
    }

    /// Reassigns the labelled positions to `rows` sequences: position `i` of batch row `r` (its i-th labelled
    /// token) becomes sequence `row_of(r, i)`'s (a batch of preference pairs sharing their prompts holds two
    /// sequences per row). `logps`, `tokens` and the way back then follow the sequences.
    pub fn regroup(&mut self, rows: usize, row_of: impl Fn(usize, usize) -> usize) -> Result<()> {
        let mut seen = vec![0usize; self.logps.len()];
        let mut logps = vec![0.0; rows];
        let mut tokens = vec![0; rows];
        for ((r, &lp), &w) in self
            .batch_rows
            .iter_mut()
            .zip(&self.position_logps)
            .zip(&self.weights)
        {
            let to = row_of(*r, seen[*r]);
            if to >= rows {
                return Err(EngineError::Invalid(format!(
                    "labelled position {} of row {} goes to sequence {to} of {rows}",
                    seen[*r], *r
                )));
            }
            seen[*r] += 1;
            *r = to;
            logps[to] += w * lp;
            tokens[to] += 1;
        }
        self.logps = logps;
        self.tokens = tokens;
        Ok(())
    }

    /// The trainable parameters' gradients of a loss L of these log-probabilities, given `dl[r]` = ∂L/∂logps[r]
    /// (the chain rule through the model). Errors when the logps were computed without `train`.
    pub fn backward(&self, dl: &[f64]) -> Result<candle_core::backprop::GradStore> {
        if dl.len() != self.logps.len() {
            return Err(EngineError::Invalid(format!(
                "{} loss gradients for {} rows",
                dl.len(),
                self.logps.len()
            )));
        }
        // ∂L/∂(each position's log-probability).
        let per_position: Vec<f64> = self
            .batch_rows
            .iter()
            .zip(&self.weights)
            .map(|(&r, w)| dl[r] * w)
            .collect();
        let surrogate = match &self.grad {
            None => {
                return Err(EngineError::Invalid(
                    "these log-probabilities were computed without a graph (train: false)".into(),
                ));
            }
            Some(LogpsGrad::Head {
                hs,
                w,
                targets,
                chunk,
            }) => layer::head_logps_surrogate(hs, w, targets, &per_position, *chunk)?,
            Some(LogpsGrad::Graph(picked)) => {
                let d = Tensor::new(per_position.as_slice(), picked.device())?
                    .to_dtype(picked.dtype())?;
                (picked * d)?.sum_all()?
            }
        };
        Ok(surrogate.to_dtype(DType::F32)?.backward()?)
    }
}

/// Per-layer KV cache for [`Model::forward_cached`]: candle-nn's preallocated cache per layer (keys and values
/// written in place, room as [`layer::KV_CACHE_BLOCK`] says), read as views of what is filled. Not `Clone`: two
/// caches sharing one buffer would write over each other.
#[derive(Debug, Default)]
pub struct KvCache {
    kv: Vec<Option<candle_nn::kv_cache::KvCache>>,
    /// Tokens already in the cache.
    pub seq_len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            kv: std::iter::repeat_with(|| None).take(num_layers).collect(),
            seq_len: 0,
        }
    }
    /// Decoder layers it has room for.
    pub fn num_layers(&self) -> usize {
        self.kv.len()
    }

    pub fn reset(&mut self) {
        self.kv.iter_mut().for_each(|x| *x = None);
        self.seq_len = 0;
    }

    /// Keep only the batch rows `rows` (in that order): batched generation drops finished rows.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        // The row indices, made once on the cache's device (all layers share it).
        let mut idx: Option<Tensor> = None;
        self.rebuild(|z| {
            let idx = match &idx {
                Some(idx) => idx,
                None => idx.insert(Tensor::from_vec(
                    rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(),
                    rows.len(),
                    z.device(),
                )?),
            };
            Ok(z.contiguous()?.index_select(idx, 0)?)
        })
    }

    /// Keep only the first `len` positions (a prompt that shares them with what the cache holds reads only what
    /// follows).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.seq_len {
            return Ok(());
        }
        if len == 0 {
            self.reset();
            return Ok(());
        }
        self.rebuild(|z| Ok(z.narrow(2, 0, len)?.contiguous()?))?;
        self.seq_len = len;
        Ok(())
    }

    /// Each layer's keys and values replaced by `keep` of them (each of K and V), copied into a cache of the same
    /// room.
    fn rebuild(&mut self, mut keep: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<()> {
        for slot in &mut self.kv {
            let Some(cache) = slot else { continue };
            let (Some(k), Some(v)) = (cache.k()?, cache.v()?) else {
                continue;
            };
            let (k, v) = (keep(&k)?, keep(&v)?);
            let mut kept =
                candle_nn::kv_cache::KvCache::new(2, cache.k_cache().max_seq_len().max(1));
            kept.append(&k, &v)?;
            *cache = kept;
        }
        Ok(())
    }
}

/// RoPE (cos, sin) tables of one batch's positions: the global ones, and the sliding-window layers' own.
struct RopeTables {
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

/// The model. Base weights are plain tensors unless trainable (freeze/full); LoRA lives in `lora_vars`.
pub struct Model {
    pub cfg: ModelConfig,
    pub device: Device,
    pub dtype: DType,
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Weight,
    /// None when the embeddings are tied.
    pub lm_head: Option<Linear>,
    /// The active (trainable) LoRA, if any.
    pub lora: Option<LoraSpec>,
    /// LoRA Vars by PEFT tensor name (f32).
    pub lora_vars: VarMap,
    /// Kernels of the training path.
    pub kernels: Kernels,
    /// Activation checkpointing per decoder layer on the training path (keep only each layer's input, recompute
    /// the layer in the backward). Off by default here; the trainer turns it on unless
    /// `disable_gradient_checkpointing`.
    pub checkpointing: bool,
    /// lm_head + loss over chunks of this many labelled rows (logits never materialise for all rows);
    /// `None` computes all rows at once. Applies when the head weight is frozen and the fused kernels run.
    pub head_chunk_rows: Option<usize>,
    /// Run padded batches (`AttnMask::Padding`) without their padding: linears, norms and the MLP see only the
    /// real tokens; attention runs per example in the padded layout. Same result, less work.
    pub unpad: bool,
    /// Backpropagate decoder layers with the hand-written backward where it applies ([`layer::manual_ok`])
    /// instead of candle's graph (same values; no per-op gradient buffers, zero-fills and accumulation adds).
    pub manual_backward: bool,
    /// Seed of the LoRA dropout masks of the next training forward; the trainer sets a fresh one per micro-batch.
    pub dropout_seed: u64,
    /// NEFTune (`neftune_noise_alpha`): training forwards add uniform noise of magnitude α/√(t·hidden) to the
    /// input embeddings (t: the batch's padded length, as transformers' hook computes it), drawn from
    /// `dropout_seed`. Inference never adds it.
    pub neftune_alpha: Option<f64>,
    /// The language-model loss per token, in training and evaluation alike: `label_smoothing_factor` ε
    /// (transformers' `LabelSmoother`, `(1 − ε)·(−log p[target]) + ε·mean_v(−log p[v])`) and `use_dft_loss`
    /// (LLaMA-Factory's DFT, `p[target]·(−log p[target])` with p detached). Default: plain cross-entropy.
    pub token_loss: ops::TokenLoss,
    inv_freq: Tensor,
    /// The sliding-window layers' own inverse frequencies (Gemma 3's local RoPE base).
    local_inv_freq: Option<Tensor>,
    trainable: Vec<(String, Var)>,
}

struct Loader<'a> {
    tensors: &'a HashMap<String, Tensor>,
    quantized: &'a HashMap<String, QWeight>,
    bnb4: &'a HashMap<String, Arc<Bnb4Tensor>>,
    dtype: DType,
    device: &'a Device,
}

/// A base tensor as loaded: dense, or kept in its GGML block format.
enum Loaded {
    Dense(Tensor),
    Quantized(QWeight),
    Bnb4(Arc<Bnb4Tensor>),
}

impl Loader<'_> {
    fn check(name: &str, found: &[usize], shape: &[usize]) -> Result<()> {
        if found != shape {
            return Err(EngineError::TensorShape {
                name: name.to_string(),
                found: found.to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(())
    }

    /// The tensor `name` in the model dtype on the model device (a quantized one dequantized).
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.load(name, shape)? {
            Loaded::Dense(t) => Ok(t),
            Loaded::Quantized(q) => Ok(q.dequantize(self.device)?.to_dtype(self.dtype)?),
            Loaded::Bnb4(q) => Ok(q.dequantize()?.to_dtype(self.dtype)?),
        }
    }

    /// The tensor `name`: quantized ones stay quantized (on the model device), dense ones in the model dtype.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Loaded> {
        let kept = if let Some(q) = self.bnb4.get(name) {
            Some((q.dims(), q.device().clone(), Loaded::Bnb4(q.clone())))
        } else {
            self.quantized
                .get(name)
                .map(|q| (q.dims(), q.device(), Loaded::Quantized(q.clone())))
        };
        if let Some((dims, device, loaded)) = kept {
            Self::check(name, dims, shape)?;
            if device.same_device(self.device) {
                return Ok(loaded);
            }
            return Err(EngineError::Invalid(format!(
                "{name}: the quantized tensor is on {:?}, the model on {:?}; load the model onto one device",
                device.location(),
                self.device.location()
            )));
        }
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_string(),
            })?;
        Self::check(name, t.dims(), shape)?;
        Ok(Loaded::Dense(
            t.to_device(self.device)?.to_dtype(self.dtype)?,
        ))
    }
}

/// kaiming_uniform_(a=√5) on a (r, in) weight as PEFT does for lora_A: U(-1/√in, 1/√in).
fn kaiming_a(
    rng: &mut StdRng,
    r: usize,
    fan_in: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let data: Vec<f64> = (0..r * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Tensor::from_vec(data, (r, fan_in), device)?.to_dtype(dtype)?)
}

impl Model {
    /// Build from a parsed HF config and HF-named tensors (from a safetensors folder or a GGUF file).
    pub fn from_tensors(
        cfg: ModelConfig,
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        finetune: &Finetune,
    ) -> Result<Self> {
        Self::from_parts(
            cfg,
            tensors,
            &HashMap::new(),
            &HashMap::new(),
            dtype,
            device,
            finetune,
        )
    }

    /// [`Self::from_tensors`] with quantized tensors besides the dense ones (a GGUF file's Q4_0, Q4_1, Q4_K,
    /// Q5_K, Q6_K, Q8_0, … weights): frozen ones stay quantized ([`Weight::Quantized`]), trainable ones (freeze
    /// and full fine-tuning) are dequantized into their Vars.
    pub fn from_parts(
        cfg: ModelConfig,
        tensors: &HashMap<String, Tensor>,
        quantized: &HashMap<String, QWeight>,
        bnb4: &HashMap<String, Arc<Bnb4Tensor>>,
        dtype: DType,
        device: &Device,
        finetune: &Finetune,
    ) -> Result<Self> {
        if cfg.image_text && matches!(finetune, Finetune::Full | Finetune::Freeze { .. }) {
            return Err(EngineError::Invalid(
                "full and freeze fine-tuning of an image-and-text checkpoint (Gemma 3 4B and larger) are not supported yet: termtune runs its text model only, and a saved model would lack the vision tower; use `finetuning_type: lora` (the adapter loads in PEFT on the whole checkpoint, and an export merges it and copies the vision tower through)".into(),
            ));
        }
        let ld = Loader {
            tensors,
            quantized,
            bnb4,
            dtype,
            device,
        };
        let (h, hd, nh, nkv, ff) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.intermediate_size,
        );
        let nl = cfg.num_layers;
        if let Finetune::Freeze { modules, extra, .. } = finetune {
            let (hidden, outer) = freeze_module_names(&cfg);
            for (key, names, known) in [
                ("freeze_trainable_modules", modules, &hidden),
                ("freeze_extra_modules", extra, &outer),
            ] {
                for m in names {
                    if !(known.contains(&m.as_str())
                        || (key == "freeze_trainable_modules" && m == "all"))
                    {
                        return Err(EngineError::Invalid(format!(
                            "`{key}`: module `{m}` is not found in this model; choose from {}",
                            known.join(", ")
                        )));
                    }
                }
            }
        }
        let mut trainable: Vec<(String, Var)> = Vec::new();
        let mut weight = |name: &str, shape: &[usize]| -> Result<Weight> {
            if finetune.trains(name, nl) {
                let v = Var::from_tensor(&ld.get(name, shape)?)?;
                trainable.push((name.to_string(), v.clone()));
                return Ok(Weight::Trainable(v));
            }
            Ok(match ld.load(name, shape)? {
                Loaded::Dense(t) => Weight::Frozen(t),
                Loaded::Quantized(q) => Weight::Quantized(q),
                Loaded::Bnb4(q) => Weight::Bnb4(q),
            })
        };
        let embed = weight("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(nl);
        for i in 0..nl {
            let p = format!("model.layers.{i}");
            let mut lin =
                |leaf: &str, sub: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                    let name = format!("{p}.{sub}.{leaf}");
                    let w = weight(&format!("{name}.weight"), &[out, inp])?;
                    let b = if bias {
                        Some(weight(&format!("{name}.bias"), &[out])?)
                    } else {
                        None
                    };
                    Ok(Linear {
                        name,
                        weight: w,
                        bias: b,
                        lora: None,
                    })
                };
            let q = lin("q_proj", "self_attn", nh * hd, h, cfg.qkv_bias)?;
            let k = lin("k_proj", "self_attn", nkv * hd, h, cfg.qkv_bias)?;
            let v = lin("v_proj", "self_attn", nkv * hd, h, cfg.qkv_bias)?;
            let o = lin("o_proj", "self_attn", h, nh * hd, cfg.o_bias)?;
            let gate = lin("gate_proj", "mlp", ff, h, cfg.mlp_bias)?;
            let up = lin("up_proj", "mlp", ff, h, cfg.mlp_bias)?;
            let down = lin("down_proj", "mlp", h, ff, cfg.mlp_bias)?;
            let input_norm = weight(&format!("{p}.input_layernorm.weight"), &[h])?;
            let mut norm = |leaf: &str| weight(&format!("{p}.{leaf}.weight"), &[h]);
            let (post_norm, attn_out_norm, mlp_out_norm) = if cfg.sandwich_norms {
                let [attn_out, pre_ff, mlp_out] = layer::SANDWICH_NORMS;
                (norm(pre_ff)?, Some(norm(attn_out)?), Some(norm(mlp_out)?))
            } else {
                (norm(layer::POST_ATTENTION_NORM)?, None, None)
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(weight(&format!("{p}.self_attn.q_norm.weight"), &[hd])?),
                    Some(weight(&format!("{p}.self_attn.k_norm.weight"), &[hd])?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                input_norm,
                post_norm,
                attn_out_norm,
                mlp_out_norm,
                q_norm,
                k_norm,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = weight("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let w = weight("lm_head.weight", &[cfg.vocab_size, h])?;
            Some(Linear {
                name: "lm_head".into(),
                weight: w,
                bias: None,
                lora: None,
            })
        };
        let cfg_vocab = cfg.vocab_size;
        let freq_tensor = |f: Vec<f64>| -> Result<Tensor> {
            let f: Vec<f32> = f.into_iter().map(|f| f as f32).collect();
            Ok(Tensor::new(f, device)?)
        };
        let inv_freq = freq_tensor(cfg.rope_inv_freq())?;
        let local_inv_freq = cfg.local_rope_inv_freq().map(freq_tensor).transpose()?;
        let mut model = Self {
            cfg,
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            lora: None,
            lora_vars: VarMap::new(),
            kernels: Kernels::Fused,
            checkpointing: false,
            unpad: true,
            manual_backward: true,
            dropout_seed: 0,
            neftune_alpha: None,
            token_loss: ops::TokenLoss::PLAIN,
            head_chunk_rows: Some(layer::head_chunk_rows(cfg_vocab, device.is_cpu())),
            inv_freq,
            local_inv_freq,
            trainable,
        };
        if let Finetune::Lora(spec) = finetune {
            model.add_lora(spec)?;
        }
        Ok(model)
    }

    /// Build from a loaded folder ([`super::weights::ModelFiles`]).
    pub fn from_files(
        files: &super::weights::ModelFiles,
        dtype: DType,
        device: &Device,
        finetune: &Finetune,
    ) -> Result<Self> {
        let cfg = ModelConfig::from_hf_config(&files.config)?;
        Self::from_parts(
            cfg,
            &files.tensors,
            &files.quantized,
            &files.bnb4,
            dtype,
            device,
            finetune,
        )
    }

    /// dtype of LoRA parameters: f32, or f64 when the model itself is f64 (gradient checks).
    pub fn lora_dtype(&self) -> DType {
        if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Attach fresh LoRA pairs to the target modules: A kaiming-uniform from `spec.seed` and B zero, or with PiSSA
    /// ([`super::pissa::decompose`]) the weight's principal part, the base weight becoming its residual (in the model
    /// dtype, as PEFT stores it back).
    pub fn add_lora(&mut self, spec: &LoraSpec) -> Result<()> {
        if self.lora.is_some() {
            return Err(EngineError::Invalid(
                "a trainable LoRA is already attached; merge it first".into(),
            ));
        }
        if spec.r == 0 {
            return Err(EngineError::Invalid("`lora_rank` must be > 0".into()));
        }
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let (dt, dev, scale) = (self.lora_dtype(), self.device.clone(), spec.scale());
        let mut data = self
            .lora_vars
            .data()
            .lock()
            .map_err(|_| EngineError::Invalid("lora varmap poisoned".into()))?;
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                let leaf = lin.name.rsplit('.').next().unwrap_or_default();
                if !spec.targets.contains(leaf) {
                    continue;
                }
                let (out, inp) = dims2(&lin.name, lin.weight.dims())?;
                let (a, b) = match spec.init {
                    LoraInit::Default => (
                        Var::from_tensor(&kaiming_a(&mut rng, spec.r, inp, dt, &dev)?)?,
                        Var::zeros((out, spec.r), dt, &dev)?,
                    ),
                    LoraInit::Pissa { niter } => {
                        let (a, b) = lin.pissa_residual(spec.r, scale, niter, self.dtype)?;
                        (
                            Var::from_tensor(&a.to_dtype(dt)?)?,
                            Var::from_tensor(&b.to_dtype(dt)?)?,
                        )
                    }
                };
                let dora = if spec.use_dora {
                    // PEFT's `dora_init`: m = ‖W + s·B·A‖ per row (B = 0, or PiSSA's residual and principal part),
                    // computed as the forward computes it (the factor m / ‖…‖ is exactly 1 at the start).
                    let m = super::layer::lora_row_norms(
                        &lin.weight.detached()?,
                        a.as_tensor(),
                        b.as_tensor(),
                        scale,
                    )?;
                    let magnitude = Var::from_tensor(&m)?;
                    data.insert(
                        format!("base_model.model.{}.lora_magnitude_vector", lin.name),
                        magnitude.clone(),
                    );
                    Some(Dora {
                        magnitude,
                        fixed: None,
                    })
                } else {
                    None
                };
                data.insert(
                    format!("base_model.model.{}.lora_A.weight", lin.name),
                    a.clone(),
                );
                data.insert(
                    format!("base_model.model.{}.lora_B.weight", lin.name),
                    b.clone(),
                );
                lin.lora = Some(LoraPair {
                    a,
                    b,
                    scale,
                    dropout: spec.dropout,
                    dora,
                });
            }
        }
        drop(data);
        self.lora = Some(spec.clone());
        Ok(())
    }

    /// Trainable parameters with their names: PEFT names for LoRA (sorted), HF names for freeze/full.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = self.trainable.clone();
        if let Ok(d) = self.lora_vars.data().lock() {
            let mut l: Vec<(String, Var)> = d.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            l.sort_by(|a, b| a.0.cmp(&b.0));
            out.extend(l);
        }
        out
    }

    /// Number of trainable and total parameters.
    pub fn param_counts(&self) -> (usize, usize) {
        let tr: usize = self
            .trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let mut total = self.embed.elem_count() + self.norm.elem_count();
        if let Some(l) = &self.lm_head {
            total += l.weight.elem_count();
        }
        for l in &self.layers {
            total += l.norms().map(Weight::elem_count).sum::<usize>();
            for lin in l.linears() {
                total += lin.weight.elem_count() + lin.bias.as_ref().map_or(0, Weight::elem_count);
            }
        }
        let lora_only: usize = self
            .lora_vars
            .data()
            .lock()
            .map(|d| d.values().map(|v| v.elem_count()).sum())
            .unwrap_or(0);
        (tr, total + lora_only)
    }

    /// Whether the training path uses the kernel set of `ops::fused` (fused CPU kernels, their generic
    /// counterparts elsewhere: `ops::Backend` chooses per tensor) and the hand-written backward.
    fn fused(&self) -> bool {
        self.kernels == Kernels::Fused
    }

    /// The final norm: the decoder layer's RMSNorm ([`layer::rms_norm`]), one implementation.
    fn rms_norm(&self, x: &Tensor, w: &Weight, train: bool) -> Result<Tensor> {
        layer::rms_norm(
            self.kernels,
            self.cfg.rms_norm_eps,
            x,
            w,
            train,
            self.cfg.norm_offset,
        )
    }

    /// cos/sin tables for positions (b, t) → (b, 1, t, d/2) in `dtype`: the global ones, and the sliding-window
    /// layers' own when they have a RoPE base of their own.
    fn rope_tables(&self, positions: &Tensor, dtype: DType) -> Result<RopeTables> {
        let (b, t) = positions.dims2()?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
        // transformers multiplies cos and sin by the attention factor (YaRN's; 1 otherwise) in float32.
        let table = |inv_freq: &Tensor, factor: f64| -> Result<(Tensor, Tensor)> {
            let half = inv_freq.dim(0)?;
            let ang = pos.broadcast_mul(&inv_freq.reshape((1, 1, half))?)?;
            let (mut cos, mut sin) = (ang.cos()?, ang.sin()?);
            if factor != 1.0 {
                cos = cos.affine(factor, 0.0)?;
                sin = sin.affine(factor, 0.0)?;
            }
            Ok((
                cos.to_dtype(dtype)?.unsqueeze(1)?,
                sin.to_dtype(dtype)?.unsqueeze(1)?,
            ))
        };
        Ok(RopeTables {
            global: table(&self.inv_freq, self.cfg.rope_attention_factor())?,
            local: self
                .local_inv_freq
                .as_ref()
                .map(|f| table(f, 1.0))
                .transpose()?,
        })
    }

    /// Layer `i`'s (cos, sin).
    fn layer_rope<'a>(&self, tables: &'a RopeTables, i: usize) -> (&'a Tensor, &'a Tensor) {
        match &tables.local {
            Some((c, s)) if self.cfg.layer_is_local(i) => (c, s),
            _ => (&tables.global.0, &tables.global.1),
        }
    }

    /// Layer `i`'s sliding window, if it has one.
    fn layer_window(&self, i: usize) -> Option<usize> {
        self.cfg.layer_windows.get(i).copied().flatten()
    }

    /// The sliding windows of the layers that are narrower than `s` keys (a wider window masks nothing more).
    fn narrow_windows(&self, s: usize) -> Vec<usize> {
        let mut w: Vec<usize> = self
            .cfg
            .layer_windows
            .iter()
            .flatten()
            .copied()
            .filter(|&w| w < s)
            .collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    /// Additive attention bias (b, 1, t, t) in `dtype`: 0 where allowed, a large negative elsewhere.
    /// Allowed: key ≤ query, same example (seq id), key not padding, with `branch` the key in the shared prefix
    /// (branch 0) or in the query's branch, and with `window` the key among the `window` positions ending at the
    /// query — by position ids when given (a branch after another counts from the shared prefix, as when each is
    /// its own sequence), else by index; a query always sees itself (no empty rows).
    #[allow(clippy::too_many_arguments)]
    fn mask_bias(
        &self,
        b: usize,
        t: usize,
        seq: Option<&[Vec<u32>]>,
        branch: Option<&[Vec<u32>]>,
        window: Option<(usize, Option<&[Vec<u32>]>)>,
        dtype: DType,
    ) -> Result<Tensor> {
        let neg = -1e9f32;
        let bb = if seq.is_some() { b } else { 1 };
        let mut v = vec![0f32; bb * t * t];
        for bi in 0..bb {
            for q in 0..t {
                for k in 0..t {
                    let in_window = |(w, pos): (usize, Option<&[Vec<u32>]>)| match pos {
                        Some(p) => i64::from(p[bi][q]) - i64::from(p[bi][k]) < w as i64,
                        None => q - k < w,
                    };
                    let allowed = k == q
                        || (k < q
                            && window.is_none_or(in_window)
                            && match seq {
                                None => true,
                                Some(s) => s[bi][k] != 0 && s[bi][k] == s[bi][q],
                            }
                            && match branch {
                                None => true,
                                Some(br) => br[bi][k] == 0 || br[bi][k] == br[bi][q],
                            });
                    if !allowed {
                        v[(bi * t + q) * t + k] = neg;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(v, (bb, 1, t, t), &self.device)?.to_dtype(dtype)?)
    }

    /// Input embeddings for token ids (b, t); `host_ids` (their host copy) spares the read-back of the range check.
    fn embed(&self, ids: &Tensor, train: bool, host_ids: Option<&[u32]>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t == 0 {
            return Err(EngineError::Invalid(
                "empty input: a sequence needs at least one token".into(),
            ));
        }
        let max = match host_ids {
            Some(h) => h.iter().copied().max().unwrap_or(0),
            None => ids
                .to_dtype(DType::U32)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<u32>()?,
        };
        if max as usize >= self.cfg.vocab_size {
            return Err(EngineError::Invalid(format!(
                "token id {max} is outside the model's vocabulary (vocab_size {}); tokenizer and model do not match",
                self.cfg.vocab_size
            )));
        }
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?;
        let rows = match &self.embed {
            Weight::Quantized(q) => q.embedding(&ids)?.to_dtype(self.dtype)?,
            w => {
                let w = if train { w.tensor()? } else { w.detached()? };
                w.index_select(&ids, 0)?
            }
        };
        let rows = rows.reshape((b, t, self.cfg.hidden_size))?;
        // Gemma's √hidden scale, rounded to the model dtype as transformers' `embed_scale.to(weight.dtype)`; NEFTune
        // noise comes after it (its hook sees the embedding module's output).
        let rows = match self.cfg.embed_scale {
            Some(scale) => {
                let scale = Tensor::new(scale as f32, rows.device())?.to_dtype(rows.dtype())?;
                rows.broadcast_mul(&scale)?
            }
            None => rows,
        };
        match self.neftune_alpha {
            Some(alpha) if train && alpha > 0.0 => {
                let magnitude = alpha / ((t * self.cfg.hidden_size) as f64).sqrt();
                let noise = ops::uniform_noise(
                    rows.shape(),
                    magnitude,
                    self.dropout_seed,
                    "neftune",
                    rows.dtype(),
                    rows.device(),
                )?;
                Ok(rows.add(&noise)?)
            }
            _ => Ok(rows),
        }
    }

    /// Final hidden states (after the last norm), (b, t, hidden), on the training path (every op differentiable).
    /// `train` enables dropout and autograd tracking of trainable weights.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        train: bool,
    ) -> Result<Tensor> {
        Ok(self.hidden(input_ids, mask, train, false, None)?.0)
    }

    /// [`Self::forward_hidden`]; with `unpad` and a padded batch, the output is (1, N, hidden) over the N real
    /// tokens (row order: batch-major), and the second value maps padded position bi·t + ti to its row.
    fn hidden(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        train: bool,
        unpad: bool,
        host: Option<&HostInputs>,
    ) -> Result<(Tensor, Option<Vec<Option<usize>>>)> {
        let (b, t) = input_ids.dims2()?;
        let check = |name: &str, x: &Tensor| -> Result<()> {
            if x.dims() != [b, t] {
                return Err(EngineError::Invalid(format!(
                    "`{name}` has shape {:?}, expected [{b}, {t}] like input_ids",
                    x.dims()
                )));
            }
            Ok(())
        };
        match mask {
            AttnMask::Causal => {}
            AttnMask::Padding { attention_mask } => check("attention_mask", attention_mask)?,
            AttnMask::Packed {
                seq_ids,
                position_ids,
                branch_ids,
            } => {
                check("seq_ids", seq_ids)?;
                check("position_ids", position_ids)?;
                if let Some(br) = branch_ids {
                    check("branch_ids", br)?;
                }
            }
        }
        let cdt = ops::compute_dtype(self.dtype);
        // (b, t) rows of a mask: from the host copy when given, else read back from the tensor.
        let host_rows = |given: Option<&[u32]>, tensor: &Tensor| -> Result<Vec<Vec<u32>>> {
            match given {
                Some(v) if v.len() == b * t => Ok(rows_of(v, t)),
                _ => Ok(tensor.to_dtype(DType::U32)?.to_vec2::<u32>()?),
            }
        };
        let (positions, seq, branch) = match mask {
            AttnMask::Causal => (
                Tensor::arange(0u32, t as u32, &self.device)?.reshape((1, t))?,
                None,
                None,
            ),
            AttnMask::Padding { attention_mask } => (
                Tensor::arange(0u32, t as u32, &self.device)?.reshape((1, t))?,
                Some(host_rows(
                    host.and_then(|h| h.attention_mask),
                    attention_mask,
                )?),
                None,
            ),
            AttnMask::Packed {
                seq_ids,
                position_ids,
                branch_ids,
            } => (
                position_ids.clone(),
                Some(host_rows(host.and_then(|h| h.sequence_ids), seq_ids)?),
                match branch_ids {
                    Some(br) => Some(host_rows(host.and_then(|h| h.branch_ids), br)?),
                    None => None,
                },
            ),
        };
        let rope = self.rope_tables(&positions, self.dtype)?;
        // The rows whose zeros are padding (the padding mask, or the example ids of a packed batch): unpadding and
        // its row map come from them.
        let pad_rows = if unpad { seq.clone() } else { None };
        let bias = self.mask_bias(b, t, seq.as_deref(), branch.as_deref(), None, cdt)?;
        let narrow = self.narrow_windows(t);
        // A packed batch's windows count positions (a branch restarts after the shared prefix).
        let pos_rows = match mask {
            AttnMask::Packed { position_ids, .. } if !narrow.is_empty() => {
                Some(host_rows(host.and_then(|h| h.position_ids), position_ids)?)
            }
            _ => None,
        };
        let windowed = narrow
            .into_iter()
            .map(|w| {
                let window = Some((w, pos_rows.as_deref()));
                let bias = self.mask_bias(b, t, seq.as_deref(), branch.as_deref(), window, cdt)?;
                Ok((w, bias))
            })
            .collect::<Result<HashMap<usize, Tensor>>>()?;
        let layer_bias = |i: usize| -> &Tensor {
            self.layer_window(i)
                .and_then(|w| windowed.get(&w))
                .unwrap_or(&bias)
        };
        let pad = match &pad_rows {
            Some(m) => layer::Unpad::from_mask(m, &self.device)?,
            None => None,
        };
        let mut x = self.embed(input_ids, train, host.map(|h| h.input_ids))?;
        if let Some(p) = &pad {
            x = x
                .reshape((b * t, self.cfg.hidden_size))?
                .index_select(&p.real, 0)?
                .unsqueeze(0)?;
        }
        let ctx = self.layer_ctx();
        for (i, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = self.layer_rope(&rope, i);
            let bias = layer_bias(i);
            // The layer op: with checkpointing (recompute in the backward), or without it when the hand-written
            // backward covers the layer (activations kept); else candle's graph through the plain forward.
            let manual = self.manual_backward && layer::manual_ok(&ctx, layer);
            x = if train && (self.checkpointing || manual) {
                let keep = !self.checkpointing;
                layer::checkpointed_layer(
                    &ctx,
                    layer,
                    &x,
                    cos,
                    sin,
                    bias,
                    pad.as_ref(),
                    manual,
                    keep,
                )?
            } else {
                let io = LayerIo {
                    cos,
                    sin,
                    bias: Some(bias),
                    pad: pad.as_ref(),
                    cache: None,
                };
                layer::forward(&ctx, layer, &x, io, Pass::train(train), None)?
            };
        }
        let rows = match (&pad, &pad_rows) {
            (Some(_), Some(m)) => {
                // Row r of the unpadded batch is the r-th real position, batch-major (as `Unpad::from_mask`).
                let mut map = vec![None; b * t];
                let real = m
                    .iter()
                    .flatten()
                    .enumerate()
                    .filter(|(_, v)| **v != 0)
                    .map(|(pos, _)| pos);
                for (row, pos) in real.enumerate() {
                    map[pos] = Some(row);
                }
                Some(map)
            }
            _ => None,
        };
        Ok((self.rms_norm(&x, &self.norm, train)?, rows))
    }

    /// The per-layer settings the decoder layer needs (small, `Copy`: also held by the checkpoint op).
    fn layer_ctx(&self) -> LayerCtx {
        LayerCtx {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            eps: self.cfg.rms_norm_eps,
            norm_offset: self.cfg.norm_offset,
            activation: self.cfg.activation,
            attn_scale: self.cfg.attn_scale,
            dtype: self.dtype,
            kernels: self.kernels,
            dropout_seed: self.dropout_seed,
        }
    }

    /// lm_head on hidden states of any leading shape → logits in the compute dtype (f32, or f64).
    pub fn logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        let cdt = ops::compute_dtype(self.dtype);
        let y = match &self.lm_head {
            Some(l) => l.forward(hidden, train, self.dropout_seed)?,
            None => match &self.embed {
                Weight::Frozen(w) => ops::frozen_linear(hidden, w)?,
                Weight::Quantized(q) => ops::quantized_linear(hidden, q)?,
                Weight::Bnb4(q) => ops::bnb4_linear(hidden, q)?,
                Weight::Trainable(v) => {
                    let w = if train {
                        v.as_tensor().clone()
                    } else {
                        v.as_detached_tensor()
                    };
                    ops::linear(hidden, &w)?
                }
            },
        };
        Ok(y.to_dtype(cdt)?)
    }

    /// The lm_head weight (vocab, hidden) in the model's dtype when it is a frozen plain matrix (tied frozen
    /// embeddings, or a frozen lm_head without LoRA or bias), for the chunked head. A quantized one (a GGUF's) is
    /// dequantized here, once for the whole head pass and its backward: the logits of all rows never exist, and the
    /// product is the exact one with the dequantized weight, as [`ops::quantized_linear`]'s for many rows.
    fn frozen_head(&self) -> Result<Option<Tensor>> {
        let w = match &self.lm_head {
            None => &self.embed,
            Some(l) if l.bias.is_none() && l.lora.is_none() => &l.weight,
            Some(_) => return Ok(None),
        };
        Ok(match w {
            Weight::Frozen(w) => Some(w.clone()),
            Weight::Quantized(_) | Weight::Bnb4(_) => Some(w.detached()?.to_dtype(self.dtype)?),
            Weight::Trainable(_) => None,
        })
    }

    /// Full forward → logits (b, t, vocab) in the compute dtype.
    pub fn forward(&self, input_ids: &Tensor, mask: &AttnMask, train: bool) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, mask, train)?;
        self.logits(&h, train)
    }

    /// Masked causal-LM loss. `labels` (b, t) i64 aligned with `input_ids` (HF convention: shifted inside),
    /// −100 = ignored. Returns (sum of token losses as a scalar tensor, number of counted tokens), so the trainer
    /// can normalise across gradient accumulation. lm_head runs only on the counted positions.
    pub fn forward_loss(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        labels: &Tensor,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        self.forward_loss_with(input_ids, mask, labels, None, train)
    }

    /// [`Self::forward_loss`] with the host copies of the inputs: no tensor is read back from the device (the
    /// trainer's path; on a GPU the work of consecutive micro-batches then queues without a wait).
    pub fn forward_loss_with(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        labels: &Tensor,
        host: Option<&HostInputs>,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        let cdt = ops::compute_dtype(self.dtype);
        let Some(lab) = self.labelled(input_ids, mask, labels, host, train)? else {
            return Ok((Tensor::zeros((), cdt, &self.device)?, 0));
        };
        let Labelled {
            hs, targets: tgt, ..
        } = lab;
        let n = tgt.len();
        if let Some(chunk) = self.head_chunk_rows
            && self.fused()
            && let Some(w) = self.frozen_head()?
        {
            let loss = super::profile::span("lm_head + cross-entropy", &self.device, || {
                layer::head_loss_chunked(&hs, &w, &tgt, chunk, self.token_loss)
            })?;
            return Ok((loss, n));
        }
        let logits = self.logits(&hs, train)?;
        let targets = Tensor::from_vec(tgt, n, &self.device)?;
        let token_loss = self.token_loss;
        let loss = if self.fused() {
            ops::fused::cross_entropy_sum(&logits, &targets, token_loss)?
        } else {
            let logp = ops::log_softmax_pure(&logits)?;
            let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
            // DFT: each token weighted by its (detached) probability; EAFT by its top-k entropy; 1 otherwise.
            let weights = if token_loss.dft {
                picked.exp()?.detach()
            } else if let Some(alpha) = token_loss.eaft {
                ops::generic::eaft_weights(&logits, alpha)?.squeeze(1)?
            } else {
                Tensor::ones(n, cdt, &self.device)?
            };
            let nll = (&picked * &weights)?.sum_all()?.neg()?;
            let eps = token_loss.smoothing;
            if eps == 0.0 {
                nll
            } else {
                // transformers' LabelSmoother: (1 − ε)·nll + ε·mean over the vocabulary of −log p.
                let uniform = (logp.mean(1)? * &weights)?.sum_all()?.neg()?;
                ((nll * (1.0 - eps))? + (uniform * eps)?)?
            }
        };
        Ok((loss, n))
    }

    /// The hidden states (n, hidden) of the labelled positions (HF convention: position i predicts label i + 1),
    /// their targets and batch rows; `None` when nothing is labelled.
    fn labelled(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        labels: &Tensor,
        host: Option<&HostInputs>,
        train: bool,
    ) -> Result<Option<Labelled>> {
        let (b, t) = input_ids.dims2()?;
        if labels.dims() != [b, t] {
            return Err(EngineError::Invalid(format!(
                "`labels` has shape {:?}, expected [{b}, {t}] like input_ids",
                labels.dims()
            )));
        }
        let lab: Vec<Vec<i64>> = match host {
            Some(h) if h.labels.len() == b * t => {
                h.labels.chunks(t.max(1)).map(<[i64]>::to_vec).collect()
            }
            _ => labels.to_dtype(DType::I64)?.to_vec2::<i64>()?,
        };
        let mut rows = Vec::new();
        let mut tgt = Vec::new();
        let mut batch_rows = Vec::new();
        for (bi, row) in lab.iter().enumerate() {
            for ti in 0..t.saturating_sub(1) {
                let y = row[ti + 1];
                if y == -100 {
                    continue;
                }
                if y < 0 || y as usize >= self.cfg.vocab_size {
                    return Err(EngineError::Invalid(format!(
                        "label {y} at ({bi}, {}) is outside the vocabulary (0..{})",
                        ti + 1,
                        self.cfg.vocab_size
                    )));
                }
                rows.push((bi * t + ti) as u32);
                tgt.push(y as u32);
                batch_rows.push(bi);
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(Labelled {
            hs: self.hidden_at(input_ids, mask, host, train, rows)?,
            targets: tgt,
            batch_rows,
        }))
    }

    /// The final hidden states (n, hidden) at padded positions `rows` (bi·t + ti), padding removed on the way
    /// when the model unpads.
    pub fn hidden_at(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        host: Option<&HostInputs>,
        train: bool,
        rows: Vec<u32>,
    ) -> Result<Tensor> {
        let n = rows.len();
        let (h, packed) = self.hidden(input_ids, mask, train, self.unpad, host)?;
        // With padding removed, a wanted position must be a real token (it always is for right or left
        // padding); otherwise run again on the padded layout.
        let (h, rows) = match packed {
            None => (h, rows),
            Some(map) => match rows
                .iter()
                .map(|&r| map[r as usize].map(|x| x as u32))
                .collect::<Option<Vec<u32>>>()
            {
                Some(mapped) => (h, mapped),
                None => (self.hidden(input_ids, mask, train, false, host)?.0, rows),
            },
        };
        let idx = Tensor::from_vec(rows, n, &self.device)?;
        Ok(h.reshape(((), self.cfg.hidden_size))?
            .index_select(&idx, 0)?)
    }

    /// Each row's final hidden state (b, hidden) at its last real token (the attention mask's count − 1, as
    /// LLaMA-Factory's `PairwiseTrainer` picks the reward model's score): what a value head reads.
    pub fn last_hidden(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        host: Option<&HostInputs>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let lens: Vec<usize> = match (host.and_then(|h| h.attention_mask), mask) {
            (Some(m), _) if m.len() == b * t => m
                .chunks(t.max(1))
                .map(|r| r.iter().filter(|&&v| v != 0).count())
                .collect(),
            (_, AttnMask::Padding { attention_mask }) => attention_mask
                .to_dtype(DType::U32)?
                .to_vec2::<u32>()?
                .iter()
                .map(|r| r.iter().filter(|&&v| v != 0).count())
                .collect(),
            _ => vec![t; b],
        };
        if let Some(row) = lens.iter().position(|&l| l == 0) {
            return Err(EngineError::Invalid(format!(
                "row {row} of the batch has no token"
            )));
        }
        let rows = lens
            .iter()
            .enumerate()
            .map(|(bi, &l)| (bi * t + l - 1) as u32)
            .collect();
        self.hidden_at(input_ids, mask, host, train, rows)
    }

    /// The log-probability of each row's labels, summed over its labelled positions (TRL's and LLaMA-Factory's
    /// `get_batch_logps`), with the way back ([`SequenceLogps::backward`]) when `train`. With a frozen head and the
    /// fused kernels the lm_head runs in chunks of `head_chunk_rows` (full logits never exist), else on all rows.
    pub fn sequence_logps(
        &self,
        input_ids: &Tensor,
        mask: &AttnMask,
        labels: &Tensor,
        host: Option<&HostInputs>,
        train: bool,
    ) -> Result<SequenceLogps> {
        let (b, _) = input_ids.dims2()?;
        let mut out = SequenceLogps {
            logps: vec![0.0; b],
            tokens: vec![0; b],
            position_logps: Vec::new(),
            batch_rows: Vec::new(),
            weights: Vec::new(),
            grad: None,
        };
        let Some(Labelled {
            hs,
            targets,
            batch_rows,
        }) = self.labelled(input_ids, mask, labels, host, train)?
        else {
            return Ok(out);
        };
        for &r in &batch_rows {
            out.tokens[r] += 1;
        }
        out.weights = vec![1.0; batch_rows.len()];
        if let Some(chunk) = self.head_chunk_rows
            && self.fused()
            && let Some(w) = self.frozen_head()?
        {
            out.position_logps =
                super::profile::span("lm_head + log-probabilities", &self.device, || {
                    layer::head_logps_chunked(&hs, &w, &targets, chunk)
                })?;
            for (&r, lp) in batch_rows.iter().zip(&out.position_logps) {
                out.logps[r] += lp;
            }
            out.batch_rows = batch_rows;
            if train {
                out.grad = Some(LogpsGrad::Head {
                    hs,
                    w,
                    targets,
                    chunk,
                });
            }
            return Ok(out);
        }
        let n = targets.len();
        let logits = self.logits(&hs, train)?;
        let tg = Tensor::from_vec(targets, n, &self.device)?;
        let picked = ops::log_softmax_pure(&logits)?
            .gather(&tg.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        out.position_logps = picked.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (&r, lp) in batch_rows.iter().zip(&out.position_logps) {
            out.logps[r] += lp;
        }
        out.batch_rows = batch_rows;
        if train {
            out.grad = Some(LogpsGrad::Graph(picked));
        }
        Ok(out)
    }

    /// Runs `f` with every LoRA of the model switched off (PEFT's `disable_adapter()`): the base model, e.g. DPO's
    /// reference. The adapters are back when it returns.
    pub fn with_adapter_disabled<T>(&mut self, f: impl FnOnce(&Model) -> T) -> T {
        let stash: Vec<Option<LoraPair>> = self
            .linears_mut()
            .into_iter()
            .map(|l| l.lora.take())
            .collect();
        let out = f(self);
        for (l, lora) in self.linears_mut().into_iter().zip(stash) {
            l.lora = lora;
        }
        out
    }

    /// Fixes every DoRA factor for inference ([`Linear::fix_dora`]): the weights must not change afterwards.
    pub fn fix_dora(&mut self) -> Result<()> {
        for l in self.linears_mut() {
            l.fix_dora()?;
        }
        Ok(())
    }

    /// Sets the dropout of every LoRA pair (TRL's preference trainers switch dropout off).
    pub fn set_lora_dropout(&mut self, dropout: f32) {
        for l in self.linears_mut() {
            if let Some(pair) = &mut l.lora {
                pair.dropout = dropout;
            }
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(Layer::linears_mut)
            .chain(self.lm_head.iter_mut())
            .collect()
    }

    /// Inference forward with a KV cache: ids (b, t) appended after `cache.seq_len` tokens.
    /// Returns logits (b, t, vocab) f32 (only the last position when `last_only`). Uses candle's fused kernels
    /// where the dtype allows, and detached weights (no autograd graph).
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        self.forward_cached_padded(ids, cache, &[], last_only)
    }

    /// [`Model::forward_cached`] for a left-padded batch (batched generation, as transformers pads for
    /// `generate`): row i begins with `left_pad[i]` padding tokens (counted from the start of the cache),
    /// which no query attends to and which do not advance the row's positions, so each row computes what it
    /// would alone. Empty `left_pad`: no padding.
    pub fn forward_cached_padded(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        left_pad: &[usize],
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if !left_pad.is_empty() && left_pad.len() != b {
            return Err(EngineError::Invalid(format!(
                "forward_cached_padded: {} padding lengths for a batch of {b}",
                left_pad.len()
            )));
        }
        if cache.kv.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let past = cache.seq_len;
        let s = past + t;
        let padded = left_pad.iter().any(|&p| p > 0);
        let positions = if padded {
            // Pads sit at position 0 (never attended to); real tokens count from 0 after the pads.
            let v: Vec<u32> = left_pad
                .iter()
                .flat_map(|&p| (past..s).map(move |j| j.saturating_sub(p) as u32))
                .collect();
            Tensor::from_vec(v, (b, t), &self.device)?
        } else {
            Tensor::arange(past as u32, s as u32, &self.device)?.reshape((1, t))?
        };
        let rope = self.rope_tables(&positions, self.dtype)?;
        // Causal among the new tokens; every cached one is visible, except a row's padding (which only
        // sees itself, so that no softmax row is empty) and, for a sliding-window layer, the keys before its
        // window. One new token, no padding and no window to apply: nothing to mask.
        let cached_bias = |window: Option<usize>| -> Result<Tensor> {
            let rows = if padded { b } else { 1 };
            let mut v = vec![0f32; rows * t * s];
            for r in 0..rows {
                let pad = left_pad.get(r).copied().unwrap_or(0);
                for q in 0..t {
                    let qpos = past + q;
                    for k in 0..s {
                        let outside = window.is_some_and(|w| k + w <= qpos);
                        if k > qpos || (k < pad && k != qpos) || outside {
                            v[(r * t + q) * s + k] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            Ok(Tensor::from_vec(v, (rows, 1, t, s), &self.device)?)
        };
        let bias = if t > 1 || padded {
            Some(cached_bias(None)?)
        } else {
            None
        };
        let windowed = self
            .narrow_windows(s)
            .into_iter()
            .map(|w| Ok((w, cached_bias(Some(w))?)))
            .collect::<Result<HashMap<usize, Tensor>>>()?;
        // candle-nn's fused inference kernels, where the dtype has them (f64 runs the pure ops).
        let ctx = LayerCtx {
            kernels: if self.dtype == DType::F64 {
                Kernels::Pure
            } else {
                Kernels::Inference
            },
            ..self.layer_ctx()
        };
        let mut x = self.embed(ids, false, None)?;
        for (i, (l, slot)) in self.layers.iter().zip(cache.kv.iter_mut()).enumerate() {
            let (cos, sin) = self.layer_rope(&rope, i);
            let bias = self
                .layer_window(i)
                .and_then(|w| windowed.get(&w))
                .or(bias.as_ref());
            let io = LayerIo {
                cos,
                sin,
                bias,
                pad: None,
                cache: Some(slot),
            };
            x = layer::forward(&ctx, l, &x, io, Pass::train(false), None)?;
        }
        cache.seq_len += t;
        let x = if last_only {
            x.i((.., t - 1..t, ..))?
        } else {
            x
        };
        let x = layer::rms_norm(ctx.kernels, ctx.eps, &x, &self.norm, false, ctx.norm_offset)?;
        self.logits(&x, false)
    }

    /// Lays the frozen linear weights out for generation on the CPU: each (out, in) matrix is stored transposed
    /// (in × out, contiguous) and used through its transposed view. Values are unchanged; gemm then reads the
    /// weight as it is instead of repacking the whole matrix for every token (with one token per row, packing
    /// cost as much as the product itself). Only for models that no longer train or merge.
    pub fn prepare_for_inference(&mut self) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                if let Weight::Frozen(w) = &lin.weight
                    && w.is_contiguous()
                    && w.rank() == 2
                {
                    lin.weight = Weight::Frozen(w.t()?.contiguous()?.t()?);
                }
            }
        }
        Ok(())
    }

    /// Merge `s·B·A` of the trainable LoRA into the frozen base weights and drop the LoRA Vars.
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                if lin.lora.is_some() {
                    let w = lin.merged_weight()?;
                    lin.weight = match &lin.weight {
                        Weight::Frozen(_) => Weight::Frozen(w),
                        // The merged weight is dense: a quantized base is dequantized (in the model dtype).
                        Weight::Quantized(_) | Weight::Bnb4(_) => {
                            Weight::Frozen(w.to_dtype(self.dtype)?)
                        }
                        Weight::Trainable(v) => {
                            v.set(&w)?;
                            Weight::Trainable(v.clone())
                        }
                    };
                    lin.lora = None;
                }
            }
        }
        self.lora = None;
        self.lora_vars = VarMap::new();
        Ok(())
    }

    /// HF-named weights with any LoRA merged (`W0 + s·B·A`), for export. Tied embeddings stay tied
    /// (no `lm_head.weight`).
    pub fn merged_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert(
            "model.embed_tokens.weight".to_string(),
            self.embed.detached()?,
        );
        out.insert("model.norm.weight".to_string(), self.norm.detached()?);
        if let Some(l) = &self.lm_head {
            out.insert("lm_head.weight".to_string(), l.merged_weight()?);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (leaf, w) in l.named_norms() {
                out.insert(format!("{p}.{leaf}.weight"), w.detached()?);
            }
            for lin in l.linears() {
                out.insert(format!("{}.weight", lin.name), lin.merged_weight()?);
                if let Some(b) = &lin.bias {
                    out.insert(format!("{}.bias", lin.name), b.detached()?);
                }
            }
        }
        Ok(out)
    }

    /// Find a linear by HF module path (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        if module == "lm_head" {
            return self.lm_head.as_mut();
        }
        let rest = module.strip_prefix("model.layers.")?;
        let (idx, _) = rest.split_once('.')?;
        let idx: usize = idx.parse().ok()?;
        self.layers
            .get_mut(idx)?
            .linears_mut()
            .into_iter()
            .find(|l| l.name == module)
    }

    /// All linears (for adapter save/merge).
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .chain(self.lm_head.iter())
    }

    /// Vocabulary size (logit width).
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Last-position logits as a 1-D f32 vector tensor from a `forward_cached` result.
    pub fn last_logits(logits: &Tensor) -> Result<Tensor> {
        let (_, t, _) = logits.dims3()?;
        Ok(logits.i((0, t - 1))?.to_dtype(DType::F32)?)
    }

    /// Reduce a (.., vocab) logits tensor to D::Minus1 argmax ids (helper for tests and greedy decoding).
    pub fn argmax_last(logits: &Tensor) -> Result<Tensor> {
        Ok(logits.argmax(D::Minus1)?)
    }
}

/// (out, in) of a linear's weight shape.
pub(crate) fn dims2(name: &str, dims: &[usize]) -> Result<(usize, usize)> {
    match dims {
        [o, i] => Ok((*o, *i)),
        d => Err(EngineError::Invalid(format!(
            "{name}: a linear weight is 2-D, this one has shape {d:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::engine::testing::{TinyOpts, tiny_llama};

    /// NEFTune adds U(−α/√(t·hidden), α/√(t·hidden)) to every input embedding of a training forward (t: the padded
    /// length, as transformers' hook), drawn from `dropout_seed`; inference embeddings stay exact.
    #[test]
    fn neftune_noise_has_transformers_magnitude_and_only_in_training() {
        let d = tempfile::tempdir().unwrap();
        let opts = TinyOpts::default();
        tiny_llama(d.path(), 1, &opts).unwrap();
        let files =
            super::super::weights::load_hf_folder(d.path(), DType::F32, &Device::Cpu).unwrap();
        let mut m = Model::from_files(&files, DType::F32, &Device::Cpu, &Finetune::Frozen).unwrap();
        let t = 50;
        let ids: Vec<u32> = (0..2 * t as u32).map(|i| (i * 7) % 300).collect();
        let ids = Tensor::from_vec(ids, (2, t), &Device::Cpu).unwrap();
        let clean = m.embed(&ids, false, None).unwrap();
        assert_eq!(
            crate::engine::testing::max_abs_diff(&clean, &m.embed(&ids, true, None).unwrap())
                .unwrap(),
            0.0
        );
        m.neftune_alpha = Some(5.0);
        m.dropout_seed = 3;
        assert_eq!(
            crate::engine::testing::max_abs_diff(&clean, &m.embed(&ids, false, None).unwrap())
                .unwrap(),
            0.0
        );
        let noise = (m.embed(&ids, true, None).unwrap() - &clean).unwrap();
        let noise = noise.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mag = 5.0 / ((t * opts.hidden_size) as f32).sqrt();
        let max = noise.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(
            max <= mag * 1.0001 && max > 0.99 * mag,
            "max |noise| {max} vs {mag}"
        );
        let mean_abs = noise.iter().map(|x| x.abs()).sum::<f32>() / noise.len() as f32;
        assert!(
            (mean_abs / mag - 0.5).abs() < 0.02,
            "mean |noise| {mean_abs} vs {mag} / 2"
        );
        let again = (m.embed(&ids, true, None).unwrap() - &clean).unwrap();
        assert_eq!(
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            noise
        );
    }
}
