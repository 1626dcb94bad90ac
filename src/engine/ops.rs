//! Differentiable building blocks for the training path.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward and silently cut the gradient
//! (CANDLE_NOTES §2), so the training path uses the pure-op versions here, or the fused CPU kernels in
//! [`fused`] that carry their own backward. [`FrozenLinear`] multiplies by a frozen weight and computes only the
//! input gradient, so frozen weights never get gradient buffers.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Storage, Tensor};

use super::bnb4::Bnb4Tensor;
use super::qweight::QWeight;
use super::{kquants, legacy_quants};

pub mod cached_attention;
pub mod fused;
pub mod generic;

/// The per-token language-model loss: cross-entropy, label-smoothed by `smoothing` (transformers' `LabelSmoother`:
/// `(1 − ε)·nll + ε·mean_v(−log p[v])`), with `dft` weighted by the target's probability, detached
/// (LLaMA-Factory's `use_dft_loss`: `p[target]·nll`), or with `eaft: Some(α)` weighted by the entropy of the row's
/// 20 largest logits, detached (LLaMA-Factory's `use_eaft_loss`: `(H_top20 / 3)^α · nll`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenLoss {
    pub smoothing: f64,
    pub dft: bool,
    pub eaft: Option<f64>,
}

impl TokenLoss {
    /// Plain cross-entropy.
    pub const PLAIN: TokenLoss = TokenLoss {
        smoothing: 0.0,
        dft: false,
        eaft: None,
    };
}

/// How many of a row's largest logits EAFT's entropy reads (LLaMA-Factory's `torch.topk(..., k=20)`).
pub const EAFT_TOP_K: usize = 20;

/// Which implementation of the training kernels runs for a tensor, chosen here per device and dtype and nowhere
/// else: the public functions of [`fused`] dispatch on it, so the model code names one kernel set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The fused rayon kernels of [`fused`]: CPU, f32 or f64.
    CpuFused,
    /// Compositions of candle ops ([`generic`]): any device and dtype (CUDA, and half types on the CPU).
    Generic,
}

thread_local! {
    static GENERIC_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Backend {
    pub fn of(t: &Tensor) -> Self {
        if GENERIC_ONLY.get() {
            return Self::Generic;
        }
        match (t.device(), t.dtype()) {
            (candle_core::Device::Cpu, DType::F32 | DType::F64) => Self::CpuFused,
            _ => Self::Generic,
        }
    }

    /// Runs `f` on this thread with the generic kernels on every device: the GPU's code path, checked on the
    /// CPU (in f64 against finite differences, in f32 against the fused kernels) where CI has no GPU.
    pub fn generic_only<T>(f: impl FnOnce() -> T) -> T {
        let before = GENERIC_ONLY.replace(true);
        let out = f();
        GENERIC_ONLY.set(before);
        out
    }
}

/// Dtype used for statistics (norms, softmax, loss): f32 for half types, else the dtype itself (f64 stays f64).
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// The LoRA dropout mask for the input of the linear `module` ((…, in), scaled by 1/(1 − p), in `dtype`), drawn
/// from `seed` and the module's name: the same (seed, module) gives the same mask, so a checkpointed layer's
/// recomputation and the hand-written backward see the forward's mask, and a resumed run draws what the
/// uninterrupted one drew. The trainer picks a fresh `seed` per micro-batch (from the preset's seed and the step).
/// CUDA draws on the device (cuRAND seeded per mask); the CPU draws with a seeded ChaCha generator.
pub fn lora_dropout_mask(
    shape: &Shape,
    p: f32,
    seed: u64,
    module: &str,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let key = draw_key(seed, module);
    let keep = 1.0 / (1.0 - f64::from(p));
    if device.is_cpu() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(key);
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { 1.0 })
            .collect();
        return (Tensor::from_vec(v, shape, device)? * keep)?.to_dtype(dtype);
    }
    device.set_seed(key)?;
    let u = Tensor::rand(0f32, 1f32, shape, device)?;
    (u.ge(f64::from(p))?.to_dtype(DType::F32)? * keep)?.to_dtype(dtype)
}

