//! `x · Wᵀ` on the CPU for a GGML `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` or `Q8_0` weight (llama.cpp's "legacy" formats:
//! 32-wide blocks with their own scale; the 256-wide K-quants are [`super::kquants`]), the way llama.cpp computes it:
//! the activations are rounded to 8-bit blocks (32 int8 and an f16 scale; for Q4_1 and Q5_1 also the f16
//! `s = d·Σq` that folds in the weight's minimum, for Q5_0 and Q4_0 the exact Σq that takes off their offset of 16
//! or 8) and each 32-wide block of the dot product is an integer sum scaled by both blocks' scales. candle 0.11 has
//! scalar loops for Q4_1, Q5_0 and Q5_1 (4–5× slower than llama.cpp on SmolLM2's Q4_1 file; Q5_1 is what a q5_k_m
//! file holds for the tensors whose width is not a multiple of 256, most of Qwen2.5-0.5B's at 896); for Q8_0 it has
//! VNNI tiles only for rows a multiple of 256 wide, and SmolLM2's are 576 wide but for `down_proj`: the others, the
//! tied lm_head too, run its one-row AVX2 loop (one chain of FMAs, an out-of-line f16 conversion per block,
//! candle's own rounding of x), 61 tokens/s decoding the Q8_0 file on one thread against 104 here (two threads,
//! `scripts/bench_decode.py`: 0.71× llama.cpp's decode speed before, 1.04× here, 1.23–1.26× with the rows packed
//! eight side by side, [`pack_x8`]; prompt 0.94× → 1.05–1.07×); its Q4_0 product runs a row at a
//! time on rayon's pool (a q4_0 file of `scripts/random_llama_gguf.py`'s shape: 0.39× llama.cpp's decode and 0.24×
//! its prompt tokens/s before, 0.89× and 0.72× with one row at a time (0.85–0.99× with `ops::cached_attention`),
//! 1.14× and 1.13× with the rows packed eight side by side ([`pack_x8`], as llama.cpp's x86 build repacks
//! Q4_0; SmolLM2 q4_0 0.49× → 0.86× → 1.18×, 0.32× → 0.70× → 0.93–0.95×). Packed, Q5_0 too: SmolLM2's q4_k_m
//! (mostly Q5_0) 1.10× → 1.27× and 0.94× → 1.04×. These are llama.cpp's AVX2 kernels (`ggml_vec_dot_q4_1_q8_1`,
//! `ggml_vec_dot_q5_0_q8_0`, `ggml_vec_dot_q8_0_q8_0`; Q5_1's is Q4_1's with the fifth bits, Q4_0's Q5_0's
//! without), with AVX-512 VNNI's byte dot product where the CPU has it, and the scalar formulas elsewhere. The
//! activation rounding follows llama.cpp's x86 `quantize_row_q8_1` / `quantize_row_q8_0` (scale `amax/127`,
//! multiplier `127/amax`, round half to even), so a product here is llama.cpp's up to the order of the float
//! additions.
//!
//! Two rows of x or more (a prompt) run tiles instead of the one-row kernels: a few weight rows × up to 8 rows of
//! x per inner loop (llamafile's tinyBLAS shape), with the activations rounded once per product on the pool's
//! threads and the weight's f16 scales converted once per work item. Q4_1's tiles (`x86::tile!`) repeat the decode
//! kernel's operations for each output, so a prompt row's product is bit for bit the one it has alone, in
//! llama.cpp's order of the float additions (`tests/chat_smollm2.rs`). Q4_0, Q5_0 and Q8_0 weights are packed eight
//! rows side by side on load instead ([`pack_x8`], [`matmul_t_x8`]; their tiles on the GGUF layout, `tile8!`, were
//! dropped). The KV-cached forward runs these for a prompt of any length (`ops::quantized_linear_for_inference`;
//! training keeps the dense product from `ops::QUANTIZED_DENSE_MIN_ROWS` rows on): with
//! `scripts/bench_decode.py FILE --threads 2 --reps 6` (94-token prompt, before and after binaries interleaved)
//! termtune's prompt tokens/s went from 0.49× llama.cpp's to 0.88× on SmolLM2's Q8_0 file and from 0.94× to 1.74×
//! on its Q4_1 file (`--prompt-repeat 4`, 289 tokens: 0.75× → 0.99× and 1.09× → 1.66×), decode unchanged.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use half::f16;

/// Values per block (weights and activations).
pub const QK: usize = 32;
/// Bytes of one `Q4_1` block: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles (value j in the low nibble of
/// byte j, value j+16 in its high nibble); a weight is `d·q + m`.
pub const Q4_1_BYTES: usize = 20;
/// Bytes of one `Q4_0` block: f16 scale `d`, 16 bytes of nibbles laid out as Q4_1's; a weight is `d·(q − 8)`.
pub const Q4_0_BYTES: usize = 18;
/// Bytes of one `Q5_0` block: f16 scale `d`, 4 bytes of fifth bits (bit j for value j), 16 bytes of nibbles laid
/// out as Q4_1's; a weight is `d·(q − 16)`.
pub const Q5_0_BYTES: usize = 22;
/// Bytes of one `Q8_0` block: f16 scale `d`, 32 int8 `q` in value order; a weight is `d·q`.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of one `Q5_1` block: f16 scale `d`, f16 minimum `m`, 4 bytes of fifth bits, 16 bytes of nibbles (as
/// Q5_0's); a weight is `d·q + m`.
pub const Q5_1_BYTES: usize = 24;

/// The GGML block types multiplied here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Activations as `Q8_1` (llama.cpp's `ggml_vec_dot_q4_1_q8_1`).
    Q4_1,
    /// Activations as `Q8_0` (llama.cpp's `ggml_vec_dot_q5_0_q8_0`): the same rounding without `s`.
    Q5_0,
    /// Activations as `Q8_0` (llama.cpp's `ggml_vec_dot_q8_0_q8_0`).
    Q8_0,
    /// Activations as `Q8_1` (llama.cpp's `ggml_vec_dot_q5_1_q8_1`): Q4_1's formula with a fifth bit.
    Q5_1,
    /// Activations as `Q8_0` (llama.cpp's `ggml_vec_dot_q4_0_q8_0`): Q5_0's formula without the fifth bit, offset 8.
    Q4_0,
}

impl Format {
    /// The format of a GGML block type these kernels multiply (`None`: candle's own kernels).
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BYTES,
            Self::Q5_0 => Q5_0_BYTES,
            Self::Q8_0 => Q8_0_BYTES,
            Self::Q5_1 => Q5_1_BYTES,
            Self::Q4_0 => Q4_0_BYTES,
        }
    }

    /// Whether a weight is `d·q + m` (a minimum per block, folded in with the activations' `s`).
    fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }
}

/// One block of activations rounded to 8 bits: `x ≈ d·q`, `s = d·Σq` (f16-rounded, Q4_1's and Q5_1's minimum
/// term), and `Σq` exactly (Q5_0's and Q4_0's offsets). 48 bytes.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; QK],
    sum: i32,
    /// What the tiles and the one-row Q5_0/Q4_0 kernels add to each of the integer dot product's 8 lanes (see
    /// [`Activations`]).
    bias: i32,
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

