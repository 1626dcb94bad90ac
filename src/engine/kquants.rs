//! `x · Wᵀ` on the CPU for a GGML K-quant weight (`Q4_K`, `Q5_K`, `Q6_K`: what a q4_k_m, q5_k_m or q6_k file
//! holds for every tensor whose rows are a multiple of 256 wide: Llama, Mistral, Qwen2.5 from 1.5B on), the way
//! llama.cpp computes it: the activations are rounded to `Q8_K` blocks (256 int8, an f32 scale and the sums of
//! each 16 values, llama.cpp's `quantize_row_q8_K_ref`: scale −127/max, round half to even), and each 256-wide
//! block of the dot product is an exact integer sum over its sub-blocks, each weighted by its 6-bit (Q4_K, Q5_K)
//! or 8-bit (Q6_K) scale, times the two blocks' scales; Q4_K and Q5_K take off their minima with the activations'
//! sums, Q6_K its offset of 32 the same way.
//!
//! candle 0.11 has AVX2 dot products for these types, but multiplies on rayon's pool with a row-at-a-time driver:
//! a q4_k_m file of a 230M-parameter llama shape (1024 wide, 2816 intermediate) decoded at 0.57× llama.cpp's
//! tokens/s and, with a 94-token prompt multiplied by dequantized weights, prefilled at 0.24× (2-core AVX-512
//! CPU, `scripts/bench_decode.py`). Here the products run on the same pool and driver as [`legacy_quants`]'s
//! ([`legacy_quants::for_each_column_group`]), one weight row against 1 (decode) to 8 rows of x at a time (a prompt), so a
//! weight block is unpacked once for all of them; with AVX-512 (BW, VNNI) 64 values per instruction. The same file
//! then decoded at 0.94–1.07× llama.cpp's tokens/s and prefilled at 0.73–0.85× (llama.cpp repacks Q4_K for its
//! prompt GEMM); q5_k_m 1.35× and 0.65×, q6_k 1.11–1.20× and 0.75–0.78× (0.96×/0.16× and 1.04×/0.26× before); with
//! decode attention reading the KV cache in place (`ops::cached_attention`) 1.03–1.13× (README has the current
//! figures). The
//! decode kernel for a 2816 × 1024 Q4_K weight in cache: 81.6 µs with the 256-bit kernel, 70.5 with 512-bit
//! vectors, 47.1 once the scales' unpacking was inlined (a call per block spilled the accumulators).
//!
//! [`legacy_quants`]: super::legacy_quants

use half::f16;

use super::legacy_quants::{self, Kernel};

/// Values per block (weights and activations).
pub const QK_K: usize = 256;
/// Bytes of one `Q4_K` block: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and minima for its 8 sub-blocks of
/// 32, then 128 bytes of nibbles (per 64 values: 32 bytes, the first 32 values in the low nibbles, the next 32 in
/// the high ones). A weight is `d·sc·q − dmin·m`.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of one `Q5_K` block: Q4_K's header, 32 bytes of fifth bits (value 64c + l in bit 2c of byte l, value
/// 64c + 32 + l in bit 2c + 1), then Q4_K's nibbles.
pub const Q5_K_BYTES: usize = 176;
/// Bytes of one `Q6_K` block: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per 16
/// values), f16 `d`. A weight is `d·sc·(q − 32)`.
pub const Q6_K_BYTES: usize = 210;

/// The K-quant block types multiplied here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    /// The format of a GGML block type these kernels multiply (`None`: another module's).
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => Q4_K_BYTES,
            Self::Q5K => Q5_K_BYTES,
            Self::Q6K => Q6_K_BYTES,
        }
    }
}

/// One block of activations rounded to 8 bits: `x ≈ d·q`, the sums of each 16 q (Q6_K's sub-blocks) and of each
/// 32 (Q4_K's and Q5_K's, for their minima). 308 bytes.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8K {
    d: f32,
    qs: [i8; QK_K],
    bsums: [i16; QK_K / 16],
    sums32: [i16; QK_K / 32],
}

const ZERO: BlockQ8K = BlockQ8K {
    d: 0.0,
    qs: [0; QK_K],
    bsums: [0; QK_K / 16],
    sums32: [0; QK_K / 32],
};

/// Rounds one row of activations (length a multiple of [`QK_K`]) to `Q8_K` blocks, as llama.cpp's
/// `quantize_row_q8_K_ref`: the value of largest magnitude maps to −127 (its sign flipped), the others round half
/// to even.
#[allow(unsafe_code)]
pub fn quantize_row_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { x86::quantize_row_q8k_avx2(x, out) };
        return;
    }
    quantize_row_q8k_impl(x, out);
}

