//! `x · Wᵀ` on the CPU for a GGML `Q4_1`, `Q5_0` or `Q8_0` weight, the way llama.cpp computes it: the activations
//! are rounded to 8-bit blocks (32 int8 and an f16 scale; for Q4_1 also the f16 `s = d·Σq` that folds in the
//! weight's minimum, for Q5_0 the exact Σq that takes off its offset of 16) and each 32-wide block of the dot
//! product is an integer sum scaled by both blocks' scales. candle 0.11 has scalar loops for Q4_1 and Q5_0 (4–5×
//! slower than llama.cpp on SmolLM2's Q4_1 file); for Q8_0 it has VNNI tiles only for rows a multiple of 256 wide,
//! and SmolLM2's are 576 wide but for `down_proj`: the others, the tied lm_head too, run its one-row AVX2 loop (one
//! chain of FMAs, an out-of-line f16 conversion per block, candle's own rounding of x), 61 tokens/s decoding the
//! Q8_0 file on one thread against 104 here (two threads, `scripts/bench_decode.py`: 0.71× llama.cpp's decode
//! speed before, 1.04× here). These are llama.cpp's AVX2 kernels (`ggml_vec_dot_q4_1_q8_1`,
//! `ggml_vec_dot_q5_0_q8_0`, `ggml_vec_dot_q8_0_q8_0`), with AVX-512 VNNI's byte dot product where the CPU has
//! it, and the scalar formulas elsewhere. The activation rounding follows llama.cpp's x86 `quantize_row_q8_1` /
//! `quantize_row_q8_0` (scale `amax/127`, multiplier `127/amax`, round half to even), so a product here is
//! llama.cpp's up to the order of the float additions.

use std::sync::atomic::{AtomicU32, Ordering};

use half::f16;

/// Values per block (weights and activations).
pub const QK: usize = 32;
/// Bytes of one `Q4_1` block: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles (value j in the low nibble of
/// byte j, value j+16 in its high nibble); a weight is `d·q + m`.
pub const Q4_1_BYTES: usize = 20;
/// Bytes of one `Q5_0` block: f16 scale `d`, 4 bytes of fifth bits (bit j for value j), 16 bytes of nibbles laid
/// out as Q4_1's; a weight is `d·(q − 16)`.
pub const Q5_0_BYTES: usize = 22;
/// Bytes of one `Q8_0` block: f16 scale `d`, 32 int8 `q` in value order; a weight is `d·q`.
pub const Q8_0_BYTES: usize = 34;

/// The GGML block types multiplied here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Activations as `Q8_1` (llama.cpp's `ggml_vec_dot_q4_1_q8_1`).
    Q4_1,
    /// Activations as `Q8_0` (llama.cpp's `ggml_vec_dot_q5_0_q8_0`): the same rounding without `s`.
    Q5_0,
    /// Activations as `Q8_0` (llama.cpp's `ggml_vec_dot_q8_0_q8_0`).
    Q8_0,
}

impl Format {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BYTES,
            Self::Q5_0 => Q5_0_BYTES,
            Self::Q8_0 => Q8_0_BYTES,
        }
    }
}

/// One block of activations rounded to 8 bits: `x ≈ d·q`, `s = d·Σq` (f16-rounded, Q4_1's minimum term), and
/// `Σq` exactly (Q5_0's offset of 16).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; QK],
    sum: i32,
}

/// Rounds one row of activations (length a multiple of [`QK`]) to `Q8_1` blocks, as llama.cpp's x86
/// `quantize_row_q8_1`: `d` and `s` are stored as f16 there, so they are rounded through f16 here too.
#[allow(unsafe_code)]
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { x86::quantize_row_q8_1_avx2(x, out) };
        return;
    }
    quantize_row_q8_1_impl(x, out);
}

/// The body of [`quantize_row_q8_1`], compiled once plainly and once with AVX2 (where `round_ties_even` is one
/// instruction instead of a libm call and the loops vectorize).
#[inline(always)]
fn quantize_row_q8_1_impl(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xs, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (q, &v) in y.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
        }
        let sum: i32 = y.qs.iter().map(|&q| i32::from(q)).sum();
        y.d = f16::from_f32(d).to_f32();
        y.s = f16::from_f32(d * sum as f32).to_f32();
        y.sum = sum;
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One dot product of a `format` row with a row of rounded activations, the scalar formula.
fn dot_scalar(format: Format, w: &[u8], y: &[BlockQ8_1]) -> f32 {
    match format {
        Format::Q4_1 => dot_scalar_q4_1(w, y),
        Format::Q5_0 => dot_scalar_q5_0(w, y),
        Format::Q8_0 => dot_scalar_q8_0(w, y),
    }
}