/// A block's 32 integer weights in value order, its scale `d` and its minimum (0 where the format has none): the
/// weights are `d·q + m`. Nibbles: value j in the low nibble of byte j, value j + 16 in its high nibble; fifth bits:
/// bit j of a 32-bit word for value j; Q4_0's and Q5_0's offsets (8, 16) are taken off q.
fn block_values(format: Format, b: &[u8]) -> ([i32; QK], f32, f32) {
    let mut q = [0i32; QK];
    let nibbles = |q: &mut [i32; QK], at: usize| {
        for j in 0..QK / 2 {
            q[j] = i32::from(b[at + j] & 0x0f);
            q[j + QK / 2] = i32::from(b[at + j] >> 4);
        }
    };
    let fifth = |q: &mut [i32; QK], at: usize| {
        let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        for (j, q) in q.iter_mut().enumerate() {
            *q |= (((qh >> j) & 1) << 4) as i32;
        }
    };
    let (d, mut m) = (f16_at(b, 0), 0.0);
    match format {
        Format::Q4_0 => {
            nibbles(&mut q, 2);
            q.iter_mut().for_each(|q| *q -= 8);
        }
        Format::Q4_1 => {
            nibbles(&mut q, 4);
            m = f16_at(b, 2);
        }
        Format::Q5_0 => {
            nibbles(&mut q, 6);
            fifth(&mut q, 2);
            q.iter_mut().for_each(|q| *q -= 16);
        }
        Format::Q5_1 => {
            nibbles(&mut q, 8);
            fifth(&mut q, 4);
            m = f16_at(b, 2);
        }
        Format::Q8_0 => {
            for (q, &v) in q.iter_mut().zip(&b[2..]) {
                *q = i32::from(v.cast_signed());
            }
        }
    }
    (q, d, m)
}

/// One dot product of a `format` row with a row of rounded activations, the scalar formula: per block the exact
/// integer sum times d·d', plus m·s' where the weight has a minimum.
fn dot_scalar(format: Format, w: &[u8], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(format.block_bytes()).zip(y) {
        let (q, d, m) = block_values(format, b);
        let si: i32 = q.iter().zip(&y.qs).map(|(&q, &qy)| q * i32::from(qy)).sum();
        sum += si as f32 * d * y.d;
        if format.has_min() {
            sum += m * y.s;
        }
    }
    sum
}

