//! The decoder layer, defined once ([`forward`]), and what is built on it:
//!
//! - [`forward`] serves every pass: training (tracked), the graph-free passes of the checkpoint op, the forward
//!   of the hand-written backward (keeping its activations), and inference with a KV-cache slot. The kernels are
//!   a strategy ([`Kernels`]: fused with their own backward, pure candle ops, or candle-nn's inference kernels),
//!   and every linear is [`Linear::apply`], the one linear + LoRA (with its one backward formula,
//!   [`ops::lora_linear_backward`]).
//! - [`checkpointed_layer`]: activation checkpointing per decoder layer. The layer runs as one candle op whose
//!   forward keeps no graph (only the layer's input stays alive, as the op's argument); its backward recomputes
//!   the layer with tracking and backpropagates through that local graph (or runs the hand-written backward).
//!   The layer's trainable Vars enter the op as one flat tensor (`cat` of the flattened Vars), so candle's own
//!   `cat` backward hands each Var its slice of the gradient, and the trainer's `loss.backward()` works unchanged.
//! - [`head_loss_chunked`]: lm_head + cross-entropy over chunks of labelled rows, so a (rows × vocab) logits
//!   matrix never exists at once. The gradient with respect to the hidden rows is computed chunk by chunk in the
//!   forward (the loss is a scalar, so the incoming gradient only scales it) and kept as a (rows × hidden)
//!   tensor: two GEMMs like the unchunked path, none recomputed.
//!
//! All give the same loss and gradients as the plain path up to float rounding; `tests/engine.rs` checks it.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, Var};

use super::arch::Activation;
use super::bnb4::Bnb4Tensor;
use super::error::{EngineError, Result};
use super::ops;
use super::profile::span;
use super::qweight::QWeight;

type R<T> = candle_core::Result<T>;

/// A parameter: frozen plain tensor, trainable Var, or a frozen weight kept in a GGML block format.
#[derive(Debug, Clone)]
pub enum Weight {
    Frozen(Tensor),
    Trainable(Var),
    /// A frozen 2-D weight (out, in) kept quantized (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, … from a GGUF file):
    /// linears multiply with termtune's integer kernels on the CPU ([`ops::quantized_linear`]) or candle's
    /// quantized ones, embeddings look rows up dequantized, and a dense copy exists only transiently (the input
    /// gradient, merging, export).
    Quantized(QWeight),
    /// A frozen 2-D weight (out, in) in bitsandbytes' 4-bit layout (`quantization_bit: 4`, NF4 or FP4, blocks of
    /// 64): linears dequantize it for each product ([`ops::bnb4_linear`]), no dense copy is kept.
    Bnb4(Arc<Bnb4Tensor>),
}

impl Weight {
    /// The value as a dense tensor: tracked for a Var, dequantized (to f32, transiently) for a quantized weight.
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Self::Frozen(t) => Ok(t.clone()),
            Self::Trainable(v) => Ok(v.as_tensor().clone()),
            Self::Quantized(q) => Ok(q.dequantize(&q.device())?),
            Self::Bnb4(q) => q.dequantize(),
        }
    }
    /// The current value without autograd tracking (dequantized for a quantized weight).
    pub fn detached(&self) -> Result<Tensor> {
        match self {
            Self::Frozen(t) => Ok(t.clone()),
            Self::Trainable(v) => Ok(v.as_detached_tensor()),
            Self::Quantized(q) => Ok(q.dequantize(&q.device())?),
            Self::Bnb4(q) => q.dequantize(),
        }
    }
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Frozen(t) => t.dims(),
            Self::Trainable(v) => v.dims(),
            Self::Quantized(q) => q.dims(),
            Self::Bnb4(q) => q.dims(),
        }
    }
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }
    /// Bytes the weight occupies where it lives.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Frozen(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Trainable(v) => v.elem_count() * v.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Bnb4(q) => q.storage_size_in_bytes(),
        }
    }
    /// Whether the weight is frozen (plain or quantized).
    pub fn is_frozen(&self) -> bool {
        !matches!(self, Self::Trainable(_))
    }
}

/// A LoRA pair on one linear (A: (r, in), B: (out, r)), f32 (f64 when the model is f64), with DoRA's magnitude
/// when `use_dora`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
    pub dora: Option<Dora>,
}

/// DoRA (PEFT's `use_dora`): the linear's output row j is rescaled to `m_j / ‖W_j + s·(B·A)_j‖`, m (out) a trainable
/// magnitude initialised to the row norms of W. As in PEFT (and the DoRA paper, §4.3) the norm is detached: no
/// gradient flows through it.
#[derive(Debug, Clone)]
pub struct Dora {
    /// m (out), in the LoRA dtype.
    pub magnitude: Var,
    /// `m / ‖W + s·B·A‖` fixed once for inference ([`Linear::fix_dora`]: the weights no longer change), so a
    /// decode step does not recompute the norms; `None` while training.
    pub fixed: Option<Tensor>,
}

impl LoraPair {
    /// The DoRA row factor `c = m / ‖W + s·B·A‖` (out) of this pair over the base weight `w`, tracked through m
    /// when `track` (the norm is detached), and the norm it divided by (`None` when the factor was fixed for
    /// inference).
    fn dora_factor(
        &self,
        dora: &Dora,
        w: &Weight,
        track: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if let (Some(c), false) = (&dora.fixed, track) {
            return Ok((c.clone(), None));
        }
        let norm = lora_row_norms(
            &w.detached()?,
            &self.a.as_detached_tensor(),
            &self.b.as_detached_tensor(),
            self.scale,
        )?;
        let m = if track {
            dora.magnitude.as_tensor().clone()
        } else {
            dora.magnitude.as_detached_tensor()
        };
        Ok((m.div(&norm)?, Some(norm)))
    }
}

/// What a linear's forward keeps of its LoRA for the hand-written backward ([`Linear::backward`]).
pub(crate) struct LoraActs {
    /// (x⊙mask)·Aᵀ, (rows, r).
    xa: Tensor,
    /// DoRA: z = W·(x⊙mask) + s·B·A·(x⊙mask) (rows, out; the output before the factor, without bias), the factor c
    /// and the norm ‖W + s·B·A‖ (out), all in the LoRA dtype.
    dora: Option<(Tensor, Tensor, Tensor)>,
}

/// The gradients of one linear's LoRA from the hand-written backward: A, B and DoRA's magnitude.
pub(crate) struct LoraGrad {
    da: Tensor,
    db: Tensor,
    dm: Option<Tensor>,
}

/// `‖W + s·B·A‖` of each output row (out), in A's dtype (PEFT's `DoraLinearLayer.get_weight_norm`), detached
/// ([`ops::fused::lora_row_norms`]).
pub fn lora_row_norms(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(ops::fused::lora_row_norms(w, a, b, scale)?)
}

