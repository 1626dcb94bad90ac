//! bitsandbytes' 4-bit blockwise quantization (`quantization_bit: 4`, QLoRA): NF4 or FP4 codes, one absmax per
//! block of 64 weights, optionally double-quantized (the absmax minus their mean in bitsandbytes' 8-bit dynamic map,
//! blocks of 256), the same code values, packing and arithmetic as `bitsandbytes.functional.quantize_4bit` /
//! `dequantize_4bit`, so a QLoRA adapter trained here sees the base weights one trained with LLaMA-Factory +
//! bitsandbytes sees. `tests/nf4.rs` checks quantize → dequantize against `scripts/nf4_reference.py` (a numpy
//! transcription compared with bitsandbytes itself) bit for bit.
//!
//! The weight stays packed on its device (4 bits per weight plus ~0.13 bits of absmax with double quantization);
//! a product dequantizes it for that product only ([`Bnb4Tensor::dequantize`], as bitsandbytes' `MatMul4Bit` does
//! for a batch) and the dense copy is dropped.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::error::{EngineError, Result};

/// Weights per absmax block (bitsandbytes' and LLaMA-Factory's default `blocksize`).
pub const BLOCKSIZE: usize = 64;
/// Absmax values per block of the second (8-bit) quantization.
const ABSMAX_BLOCKSIZE: usize = 256;

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`): the quantiles of a standard normal, scaled to [-1, 1].
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 code (`get_4bit_type("fp4")`, e2m1 with its bias), by 4-bit value.
pub const FP4: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// bitsandbytes' 8-bit dynamic map (`create_dynamic_map()`, signed, 7 exponent bits) as float32 bit patterns, as
/// torch computes it (its `linspace` rounding is not reproduced by a plain formula, so the table is data;
/// `tests/fixtures/nf4_reference.json` carries the same table from bitsandbytes).
#[rustfmt::skip]
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e_3333, 0xbf7a_999a, 0xbf77_0000, 0xbf73_6666, 0xbf6f_cccd, 0xbf6c_3333, 0xbf68_999a, 0xbf65_0000,
    0xbf61_6666, 0xbf5d_cccd, 0xbf5a_3333, 0xbf56_999a, 0xbf53_0000, 0xbf4f_6666, 0xbf4b_cccd, 0xbf48_3333,
    0xbf44_999a, 0xbf41_0000, 0xbf3d_6666, 0xbf39_cccd, 0xbf36_3334, 0xbf32_999a, 0xbf2f_0000, 0xbf2b_6666,
    0xbf27_cccd, 0xbf24_3334, 0xbf20_999a, 0xbf1d_0000, 0xbf19_6666, 0xbf15_cccd, 0xbf12_3334, 0xbf0e_999a,
    0xbf0b_0000, 0xbf07_6666, 0xbf03_cccc, 0xbf00_3333, 0xbef9_3332, 0xbef2_0000, 0xbeea_cccc, 0xbee3_999a,
    0xbedc_6666, 0xbed5_3333, 0xbece_0000, 0xbec6_cccc, 0xbebf_999a, 0xbeb8_6666, 0xbeb1_3333, 0xbeaa_0000,
    0xbea2_cccc, 0xbe9b_999a, 0xbe94_6666, 0xbe8d_3334, 0xbe86_0000, 0xbe7d_9999, 0xbe6f_3333, 0xbe60_cccd,
    0xbe52_6666, 0xbe44_0000, 0xbe35_999a, 0xbe27_3333, 0xbe18_cccd, 0xbe0a_6666, 0xbdf8_0000, 0xbddb_3334,
    0xbdc9_eb85, 0xbdc4_28f7, 0xbdbe_6667, 0xbdb8_a3d7, 0xbdb2_e148, 0xbdad_1eb8, 0xbda7_5c2a, 0xbda1_999a,
    0xbd9b_d70a, 0xbd96_147b, 0xbd90_51eb, 0xbd8a_8f5d, 0xbd84_cccd, 0xbd7e_147b, 0xbd72_8f5d, 0xbd67_0a3d,
    0xbd5b_851f, 0xbd50_0000, 0xbd44_7ae1, 0xbd38_f5c3, 0xbd2d_70a3, 0xbd21_eb85, 0xbd16_6667, 0xbd0a_e148,
    0xbcfe_b852, 0xbce7_ae15, 0xbcd0_a3d7, 0xbcb9_999a, 0xbca2_8f5d, 0xbc8b_851f, 0xbc68_f5c3, 0xbc3a_e148,
    0xbc1f_3b64, 0xbc16_0418, 0xbc0c_cccd, 0xbc03_9581, 0xbbf4_bc6a, 0xbbe2_4dd3, 0xbbcf_df3b, 0xbbbd_70a4,
    0xbbab_020d, 0xbb98_9374, 0xbb86_24dd, 0xbb67_6c8a, 0xbb42_8f5c, 0xbb1d_b22d, 0xbaf1_a9fc, 0xbaa7_ef9d,
    0xba77_65ff, 0xba59_e83e, 0xba3c_6a80, 0xba1e_ecc1, 0xba01_6f01, 0xb9c7_e283, 0xb98c_e705, 0xb923_d70b,
    0xb8ba_1f4b, 0xb88a_efb3, 0xb837_8034, 0xb7b2_4206, 0xb702_05ff, 0xb65a_1a94, 0xb513_a3b7, 0x0000_0000,
    0x3513_a3b7, 0x365a_1a94, 0x3702_05ff, 0x37b2_4206, 0x3837_8034, 0x388a_efb3, 0x38ba_1f4b, 0x3923_d70b,
    0x398c_e705, 0x39c7_e283, 0x3a01_6f01, 0x3a1e_ecc1, 0x3a3c_6a80, 0x3a59_e83e, 0x3a77_65ff, 0x3aa7_ef9d,
    0x3af1_a9fc, 0x3b1d_b22d, 0x3b42_8f5c, 0x3b67_6c8a, 0x3b86_24dd, 0x3b98_9374, 0x3bab_020d, 0x3bbd_70a4,
    0x3bcf_df3b, 0x3be2_4dd3, 0x3bf4_bc6a, 0x3c03_9581, 0x3c0c_cccd, 0x3c16_0418, 0x3c1f_3b64, 0x3c3a_e148,
    0x3c68_f5c3, 0x3c8b_851f, 0x3ca2_8f5d, 0x3cb9_999a, 0x3cd0_a3d7, 0x3ce7_ae15, 0x3cfe_b852, 0x3d0a_e148,
    0x3d16_6667, 0x3d21_eb85, 0x3d2d_70a3, 0x3d38_f5c3, 0x3d44_7ae1, 0x3d50_0000, 0x3d5b_851f, 0x3d67_0a3d,
    0x3d72_8f5d, 0x3d7e_147b, 0x3d84_cccd, 0x3d8a_8f5d, 0x3d90_51eb, 0x3d96_147b, 0x3d9b_d70a, 0x3da1_999a,
    0x3da7_5c2a, 0x3dad_1eb8, 0x3db2_e148, 0x3db8_a3d7, 0x3dbe_6667, 0x3dc4_28f7, 0x3dc9_eb85, 0x3ddb_3334,
    0x3df8_0000, 0x3e0a_6666, 0x3e18_cccd, 0x3e27_3333, 0x3e35_999a, 0x3e44_0000, 0x3e52_6666, 0x3e60_cccd,
    0x3e6f_3333, 0x3e7d_9999, 0x3e86_0000, 0x3e8d_3334, 0x3e94_6666, 0x3e9b_999a, 0x3ea2_cccc, 0x3eaa_0000,
    0x3eb1_3333, 0x3eb8_6666, 0x3ebf_999a, 0x3ec6_cccc, 0x3ece_0000, 0x3ed5_3333, 0x3edc_6666, 0x3ee3_999a,
    0x3eea_cccc, 0x3ef2_0000, 0x3ef9_3332, 0x3f00_3333, 0x3f03_cccc, 0x3f07_6666, 0x3f0b_0000, 0x3f0e_999a,
    0x3f12_3334, 0x3f15_cccd, 0x3f19_6666, 0x3f1d_0000, 0x3f20_999a, 0x3f24_3334, 0x3f27_cccd, 0x3f2b_6666,
    0x3f2f_0000, 0x3f32_999a, 0x3f36_3334, 0x3f39_cccd, 0x3f3d_6666, 0x3f41_0000, 0x3f44_999a, 0x3f48_3333,
    0x3f4b_cccd, 0x3f4f_6666, 0x3f53_0000, 0x3f56_999a, 0x3f5a_3333, 0x3f5d_cccd, 0x3f61_6666, 0x3f65_0000,
    0x3f68_999a, 0x3f6c_3333, 0x3f6f_cccd, 0x3f73_6666, 0x3f77_0000, 0x3f7a_999a, 0x3f7e_3333, 0x3f80_0000,
];

/// The 8-bit dynamic map, ascending.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// The 4-bit data type (LLaMA-Factory's `quantization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBit {
    Nf4,
    Fp4,
}