// The SIMD kernels: intrinsics need `unsafe` (unaligned loads from slices whose length is checked, and calls into
// `target_feature` functions only after `Kernel::detect` saw those features).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod x86 {
    use super::{
        ActTile, BlockQ8_1, Q4_0_BYTES, Q4_0X8_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_0X8_BYTES,
        Q5_1_BYTES, Q8_0_BYTES, Q8_0X8_BYTES, QK, WeightTile,
    };
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

    /// Unsigned bytes times signed bytes, summed in fours to 8 i32 lanes (AVX2: `maddubs`, then `madd` with ones;
    /// at most 2·31·127 per pair, no saturation for the 4- and 5-bit formats).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_us8(qx: __m256i, qy: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), _mm256_set1_epi16(1))
    }

    /// A Q5_0 block's 32 unsigned q (0..31) as bytes, in value order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q5_0_values(b: &[u8; Q5_0_BYTES]) -> __m256i {
        _mm256_or_si256(nibbles(&b[6..]), fifth_bits(&b[2..6]))
    }

    /// A Q5_1 block's 32 unsigned q (0..31) as bytes, in value order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q5_1_values(b: &[u8; Q5_1_BYTES]) -> __m256i {
        _mm256_or_si256(nibbles(&b[8..]), fifth_bits(&b[4..8]))
    }

    #[target_feature(enable = "avx2")]
    pub fn quantize_row_q8_1_avx2(x: &[f32], out: &mut [BlockQ8_1]) {
        super::quantize_row_q8_1_impl(x, out);
    }

    /// One Q4_1 row against one Q8_1 row (decode), as llama.cpp's `ggml_vec_dot_q4_1_q8_1`: the matrix is read
    /// row after row (see `dot_q8_0` for why four rows side by side is slower). Per block the f16 (d, m) pair
    /// becomes f32 and is multiplied by the activations' (d', s') pair in one instruction; the nibbles times the
    /// activations are summed to 8 i32 lanes by `$prod`, scaled by d·d' and accumulated in f32 lanes, and m·s' in
    /// the second lane of a 128-bit vector. One chain of FMAs, llama.cpp's order of the float additions (its
    /// greedy answer on SmolLM2's Q4_1 file is `tests/chat_smollm2.rs`'s token for token; four chains, blocks i,
    /// i + 4, … into one accumulator, changed it and were no faster): SmolLM2's Q4_1 file decoded at 88–90
    /// tokens/s with four rows side by side (the previous prompt kernel, since replaced by `tile!`), 117–127 with
    /// this (two threads, `scripts/bench_decode.py`: 0.76–0.88× llama.cpp's decode speed before, 1.14–1.18× here). Q5_1 (`ggml_vec_dot_q5_1_q8_1`) is the same with the fifth bits
    /// or'ed into the nibbles (`$load`: a block's 32 unsigned q as bytes).
    macro_rules! dot_q4_1 {
        ($name:ident, $features:literal, $bytes:expr, $load:expr, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: &[u8], y: &[BlockQ8_1]) -> f32 {
                let row = &w.as_chunks::<$bytes>().0[..y.len()];
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
                    let p = $prod($load(b), qy);
                    let scale = _mm256_broadcastss_ps(dm);
                    acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
                }
                hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(mins))
            }
        };
    }

    /// Instantiates `$mac` (`dot_q4_1!`, `tile!`) for Q4_1 (the nibbles) and Q5_1 (the fifth bits or'ed in: q
    /// 0..31, still an unsigned byte), each with AVX2 (`maddubs` + `madd`) and with VNNI (`vpdpbusd`).
    macro_rules! q4_1_and_q5_1 {
        ($mac:ident, $q4_avx2:ident, $q4_vnni:ident, $q5_avx2:ident, $q5_vnni:ident) => {
            $mac!(
                $q4_avx2,
                "avx2,fma,f16c",
                Q4_1_BYTES,
                |b: &[u8; Q4_1_BYTES]| nibbles(&b[4..]),
                |qx, qy| dot_us8(qx, qy)
            );
            $mac!(
                $q4_vnni,
                "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
                Q4_1_BYTES,
                |b: &[u8; Q4_1_BYTES]| nibbles(&b[4..]),
                |qx, qy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy)
            );
            $mac!(
                $q5_avx2,
                "avx2,fma,f16c",
                Q5_1_BYTES,
                |b: &[u8; Q5_1_BYTES]| q5_1_values(b),
                |qx, qy| dot_us8(qx, qy)
            );
            $mac!(
                $q5_vnni,
                "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
                Q5_1_BYTES,
                |b: &[u8; Q5_1_BYTES]| q5_1_values(b),
                |qx, qy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy)
            );
        };
    }

    q4_1_and_q5_1!(
        dot_q4_1,
        dot_q4_1_avx2,
        dot_q4_1_vnni,
        dot_q5_1_avx2,
        dot_q5_1_vnni
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

    /// One Q5_0 (or Q4_0) row against one Q8_0 row (decode), row after row as `dot_q4_1`: per block the
    /// unsigned q (`$load`: 0..31, or 0..15) times the activations summed to i32 lanes by `$prod`, which starts
    /// from the block's `bias` (the offset of 16, or 8, times Σq', taken off in the integers), then scaled by d·d'
    /// into four accumulators (block i into i % 4): a single chain of FMAs (4 cycles each) bounded the loop, as did
    /// the offset's own scalar chain before it moved into the integers. The four are named registers, the loop
    /// unrolled by four: indexed as `acc[i % 4]` they lived on the stack, each FMA a load and a store (Q4_0's
    /// decode product, 2816 × 1024 in cache: 80 → 61–68 µs; the 230M-shape q4_0 file decoded 103 → 112
    /// tokens/s).
    macro_rules! dot_q5_0 {
        ($name:ident, $features:literal, $bytes:expr, $load:expr, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(w: &[u8], y: &[BlockQ8_1]) -> f32 {
                let row = &w.as_chunks::<$bytes>().0[..y.len()];
                let block = |acc: __m256, b: &[u8; $bytes], yb: &BlockQ8_1| {
                    let dw = u16::from_le_bytes([b[0], b[1]]);
                    let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(dw))));
                    // SAFETY: `qs` is 32 bytes.
                    let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                    let p = $prod($load(b), qy, _mm256_set1_epi32(yb.bias));
                    let scale = _mm256_set1_ps(dw * yb.d);
                    _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc)
                };
                // Four accumulators in registers (blocks 4j, 4j + 1, … each into its own): four chains of FMAs.
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let (b4, rest) = row.as_chunks::<4>();
                let (y4, yrest) = y.as_chunks::<4>();
                for (b, yb) in b4.iter().zip(y4) {
                    a0 = block(a0, &b[0], &yb[0]);
                    a1 = block(a1, &b[1], &yb[1]);
                    a2 = block(a2, &b[2], &yb[2]);
                    a3 = block(a3, &b[3], &yb[3]);
                }
                for (b, yb) in rest.iter().zip(yrest) {
                    a0 = block(a0, b, yb);
                }
                hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)))
            }
        };
    }

    dot_q5_0!(
        dot_q5_0_avx2,
        "avx2,fma,f16c",
        Q5_0_BYTES,
        |b: &[u8; Q5_0_BYTES]| q5_0_values(b),
        |qx, qy, bias| _mm256_add_epi32(dot_us8(qx, qy), bias)
    );
    dot_q5_0!(
        dot_q5_0_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        Q5_0_BYTES,
        |b: &[u8; Q5_0_BYTES]| q5_0_values(b),
        |qx, qy, bias| _mm256_dpbusd_epi32(bias, qx, qy)
    );
    dot_q5_0!(
        dot_q4_0_avx2,
        "avx2,fma,f16c",
        Q4_0_BYTES,
        |b: &[u8; Q4_0_BYTES]| nibbles(&b[2..]),
        |qx, qy, bias| _mm256_add_epi32(dot_us8(qx, qy), bias)
    );
    dot_q5_0!(
        dot_q4_0_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        Q4_0_BYTES,
        |b: &[u8; Q4_0_BYTES]| nibbles(&b[2..]),
        |qx, qy, bias| _mm256_dpbusd_epi32(bias, qx, qy)
    );

    /// One Q8_0 row against one Q8_0 row, as llama.cpp's `ggml_vec_dot_q8_0_q8_0`: per block, the signed bytes
    /// multiply as |q|·(q' with q's sign) (`mul_sum_i8_pairs_float`: unsigned × signed byte products are what the
    /// CPU has), summed to i32 lanes by `$prod`, scaled by d·d' and accumulated in f32 lanes. One row at a time,
    /// as llama.cpp, so the matrix is read in order: four rows side by side (a row at k = 576 is ten cache
    /// lines) decoded SmolLM2's Q8_0 file at 38 tokens/s on one thread, one row at a
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

    /// A tile of the product for prompts (several rows of x): `RM` weight rows against `RN` activation rows, the
    /// `RM·RN` dot products side by side, so that each weight block is unpacked once for `RN` rows of x and each
    /// activation block loaded once for `RM` weight rows (llamafile's tinyBLAS `tinyBLAS_Q0_AVX` tiles the same
    /// way). For Q4_1 and Q5_1 (the formats kept in the GGUF layout). Per block and pair: the integer dot product
    /// by `$prod` (8 i32 lanes; `$load` prepares the weight block), scaled by d·d' (`d` the weight scales as f32,
    /// d' the activations') and accumulated in f32 lanes, one chain of FMAs per output in block order; m·s' summed
    /// per block in block order and added after the lanes' sum: `dot_q4_1`'s operations, so each output is bit for
    /// bit the decode kernel's (and llama.cpp's order of the float additions).
    macro_rules! tile {
        ($name:ident, $features:literal, $bytes:expr, $load:expr, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name<const RM: usize, const RN: usize>(
                w: &WeightTile<'_, RM>,
                x: &ActTile<'_, RN>,
            ) -> [[f32; RN]; RM] {
                // The hot loop reads through raw pointers (bounds checks there cost GPRs, the spills of its
                // accumulators and a branch per row of x); these checks make every read in bounds.
                let kb = x.y[0].len();
                for r in 0..RM {
                    assert!(w.q[r].len() == kb * $bytes && w.d[r].len() == kb);
                    assert!(w.m[r].len() == kb);
                }
                for j in 0..RN {
                    assert!(x.y[j].len() == kb);
                }
                assert!(kb == 0 || x.s.len() >= (kb - 1) * x.stride + 8);
                let mut acc = [[_mm256_setzero_ps(); RN]; RM];
                let mut mins = [_mm256_setzero_ps(); RM];
                // Plain loops over the constant RM and RN (unrolled): `array::from_fn`'s closures would not be
                // inlined into this function's target features.
                let zero = _mm256_setzero_si256();
                for i in 0..kb {
                    let mut wq = [zero; RM];
                    let mut wd = [_mm256_setzero_ps(); RM];
                    for r in 0..RM {
                        // SAFETY: i < kb; the row has kb blocks and kb scales (asserted).
                        let b = unsafe { &*w.q[r].as_ptr().add(i * $bytes).cast::<[u8; $bytes]>() };
                        wq[r] = $load(b);
                        wd[r] = _mm256_set1_ps(unsafe { *w.d[r].as_ptr().add(i) });
                    }
                    // s' of the RN rows for block i (lanes past RN belong to other rows: unused).
                    // SAFETY: 8 readable f32 from i·stride (asserted).
                    let s = unsafe { _mm256_loadu_ps(x.s.as_ptr().add(i * x.stride)) };
                    for r in 0..RM {
                        // SAFETY: i < kb, kb minima (asserted).
                        let m = _mm256_set1_ps(unsafe { *w.m[r].as_ptr().add(i) });
                        mins[r] = _mm256_add_ps(mins[r], _mm256_mul_ps(m, s));
                    }
                    for j in 0..RN {
                        // SAFETY: i < kb, kb blocks in the row (asserted).
                        let yb = unsafe { &*x.y[j].as_ptr().add(i) };
                        // SAFETY: `qs` is 32 bytes.
                        let qy = unsafe { _mm256_loadu_si256(yb.qs.as_ptr().cast()) };
                        let dy = _mm256_set1_ps(yb.d);
                        for r in 0..RM {
                            let p = _mm256_cvtepi32_ps($prod(wq[r], qy));
                            acc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(wd[r], dy), p, acc[r][j]);
                        }
                    }
                }
                // Plain loops here too: a closure taking `acc` would keep it in memory, stored on every block.
                let mut out = [[0f32; RN]; RM];
                for r in 0..RM {
                    let mut m = [0f32; 8];
                    // SAFETY: `m` is 8 f32.
                    unsafe { _mm256_storeu_ps(m.as_mut_ptr(), mins[r]) };
                    for j in 0..RN {
                        out[r][j] = hsum(acc[r][j]) + m[j];
                    }
                }
                out
            }
        };
    }

    q4_1_and_q5_1!(
        tile,
        tile_q4_1_avx2,
        tile_q4_1_vnni,
        tile_q5_1_avx2,
        tile_q5_1_vnni
    );

    /// The 8 lanes' sums of 8 vectors, in one vector (lane j: the sum of `p[j]`'s lanes).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn hsum8_epi32(p: [__m256i; 8]) -> __m256i {
        let a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        let b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
        // a: rows 0..3 of the low 128-bit halves, then of the high ones; b: rows 4..7.
        _mm256_add_epi32(
            _mm256_permute2x128_si256(a, b, 0x20),
            _mm256_permute2x128_si256(a, b, 0x31),
        )
    }

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        let mut a = [0f32; 8];
        // SAFETY: `a` is 8 f32.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    /// The fifth bits of values `at..at + 4` (`at` a multiple of 4) of eight packed Q5_0 rows as 0 or 16 in bytes
    /// 0..3 of each lane, `qh` holding row r's 32 fifth bits in lane r: the byte holding the four bits copied to
    /// the lane's four bytes, each byte masked to its own bit, compared, masked to 16.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fifth_bits_x8(qh: __m256i, at: usize) -> __m256i {
        let byte = (at / 8) as i8;
        // Byte i of each 128-bit half reads byte `byte` of its own 32-bit lane.
        let spread: [i8; 32] = std::array::from_fn(|i| byte + 4 * (i % 16 / 4) as i8);
        // SAFETY: `spread` is 32 bytes.
        let spread = unsafe { _mm256_loadu_si256(spread.as_ptr().cast()) };
        let first = if at.is_multiple_of(8) {
            0x0804_0201
        } else {
            0x8040_2010_u32 as i32
        };
        let bits = _mm256_set1_epi32(first);
        let set = _mm256_cmpeq_epi8(
            _mm256_and_si256(_mm256_shuffle_epi8(qh, spread), bits),
            bits,
        );
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// `RN` rows of activations against eight packed rows ([`super::pack_x8`]), as llama.cpp's x86 build
    /// multiplies its repacked Q4_0 (`ggml_gemv_q4_0_8x8_q8_0`, `ggml_gemm_…`): per block each weight vector is
    /// decoded once (`$decode`: eight vectors of 32 bytes, lane r row r's four values, with the offsets of the four
    /// activation bytes each meets, broadcast) and serves the `RN` rows of x; per row and block the integer sums
    /// start from `$bias` of the block's `bias` (the formats' offsets, or VNNI's q + 128, taken off in the
    /// integers), two chains, are scaled by d·d' (the eight rows' scales converted in one instruction) and
    /// accumulated in f32 lanes, lane r row r's: no horizontal sums, one scale conversion per eight rows. One row
    /// of x is a decode step. Against the one-row kernels on the plain layout (`dot_q5_0!`, `dot_q8_0!`; a
    /// 2816 × 1024 product on this 2-core Zen 4, medians of 7): decode Q4_0 60–67 → 21–23 µs in cache and 74–85
    /// → 53–59 µs streamed from memory, Q5_0 88 → 41 and 100 → 71 µs, Q8_0 92 → 27 µs in cache (streamed, both
    /// ~130 µs: memory-bound); 64 rows of x, against the GGUF layout's tiles (`tile8!`, since dropped): Q4_0 2.0–2.4 → 1.0–1.1
    /// ms, Q5_0 2.1–2.3 → 1.2–1.4 ms, Q8_0 1.7–2.3 → 1.0–1.1 ms.
    macro_rules! gemm_x8 {
        ($name:ident, $features:literal, $bytes:expr, $decode:expr, $bias:expr, $prod:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name<const RN: usize>(g: &[u8], ys: [&[BlockQ8_1]; RN]) -> [[f32; 8]; RN] {
                let kb = ys[0].len();
                let blocks = &g.as_chunks::<{ $bytes }>().0[..kb];
                let mut acc = [_mm256_setzero_ps(); RN];
                for (i, b) in blocks.iter().enumerate() {
                    // SAFETY: bytes 0..16 are the eight f16 scales.
                    let d = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().cast())) };
                    let (w, at): ([__m256i; 8], [usize; 8]) = $decode(b);
                    for j in 0..RN {
                        let yb = &ys[j][i];
                        let yv = |at: usize| {
                            let four = [yb.qs[at], yb.qs[at + 1], yb.qs[at + 2], yb.qs[at + 3]];
                            _mm256_set1_epi32(i32::from_le_bytes(four.map(|v| v as u8)))
                        };
                        let mut even = _mm256_set1_epi32($bias(yb.bias));
                        let mut odd = _mm256_setzero_si256();
                        for v in (0..8).step_by(2) {
                            even = $prod(even, w[v], yv(at[v]));
                            odd = $prod(odd, w[v + 1], yv(at[v + 1]));
                        }
                        let p = _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd));
                        acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(yb.d)), p, acc[j]);
                    }
                }
                let mut out = [[0f32; 8]; RN];
                for (o, a) in out.iter_mut().zip(acc) {
                    // SAFETY: `o` is 8 f32.
                    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
                }
                out
            }
        };
    }

    /// Q4_0's (or Q5_0's, `q5`) eight weight vectors of a packed block: the low and high nibbles of each of the
    /// four 32-byte groups (values 4c.. and 16 + 4c.. of each row), Q5_0's with their fifth bits.
    #[inline(always)]
    fn nibble_vectors<const BYTES: usize>(b: &[u8; BYTES], q5: bool) -> ([__m256i; 8], [usize; 8]) {
        let qs = if q5 { 48 } else { 16 };
        // SAFETY: the callers are compiled with AVX2; bytes qs + 32c..qs + 32 + 32c ≤ BYTES, Q5_0's 16..48.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let qh = if q5 {
                _mm256_loadu_si256(b[16..].as_ptr().cast())
            } else {
                _mm256_setzero_si256()
            };
            let mut w = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let l = _mm256_loadu_si256(b[qs + 32 * c..].as_ptr().cast());
                w[2 * c] = _mm256_and_si256(l, m4);
                w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
                if q5 {
                    w[2 * c] = _mm256_or_si256(w[2 * c], fifth_bits_x8(qh, 4 * c));
                    w[2 * c + 1] = _mm256_or_si256(w[2 * c + 1], fifth_bits_x8(qh, 16 + 4 * c));
                }
            }
            (w, [0, 16, 4, 20, 8, 24, 12, 28])
        }
    }

    /// Q8_0's eight weight vectors of a packed block (values 4c..4c + 3 of each row), `flip`ped to q + 128 for
    /// VNNI's unsigned operand.
    #[inline(always)]
    fn q8_vectors(b: &[u8; Q8_0X8_BYTES], flip: bool) -> ([__m256i; 8], [usize; 8]) {
        // SAFETY: the callers are compiled with AVX2; bytes 16 + 32c..48 + 32c ≤ 272.
        unsafe {
            let x = _mm256_set1_epi8(if flip { -128 } else { 0 });
            let w = std::array::from_fn(|c| {
                _mm256_xor_si256(_mm256_loadu_si256(b[16 + 32 * c..].as_ptr().cast()), x)
            });
            (w, [0, 4, 8, 12, 16, 20, 24, 28])
        }
    }

    /// `gemm_x8!` for Q4_0 or Q5_0 (`$q5`), with AVX2 and with VNNI: the nibbles (0..15, or 0..31 with the fifth
    /// bits) are unsigned bytes, the activations signed; 8·`bias` takes off the offset of 8 (or 16).
    macro_rules! nibble_gemm {
        ($avx2:ident, $vnni:ident, $bytes:expr, $q5:literal) => {
            gemm_x8!(
                $avx2,
                "avx2,fma,f16c",
                $bytes,
                |b| nibble_vectors(b, $q5),
                |bias: i32| 8 * bias,
                |acc, qx, qy| _mm256_add_epi32(acc, dot_us8(qx, qy))
            );
            gemm_x8!(
                $vnni,
                "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
                $bytes,
                |b| nibble_vectors(b, $q5),
                |bias: i32| 8 * bias,
                |acc, qx, qy| _mm256_dpbusd_epi32(acc, qx, qy)
            );
        };
    }

    nibble_gemm!(gemm_q4_0x8_avx2, gemm_q4_0x8_vnni, Q4_0X8_BYTES, false);
    nibble_gemm!(gemm_q5_0x8_avx2, gemm_q5_0x8_vnni, Q5_0X8_BYTES, true);
    gemm_x8!(
        gemm_q8_0x8_avx2,
        "avx2,fma,f16c",
        Q8_0X8_BYTES,
        |b| q8_vectors(b, false),
        |_bias: i32| 0,
        |acc, qx, qy| _mm256_add_epi32(
            acc,
            dot_us8(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx))
        )
    );
    gemm_x8!(
        gemm_q8_0x8_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        Q8_0X8_BYTES,
        |b| q8_vectors(b, true),
        |bias: i32| 8 * bias,
        |acc, qx, qy| _mm256_dpbusd_epi32(acc, qx, qy)
    );

    const _: () = assert!(QK == 32);
}