/// `W + s·B·A`, or with DoRA's magnitude m `(m / ‖W + s·B·A‖) ⊙ (W + s·B·A)` row by row (PEFT's merge), in A's dtype:
/// the one merge of a LoRA pair into its base weight (export, stacked adapters, `merge_lora`).
pub fn lora_merged(
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    magnitude: Option<&Tensor>,
) -> Result<Tensor> {
    let full = (w.to_dtype(a.dtype())? + (b.matmul(a)? * scale)?)?;
    Ok(match magnitude {
        None => full,
        Some(m) => {
            let norm = full.sqr()?.sum(1)?.sqrt()?;
            full.broadcast_mul(&m.to_dtype(a.dtype())?.div(&norm)?.unsqueeze(1)?)?
        }
    })
}

/// A linear layer with optional bias and LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Weight>,
    pub lora: Option<LoraPair>,
}

impl Linear {
    /// PiSSA ([`super::pissa::decompose`], `niter` as there): the weight becomes its residual, stored in `dtype`; returns the
    /// starting `(A, B)` in f32. A quantized or trainable weight is refused (PEFT decomposes only float weights).
    pub fn pissa_residual(
        &mut self,
        r: usize,
        scale: f64,
        niter: Option<usize>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let w = match &self.weight {
            Weight::Frozen(w) => w,
            Weight::Quantized(_) => {
                return Err(EngineError::Invalid(format!(
                    "PiSSA needs the base weights in float (f32, f16 or bf16), and `{}` is held in a GGUF file's quantized blocks: set `gguf_dequantize: true`, or remove `pissa_init`",
                    self.name
                )));
            }
            Weight::Bnb4(_) | Weight::Trainable(_) => {
                return Err(EngineError::Invalid(format!(
                    "PiSSA needs the base weights in float (f32, f16 or bf16) and frozen; `{}` is quantized or trained",
                    self.name
                )));
            }
        };
        let d = super::pissa::decompose(w, r, scale, niter, &self.name)?;
        self.weight = Weight::Frozen(d.residual.to_dtype(dtype)?);
        Ok((d.a, d.b))
    }

    /// Inference or a plain tracked forward (`train`: tracked weights, LoRA dropout with `dropout_seed`), with the
    /// pure candle ops: what the lm_head uses.
    pub(crate) fn forward(&self, x: &Tensor, train: bool, dropout_seed: u64) -> Result<Tensor> {
        let pass = Pass {
            track: train,
            dropout: train,
        };
        Ok(self.apply(x, Kernels::Pure, pass, dropout_seed)?.0)
    }

    /// The LoRA dropout mask of this linear's input `x` for `dropout_seed` (see [`ops::lora_dropout_mask`]), or
    /// `None` when there is no dropout (or not training).
    pub(crate) fn dropout_mask(
        &self,
        x: &Tensor,
        train: bool,
        dropout_seed: u64,
    ) -> Result<Option<Tensor>> {
        match &self.lora {
            Some(l) if train && l.dropout > 0.0 => Ok(Some(ops::lora_dropout_mask(
                x.shape(),
                l.dropout,
                dropout_seed,
                &self.name,
                l.a.dtype(),
                x.device(),
            )?)),
            _ => Ok(None),
        }
    }