impl FourBit {
    /// The code value of each 4-bit index.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &NF4,
            Self::Fp4 => &FP4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }
}

/// A quantized tensor on the host: the packed codes (two per byte, the first in the high nibble) and the absmax.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed4 {
    pub packed: Vec<u8>,
    pub absmax: HostAbsmax,
}

/// The per-block absmax, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum HostAbsmax {
    Plain(Vec<f32>),
    /// `q[i]` indexes the dynamic map; the absmax is `map[q[i]] · absmax2[i / 256] + offset`.
    Double {
        q: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

impl HostAbsmax {
    /// The absmax of every block, in float32 (bitsandbytes' `dequantize_blockwise(...) + offset`).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Self::Plain(v) => v.clone(),
            Self::Double { q, absmax2, offset } => {
                let map = dynamic_map();
                q.iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * absmax2[i / ABSMAX_BLOCKSIZE] + offset)
                    .collect()
            }
        }
    }
}

/// The 4-bit index of a value scaled into [-1, 1]: `torch.bucketize` at the float32 midpoints of the sorted code
/// (a value on a midpoint goes to the lower code), mapped back to the code's own order.
struct Bucketizer {
    mids: [f32; 15],
    order: [u8; 16],
}

impl Bucketizer {
    fn new(kind: FourBit) -> Self {
        let code = kind.code();
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // A stable sort, as numpy's argsort(kind="stable"); FP4's two zeros keep their order (+0 first).
        order.sort_by(|&a, &b| {
            code[a as usize]
                .total_cmp(&code[b as usize])
                .then(a.cmp(&b))
        });
        // total_cmp puts -0.0 before +0.0; bitsandbytes (and numpy) treat them as equal, so restore index order.
        for i in 0..15 {
            let (a, b) = (order[i] as usize, order[i + 1] as usize);
            if code[a] == code[b] && a > b {
                order.swap(i, i + 1);
            }
        }
        let mids =
            std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
        Self { mids, order }
    }