/// The body of [`quantize_row_q8k`], compiled once plainly and once with AVX2 (`round_ties_even` in one
/// instruction).
#[inline(always)]
fn quantize_row_q8k_impl(x: &[f32], out: &mut [BlockQ8K]) {
    for (xs, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *y = ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(xs) {
            *q = (iscale * v).round_ties_even().min(127.0) as i8;
        }
        for (s, q) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = q.iter().map(|&q| i16::from(q)).sum();
        }
        for (s, b) in y.sums32.iter_mut().zip(y.bsums.chunks_exact(2)) {
            *s = b[0] + b[1];
        }
        y.d = 1.0 / iscale;
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 8 sub-blocks' 6-bit scales and minima of a Q4_K / Q5_K block from its 12 packed bytes.
#[inline(always)]
fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    // Bytes 0..3: the low 6 bits of scales 0..3; 4..7: of minima 0..3; 8..11: the low 4 bits of scale 4 + j and
    // (high nibble) of minimum 4 + j, whose top 2 bits are the top bits of bytes j and 4 + j. A word at a time.
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let sc_hi = (c & low4) | (((a >> 6) & top2) << 4);
    let mn_hi = ((c >> 4) & low4) | (((b >> 6) & top2) << 4);
    let join = |lo: u32, hi: u32| (u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes();
    (join(a & low6, sc_hi), join(b & low6, mn_hi))
}

/// One dot product of a K-quant row with a row of rounded activations, the scalar formula.
fn dot_scalar(format: Format, w: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(format.block_bytes()).zip(y) {
        let q = |i: usize| i32::from(y.qs[i]);
        match format {
            Format::Q4K | Format::Q5K => {
                let (sc, mn) = scales_mins(&b[4..16]);
                let (qh, qs) = match format {
                    Format::Q5K => (&b[16..48], &b[48..]),
                    _ => (&[][..], &b[16..]),
                };
                let mut si = 0i32;
                for c in 0..4 {
                    let (mut lo, mut hi) = (0i32, 0i32);
                    for l in 0..32 {
                        let (mut a, mut h) = (
                            i32::from(qs[32 * c + l] & 15),
                            i32::from(qs[32 * c + l] >> 4),
                        );
                        if let Some(&bits) = qh.get(l) {
                            a |= i32::from((bits >> (2 * c)) & 1) << 4;
                            h |= i32::from((bits >> (2 * c + 1)) & 1) << 4;
                        }
                        lo += a * q(64 * c + l);
                        hi += h * q(64 * c + 32 + l);
                    }
                    si += i32::from(sc[2 * c]) * lo + i32::from(sc[2 * c + 1]) * hi;
                }
                let mins: i32 = (0..8)
                    .map(|j| {
                        i32::from(mn[j])
                            * (i32::from(y.bsums[2 * j]) + i32::from(y.bsums[2 * j + 1]))
                    })
                    .sum();
                sum += f16_at(b, 0) * y.d * si as f32 - f16_at(b, 2) * y.d * mins as f32;
            }
            Format::Q6K => {
                let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
                let mut si = 0i32;
                for h in 0..2 {
                    for g in 0..4 {
                        // Values 128h + 32g + l: ql's low (g even) or high (g odd) nibbles of bytes 64h + 32·(g % 2) + l,
                        // qh's bits 2g, 2g + 1 of byte 32h + l.
                        let mut sub = [0i32; 2];
                        for l in 0..32 {
                            let byte = ql[64 * h + 32 * (g % 2) + l];
                            let low = if g < 2 { byte & 15 } else { byte >> 4 };
                            let v = i32::from(low | (((qh[32 * h + l] >> (2 * g)) & 3) << 4)) - 32;
                            sub[l / 16] += v * q(128 * h + 32 * g + l);
                        }
                        let s = 8 * h + 2 * g;
                        si += i32::from(sc[s].cast_signed()) * sub[0]
                            + i32::from(sc[s + 1].cast_signed()) * sub[1];
                    }
                }
                sum += f16_at(b, 208) * y.d * si as f32;
            }
        }
    }
    sum
}

// The SIMD kernels: intrinsics need `unsafe` (unaligned loads from slices whose length is checked, and calls into
// `target_feature` functions only after `Kernel::detect` saw those features).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::super::legacy_quants::x86::hsum8_epi32;
    use super::{BlockQ8K, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, QK_K, Rows};
    use std::arch::x86_64::*;

    /// [`super::quantize_row_q8k`] with AVX2, 8 values per instruction: the block's largest and smallest value
    /// by vector max and min; the products rounded half to even by the conversion (the default rounding mode, as
    /// `round_ties_even`), capped at 127 and packed to bytes; the sums of each 16 by one tree of horizontal adds
    /// per 8 sums. Bit for bit the scalar rounding (`tests::q8k_rounding_is_llama_cpp_s`), ~5× faster.
    #[target_feature(enable = "avx2,fma")]
    pub fn quantize_row_q8k_avx2(x: &[f32], out: &mut [BlockQ8K]) {
        for (xs, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            assert!(xs.len() == QK_K);
            // SAFETY: i < 32, so 8 floats from 8·i are within the block's 256 (asserted).
            let load = |i: usize| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) };
            let (mut hi, mut lo) = (load(0), load(0));
            for i in 1..QK_K / 8 {
                hi = _mm256_max_ps(hi, load(i));
                lo = _mm256_min_ps(lo, load(i));
            }
            let mut h = [0f32; 8];
            let mut l = [0f32; 8];
            // SAFETY: 8 f32 each.
            unsafe {
                _mm256_storeu_ps(h.as_mut_ptr(), hi);
                _mm256_storeu_ps(l.as_mut_ptr(), lo);
            }
            let max = h.iter().fold(f32::MIN, |a, &v| a.max(v));
            let min = l.iter().fold(f32::MAX, |a, &v| a.min(v));
            let amax = max.max(-min);
            if amax == 0.0 {
                *y = super::ZERO;
                continue;
            }
            // The value of largest magnitude; when both signs reach it, the first (llama.cpp scans in order).
            let signed = if max > -min {
                max
            } else if -min > max {
                min
            } else {
                xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(max)
            };
            let iscale = -127.0 / signed;
            let m = _mm256_set1_ps(iscale);
            let cap = _mm256_set1_epi32(127);
            let q: [__m256i; QK_K / 8] = std::array::from_fn(|i| {
                _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(load(i), m)), cap)
            });
            // Packing interleaves 128-bit halves: 4-byte groups 0, 2, 4, 6, 1, 3, 5, 7; the permute restores them.
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for g in 0..QK_K / 32 {
                let a = _mm256_packs_epi32(q[4 * g], q[4 * g + 1]);
                let b = _mm256_packs_epi32(q[4 * g + 2], q[4 * g + 3]);
                let p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
                // SAFETY: bytes 32g..32g + 32 of the 256.
                unsafe { _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * g).cast(), p) };
            }
            let s: [__m256i; 16] =
                std::array::from_fn(|j| _mm256_add_epi32(q[2 * j], q[2 * j + 1]));
            let first = hsum8_epi32([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
            let last = hsum8_epi32([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
            // i16 lanes: first 0..3, last 0..3, first 4..7, last 4..7; 64-bit groups 0, 2, 1, 3 put them in order.
            let sums = _mm256_permute4x64_epi64(_mm256_packs_epi32(first, last), 0b11_01_10_00);
            // SAFETY: `bsums` is 32 bytes.
            unsafe { _mm256_storeu_si256(y.bsums.as_mut_ptr().cast(), sums) };
            for (s, b) in y.sums32.iter_mut().zip(y.bsums.chunks_exact(2)) {
                *s = b[0] + b[1];
            }
            y.d = 1.0 / iscale;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn f16_at(b: &[u8], at: usize) -> f32 {
        let h = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
    }

    /// 32 bytes from `b` (its length checked).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load32(b: &[u8]) -> __m256i {
        assert!(b.len() >= 32);
        // SAFETY: 32 readable bytes (checked above).
        unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
    }

    /// 32 activations from `q` (its length checked).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load32_i8(q: &[i8]) -> __m256i {
        assert!(q.len() >= 32);
        // SAFETY: 32 readable bytes (checked above).
        unsafe { _mm256_loadu_si256(q.as_ptr().cast()) }
    }

    /// Checks that a weight row is whole `bytes`-byte blocks and each row of x as many blocks.
    fn check_rows<const RN: usize>(w: &[u8], bytes: usize, y: &[&[BlockQ8K]; RN]) {
        let kb = w.len() / bytes;
        assert!(w.len() == kb * bytes && y.iter().all(|yj| yj.len() == kb));
    }

    /// A Q4_K / Q5_K block's header: `d` and `dmin` (one f16 conversion for both), the 8 scales and minima.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn q4k_header(b: &[u8]) -> (f32, f32, [u8; 8], [u8; 8]) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            b[0], b[1], b[2], b[3],
        ])));
        let (sc, mn) = super::scales_mins(&b[4..16]);
        (
            _mm_cvtss_f32(dm),
            _mm_cvtss_f32(_mm_movehdup_ps(dm)),
            sc,
            mn,
        )
    }

    /// The 16 sums of a Q8_K block as 16 i16.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn bsums(y: &BlockQ8K) -> __m256i {
        // SAFETY: `bsums` is 32 bytes.
        unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) }
    }

    /// The 8 lanes' sum.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// One Q4_K (`FIFTH` false) or Q5_K row against `RN` rows of Q8_K activations. Per block: the scales and
    /// minima decoded once; per 64 values, the 32 bytes of nibbles (and the fifth bits) unpacked once into the low
    /// and the high 32 unsigned q; per row of x, unsigned q × signed q' summed in pairs to 16 i16 (`maddubs`: at
    /// most 2·31·127, no saturation), times the sub-block's scale and summed in pairs to 8 i32 (`madd`), all
    /// sub-blocks into one integer vector; at the block's end `d·d'` times it into 8 f32 lanes, and the minima's
    /// integer sum `Σ m·Σq'` (the activations' sums of each 32, one `madd`) times `dmin·d'` into 4 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn tile_q4k_avx2<const FIFTH: bool, const RN: usize>(
        w: &[u8],
        x: &Rows<'_, RN>,
    ) -> [f32; RN] {
        let y = &x.y;
        let bytes = if FIFTH { Q5_K_BYTES } else { Q4_K_BYTES };
        check_rows(w, bytes, y);
        let m4 = _mm256_set1_epi8(0x0f);
        let one = _mm256_set1_epi8(1);
        let mut acc = [_mm256_setzero_ps(); RN];
        let mut mins = [_mm_setzero_ps(); RN];
        for (i, b) in w.chunks_exact(bytes).enumerate() {
            let (d, dmin, sc, mn) = q4k_header(b);
            let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(u64::from_le_bytes(mn).cast_signed()));
            let (qh, qs) = if FIFTH {
                (&b[16..48], &b[48..])
            } else {
                (&b[..0], &b[16..])
            };
            let hbits = if FIFTH {
                load32(qh)
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = [_mm256_setzero_si256(); RN];
            for c in 0..4 {
                let bits = load32(&qs[32 * c..]);
                let mut lo = _mm256_and_si256(bits, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                if FIFTH {
                    // Bit 2c of each byte to bit 4 of the low q, bit 2c + 1 to the high q's.
                    let shift = _mm_cvtsi32_si128(2 * c as i32);
                    let h = _mm256_srl_epi16(hbits, shift);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h, one), 4));
                    hi = _mm256_or_si256(
                        hi,
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 1), one), 4),
                    );
                }
                let sl = _mm256_set1_epi16(i16::from(sc[2 * c]));
                let sh = _mm256_set1_epi16(i16::from(sc[2 * c + 1]));
                for j in 0..RN {
                    let yq = &y[j][i].qs;
                    let pl = _mm256_maddubs_epi16(lo, load32_i8(&yq[64 * c..]));
                    let ph = _mm256_maddubs_epi16(hi, load32_i8(&yq[64 * c + 32..]));
                    let p = _mm256_add_epi32(_mm256_madd_epi16(pl, sl), _mm256_madd_epi16(ph, sh));
                    sumi[j] = _mm256_add_epi32(sumi[j], p);
                }
            }
            for j in 0..RN {
                let yb = &y[j][i];
                // Σ m·Σq' over the 8 sub-blocks, in 4 lanes.
                // SAFETY: `sums32` is 16 bytes.
                let s32 = unsafe { _mm_loadu_si128(yb.sums32.as_ptr().cast()) };
                let pm = _mm_cvtepi32_ps(_mm_madd_epi16(mn16, s32));
                mins[j] = _mm_fmadd_ps(_mm_set1_ps(dmin * yb.d), pm, mins[j]);
                let dd = _mm256_set1_ps(d * yb.d);
                acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi[j]), acc[j]);
            }
        }
        let mut out = [0f32; RN];
        for j in 0..RN {
            let m = _mm_add_ps(mins[j], _mm_movehl_ps(mins[j], mins[j]));
            let m = _mm_add_ss(m, _mm_movehdup_ps(m));
            out[j] = hsum(acc[j]) - _mm_cvtss_f32(m);
        }
        out
    }

    /// One Q6_K row against `RN` rows of Q8_K activations. Per 32 values, the 6-bit unsigned q (0..63, the low
    /// nibble or'ed with its 2 high bits) unpacked once; per row of x, q × q' summed in pairs (`maddubs`: at most
    /// 2·63·127), times the two 16-value sub-blocks' scales (low and high 128-bit halves) and summed to 8 i32. The
    /// offset of 32 comes off per block as 32·Σ sc·bsum (one `madd` of the 16 scales with the 16 sums).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn tile_q6k_avx2<const RN: usize>(w: &[u8], x: &Rows<'_, RN>) -> [f32; RN] {
        let y = &x.y;
        check_rows(w, Q6_K_BYTES, y);
        let m4 = _mm256_set1_epi8(0x0f);
        let m2 = _mm256_set1_epi8(0x03);
        let mut acc = [_mm256_setzero_ps(); RN];
        for (i, b) in w.chunks_exact(Q6_K_BYTES).enumerate() {
            let d = f16_at(b, 208);
            let sc = &b[192..208];
            // SAFETY: 16 readable bytes (a block's scales).
            let sc16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sc.as_ptr().cast()) });
            let mut sumi = [_mm256_setzero_si256(); RN];
            for h in 0..2 {
                let ql0 = load32(&b[64 * h..]);
                let ql1 = load32(&b[64 * h + 32..]);
                let qh = load32(&b[128 + 32 * h..]);
                let high = |s: i32| {
                    let bits = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)), m2);
                    _mm256_slli_epi16(bits, 4)
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), high(0)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), high(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), high(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), high(6)),
                ];
                for (g, q) in q.iter().enumerate() {
                    let s = 8 * h + 2 * g;
                    let scale = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(sc[s + 1].cast_signed())),
                        _mm_set1_epi16(i16::from(sc[s].cast_signed())),
                    );
                    for j in 0..RN {
                        let yq = load32_i8(&y[j][i].qs[128 * h + 32 * g..]);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(*q, yq), scale);
                        sumi[j] = _mm256_add_epi32(sumi[j], p);
                    }
                }
            }
            for j in 0..RN {
                let yb = &y[j][i];
                let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsums(yb)), 5);
                let s = _mm256_sub_epi32(sumi[j], offset);
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * yb.d), _mm256_cvtepi32_ps(s), acc[j]);
            }
        }
        let mut out = [0f32; RN];
        for j in 0..RN {
            out[j] = hsum(acc[j]);
        }
        out
    }

    /// [`tile_q4k_avx2`] with AVX-512 (BW, VNNI): a chunk's 64 values in one register, the 32 bytes of nibbles
    /// broadcast to both halves and shifted by 0 (low half) or 4 (high half) per 16-bit lane, then masked; the two
    /// sub-blocks' scales picked into the halves with one permute; per row of x, `maddubs` over 64 bytes and one
    /// `vpdpwssd` (the scale's multiply-add). Half the instructions of the 256-bit kernel per block.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn tile_q4k_vnni<const FIFTH: bool, const RN: usize>(
        w: &[u8],
        x: &Rows<'_, RN>,
    ) -> [f32; RN] {
        let y = &x.y;
        let bytes = if FIFTH { Q5_K_BYTES } else { Q4_K_BYTES };
        check_rows(w, bytes, y);
        let m4 = _mm512_set1_epi8(0x0f);
        let one = _mm512_set1_epi8(1);
        // Per 16-bit lane: 0 in the low half (lanes 0..15), 1 in the high half.
        let halves = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(1), 1);
        let nibble_shift = _mm512_slli_epi16(halves, 2);
        // The minima's term goes into the same accumulators (lanes 0..3), negated: 8 fewer registers.
        let mut acc = [_mm512_setzero_ps(); RN];
        // 8 rows: the 8 rows' sums in one vector each (row j in lane j).
        let (mut acc8, mut mins8) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        assert!(RN != 8 || w.len() < bytes || x.d.len() >= (w.len() / bytes - 1) * x.stride + 8);
        for (i, b) in w.chunks_exact(bytes).enumerate() {
            let (d, dmin, sc, mn) = q4k_header(b);
            let sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(
                u64::from_le_bytes(sc).cast_signed(),
            )));
            let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(u64::from_le_bytes(mn).cast_signed()));
            let (qh, qs) = if FIFTH {
                (&b[16..48], &b[48..])
            } else {
                (&b[..0], &b[16..])
            };
            let hbits = if FIFTH {
                _mm512_broadcast_i64x4(load32(qh))
            } else {
                _mm512_setzero_si512()
            };
            let mut sumi = [_mm512_setzero_si512(); RN];
            // Sub-block 2c in the low half, 2c + 1 in the high half: the scales' index and the fifth bits' shift.
            let mut sub = halves;
            for c in 0..4 {
                let bits = _mm512_broadcast_i64x4(load32(&qs[32 * c..]));
                let mut q = _mm512_and_si512(_mm512_srlv_epi16(bits, nibble_shift), m4);
                if FIFTH {
                    let h = _mm512_and_si512(_mm512_srlv_epi16(hbits, sub), one);
                    q = _mm512_or_si512(q, _mm512_slli_epi16(h, 4));
                }
                let scale = _mm512_permutexvar_epi16(sub, sc);
                for j in 0..RN {
                    let yq = &y[j][i].qs[64 * c..64 * c + 64];
                    // SAFETY: 64 readable bytes (the slice above).
                    let yq = unsafe { _mm512_loadu_si512(yq.as_ptr().cast()) };
                    sumi[j] = _mm512_dpwssd_epi32(sumi[j], _mm512_maddubs_epi16(q, yq), scale);
                }
                sub = _mm512_add_epi16(sub, _mm512_set1_epi16(2));
            }
            if RN == 8 {
                // Each row's block to one integer, the 8 rows side by side, scaled by d·d' (d' of the 8 rows in
                // one vector) in one FMA; the minima's integer sums so too: the float work of 8 rows in 4
                // instructions instead of a conversion, two FMAs and two broadcasts per row.
                let mut halves = [_mm256_setzero_si256(); 8];
                let mut pm = [_mm_setzero_si128(); 8];
                for j in 0..RN {
                    halves[j % 8] = _mm256_add_epi32(
                        _mm512_castsi512_si256(sumi[j]),
                        _mm512_extracti64x4_epi64(sumi[j], 1),
                    );
                    // SAFETY: `sums32` is 16 bytes.
                    let s32 = unsafe { _mm_loadu_si128(y[j][i].sums32.as_ptr().cast()) };
                    pm[j % 8] = _mm_madd_epi16(mn16, s32);
                }
                let sums = hsum8_epi32(halves);
                let four = |p: &[__m128i]| {
                    _mm_hadd_epi32(_mm_hadd_epi32(p[0], p[1]), _mm_hadd_epi32(p[2], p[3]))
                };
                let mins = _mm256_set_m128i(four(&pm[4..]), four(&pm[..4]));
                // SAFETY: 8 readable f32 from i·stride (asserted).
                let dy = unsafe { _mm256_loadu_ps(x.d.as_ptr().add(i * x.stride)) };
                let dd = _mm256_mul_ps(_mm256_set1_ps(d), dy);
                acc8 = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sums), acc8);
                let dm = _mm256_mul_ps(_mm256_set1_ps(dmin), dy);
                mins8 = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(mins), mins8);
                continue;
            }
            for j in 0..RN {
                let yb = &y[j][i];
                // SAFETY: `sums32` is 16 bytes.
                let s32 = unsafe { _mm_loadu_si128(yb.sums32.as_ptr().cast()) };
                let pm = _mm512_zextps128_ps512(_mm_cvtepi32_ps(_mm_madd_epi16(mn16, s32)));
                acc[j] = _mm512_fnmadd_ps(_mm512_set1_ps(dmin * yb.d), pm, acc[j]);
                let dd = _mm512_set1_ps(d * yb.d);
                acc[j] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi[j]), acc[j]);
            }
        }
        let mut out = [0f32; RN];
        if RN == 8 {
            let mut v = [0f32; 8];
            // SAFETY: 8 f32.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), _mm256_sub_ps(acc8, mins8)) };
            out.copy_from_slice(&v[..RN]);
            return out;
        }
        for j in 0..RN {
            out[j] = _mm512_reduce_add_ps(acc[j]);
        }
        out
    }

    /// The 16-bit lanes' sub-block within 64 values of Q6_K: lane i holds values 2i and 2i + 1, of sub-block i / 8.
    const Q6K_SUB: [i16; 32] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    ];

    /// [`tile_q6k_avx2`] with AVX-512 (BW, VNNI): 64 values (two groups of 32) in one register. The 64 bytes of low
    /// nibbles of a half-block hold groups 0 and 1 (masked) and 2 and 3 (shifted by 4); the 32 bytes of high bit
    /// pairs, broadcast to both halves, shift by 0 | 2 for groups 0 and 1 and 4 | 6 for 2 and 3; the four 16-value
    /// sub-blocks' scales are picked with one permute.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub fn tile_q6k_vnni<const RN: usize>(w: &[u8], x: &Rows<'_, RN>) -> [f32; RN] {
        let y = &x.y;
        check_rows(w, Q6_K_BYTES, y);
        let m4 = _mm512_set1_epi8(0x0f);
        let m2 = _mm512_set1_epi8(0x03);
        let shift_01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
        let shift_23 = _mm512_add_epi16(shift_01, _mm512_set1_epi16(4));
        // SAFETY: 32 i16.
        let sub = unsafe { _mm512_loadu_si512(Q6K_SUB.as_ptr().cast()) };
        let mut acc = [_mm256_setzero_ps(); RN];
        let mut acc8 = _mm256_setzero_ps();
        let blocks = w.len() / Q6_K_BYTES;
        assert!(RN != 8 || blocks == 0 || x.d.len() >= (blocks - 1) * x.stride + 8);
        for (i, b) in w.chunks_exact(Q6_K_BYTES).enumerate() {
            let d = f16_at(b, 208);
            // SAFETY: 16 readable bytes (a block's scales).
            let sc16 =
                _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(b[192..208].as_ptr().cast()) });
            let sc = _mm512_castsi256_si512(sc16);
            let mut sumi = [_mm512_setzero_si512(); RN];
            for h in 0..2 {
                // SAFETY: 64 readable bytes (the slice).
                let ql = unsafe { _mm512_loadu_si512(b[64 * h..64 * h + 64].as_ptr().cast()) };
                let qh = _mm512_broadcast_i64x4(load32(&b[128 + 32 * h..]));
                let high = |s: __m512i| {
                    _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, s), m2), 4)
                };
                let q = [
                    _mm512_or_si512(_mm512_and_si512(ql, m4), high(shift_01)),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                        high(shift_23),
                    ),
                ];
                for (p, q) in q.iter().enumerate() {
                    let first = _mm512_set1_epi16((8 * h + 4 * p) as i16);
                    let scale = _mm512_permutexvar_epi16(_mm512_add_epi16(sub, first), sc);
                    let at = 128 * h + 64 * p;
                    for j in 0..RN {
                        let yq = &y[j][i].qs[at..at + 64];
                        // SAFETY: 64 readable bytes (the slice above).
                        let yq = unsafe { _mm512_loadu_si512(yq.as_ptr().cast()) };
                        sumi[j] = _mm512_dpwssd_epi32(sumi[j], _mm512_maddubs_epi16(*q, yq), scale);
                    }
                }
            }
            let mut s = [_mm256_setzero_si256(); 8];
            for j in 0..RN {
                let yb = &y[j][i];
                let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsums(yb)), 5);
                let sj = _mm256_add_epi32(
                    _mm512_castsi512_si256(sumi[j]),
                    _mm512_extracti64x4_epi64(sumi[j], 1),
                );
                s[j % 8] = _mm256_sub_epi32(sj, offset);
                if RN != 8 {
                    let dd = _mm256_set1_ps(d * yb.d);
                    acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s[j % 8]), acc[j]);
                }
            }
            if RN == 8 {
                // As in `tile_q4k_vnni`: the 8 rows' integer sums side by side, scaled by d·d' in one FMA.
                // SAFETY: 8 readable f32 from i·stride (asserted).
                let dy = unsafe { _mm256_loadu_ps(x.d.as_ptr().add(i * x.stride)) };
                let dd = _mm256_mul_ps(_mm256_set1_ps(d), dy);
                acc8 = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(hsum8_epi32(s)), acc8);
            }
        }
        let mut out = [0f32; RN];
        if RN == 8 {
            let mut v = [0f32; 8];
            // SAFETY: 8 f32.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), acc8) };
            out.copy_from_slice(&v[..RN]);
            return out;
        }
        for j in 0..RN {
            out[j] = hsum(acc[j]);
        }
        out
    }
}

