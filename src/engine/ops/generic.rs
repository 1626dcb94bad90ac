//! The training kernels as compositions of candle ops: any device (CUDA today), any float dtype, statistics
//! (norms, softmax, the loss) in f32 as PyTorch's autocast does. [`super::Backend`] picks these wherever the fused
//! CPU kernels of [`super::fused`] do not apply. The forwards are differentiable through candle's autograd; the
//! `*_backward` functions are the graph-free pieces of the hand-written layer backward (`engine::layer`).
//! `tests/engine.rs` checks each against the fused CPU kernel, values and gradients.

use candle_core::{D, DType, Tensor};

use super::{TokenLoss, compute_dtype, rms_norm_pure, rope_pure, softmax_pure, swiglu_pure};

type R<T> = candle_core::Result<T>;

/// RMSNorm (statistics in f32; the normalised value is cast back before the weight multiplies it, as in HF).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> R<Tensor> {
    rms_norm_pure(x, &w.to_dtype(x.dtype())?, eps)
}

/// dX of [`rms_norm`] with the weight frozen: `r·g − x·r³·mean(g·x)` with `g = gy·w`, in f32.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, gy: &Tensor, eps: f64) -> R<Tensor> {
    let dt = x.dtype();
    let cdt = compute_dtype(dt);
    let xc = x.to_dtype(cdt)?;
    let d = xc.dim(D::Minus1)?;
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let g = gy.to_dtype(cdt)?.broadcast_mul(&w.to_dtype(cdt)?)?;
    #[allow(clippy::cast_precision_loss)]
    let c = ((g.mul(&xc)?.sum_keepdim(D::Minus1)? * r.powf(3.0)?)? / d as f64)?;
    let dx = (g.broadcast_mul(&r)? - xc.broadcast_mul(&c)?)?;
    dx.to_dtype(dt)
}

/// HF half-rotation RoPE; x (b, h, t, d), cos/sin (bb, 1, t, d/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
    let dt = x.dtype();
    rope_pure(x, &cos.to_dtype(dt)?, &sin.to_dtype(dt)?)
}

/// dX of [`rope`]: the inverse rotation (sin negated).
pub fn rope_backward(gy: &Tensor, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
    let dt = gy.dtype();
    rope_pure(gy, &cos.to_dtype(dt)?, &sin.to_dtype(dt)?.neg()?)
}

/// `silu(g) · u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> R<Tensor> {
    swiglu_pure(g, u)
}

/// (dG, dU) of [`swiglu`]: `dU = gy·silu(g)`, `dG = gy·u·σ(g)·(1 + g·(1 − σ(g)))`, in f32.
pub fn swiglu_backward(g: &Tensor, u: &Tensor, gy: &Tensor) -> R<(Tensor, Tensor)> {
    let dt = g.dtype();
    let cdt = compute_dtype(dt);
    let (gc, uc, gyc) = (g.to_dtype(cdt)?, u.to_dtype(cdt)?, gy.to_dtype(cdt)?);
    let s = (gc.neg()?.exp()? + 1.0)?.recip()?;
    let du = gyc.mul(&gc.mul(&s)?)?;
    let ds = ((gc.mul(&s.affine(-1.0, 1.0)?)? + 1.0)?.mul(&s))?;
    let dg = gyc.mul(&uc)?.mul(&ds)?;
    Ok((dg.to_dtype(dt)?, du.to_dtype(dt)?))
}

/// Probabilities `softmax(scale·q·kᵀ + bias)` (b, nh, t, s) in f32, GQA without copying K (query head
/// j·n_rep + r uses kv head j, as HF's `repeat_kv`).
fn probs(q: &Tensor, k: &Tensor, bias: &Tensor, scale: f64) -> R<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let n_rep = nh / nkv;
    let q2 = q.reshape((b, nkv, n_rep * t, hd))?;
    let sc = q2.matmul(&k.t()?)?.reshape((b, nh, t, s))?;
    let cdt = compute_dtype(q.dtype());
    let x = (sc.to_dtype(cdt)? * scale)?.broadcast_add(&bias.to_dtype(cdt)?)?;
    // candle-nn's softmax is one kernel (one pass over the scores instead of five) but has no backward: only
    // where no gradient flows through it (the hand-written backward's passes; a tracked forward keeps the ops).
    if x.track_op() {
        softmax_pure(&x)
    } else {
        candle_nn::ops::softmax_last_dim(&x)
    }
}