/// Uniform noise in [−`magnitude`, `magnitude`) of `shape`, drawn from (`seed`, `key`) as
/// [`lora_dropout_mask`] draws its masks: the same pair gives the same noise (NEFTune's embedding noise).
pub fn uniform_noise(
    shape: &Shape,
    magnitude: f64,
    seed: u64,
    key: &str,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let key = draw_key(seed, key);
    let u = if device.is_cpu() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(key);
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| rng.random::<f32>())
            .collect();
        Tensor::from_vec(v, shape, device)?
    } else {
        device.set_seed(key)?;
        Tensor::rand(0f32, 1f32, shape, device)?
    };
    u.affine(2.0 * magnitude, -magnitude)?.to_dtype(dtype)
}

/// FNV-1a of `module`, then SplitMix64 of its mix with `seed`: distinct, well-spread generator keys per module and
/// seed.
fn draw_key(seed: u64, module: &str) -> u64 {
    let name = module.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut z = (seed ^ name.rotate_left(17)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `y = x · Wᵀ` with W frozen: backward yields dX only (no weight gradient, no leaf in the GradStore).
pub struct FrozenLinear {
    /// (out, in), plain tensor, same dtype and device as the input.
    pub w: Tensor,
}

fn frozen_fwd<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
) -> candle_core::Result<(S, Shape)> {
    if !xl.is_contiguous() {
        candle_core::bail!("frozen-linear: input must be contiguous")
    }
    let dims = xl.dims();
    let Some((&k, rest)) = dims.split_last() else {
        candle_core::bail!("frozen-linear: scalar input")
    };
    let (n, wk) = wl.shape().dims2()?;
    if wk != k {
        candle_core::bail!("frozen-linear: input features {k} != weight in-features {wk}")
    }
    let m: usize = rest.iter().product();
    let xl2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let wt = wl.transpose(0, 1)?;
    let y = x.matmul(w, (1, m, n, k), &xl2, &wt)?;
    let mut out = rest.to_vec();
    out.push(n);
    Ok((y, Shape::from(out)))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) => frozen_fwd(s, l, w, wl),
            _ => candle_core::bail!("frozen-linear: weight and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => frozen_fwd(s, l, w, wl),
            _ => candle_core::bail!("frozen-linear: weight and input on different devices"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = self.w.dim(0)?;
        let gx = gy.reshape(((), n))?.matmul(&self.w)?.reshape(x.shape())?;
        Ok(Some(gx))
    }
}

/// The llama.cpp kernels ported here for a GGML block type on the CPU (`None`: candle's own). candle's Q4_1, Q5_0
/// and Q5_1 products are scalar loops, its Q4_0 and Q8_0 products are slower than llama.cpp's, and its K-quant
/// products run a row at a time on rayon's pool: [`legacy_quants`] and [`kquants`] instead.
#[derive(Clone, Copy)]
enum CpuKernels {
    Legacy(legacy_quants::Format),
    K(kquants::Format),
}

impl CpuKernels {
    /// Q4_1, Q5_0 and Q5_1 on any CPU (candle's are scalar loops, the scalar formula here at least tiles a
    /// prompt); Q4_0, Q8_0 and the K-quants only where these kernels are SIMD (AVX2 or better): elsewhere (an ARM
    /// CPU) candle's NEON kernels are the faster ones.
    fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        let simd = legacy_quants::Kernel::detect() != legacy_quants::Kernel::Scalar;
        match legacy_quants::Format::of(dtype) {
            Some(legacy_quants::Format::Q8_0 | legacy_quants::Format::Q4_0) if !simd => None,
            Some(f) => Some(Self::Legacy(f)),
            None => kquants::Format::of(dtype).filter(|_| simd).map(Self::K),
        }
    }

    /// Values per block: k must be a multiple of it.
    fn block(self) -> usize {
        match self {
            Self::Legacy(_) => legacy_quants::QK,
            Self::K(_) => kquants::QK_K,
        }
    }

    /// `dst (m × n) = x (m × k) · Wᵀ`, `w` the raw blocks of W (n, k).
    fn matmul_t(self, x: &[f32], m: usize, k: usize, w: &[u8], n: usize, dst: &mut [f32]) {
        let kernel = legacy_quants::Kernel::detect();
        match self {
            Self::Legacy(f) => legacy_quants::matmul_t(kernel, f, x, m, k, w, n, dst),
            Self::K(f) => kquants::matmul_t(kernel, f, x, m, k, w, n, dst),
        }
    }
}