/// One dot product of a `Q8_0` row (`blocks` × [`Q8_0_BYTES`]) with a `Q8_0` row, the scalar formula.
fn dot_scalar_q8_0(w: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(Q8_0_BYTES).zip(y) {
        let si: i32 = b[2..]
            .iter()
            .zip(&y.qs)
            .map(|(&q, &qy)| i32::from(q.cast_signed()) * i32::from(qy))
            .sum();
        sum += si as f32 * f16_at(b, 0) * y.d;
    }
    sum
}

/// One dot product of a `Q5_0` row (`blocks` × [`Q5_0_BYTES`]) with a `Q8_0` row, the scalar formula.
fn dot_scalar_q5_0(w: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(Q5_0_BYTES).zip(y) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let mut si = 0i32;
        for j in 0..QK / 2 {
            let q = b[6 + j];
            let lo = i32::from(q & 0x0f) | (((qh >> j) & 1) << 4) as i32;
            let hi = i32::from(q >> 4) | (((qh >> (j + 16)) & 1) << 4) as i32;
            si += (lo - 16) * i32::from(y.qs[j]) + (hi - 16) * i32::from(y.qs[j + QK / 2]);
        }
        sum += si as f32 * f16_at(b, 0) * y.d;
    }
    sum
}

/// One dot product of a `Q4_1` row (`blocks` × [`Q4_1_BYTES`]) with a `Q8_1` row, the scalar formula.
fn dot_scalar_q4_1(w: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(Q4_1_BYTES).zip(y) {
        let mut si = 0i32;
        for j in 0..QK / 2 {
            let q = b[4 + j];
            si += i32::from(q & 0x0f) * i32::from(y.qs[j])
                + i32::from(q >> 4) * i32::from(y.qs[j + QK / 2]);
        }
        sum += si as f32 * f16_at(b, 0) * y.d + f16_at(b, 2) * y.s;
    }
    sum
}

