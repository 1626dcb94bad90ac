//! A frozen weight kept in a GGML block format, in the layout its products read fastest: candle's [`QTensor`]
//! (the GGUF layout, row after row: any block type, any device), or on the CPU a Q4_0 weight with its blocks eight
//! rows side by side ([`legacy_quants::pack_q4_0x8`], as llama.cpp's x86 build repacks Q4_0 on load). Packing
//! moves the same bytes (no second copy: the GGUF-layout tensor is dropped once packed), and everything that reads
//! values — dequantizing, embedding rows, moving to a GPU — sees the GGUF layout's values exactly.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Shape, Tensor};

use super::legacy_quants::{self, Kernel, Q4_0_BYTES, QK};

/// A frozen 2-D weight (out, in) in a GGML block format.
#[derive(Debug, Clone)]
pub enum QWeight {
    /// candle's blocks, row after row (the GGUF layout).
    Blocks(Arc<QTensor>),
    /// Q4_0 on the CPU, eight rows' blocks side by side.
    Q4_0x8(Arc<PackedQ4_0>),
}

/// A Q4_0 weight (n, k) on the CPU with its blocks packed by [`legacy_quants::pack_q4_0x8`].
#[derive(Debug)]
pub struct PackedQ4_0 {
    bytes: Vec<u8>,
    shape: Shape,
}

impl PackedQ4_0 {
    fn rows_cols(&self) -> (usize, usize) {
        let d = self.shape.dims();
        (d[0], d[1])
    }

    /// The weight in the GGUF layout, as candle's tensor.
    fn blocks(&self, device: &Device) -> candle_core::Result<QTensor> {
        let (n, k) = self.rows_cols();
        let plain = legacy_quants::unpack_q4_0x8(&self.bytes, n, k / QK);
        let storage = QStorage::from_data(Cow::Owned(plain), device, GgmlDType::Q4_0)?;
        QTensor::new(storage, self.shape.clone())
    }

    /// `x (m × k) · Wᵀ` into `dst (m × n)`.
    pub fn matmul_t(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        let (n, k) = self.rows_cols();
        legacy_quants::matmul_t_q4_0x8(Kernel::detect(), x, m, k, &self.bytes, n, dst);
    }

    /// Rows `ids` dequantized (f32, on the CPU), as candle's quantized embedding gives them.
    fn embedding(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let (n, k) = self.rows_cols();
        let kb = k / QK;
        let mut rows = Vec::with_capacity(ids.len() * kb * Q4_0_BYTES);
        for &id in ids {
            let r = id as usize;
            if r >= n {
                candle_core::bail!("embedding id {r} is out of range for {n} rows")
            }
            if r < n / 8 * 8 {
                for b in 0..kb {
                    rows.extend(legacy_quants::q4_0x8_block(&self.bytes, kb, r, b));
                }
            } else {
                rows.extend_from_slice(&self.bytes[r * kb * Q4_0_BYTES..][..kb * Q4_0_BYTES]);
            }
        }
        let storage = QStorage::from_data(Cow::Owned(rows), &Device::Cpu, GgmlDType::Q4_0)?;
        QTensor::new(storage, (ids.len(), k))?.dequantize(&Device::Cpu)
    }
}

impl QWeight {
    /// `q` in the layout its products read fastest: a 2-D Q4_0 weight of 8 rows or more on a CPU with termtune's
    /// SIMD kernels is packed ([`PackedQ4_0`]: decode products 2.9× faster in cache, 1.45× streamed from memory,
    /// see `legacy_quants::x86::gemv_q4_0x8!`); anything else stays as it is.
    pub fn new(q: Arc<QTensor>) -> candle_core::Result<Self> {
        let packs = q.dtype() == GgmlDType::Q4_0
            && q.device().is_cpu()
            && Kernel::detect() != Kernel::Scalar
            && matches!(q.shape().dims(), &[n, k] if n >= 8 && k.is_multiple_of(QK));
        if !packs {
            return Ok(Self::Blocks(q));
        }
        let (n, k) = q.shape().dims2()?;
        let bytes = legacy_quants::pack_q4_0x8(&q.data()?, n, k / QK);
        Ok(Self::Q4_0x8(Arc::new(PackedQ4_0 {
            bytes,
            shape: q.shape().clone(),
        })))
    }

