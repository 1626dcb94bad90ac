//! Attention of a few new query rows against a KV cache on the CPU (decoding: one row per step), read in place.
//!
//! The general path ([`crate::engine::layer`]'s `Kernels::attention`) is two batched candle matmuls around a
//! softmax: for one query row each head's product is a (1 × hd)·(hd × s) GEMM call, and the scores, their scaled
//! and masked copies and the probabilities are a tensor each. Here each (batch row, head) item computes its scores,
//! softmax and weighted sum of V directly from the cache's buffer (K and V as the cache's views: each position's
//! `hd` values contiguous, positions and heads strided), one pass per item, the items on candle's thread pool
//! when there is enough work to share.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

type R<T> = candle_core::Result<T>;

/// Query rows up to which [`attention`] is used (a decode step has 1; a prompt runs the matmuls).
pub const MAX_ROWS: usize = 8;

/// Work (query rows × positions × head size × heads) from which the items run on the thread pool.
const PARALLEL_WORK: usize = 1 << 15;

/// Whether [`attention`] takes these operands: f32 on the CPU, at most [`MAX_ROWS`] query rows, and K and V
/// with each position's values contiguous (the last dimension's stride 1, as a KV cache's views are).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let f32_cpu = |z: &Tensor| z.device().is_cpu() && z.dtype() == candle_core::DType::F32;
    let inner_contiguous = |z: &Tensor| z.rank() == 4 && z.stride()[3] == 1;
    f32_cpu(q)
        && f32_cpu(k)
        && f32_cpu(v)
        && q.rank() == 4
        && q.dim(2).is_ok_and(|t| t <= MAX_ROWS)
        && inner_contiguous(k)
        && inner_contiguous(v)
}

/// `softmax(scale·q·kᵀ + bias)·v` with GQA (query head h uses kv head h / (nh / nkv)): q (b, nh, t, hd), k and v
/// (b, nkv, s, hd) read in place, bias (bb, 1, t, s) with bb ∈ {1, b} or none. Only for operands [`applies`]
/// accepts; no backward (inference).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> R<Tensor> {
    let bias = match bias {
        Some(b) => {
            let (bb, _, _, _) = b.dims4()?;
            Some((b.flatten_all()?.to_vec1::<f32>()?, bb))
        }
        None => None,
    };
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &CachedAttention {
            bias,
            scale: scale as f32,
        },
    )
}

struct CachedAttention {
    /// The bias's values (bb, 1, t, s) and bb.
    bias: Option<(Vec<f32>, usize)>,
    scale: f32,
}

/// A 4-d operand's f32 values with its start and strides.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 4],
}

impl<'a> View<'a> {
    fn of(s: &'a CpuStorage, l: &Layout, what: &str) -> R<Self> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("cached-attention: {what} is not f32")
        };
        let stride: [usize; 4] = l
            .stride()
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("cached-attention: {what} is not 4-d")))?;
        if stride[3] != 1 {
            candle_core::bail!("cached-attention: {what}'s last dimension is strided");
        }
        // The last element read must be in the buffer (every index below is at most this one).
        let dims = l.dims();
        let last = l.start_offset()
            + (0..4)
                .map(|i| dims[i].saturating_sub(1) * stride[i])
                .sum::<usize>();
        if !dims.contains(&0) && last >= data.len() {
            candle_core::bail!("cached-attention: {what}'s layout exceeds its buffer");
        }
        Ok(Self {
            data,
            start: l.start_offset(),
            stride,
        })
    }

    /// The `len` contiguous values at (i0, i1, i2, 0).
    fn row(&self, i0: usize, i1: usize, i2: usize, len: usize) -> &'a [f32] {
        let at = self.start + i0 * self.stride[0] + i1 * self.stride[1] + i2 * self.stride[2];
        &self.data[at..at + len]
    }
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached-attention"
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
        let (b, nh, t, hd) = l1.shape().dims4()?;
        let (bk, nkv, s, hdk) = l2.shape().dims4()?;
        if l3.shape().dims4()? != (bk, nkv, s, hdk) || bk != b || hdk != hd {
            candle_core::bail!(
                "cached-attention: q {:?}, k {:?}, v {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        if nkv == 0 || nh % nkv != 0 {
            candle_core::bail!("cached-attention: {nh} query heads vs {nkv} kv heads")
        }
        let (q, k, v) = (
            View::of(s1, l1, "q")?,
            View::of(s2, l2, "k")?,
            View::of(s3, l3, "v")?,
        );
        if let Some((bias, bb)) = &self.bias
            && (bias.len() != bb * t * s || (*bb != 1 && *bb != b))
        {
            candle_core::bail!(
                "cached-attention: bias of {} values for ({b}, 1, {t}, {s})",
                bias.len()
            )
        }
        let n_rep = nh / nkv;
        let mut out = vec![0f32; b * nh * t * hd];
        let item = |i: usize, o: &mut [f32]| {
            let (bi, h) = (i / nh, i % nh);
            let bias = self.bias.as_ref().map(|(bias, bb)| {
                let row0 = if *bb == 1 { 0 } else { bi };
                &bias[row0 * t * s..(row0 + 1) * t * s]
            });
            let head = Head {
                k: |p: usize| k.row(bi, h / n_rep, p, hd),
                v: |p: usize| v.row(bi, h / n_rep, p, hd),
                s,
                scale: self.scale,
            };
            for (ti, o) in o.chunks_exact_mut(hd).enumerate() {
                head.row(
                    q.row(bi, h, ti, hd),
                    bias.map(|b| &b[ti * s..(ti + 1) * s]),
                    o,
                );
            }
        };
        let items = b * nh;
        if items > 1 && t * s * hd * nh >= PARALLEL_WORK {
            let chunks: Vec<Mutex<&mut [f32]>> =
                out.chunks_exact_mut(t * hd).map(Mutex::new).collect();
            candle_core::utils::barrier_pool().execute_chunked(items, |range| {
                for i in range {
                    let mut o = chunks[i].lock().unwrap_or_else(PoisonError::into_inner);
                    item(i, &mut o);
                }
            });
        } else {
            for (i, o) in out.chunks_exact_mut(t * hd).enumerate() {
                item(i, o);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, nh, t, hd))))
    }
}