/// `RM` rows of a weight (raw blocks) with their f16 scales as f32 (`d` per block; `m`, Q4_1's and Q5_1's
/// minimum, per block, else empty): the weight side of a tile.
pub struct WeightTile<'a, const RM: usize> {
    q: [&'a [u8]; RM],
    d: [&'a [f32]; RM],
    m: [&'a [f32]; RM],
}

/// `RN` rows of rounded activations: the other side of a tile. `s` (Q4_1, Q5_1) holds s' block-major: the row j's of
/// block i at `s[i·stride + j]`, 8 readable from each, so a tile loads its rows' s' for one block as one vector.
pub struct ActTile<'a, const RN: usize> {
    y: [&'a [BlockQ8_1]; RN],
    s: &'a [f32],
    stride: usize,
}

/// The activations of one product, rounded once: `m` rows of `kb` blocks, and what the tiles read besides.
struct Activations {
    blocks: Vec<BlockQ8_1>,
    kb: usize,
    /// Q4_1 and Q5_1: s' block-major (see [`ActTile`]), `stride` = m + 8 (zero-padded).
    s: Vec<f32>,
    stride: usize,
}

impl Activations {
    fn new(kernel: Kernel, format: Format, x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / QK;
        let zero = BlockQ8_1 {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
            sum: 0,
            bias: 0,
        };
        let mut blocks = vec![zero; m * kb];
        round_rows(x, k, &mut blocks, kb, quantize_row_q8_1);
        let tiles = m > 1 && kernel != Kernel::Scalar;
        let stride = m + 8;
        let s = if tiles && format.has_min() {
            block_major(&blocks, kb, stride, |b| b.s)
        } else {
            Vec::new()
        };
        // The blocks' `bias`, added to each of a one-row kernel's 8 lanes (8 of it to a packed row's, `x86::gemm_x8!`):
        // Q5_0's offset, −2·Σq' per lane (−16·Σq' in all), Q4_0's −Σq'; Q8_0's −16·Σq' per lane for VNNI's q + 128.
        let per_lane = match format {
            Format::Q5_0 => -2,
            Format::Q4_0 => -1,
            #[cfg(target_arch = "x86_64")]
            Format::Q8_0 if kernel == Kernel::Vnni => -16,
            _ => 0,
        };
        if kernel != Kernel::Scalar && per_lane != 0 {
            for b in &mut blocks {
                b.bias = per_lane * b.sum;
            }
        }
        Self {
            blocks,
            kb,
            s,
            stride,
        }
    }

    fn row(&self, r: usize) -> &[BlockQ8_1] {
        &self.blocks[r * self.kb..(r + 1) * self.kb]
    }

    /// The tile of rows `r0..r0 + RN`.
    fn tile<const RN: usize>(&self, r0: usize) -> ActTile<'_, RN> {
        ActTile {
            y: std::array::from_fn(|j| self.row(r0 + j)),
            s: self.s.get(r0..).unwrap_or(&[]),
            stride: self.stride,
        }
    }
}

/// `f` of each block of rows of `kb` blocks, block-major: block i of row r at `i·stride + r`, zero past the last
/// row (`stride` ≥ rows + 8, so a tile's 8 rows of one block read as one vector).
pub(crate) fn block_major<B>(
    blocks: &[B],
    kb: usize,
    stride: usize,
    f: impl Fn(&B) -> f32,
) -> Vec<f32> {
    let mut v = vec![0f32; kb * stride];
    for (r, row) in blocks.chunks_exact(kb).enumerate() {
        for (i, b) in row.iter().enumerate() {
            v[i * stride + r] = f(b);
        }
    }
    v
}

/// Rounds the `x.len() / k` rows of x (each `k` wide) into `kb` blocks each of `out` with `round`: a prompt's rows
/// (8 or more) on the pool's threads (one thread would round them while the others wait).
pub(crate) fn round_rows<B: Send>(
    x: &[f32],
    k: usize,
    out: &mut [B],
    kb: usize,
    round: fn(&[f32], &mut [B]),
) {
    let m = x.len() / k;
    if m < 8 {
        for (y, x) in out.chunks_exact_mut(kb).zip(x.chunks_exact(k)) {
            round(x, y);
        }
        return;
    }
    let rows: Vec<Mutex<&mut [B]>> = out.chunks_exact_mut(kb).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(m, |range| {
        for r in range {
            let mut y = rows[r].lock().unwrap_or_else(PoisonError::into_inner);
            round(&x[r * k..(r + 1) * k], &mut y);
        }
    });
}

/// Runs `item(c0, cols, out)` for each group of [`COLS_PER_ITEM`] output columns (`c0..c0 + cols`) of the
/// `m × n` product `dst`, on candle's spinning thread pool (the one its own quantized products use: a decode step
/// makes hundreds of small products, and a second pool, rayon's, would wake and park threads for each and fight
/// it for the cores). Each output element is written by exactly one item, straight into `dst` through `out`
/// (relaxed atomic stores, plain stores on x86).
pub(crate) fn for_each_column_group(
    n: usize,
    dst: &mut [f32],
    item: impl Fn(usize, usize, &[AtomicU32]) + Sync,
) {
    // SAFETY: `AtomicU32` has the size and alignment of `u32`, so of `f32`; `dst` is borrowed mutably for the
    // whole view, so nothing else reads or writes it meanwhile; the atomics make the shared writes sound.
    #[allow(unsafe_code)]
    let out: &[AtomicU32] = unsafe { &*(std::ptr::from_mut::<[f32]>(dst) as *const [AtomicU32]) };
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(COLS_PER_ITEM), |range| {
        for g in range {
            let c0 = g * COLS_PER_ITEM;
            item(c0, COLS_PER_ITEM.min(n - c0), out);
        }
    });
}