/// `RN` rows of rounded activations, the side of a tile that is not the weight row: their blocks, and their
/// scales d' block-major (block i's of the rows at `d[i·stride..]`, 8 readable), for the 8-row tiles' epilogue.
pub struct Rows<'a, const RN: usize> {
    y: [&'a [BlockQ8K]; RN],
    d: &'a [f32],
    stride: usize,
}

/// One weight row of `format` against `RN` rows of rounded activations.
#[allow(unsafe_code)]
fn tile<const RN: usize>(kernel: Kernel, format: Format, w: &[u8], y: &Rows<'_, RN>) -> [f32; RN] {
    match (kernel, format) {
        (Kernel::Scalar, _) => std::array::from_fn(|j| dot_scalar(format, w, y.y[j])),
        // SAFETY: `Kernel::detect` saw the features these kernels are compiled for.
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Format::Q4K) => unsafe { x86::tile_q4k_avx2::<false, RN>(w, y) },
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Format::Q5K) => unsafe { x86::tile_q4k_avx2::<true, RN>(w, y) },
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Format::Q6K) => unsafe { x86::tile_q6k_avx2::<RN>(w, y) },
        #[cfg(target_arch = "x86_64")]
        (Kernel::Vnni, Format::Q4K) => unsafe { x86::tile_q4k_vnni::<false, RN>(w, y) },
        #[cfg(target_arch = "x86_64")]
        (Kernel::Vnni, Format::Q5K) => unsafe { x86::tile_q4k_vnni::<true, RN>(w, y) },
        #[cfg(target_arch = "x86_64")]
        (Kernel::Vnni, Format::Q6K) => unsafe { x86::tile_q6k_vnni::<RN>(w, y) },
    }
}