    /// The one linear + LoRA forward: `y = x·W0ᵀ + s·((x⊙m)·Aᵀ)·Bᵀ + bias` for x of any rank, m the LoRA dropout
    /// mask of `dropout_seed` when `pass.dropout`. LoRA runs in its own dtype (f32 over a bf16 base, as PEFT keeps
    /// adapters) and is added in the base's. `pass.track` records the graph through tracked weights (else all
    /// weights are detached). The fused kernel set multiplies a frozen base with LoRA and no dropout as one op
    /// ([`ops::LoraLinear`]: its graph keeps only x). Also returns what the hand-written backward
    /// ([`Self::backward`]) needs of the LoRA ([`LoraActs`]) when there is LoRA and the one op did not run.
    pub(crate) fn apply(
        &self,
        x: &Tensor,
        kernels: Kernels,
        pass: Pass,
        dropout_seed: u64,
    ) -> Result<(Tensor, Option<LoraActs>)> {
        let dims = x.dims();
        let Some((&k, rest)) = dims.split_last() else {
            return Err(super::error::EngineError::Invalid(format!(
                "{}: a linear layer needs an input with features, got a scalar",
                self.name
            )));
        };
        let n = self.weight.dims().first().copied().unwrap_or(0);
        let mut out_dims = rest.to_vec();
        out_dims.push(n);
        let x = x.reshape(((), k))?;
        let mask = self.dropout_mask(&x, pass.dropout, dropout_seed)?;
        let weight = |w: &Weight| {
            if pass.track { w.tensor() } else { w.detached() }
        };
        if let (Kernels::Fused, true, Weight::Frozen(w), Some(l), None) =
            (kernels, pass.track, &self.weight, &self.lora, &mask)
            && x.dtype() == l.a.dtype()
            && l.dora.is_none()
        {
            let op = ops::LoraLinear {
                w: w.clone(),
                scale: l.scale,
            };
            let mut y = x
                .contiguous()?
                .apply_op3(l.a.as_tensor(), l.b.as_tensor(), op)?;
            if let Some(b) = &self.bias {
                y = y.broadcast_add(&b.tensor()?)?;
            }
            return Ok((y.reshape(out_dims)?, None));
        }
        let base = |x: &Tensor| -> Result<Tensor> {
            Ok(match &self.weight {
                Weight::Frozen(w) => ops::frozen_linear(x, w)?,
                // The KV-cached inference pass: the integer kernels for a prompt's rows too (llama.cpp's way).
                Weight::Quantized(q) if kernels == Kernels::Inference => {
                    ops::quantized_linear_for_inference(x, q)?
                }
                Weight::Quantized(q) => ops::quantized_linear(x, q)?,
                Weight::Bnb4(q) => ops::bnb4_linear(x, q)?,
                Weight::Trainable(_) => ops::linear(x, &weight(&self.weight)?)?,
            })
        };
        let mut y = base(&x)?;
        let mut xa = None;
        if let Some(l) = &self.lora {
            let (a, b) = if pass.track {
                (l.a.as_tensor().clone(), l.b.as_tensor().clone())
            } else {
                (l.a.as_detached_tensor(), l.b.as_detached_tensor())
            };
            let mut xl = x.to_dtype(a.dtype())?;
            if let Some(m) = &mask {
                xl = xl.mul(m)?;
            }
            let xa_ = ops::linear(&xl, &a)?;
            // Scale the rank-r intermediate (n × r) rather than the (n × out) result: same value, r/out the work.
            let d = ops::linear(&(&xa_ * l.scale)?, &b)?;
            let (d, dora) = match &l.dora {
                None => (d, None),
                // PEFT's DoRA: y = base(x) + (c − 1)·base(x⊙m) + c·s·B·A·(x⊙m), c = m / ‖W + s·B·A‖ per output, in
                // the LoRA dtype (base(x⊙m) is base(x) without dropout).
                Some(dora) => {
                    let (c, norm) = l.dora_factor(dora, &self.weight, pass.track)?;
                    let yd = match &mask {
                        None => y.clone(),
                        Some(_) => base(&xl.to_dtype(x.dtype())?)?,
                    };
                    let yd = yd.to_dtype(d.dtype())?;
                    if pass.track {
                        (
                            (yd.broadcast_mul(&(&c - 1.0)?)? + d.broadcast_mul(&c)?)?,
                            None,
                        )
                    } else {
                        // Graph-free: c⊙z − yd with z = yd + d, z kept for the hand-written backward.
                        let z = ops::fused::add_untracked(&yd, &d)?;
                        let out = ops::fused::dora_term(&z, &yd, &c)?;
                        (out, norm.map(|n| (z, c, n)))
                    }
                }
            };
            y = add(&y, &d.to_dtype(y.dtype())?)?;
            xa = Some(LoraActs { xa: xa_, dora });
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&weight(b)?)?;
        }
        Ok((y.reshape(out_dims)?, xa))
    }

    /// (dX, LoRA (dA, dB, DoRA's dm)) of [`Self::apply`] on 2-D x for the incoming gradient `gy` (rows, out),
    /// graph-free (frozen base and bias); `acts` is what the forward kept. The dropout mask is drawn again from
    /// the same seed (no copy kept). A quantized base is dequantized for the input gradient's product and dropped.
    ///
    /// DoRA, y = base(x) + (c − 1)·W·xd + c·s·B·A·xd with xd = x⊙mask and c = m / n (n the detached norm): with
    /// g' = c⊙gy, dA and dB are LoRA's for g'; dm = Σ_rows(gy⊙z) / n with z = W·xd + s·B·A·xd; and
    /// dX = gy·W + [((c − 1)⊙gy)·W + s·(g'·B)·A]⊙mask, which is LoRA's dX for g' (g'·W + s·(g'·B)·A⊙mask) plus
    /// ((1 − c)⊙gy)·W⊙(1 − mask) (zero without dropout).
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        acts: Option<&LoraActs>,
        gy: &Tensor,
        dropout_seed: u64,
    ) -> Result<(Tensor, Option<LoraGrad>)> {
        let w = self.weight.detached()?.to_dtype(gy.dtype())?;
        let Some(p) = &self.lora else {
            return Ok((gy.matmul(&w)?, None));
        };
        let mask = self.dropout_mask(x, true, dropout_seed)?;
        let dora = match (&p.dora, acts.and_then(|a| a.dora.as_ref())) {
            (None, _) => None,
            (Some(_), Some(kept)) => Some(kept),
            (Some(_), None) => {
                return Err(super::error::EngineError::Invalid(format!(
                    "{}: the DoRA backward needs the forward's activations",
                    self.name
                )));
            }
        };
        let (g, dc) = match dora {
            None => (gy.clone(), None),
            Some((z, c, _)) => {
                let (g, dc) = ops::fused::dora_backward(&gy.to_dtype(z.dtype())?, z, c)?;
                (g.to_dtype(gy.dtype())?, Some(dc))
            }
        };
        let grads = ops::lora_linear_backward(
            x,
            Some(&w),
            &p.a.as_detached_tensor(),
            &p.b.as_detached_tensor(),
            p.scale,
            mask.as_ref(),
            acts.map(|a| &a.xa),
            &g,
        )?;
        let Some(mut dx) = grads.dx else {
            return Err(super::error::EngineError::Invalid(format!(
                "{}: LoRA backward gave no input gradient",
                self.name
            )));
        };
        let dm = match (dora, dc) {
            (Some((_, c, norm)), Some(dc)) => {
                if let Some(m) = &mask {
                    let h = gy
                        .to_dtype(c.dtype())?
                        .broadcast_mul(&c.affine(-1.0, 1.0)?)?
                        .to_dtype(gy.dtype())?
                        .matmul(&w)?;
                    let keep = m.affine(-1.0, 1.0)?.to_dtype(h.dtype())?;
                    dx = add(&dx, &h.mul(&keep)?)?;
                }
                Some(dc.div(norm)?)
            }
            _ => None,
        };
        Ok((
            dx,
            Some(LoraGrad {
                da: grads.da,
                db: grads.db,
                dm,
            }),
        ))
    }

    /// `W0 + s·B·A` (DoRA: rescaled row by row, [`lora_merged`]) in the dtype of W0 (f32 for a quantized W0, which
    /// is dequantized), or W0 when there is no LoRA.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.weight.detached()?;
        match &self.lora {
            None => Ok(w),
            Some(l) => {
                let m = l.dora.as_ref().map(|d| d.magnitude.as_detached_tensor());
                Ok(lora_merged(
                    &w,
                    &l.a.as_detached_tensor(),
                    &l.b.as_detached_tensor(),
                    l.scale,
                    m.as_ref(),
                )?
                .to_dtype(w.dtype())?)
            }
        }
    }

    /// Fixes DoRA's factor for inference (the weights no longer change): decode steps reuse it.
    pub fn fix_dora(&mut self) -> Result<()> {
        if let Some(l) = &self.lora
            && let Some(d) = &l.dora
        {
            let (c, _) = l.dora_factor(d, &self.weight, false)?;
            if let Some(Some(d)) = self.lora.as_mut().map(|l| l.dora.as_mut()) {
                d.fixed = Some(c);
            }
        }
        Ok(())
    }
}