/// The tiles of `m` rows of x, as (first row, rows): 8 rows while 8 are left (at most `max_rows`), then 4, 2, 1.
pub(crate) fn row_tiles(m: usize, max_rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut r0 = 0;
    std::iter::from_fn(move || {
        let rows = [8, 4, 2, 1]
            .into_iter()
            .find(|&r| r <= max_rows && r0 + r <= m)?;
        r0 += rows;
        Some((r0 - rows, rows))
    })
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
    /// Every kernel this CPU can run, the scalar formula first (the kernels' tests compare them all).
    #[cfg(test)]
    pub(crate) fn all_here() -> Vec<Self> {
        let mut out = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                out.push(Self::Avx2);
            }
            if Self::detect() == Self::Vnni {
                out.push(Self::Vnni);
            }
        }
        out
    }

    /// The fastest kernel this CPU has (looked up once: every quantized product asks).
    pub fn detect() -> Self {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(Self::probe)
    }

    fn probe() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
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

    /// Rows of x per tile: 8, or 4 with AVX2 (16 vector registers, against AVX-512's 32).
    fn max_tile_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => 4,
            _ => 8,
        }
    }

    /// The `RM × RN` dot products of a tile (see `x86::tile!`; Q4_0, Q5_0 and Q8_0 weights are packed on a CPU
    /// with these kernels, [`matmul_t_x8`]: a tile of theirs here, a weight of fewer than 8 rows, is the scalar
    /// formula's).
    #[allow(unsafe_code)]
    fn tile<const RM: usize, const RN: usize>(
        self,
        format: Format,
        w: &WeightTile<'_, RM>,
        x: &ActTile<'_, RN>,
    ) -> [[f32; RN]; RM] {
        match (self, format) {
            // SAFETY: `detect` saw the features these kernels are compiled for.
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q4_1) => unsafe { x86::tile_q4_1_avx2(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q4_1) => unsafe { x86::tile_q4_1_vnni(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q5_1) => unsafe { x86::tile_q5_1_avx2(w, x) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q5_1) => unsafe { x86::tile_q5_1_vnni(w, x) },
            _ => {
                std::array::from_fn(|r| std::array::from_fn(|j| dot_scalar(format, w.q[r], x.y[j])))
            }
        }
    }

    /// One `Q8_0` row of W against one row of activations.
    #[allow(unsafe_code)]
    fn dot_q8_0(self, w: &[u8], y: &[BlockQ8_1]) -> f32 {
        match self {
            Self::Scalar => dot_scalar(Format::Q8_0, w, y),
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
            (Self::Avx2, Format::Q5_1) => unsafe { x86::dot_q5_1_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q5_1) => unsafe { x86::dot_q5_1_vnni(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q5_0) => unsafe { x86::dot_q5_0_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q5_0) => unsafe { x86::dot_q5_0_vnni(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q4_0) => unsafe { x86::dot_q4_0_avx2(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q4_0) => unsafe { x86::dot_q4_0_vnni(w, y) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2 | Self::Vnni, Format::Q8_0) => self.dot_q8_0(w, y),
        }
    }
}

/// Columns of the output one work item computes (a multiple of [`TILE_W`] and of the 8 packed rows of
/// [`matmul_t_x8`]).
const COLS_PER_ITEM: usize = 16;

/// Weight rows of a tile.
const TILE_W: usize = 2;

/// The weight side of the tiles of one work item: its rows' f16 scales converted once (not once per tile of x).
struct ItemWeights<'a> {
    rows: Vec<&'a [u8]>,
    d: Vec<f32>,
    m: Vec<f32>,
    kb: usize,
}

impl<'a> ItemWeights<'a> {
    fn new(format: Format, rows: Vec<&'a [u8]>, kb: usize) -> Self {
        let bytes = format.block_bytes();
        let mut d = Vec::with_capacity(rows.len() * kb);
        let mut m = Vec::new();
        for row in &rows {
            for b in row.chunks_exact(bytes) {
                d.push(f16_at(b, 0));
                if format.has_min() {
                    m.push(f16_at(b, 2));
                }
            }
        }
        Self { rows, d, m, kb }
    }

    /// Rows `c..c + RM`; past the last row, the last row again (its products are computed and not stored).
    fn tile<const RM: usize>(&self, c: usize) -> WeightTile<'_, RM> {
        let kb = self.kb;
        let row = |r: usize| (c + r).min(self.rows.len() - 1);
        WeightTile {
            q: std::array::from_fn(|r| self.rows[row(r)]),
            d: std::array::from_fn(|r| &self.d[row(r) * kb..(row(r) + 1) * kb]),
            m: std::array::from_fn(|r| self.m.get(row(r) * kb..(row(r) + 1) * kb).unwrap_or(&[])),
        }
    }
}

/// The products of activation rows `r0..r0 + RN` with all of a work item's weight rows (columns `c0..` of the
/// output), `RM` weight rows at a time.
#[allow(clippy::too_many_arguments)]
fn tile_rows<const RM: usize, const RN: usize>(
    tile: impl Fn(&WeightTile<'_, RM>, &ActTile<'_, RN>) -> [[f32; RN]; RM],
    acts: &Activations,
    r0: usize,
    weights: &ItemWeights<'_>,
    c0: usize,
    n: usize,
    out: &[AtomicU32],
) {
    let x = acts.tile::<RN>(r0);
    let cols = weights.rows.len();
    for c in (0..cols).step_by(RM) {
        let v = tile(&weights.tile::<RM>(c), &x);
        for (dc, v) in v.iter().enumerate().take(cols - c) {
            for (j, v) in v.iter().enumerate() {
                out[(r0 + j) * n + c0 + c + dc].store(v.to_bits(), Ordering::Relaxed);
            }
        }
    }
}

/// The shapes every quantized product checks (a mismatch is a bug in the caller, not bad input): `k` a multiple of
/// the format's `block` values, `w` the blocks (`block_bytes` each) of an (n, k) weight, x (m × k) and dst (m × n).
/// Returns the bytes of one weight row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_product(
    what: &str,
    block: usize,
    block_bytes: usize,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    dst: &[f32],
) -> usize {
    assert!(
        k.is_multiple_of(block),
        "{what}: k = {k} is not a multiple of {block}"
    );
    let row_bytes = k / block * block_bytes;
    assert_eq!(
        w.len(),
        n * row_bytes,
        "{what}: weight bytes for ({n}, {k})"
    );
    assert_eq!(x.len(), m * k, "{what}: input length");
    assert_eq!(dst.len(), m * n, "{what}: output length");
    row_bytes
}

