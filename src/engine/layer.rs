//! One decoder layer of the training path, and the two memory savers built on it:
//!
//! - [`checkpointed_layer`]: activation checkpointing per decoder layer. The layer runs as one candle op whose
//!   forward keeps no graph (only the layer's input stays alive, as the op's argument); its backward recomputes
//!   the layer with tracking and backpropagates through that local graph. The layer's trainable Vars enter the
//!   op as one flat tensor (`cat` of the flattened Vars), so candle's own `cat` backward hands each Var its
//!   slice of the gradient, and the trainer's `loss.backward()` works unchanged.
//! - [`head_loss_chunked`]: lm_head + cross-entropy over chunks of labelled rows, so a (rows × vocab) logits
//!   matrix never exists at once. The gradient with respect to the hidden rows is computed chunk by chunk in the
//!   forward (the loss is a scalar, so the incoming gradient only scales it) and kept as a (rows × hidden)
//!   tensor: two GEMMs like the unchunked path, none recomputed.
//!
//! Both give the same loss and gradients as the plain path up to float rounding; `tests/engine.rs` checks it.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, Var};

use super::error::Result;
use super::model::{Layer, Weight};
use super::ops;

type R<T> = candle_core::Result<T>;

/// What a decoder layer needs from the model (small and `Copy`, so the checkpoint op can hold it).
#[derive(Debug, Clone, Copy)]
pub struct LayerCtx {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    /// The model dtype.
    pub dtype: DType,
    /// Use the fused CPU kernels (f32/f64 on CPU with `Kernels::Fused`).
    pub fused: bool,
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

fn rms_norm(ctx: &LayerCtx, x: &Tensor, w: &Weight, train: bool) -> Result<Tensor> {
    let w = if train {
        w.tensor().clone()
    } else {
        w.detached()
    };
    if ctx.fused {
        Ok(ops::fused::rms_norm(x, &w, ctx.eps)?)
    } else {
        Ok(ops::rms_norm_pure(x, &w, ctx.eps)?)
    }
}

/// One decoder layer: x (b, t, hidden) → (b, t, hidden), or (1, N, hidden) → (1, N, hidden) with `pad`.
/// `cos`/`sin` (bb, 1, t, hd/2), `bias` (bb, 1, t, t). `train`: trainable weights are tracked (else detached)
/// and LoRA dropout is active.
#[allow(clippy::too_many_arguments)]
pub fn layer_forward(
    ctx: &LayerCtx,
    l: &Layer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    pad: Option<&Unpad>,
    train: bool,
) -> Result<Tensor> {
    let (b, t) = match pad {
        Some(p) => (p.b, p.t),
        None => {
            let (b, t, _) = x.dims3()?;
            (b, t)
        }
    };
    let (nh, nkv, hd) = (ctx.num_heads, ctx.num_kv_heads, ctx.head_dim);
    let fused = ctx.fused;
    let heads = |z: Tensor, n: usize| -> Result<Tensor> {
        Ok(match pad {
            None => z.reshape((b, t, n, hd))?,
            Some(p) => z
                .reshape(((), n * hd))?
                .index_select(&p.padded, 0)?
                .reshape((b, t, n, hd))?,
        })
    };
    let hn = rms_norm(ctx, x, &l.input_norm, train)?;
    let q = heads(l.q.forward_k(&hn, train, fused)?, nh)?;
    let k = heads(l.k.forward_k(&hn, train, fused)?, nkv)?;
    let v = heads(l.v.forward_k(&hn, train, fused)?, nkv)?;
    let q = match &l.q_norm {
        Some(w) => rms_norm(ctx, &q, w, train)?,
        None => q,
    };
    let k = match &l.k_norm {
        Some(w) => rms_norm(ctx, &k, w, train)?,
        None => k,
    };
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let (q, k) = if fused {
        (
            ops::fused::rope(&q, cos, sin)?,
            ops::fused::rope(&k, cos, sin)?,
        )
    } else {
        (ops::rope_pure(&q, cos, sin)?, ops::rope_pure(&k, cos, sin)?)
    };
    let n_rep = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let y = if fused {
        ops::fused::attention(&q, &k, &v, bias, scale)?
    } else {
        // GQA without copying K/V: query heads j·n_rep..(j+1)·n_rep share kv head j, so view q as
        // (b, nkv, n_rep·t, hd) and multiply against the nkv heads directly (same as HF `repeat_kv`).
        let q = q.reshape((b, nkv, n_rep * t, hd))?;
        let att = q.matmul(&k.t()?)?.reshape((b, nh, t, t))?;
        let cdt = ops::compute_dtype(ctx.dtype);
        let att = ops::softmax_pure(&(att * scale)?.to_dtype(cdt)?.broadcast_add(bias)?)?
            .to_dtype(ctx.dtype)?;
        att.reshape((b, nkv, n_rep * t, t))?
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
    };
    let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
    let y = match pad {
        None => y,
        Some(p) => y
            .reshape((b * t, nh * hd))?
            .index_select(&p.real, 0)?
            .unsqueeze(0)?,
    };
    let x = (x + l.o.forward_k(&y, train, fused)?)?;
    let hn = rms_norm(ctx, &x, &l.post_norm, train)?;
    let g = l.gate.forward_k(&hn, train, fused)?;
    let u = l.up.forward_k(&hn, train, fused)?;
    let act = if fused {
        ops::fused::swiglu(&g, &u)?
    } else {
        ops::swiglu_pure(&g, &u)?
    };
    Ok((x + l.down.forward_k(&act, train, fused)?)?)
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
        }
        push(&lin.weight);
        if let Some(b) = &lin.bias {
            push(b);
        }
    }
    for w in [&l.input_norm, &l.post_norm]
        .into_iter()
        .chain(l.q_norm.as_ref())
        .chain(l.k_norm.as_ref())
    {
        push(w);
    }
    out
}