/// `a + b`: tracked when either is, else graph-free on the rayon pool ([`ops::fused::add_untracked`]).
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.track_op() || b.track_op() {
        Ok((a + b)?)
    } else {
        Ok(ops::fused::add_untracked(a, b)?)
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub input_norm: Weight,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma 3's `pre_feedforward_layernorm`).
    pub post_norm: Weight,
    /// Gemma 3: the attention output's norm before the residual add (its `post_attention_layernorm`).
    pub attn_out_norm: Option<Weight>,
    /// Gemma 3: the MLP output's norm before the residual add (`post_feedforward_layernorm`).
    pub mlp_out_norm: Option<Weight>,
    pub q_norm: Option<Weight>,
    pub k_norm: Option<Weight>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// The MLP input norm's Hugging Face name in a plain layer.
pub const POST_ATTENTION_NORM: &str = "post_attention_layernorm";

/// Gemma 3's names of the attention output's norm, the MLP input's and the MLP output's.
pub const SANDWICH_NORMS: [&str; 3] = [
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
];

impl Layer {
    /// The layer's norms with their Hugging Face names (under `model.layers.N.`).
    pub fn named_norms(&self) -> Vec<(&'static str, &Weight)> {
        let mut out = vec![("input_layernorm", &self.input_norm)];
        match (&self.attn_out_norm, &self.mlp_out_norm) {
            (Some(a), Some(m)) => {
                let [attn_out, pre_ff, mlp_out] = SANDWICH_NORMS;
                out.extend([(attn_out, a), (pre_ff, &self.post_norm), (mlp_out, m)]);
            }
            _ => out.push((POST_ATTENTION_NORM, &self.post_norm)),
        }
        out.extend(self.q_norm.iter().map(|w| ("self_attn.q_norm", w)));
        out.extend(self.k_norm.iter().map(|w| ("self_attn.k_norm", w)));
        out
    }

    /// Every norm weight of the layer.
    pub fn norms(&self) -> impl Iterator<Item = &Weight> {
        self.named_norms().into_iter().map(|(_, w)| w)
    }

    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// The kernels a decoder layer runs with: a strategy the model picks once (not a branch per op). Each kernel set
/// computes the same function; they differ in speed and in what they can differentiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The kernel set of `ops::fused` (fused CPU kernels for f32/f64 on the CPU, their generic candle-op
    /// counterparts elsewhere: `ops::Backend` picks per tensor), with their own backward, the one-op LoRA linear
    /// and the hand-written layer backward.
    Fused,
    /// Pure candle ops everywhere (the reference).
    Pure,
    /// Inference: candle-nn's fused RMSNorm, RoPE and softmax (CUDA kernels on a GPU), which have no backward:
    /// never on a tracked pass.
    Inference,
}

impl Kernels {
    fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(match self {
            Self::Fused => ops::fused::rms_norm(x, w, eps)?,
            Self::Pure => ops::rms_norm_pure(x, w, eps)?,
            Self::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?,
        })
    }

    /// x (b, h, t, hd); cos, sin (bb, 1, t, hd/2).
    fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Fused => ops::fused::rope(x, cos, sin)?,
            Self::Inference if cos.dim(0)? == 1 => {
                let (c, s) = (cos.squeeze(0)?.squeeze(0)?, sin.squeeze(0)?.squeeze(0)?);
                candle_nn::rotary_emb::rope(&x.contiguous()?, &c.contiguous()?, &s.contiguous()?)?
            }
            Self::Pure | Self::Inference => ops::rope_pure(x, cos, sin)?,
        })
    }

    /// `softmax(scale·q·kᵀ + bias)·v` with GQA: q (b, nh, t, hd), k and v (b, nkv, s, hd), bias (bb, 1, t, s) or
    /// none (nothing masked). Scores and softmax in the compute dtype, the products in `dtype`.
    fn attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        scale: f64,
        dtype: DType,
    ) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        if nkv == 0 || nh % nkv != 0 {
            return Err(super::error::EngineError::Invalid(format!(
                "attention: {nh} query heads are not a multiple of {nkv} kv heads"
            )));
        }
        let cdt = ops::compute_dtype(dtype);
        if self == Self::Fused {
            let zeros;
            let bias = match bias {
                Some(bias) => bias,
                None => {
                    zeros = Tensor::zeros((1, 1, t, s), cdt, q.device())?;
                    &zeros
                }
            };
            return Ok(ops::fused::attention(q, k, v, bias, scale)?);
        }
        if self == Self::Inference && ops::cached_attention::applies(q, k, v) {
            return Ok(ops::cached_attention::attention(q, k, v, bias, scale)?);
        }
        // GQA without copying K/V: query heads j·n_rep..(j+1)·n_rep share kv head j, so view q as
        // (b, nkv, n_rep·t, hd) and multiply against the nkv heads directly (same as HF `repeat_kv`).
        let n_rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, n_rep * t, hd))?;
        // On the CPU, K and V may be views of a KV cache's buffer (each head's rows contiguous, heads the cache's
        // room apart): candle's CPU matmul reads them in place. Elsewhere they are copied, as before the cache kept
        // its room (candle's CUDA matmul over such views is not yet checked on a GPU).
        let kv_operand = |z: &Tensor| -> Result<Tensor> {
            Ok(if z.device().is_cpu() {
                z.clone()
            } else {
                z.contiguous()?
            })
        };
        let k = kv_operand(k)?;
        let mut att = (q.matmul(&k.t()?)?.reshape((b, nh, t, s))? * scale)?.to_dtype(cdt)?;
        if let Some(bias) = bias {
            att = att.broadcast_add(&bias.to_dtype(cdt)?)?;
        }
        let att = if self == Self::Inference {
            candle_nn::ops::softmax_last_dim(&att.contiguous()?)?
        } else {
            ops::softmax_pure(&att)?
        };
        let v = kv_operand(v)?;
        Ok(att
            .to_dtype(dtype)?
            .reshape((b, nkv, n_rep * t, s))?
            .matmul(&v)?
            .reshape((b, nh, t, hd))?)
    }

    /// The gated MLP activation `act(g) · u`: SwiGLU (fused kernel or pure ops), or GeGLU (candle's tanh GELU,
    /// which has its backward, in every kernel set).
    fn glu(self, activation: Activation, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        Ok(match (activation, self) {
            (Activation::Silu, Self::Fused) => ops::fused::swiglu(g, u)?,
            (Activation::Silu, Self::Pure | Self::Inference) => ops::swiglu_pure(g, u)?,
            (Activation::GeluTanh, _) => (g.gelu()? * u)?,
        })
    }
}

/// What a forward pass records: `track` follows trainable weights in candle's graph (else every weight is
/// detached and no graph is built), `dropout` applies the LoRA dropout masks (training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub track: bool,
    pub dropout: bool,
}

impl Pass {
    /// The training forward (tracked, with dropout) when `train`, else inference (detached, no dropout).
    pub fn train(train: bool) -> Self {
        Self {
            track: train,
            dropout: train,
        }
    }
}

/// What a decoder layer needs from the model (small and `Copy`, so the checkpoint op can hold it).
#[derive(Debug, Clone, Copy)]
pub struct LayerCtx {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    /// RMSNorms multiply by (1 + w) in float32 (Gemma).
    pub norm_offset: bool,
    pub activation: Activation,
    /// Scale of the attention scores.
    pub attn_scale: f64,
    /// The model dtype.
    pub dtype: DType,
    pub kernels: Kernels,
    /// Seed of the LoRA dropout masks (`Model::dropout_seed`).
    pub dropout_seed: u64,
}

/// A layer's KV cache starts with room for its first tokens (the prompt) and at least this many more, rounded up
/// to a multiple of it, and grows by that starting room when full (candle-nn's `KvCache`). Each token's keys and
/// values are written in place; only a growth copies the buffer (appending by concatenation copied the whole
/// cache for every token).
pub const KV_CACHE_BLOCK: usize = 512;

/// A layer's inputs besides the hidden states: RoPE tables `cos`/`sin` (bb, 1, t, hd/2) for the new positions,
/// the additive attention `bias` (bb, 1, t, s) (none: nothing masked), the unpadding of a padded batch, and the
/// layer's KV-cache slot (inference: the new keys and values are written into it and attention sees them all,
/// through views of the cache's buffer).
pub struct LayerIo<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub pad: Option<&'a Unpad>,
    pub cache: Option<&'a mut Option<candle_nn::kv_cache::KvCache>>,
}