/// `dst (m × n) = x (m × k) · Wᵀ` for `w` the raw bytes of a `format` tensor of shape (n, k), `k` a multiple of
/// [`QK`]. The activations are rounded once. The work items are groups of output columns (each weight row is read
/// once for all m rows of x, [`for_each_column_group`]). One row of x (decoding) runs the one-row kernels; more (a
/// prompt) run tiles of [`TILE_W`] weight rows × 8, then 4, 2, 1 rows of x (at most 4 with AVX2, which has half the
/// registers).
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
    let kb = k / QK;
    let row_bytes = check_product(
        "legacy_quants",
        QK,
        format.block_bytes(),
        x,
        m,
        k,
        w,
        n,
        dst,
    );
    if m == 0 || n == 0 {
        return;
    }
    let acts = Activations::new(kernel, format, x, m, k);
    let wrow = |c: usize| &w[c * row_bytes..(c + 1) * row_bytes];
    let max_rows = kernel.max_tile_rows();
    for_each_column_group(n, dst, |c0, cols, out| {
        if m == 1 {
            // Decode: one weight row after the other (see `x86::dot_q4_1` and `x86::dot_q8_0`).
            let y = acts.row(0);
            for (c, o) in out.iter().enumerate().skip(c0).take(cols) {
                o.store(kernel.dot(format, wrow(c), y).to_bits(), Ordering::Relaxed);
            }
            return;
        }
        let weights = ItemWeights::new(format, (c0..c0 + cols).map(wrow).collect(), kb);
        for (r0, rows) in row_tiles(m, max_rows) {
            // One instantiation per tile shape (the shapes are const generics).
            macro_rules! rows_of {
                ($rm:expr, $rn:literal, $tile:ident) => {
                    tile_rows::<$rm, $rn>(
                        |w, x| kernel.$tile(format, w, x),
                        &acts,
                        r0,
                        &weights,
                        c0,
                        n,
                        out,
                    )
                };
            }
            match rows {
                8 => rows_of!(TILE_W, 8, tile),
                4 => rows_of!(TILE_W, 4, tile),
                2 => rows_of!(TILE_W, 2, tile),
                _ => rows_of!(TILE_W, 1, tile),
            }
        }
    });
}

/// Bytes of one block of eight Q4_0 rows packed side by side ([`pack_x8`]).
pub const Q4_0X8_BYTES: usize = 8 * Q4_0_BYTES;
/// Bytes of one block of eight Q5_0 rows packed side by side ([`pack_x8`]).
pub const Q5_0X8_BYTES: usize = 8 * Q5_0_BYTES;
/// Bytes of one block of eight Q8_0 rows packed side by side ([`pack_x8`]).
pub const Q8_0X8_BYTES: usize = 8 * Q8_0_BYTES;