// The SIMD kernels: intrinsics need `unsafe` (unaligned loads from slices whose length is checked, and calls into
// `target_feature` functions only after `Kernel::detect` saw those features).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{BlockQ8_1, Q4_1_BYTES, Q5_0_BYTES, Q8_0_BYTES, QK};
    use std::arch::x86_64::*;

    /// The 32 nibbles of a block's 16 bytes as bytes 0..15: low nibbles first, then high nibbles.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nibbles(q: &[u8]) -> __m256i {
        assert!(q.len() >= 16);
        // SAFETY: 16 readable bytes (checked above).
        let t = unsafe { _mm_loadu_si128(q.as_ptr().cast()) };
        let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    #[target_feature(enable = "avx2")]
    pub fn quantize_row_q8_1_avx2(x: &[f32], out: &mut [BlockQ8_1]) {
        super::quantize_row_q8_1_impl(x, out);
    }

    /// Four rows of W against one Q8_1 row (prompts; decode is `dot_q4_1`). Per block: the four rows' f16 (d, m)
    /// pairs become f32 in one conversion and are multiplied by the activations' (d, s) pair; each row's nibbles
    /// times the activations are summed to 8 i32 lanes by `$prod`, scaled by its d·d' and accumulated in f32 lanes
    /// (as llama.cpp's AVX2 `ggml_vec_dot_q4_1_q8_1`), and the m·s terms are accumulated in the odd lanes of one
    /// vector.
    macro_rules! dot4 {
        ($name:ident, $features:literal, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: [&[u8]; 4], y: &[BlockQ8_1]) -> [f32; 4] {
                let n = y.len();
                let rows = w.map(|w| &w.as_chunks::<Q4_1_BYTES>().0[..n]);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut mins = _mm256_setzero_ps();
                for (i, yb) in y.iter().enumerate() {
                    // SAFETY: `qs` is 32 bytes.
                    let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                    // (d, s) in every pair of lanes: one 64-bit broadcast of the two f32's bits.
                    let pair = (u64::from(yb.s.to_bits()) << 32) | u64::from(yb.d.to_bits());
                    let ds = _mm256_castpd_ps(_mm256_set1_pd(f64::from_bits(pair)));
                    let b = [&rows[0][i], &rows[1][i], &rows[2][i], &rows[3][i]];
                    let dm = b.map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    let dm = _mm256_mul_ps(
                        _mm256_cvtph_ps(_mm_set_epi32(dm[3], dm[2], dm[1], dm[0])),
                        ds,
                    );
                    mins = _mm256_add_ps(mins, dm);
                    for r in 0..4 {
                        let p = $prod(nibbles(&b[r][4..]), qy);
                        let scale = _mm256_permutevar8x32_ps(dm, _mm256_set1_epi32(2 * r as i32));
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r]);
                    }
                }
                let mut m = [0f32; 8];
                // SAFETY: `m` is 8 f32.
                unsafe { _mm256_storeu_ps(m.as_mut_ptr(), mins) };
                std::array::from_fn(|r| hsum(acc[r]) + m[2 * r + 1])
            }
        };
    }

    // AVX2: `maddubs` (u8·i8 → i16 pairs), `madd` with ones (→ i32).
    dot4!(dot4_avx2, "avx2,fma,f16c", |qx, qy| _mm256_madd_epi16(
        _mm256_maddubs_epi16(qx, qy),
        _mm256_set1_epi16(1)
    ));
    // AVX-512 VNNI's `vpdpbusd` on 256-bit lanes: u8·i8 summed in fours straight into i32.
    dot4!(
        dot4_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |qx, qy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy)
    );

    /// One Q4_1 row against one Q8_1 row (decode), as llama.cpp's `ggml_vec_dot_q4_1_q8_1`: the matrix is read
    /// row after row (see `dot_q8_0` for why four rows side by side is slower). Per block the f16 (d, m) pair
    /// becomes f32 and is multiplied by the activations' (d', s') pair in one instruction; the nibbles times the
    /// activations are summed to 8 i32 lanes by `$prod`, scaled by d·d' and accumulated in f32 lanes, and m·s' in
    /// the second lane of a 128-bit vector. One chain of FMAs, llama.cpp's order of the float additions (its
    /// greedy answer on SmolLM2's Q4_1 file is `tests/chat_smollm2.rs`'s token for token; four chains, blocks i,
    /// i + 4, … into one accumulator, changed it and were no faster): SmolLM2's Q4_1 file decoded at 88–90
    /// tokens/s with `dot4`, 117–127 with this (two threads, `scripts/bench_decode.py`: 0.76–0.88× llama.cpp's
    /// decode speed before, 1.14–1.18× here).
    macro_rules! dot_q4_1 {
        ($name:ident, $features:literal, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: &[u8], y: &[BlockQ8_1]) -> f32 {
                let row = &w.as_chunks::<Q4_1_BYTES>().0[..y.len()];
                let mut acc = _mm256_setzero_ps();
                let mut mins = _mm_setzero_ps();
                for (b, yb) in row.iter().zip(y) {
                    let dm = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    // (d', s') in lanes 0 and 1: one 64-bit load of the two f32's bits.
                    let pair = (u64::from(yb.s.to_bits()) << 32) | u64::from(yb.d.to_bits());
                    let ds = _mm_castsi128_ps(_mm_cvtsi64_si128(pair.cast_signed()));
                    // (d·d', m·s', 0, 0).
                    let dm = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(dm)), ds);
                    mins = _mm_add_ps(mins, dm);
                    // SAFETY: `qs` is 32 bytes.
                    let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                    let p = $prod(nibbles(&b[4..]), qy);
                    let scale = _mm256_broadcastss_ps(dm);
                    acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
                }
                hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(mins))
            }
        };
    }

    dot_q4_1!(dot_q4_1_avx2, "avx2,fma,f16c", |qx, qy| _mm256_madd_epi16(
        _mm256_maddubs_epi16(qx, qy),
        _mm256_set1_epi16(1)
    ));
    dot_q4_1!(
        dot_q4_1_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |qx, qy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy)
    );

    /// A Q5_0 block's fifth bits (4 bytes) as 32 bytes of 0x10 (bit set) or 0, in value order (llama.cpp's
    /// `bytes_from_bits_32`, masked to the bit's place value).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fifth_bits(b: &[u8]) -> __m256i {
        let x32 = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let shuf = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
        let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Four Q5_0 rows against one Q8_0 row: each value as the unsigned q (0..31) times the activations, summed to
    /// i32 lanes by `$prod`, scaled by d·d' per block; the offset of 16 comes off as 16·d·d'·Σq' per block,
    /// accumulated for the four rows in one vector.
    macro_rules! dot4_q5_0 {
        ($name:ident, $features:literal, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: [&[u8]; 4], y: &[BlockQ8_1]) -> [f32; 4] {
                let n = y.len();
                let rows = w.map(|w| &w.as_chunks::<Q5_0_BYTES>().0[..n]);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut offset = _mm_setzero_ps();
                for (i, yb) in y.iter().enumerate() {
                    // SAFETY: `qs` is 32 bytes.
                    let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                    let b = [&rows[0][i], &rows[1][i], &rows[2][i], &rows[3][i]];
                    let d = b.map(|b| i16::from_le_bytes([b[0], b[1]]));
                    let d4 = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, d[3], d[2], d[1], d[0]));
                    let scale4 = _mm_mul_ps(d4, _mm_set1_ps(yb.d));
                    offset = _mm_fmadd_ps(scale4, _mm_set1_ps(16.0 * yb.sum as f32), offset);
                    let scale8 = _mm256_castps128_ps256(scale4);
                    for r in 0..4 {
                        let q = _mm256_or_si256(nibbles(&b[r][6..]), fifth_bits(&b[r][2..6]));
                        let p = $prod(q, qy);
                        let scale = _mm256_permutevar8x32_ps(scale8, _mm256_set1_epi32(r as i32));
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r]);
                    }
                }
                let mut o = [0f32; 4];
                // SAFETY: `o` is 4 f32.
                unsafe { _mm_storeu_ps(o.as_mut_ptr(), offset) };
                std::array::from_fn(|r| hsum(acc[r]) - o[r])
            }
        };
    }

    dot4_q5_0!(dot4_q5_0_avx2, "avx2,fma,f16c", |qx, qy| _mm256_madd_epi16(
        _mm256_maddubs_epi16(qx, qy),
        _mm256_set1_epi16(1)
    ));
    dot4_q5_0!(
        dot4_q5_0_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |qx, qy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy)
    );

    /// One Q5_0 row against one Q8_0 row (decode), row after row as `dot_q4_1`, with `dot4_q5_0`'s sums: per
    /// block the unsigned q (0..31) times the activations summed to i32 lanes by `$prod` and scaled by d·d'; the
    /// offset of 16 comes off as 16·d·d'·Σq', accumulated as a scalar.
    macro_rules! dot_q5_0 {
        ($name:ident, $features:literal, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: &[u8], y: &[BlockQ8_1]) -> f32 {
                let row = &w.as_chunks::<Q5_0_BYTES>().0[..y.len()];
                let mut acc = _mm256_setzero_ps();
                let mut offset = 0f32;
                for (b, yb) in row.iter().zip(y) {
                    let dw = u16::from_le_bytes([b[0], b[1]]);
                    let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(dw))));
                    let scale = dw * yb.d;
                    offset = scale.mul_add(16.0 * yb.sum as f32, offset);
                    // SAFETY: `qs` is 32 bytes.
                    let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                    let q = _mm256_or_si256(nibbles(&b[6..]), fifth_bits(&b[2..6]));
                    let p = $prod(q, qy);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p), acc);
                }
                hsum(acc) - offset
            }
        };
    }

    dot_q5_0!(dot_q5_0_avx2, "avx2,fma,f16c", |qx, qy| _mm256_madd_epi16(
        _mm256_maddubs_epi16(qx, qy),
        _mm256_set1_epi16(1)
    ));
    dot_q5_0!(
        dot_q5_0_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |qx, qy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy)
    );

    /// One Q8_0 row against one Q8_0 row, as llama.cpp's `ggml_vec_dot_q8_0_q8_0`: per block, the signed bytes
    /// multiply as |q|·(q' with q's sign) (`mul_sum_i8_pairs_float`: unsigned × signed byte products are what the
    /// CPU has), summed to i32 lanes by `$prod`, scaled by d·d' and accumulated in f32 lanes. One row at a time,
    /// as llama.cpp, so the matrix is read in order: four rows side by side (`dot4`'s order, kept for prompts; a
    /// row at k = 576 is ten cache lines) decoded SmolLM2's Q8_0 file at 38 tokens/s on one thread, one row at a
    /// time with one FMA chain at 73, with four chains (blocks i, i + 4, … into one accumulator) at 104.
    macro_rules! dot_q8_0 {
        ($name:ident, $features:literal, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: &[u8], y: &[BlockQ8_1]) -> f32 {
                let row = &w.as_chunks::<Q8_0_BYTES>().0[..y.len()];
                let block = |b: &[u8; Q8_0_BYTES], yb: &BlockQ8_1| {
                    let dw = u16::from_le_bytes([b[0], b[1]]);
                    let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(dw)));
                    let d = _mm256_set1_ps(_mm_cvtss_f32(dw) * yb.d);
                    // SAFETY: bytes 2..34 of a 34-byte block; `qs` is 32 bytes.
                    let qx = unsafe { _mm256_loadu_si256(b[2..].as_ptr().cast()) };
                    let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                    let p = $prod(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
                    (d, _mm256_cvtepi32_ps(p))
                };
                // Four accumulators (block i into i % 4): four chains of FMAs instead of one.
                let mut acc = [_mm256_setzero_ps(); 4];
                for (i, (b, yb)) in row.iter().zip(y).enumerate() {
                    let (d, p) = block(b, yb);
                    acc[i % 4] = _mm256_fmadd_ps(d, p, acc[i % 4]);
                }
                hsum(_mm256_add_ps(
                    _mm256_add_ps(acc[0], acc[1]),
                    _mm256_add_ps(acc[2], acc[3]),
                ))
            }
        };
    }

    dot_q8_0!(dot_q8_0_avx2, "avx2,fma,f16c", |ax, sy| _mm256_madd_epi16(
        _mm256_maddubs_epi16(ax, sy),
        _mm256_set1_epi16(1)
    ));
    dot_q8_0!(
        dot_q8_0_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |ax, sy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
    );

    /// One Q8_0 row against four rows of activations (a prompt's): the weight block is read, its scale
    /// converted and its bytes' absolute values taken once for the four; each activation row has its own two
    /// accumulators (even and odd blocks).
    macro_rules! dot_q8_0_x4 {
        ($name:ident, $features:literal, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: &[u8], y: [&[BlockQ8_1]; 4]) -> [f32; 4] {
                let n = y[0].len();
                let row = &w.as_chunks::<Q8_0_BYTES>().0[..n];
                let y = y.map(|y| &y[..n]);
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for (i, b) in row.iter().enumerate() {
                    let dw = u16::from_le_bytes([b[0], b[1]]);
                    let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(dw))));
                    // SAFETY: bytes 2..34 of a 34-byte block.
                    let qx = unsafe { _mm256_loadu_si256(b[2..].as_ptr().cast()) };
                    let ax = _mm256_sign_epi8(qx, qx);
                    for r in 0..4 {
                        let yb = &y[r][i];
                        // SAFETY: `qs` is 32 bytes.
                        let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                        let p = _mm256_cvtepi32_ps($prod(ax, _mm256_sign_epi8(qy, qx)));
                        let d = _mm256_set1_ps(dw * yb.d);
                        acc[r][i % 2] = _mm256_fmadd_ps(d, p, acc[r][i % 2]);
                    }
                }
                acc.map(|a| hsum(_mm256_add_ps(a[0], a[1])))
            }
        };
    }

    dot_q8_0_x4!(dot_q8_0_x4_avx2, "avx2,fma,f16c", |ax, sy| {
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
    });
    dot_q8_0_x4!(
        dot_q8_0_x4_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |ax, sy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
    );

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        let mut a = [0f32; 8];
        // SAFETY: `a` is 8 f32.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    const _: () = assert!(QK == 32);
}