    fn index(&self, x: f32) -> u8 {
        let q = self.mids.partition_point(|&m| m < x);
        self.order[q]
    }
}

/// Quantizes `values` (a flattened tensor) as `bitsandbytes.functional.quantize_4bit(A, blocksize=64,
/// quant_type, compress_statistics=double)` does. A NaN or infinite value is refused (its block's absmax would
/// be meaningless).
pub fn quantize(values: &[f32], kind: FourBit, double: bool) -> Result<Packed4> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(EngineError::Invalid(format!(
            "value {i} is {} and cannot be quantized",
            values[i]
        )));
    }
    let b = Bucketizer::new(kind);
    let n = values.len();
    let full = n - n % BLOCKSIZE;
    let mut codes = vec![0u8; n.div_ceil(2) * 2];
    let mut absmax = vec![0f32; n.div_ceil(BLOCKSIZE)];
    codes[..full]
        .par_chunks_mut(BLOCKSIZE)
        .zip(absmax.par_iter_mut())
        .zip(values[..full].par_chunks(BLOCKSIZE))
        .for_each(|((q, am), x)| {
            let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            *am = m;
            let inv = 1.0 / m.max(1e-38);
            for (q, &v) in q.iter_mut().zip(x) {
                *q = b.index((v * inv).clamp(-1.0, 1.0));
            }
        });
    if full < n {
        let x = &values[full..];
        let m = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-38);
        absmax[full / BLOCKSIZE] = m;
        for (q, &v) in codes[full..n].iter_mut().zip(x) {
            *q = b.index((v / m).clamp(-1.0, 1.0));
        }
        // An odd count is padded with a zero, as bitsandbytes pads the scaled values.
        if n % 2 == 1 {
            codes[n] = b.index(0.0);
        }
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if double {
        double_quantize(&absmax)
    } else {
        HostAbsmax::Plain(absmax)
    };
    Ok(Packed4 { packed, absmax })
}