    pub fn shape(&self) -> &Shape {
        match self {
            Self::Blocks(q) => q.shape(),
            Self::Q4_0x8(p) => &p.shape,
        }
    }

    pub fn dims(&self) -> &[usize] {
        self.shape().dims()
    }

    pub fn dtype(&self) -> GgmlDType {
        match self {
            Self::Blocks(q) => q.dtype(),
            Self::Q4_0x8(_) => GgmlDType::Q4_0,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Blocks(q) => q.device(),
            Self::Q4_0x8(_) => Device::Cpu,
        }
    }

    /// Bytes the blocks occupy (packing moves them, the count is the GGUF layout's).
    pub fn storage_size_in_bytes(&self) -> usize {
        match self {
            Self::Blocks(q) => q.storage_size_in_bytes(),
            Self::Q4_0x8(p) => p.bytes.len(),
        }
    }

    /// The weight dequantized to f32 on `device`.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Blocks(q) => q.dequantize(device),
            Self::Q4_0x8(p) => p.blocks(&Device::Cpu)?.dequantize(device),
        }
    }

    /// Rows `ids` (any shape) dequantized to f32: shape `ids.dims() + [in]`.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Blocks(q) => q.embedding(ids),
            Self::Q4_0x8(p) => {
                let mut dims = ids.dims().to_vec();
                dims.push(p.rows_cols().1);
                let ids = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?;
                p.embedding(&ids.to_vec1::<u32>()?)?.reshape(dims)
            }
        }
    }

    /// The weight's GGUF-layout bytes (packed ones unpacked).
    pub fn gguf_bytes(&self) -> candle_core::Result<Cow<'_, [u8]>> {
        match self {
            Self::Blocks(q) => q.data(),
            Self::Q4_0x8(p) => {
                let (n, k) = p.rows_cols();
                Ok(Cow::Owned(legacy_quants::unpack_q4_0x8(
                    &p.bytes,
                    n,
                    k / QK,
                )))
            }
        }
    }

    /// The weight on `device`, exactly (packed again if that is the CPU and it packs).
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        if self.device().same_device(device) {
            return Ok(self.clone());
        }
        let storage = QStorage::from_data(self.gguf_bytes()?, device, self.dtype())?;
        Self::new(Arc::new(QTensor::new(storage, self.shape().clone())?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A Q4_0 weight packs where the kernels are SIMD, and what reads its values — dequantizing, embedding rows,
    /// the GGUF bytes, a move off and back — gives candle's tensor's exactly; other types stay candle's.
    #[test]
    fn a_packed_q4_0_weight_reads_as_candle_s() {
        let cpu = Device::Cpu;
        for n in [8, 45] {
            let t = Tensor::randn(0f32, 0.05, (n, 96), &cpu).unwrap();
            let q = Arc::new(QTensor::quantize(&t, GgmlDType::Q4_0).unwrap());
            let w = QWeight::new(q.clone()).unwrap();
            assert_eq!(
                matches!(w, QWeight::Q4_0x8(_)),
                Kernel::detect() != Kernel::Scalar
            );
            assert_eq!((w.dims(), w.dtype()), (&[n, 96][..], GgmlDType::Q4_0));
            assert_eq!(w.storage_size_in_bytes(), q.storage_size_in_bytes());
            assert_eq!(w.gguf_bytes().unwrap(), q.data().unwrap());
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|v| v.to_bits()).collect()
            };
            let want = q.dequantize(&cpu).unwrap();
            assert_eq!(bits(&w.dequantize(&cpu).unwrap()), bits(&want));
            let ids = Tensor::new(&[[0u32, 7, 3], [n as u32 - 1, 5, 0]], &cpu).unwrap();
            let rows = w.embedding(&ids).unwrap();
            assert_eq!(rows.dims(), [2, 3, 96]);
            assert_eq!(bits(&rows), bits(&q.embedding(&ids).unwrap()));
            let bad = Tensor::new(&[n as u32], &cpu).unwrap();
            assert!(w.embedding(&bad).is_err());
            let back = w.to_device(&cpu).unwrap();
            assert_eq!(back.gguf_bytes().unwrap(), q.data().unwrap());
        }
        let t = Tensor::randn(0f32, 0.05, (16, 96), &cpu).unwrap();
        let q8 = Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap());
        assert!(matches!(QWeight::new(q8).unwrap(), QWeight::Blocks(_)));
    }
}