/// Which dot-product kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU has.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Self::Vnni;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// The kernel's name, for `termtune env`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => "avx512-vnni",
        }
    }

    #[allow(unsafe_code)]
    fn dot4(self, format: Format, w: [&[u8]; 4], y: &[BlockQ8_1]) -> [f32; 4] {
        match (self, format) {
            (Self::Scalar, _) => w.map(|w| dot_scalar(format, w, y)),
            // SAFETY: `detect` saw the features these kernels are compiled for.
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q4_1) => unsafe { x86::dot4_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q4_1) => unsafe { x86::dot4_vnni(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q5_0) => unsafe { x86::dot4_q5_0_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q5_0) => unsafe { x86::dot4_q5_0_vnni(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2 | Self::Vnni, Format::Q8_0) => w.map(|w| self.dot_q8_0(w, y)),
        }
    }

    /// One `Q8_0` row of W against one row of activations.
    #[allow(unsafe_code)]
    fn dot_q8_0(self, w: &[u8], y: &[BlockQ8_1]) -> f32 {
        match self {
            Self::Scalar => dot_scalar_q8_0(w, y),
            // SAFETY: `detect` saw the features these kernels are compiled for.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::dot_q8_0_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe { x86::dot_q8_0_vnni(w, y) },
        }
    }

    /// One row of a `format` W against one row of activations (decode: the matrix read row after row).
    #[allow(unsafe_code)]
    fn dot(self, format: Format, w: &[u8], y: &[BlockQ8_1]) -> f32 {
        match (self, format) {
            (Self::Scalar, _) => dot_scalar(format, w, y),
            // SAFETY: `detect` saw the features these kernels are compiled for.
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q4_1) => unsafe { x86::dot_q4_1_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q4_1) => unsafe { x86::dot_q4_1_vnni(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q5_0) => unsafe { x86::dot_q5_0_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q5_0) => unsafe { x86::dot_q5_0_vnni(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2 | Self::Vnni, Format::Q8_0) => self.dot_q8_0(w, y),
        }
    }

    /// One `Q8_0` row of W against four rows of activations.
    #[allow(unsafe_code)]
    fn dot_q8_0_x4(self, w: &[u8], y: [&[BlockQ8_1]; 4]) -> [f32; 4] {
        match self {
            Self::Scalar => y.map(|y| dot_scalar_q8_0(w, y)),
            // SAFETY: `detect` saw the features these kernels are compiled for.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::dot_q8_0_x4_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe { x86::dot_q8_0_x4_vnni(w, y) },
        }
    }
}

/// Columns of the output one work item computes (a multiple of 4).
const COLS_PER_ITEM: usize = 16;

/// `dst (m × n) = x (m × k) · Wᵀ` for `w` the raw bytes of a `format` tensor of shape (n, k), `k` a multiple of
/// [`QK`]. The work items are groups of output columns (each weight row is read once for all m rows of x), run on
/// candle's spinning thread pool, the one its own quantized products use: a decode step makes hundreds of these
/// small products, and a second pool (rayon's) would wake and park threads for each and fight it for the cores.
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
    assert!(
        k.is_multiple_of(QK),
        "q4_1: k = {k} is not a multiple of {QK}"
    );
    let kb = k / QK;
    let row_bytes = kb * format.block_bytes();
    assert_eq!(w.len(), n * row_bytes, "q4_1: weight bytes for ({n}, {k})");
    assert_eq!(x.len(), m * k, "q4_1: input length");
    assert_eq!(dst.len(), m * n, "q4_1: output length");
    let zero = BlockQ8_1 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
        sum: 0,
    };
    let mut yq = vec![zero; m * kb];
    for (y, x) in yq.chunks_exact_mut(kb).zip(x.chunks_exact(k)) {
        quantize_row_q8_1(x, y);
    }
    let wrow = |c: usize| &w[c * row_bytes..(c + 1) * row_bytes];
    // Each output element is written by exactly one work item; relaxed atomic stores are plain stores on x86.
    let out: Vec<AtomicU32> = (0..m * n).map(|_| AtomicU32::new(0)).collect();
    let item = |g: usize| {
        let c0 = g * COLS_PER_ITEM;
        let cols = COLS_PER_ITEM.min(n - c0);
        if format == Format::Q8_0 {
            // Q8_0: one weight row after the other (see `x86::dot_q8_0`), each against four rows of x at a time.
            let y = |r: usize| &yq[r * kb..(r + 1) * kb];
            for c in c0..c0 + cols {
                let mut r = 0;
                while r + 4 <= m {
                    let s = kernel.dot_q8_0_x4(wrow(c), [y(r), y(r + 1), y(r + 2), y(r + 3)]);
                    for (j, v) in s.into_iter().enumerate() {
                        out[(r + j) * n + c].store(v.to_bits(), Ordering::Relaxed);
                    }
                    r += 4;
                }
                for r in r..m {
                    let v = kernel.dot_q8_0(wrow(c), y(r));
                    out[r * n + c].store(v.to_bits(), Ordering::Relaxed);
                }
            }
            return;
        }
        if m == 1 {
            // Decode: one weight row after the other (see `x86::dot_q4_1`).
            for (c, o) in out.iter().enumerate().skip(c0).take(cols) {
                o.store(
                    kernel.dot(format, wrow(c), &yq).to_bits(),
                    Ordering::Relaxed,
                );
            }
            return;
        }
        for (r, y) in yq.chunks_exact(kb).enumerate() {
            let o = &out[r * n + c0..r * n + c0 + cols];
            let mut c = 0;
            while c + 4 <= cols {
                let s = kernel.dot4(
                    format,
                    [
                        wrow(c0 + c),
                        wrow(c0 + c + 1),
                        wrow(c0 + c + 2),
                        wrow(c0 + c + 3),
                    ],
                    y,
                );
                for (o, v) in o[c..c + 4].iter().zip(s) {
                    o.store(v.to_bits(), Ordering::Relaxed);
                }
                c += 4;
            }
            for (j, o) in o.iter().enumerate().skip(c) {
                o.store(
                    dot_scalar(format, wrow(c0 + j), y).to_bits(),
                    Ordering::Relaxed,
                );
            }
        }
    };
    candle_core::utils::barrier_pool()
        .execute_chunked(n.div_ceil(COLS_PER_ITEM), |range| range.for_each(item));
    for (d, o) in dst.iter_mut().zip(out) {
        *d = f32::from_bits(o.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU can run, the scalar formula first.
    fn kernels() -> Vec<Kernel> {
        let mut out = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                out.push(Kernel::Avx2);
            }
            if Kernel::detect() == Kernel::Vnni {
                out.push(Kernel::Vnni);
            }
        }
        out
    }

    fn block(d: f32, m: f32, q: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut b = Vec::with_capacity(Q4_1_BYTES);
        b.extend(f16::from_f32(d).to_le_bytes());
        b.extend(f16::from_f32(m).to_le_bytes());
        b.extend((0..16).map(|j| q(j) | (q(j + 16) << 4)));
        b
    }

    /// Every kernel this CPU has gives the scalar formula's dot products (integer sums are exact; only the order
    /// of the float additions differs), for 1, 3 and 5 rows and a column count that is not a multiple of 4.
    #[test]
    fn kernels_agree_with_the_scalar_formula() {
        let (n, k) = (37, 96);
        let mut w = Vec::new();
        for c in 0..n {
            for b in 0..k / QK {
                let s = (c * 7 + b * 3) as f32;
                w.extend(block(0.01 + s * 1e-3, -0.05 + s * 1e-4, |j| {
                    ((j * 5 + c + b) % 16) as u8
                }));
            }
        }
        for m in [1, 3, 5] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let mut want = vec![0f32; m * n];
            matmul_t(Kernel::Scalar, Format::Q4_1, &x, m, k, &w, n, &mut want);
            for kernel in kernels() {
                let mut got = vec![0f32; m * n];
                matmul_t(kernel, Format::Q4_1, &x, m, k, &w, n, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{a} vs {b} (m = {m}, {kernel:?})"
                    );
                }
            }
            // And the scalar formula is the product with the dequantized weight and the rounded activations.
            let mut yq = vec![
                BlockQ8_1 {
                    d: 0.0,
                    s: 0.0,
                    qs: [0; QK],
                    sum: 0
                };
                k / QK
            ];
            quantize_row_q8_1(&x[..k], &mut yq);
            for c in 0..n {
                let mut r = 0f64;
                for (bi, y) in yq.iter().enumerate() {
                    let b = &w[(c * k / QK + bi) * Q4_1_BYTES..][..Q4_1_BYTES];
                    let (d, mn) = (f16_at(b, 0) as f64, f16_at(b, 2) as f64);
                    for j in 0..QK {
                        let q = if j < 16 {
                            b[4 + j] & 15
                        } else {
                            b[4 + j - 16] >> 4
                        };
                        r += (d * f64::from(q) + mn) * f64::from(y.qs[j]) * y.d as f64;
                    }
                }
                // s = d·Σq is rounded to f16, so the minimum's term is within an f16 ulp of the exact one.
                assert!(
                    (want[c] as f64 - r).abs() < 2e-3 * r.abs().max(1.0),
                    "{} vs {r}",
                    want[c]
                );
            }
        }
    }

    /// The same for Q5_0: every kernel equals the scalar formula, and the formula is the product of the
    /// dequantized weights d·(q − 16) with the rounded activations.
    #[test]
    fn q5_0_kernels_agree_with_the_scalar_formula() {
        let (n, k) = (21, 128);
        let mut w = Vec::new();
        for c in 0..n {
            for b in 0..k / QK {
                let s = (c * 5 + b * 7) as f32;
                w.extend(
                    f16::from_f32(if c % 3 == 0 { -0.02 } else { 0.015 } + s * 1e-4).to_le_bytes(),
                );
                let q = |j: usize| ((j * 11 + c * 3 + b) % 32) as u32;
                let qh: u32 = (0..32).map(|j| (q(j) >> 4) << j).sum();
                w.extend(qh.to_le_bytes());
                w.extend((0..16).map(|j| (q(j) & 15) as u8 | (((q(j + 16) & 15) as u8) << 4)));
            }
        }
        for m in [1, 2, 6] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 29 % 97) as f32 - 48.0) / 13.0)
                .collect();
            let mut want = vec![0f32; m * n];
            matmul_t(Kernel::Scalar, Format::Q5_0, &x, m, k, &w, n, &mut want);
            for kernel in kernels() {
                let mut got = vec![0f32; m * n];
                matmul_t(kernel, Format::Q5_0, &x, m, k, &w, n, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{a} vs {b} (m = {m}, {kernel:?})"
                    );
                }
            }
            let zero = BlockQ8_1 {
                d: 0.0,
                s: 0.0,
                qs: [0; QK],
                sum: 0,
            };
            let mut yq = vec![zero; k / QK];
            quantize_row_q8_1(&x[..k], &mut yq);
            for c in 0..n {
                let mut r = 0f64;
                for (bi, y) in yq.iter().enumerate() {
                    let b = &w[(c * k / QK + bi) * Q5_0_BYTES..][..Q5_0_BYTES];
                    let d = f64::from(f16_at(b, 0));
                    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    for j in 0..QK {
                        let nib = if j < 16 {
                            b[6 + j] & 15
                        } else {
                            b[6 + j - 16] >> 4
                        };
                        let q = f64::from(u32::from(nib) | (((qh >> j) & 1) << 4)) - 16.0;
                        r += d * q * f64::from(y.qs[j]) * f64::from(y.d);
                    }
                }
                assert!(
                    (f64::from(want[c]) - r).abs() < 1e-4 * r.abs().max(1.0),
                    "{} vs {r}",
                    want[c]
                );
            }
        }
    }
    /// Q8_0 with random blocks (scales of both signs, every byte value from −128 to 127, activations of mixed
    /// magnitudes): every kernel this CPU has gives the scalar formula's dot products, for a column count that is
    /// not a multiple of 4, and the formula is the product of the dequantized weights d·q with the rounded
    /// activations.
    #[test]
    fn q8_0_kernels_agree_with_the_scalar_formula() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for (n, k) in [(23, 64), (40, 576)] {
            let mut w = Vec::new();
            for _ in 0..n * k / QK {
                w.extend(f16::from_f32(rng.random_range(-0.03f32..0.03)).to_le_bytes());
                w.extend((0..QK).map(|_| rng.random::<u8>()));
            }
            // The extremes in one block: −128 (|q| wraps to 128 as an unsigned byte) and 127.
            w[2..2 + QK].copy_from_slice(&[0x80, 0x7f].repeat(QK / 2));
            for m in [1, 4, 7] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| rng.random_range(-1f32..1.0) * if i % 5 == 0 { 30.0 } else { 1.0 })
                    .collect();
                let mut want = vec![0f32; m * n];
                matmul_t(Kernel::Scalar, Format::Q8_0, &x, m, k, &w, n, &mut want);
                // Random signs cancel: errors are measured against the largest output, not each one.
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                for kernel in kernels() {
                    let mut got = vec![0f32; m * n];
                    matmul_t(kernel, Format::Q8_0, &x, m, k, &w, n, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{a} vs {b} (n = {n}, k = {k}, m = {m}, {kernel:?})"
                        );
                    }
                }
                let zero = BlockQ8_1 {
                    d: 0.0,
                    s: 0.0,
                    qs: [0; QK],
                    sum: 0,
                };
                let mut yq = vec![zero; m * k / QK];
                for (y, x) in yq.chunks_exact_mut(k / QK).zip(x.chunks_exact(k)) {
                    quantize_row_q8_1(x, y);
                }
                for (r, y) in yq.chunks_exact(k / QK).enumerate() {
                    for c in 0..n {
                        let mut e = 0f64;
                        for (bi, y) in y.iter().enumerate() {
                            let b = &w[(c * k / QK + bi) * Q8_0_BYTES..][..Q8_0_BYTES];
                            let d = f64::from(f16_at(b, 0));
                            for j in 0..QK {
                                let q = f64::from(b[2 + j].cast_signed());
                                e += d * q * f64::from(y.qs[j]) * f64::from(y.d);
                            }
                        }
                        let got = f64::from(want[r * n + c]);
                        assert!((got - e).abs() < 1e-5 * f64::from(scale), "{got} vs {e}");
                    }
                }
            }
        }
    }
}