/// `softmax(scale·q·kᵀ + bias)·v` with GQA; q (b, nh, t, hd), k and v (b, nkv, s, hd), bias (bb, 1, t, s).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> R<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    if nh % nkv != 0 {
        candle_core::bail!("attention: {nh} query heads are not a multiple of {nkv} kv heads")
    }
    let p = probs(q, k, bias, scale)?.to_dtype(q.dtype())?;
    p.reshape((b, nkv, (nh / nkv) * t, s))?
        .matmul(v)?
        .reshape((b, nh, t, hd))
}

/// (dQ, dK, dV) of [`attention`], the probabilities recomputed; the softmax gradient in f32.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    gy: &Tensor,
) -> R<(Tensor, Tensor, Tensor)> {
    let dt = q.dtype();
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let rt = (nh / nkv) * t;
    let p = probs(q, k, bias, scale)?;
    let gy2 = gy.contiguous()?.reshape((b, nkv, rt, hd))?;
    let pl = p.to_dtype(dt)?.reshape((b, nkv, rt, s))?;
    let dv = pl.t()?.matmul(&gy2)?;
    let dp = gy2
        .matmul(&v.t()?)?
        .reshape((b, nh, t, s))?
        .to_dtype(p.dtype())?;
    let dot = p.mul(&dp)?.sum_keepdim(D::Minus1)?;
    let ds = (p.mul(&dp.broadcast_sub(&dot)?)? * scale)?
        .to_dtype(dt)?
        .reshape((b, nkv, rt, s))?;
    let dq = ds.matmul(k)?.reshape((b, nh, t, hd))?;
    let dk = ds.t()?.matmul(&q.reshape((b, nkv, rt, hd))?)?;
    Ok((dq, dk, dv))
}

/// Per-row `logsumexp` and the target logit of `x` (n, v) in f32: (lse (n, 1), picked (n, 1)).
fn lse_and_picked(x: &Tensor, targets: &Tensor) -> R<(Tensor, Tensor)> {
    let m = x.max_keepdim(D::Minus1)?;
    let lse = (x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?;
    let picked = x.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok((lse, picked))
}

/// Σ_rows of the [`TokenLoss`]: `w·(lse − (1 − ε)·x[target] − ε·mean(x))` with w = DFT's p[target] or EAFT's
/// weight (detached) or 1, differentiable; logits (n, v), targets (n) u32.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor, loss: TokenLoss) -> R<Tensor> {
    let x = logits.to_dtype(compute_dtype(logits.dtype()))?;
    let (lse, picked) = lse_and_picked(&x, targets)?;
    token_loss_sum(&x, &lse, &picked, loss)
}

/// Σ_rows `w·(lse − (1 − ε)·picked − ε·mean(x))`.
fn token_loss_sum(x: &Tensor, lse: &Tensor, picked: &Tensor, loss: TokenLoss) -> R<Tensor> {
    let eps = loss.smoothing;
    let rows = if eps == 0.0 {
        (lse - picked)?
    } else {
        let mean = x.mean_keepdim(D::Minus1)?;
        ((lse - (picked * (1.0 - eps))?)? - (mean * eps)?)?
    };
    match row_weight(x, lse, picked, loss)? {
        Some(w) => (rows * w)?.sum_all(),
        None => rows.sum_all(),
    }
}

/// The per-row weight (n, 1), detached: DFT's p[target] = exp(picked − lse), EAFT's [`eaft_weights`]; None for
/// the others.
fn row_weight(x: &Tensor, lse: &Tensor, picked: &Tensor, loss: TokenLoss) -> R<Option<Tensor>> {
    if loss.dft {
        return Ok(Some((picked - lse)?.exp()?.detach()));
    }
    match loss.eaft {
        Some(alpha) => Ok(Some(eaft_weights(x, alpha)?)),
        None => Ok(None),
    }
}