impl Format {
    /// Whether [`pack_x8`] packs the format (its blocks are an f16 scale, then whole groups of 4 bytes).
    pub fn packs_x8(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q5_0 | Self::Q8_0)
    }
}

/// Rows of a Q4_0, Q5_0 or Q8_0 weight (`n` of `kb` blocks, the GGUF layout) with their blocks eight rows side by
/// side, as llama.cpp's x86 build repacks Q4_0 and Q8_0 on load: for rows 8g..8g + 7 and block b, the eight f16
/// scales, then for each group c of four bytes after a block's scale (Q4_0: four of nibbles; Q5_0: its 32 fifth
/// bits, then four of nibbles; Q8_0: eight of quants) those bytes of each row, row after row — so 32 bytes of
/// quants hold values 4c..4c + 3 of the eight rows, lane r row r's (the nibbles also values 16 + 4c.. in their high
/// halves). The `n % 8` last rows follow in the GGUF layout. The same bytes, moved: [`unpack_x8`] gives the input
/// back.
pub fn pack_x8(format: Format, w: &[u8], n: usize, kb: usize) -> Vec<u8> {
    assert!(format.packs_x8(), "pack_x8: {format:?}");
    let bytes = format.block_bytes();
    let row = kb * bytes;
    assert_eq!(w.len(), n * row, "pack_x8: weight bytes for {n} rows");
    let mut out = Vec::with_capacity(w.len());
    for g in 0..n / 8 {
        for b in 0..kb {
            let blk = |r: usize| &w[(8 * g + r) * row + b * bytes..][..bytes];
            for r in 0..8 {
                out.extend_from_slice(&blk(r)[..2]);
            }
            for c in 0..(bytes - 2) / 4 {
                for r in 0..8 {
                    out.extend_from_slice(&blk(r)[2 + 4 * c..][..4]);
                }
            }
        }
    }
    out.extend_from_slice(&w[n / 8 * 8 * row..]);
    out
}

/// The GGUF layout of rows packed by [`pack_x8`].
pub fn unpack_x8(format: Format, p: &[u8], n: usize, kb: usize) -> Vec<u8> {
    let bytes = format.block_bytes();
    let row = kb * bytes;
    assert_eq!(p.len(), n * row, "unpack_x8: packed bytes for {n} rows");
    let mut out = vec![0u8; p.len()];
    for r in 0..n / 8 * 8 {
        for b in 0..kb {
            x8_block(
                format,
                p,
                kb,
                r,
                b,
                &mut out[r * row + b * bytes..][..bytes],
            );
        }
    }
    let tail = n / 8 * 8 * row;
    out[tail..].copy_from_slice(&p[tail..]);
    out
}

/// Block `b` of row `r` (in a group of eight) of rows packed by [`pack_x8`], in the GGUF layout, into `out`.
pub fn x8_block(format: Format, p: &[u8], kb: usize, r: usize, b: usize, out: &mut [u8]) {
    let bytes = format.block_bytes();
    let (g, lane) = (r / 8, r % 8);
    let packed = &p[(g * kb + b) * 8 * bytes..][..8 * bytes];
    out[..2].copy_from_slice(&packed[2 * lane..][..2]);
    for c in 0..(bytes - 2) / 4 {
        out[2 + 4 * c..][..4].copy_from_slice(&packed[16 + 32 * c + 4 * lane..][..4]);
    }
}

impl Kernel {
    /// Eight packed rows' `kb` blocks (one group of [`pack_x8`]) against `RN` rows of activations: the `RN × 8`
    /// products.
    #[allow(unsafe_code)]
    fn gemm_x8<const RN: usize>(
        self,
        format: Format,
        g: &[u8],
        ys: [&[BlockQ8_1]; RN],
    ) -> [[f32; 8]; RN] {
        match (self, format) {
            // SAFETY: `detect` saw the features these kernels are compiled for.
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q4_0) => unsafe { x86::gemm_q4_0x8_avx2(g, ys) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q4_0) => unsafe { x86::gemm_q4_0x8_vnni(g, ys) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q5_0) => unsafe { x86::gemm_q5_0x8_avx2(g, ys) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q5_0) => unsafe { x86::gemm_q5_0x8_vnni(g, ys) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Format::Q8_0) => unsafe { x86::gemm_q8_0x8_avx2(g, ys) },
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q8_0) => unsafe { x86::gemm_q8_0x8_vnni(g, ys) },
            _ => ys.map(|y| {
                std::array::from_fn(|r| {
                    let mut row = vec![0u8; y.len() * format.block_bytes()];
                    for (b, out) in row.chunks_exact_mut(format.block_bytes()).enumerate() {
                        x8_block(format, g, y.len(), r, b, out);
                    }
                    dot_scalar(format, &row, y)
                })
            }),
        }
    }
}

