//! The training kernels with their own backward. On the CPU in f32/f64 they are fused rayon kernels: candle's
//! elementwise/broadcast ops run single-threaded and allocate a tensor per op; these do one parallel pass for
//! forward and one for backward. Elsewhere (CUDA, half types) each public function here hands over to its
//! [`super::generic`] counterpart: [`super::Backend`] decides, per tensor. Each is checked against its pure-op
//! counterpart (values and gradients) in `tests/engine.rs`.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};

use super::{Backend, TokenLoss, generic};
use num_traits::Float;
use rayon::prelude::*;

type R<T> = candle_core::Result<T>;

fn contig<'a, T>(v: &'a [T], l: &Layout, what: &str) -> R<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Contiguous copy of a tensor's data as f64-or-f32 storage (for op-held side tensors like cos/sin/bias).
fn held<T: candle_core::WithDType>(t: &Tensor) -> R<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// A three-input CPU kernel on one float dtype: binds `$a, $b, $c` to the contiguous f32 (or f64) slices of the
/// three storages and wraps `$body`'s `Vec` in the matching `CpuStorage`; other dtypes are an error naming `$what`.
macro_rules! float3 {
    ($what:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), |$a:ident, $b:ident, $c:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(z)) => {
                let ($a, $b, $c) = (
                    contig(x, $l1, $what)?,
                    contig(y, $l2, $what)?,
                    contig(z, $l3, $what)?,
                );
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(z)) => {
                let ($a, $b, $c) = (
                    contig(x, $l1, $what)?,
                    contig(y, $l2, $what)?,
                    contig(z, $l3, $what)?,
                );
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: dtype mismatch", $what),
        }
    };
}

// ---------------------------------------------------------------------------------------------- RMSNorm

fn rms_rows<T: Float + Send + Sync>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, xr)| {
            let ms = xr.iter().fold(T::zero(), |a, &v| a + v * v) / T::from(d).unwrap_or(T::one());
            let r = T::one() / (ms + T::from(eps).unwrap_or(T::zero())).sqrt();
            for i in 0..d {
                o[i] = xr[i] * r * w[i];
            }
        });
    out
}