/// bitsandbytes' `compress_statistics`: the absmax minus their mean (exactly rounded; torch sums float32 in its own
/// order and may differ in the last bit), quantized blockwise (256) to the nearest dynamic-map value (value /
/// block absmax; a tie goes to the lower value). A block of equal absmax (zero after centering) maps to 0.
fn double_quantize(absmax: &[f32]) -> HostAbsmax {
    let map = dynamic_map();
    #[allow(clippy::cast_precision_loss)]
    let offset =
        (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let zero = map.partition_point(|&c| c < 0.0) as u8;
    let mut q = vec![0u8; centered.len()];
    let absmax2: Vec<f32> = q
        .chunks_mut(ABSMAX_BLOCKSIZE)
        .zip(centered.chunks(ABSMAX_BLOCKSIZE))
        .map(|(q, x)| {
            let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (q, &v) in q.iter_mut().zip(x) {
                let normed = v / m;
                *q = if normed.is_nan() {
                    zero
                } else {
                    let idx = map.partition_point(|&c| c <= normed).saturating_sub(1);
                    let right =
                        idx < 255 && (normed - map[idx + 1]).abs() < (normed - map[idx]).abs();
                    (idx + usize::from(right)) as u8
                };
            }
            m
        })
        .collect();
    HostAbsmax::Double { q, absmax2, offset }
}

/// `n` values back from [`quantize`]'s output: `code[index] · absmax[block]` in float32
/// (`bitsandbytes.functional.dequantize_4bit` before its cast to the compute dtype).
pub fn dequantize(p: &Packed4, kind: FourBit, n: usize) -> Vec<f32> {
    let absmax = p.absmax.values();
    dequantize_into(&p.packed, &absmax, kind, n)
}

fn dequantize_into(packed: &[u8], absmax: &[f32], kind: FourBit, n: usize) -> Vec<f32> {
    let code = kind.code();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(BLOCKSIZE)
        .zip(absmax.par_iter())
        .enumerate()
        .for_each(|(blk, (o, &am))| {
            let start = blk * BLOCKSIZE;
            for (j, o) in o.iter_mut().enumerate() {
                let i = start + j;
                let byte = packed[i / 2];
                let q = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 15
                };
                *o = code[q as usize] * am;
            }
        });
    out
}

/// The most rows [`Bnb4Tensor::matmul_t_few_rows`] takes: beyond, dequantizing once and one GEMM is faster.
pub const FUSED_MAX_ROWS: usize = 8;

/// A frozen 2-D weight (out, in) in bitsandbytes' 4-bit layout, on its device.
#[derive(Debug)]
pub struct Bnb4Tensor {
    dims: [usize; 2],
    kind: FourBit,
    /// (⌈n/2⌉,) u8.
    packed: Tensor,
    absmax: DeviceAbsmax,
    /// (256, 2) f32: the two code values of each packed byte (one lookup per byte on any device).
    pairs: Tensor,
    /// On the CPU, every block's absmax in float32, computed on first use ([`Self::host_absmax`]).
    host_absmax: std::sync::OnceLock<Vec<f32>>,
}

#[derive(Debug)]
enum DeviceAbsmax {
    /// (blocks,) f32.
    Plain(Tensor),
    /// `q`: (blocks,) u8 into `map` (256,) f32; `absmax2`: (⌈blocks/256⌉,) f32.
    Double {
        q: Tensor,
        map: Tensor,
        absmax2: Tensor,
        offset: f32,
    },
}

impl Bnb4Tensor {
    /// Quantizes a 2-D tensor (any float dtype, any device; it is read back to the host once).
    pub fn quantize(t: &Tensor, kind: FourBit, double: bool) -> Result<Self> {
        Self::quantize_onto(t, kind, double, t.device())
    }

    /// [`Self::quantize`] with the result on `device` (a base read on the host goes to the GPU 4-bit).
    pub fn quantize_onto(t: &Tensor, kind: FourBit, double: bool, device: &Device) -> Result<Self> {
        let dims = t.dims2()?;
        let values = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let p = quantize(&values, kind, double)?;
        Self::from_packed(&p, kind, [dims.0, dims.1], device)
    }