/// `y = x · Wᵀ` with W frozen and quantized (a GGML block format): the forward is termtune's integer kernels on the
/// CPU where [`CpuKernels`] has them (a packed Q4_0, Q5_0 or Q8_0 weight its own,
/// [`super::qweight::PackedRows::matmul_t`]), else candle's quantized matmul (the kernels of [`candle_core::quantized::QMatMul`]); the backward yields dX only, `gy · W`
/// with W dequantized for that one product and dropped (candle has no transposed quantized matmul).
pub struct QuantizedLinear {
    /// (out, in).
    pub w: QWeight,
}

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.w.shape().dims2()?;
        let (m, kx) = l.shape().dims2()?;
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(x), Some((a, b))) if kx == k => Some(&x[a..b]),
            _ => None,
        };
        let q = match &self.w {
            QWeight::Packed(p) => {
                let Some(x) = x else {
                    candle_core::bail!(
                        "quantized-linear: a packed weight takes contiguous f32 rows of {k}"
                    )
                };
                let mut out = vec![0f32; m * n];
                p.matmul_t(x, m, &mut out);
                return Ok((CpuStorage::F32(out), Shape::from((m, n))));
            }
            QWeight::Blocks(q) => q,
        };
        let (Some(kernels), Some(x)) = (CpuKernels::of(q.dtype()), x) else {
            return q.cpu_fwd(s, l);
        };
        if !k.is_multiple_of(kernels.block()) {
            return q.cpu_fwd(s, l);
        }
        let w = q.data()?;
        let mut out = vec![0f32; m * n];
        kernels.matmul_t(x, m, k, &w, n, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match &self.w {
            QWeight::Blocks(q) => q.cuda_fwd(s, l),
            QWeight::Packed(_) => {
                candle_core::bail!(
                    "quantized-linear: a packed weight is on the CPU, the input on a GPU"
                )
            }
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, _) = self.w.shape().dims2()?;
        let w = self.w.dequantize(gy.device())?.to_dtype(gy.dtype())?;
        let gx = gy.reshape(((), n))?.matmul(&w)?.reshape(x.shape())?;
        Ok(Some(gx))
    }
}

/// From this many rows of x on, a product with a GGML-quantized weight in training (and in any pass but the
/// KV-cached inference one, see [`quantized_linear_for_inference`]) multiplies by the weight dequantized for that
/// one product (f32 matmul) instead of rounding the activations to 8 bits for the integer kernels: a training
/// step's rows make the dense matmul faster (a LoRA step over SmolLM2's Q4_1 file: 72.6 → 116 tokens/s, `termtune
/// train presets/quickstart.yaml model_name_or_path=FILE max_steps=8`), and exact. Fewer rows run the quantized
/// kernels, as llama.cpp does.
pub const QUANTIZED_DENSE_MIN_ROWS: usize = 64;

/// `x · Wᵀ` for x of any rank ≥ 2 and a quantized W (out, in). Under [`QUANTIZED_DENSE_MIN_ROWS`] rows:
/// [`QuantizedLinear`] when x is tracked (dX only), candle's quantized matmul (or [`legacy_quants`]'s) without a graph
/// otherwise; the kernels take f32 (and on the CPU f16/bf16) inputs, other dtypes (f64 in gradient checks, half
/// types on a GPU) go through f32 and come back in their own dtype. From that many rows on: [`frozen_linear`] with
/// W dequantized for the product (in x's dtype) and dropped.
pub fn quantized_linear(x: &Tensor, w: &QWeight) -> candle_core::Result<Tensor> {
    quantized_linear_rows(x, w, QUANTIZED_DENSE_MIN_ROWS)
}