/// Padding removed from a right- or left-padded batch: the layer runs its linears, norms and MLP on the N real
/// tokens only, as a (1, N, hidden) tensor, and scatters q, k, v into the padded (b, t) layout just for attention
/// (padding slots point at row 0; the mask hides them as keys and their outputs are never gathered back).
#[derive(Debug, Clone)]
pub struct Unpad {
    /// (N) u32: padded position (bi·t + ti) of each real token.
    pub real: Tensor,
    /// (b·t) u32: packed row of each padded position (0 for padding).
    pub padded: Tensor,
    pub b: usize,
    pub t: usize,
}

impl Unpad {
    /// From a (b, t) 0/1 attention mask; `None` when nothing is padding.
    pub fn from_mask(mask: &[Vec<u32>], device: &candle_core::Device) -> Result<Option<Self>> {
        let b = mask.len();
        let t = mask.first().map_or(0, Vec::len);
        let mut real = Vec::new();
        let mut padded = vec![0u32; b * t];
        for (bi, row) in mask.iter().enumerate() {
            for (ti, &m) in row.iter().enumerate() {
                if m != 0 {
                    padded[bi * t + ti] = real.len() as u32;
                    real.push((bi * t + ti) as u32);
                }
            }
        }
        if real.len() == b * t || real.is_empty() {
            return Ok(None);
        }
        let n = real.len();
        Ok(Some(Self {
            real: Tensor::from_vec(real, n, device)?,
            padded: Tensor::from_vec(padded, b * t, device)?,
            b,
            t,
        }))
    }
}

/// RMSNorm with `kernels`; `track` follows a trainable weight (else detached). With `offset` (Gemma) the weight
/// applies as (1 + w), and the norm and that product run in the compute dtype before rounding to x's
/// (transformers' `Gemma3RMSNorm`: `(norm(x.float()) * (1 + w.float())).type_as(x)`).
pub(crate) fn rms_norm(
    kernels: Kernels,
    eps: f64,
    x: &Tensor,
    w: &Weight,
    track: bool,
    offset: bool,
) -> Result<Tensor> {
    let w = if track { w.tensor()? } else { w.detached()? };
    if !offset {
        return kernels.rms_norm(x, &w, eps);
    }
    let cdt = ops::compute_dtype(x.dtype());
    let w = (w.to_dtype(cdt)? + 1.0)?;
    Ok(kernels
        .rms_norm(&x.to_dtype(cdt)?, &w, eps)?
        .to_dtype(x.dtype())?)
}

/// The decoder layer, the one definition of it: training (tracked), the checkpoint op's graph-free passes and
/// the hand-written backward's forward (which keeps its activations in `keep`), and inference with a KV cache.
/// x (b, t, hidden) → (b, t, hidden), or (1, N, hidden) → (1, N, hidden) with `io.pad`.
pub fn forward(
    ctx: &LayerCtx,
    l: &Layer,
    x: &Tensor,
    io: LayerIo<'_>,
    pass: Pass,
    keep: Option<&mut Option<Saved>>,
) -> Result<Tensor> {
    let kernels = ctx.kernels;
    if pass.track && kernels == Kernels::Inference {
        return Err(super::error::EngineError::Invalid(
            "the inference kernels have no backward: a tracked pass needs the fused or pure kernels".into(),
        ));
    }
    let dims = x.dims().to_vec();
    let hsz = dims.last().copied().unwrap_or(0);
    let m = x.elem_count() / hsz.max(1);
    let (b, t) = match io.pad {
        Some(p) => (p.b, p.t),
        None => {
            let (b, t, _) = x.dims3()?;
            (b, t)
        }
    };
    let (nh, nkv, hd) = (ctx.num_heads, ctx.num_kv_heads, ctx.head_dim);
    let seed = ctx.dropout_seed;
    let dev = x.device();
    let norm = |x: &Tensor, w: &Weight| {
        span("rms_norm", dev, || {
            rms_norm(kernels, ctx.eps, x, w, pass.track, ctx.norm_offset)
        })
    };
    let lin =
        |lin: &Linear, x: &Tensor| span("linear + LoRA", dev, || lin.apply(x, kernels, pass, seed));
    let add = |a: &Tensor, b: &Tensor| span("residual add", dev, || add(a, b));
    let heads = |z: &Tensor, n: usize| -> Result<Tensor> {
        Ok(match io.pad {
            None => z.reshape((b, t, n, hd))?,
            Some(p) => z
                .reshape(((), n * hd))?
                .index_select(&p.padded, 0)?
                .reshape((b, t, n, hd))?,
        })
    };
    let hn1 = norm(x, &l.input_norm)?;
    let (q, xa_q) = lin(&l.q, &hn1)?;
    let (k, xa_k) = lin(&l.k, &hn1)?;
    let (v, xa_v) = lin(&l.v, &hn1)?;
    let (q, k, v) = (heads(&q, nh)?, heads(&k, nkv)?, heads(&v, nkv)?);
    let q = match &l.q_norm {
        Some(w) => norm(&q, w)?,
        None => q,
    };
    let k = match &l.k_norm {
        Some(w) => norm(&k, w)?,
        None => k,
    };
    let rope = |z: &Tensor| {
        span("rope", dev, || {
            kernels.rope(&z.transpose(1, 2)?.contiguous()?, io.cos, io.sin)
        })
    };
    let (q, k) = (rope(&q)?, rope(&k)?);
    let v = v.transpose(1, 2)?.contiguous()?;
    let (k, v) = match io.cache {
        None => (k, v),
        Some(slot) => {
            let cache = match slot {
                Some(cache) => cache,
                None => slot.insert(candle_nn::kv_cache::KvCache::new(
                    2,
                    (t + KV_CACHE_BLOCK).next_multiple_of(KV_CACHE_BLOCK),
                )),
            };
            cache.append(&k.contiguous()?, &v)?
        }
    };
    let att = span("attention", dev, || {
        kernels.attention(&q, &k, &v, io.bias, ctx.attn_scale, ctx.dtype)
    })?;
    let y = att.transpose(1, 2)?.reshape((b, t, nh * hd))?;
    let y = match io.pad {
        None => y,
        Some(p) => y
            .reshape((b * t, nh * hd))?
            .index_select(&p.real, 0)?
            .unsqueeze(0)?,
    };
    let (o, xa_o) = lin(&l.o, &y)?;
    let o = match &l.attn_out_norm {
        Some(w) => norm(&o, w)?,
        None => o,
    };
    let x2 = add(x, &o)?;
    let hn2 = norm(&x2, &l.post_norm)?;
    let (g, xa_g) = lin(&l.gate, &hn2)?;
    let (u, xa_u) = lin(&l.up, &hn2)?;
    let act = span("swiglu", dev, || kernels.glu(ctx.activation, &g, &u))?;
    let (d, xa_d) = lin(&l.down, &act)?;
    let d = match &l.mlp_out_norm {
        Some(w) => norm(&d, w)?,
        None => d,
    };
    let out = add(&x2, &d)?;
    if let Some(keep) = keep {
        let rows = |z: &Tensor| -> Result<Tensor> {
            let f = z.dim(z.rank() - 1)?;
            Ok(z.reshape((m, f))?)
        };
        *keep = Some(Saved {
            x: rows(x)?,
            hn1: rows(&hn1)?,
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
            q,
            k,
            v,
            y: rows(&y)?,
            x2: rows(&x2)?,
            hn2: rows(&hn2)?,
            g: rows(&g)?,
            u: rows(&u)?,
            act: rows(&act)?,
        });
    }
    Ok(out)
}