/// One (batch row, head): its positions' keys and values.
struct Head<K, V> {
    k: K,
    v: V,
    s: usize,
    scale: f32,
}

impl<'a, K: Fn(usize) -> &'a [f32], V: Fn(usize) -> &'a [f32]> Head<K, V> {
    /// One query row: scores `scale·q·k + bias`, their softmax (`fused::softmax_row`, the training path's), then
    /// `o = Σ p·v`.
    fn row(&self, q: &[f32], bias: Option<&[f32]>, o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            return x86::row(self, q, bias, o);
        }
        self.row_with(q, bias, o, dot, |c, x, o| {
            for (o, x) in o.iter_mut().zip(x) {
                *o += c * x;
            }
        });
    }

    /// [`Self::row`] with `dot(a, b) = Σ a·b` and `axpy(c, x, o)`: `o += c·x`.
    #[inline(always)]
    fn row_with(
        &self,
        q: &[f32],
        bias: Option<&[f32]>,
        o: &mut [f32],
        dot: impl Fn(&[f32], &[f32]) -> f32,
        axpy: impl Fn(f32, &[f32], &mut [f32]),
    ) {
        let mut p: Vec<f32> = (0..self.s)
            .map(|pos| dot(q, (self.k)(pos)) * self.scale + bias.map_or(0.0, |b| b[pos]))
            .collect();
        super::fused::softmax_row(&mut p);
        o.fill(0.0);
        for (pos, &pv) in p.iter().enumerate() {
            if pv != 0.0 {
                axpy(pv, (self.v)(pos), o);
            }
        }
    }
}

/// `Σ a·b` in 8 lanes, then the lanes' sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.as_chunks::<8>();
    let (b8, b_rest) = b.as_chunks::<8>();
    for (x, y) in a8.iter().zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a_rest.iter().zip(b_rest) {
        sum += x * y;
    }
    sum
}