/// [`quantized_linear`] for inference (the KV-cached forward of chat and generation): on the CPU, a weight of a
/// type [`CpuKernels`] multiplies and an untracked x run those integer kernels for any number of rows, as llama.cpp
/// does (their prompt tiles: [`legacy_quants::matmul_t`], [`kquants::matmul_t`]), instead of dequantizing every weight for
/// a prompt of 64 tokens or more. SmolLM2's files, `scripts/bench_decode.py FILE --threads 2 --reps 6` (2-core AVX-512 VNNI CPU, 94-token
/// prompt): prompt tokens/s against llama.cpp's, Q8_0 0.49× → 0.88×, Q4_1 0.94× → 1.74× (289 tokens: 0.75× →
/// 0.99×, 1.09× → 1.66×); a LoRA step (x tracked) keeps the dense product. Elsewhere it is [`quantized_linear`].
pub fn quantized_linear_for_inference(x: &Tensor, w: &QWeight) -> candle_core::Result<Tensor> {
    let integer = x.device().is_cpu() && CpuKernels::of(w.dtype()).is_some() && !x.track_op();
    let dense_min_rows = if integer {
        usize::MAX
    } else {
        QUANTIZED_DENSE_MIN_ROWS
    };
    quantized_linear_rows(x, w, dense_min_rows)
}

/// [`quantized_linear`] with the dense product from `dense_min_rows` rows of x on.
fn quantized_linear_rows(
    x: &Tensor,
    w: &QWeight,
    dense_min_rows: usize,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let Some((&k, rest)) = dims.split_last() else {
        candle_core::bail!("quantized-linear: scalar input")
    };
    if rest.iter().product::<usize>() >= dense_min_rows {
        let dense = w.dequantize(x.device())?.to_dtype(x.dtype())?;
        return frozen_linear(x, &dense);
    }
    let native = match x.device() {
        candle_core::Device::Cpu if CpuKernels::of(w.dtype()).is_none() => {
            matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        }
        _ => x.dtype() == DType::F32,
    };
    let xin = if native {
        x.contiguous()?
    } else {
        x.to_dtype(DType::F32)?.contiguous()?
    };
    let x2 = xin.reshape(((), k))?;
    let op = QuantizedLinear { w: w.clone() };
    let y = if x2.track_op() {
        x2.apply_op1(op)?
    } else {
        x2.apply_op1_no_bwd(&op)?
    };
    let mut out = rest.to_vec();
    out.push(w.shape().dims2()?.0);
    y.reshape(out)?.to_dtype(x.dtype())
}

/// `y = x · Wᵀ` with W frozen in bitsandbytes' 4-bit layout: each pass dequantizes W (float32, then the input's
/// dtype, as bitsandbytes' `compute_dtype`) for its one product and drops it; the backward yields dX only, `gy · W`
/// with W dequantized again, so no dense copy outlives a product.
pub struct Bnb4Linear {
    /// (out, in).
    pub w: Arc<Bnb4Tensor>,
}

impl Bnb4Linear {
    /// The product with the weight dequantized into `dtype` for it ([`FrozenLinear`] over the dense copy).
    fn dense(&self, dtype: DType) -> candle_core::Result<FrozenLinear> {
        let w = self
            .w
            .dequantize()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)?;
        Ok(FrozenLinear { w })
    }
}

impl CustomOp1 for Bnb4Linear {
    fn name(&self) -> &'static str {
        "bnb4-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.dense(s.dtype())?.cpu_fwd(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.dense(s.dtype())?.cuda_fwd(s, l)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.dense(gy.dtype())?.bwd(x, y, gy)
    }
}