    /// A tensor from [`quantize`]'s host output.
    pub fn from_packed(
        p: &Packed4,
        kind: FourBit,
        dims: [usize; 2],
        device: &Device,
    ) -> Result<Self> {
        let n = dims[0] * dims[1];
        if p.packed.len() != n.div_ceil(2) {
            return Err(EngineError::Invalid(format!(
                "4-bit tensor {dims:?}: {} packed bytes, expected {}",
                p.packed.len(),
                n.div_ceil(2)
            )));
        }
        let code = kind.code();
        let pairs: Vec<f32> = (0..256usize)
            .flat_map(|b| [code[b >> 4], code[b & 15]])
            .collect();
        let absmax = match &p.absmax {
            HostAbsmax::Plain(v) => DeviceAbsmax::Plain(Tensor::from_slice(v, v.len(), device)?),
            HostAbsmax::Double { q, absmax2, offset } => DeviceAbsmax::Double {
                q: Tensor::from_slice(q, q.len(), device)?,
                map: Tensor::from_slice(&dynamic_map(), 256, device)?,
                absmax2: Tensor::from_slice(absmax2, absmax2.len(), device)?,
                offset: *offset,
            },
        };
        Ok(Self {
            dims,
            kind,
            packed: Tensor::from_slice(&p.packed, p.packed.len(), device)?,
            absmax,
            pairs: Tensor::from_vec(pairs, (256, 2), device)?,
            host_absmax: std::sync::OnceLock::new(),
        })
    }