/// EAFT's weight per row of `x` (n, v), (n, 1) detached: `(H / 3)^α` with H the entropy of the softmax over the row's
/// [`super::EAFT_TOP_K`] largest logits (LLaMA-Factory's `_eaft_cross_entropy`; ties count once each, as
/// `torch.topk` returns them).
pub fn eaft_weights(x: &Tensor, alpha: f64) -> R<Tensor> {
    let x = x.detach();
    let v = x.dim(1)?;
    let top = top_k_values(&x, super::EAFT_TOP_K.min(v))?;
    let m = top.narrow(1, 0, 1)?;
    let lse = (top.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?;
    let lp = top.broadcast_sub(&lse)?;
    let h = (lp.exp()? * &lp)?.sum_keepdim(1)?.neg()?.relu()?;
    Ok((h / 3.0)?.powf(alpha)?.detach())
}

/// The `k` largest values of each row of `x` (n, v), descending (n, k); `k` ≤ v. candle sorts a row in one GPU
/// block (1024 threads, the padded row in shared memory), so rows are cut into pieces of [`SORT_PIECE`] columns (the
/// last padded with −∞), each piece sorted and cut to its `k` largest, until one piece is left.
fn top_k_values(x: &Tensor, k: usize) -> R<Tensor> {
    let mut rest = x.contiguous()?;
    loop {
        let (n, v) = rest.dims2()?;
        if v <= SORT_PIECE {
            return rest.sort_last_dim(false)?.0.narrow(1, 0, k);
        }
        let pieces = v.div_ceil(SORT_PIECE);
        let pad = pieces * SORT_PIECE - v;
        let full = if pad == 0 {
            rest
        } else {
            let neg = Tensor::full(f32::NEG_INFINITY, (n, pad), x.device())?.to_dtype(x.dtype())?;
            Tensor::cat(&[rest, neg], 1)?
        };
        let (sorted, _) = full
            .reshape((n * pieces, SORT_PIECE))?
            .sort_last_dim(false)?;
        rest = sorted
            .narrow(1, 0, k)?
            .reshape((n, pieces * k))?
            .contiguous()?;
    }
}

/// Columns [`top_k_values`] sorts at once.
const SORT_PIECE: usize = 1024;

/// The summed [`TokenLoss`] (a scalar tensor, f64, left on the device: no host round trip) and, with `grad`, its
/// gradient with respect to the logits (w·(softmax − (1 − ε)·one-hot − ε/v), f32), both without a graph.
pub fn cross_entropy_sum_and_grad(
    logits: &Tensor,
    targets: &Tensor,
    loss: TokenLoss,
    grad: bool,
) -> R<(Tensor, Option<Tensor>)> {
    let x = logits.detach().to_dtype(compute_dtype(logits.dtype()))?;
    let (n, v) = x.dims2()?;
    let (lse, picked) = lse_and_picked(&x, targets)?;
    let total = token_loss_sum(&x, &lse, &picked, loss)?.to_dtype(DType::F64)?;
    if !grad {
        return Ok((total, None));
    }
    let p = x.broadcast_sub(&lse)?.exp()?;
    let cols = Tensor::arange(0u32, v as u32, x.device())?.reshape((1, v))?;
    let tg = targets.to_dtype(DType::U32)?.reshape((n, 1))?;
    let onehot = tg.broadcast_eq(&cols)?.to_dtype(p.dtype())?;
    let eps = loss.smoothing;
    #[allow(clippy::cast_precision_loss)]
    let spread = eps / v as f64;
    let g = ((p - (onehot * (1.0 - eps))?)? - spread)?;
    let g = match row_weight(&x, &lse, &picked, loss)? {
        Some(w) => g.broadcast_mul(&w)?,
        None => g,
    };
    Ok((total, Some(g)))
}

/// `‖W + s·B·A‖` of each row (out), in A's dtype, detached: DoRA's weight norm (PEFT's `get_weight_norm`).
pub fn lora_row_norms(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> R<Tensor> {
    let delta = (b.matmul(a)? * scale)?;
    Ok((w.to_dtype(a.dtype())? + delta)?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .detach())
}

/// DoRA's output term `c⊙z − yd` (rows, out) for z = yd + d and the row factor c (out), graph-free.
pub fn dora_term(z: &Tensor, yd: &Tensor, c: &Tensor) -> R<Tensor> {
    Ok((z.broadcast_mul(c)? - yd)?.detach())
}

/// `gy⊙c` (rows, out) and `Σ_rows gy⊙z` (out): the pieces of DoRA's backward, graph-free.
pub fn dora_backward(gy: &Tensor, z: &Tensor, c: &Tensor) -> R<(Tensor, Tensor)> {
    Ok((gy.broadcast_mul(c)?.detach(), gy.mul(z)?.sum(0)?.detach()))
}