/// `x · Wᵀ` for x of any rank ≥ 2 and a 4-bit W (out, in): [`Bnb4Linear`] when x is tracked (dX only), a plain
/// product with the transiently dequantized W otherwise.
pub fn bnb4_linear(x: &Tensor, w: &Arc<Bnb4Tensor>) -> candle_core::Result<Tensor> {
    if x.track_op() {
        return x.contiguous()?.apply_op1(Bnb4Linear { w: w.clone() });
    }
    let dims = x.dims();
    let Some((_, rest)) = dims.split_last() else {
        candle_core::bail!("bnb4-linear: scalar input")
    };
    let m: usize = rest.iter().product();
    if x.device().is_cpu() && x.dtype() == DType::F32 && m <= super::bnb4::FUSED_MAX_ROWS {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let fused = w
            .matmul_t_few_rows(&xs, m)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if let Some(y) = fused {
            let mut out = rest.to_vec();
            out.push(w.dims()[0]);
            return Tensor::from_vec(y, out, x.device());
        }
    }
    let dense = Bnb4Linear { w: w.clone() }.dense(x.dtype())?;
    linear(x, &dense.w)
}

/// `x · Wᵀ` for x of any rank ≥ 2 (plain matmul; gradients flow to W when W is tracked).
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let n = w.dim(0)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(n);
    x.reshape(((), k))?.matmul(&w.t()?)?.reshape(out)
}

/// Frozen linear: custom dX-only op when the input is tracked, plain matmul otherwise.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() })
    } else {
        linear(x, w)
    }
}

/// RMSNorm with the statistics in `compute_dtype`, pure ops (differentiable in x and w).
pub fn rms_norm_pure(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let xc = x.to_dtype(compute_dtype(dt))?;
    let inv = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    xc.broadcast_div(&inv)?.to_dtype(dt)?.broadcast_mul(w)
}