    /// The same tensor on `device` (exact: codes and absmax are copied).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let absmax = match &self.absmax {
            DeviceAbsmax::Plain(a) => DeviceAbsmax::Plain(a.to_device(device)?),
            DeviceAbsmax::Double {
                q,
                map,
                absmax2,
                offset,
            } => DeviceAbsmax::Double {
                q: q.to_device(device)?,
                map: map.to_device(device)?,
                absmax2: absmax2.to_device(device)?,
                offset: *offset,
            },
        };
        Ok(Self {
            dims: self.dims,
            kind: self.kind,
            packed: self.packed.to_device(device)?,
            absmax,
            pairs: self.pairs.to_device(device)?,
            host_absmax: std::sync::OnceLock::new(),
        })
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn kind(&self) -> FourBit {
        self.kind
    }

    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// Bytes held on the device (packed codes and absmax; the two small code tables aside).
    pub fn storage_size_in_bytes(&self) -> usize {
        self.packed.elem_count()
            + match &self.absmax {
                DeviceAbsmax::Plain(a) => 4 * a.elem_count(),
                DeviceAbsmax::Double { q, absmax2, .. } => {
                    q.elem_count() + 4 * absmax2.elem_count() + 4
                }
            }
    }

    /// The dense (out, in) weight in float32 on the tensor's device. On the CPU a direct loop; elsewhere candle ops
    /// (one table lookup per byte, a broadcast multiply per block) that compute the same float32 products.
    pub fn dequantize(&self) -> Result<Tensor> {
        if self.device().is_cpu() {
            return self.dequantize_cpu();
        }
        self.dequantize_ops()
    }

    /// Every block's absmax in float32 on the host, computed once (a CPU training step dequantizes each weight
    /// three times: forward, recomputation, backward).
    fn host_absmax(&self) -> Result<&[f32]> {
        if let Some(a) = self.host_absmax.get() {
            return Ok(a);
        }
        let a = self.absmax_ops()?.to_vec1::<f32>()?;
        Ok(self.host_absmax.get_or_init(|| a))
    }

    fn dequantize_cpu(&self) -> Result<Tensor> {
        let absmax = self.host_absmax()?;
        let (s, l) = self.packed.storage_and_layout();
        let Storage::Cpu(cpu) = &*s else {
            return Err(EngineError::Invalid(
                "4-bit tensor: packed codes not on the CPU".into(),
            ));
        };
        let packed = &cpu.as_slice::<u8>()?[l.start_offset()..];
        let n = self.dims[0] * self.dims[1];
        let v = dequantize_into(packed, absmax, self.kind, n);
        Ok(Tensor::from_vec(
            v,
            (self.dims[0], self.dims[1]),
            &Device::Cpu,
        )?)
    }

    /// `x · Wᵀ` for a few rows of f32 `x` (m, in) on the CPU, straight from the packed codes: no dense weight is
    /// made, each code byte is read once for all rows (what decoding runs, one row per token). `None` where it does
    /// not apply (another device, in-features not a multiple of the block size, more than [`FUSED_MAX_ROWS`]
    /// rows): the caller dequantizes. The same products as the dequantized weight's, summed per block.
    pub fn matmul_t_few_rows(&self, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
        let [n, k] = self.dims;
        if !self.device().is_cpu() || k % BLOCKSIZE != 0 || m > FUSED_MAX_ROWS || x.len() != m * k {
            return Ok(None);
        }
        let absmax = self.host_absmax()?;
        let (st, l) = self.packed.storage_and_layout();
        let Storage::Cpu(cpu) = &*st else {
            return Ok(None);
        };
        let packed = &cpu.as_slice::<u8>()?[l.start_offset()..];
        let code = self.kind.code();
        let pairs: [[f32; 2]; 256] = std::array::from_fn(|b| [code[b >> 4], code[b & 15]]);
        let blocks_per_row = k / BLOCKSIZE;
        // Output column-major per weight row: out_t[row][i] = y[i][row].
        let mut out_t = vec![0f32; n * m];
        out_t.par_chunks_mut(m).enumerate().for_each(|(row, y)| {
            let row_bytes = &packed[row * k / 2..(row + 1) * k / 2];
            // One block's codes looked up into a buffer, then a dot product per row (vectorised).
            let mut wbuf = [0f32; BLOCKSIZE];
            for b in 0..blocks_per_row {
                let scale = absmax[row * blocks_per_row + b];
                let bytes = &row_bytes[b * BLOCKSIZE / 2..(b + 1) * BLOCKSIZE / 2];
                for (wp, &byte) in wbuf.chunks_exact_mut(2).zip(bytes) {
                    wp.copy_from_slice(&pairs[byte as usize]);
                }
                for (i, yi) in y.iter_mut().enumerate() {
                    let xs = &x[i * k + b * BLOCKSIZE..i * k + (b + 1) * BLOCKSIZE];
                    let mut acc = [0f32; 16];
                    for (wc, xc) in wbuf.chunks_exact(16).zip(xs.chunks_exact(16)) {
                        for j in 0..16 {
                            acc[j] += wc[j] * xc[j];
                        }
                    }
                    *yi += acc.iter().sum::<f32>() * scale;
                }
            }
        });
        let mut out = vec![0f32; m * n];
        for (row, y) in out_t.chunks(m).enumerate() {
            for (i, &v) in y.iter().enumerate() {
                out[i * n + row] = v;
            }
        }
        Ok(Some(out))
    }

    /// [`Self::dequantize`] with candle ops only (what a GPU runs; tested on the CPU against the direct loop). The u8
    /// codes are widened to u32 for the lookups: candle's `index_select` reads an id equal to its type's maximum (255 for
    /// u8) as padding and returns 0 for it.
    pub fn dequantize_ops(&self) -> Result<Tensor> {
        let n = self.dims[0] * self.dims[1];
        let vals = self
            .pairs
            .index_select(&self.packed.to_dtype(DType::U32)?, 0)?
            .flatten_all()?
            .narrow(0, 0, n)?;
        let absmax = self.absmax_ops()?;
        let dense = per_block_mul(&vals, &absmax, BLOCKSIZE)?;
        Ok(dense.reshape((self.dims[0], self.dims[1]))?)
    }

    /// The absmax of every block as a (blocks,) f32 tensor.
    fn absmax_ops(&self) -> Result<Tensor> {
        match &self.absmax {
            DeviceAbsmax::Plain(a) => Ok(a.clone()),
            DeviceAbsmax::Double {
                q,
                map,
                absmax2,
                offset,
            } => {
                let v = map.index_select(&q.to_dtype(DType::U32)?, 0)?;
                let scaled = per_block_mul(&v, absmax2, ABSMAX_BLOCKSIZE)?;
                let off = Tensor::new(&[*offset], scaled.device())?;
                Ok(scaled.broadcast_add(&off)?)
            }
        }
    }
}

/// `v[i] · scale[i / block]` for a flat `v` (the last block may be short), in float32.
fn per_block_mul(v: &Tensor, scale: &Tensor, block: usize) -> Result<Tensor> {
    let n = v.elem_count();
    let full = n - n % block;
    let mut parts = Vec::with_capacity(2);
    if full > 0 {
        let blocks = full / block;
        parts.push(
            v.narrow(0, 0, full)?
                .reshape((blocks, block))?
                .broadcast_mul(&scale.narrow(0, 0, blocks)?.unsqueeze(1)?)?
                .flatten_all()?,
        );
    }
    if full < n {
        let tail = v.narrow(0, full, n - full)?;
        parts.push(tail.broadcast_mul(&scale.narrow(0, full / block, 1)?)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