/// `dst (m × n) = x (m × k) · Wᵀ` for `w` a Q4_0, Q5_0 or Q8_0 weight (n, k) packed by [`pack_x8`]: the activations
/// rounded once, the work items groups of output columns as [`matmul_t`]'s; each eight packed rows meet the rows
/// of x four at a time (two with AVX2, which has half the registers; `x86::gemm_x8!`: their bytes, 8·k/32 blocks,
/// stay in the L1 cache across x's rows), the `n % 8` last rows run the one-row kernel.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t_x8(
    kernel: Kernel,
    format: Format,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    dst: &mut [f32],
) {
    assert!(format.packs_x8(), "matmul_t_x8: {format:?}");
    let row_bytes = check_product("matmul_t_x8", QK, format.block_bytes(), x, m, k, w, n, dst);
    if m == 0 || n == 0 {
        return;
    }
    let acts = Activations::new(kernel, format, x, m, k);
    let group_bytes = 8 * row_bytes;
    let max_rows = kernel.max_tile_rows() / 2;
    let packed_rows = n / 8 * 8;
    const _: () = assert!(COLS_PER_ITEM.is_multiple_of(8));
    for_each_column_group(n, dst, |c0, cols, out| {
        let packed_end = (c0 + cols).min(packed_rows);
        for g in (c0..packed_end).step_by(8).map(|c| c / 8) {
            let gw = &w[g * group_bytes..(g + 1) * group_bytes];
            let store = |r0: usize, v: &[[f32; 8]]| {
                for (r, v) in v.iter().enumerate() {
                    for (j, v) in v.iter().enumerate() {
                        out[(r0 + r) * n + 8 * g + j].store(v.to_bits(), Ordering::Relaxed);
                    }
                }
            };
            for (r0, tile) in row_tiles(m, max_rows) {
                let rows: [_; 4] = std::array::from_fn(|j| acts.row((r0 + j).min(m - 1)));
                match tile {
                    4 => store(r0, &kernel.gemm_x8::<4>(format, gw, rows)),
                    2 => store(r0, &kernel.gemm_x8::<2>(format, gw, [rows[0], rows[1]])),
                    _ => store(r0, &kernel.gemm_x8::<1>(format, gw, [rows[0]])),
                }
            }
        }
        for c in packed_end.max(c0)..c0 + cols {
            let wr = &w[c * row_bytes..(c + 1) * row_bytes];
            for r in 0..m {
                let v = kernel.dot(format, wr, acts.row(r));
                out[r * n + c].store(v.to_bits(), Ordering::Relaxed);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `x · Wᵀ` by the scalar formula, after checking that every kernel this CPU has gives it within 1e-5 of the
    /// largest output (random signs cancel: errors are measured against the largest output, not each one).
    fn scalar_checked(
        format: Format,
        x: &[f32],
        m: usize,
        k: usize,
        w: &[u8],
        n: usize,
    ) -> Vec<f32> {
        let mut want = vec![0f32; m * n];
        matmul_t(Kernel::Scalar, format, x, m, k, w, n, &mut want);
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        for kernel in Kernel::all_here() {
            let mut got = vec![0f32; m * n];
            matmul_t(kernel, format, x, m, k, w, n, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{a} vs {b} at ({}, {}) ({format:?}, n = {n}, k = {k}, m = {m}, {kernel:?})",
                    i / n,
                    i % n
                );
            }
        }
        want
    }

    /// The rows of x (each `k` wide) rounded as the kernels round them.
    fn rounded(x: &[f32], k: usize) -> Vec<BlockQ8_1> {
        let zero = BlockQ8_1 {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
            sum: 0,
            bias: 0,
        };
        let mut yq = vec![zero; x.len() / QK];
        for (y, x) in yq.chunks_exact_mut(k / QK).zip(x.chunks_exact(k)) {
            quantize_row_q8_1(x, y);
        }
        yq
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
            let want = scalar_checked(Format::Q4_1, &x, m, k, &w, n);
            // And the scalar formula is the product with the dequantized weight and the rounded activations.
            let yq = rounded(&x[..k], k);
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
            let want = scalar_checked(Format::Q5_0, &x, m, k, &w, n);
            let yq = rounded(&x[..k], k);
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
                let want = scalar_checked(Format::Q8_0, &x, m, k, &w, n);
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                let yq = rounded(&x, k);
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

    /// Q5_1 and Q4_0 blocks as candle writes them (`QTensor::quantize`, the GGUF layout): every kernel this CPU
    /// has gives the scalar formula's products for 1 to 9 rows of x, and the formula is the product of candle's
    /// dequantized weights (d·q + m, d·(q − 8)) with the rounded activations.
    #[test]
    fn q5_1_and_q4_0_kernels_agree_with_candle_s_dequantized_weights() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(51);
        let (n, k) = (21, 192);
        for (ty, format) in [
            (GgmlDType::Q5_1, Format::Q5_1),
            (GgmlDType::Q4_0, Format::Q4_0),
        ] {
            let dense: Vec<f32> = (0..n * k)
                .map(|i| rng.random_range(-0.05f32..0.08) + if i % 64 < 3 { 0.3 } else { 0.0 })
                .collect();
            let t =
                candle_core::Tensor::from_vec(dense, (n, k), &candle_core::Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, ty).unwrap();
            let w = q.data().unwrap().into_owned();
            assert_eq!(w.len(), n * k / QK * format.block_bytes());
            let wd: Vec<f32> = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for m in [1, 2, 5, 9] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| rng.random_range(-1f32..1.0) * if i % 7 == 0 { 10.0 } else { 1.0 })
                    .collect();
                let want = scalar_checked(format, &x, m, k, &w, n);
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                let yq = rounded(&x, k);
                for (r, y) in yq.chunks_exact(k / QK).enumerate() {
                    for c in 0..n {
                        let mut e = 0f64;
                        for (bi, y) in y.iter().enumerate() {
                            for j in 0..QK {
                                let wv = f64::from(wd[c * k + bi * QK + j]);
                                e += wv * f64::from(y.qs[j]) * f64::from(y.d);
                            }
                        }
                        // s = d·Σq is rounded to f16: the minimum's term is within an f16 ulp of the exact one.
                        let got = f64::from(want[r * n + c]);
                        assert!(
                            (got - e).abs() < 2e-3 * f64::from(scale),
                            "{got} vs {e} ({format:?})"
                        );
                    }
                }
            }
        }
    }

    /// Q4_0, Q5_0 and Q8_0 packed eight rows at a time: unpacking gives the GGUF bytes back, each block reads back where
    /// it came from, and every kernel this CPU has multiplies the packed weight as the scalar formula multiplies
    /// the plain one (row counts below 8, a multiple of 8 and neither, so the plain last rows and the work items'
    /// edges run; 1 to 20 rows of x; Q8_0's quants include −128).
    #[test]
    fn packed_rows_multiply_as_the_plain_layout() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(43);
        for format in [Format::Q4_0, Format::Q5_0, Format::Q8_0] {
            let bytes = format.block_bytes();
            for (n, k) in [(5, 64), (8, 96), (40, 96), (37, 576)] {
                let kb = k / QK;
                let w = random_weight(&mut rng, format, n, k);
                let p = pack_x8(format, &w, n, kb);
                assert_eq!(p.len(), w.len());
                assert_eq!(unpack_x8(format, &p, n, kb), w, "{format:?} ({n}, {k})");
                for r in 0..n / 8 * 8 {
                    for b in 0..kb {
                        let at = (r * kb + b) * bytes;
                        let mut got = vec![0u8; bytes];
                        x8_block(format, &p, kb, r, b, &mut got);
                        assert_eq!(got[..], w[at..at + bytes]);
                    }
                }
                for m in [1, 2, 3, 8, 9, 20] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| rng.random_range(-1f32..1.0) * if i % 7 == 0 { 20.0 } else { 1.0 })
                        .collect();
                    let mut want = vec![0f32; m * n];
                    matmul_t(Kernel::Scalar, format, &x, m, k, &w, n, &mut want);
                    let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                    for kernel in Kernel::all_here() {
                        let mut got = vec![f32::NAN; m * n];
                        matmul_t_x8(kernel, format, &x, m, k, &p, n, &mut got);
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * scale,
                                "{a} vs {b} at ({}, {}) ({format:?}, n = {n}, k = {k}, m = {m}, {kernel:?})",
                                i / n,
                                i % n
                            );
                        }
                    }
                }
            }
        }
    }

    /// Random rows of a `format` weight (n, k): scales of both signs, every byte value.
    fn random_weight(rng: &mut rand::rngs::StdRng, format: Format, n: usize, k: usize) -> Vec<u8> {
        use rand::Rng;
        let mut w = Vec::new();
        for _ in 0..n * k / QK {
            w.extend(f16::from_f32(rng.random_range(-0.03f32..0.03)).to_le_bytes());
            let rest = format.block_bytes() - 2;
            if format.has_min() {
                w.extend(f16::from_f32(rng.random_range(-0.2f32..0.2)).to_le_bytes());
                w.extend((0..rest - 2).map(|_| rng.random::<u8>()));
            } else {
                w.extend((0..rest).map(|_| rng.random::<u8>()));
            }
        }
        w
    }

    /// The prompt tiles (every shape: 8, 4, 2 and 1 rows of x, and a weight row count that is odd and not a
    /// multiple of the work item's 16, so the tiles' ragged edges run) give the scalar formula's products for
    /// Q4_1 and Q5_1 (the formats with tiles on the GGUF layout; the others are packed,
    /// `packed_rows_multiply_as_the_plain_layout`) and every kernel, for 2 to 20 rows of x, bit for bit the one-row
    /// decode kernel's (its order of the float additions, llama.cpp's).
    #[test]
    fn prompt_tiles_agree_with_the_scalar_formula_for_every_shape() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(41);
        for format in [Format::Q4_1, Format::Q5_1] {
            for (n, k) in [(37, 96), (19, 576)] {
                let w = random_weight(&mut rng, format, n, k);
                for m in (2..=20).chain([31]) {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| rng.random_range(-1f32..1.0) * if i % 7 == 0 { 20.0 } else { 1.0 })
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
                                "{a} vs {b} at ({}, {}) ({format:?}, n = {n}, k = {k}, m = {m}, {kernel:?})",
                                i / n,
                                i % n
                            );
                        }
                        for (r, x) in x.chunks_exact(k).enumerate() {
                            let mut one = vec![0f32; n];
                            matmul_t(kernel, format, x, 1, k, &w, n, &mut one);
                            let tiled = &got[r * n..(r + 1) * n];
                            assert!(
                                one.iter()
                                    .zip(tiled)
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "row {r} of {m}: {one:?} vs {tiled:?} ({kernel:?})"
                            );
                        }
                    }
                }
            }
        }
    }
}