/// Softmax over the last dim, pure ops.
pub fn softmax_pure(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dim, pure ops.
pub fn log_softmax_pure(x: &Tensor) -> candle_core::Result<Tensor> {
    let s = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    s.broadcast_sub(&s.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// `log softmax(logits)[target]` per row, on the host (f64): logits (n, v), targets (n) u32. No graph.
pub fn label_logps(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Vec<f64>> {
    let x = logits.detach().to_dtype(compute_dtype(logits.dtype()))?;
    let m = x.max_keepdim(D::Minus1)?;
    let lse = (x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?;
    let picked = x.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    (picked - lse)?
        .squeeze(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()
}

/// HF (half-rotation / neox) RoPE, pure ops. x: (b, h, t, d); cos, sin: broadcastable to (b, h, t, d/2).
pub fn rope_pure(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let o1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let o2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

/// SwiGLU activation `silu(g) * u`, pure ops.
pub fn swiglu_pure(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    g.silu()? * u
}

/// Sum over rows of `-log softmax(logits)[target] * weight`, pure ops.
/// logits (n, v) in a float dtype; targets (n) u32; weights (n) same dtype as logits (0 = ignored row).
pub fn nll_sum_pure(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let logp = log_softmax_pure(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked * weights)?.sum_all()?.neg()
}

/// `y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ` as one op: W0 frozen (held), A (r, in) and B (out, r) are the op's tracked
/// arguments. The graph keeps only x (not the base output, the LoRA output and their sum), and the backward
/// returns dX, dA, dB with no gradient for W0. Used on the training path when LoRA dropout is 0.
pub struct LoraLinear {
    /// (out, in), frozen.
    pub w: Tensor,
    pub scale: f64,
}

#[allow(clippy::too_many_arguments)]
fn lora_fwd<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
    a: &S,
    al: &Layout,
    b: &S,
    bl: &Layout,
    scale: f64,
) -> candle_core::Result<(S, Shape)> {
    if !xl.is_contiguous() {
        candle_core::bail!("lora-linear: input must be contiguous")
    }
    let dims = xl.dims();
    let Some((&k, rest)) = dims.split_last() else {
        candle_core::bail!("lora-linear: scalar input")
    };
    let (n, wk) = wl.shape().dims2()?;
    let (r, ak) = al.shape().dims2()?;
    let (bn, br) = bl.shape().dims2()?;
    if wk != k || ak != k || bn != n || br != r {
        candle_core::bail!(
            "lora-linear: shapes x[..,{k}] W[{n},{wk}] A[{r},{ak}] B[{bn},{br}] do not fit"
        )
    }
    let m: usize = rest.iter().product();
    let xl2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let y0 = x.matmul(w, (1, m, n, k), &xl2, &wl.transpose(0, 1)?)?;
    let xa = x.matmul(a, (1, m, r, k), &xl2, &al.transpose(0, 1)?)?;
    let lr = Layout::contiguous((m, r));
    let xa = xa.affine(&lr, scale, 0.0)?;
    let d = xa.matmul(b, (1, m, n, r), &lr, &bl.transpose(0, 1)?)?;
    let lo = Layout::contiguous((m, n));
    let y = y0.binary_impl::<candle_core::op::Add>(&d, &lo, &lo)?;
    let mut out = rest.to_vec();
    out.push(n);
    Ok((y, Shape::from(out)))
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) => lora_fwd(s1, l1, w, wl, s2, l2, s3, l3, self.scale),
            _ => candle_core::bail!("lora-linear: weight and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => lora_fwd(s1, l1, w, wl, s2, l2, s3, l3, self.scale),
            _ => candle_core::bail!("lora-linear: weight and input on different devices"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detach everything: a gradient built from the tracked x would carry the whole forward graph into the
        // GradStore and from there into the optimizer state (a leak of one graph per step).
        let tracked_x = x.track_op();
        let (n, k) = self.w.dims2()?;
        let x2 = x.detach().reshape(((), k))?;
        let gy2 = gy.detach().reshape(((), n))?;
        // An untracked input (e.g. the first layer's normed frozen embeddings) needs no gradient: skip the GEMM.
        let w = tracked_x.then_some(&self.w);
        let g = lora_linear_backward(
            &x2,
            w,
            &a.detach(),
            &b.detach(),
            self.scale,
            None,
            None,
            &gy2,
        )?;
        let dx = match g.dx {
            Some(dx) => Some(dx.reshape(x.shape())?),
            None => None,
        };
        Ok((dx, Some(g.da), Some(g.db)))
    }
}

/// Gradients of a LoRA linear ([`lora_linear_backward`]).
pub struct LoraGrads {
    /// dX (rows, in), when the base weight was given.
    pub dx: Option<Tensor>,
    /// dA (r, in).
    pub da: Tensor,
    /// dB (out, r).
    pub db: Tensor,
}

/// The backward of `y = x·W0ᵀ + s·((x⊙m)·Aᵀ)·Bᵀ` (+ a frozen bias) on 2-D x (rows, in) for the incoming gradient
/// `gy` (rows, out), graph-free; the one formula behind [`LoraLinear`] and the hand-written layer backward.
/// `w` (out, in): also compute dX (none: the input needs no gradient). `mask`: the LoRA dropout mask of the
/// forward. `xa`: (x⊙m)·Aᵀ when the forward kept it (else recomputed). LoRA's gradients are in its own dtype,
/// dX in the incoming gradient's.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_backward(
    x: &Tensor,
    w: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    xa: Option<&Tensor>,
    gy: &Tensor,
) -> candle_core::Result<LoraGrads> {
    let ldt = a.dtype();
    let gyl = gy.to_dtype(ldt)?;
    let gb = (gyl.matmul(b)? * scale)?; // (rows, r)
    let mut xl = x.to_dtype(ldt)?;
    if let Some(m) = mask {
        xl = xl.mul(m)?;
    }
    let xa = match xa {
        Some(t) => t.clone(),
        None => xl.matmul(&a.t()?)?,
    };
    let db = (gyl.t()?.matmul(&xa)? * scale)?;
    let da = gb.t()?.matmul(&xl)?;
    let dx = match w {
        None => None,
        Some(w) => {
            let mut dxl = gb.matmul(a)?;
            if let Some(m) = mask {
                dxl = dxl.mul(m)?;
            }
            Some(fused::add_untracked(
                &gy.matmul(w)?,
                &dxl.to_dtype(gy.dtype())?,
            )?)
        }
    };
    Ok(LoraGrads { dx, da, db })
}