/// `dst (m × n) = x (m × k) · Wᵀ` for `w` the raw bytes of a `format` tensor of shape (n, k), `k` a multiple of
/// [`QK_K`]. The activations are rounded once; the work items are groups of output columns
/// ([`legacy_quants::for_each_column_group`]); in each, every weight row meets 8 rows of x at a time while 8 are left
/// (4 with AVX2 alone: half the registers), then 4, 2, 1.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t(
    kernel: Kernel,
    format: Format,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    dst: &mut [f32],
) {
    let kb = k / QK_K;
    let row_bytes =
        legacy_quants::check_product("kquants", QK_K, format.block_bytes(), x, m, k, w, n, dst);
    if m == 0 || n == 0 {
        return;
    }
    let mut acts = vec![ZERO; m * kb];
    legacy_quants::round_rows(x, k, &mut acts, kb, quantize_row_q8k);
    let row = |r: usize| &acts[r * kb..(r + 1) * kb];
    // The rows' d' block-major for the 8-row tiles (8 readable from each tile's first row: zero-padded).
    let stride = m + 8;
    let d = if m >= 8 {
        legacy_quants::block_major(&acts, kb, stride, |b| b.d)
    } else {
        Vec::new()
    };
    #[cfg(target_arch = "x86_64")]
    let max_rows = if kernel == Kernel::Avx2 { 4 } else { 8 };
    #[cfg(not(target_arch = "x86_64"))]
    let max_rows = 8;
    legacy_quants::for_each_column_group(n, dst, |c0, cols, out| {
        for (r0, rows) in legacy_quants::row_tiles(m, max_rows) {
            macro_rules! rows_of {
                ($rn:literal) => {{
                    let y = Rows::<$rn> {
                        y: std::array::from_fn(|j| row(r0 + j)),
                        d: d.get(r0..).unwrap_or(&[]),
                        stride,
                    };
                    for c in c0..c0 + cols {
                        let v =
                            tile::<$rn>(kernel, format, &w[c * row_bytes..(c + 1) * row_bytes], &y);
                        for (j, v) in v.iter().enumerate() {
                            out[(r0 + j) * n + c]
                                .store(v.to_bits(), std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }};
            }
            match rows {
                8 => rows_of!(8),
                4 => rows_of!(4),
                2 => rows_of!(2),
                _ => rows_of!(1),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// For each K-quant, blocks as candle writes them (`QTensor::quantize`, the GGUF layout; weights with a few
    /// large values, so the 6-bit scales and minima spread): every kernel this CPU has gives the scalar formula's
    /// products for 1 to 13 rows of x (every tile shape and the ragged ends of the work items: n = 37), and the
    /// formula is the product of candle's dequantized weights with the rounded activations, exactly up to the
    /// float additions.
    #[test]
    fn kernels_agree_with_candle_s_dequantized_weights() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(256);
        let (n, k) = (37, 512);
        for (ty, format) in [
            (GgmlDType::Q4K, Format::Q4K),
            (GgmlDType::Q5K, Format::Q5K),
            (GgmlDType::Q6K, Format::Q6K),
        ] {
            let dense: Vec<f32> = (0..n * k)
                .map(|i| rng.random_range(-0.05f32..0.08) + if i % 97 < 2 { 0.4 } else { 0.0 })
                .collect();
            let t = Tensor::from_vec(dense, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, ty).unwrap();
            let w = q.data().unwrap().into_owned();
            assert_eq!(w.len(), n * k / QK_K * format.block_bytes());
            let wd: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for m in (1..=13).step_by(3).chain([8]) {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| rng.random_range(-1f32..1.0) * if i % 11 == 0 { 12.0 } else { 1.0 })
                    .collect();
                let mut want = vec![0f32; m * n];
                matmul_t(Kernel::Scalar, format, &x, m, k, &w, n, &mut want);
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                for kernel in Kernel::all_here() {
                    let mut got = vec![0f32; m * n];
                    matmul_t(kernel, format, &x, m, k, &w, n, &mut got);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{a} vs {b} at ({}, {}) ({format:?}, m = {m}, {kernel:?})",
                            i / n,
                            i % n
                        );
                    }
                }
                let mut yq = vec![ZERO; m * k / QK_K];
                for (y, x) in yq.chunks_exact_mut(k / QK_K).zip(x.chunks_exact(k)) {
                    quantize_row_q8k(x, y);
                }
                for (r, y) in yq.chunks_exact(k / QK_K).enumerate() {
                    for c in 0..n {
                        let mut e = 0f64;
                        for (bi, y) in y.iter().enumerate() {
                            for j in 0..QK_K {
                                let wv = f64::from(wd[c * k + bi * QK_K + j]);
                                e += wv * f64::from(y.qs[j]) * f64::from(y.d);
                            }
                        }
                        let got = f64::from(want[r * n + c]);
                        assert!(
                            (got - e).abs() < 1e-5 * f64::from(scale),
                            "{got} vs {e} ({format:?}, row {r}, column {c})"
                        );
                    }
                }
            }
        }
    }

    /// The rounding is llama.cpp's: the largest magnitude maps to ∓127, ties round to even, the sums are the
    /// sums of each 16, and an all-zero block is all zeros.
    #[test]
    fn q8k_rounding_is_llama_cpp_s() {
        let mut x = vec![0f32; 2 * QK_K];
        for (i, v) in x.iter_mut().enumerate().take(QK_K) {
            *v = (i as f32 - 100.0) * 0.3;
        }
        // The extreme, −127: the multiplier −127/max is 1 (the value 127 maps to −127 with a negative one).
        x[7] = -127.0;
        x[8] = 0.5; // a tie, to 0
        x[9] = 1.5; // a tie, to 2
        x[10] = -2.5; // a tie, to −2
        let mut y = vec![ZERO; 2];
        quantize_row_q8k(&x, &mut y);
        assert_eq!(y[0].d, 1.0);
        assert_eq!(y[0].qs[7], -127);
        assert_eq!((y[0].qs[8], y[0].qs[9], y[0].qs[10]), (0, 2, -2));
        assert_eq!(y[0].qs[200], 30); // (200 − 100)·0.3, rounded
        // The SIMD rounding is the scalar one bit for bit (random blocks with ties, equal extremes of both signs
        // and an all-zero block).
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let mut r: Vec<f32> = (0..6 * QK_K)
            .map(|i| rng.random_range(-3f32..3.0) * if i % 37 == 0 { 9.0 } else { 1.0 })
            .collect();
        r[QK_K..2 * QK_K].fill(0.0);
        r[2 * QK_K + 5] = 40.0;
        r[2 * QK_K + 9] = -40.0;
        r[3 * QK_K + 3] = -40.0;
        r[3 * QK_K + 200] = 40.0;
        for (i, v) in r[4 * QK_K..5 * QK_K].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 0.5;
        }
        let (mut a, mut b) = (vec![ZERO; 6], vec![ZERO; 6]);
        quantize_row_q8k(&r, &mut a);
        quantize_row_q8k_impl(&r, &mut b);
        for (a, b) in a.iter().zip(&b) {
            assert_eq!(a.d.to_bits(), b.d.to_bits());
            assert_eq!((a.qs, a.bsums, a.sums32), (b.qs, b.bsums, b.sums32));
        }
        let mut z = vec![ZERO; 1];
        quantize_row_q8k(&x[..QK_K].iter().map(|v| -v).collect::<Vec<_>>(), &mut z);
        assert_eq!((z[0].d, z[0].qs[7], z[0].qs[200]), (-1.0, -127, 30));
        for (s, q) in y[0].bsums.iter().zip(y[0].qs.chunks_exact(16)) {
            assert_eq!(i32::from(*s), q.iter().map(|&q| i32::from(q)).sum::<i32>());
        }
        for (s, q) in y[0].sums32.iter().zip(y[0].qs.chunks_exact(32)) {
            assert_eq!(i32::from(*s), q.iter().map(|&q| i32::from(q)).sum::<i32>());
        }
        assert_eq!(y[1].d, 0.0);
        assert!(y[1].qs.iter().all(|&q| q == 0) && y[1].bsums.iter().all(|&s| s == 0));
    }
}