// `Head::row` compiled for AVX2 and FMA (`mul_add` one instruction, 8 lanes a vector).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::Head;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *YES.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }

    pub fn row<'a, K: Fn(usize) -> &'a [f32], V: Fn(usize) -> &'a [f32]>(
        head: &Head<K, V>,
        q: &[f32],
        bias: Option<&[f32]>,
        o: &mut [f32],
    ) {
        // SAFETY: the CPU has AVX2 and FMA (`available`, checked by the caller).
        unsafe { row_avx2(head, q, bias, o) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn row_avx2<'a, K: Fn(usize) -> &'a [f32], V: Fn(usize) -> &'a [f32]>(
        head: &Head<K, V>,
        q: &[f32],
        bias: Option<&[f32]>,
        o: &mut [f32],
    ) {
        head.row_with(q, bias, o, |a, b| dot(a, b), |c, x, o| axpy(c, x, o));
    }

    /// 8 values at `v[i..]` (the slice's bounds checked).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(v: &[f32], i: usize) -> __m256 {
        let v = &v[i..i + 8];
        // SAFETY: 8 readable f32 (the slice above).
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// `Σ a·b`: four independent chains of 8 lanes (a head of 64 values is two steps, not eight dependent FMAs),
    /// then the lanes' sum.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(load(a, i + 8 * c), load(b, i + 8 * c), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load(a, i), load(b, i), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        for j in i..n {
            sum = a[j].mul_add(b[j], sum);
        }
        sum
    }

    /// `o += c·x`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn axpy(c: f32, x: &[f32], o: &mut [f32]) {
        let n = x.len().min(o.len());
        let cv = _mm256_set1_ps(c);
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(cv, load(x, i), load(o, i));
            let out = &mut o[i..i + 8];
            // SAFETY: 8 writable f32 (the slice above).
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), r) };
            i += 8;
        }
        for j in i..n {
            o[j] = c.mul_add(x[j], o[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{DType, Device, IndexOp};

    /// K and V as a KV cache holds them: views of the first `s` of `room` positions (heads `room` rows apart).
    fn cache_view(b: usize, nkv: usize, s: usize, room: usize, hd: usize) -> Tensor {
        let full = Tensor::randn(0f32, 1.0, (b, nkv, room, hd), &Device::Cpu).unwrap();
        full.narrow(2, 0, s).unwrap()
    }

    /// Against `generic::attention` (candle's matmuls and softmax) in f64 on the same values: every shape of
    /// decode and short rows, GQA, K/V strided views, a padding mask with −∞ per batch row, and none; through
    /// both the one-thread and the pool path, with and without AVX2 where the CPU has it.
    #[test]
    fn equals_the_matmul_attention() {
        let dev = Device::Cpu;
        let cases = [
            // (b, nh, nkv, t, s, hd)
            (1, 4, 4, 1, 1, 8),
            (1, 4, 2, 1, 37, 16),
            (2, 6, 2, 3, 20, 12),
            (1, 16, 16, 1, 300, 64),
            (2, 8, 2, 8, 129, 64),
            (1, 3, 1, 2, 5, 70),
        ];
        for (b, nh, nkv, t, s, hd) in cases {
            let q = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev).unwrap();
            let (k, v) = (
                cache_view(b, nkv, s, s + 17, hd),
                cache_view(b, nkv, s, s + 17, hd),
            );
            assert_eq!(k.stride()[1], (s + 17) * hd);
            assert!(applies(&q, &k, &v));
            // Left padding: row r masks its first r positions except where the query sits on them; causal.
            let mut mask = vec![0f32; b * t * s];
            for r in 0..b {
                for i in 0..t {
                    let qpos = s - t + i;
                    for j in 0..s {
                        if j > qpos || (j < r && j != qpos) {
                            mask[(r * t + i) * s + j] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (b, 1, t, s), &dev).unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            for bias in [None, Some(&mask)] {
                let got = attention(&q, &k, &v, bias, scale).unwrap();
                assert_eq!(got.dims4().unwrap(), (b, nh, t, hd));
                let f64_of = |z: &Tensor| z.to_dtype(DType::F64).unwrap();
                let zeros = Tensor::zeros((1, 1, t, s), DType::F64, &dev).unwrap();
                let bias64 = bias.map_or(zeros, f64_of);
                let want = super::super::generic::attention(
                    &f64_of(&q),
                    &f64_of(&k.contiguous().unwrap()),
                    &f64_of(&v.contiguous().unwrap()),
                    &bias64,
                    scale,
                )
                .unwrap();
                let diff = crate::engine::testing::max_abs_diff(&got, &want).unwrap();
                assert!(diff < 1e-5, "{:?}: max |Δ| {diff}", (b, nh, nkv, t, s, hd));
            }
        }
    }

    /// The scalar loops (CPUs without AVX2) give what the AVX2 ones give.
    #[test]
    fn scalar_and_simd_rows_agree() {
        let dev = Device::Cpu;
        let (s, hd) = (45, 67);
        let k = Tensor::randn(0f32, 1.0, (s, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (s, hd), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, hd, &dev)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rows = |z: &Tensor| {
            (0..s)
                .map(|p| z.i(p).unwrap().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        let (kr, vr) = (rows(&k), rows(&v));
        let head = Head {
            k: |p: usize| kr[p].as_slice(),
            v: |p: usize| vr[p].as_slice(),
            s,
            scale: 0.125,
        };
        let bias: Vec<f32> = (0..s)
            .map(|p| {
                if p % 7 == 3 {
                    f32::NEG_INFINITY
                } else {
                    0.01 * p as f32
                }
            })
            .collect();
        let mut fast = vec![0f32; hd];
        head.row(&q, Some(&bias), &mut fast);
        let mut scalar = vec![0f32; hd];
        head.row_with(&q, Some(&bias), &mut scalar, dot, |c, x, o| {
            for (o, x) in o.iter_mut().zip(x) {
                *o += c * x;
            }
        });
        for (a, b) in fast.iter().zip(&scalar) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(fast.iter().any(|&x| x != 0.0));
    }
}