fn rms_bwd_rows<T: Float + Send + Sync>(x: &[T], w: &[T], gy: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    let dn = T::from(d).unwrap_or(T::one());
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(gy.par_chunks(d)))
        .for_each(|(o, (xr, gr))| {
            let ms = xr.iter().fold(T::zero(), |a, &v| a + v * v) / dn;
            let r = T::one() / (ms + T::from(eps).unwrap_or(T::zero())).sqrt();
            let mut dot = T::zero();
            for i in 0..d {
                dot = dot + gr[i] * w[i] * xr[i];
            }
            let c = r * r * r * dot / dn;
            for i in 0..d {
                o[i] = r * gr[i] * w[i] - xr[i] * c;
            }
        });
    out
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(rms_rows(
                contig(x, l1, "rms")?,
                contig(w, l2, "rms")?,
                self.eps,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(rms_rows(
                contig(x, l1, "rms")?,
                contig(w, l2, "rms")?,
                self.eps,
            )),
            _ => candle_core::bail!("fused-rms-norm: x and w must both be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &gy, &RmsNormBwd { eps: self.eps })?;
        // A frozen norm weight gets no gradient (no buffer); a trainable one gets Σ gy·x·r.
        let dw = if w.track_op() {
            let d = w.dim(0)?;
            let ones = w.ones_like()?;
            let normed = x.apply_op2_no_bwd(&ones, &RmsNorm { eps: self.eps })?;
            Some((gy * normed)?.reshape(((), d))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let out = float3!(
            "fused-rms-norm-bwd",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, g| rms_bwd_rows(x, w, g, self.eps)
        );
        Ok((out, l1.shape().clone()))
    }
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * w`, fused forward and backward.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if Backend::of(x) == Backend::Generic {
        return generic::rms_norm(x, w, eps);
    }
    let w = w.to_dtype(x.dtype())?;
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

// ---------------------------------------------------------------------------------------------- RoPE

/// HF half-rotation RoPE on x (b, h, t, d) with cos/sin of shape (bb, 1, t, d/2), bb ∈ {1, b}.
/// `sign = -1` applies the inverse rotation (used by the backward).
struct Rope {
    cos: Tensor,
    sin: Tensor,
    sign: f64,
}

fn rope_kernel<T: Float + Send + Sync>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize),
    bb: usize,
    sign: T,
) -> Vec<T> {
    let (_b, h, t, d) = dims;
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(row, (o, xr))| {
            let ti = row % t;
            let bi = row / (h * t);
            let base = (if bb == 1 { 0 } else { bi } * t + ti) * half;
            for i in 0..half {
                let c = cos[base + i];
                let s = sin[base + i] * sign;
                let (x1, x2) = (xr[i], xr[i + half]);
                o[i] = x1 * c - x2 * s;
                o[i + half] = x2 * c + x1 * s;
            }
        });
    out
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> R<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let bb = self.cos.dim(0)?;
        if bb != 1 && bb != dims.0 {
            candle_core::bail!("fused-rope: cos batch {bb} vs x batch {}", dims.0)
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(rope_kernel(
                contig(x, l, "rope")?,
                &held::<f32>(&self.cos)?,
                &held::<f32>(&self.sin)?,
                dims,
                bb,
                self.sign as f32,
            )),
            CpuStorage::F64(x) => CpuStorage::F64(rope_kernel(
                contig(x, l, "rope")?,
                &held::<f64>(&self.cos)?,
                &held::<f64>(&self.sin)?,
                dims,
                bb,
                self.sign,
            )),
            _ => candle_core::bail!("fused-rope: only f32/f64"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, gy: &Tensor) -> R<Option<Tensor>> {
        let inv = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            sign: -self.sign,
        };
        Ok(Some(gy.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

/// HF (half-rotation) RoPE, fused. x (b, h, t, d); cos/sin (bb, 1, t, d/2) with bb ∈ {1, b}.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if Backend::of(x) == Backend::Generic {
        return generic::rope(x, cos, sin);
    }
    let dt = x.dtype();
    x.contiguous()?.apply_op1(Rope {
        cos: cos.to_dtype(dt)?,
        sin: sin.to_dtype(dt)?,
        sign: 1.0,
    })
}

// ---------------------------------------------------------------------------------------------- softmax

/// softmax(scale·x + bias) over the last dim; x (b, h, t, s), bias (bb, 1, t, s) with bb ∈ {1, b}.
struct MaskedSoftmax {
    bias: Tensor,
    scale: f64,
}

fn softmax_kernel<T: Float + Send + Sync>(
    x: &[T],
    bias: &[T],
    dims: (usize, usize, usize, usize),
    bb: usize,
    scale: T,
) -> Vec<T> {
    let (_b, h, t, s) = dims;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(s)
        .zip(x.par_chunks(s))
        .enumerate()
        .for_each(|(row, (o, xr))| {
            let ti = row % t;
            let bi = row / (h * t);
            let br = &bias[(if bb == 1 { 0 } else { bi } * t + ti) * s..][..s];
            for i in 0..s {
                o[i] = xr[i] * scale + br[i];
            }
            softmax_row(o);
        });
    out
}

/// Softmax of one row of (scaled, masked) scores in place: the row's maximum taken off, exponents below −87 as 0,
/// then normalised. A row with every entry −∞ (nothing to attend to) becomes zeros. Also the decode attention's
/// (`super::cached_attention`).
pub(crate) fn softmax_row<T: Float>(row: &mut [T]) {
    let m = row
        .iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    if m == T::neg_infinity() {
        row.fill(T::zero());
        return;
    }
    // Masked entries (bias −1e9) would send expf down its slow underflow path; below −87 the exponential is under
    // f32's smallest normal number (and negligible next to the row maximum's 1 in f64 too).
    let floor = T::from(-87.0).unwrap_or(T::neg_infinity());
    let mut sum = T::zero();
    for v in row.iter_mut() {
        let d = *v - m;
        *v = if d < floor { T::zero() } else { d.exp() };
        sum = sum + *v;
    }
    let inv = T::one() / sum;
    for v in row.iter_mut() {
        *v = *v * inv;
    }
}

fn softmax_bwd_kernel<T: Float + Send + Sync>(y: &[T], g: &[T], s: usize, scale: T) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(s)
        .zip(y.par_chunks(s).zip(g.par_chunks(s)))
        .for_each(|(o, (yr, gr))| {
            let dot = yr.iter().zip(gr).fold(T::zero(), |a, (&y, &g)| a + y * g);
            for i in 0..s {
                o[i] = scale * yr[i] * (gr[i] - dot);
            }
        });
    out
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> R<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let bb = self.bias.dim(0)?;
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(softmax_kernel(
                contig(x, l, "softmax")?,
                &held::<f32>(&self.bias)?,
                dims,
                bb,
                self.scale as f32,
            )),
            CpuStorage::F64(x) => CpuStorage::F64(softmax_kernel(
                contig(x, l, "softmax")?,
                &held::<f64>(&self.bias)?,
                dims,
                bb,
                self.scale,
            )),
            _ => candle_core::bail!("fused-masked-softmax: only f32/f64"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, gy: &Tensor) -> R<Option<Tensor>> {
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(
            &gy.contiguous()?,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

struct SoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let s = l1.dims()[l1.dims().len() - 1];
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(softmax_bwd_kernel(
                contig(y, l1, "sm-bwd")?,
                contig(g, l2, "sm-bwd")?,
                s,
                self.scale as f32,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(softmax_bwd_kernel(
                contig(y, l1, "sm-bwd")?,
                contig(g, l2, "sm-bwd")?,
                s,
                self.scale,
            )),
            _ => candle_core::bail!("fused-softmax-bwd: dtype mismatch"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `softmax(scale·x + bias)` over the last dim, fused; the bias gets no gradient. x (b, h, t, s);
/// bias (bb, 1, t, s).
pub fn masked_softmax(x: &Tensor, bias: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if Backend::of(x) == Backend::Generic {
        let cdt = super::compute_dtype(x.dtype());
        let z = (x.to_dtype(cdt)? * scale)?.broadcast_add(&bias.to_dtype(cdt)?)?;
        return super::softmax_pure(&z)?.to_dtype(x.dtype());
    }
    x.contiguous()?.apply_op1(MaskedSoftmax {
        bias: bias.to_dtype(x.dtype())?,
        scale,
    })
}

// ---------------------------------------------------------------------------------------------- SwiGLU

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        fn k<T: Float + Send + Sync>(g: &[T], u: &[T]) -> Vec<T> {
            g.par_iter()
                .zip(u.par_iter())
                .map(|(&g, &u)| g * sigmoid(g) * u)
                .collect()
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(k(contig(g, l1, "swiglu")?, contig(u, l2, "swiglu")?))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                CpuStorage::F64(k(contig(g, l1, "swiglu")?, contig(u, l2, "swiglu")?))
            }
            _ => candle_core::bail!("fused-swiglu: dtype mismatch"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &gy.contiguous()?, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        fn k<T: Float + Send + Sync>(g: &[T], u: &[T], gy: &[T]) -> Vec<T> {
            let n = g.len();
            let mut out = vec![T::zero(); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_iter_mut()
                .zip(du.par_iter_mut())
                .enumerate()
                .for_each(|(i, (dg, du))| {
                    let s = sigmoid(g[i]);
                    let silu = g[i] * s;
                    *du = gy[i] * silu;
                    *dg = gy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
                });
            out
        }
        let out = float3!(
            "fused-swiglu-bwd",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |g, u, y| k(g, u, y)
        );
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// `silu(g) * u`, fused forward and backward.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    if Backend::of(g) == Backend::Generic {
        return generic::swiglu(g, u);
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------------------------------------- cross-entropy

/// Σ_rows of the token loss of [`TokenLoss`]: `(1 − ε)·(lse − x[target]) + ε·(lse − mean(x))` (transformers'
/// `LabelSmoother`: ε of the mass spread evenly over the vocabulary; ε = 0 is plain cross-entropy), times
/// p[target] (detached) with DFT or EAFT's entropy weight; logits (n, v), targets (n) u32. Backward recomputes
/// the softmax.
struct CrossEntropy {
    loss: TokenLoss,
}

/// The weight of the target (1 − ε) and of every vocabulary entry (ε / v) in a smoothed row.
fn smoothing<T: Float>(eps: f64, v: usize) -> (T, T) {
    #[allow(clippy::cast_precision_loss)]
    let spread = eps / v as f64;
    (
        T::from(1.0 - eps).unwrap_or_else(T::one),
        T::from(spread).unwrap_or_else(T::zero),
    )
}

/// One row's loss and its weight: (`lse − keep·x[t] − spread·Σx`, DFT's p[t], EAFT's weight or 1), given its max
/// and Σ exp.
fn ce_row<T: Float>(
    r: &[T],
    t: usize,
    m: T,
    sum_exp: T,
    keep: T,
    spread: T,
    loss: TokenLoss,
) -> (T, T) {
    let lse = sum_exp.ln() + m;
    let plain = lse - r[t];
    let value = if loss.smoothing == 0.0 {
        plain
    } else {
        lse - keep * r[t] - spread * r.iter().fold(T::zero(), |a, &b| a + b)
    };
    let weight = if loss.dft {
        (-plain).exp()
    } else if let Some(alpha) = loss.eaft {
        eaft_weight(r, alpha)
    } else {
        T::one()
    };
    (value, weight)
}

/// EAFT's row weight `(H / 3)^α`, H the entropy of the softmax over the row's [`super::EAFT_TOP_K`] largest logits
/// (LLaMA-Factory's `_eaft_cross_entropy`; ties count once each, as `torch.topk` returns them).
fn eaft_weight<T: Float>(r: &[T], alpha: f64) -> T {
    let k = super::EAFT_TOP_K.min(r.len());
    // The k largest, descending (insertion into a short sorted list: most values fall below its end).
    let mut top: Vec<T> = Vec::with_capacity(k + 1);
    for &x in r {
        if top.len() == k && top.last().is_some_and(|&l| x <= l) {
            continue;
        }
        let at = top.iter().position(|&y| x > y).unwrap_or(top.len());
        top.insert(at, x);
        top.truncate(k);
    }
    let Some(&m) = top.first() else {
        return T::one();
    };
    let lse = top.iter().fold(T::zero(), |a, &y| a + (y - m).exp()).ln() + m;
    let h = top.iter().fold(T::zero(), |a, &y| {
        let lp = y - lse;
        a - lp.exp() * lp
    });
    let h = h.max(T::zero()) / T::from(3.0).unwrap_or_else(T::one);
    h.powf(T::from(alpha).unwrap_or_else(T::one))
}

fn row_max<T: Float>(r: &[T]) -> T {
    r.iter()
        .fold(T::neg_infinity(), |a, &b| if b > a { b } else { a })
}

fn ce_fwd<T: Float + Send + Sync>(x: &[T], tg: &[u32], v: usize, loss: TokenLoss) -> T {
    let (keep, spread) = smoothing::<T>(loss.smoothing, v);
    x.par_chunks(v)
        .zip(tg.par_iter())
        .map(|(r, &t)| {
            let m = row_max(r);
            let sum_exp = r.iter().fold(T::zero(), |a, &b| a + (b - m).exp());
            let (value, weight) = ce_row(r, t as usize, m, sum_exp, keep, spread, loss);
            weight * value
        })
        .reduce(T::zero, |a, b| a + b)
}

/// Writes `scale·w·(softmax − keep·one-hot − spread)` of one row into `o`; returns the row's weighted loss.
fn ce_row_grad<T: Float>(
    o: &mut [T],
    r: &[T],
    t: usize,
    scale: T,
    keep: T,
    spread: T,
    loss: TokenLoss,
) -> T {
    let m = row_max(r);
    let mut sum = T::zero();
    for (oi, &ri) in o.iter_mut().zip(r) {
        *oi = (ri - m).exp();
        sum = sum + *oi;
    }
    let (value, weight) = ce_row(r, t, m, sum, keep, spread, loss);
    let s = scale * weight;
    let inv = s / sum;
    let shift = s * spread;
    for oi in o.iter_mut() {
        *oi = *oi * inv - shift;
    }
    o[t] = o[t] - s * keep;
    weight * value
}

fn ce_bwd<T: Float + Send + Sync>(
    x: &[T],
    tg: &[u32],
    v: usize,
    scale: T,
    loss: TokenLoss,
) -> Vec<T> {
    let (keep, spread) = smoothing::<T>(loss.smoothing, v);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(v)
        .zip(x.par_chunks(v).zip(tg.par_iter()))
        .for_each(|(o, (r, &t))| {
            ce_row_grad(o, r, t as usize, scale, keep, spread, loss);
        });
    out
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, v: usize) -> R<&'a [u32]> {
    match s {
        CpuStorage::U32(t) => {
            let t = contig(t, l, "cross-entropy targets")?;
            if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
                candle_core::bail!("cross-entropy: target {bad} out of range for vocab {v}")
            }
            Ok(t)
        }
        _ => candle_core::bail!("cross-entropy: targets must be u32"),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let tg = targets_of(s2, l2, v)?;
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(vec![ce_fwd(contig(x, l1, "ce")?, tg, v, self.loss)])
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(vec![ce_fwd(contig(x, l1, "ce")?, tg, v, self.loss)])
            }
            _ => candle_core::bail!("fused-cross-entropy: only f32/f64"),
        };
        Ok((out, Shape::from(())))
    }
    fn bwd(
        &self,
        x: &Tensor,
        tg: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let scale = gy.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((
            Some(x.apply_op2_no_bwd(
                tg,
                &CrossEntropyBwd {
                    scale,
                    loss: self.loss,
                },
            )?),
            None,
        ))
    }
}

struct CrossEntropyBwd {
    scale: f64,
    loss: TokenLoss,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let tg = targets_of(s2, l2, v)?;
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(ce_bwd(
                contig(x, l1, "ce")?,
                tg,
                v,
                self.scale as f32,
                self.loss,
            )),
            CpuStorage::F64(x) => {
                CpuStorage::F64(ce_bwd(contig(x, l1, "ce")?, tg, v, self.scale, self.loss))
            }
            _ => candle_core::bail!("fused-cross-entropy-bwd: only f32/f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Sum of the token losses of [`TokenLoss`] (plain cross-entropy, label-smoothed, DFT-weighted): logits (n, v)
/// f32/f64, targets (n) u32 (all counted). Fused; the backward recomputes the softmax instead of keeping an (n, v)
/// log-softmax alive.
pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    loss: TokenLoss,
) -> candle_core::Result<Tensor> {
    if Backend::of(logits) == Backend::Generic {
        return generic::cross_entropy_sum(logits, targets, loss);
    }
    logits.contiguous()?.apply_op2(
        &targets.to_dtype(DType::U32)?.contiguous()?,
        CrossEntropy { loss },
    )
}

/// Token-loss rows in one pass: writes the gradient wrt the logits into `o` and returns the summed loss.
fn ce_fwd_bwd<T: Float + Send + Sync>(
    x: &[T],
    tg: &[u32],
    v: usize,
    loss: TokenLoss,
    o: &mut [T],
) -> T {
    let (keep, spread) = smoothing::<T>(loss.smoothing, v);
    o.par_chunks_mut(v)
        .zip(x.par_chunks(v).zip(tg.par_iter()))
        .map(|(o, (r, &t))| ce_row_grad(o, r, t as usize, T::one(), keep, spread, loss))
        .reduce(T::zero, |a, b| a + b)
}

/// Output: the gradient of Σ cross-entropy wrt the logits; the loss sum is left in `loss`.
struct CrossEntropyWithGrad {
    loss: TokenLoss,
    sum: std::sync::Mutex<f64>,
}

impl CustomOp2 for CrossEntropyWithGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-with-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let tg = targets_of(s2, l2, v)?;
        let (out, total) = match s1 {
            CpuStorage::F32(x) => {
                let x = contig(x, l1, "ce")?;
                let mut o = vec![0f32; x.len()];
                let l = ce_fwd_bwd(x, tg, v, self.loss, &mut o);
                (CpuStorage::F32(o), f64::from(l))
            }
            CpuStorage::F64(x) => {
                let x = contig(x, l1, "ce")?;
                let mut o = vec![0f64; x.len()];
                let l = ce_fwd_bwd(x, tg, v, self.loss, &mut o);
                (CpuStorage::F64(o), l)
            }
            _ => candle_core::bail!("fused-cross-entropy: only f32/f64"),
        };
        match self.sum.lock() {
            Ok(mut g) => *g = total,
            Err(_) => candle_core::bail!("fused-cross-entropy: poisoned loss cell"),
        }
        Ok((out, l1.shape().clone()))
    }
}

/// The summed token loss ([`TokenLoss`]) of `logits` (n, v) against `targets` (n) u32 and, when `grad`, its
/// gradient with respect to the logits (w·(softmax − (1 − ε)·one-hot − ε/v), w = DFT's detached p[target] or 1,
/// from the same exponentials), both without a graph (for the chunked lm_head loss).
pub fn cross_entropy_sum_and_grad(
    logits: &Tensor,
    targets: &Tensor,
    loss: TokenLoss,
    grad: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    if Backend::of(logits) == Backend::Generic {
        return generic::cross_entropy_sum_and_grad(logits, targets, loss, grad);
    }
    let x = logits.detach().contiguous()?;
    let tg = targets.to_dtype(DType::U32)?.contiguous()?;
    if !grad {
        let sum = x.apply_op2_no_bwd(&tg, &CrossEntropy { loss })?;
        return Ok((sum.to_dtype(DType::F64)?, None));
    }
    let op = CrossEntropyWithGrad {
        loss,
        sum: std::sync::Mutex::new(0.0),
    };
    let d = x.apply_op2_no_bwd(&tg, &op)?;
    let total = match op.sum.lock() {
        Ok(g) => *g,
        Err(_) => candle_core::bail!("fused-cross-entropy: poisoned loss cell"),
    };
    Ok((Tensor::new(total, x.device())?, Some(d)))
}

// ---------------------------------------------------------------------------------------------- attention

/// Scaled dot-product attention with an additive mask and GQA, as one op:
/// `y = softmax(scale·q·kᵀ + bias)·v`; q (b, nh, t, hd), k and v (b, nkv, t, hd), bias (bb, 1, t, t).
/// The probabilities are recomputed in the backward instead of being kept in the graph, and no
/// attention-sized gradient ever enters candle's GradStore.
struct Attention {
    bias: Tensor,
    scale: f64,
    n_rep: usize,
}

fn tensor_of(s: &CpuStorage, l: &Layout) -> R<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("fused-attention: inputs must be contiguous")
    }
    Ok(Tensor::from_storage(
        Storage::Cpu(s.clone()),
        l.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

impl Attention {
    /// Probabilities (b, nh, t, s) for untracked q, k.
    fn probs(&self, q: &Tensor, k: &Tensor) -> R<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        let q2 = q.reshape((b, nkv, self.n_rep * t, hd))?;
        let sc = q2.matmul(&k.t()?)?.reshape((b, nh, t, s))?;
        sc.apply_op1_no_bwd(&MaskedSoftmax {
            bias: self.bias.clone(),
            scale: self.scale,
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let (q, k, v) = (tensor_of(s1, l1)?, tensor_of(s2, l2)?, tensor_of(s3, l3)?);
        let (b, nh, t, hd) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        if nkv * self.n_rep != nh {
            candle_core::bail!(
                "fused-attention: {nh} query heads vs {nkv} kv heads × {}",
                self.n_rep
            )
        }
        let p = self.probs(&q, &k)?.reshape((b, nkv, self.n_rep * t, s))?;
        let y = p.matmul(&v)?.reshape((b, nh, t, hd))?;
        let (st, _) = y.storage_and_layout();
        match &*st {
            Storage::Cpu(c) => Ok((c.clone(), y.shape().clone())),
            _ => candle_core::bail!("fused-attention: cpu only"),
        }
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (b, nh, t, hd) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        let rt = self.n_rep * t;
        let p = self.probs(&q, &k)?;
        let p2 = p.reshape((b, nkv, rt, s))?;
        let gy2 = gy.contiguous()?.reshape((b, nkv, rt, hd))?;
        let dv = p2.t()?.matmul(&gy2)?;
        let dp = gy2.matmul(&v.t()?)?.reshape((b, nh, t, s))?;
        let ds = p
            .apply_op2_no_bwd(&dp, &SoftmaxBwd { scale: self.scale })?
            .reshape((b, nkv, rt, s))?;
        let dq = ds.matmul(&k)?.reshape((b, nh, t, hd))?;
        let dk = ds.t()?.matmul(&q.reshape((b, nkv, rt, hd))?)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `softmax(scale·q·kᵀ + bias)·v` with GQA (query head j·n_rep + r uses kv head j), fused forward and backward.
/// q (b, nh, t, hd); k, v (b, nkv, s, hd); bias (bb, 1, t, s) with bb ∈ {1, b}.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if Backend::of(q) == Backend::Generic {
        return generic::attention(q, k, v, bias, scale);
    }
    let n_rep = q.dim(1)? / k.dim(1)?;
    let op = Attention {
        bias: bias.to_dtype(q.dtype())?,
        scale,
        n_rep,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

// ---------------------------------------------------------------------------------------------- backward pieces
// Graph-free building blocks for the hand-written decoder-layer backward (`engine::layer`).

/// dX of [`rms_norm`] for a frozen weight.
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if Backend::of(x) == Backend::Generic {
        return generic::rms_norm_backward(x, w, gy, eps);
    }
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?
        .apply_op3_no_bwd(&w, &gy.contiguous()?, &RmsNormBwd { eps })
}

/// dX of [`rope`] (the inverse rotation of the gradient).
pub fn rope_backward(gy: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if Backend::of(gy) == Backend::Generic {
        return generic::rope_backward(gy, cos, sin);
    }
    let dt = gy.dtype();
    gy.contiguous()?.apply_op1_no_bwd(&Rope {
        cos: cos.to_dtype(dt)?,
        sin: sin.to_dtype(dt)?,
        sign: -1.0,
    })
}

/// (dG, dU) of [`swiglu`].
pub fn swiglu_backward(
    g: &Tensor,
    u: &Tensor,
    gy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    if Backend::of(g) == Backend::Generic {
        return generic::swiglu_backward(g, u, gy);
    }
    let both = g
        .contiguous()?
        .apply_op3_no_bwd(&u.contiguous()?, &gy.contiguous()?, &SwiGluBwd)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// (dQ, dK, dV) of [`attention`] (probabilities recomputed).
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    gy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if Backend::of(q) == Backend::Generic {
        return generic::attention_backward(q, k, v, bias, scale, gy);
    }
    let op = Attention {
        bias: bias.to_dtype(q.dtype())?,
        scale,
        n_rep: q.dim(1)? / k.dim(1)?,
    };
    match op.bwd(q, k, v, gy, gy)? {
        (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
        _ => candle_core::bail!("fused-attention: backward returned no gradient"),
    }
}

struct AddPar;

impl CustomOp2 for AddPar {
    fn name(&self) -> &'static str {
        "fused-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        fn k<T: Float + Send + Sync>(a: &[T], b: &[T]) -> Vec<T> {
            let mut out = vec![T::zero(); a.len()];
            out.par_chunks_mut(16 * 1024)
                .zip(a.par_chunks(16 * 1024).zip(b.par_chunks(16 * 1024)))
                .for_each(|(o, (a, b))| {
                    for i in 0..o.len() {
                        o[i] = a[i] + b[i];
                    }
                });
            out
        }
        if l1.shape() != l2.shape() {
            candle_core::bail!("fused-add: shapes {:?} and {:?}", l1.shape(), l2.shape())
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(k(contig(a, l1, "add")?, contig(b, l2, "add")?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(k(contig(a, l1, "add")?, contig(b, l2, "add")?))
            }
            _ => candle_core::bail!("fused-add: dtype mismatch"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `a + b` (same shape) without a graph, on the rayon pool (candle's own elementwise add runs on a spinning
/// barrier pool beside rayon's threads).
pub fn add_untracked(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if Backend::of(a) == Backend::CpuFused && a.dtype() == b.dtype() {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &AddPar)
    } else {
        (a.detach() + b.detach())?.detach().contiguous()
    }
}

// ---------------------------------------------------------------------------------------------- DoRA

/// `‖W + s·B·A‖` of each row of W (out, in) for A (r, in) and B (out, r), in A's dtype, detached: DoRA's weight norm.
/// The CPU kernel builds one row of W + s·B·A at a time in a scratch row (r axpys) and sums its squares in f64,
/// never forming the matrix.
pub fn lora_row_norms(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> R<Tensor> {
    if Backend::of(a) == Backend::Generic {
        return generic::lora_row_norms(w, a, b, scale);
    }
    let w = w.to_dtype(a.dtype())?.contiguous()?;
    w.apply_op3_no_bwd(&a.contiguous()?, &b.contiguous()?, &DoraNorm { scale })
}

struct DoraNorm {
    scale: f64,
}

impl CustomOp3 for DoraNorm {
    fn name(&self) -> &'static str {
        "fused-dora-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        fn k<T: Float + Send + Sync>(w: &[T], a: &[T], b: &[T], r: usize, scale: f64) -> Vec<T> {
            let inp = a.len() / r.max(1);
            let s = T::from(scale).unwrap_or(T::one());
            let mut out = vec![T::zero(); w.len() / inp.max(1)];
            out.par_iter_mut().enumerate().for_each_init(
                || vec![T::zero(); inp],
                |row, (j, o)| {
                    row.copy_from_slice(&w[j * inp..(j + 1) * inp]);
                    for (k, &bjk) in b[j * r..(j + 1) * r].iter().enumerate() {
                        let c = s * bjk;
                        for (x, &y) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                            *x = *x + c * y;
                        }
                    }
                    let sq = row
                        .iter()
                        .fold(0f64, |acc, &v| acc + (v * v).to_f64().unwrap_or(0.0));
                    *o = T::from(sq.sqrt()).unwrap_or(T::zero());
                },
            );
            out
        }
        let (out, inp) = l1.shape().dims2()?;
        let (r, ainp) = l2.shape().dims2()?;
        if ainp != inp || l3.shape().dims2()? != (out, r) {
            candle_core::bail!(
                "dora-norm: W {:?}, A {:?}, B {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let norms = float3!(
            "fused-dora-norm",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |w, a, b| k(w, a, b, r, self.scale)
        );
        Ok((norms, Shape::from(out)))
    }
}

/// DoRA's output term `c⊙z − yd` (rows, out) for z = yd + d and the row factor c (out), graph-free, in one
/// parallel pass on the CPU.
pub fn dora_term(z: &Tensor, yd: &Tensor, c: &Tensor) -> R<Tensor> {
    if Backend::of(z) == Backend::Generic || z.dtype() != yd.dtype() || z.dtype() != c.dtype() {
        return generic::dora_term(z, yd, c);
    }
    z.contiguous()?
        .apply_op3_no_bwd(&yd.contiguous()?, &c.contiguous()?, &DoraTerm)
}

struct DoraTerm;

impl CustomOp3 for DoraTerm {
    fn name(&self) -> &'static str {
        "fused-dora-term"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        fn k<T: Float + Send + Sync>(z: &[T], yd: &[T], c: &[T]) -> Vec<T> {
            let d = c.len().max(1);
            let mut out = vec![T::zero(); z.len()];
            out.par_chunks_mut(d)
                .zip(z.par_chunks(d).zip(yd.par_chunks(d)))
                .for_each(|(o, (zr, yr))| {
                    for i in 0..o.len() {
                        o[i] = c[i] * zr[i] - yr[i];
                    }
                });
            out
        }
        if l1.shape() != l2.shape() || l1.shape().dims().last() != Some(&l3.shape().elem_count()) {
            candle_core::bail!(
                "dora-term: z {:?}, yd {:?}, c {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let out = float3!(
            "fused-dora-term",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |z, y, c| k(z, y, c)
        );
        Ok((out, l1.shape().clone()))
    }
}

/// `gy⊙c` (rows, out) and `Σ_rows gy⊙z` (out) for 2-D gy and z and the row factor c: the pieces of DoRA's backward,
/// graph-free, in one parallel pass on the CPU (the sums in f64).
pub fn dora_backward(gy: &Tensor, z: &Tensor, c: &Tensor) -> R<(Tensor, Tensor)> {
    if Backend::of(gy) == Backend::Generic || gy.dtype() != z.dtype() || gy.dtype() != c.dtype() {
        return generic::dora_backward(gy, z, c);
    }
    let (rows, out) = gy.dims2()?;
    let both = gy
        .contiguous()?
        .apply_op3_no_bwd(&z.contiguous()?, &c.contiguous()?, &DoraBwd)?;
    Ok((
        both.narrow(0, 0, rows * out)?.reshape((rows, out))?,
        both.narrow(0, rows * out, out)?,
    ))
}

struct DoraBwd;

impl CustomOp3 for DoraBwd {
    fn name(&self) -> &'static str {
        "fused-dora-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        /// Rows per parallel task of the column sums.
        const ROWS: usize = 32;
        fn k<T: Float + Send + Sync>(gy: &[T], z: &[T], c: &[T]) -> Vec<T> {
            let d = c.len().max(1);
            let n = gy.len();
            let mut out = vec![T::zero(); n + d];
            let (g, _) = out.split_at_mut(n);
            let sums = g
                .par_chunks_mut(d * ROWS)
                .zip(gy.par_chunks(d * ROWS).zip(z.par_chunks(d * ROWS)))
                .map(|(o, (gr, zr))| {
                    let mut s = vec![0f64; d];
                    for ((o, gr), zr) in o.chunks_mut(d).zip(gr.chunks(d)).zip(zr.chunks(d)) {
                        for i in 0..d {
                            o[i] = gr[i] * c[i];
                            s[i] += (gr[i] * zr[i]).to_f64().unwrap_or(0.0);
                        }
                    }
                    s
                })
                .reduce(
                    || vec![0f64; d],
                    |mut a, b| {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x += y;
                        }
                        a
                    },
                );
            for (o, s) in out[n..].iter_mut().zip(sums) {
                *o = T::from(s).unwrap_or(T::zero());
            }
            out
        }
        if l1.shape() != l2.shape() || l1.shape().dims2()?.1 != l3.shape().elem_count() {
            candle_core::bail!(
                "dora-bwd: gy {:?}, z {:?}, c {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let out = float3!("fused-dora-bwd", (s1, l1), (s2, l2), (s3, l3), |g, z, c| k(
            g, z, c
        ));
        Ok((
            out,
            Shape::from(l1.shape().elem_count() + l3.shape().elem_count()),
        ))
    }
}