/// The trainable Vars of a layer, in a fixed order: per linear LoRA A, LoRA B, weight, bias; then the norms.
pub fn layer_vars(l: &Layer) -> Vec<Var> {
    let mut out = Vec::new();
    let mut push = |w: &Weight| {
        if let Weight::Trainable(v) = w {
            out.push(v.clone());
        }
    };
    for lin in l.linears() {
        if let Some(p) = &lin.lora {
            push(&Weight::Trainable(p.a.clone()));
            push(&Weight::Trainable(p.b.clone()));
            if let Some(d) = &p.dora {
                push(&Weight::Trainable(d.magnitude.clone()));
            }
        }
        push(&lin.weight);
        if let Some(b) = &lin.bias {
            push(b);
        }
    }
    for w in l.norms() {
        push(w);
    }
    out
}

// A custom op's forward receives raw storage on whatever device the tensors live on; these two turn it into an
// untracked tensor and back, so the ops below run the same candle code on the CPU and on CUDA.

fn untracked(storage: Storage, l: &Layout) -> R<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("checkpointed-layer: input must be contiguous")
    }
    Ok(Tensor::from_storage(
        storage,
        l.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

fn cpu_storage(t: &Tensor) -> R<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec1()?),
        DType::F64 => CpuStorage::F64(t.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(t.to_vec1()?),
        DType::F16 => CpuStorage::F16(t.to_vec1()?),
        dt => candle_core::bail!("checkpointed-layer: unexpected dtype {dt:?}"),
    })
}

#[cfg(feature = "cuda")]
fn cuda_storage(t: &Tensor) -> R<candle_core::CudaStorage> {
    use candle_core::backend::BackendStorage;
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) if l.start_offset() == 0 => c.try_clone(l),
        _ => candle_core::bail!("checkpointed-layer: expected a contiguous CUDA tensor"),
    }
}

fn wrap(e: super::error::EngineError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

// ---------------------------------------------------------------------------------------------- hand-written backward

/// Whether the hand-written layer backward covers `l`: frozen (plain or quantized) base linears, frozen biases (LoRA, with dropout too,
/// allowed; DoRA too), frozen plain norms, no q/k norm nor Gemma's extra norms, SwiGLU, the fused kernel set (any
/// device: [`ops::Backend`] picks the kernels). Other layers backpropagate through a recomputed candle graph.
pub fn manual_ok(ctx: &LayerCtx, l: &Layer) -> bool {
    ctx.kernels == Kernels::Fused
        && !ctx.norm_offset
        && ctx.activation == Activation::Silu
        && l.attn_out_norm.is_none()
        && l.mlp_out_norm.is_none()
        && l.q_norm.is_none()
        && l.k_norm.is_none()
        && matches!(l.input_norm, Weight::Frozen(_))
        && matches!(l.post_norm, Weight::Frozen(_))
        && l.linears().iter().all(|lin| {
            lin.weight.is_frozen()
                && lin
                    .bias
                    .as_ref()
                    .is_none_or(|b| matches!(b, Weight::Frozen(_)))
        })
}

/// Activations kept between the forward and the hand-written backward (all 2-D (rows, features) except the
/// attention inputs, (b, heads, t, hd)); [`forward`] fills it.
pub struct Saved {
    x: Tensor,
    hn1: Tensor,
    xa: [Option<LoraActs>; 7],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    y: Tensor,
    x2: Tensor,
    hn2: Tensor,
    g: Tensor,
    u: Tensor,
    act: Tensor,
}

impl CheckpointedLayer {
    /// dX and the LoRA gradients (in [`layer_vars`] order) for the incoming gradient `gy`.
    fn manual_backward(&self, sv: &Saved, gy: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (ctx, l) = (&self.ctx, &self.layer);
        let (m, hsz) = sv.x.dims2()?;
        let (b, nh, t, hd) = sv.q.dims4()?;
        let nkv = sv.k.dim(1)?;
        let dev = gy.device();
        let add =
            |a: &Tensor, b: &Tensor| span("residual add", dev, || ops::fused::add_untracked(a, b));
        let lin_bwd = |lin: &Linear, x: &Tensor, xa: Option<&LoraActs>, g: &Tensor| {
            span("linear + LoRA backward", dev, || {
                lin.backward(x, xa, g, ctx.dropout_seed)
            })
        };
        let gy = gy.reshape((m, hsz))?;
        let mut lora: [Option<LoraGrad>; 7] = Default::default();
        let (d_act, gd) = lin_bwd(&l.down, &sv.act, sv.xa[6].as_ref(), &gy)?;
        lora[6] = gd;
        let (dg, du) = span("swiglu backward", dev, || {
            ops::fused::swiglu_backward(&sv.g, &sv.u, &d_act)
        })?;
        let (dh_g, gg) = lin_bwd(&l.gate, &sv.hn2, sv.xa[4].as_ref(), &dg)?;
        let (dh_u, gu) = lin_bwd(&l.up, &sv.hn2, sv.xa[5].as_ref(), &du)?;
        lora[4] = gg;
        lora[5] = gu;
        let d_hn2 = add(&dh_g, &dh_u)?;
        let post_norm = l.post_norm.detached()?;
        let dx2 = add(
            &gy,
            &span("rms_norm backward", dev, || {
                ops::fused::rms_norm_backward(&sv.x2, &post_norm, &d_hn2, ctx.eps)
            })?,
        )?;
        let (dy, go) = lin_bwd(&l.o, &sv.y, sv.xa[3].as_ref(), &dx2)?;
        lora[3] = go;
        let dy = match &self.pad {
            None => dy,
            Some(p) => Tensor::zeros((b * t, nh * hd), dy.dtype(), dy.device())?
                .index_add(&p.real, &dy, 0)?,
        };
        let dy = dy.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let (dq, dk, dv) = span("attention backward", dev, || {
            ops::fused::attention_backward(&sv.q, &sv.k, &sv.v, &self.bias, ctx.attn_scale, &dy)
        })?;
        let rope_bwd = |d: &Tensor| {
            span("rope backward", dev, || {
                ops::fused::rope_backward(d, &self.cos, &self.sin)
            })
        };
        let (dq, dk) = (rope_bwd(&dq)?, rope_bwd(&dk)?);
        let rows = |d: Tensor, n: usize| -> Result<Tensor> {
            let d = d.transpose(1, 2)?.reshape((b * t, n * hd))?;
            Ok(match &self.pad {
                None => d,
                // Packed row r is padded position real[r]: a gather, as in the forward.
                Some(p) => d.index_select(&p.real, 0)?,
            })
        };
        let (dh_q, gq) = lin_bwd(&l.q, &sv.hn1, sv.xa[0].as_ref(), &rows(dq, nh)?)?;
        let (dh_k, gk) = lin_bwd(&l.k, &sv.hn1, sv.xa[1].as_ref(), &rows(dk, nkv)?)?;
        let (dh_v, gv) = lin_bwd(&l.v, &sv.hn1, sv.xa[2].as_ref(), &rows(dv, nkv)?)?;
        lora[0] = gq;
        lora[1] = gk;
        lora[2] = gv;
        let d_hn1 = add(&add(&dh_q, &dh_k)?, &dh_v)?;
        let input_norm = l.input_norm.detached()?;
        let dx = add(
            &dx2,
            &span("rms_norm backward", dev, || {
                ops::fused::rms_norm_backward(&sv.x, &input_norm, &d_hn1, ctx.eps)
            })?,
        )?;
        let mut grads = Vec::new();
        for g in lora.into_iter().flatten() {
            grads.push(g.da);
            grads.push(g.db);
            grads.extend(g.dm);
        }
        Ok((dx, grads))
    }
}

/// The checkpointed layer as a candle op: arguments (hidden, flat trainable params).
struct CheckpointedLayer {
    ctx: LayerCtx,
    layer: Layer,
    vars: Vec<Var>,
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
    pad: Option<Unpad>,
    /// Use the hand-written backward ([`manual_ok`]).
    manual: bool,
    /// Keep the activations from the forward for the backward (no recomputation; checkpointing off).
    keep: bool,
    saved: std::sync::Mutex<Option<Saved>>,
}

impl CheckpointedLayer {
    /// The op's graph-free pass: detached weights, the training forward's LoRA dropout masks.
    const UNTRACKED: Pass = Pass {
        track: false,
        dropout: true,
    };

    fn io(&self) -> LayerIo<'_> {
        LayerIo {
            cos: &self.cos,
            sin: &self.sin,
            bias: Some(&self.bias),
            pad: self.pad.as_ref(),
            cache: None,
        }
    }

    /// The layer's activations for the hand-written backward, from its input.
    fn activations(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let mut kept = None;
        let y = forward(
            &self.ctx,
            &self.layer,
            x,
            self.io(),
            Self::UNTRACKED,
            Some(&mut kept),
        )?;
        match kept {
            Some(saved) => Ok((y, saved)),
            None => Err(super::error::EngineError::Invalid(
                "checkpointed-layer: the forward kept no activations".into(),
            )),
        }
    }

    /// The layer on an untracked input with detached weights: no graph is recorded, nothing but the output
    /// survives (and, with `keep`, the activations the hand-written backward needs). LoRA dropout is part of the
    /// training forward: the output has the masks the recomputation will draw.
    fn forward_untracked(&self, x: &Tensor) -> R<Tensor> {
        if self.manual && self.keep {
            let (y, saved) = self.activations(x).map_err(wrap)?;
            match self.saved.lock() {
                Ok(mut g) => *g = Some(saved),
                Err(_) => candle_core::bail!("checkpointed-layer: poisoned activation cell"),
            }
            return Ok(y);
        }
        forward(&self.ctx, &self.layer, x, self.io(), Self::UNTRACKED, None).map_err(wrap)
    }
}