/// Whether a layer can be checkpointed: its forward must be a pure function of its input and weights, so the
/// recomputation in the backward sees the same values. LoRA dropout draws fresh masks, so it is excluded.
pub fn can_checkpoint(l: &Layer) -> bool {
    l.linears()
        .iter()
        .all(|lin| lin.lora.as_ref().is_none_or(|p| p.dropout == 0.0))
}

fn cpu_tensor(s: &CpuStorage, l: &Layout) -> R<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("checkpointed-layer: input must be contiguous")
    }
    Ok(Tensor::from_storage(
        Storage::Cpu(s.clone()),
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

fn wrap(e: super::error::EngineError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
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
        // Untracked input and detached weights: no graph is recorded, nothing but the output survives.
        let x = cpu_tensor(s1, l1)?;
        let y = layer_forward(
            &self.ctx,
            &self.layer,
            &x,
            &self.cos,
            &self.sin,
            &self.bias,
            self.pad.as_ref(),
            false,
        )
        .map_err(wrap)?;
        Ok((cpu_storage(&y)?, y.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        // Recompute the layer with tracking from its saved input, then backpropagate `Σ y·gy` through this
        // local graph: its gradient at y is exactly gy, so the gradients at x and at the Vars are the layer's.
        let xin = Var::from_tensor(&x.detach())?;
        let y = layer_forward(
            &self.ctx,
            &self.layer,
            xin.as_tensor(),
            &self.cos,
            &self.sin,
            &self.bias,
            self.pad.as_ref(),
            true,
        )
        .map_err(wrap)?;
        let surrogate = (y * gy.detach())?.sum_all()?;
        let grads = surrogate.backward()?;
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

/// A decoder layer with activation checkpointing (see the module doc). Falls back to the plain tracked
/// forward when the layer cannot be checkpointed (LoRA dropout) or is not on the CPU.
#[allow(clippy::too_many_arguments)]
pub fn checkpointed_layer(
    ctx: &LayerCtx,
    l: &Layer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    pad: Option<&Unpad>,
) -> Result<Tensor> {
    let vars = layer_vars(l);
    if !x.device().is_cpu() || !can_checkpoint(l) {
        return layer_forward(ctx, l, x, cos, sin, bias, pad, true);
    }
    if vars.is_empty() && !x.track_op() {
        // Nothing upstream or inside needs a gradient: no graph at all.
        return layer_forward(ctx, l, x, cos, sin, bias, pad, false);
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
    };
    Ok(x.contiguous()?.apply_op2(&flat, op)?)
}

/// The loss of [`head_loss_chunked`] as an op on the hidden rows: the value and dL/dh were computed eagerly.
struct HeadLoss {
    loss: f64,
    grad: Option<Tensor>,
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "chunked-head-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> R<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F64(_) => CpuStorage::F64(vec![self.loss]),
            #[allow(clippy::cast_possible_truncation)]
            _ => CpuStorage::F32(vec![self.loss as f32]),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, gy: &Tensor) -> R<Option<Tensor>> {
        match &self.grad {
            Some(g) => Ok(Some(
                g.affine(gy.to_dtype(DType::F64)?.to_scalar::<f64>()?, 0.0)?,
            )),
            None => Ok(Some(h.zeros_like()?)),
        }
    }
}

/// Rows of logits computed at once by [`head_loss_chunked`]: about 24 MiB of f32 logits (under glibc's largest
/// mmap threshold, 32 MiB, so the chunk buffers are reused from the heap instead of being mapped and zeroed anew).
pub fn head_chunk_rows(vocab: usize) -> usize {
    ((6usize << 20) / vocab.max(1)).max(1)
}

/// Σ over rows of `−log softmax(hs · wᵀ)[target]`, with `hs` (n, hidden), `w` (vocab, hidden) frozen, targets
/// (n) u32, computed `chunk` rows at a time (logits never exceed chunk × vocab). Same dtype rules as the fused
/// cross-entropy: hs and w f32 or f64 on the CPU. The result is a scalar that backpropagates into `hs` only.
pub fn head_loss_chunked(hs: &Tensor, w: &Tensor, targets: &[u32], chunk: usize) -> Result<Tensor> {
    let (n, _) = hs.dims2()?;
    let chunk = chunk.max(1);
    let need_grad = hs.track_op();
    let hd = hs.detach();
    let mut loss = 0.0f64;
    let mut grads = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let h = hd.narrow(0, start, len)?;
        let tg = Tensor::new(&targets[start..start + len], hs.device())?;
        let logits = ops::linear(&h, w)?;
        let (l, dlogits) = ops::fused::cross_entropy_sum_and_grad(&logits, &tg, need_grad)?;
        loss += l;
        if let Some(d) = dlogits {
            grads.push(d.matmul(w)?);
        }
        start += len;
    }
    let grad = if need_grad && !grads.is_empty() {
        Some(Tensor::cat(&grads, 0)?)
    } else {
        None
    };
    Ok(hs.contiguous()?.apply_op1(HeadLoss { loss, grad })?)
}
