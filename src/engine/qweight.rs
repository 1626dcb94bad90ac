//! A frozen weight kept in a GGML block format, in the layout its products read fastest: candle's [`QTensor`]
//! (the GGUF layout, row after row: any block type, any device), or on the CPU a Q4_0, Q5_0 or Q8_0 weight with its
//! blocks eight rows side by side ([`legacy_quants::pack_x8`], as llama.cpp's x86 build repacks them on load).
//! Packing moves the same bytes (no second copy: the GGUF-layout tensor is dropped once packed), and everything
//! that reads values — dequantizing, embedding rows, moving to a GPU — sees the GGUF layout's values exactly.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Shape, Tensor};

use super::legacy_quants::{self, Format, Kernel, QK};

/// A frozen 2-D weight (out, in) in a GGML block format.
#[derive(Debug, Clone)]
pub enum QWeight {
    /// candle's blocks, row after row (the GGUF layout).
    Blocks(Arc<QTensor>),
    /// Q4_0, Q5_0 or Q8_0 on the CPU, eight rows' blocks side by side.
    Packed(Arc<PackedRows>),
}

/// A Q4_0, Q5_0 or Q8_0 weight (n, k) on the CPU with its blocks packed by [`legacy_quants::pack_x8`].
#[derive(Debug)]
pub struct PackedRows {
    format: Format,
    dtype: GgmlDType,
    bytes: Vec<u8>,
    shape: Shape,
}

impl PackedRows {
    fn rows_cols(&self) -> (usize, usize) {
        let d = self.shape.dims();
        (d[0], d[1])
    }

    /// The GGUF layout's bytes.
    fn unpacked(&self) -> Vec<u8> {
        let (n, k) = self.rows_cols();
        legacy_quants::unpack_x8(self.format, &self.bytes, n, k / QK)
    }

    /// The weight in the GGUF layout, as candle's tensor.
    fn blocks(&self, device: &Device) -> candle_core::Result<QTensor> {
        let storage = QStorage::from_data(Cow::Owned(self.unpacked()), device, self.dtype)?;
        QTensor::new(storage, self.shape.clone())
    }

    /// `x (m × k) · Wᵀ` into `dst (m × n)`.
    pub fn matmul_t(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        let (n, k) = self.rows_cols();
        legacy_quants::matmul_t_x8(Kernel::detect(), self.format, x, m, k, &self.bytes, n, dst);
    }

    /// Rows `ids` dequantized (f32, on the CPU), as candle's quantized embedding gives them.
    fn embedding(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let (n, k) = self.rows_cols();
        let (kb, bytes) = (k / QK, self.format.block_bytes());
        let mut rows = vec![0u8; ids.len() * kb * bytes];
        for (&id, out) in ids.iter().zip(rows.chunks_exact_mut(kb * bytes)) {
            let r = id as usize;
            if r >= n {
                candle_core::bail!("embedding id {r} is out of range for {n} rows")
            }
            if r < n / 8 * 8 {
                for (b, out) in out.chunks_exact_mut(bytes).enumerate() {
                    legacy_quants::x8_block(self.format, &self.bytes, kb, r, b, out);
                }
            } else {
                out.copy_from_slice(&self.bytes[r * kb * bytes..][..kb * bytes]);
            }
        }
        let storage = QStorage::from_data(Cow::Owned(rows), &Device::Cpu, self.dtype)?;
        QTensor::new(storage, (ids.len(), k))?.dequantize(&Device::Cpu)
    }
}

impl QWeight {
    /// `q` in the layout its products read fastest: a 2-D Q4_0, Q5_0 or Q8_0 weight of 8 rows or more on a CPU with
    /// termtune's SIMD kernels is packed ([`PackedRows`]; Q4_0's decode products 2.9× faster in cache, 1.45×
    /// streamed from memory, a prompt's about 2×, see `legacy_quants::x86::gemm_x8!`); anything else stays as it
    /// is.
    pub fn new(q: Arc<QTensor>) -> candle_core::Result<Self> {
        let format = Format::of(q.dtype()).filter(|f| f.packs_x8());
        let (Some(format), true, true, &[n, k]) = (
            format,
            q.device().is_cpu(),
            Kernel::detect() != Kernel::Scalar,
            q.shape().dims(),
        ) else {
            return Ok(Self::Blocks(q));
        };
        if n < 8 || !k.is_multiple_of(QK) {
            return Ok(Self::Blocks(q));
        }
        let bytes = legacy_quants::pack_x8(format, &q.data()?, n, k / QK);
        Ok(Self::Packed(Arc::new(PackedRows {
            format,
            dtype: q.dtype(),
            bytes,
            shape: q.shape().clone(),
        })))
    }

    pub fn shape(&self) -> &Shape {
        match self {
            Self::Blocks(q) => q.shape(),
            Self::Packed(p) => &p.shape,
        }
    }

    pub fn dims(&self) -> &[usize] {
        self.shape().dims()
    }

    pub fn dtype(&self) -> GgmlDType {
        match self {
            Self::Blocks(q) => q.dtype(),
            Self::Packed(p) => p.dtype,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Blocks(q) => q.device(),
            Self::Packed(_) => Device::Cpu,
        }
    }

    /// Bytes the blocks occupy (packing moves them, the count is the GGUF layout's).
    pub fn storage_size_in_bytes(&self) -> usize {
        match self {
            Self::Blocks(q) => q.storage_size_in_bytes(),
            Self::Packed(p) => p.bytes.len(),
        }
    }

    /// The weight dequantized to f32 on `device`.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Blocks(q) => q.dequantize(device),
            Self::Packed(p) => p.blocks(&Device::Cpu)?.dequantize(device),
        }
    }

    /// Rows `ids` (any shape) dequantized to f32: shape `ids.dims() + [in]`.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Blocks(q) => q.embedding(ids),
            Self::Packed(p) => {
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
            Self::Packed(p) => Ok(Cow::Owned(p.unpacked())),
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

    /// Q4_0, Q5_0 and Q8_0 weights pack where the kernels are SIMD, and what reads their values — dequantizing,
    /// embedding rows, the GGUF bytes, a move off and back — gives candle's tensor's exactly; other types, and
    /// weights of fewer than 8 rows, stay candle's.
    #[test]
    fn a_packed_weight_reads_as_candle_s() {
        let cpu = Device::Cpu;
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|v| v.to_bits()).collect()
        };
        for ty in [GgmlDType::Q4_0, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            for n in [8, 45] {
                let t = Tensor::randn(0f32, 0.05, (n, 96), &cpu).unwrap();
                let q = Arc::new(QTensor::quantize(&t, ty).unwrap());
                let w = QWeight::new(q.clone()).unwrap();
                assert_eq!(
                    matches!(w, QWeight::Packed(_)),
                    Kernel::detect() != Kernel::Scalar
                );
                assert_eq!((w.dims(), w.dtype()), (&[n, 96][..], ty));
                assert_eq!(w.storage_size_in_bytes(), q.storage_size_in_bytes());
                assert_eq!(w.gguf_bytes().unwrap(), q.data().unwrap());
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
        }
        for (ty, rows) in [
            (GgmlDType::Q4K, 16),
            (GgmlDType::Q4_1, 16),
            (GgmlDType::Q4_0, 7),
        ] {
            let t = Tensor::randn(0f32, 0.05, (rows, 256), &cpu).unwrap();
            let q = Arc::new(QTensor::quantize(&t, ty).unwrap());
            assert!(
                matches!(QWeight::new(q).unwrap(), QWeight::Blocks(_)),
                "{ty:?}"
            );
        }
    }
}