impl CustomOp2 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let y = self.forward_untracked(&untracked(Storage::Cpu(s1.clone()), l1)?)?;
        Ok((cpu_storage(&y)?, y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> R<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.forward_untracked(&untracked(Storage::Cuda(s1.try_clone(l1)?), l1)?)?;
        Ok((cuda_storage(&y)?, y.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        if self.manual {
            let kept = match self.saved.lock() {
                Ok(mut g) => g.take(),
                Err(_) => candle_core::bail!("checkpointed-layer: poisoned activation cell"),
            };
            let saved = match kept {
                Some(s) => s,
                None => self.activations(&x.detach()).map_err(wrap)?.1,
            };
            let (dx, grads) = self.manual_backward(&saved, &gy.detach()).map_err(wrap)?;
            drop(saved);
            let dx = dx.reshape(x.dims())?;
            let dflat = if grads.is_empty() {
                None
            } else {
                let fdt = flat.dtype();
                let parts = grads
                    .iter()
                    .map(|g| g.flatten_all()?.to_dtype(fdt))
                    .collect::<R<Vec<_>>>()?;
                Some(Tensor::cat(&parts, 0)?)
            };
            return Ok((Some(dx), dflat));
        }
        // Recompute the layer with tracking from its saved input, then backpropagate `Σ y·gy` through this
        // local graph: its gradient at y is exactly gy, so the gradients at x and at the Vars are the layer's.
        let xin = Var::from_tensor(&x.detach())?;
        let y = forward(
            &self.ctx,
            &self.layer,
            xin.as_tensor(),
            self.io(),
            Pass::train(true),
            None,
        )
        .map_err(wrap)?;
        let surrogate = (y * gy.detach())?.sum_all()?;
        let grads = span("layer backward (candle graph)", x.device(), || {
            surrogate.backward()
        })?;
        let dx = match grads.get(xin.as_tensor()) {
            Some(g) => g.clone(),
            None => xin.zeros_like()?,
        };
        let dflat = if self.vars.is_empty() {
            None
        } else {
            let fdt = flat.dtype();
            let parts = self
                .vars
                .iter()
                .map(|v| match grads.get(v.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_dtype(fdt),
                    None => Tensor::zeros(v.elem_count(), fdt, v.device()),
                })
                .collect::<R<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        };
        Ok((Some(dx), dflat))
    }
}

/// A decoder layer as one op (see the module doc): `keep` false recomputes the layer in the backward (activation
/// checkpointing), `keep` true keeps the activations (needs `manual`); `manual` uses the hand-written backward
/// where [`manual_ok`]. Falls back to the plain tracked forward when `keep` is asked without the hand-written
/// backward. LoRA dropout masks are drawn from `ctx.dropout_seed`, so the recomputation sees the forward's masks.
/// Runs on any device.
#[allow(clippy::too_many_arguments)]
pub fn checkpointed_layer(
    ctx: &LayerCtx,
    l: &Layer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    pad: Option<&Unpad>,
    manual: bool,
    keep: bool,
) -> Result<Tensor> {
    let vars = layer_vars(l);
    let manual = manual && manual_ok(ctx, l);
    let io = LayerIo {
        cos,
        sin,
        bias: Some(bias),
        pad,
        cache: None,
    };
    if keep && !manual {
        return forward(ctx, l, x, io, Pass::train(true), None);
    }
    if vars.is_empty() && !x.track_op() {
        // Nothing upstream or inside needs a gradient: no graph at all.
        return forward(ctx, l, x, io, Pass::train(false), None);
    }
    // One flat tensor of every trainable value, f32 unless all Vars share another dtype.
    let fdt = match vars.first() {
        Some(v) if vars.iter().all(|w| w.dtype() == v.dtype()) => v.dtype(),
        _ => DType::F32,
    };
    let flat = if vars.is_empty() {
        Tensor::zeros(0, fdt, x.device())?
    } else {
        let parts = vars
            .iter()
            .map(|v| v.as_tensor().flatten_all()?.to_dtype(fdt))
            .collect::<R<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?
    };
    let op = CheckpointedLayer {
        ctx: *ctx,
        layer: l.clone(),
        vars,
        cos: cos.clone(),
        sin: sin.clone(),
        bias: bias.clone(),
        pad: pad.cloned(),
        manual,
        keep,
        saved: std::sync::Mutex::new(None),
    };
    Ok(x.contiguous()?.apply_op2(&flat, op)?)
}

/// The loss of [`head_loss_chunked`] as an op on the hidden rows: the value and dL/dh were computed eagerly.
struct HeadLoss {
    /// Scalar f64 on the device of the hidden rows (never read back to the host here).
    loss: Tensor,
    grad: Option<Tensor>,
}

impl HeadLoss {
    /// The loss in the op's output dtype: f64 for f64 rows, else f32 (the compute dtype).
    fn value(&self, rows_dtype: DType) -> R<Tensor> {
        let dt = if rows_dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        self.loss.to_dtype(dt)
    }
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "chunked-head-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> R<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let v = self.value(s.dtype())?;
        Ok((cpu_storage(&v)?, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> R<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let v = self.value(s.dtype())?;
        Ok((cuda_storage(&v)?, Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, gy: &Tensor) -> R<Option<Tensor>> {
        // gy is a scalar on the device: a broadcast multiply, no host round trip.
        match &self.grad {
            Some(g) => Ok(Some(g.broadcast_mul(&gy.to_dtype(g.dtype())?)?)),
            None => Ok(Some(h.zeros_like()?)),
        }
    }
}

/// Rows of logits computed at once by [`head_loss_chunked`]. CPU: about 24 MiB of f32 logits (under glibc's
/// largest mmap threshold, 32 MiB, so the chunk buffers are reused from the heap instead of being mapped and zeroed
/// anew). GPU: about 512 MiB (the softmax and its gradient double it), so a chunk is a few large GEMMs rather
/// than hundreds of small launches, and the peak stays far below the unchunked (rows × vocab) matrices.
pub fn head_chunk_rows(vocab: usize, on_cpu: bool) -> usize {
    let floats: usize = if on_cpu { 6 << 20 } else { 128 << 20 };
    (floats / vocab.max(1)).max(1)
}

/// Σ over rows of the token loss ([`ops::TokenLoss`]; plain: `−log softmax(hs · wᵀ)[target]`), with `hs` (n, hidden), `w`
/// (vocab, hidden) frozen, targets (n) u32, computed `chunk` rows at a time (logits never exceed chunk × vocab), on
/// any device; the loss stays on the device. The result is a scalar that backpropagates into `hs` only.
pub fn head_loss_chunked(
    hs: &Tensor,
    w: &Tensor,
    targets: &[u32],
    chunk: usize,
    token_loss: ops::TokenLoss,
) -> Result<Tensor> {
    let need_grad = hs.track_op();
    let mut loss = Tensor::zeros((), DType::F64, hs.device())?;
    let mut grads = Vec::new();
    for_head_chunks(hs, w, targets, chunk, |logits, tg, _| {
        let (l, dlogits) =
            ops::fused::cross_entropy_sum_and_grad(logits, tg, token_loss, need_grad)?;
        loss = (&loss + l)?;
        if let Some(d) = dlogits {
            grads.push(d.to_dtype(w.dtype())?.matmul(w)?);
        }
        Ok(())
    })?;
    let grad = if need_grad && !grads.is_empty() {
        Some(Tensor::cat(&grads, 0)?)
    } else {
        None
    };
    Ok(hs.contiguous()?.apply_op1(HeadLoss { loss, grad })?)
}

/// Runs `f(logits, targets, first_row)` over `chunk`-row slices of the detached `hs` (logits = rows · wᵀ), so
/// logits never exceed chunk × vocab.
fn for_head_chunks(
    hs: &Tensor,
    w: &Tensor,
    targets: &[u32],
    chunk: usize,
    mut f: impl FnMut(&Tensor, &Tensor, usize) -> Result<()>,
) -> Result<()> {
    let (n, _) = hs.dims2()?;
    let chunk = chunk.max(1);
    let hd = hs.detach();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let h = hd.narrow(0, start, len)?;
        let tg = Tensor::new(&targets[start..start + len], hs.device())?;
        f(&ops::linear(&h, w)?, &tg, start)?;
        start += len;
    }
    Ok(())
}

/// Per-row `log softmax(hs · wᵀ)[target]` (n) f64 on the host, `chunk` rows at a time, without a graph: the values of
/// [`head_logps_surrogate`]'s rows.
pub fn head_logps_chunked(
    hs: &Tensor,
    w: &Tensor,
    targets: &[u32],
    chunk: usize,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(targets.len());
    for_head_chunks(hs, w, targets, chunk, |logits, tg, _| {
        out.extend(ops::label_logps(logits, tg)?);
        Ok(())
    })?;
    Ok(out)
}

/// A scalar on `hs` whose backward is Σ_rows `row_weight · ∂ log softmax(hs · wᵀ)[target] / ∂hs`, computed `chunk` rows
/// at a time (logits never exceed chunk × vocab): how a loss of the rows' log-probabilities (DPO's) reaches the
/// decoder once dL/d(logp) of each row is known. The scalar's value is 0.
pub fn head_logps_surrogate(
    hs: &Tensor,
    w: &Tensor,
    targets: &[u32],
    row_weights: &[f64],
    chunk: usize,
) -> Result<Tensor> {
    let mut grads = Vec::new();
    for_head_chunks(hs, w, targets, chunk, |logits, tg, start| {
        // d logp / d logits = one-hot − softmax = −(softmax − one-hot).
        let (_, g) =
            ops::fused::cross_entropy_sum_and_grad(logits, tg, ops::TokenLoss::PLAIN, true)?;
        let g = g.ok_or_else(|| {
            super::error::EngineError::Invalid("the cross-entropy gradient is missing".into())
        })?;
        let len = g.dim(0)?;
        let wts: Vec<f64> = row_weights[start..start + len].iter().map(|x| -x).collect();
        let wts = Tensor::new(wts.as_slice(), hs.device())?
            .to_dtype(g.dtype())?
            .unsqueeze(1)?;
        grads.push(g.broadcast_mul(&wts)?.to_dtype(w.dtype())?.matmul(w)?);
        Ok(())
    })?;
    let grad = if grads.is_empty() {
        None
    } else {
        Some(Tensor::cat(&grads, 0)?)
    };
    let loss = Tensor::zeros((), DType::F64, hs.device())?;
    Ok(hs.contiguous()?.apply_op1(HeadLoss { loss, grad })?)
}
