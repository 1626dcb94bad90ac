//! Loading a local Hugging Face model folder into HF-named tensors.
//!
//! The weight source is a plain `HashMap<String, Tensor>` in Hugging Face tensor names and row order, so a GGUF
//! file converted by `engine::gguf` and a safetensors folder feed the same model builder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::arch::LINEAR_LEAVES;
use super::bnb4::Bnb4Tensor;
use super::error::{EngineError, Result};
use super::memory::BaseStorage;
use super::qweight::QWeight;

/// A model as loaded from disk: HF config, HF-named tensors and (when present) tokenizer files.
pub struct ModelFiles {
    /// `config.json`.
    pub config: Value,
    /// Tensors in HF names, converted to the requested dtype, on the requested device.
    pub tensors: HashMap<String, Tensor>,
    /// Tensors in HF names kept in a GGML block format (a GGUF file's quantized weights, `quantization_bit`'s
    /// GGML types), on the requested device (Q4_0 on the CPU packed, [`QWeight::new`]); none of them is also in
    /// `tensors`.
    pub quantized: HashMap<String, QWeight>,
    /// Tensors in HF names kept in bitsandbytes' 4-bit layout (`quantization_bit: 4`), on the requested device;
    /// none of them is also in `tensors`. Empty as loaded from disk.
    pub bnb4: HashMap<String, std::sync::Arc<super::bnb4::Bnb4Tensor>>,
    /// `tokenizer.json`, when present.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// `tokenizer_config.json` (chat_template, bos/eos tokens), or `Value::Null`.
    pub tokenizer_config: Value,
    /// `generation_config.json`, or `Value::Null`.
    pub generation_config: Value,
    /// The folder it came from.
    pub dir: PathBuf,
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::Json {
        context: path.display().to_string(),
        source: e,
    })
}

fn read_json_opt(path: &Path) -> Result<Value> {
    if path.exists() {
        read_json(path)
    } else {
        Ok(Value::Null)
    }
}

/// The safetensors files of a folder: `model.safetensors.index.json` (sharded) or `model.safetensors`, else any
/// `*.safetensors`. Pickle checkpoints are refused with a message saying why.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| EngineError::File {
                path: index.clone(),
                why: "missing `weight_map` object".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values() {
            let f = f.as_str().ok_or_else(|| EngineError::File {
                path: index.clone(),
                why: "`weight_map` values must be file names".into(),
            })?;
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        for p in &files {
            if !p.exists() {
                return Err(EngineError::File {
                    path: p.clone(),
                    why: "shard listed in the index is missing".into(),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found = Vec::new();
    let mut pickles = Vec::new();
    let rd = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(format!("listing {}", dir.display()), e))?;
    for entry in rd {
        let p = entry
            .map_err(|e| EngineError::io(format!("listing {}", dir.display()), e))?
            .path();
        match p.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => found.push(p),
            Some("bin" | "pt" | "pth") => pickles.push(p),
            _ => {}
        }
    }
    found.sort();
    if !found.is_empty() {
        return Ok(found);
    }
    if let Some(p) = pickles.into_iter().next() {
        return Err(EngineError::PickleRefused { path: p });
    }
    Err(EngineError::File {
        path: dir.to_path_buf(),
        why: "no model.safetensors, model.safetensors.index.json or *.safetensors found".into(),
    })
}

/// Read every tensor of `files` (memory-mapped), converted to `dtype` on `device`.
pub fn load_safetensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    load_renamed(files, dtype, device, &|n| Some(n.to_string()))
}

/// The tensors of `files` that `rename` keeps, under the names it gives, in `dtype` on `device`.
fn load_renamed(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    rename: &dyn Fn(&str) -> Option<String>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for_each_safetensor(files, dtype, device, rename, &mut |name, t| {
        out.insert(name, t);
        Ok(())
    })?;
    Ok(out)
}

/// Hands every tensor of `files` (memory-mapped) that `rename` keeps, under the name it gives, converted to
/// `dtype` on `device`, to `f`, one at a time: the caller decides what to keep of each before the next is read.
/// A tensor `rename` drops is never read.
fn for_each_safetensor(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    rename: &dyn Fn(&str) -> Option<String>,
    f: &mut dyn FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    for p in files {
        if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("bin" | "pt" | "pth")
        ) {
            return Err(EngineError::PickleRefused { path: p.clone() });
        }
    }
    // SAFETY (the one audited unsafe block of the crate): memory-mapping a file is unsafe because another
    // process could modify it while mapped. The mapping is read-only, lives only inside this function, and every
    // tensor is copied out of it (`load` → `to_dtype`) before the map is dropped, so no reference to the mapped
    // bytes escapes.
    #[allow(unsafe_code)]
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(|e| {
        EngineError::File {
            path: files.first().cloned().unwrap_or_default(),
            why: format!("cannot read safetensors: {e}"),
        }
    })?;
    let mut names: Vec<String> = st.tensors().into_iter().map(|(name, _)| name).collect();
    names.sort();
    for name in names {
        let Some(to) = rename(&name) else { continue };
        let t = st.load(&name, device)?;
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        f(to, t)?;
    }
    Ok(())
}

/// The tensors of an image-and-text checkpoint's folder that are not its text model (the vision tower and the
/// projector), under their stored names, in `dtype` on the CPU: what an export copies through.
pub fn load_other_tensors(dir: &Path, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let others = |n: &str| match super::arch::text_tensor_name(true, n) {
        Some(_) => None,
        None => Some(n.to_string()),
    };
    load_renamed(&safetensors_files(dir)?, dtype, &Device::Cpu, &others)
}

/// Load a local Hugging Face folder: config.json, weights, tokenizer files.
pub fn load_hf_folder(dir: &Path, dtype: DType, device: &Device) -> Result<ModelFiles> {
    load_hf_folder_with(dir, dtype, device, BaseStorage::Dense)
}

/// [`load_hf_folder`] with `quantization_bit`'s storage `to` ([`BaseStorage::Linears`] or [`BaseStorage::Bnb4`]):
/// each decoder linear weight is quantized onto `device` as it is read ([`ModelFiles::insert_tensor`]), so the
/// peak host memory is the quantized base plus one dense weight, not the dense base.
pub fn load_hf_folder_with(
    dir: &Path,
    dtype: DType,
    device: &Device,
    to: BaseStorage,
) -> Result<ModelFiles> {
    if dir.is_file() {
        if matches!(
            dir.extension().and_then(|e| e.to_str()),
            Some("bin" | "pt" | "pth")
        ) {
            return Err(EngineError::PickleRefused {
                path: dir.to_path_buf(),
            });
        }
        return Err(EngineError::File {
            path: dir.to_path_buf(),
            why: "expected a model folder (config.json + *.safetensors) or a .gguf file".into(),
        });
    }
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(EngineError::File {
            path: cfg_path,
            why: "missing; a model folder needs config.json".into(),
        });
    }
    let config = read_json(&cfg_path)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| EngineError::File {
                path: tok_path.clone(),
                why: format!("cannot parse tokenizer: {e}"),
            })?,
        )
    } else {
        None
    };
    let mut out = ModelFiles {
        config,
        tensors: HashMap::new(),
        quantized: HashMap::new(),
        bnb4: HashMap::new(),
        tokenizer,
        tokenizer_config: read_json_opt(&dir.join("tokenizer_config.json"))?,
        generation_config: read_json_opt(&dir.join("generation_config.json"))?,
        dir: dir.to_path_buf(),
    };
    // A weight to be quantized is read on the host and reaches `device` quantized; the rest goes there as read.
    let read_on = if to == BaseStorage::Dense {
        device.clone()
    } else {
        Device::Cpu
    };
    // An image-and-text checkpoint: its text model only, under termtune's names.
    let image_text = super::arch::is_image_text(&out.config);
    let rename = |n: &str| super::arch::text_tensor_name(image_text, n);
    for_each_safetensor(
        &safetensors_files(dir)?,
        dtype,
        &read_on,
        &rename,
        &mut |name, t| out.insert_tensor(name, t, to, device),
    )?;
    Ok(out)
}

/// A tensor flattened to little-endian bytes for the `safetensors` writer.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn raw(t: &Tensor) -> Result<RawTensor> {
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    let (dtype, data): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
        DType::F32 => (
            safetensors::Dtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            safetensors::Dtype::F64,
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            safetensors::Dtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            safetensors::Dtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            safetensors::Dtype::U32,
            flat.to_vec1::<u32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            safetensors::Dtype::I64,
            flat.to_vec1::<i64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(EngineError::Invalid(format!(
                "cannot save a {other:?} tensor to safetensors"
            )));
        }
    };
    Ok(RawTensor {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// `torch_dtype` spelling of a dtype.
pub fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The `config.json` of a saved model folder whose weights are in `dt`: the model's config with the dtype in both
/// spellings, so that transformers 4 (`torch_dtype`) and 5 (`dtype`, which wins there) read the dtype of these
/// weights, never a source's value copied alongside.
pub fn saved_config(config: &Value, dt: DType) -> Value {
    let mut config = config.clone();
    if let Value::Object(map) = &mut config {
        map.insert("torch_dtype".into(), Value::from(dtype_name(dt)));
        map.insert("dtype".into(), Value::from(dtype_name(dt)));
        map.insert("use_cache".into(), Value::Bool(true));
    }
    config
}

/// The source's `generation_config.json`, or one built from the config's special token ids.
pub fn generation_config(source: &Value, config: &Value) -> Value {
    if source.is_object() {
        return source.clone();
    }
    let mut g = serde_json::Map::new();
    for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(k) {
            g.insert(k.into(), v.clone());
        }
    }
    Value::Object(g)
}

/// Write tensors to a safetensors file with metadata `{"format": "pt"}` (what PyTorch/PEFT write and expect).
///
/// Written here rather than with `safetensors::serialize_to_file`, which stages the file in an owner-only (0600)
/// temporary file: through [`crate::fsutil::write_atomic_with`] the file gets a plain file's permissions (so a
/// teammate, or a server running as another user, can read an adapter), and a full disk names the file.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut items: Vec<(String, RawTensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        items.push((k.clone(), raw(t)?));
    }
    // safetensors' own order: by descending dtype alignment, then by name.
    items.sort_by(|(ln, l), (rn, r)| r.dtype.cmp(&l.dtype).then(ln.cmp(rn)));
    let bad = |why: String| EngineError::File {
        path: path.to_path_buf(),
        why: format!("cannot write safetensors: {why}"),
    };
    let mut infos = Vec::with_capacity(items.len());
    let mut offset = 0usize;
    for (name, t) in &items {
        let end = offset + t.data.len();
        infos.push((
            name.clone(),
            safetensors::tensor::TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata =
        safetensors::tensor::Metadata::new(Some(meta), infos).map_err(|e| bad(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| bad(e.to_string()))?;
    // The data starts 8-byte aligned: the header is padded with spaces (as safetensors does).
    header.resize(header.len().next_multiple_of(8), b' ');
    let total = 8 + header.len() + offset;
    crate::fsutil::write_atomic_with(path, total as u64, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, t) in &items {
            w.write_all(&t.data)?;
        }
        Ok(())
    })
    .map_err(|e| EngineError::io(format!("writing {}", path.display()), e))
}

/// Whether `quantization_bit`'s storage `to` holds the tensor `name` (of `dims`) quantized: a decoder layer's linear
/// weight (q/k/v/o and gate/up/down projections) whose rows split into whole blocks. The embeddings, norms and
/// lm_head stay dense, as bitsandbytes leaves them.
fn quantizes(name: &str, dims: &[usize], to: BaseStorage) -> bool {
    let block = match to {
        BaseStorage::Linears(d) => d.block_size(),
        BaseStorage::Bnb4(..) => 1,
        BaseStorage::Dense | BaseStorage::Ggml(_) => return false,
    };
    name.starts_with("model.layers.")
        && LINEAR_LEAVES
            .iter()
            .any(|leaf| name.ends_with(&format!(".{leaf}.weight")))
        && dims.len() == 2
        && dims[1].is_multiple_of(block)
}

impl ModelFiles {
    /// Drops the weights, keeping the configs and tokenizer, once a [`super::Model`] holds them: the model shares
    /// their storage, so kept they would pin a second copy of every weight it then replaces (an adapter merged,
    /// PiSSA's residual, a trained copy), doubling the peak memory of those layers.
    pub fn release_weights(&mut self) {
        self.tensors.clear();
        self.quantized.clear();
        self.bnb4.clear();
    }

    /// Whether some weights are held quantized (a GGUF's blocks, `quantization_bit`).
    pub fn is_quantized(&self) -> bool {
        !self.quantized.is_empty() || !self.bnb4.is_empty()
    }

    /// The quantized weights: how many, and their bytes.
    pub fn quantized_size(&self) -> (usize, usize) {
        let ggml = self.quantized.values().map(|q| q.storage_size_in_bytes());
        let bnb4 = self.bnb4.values().map(|q| q.storage_size_in_bytes());
        (
            self.quantized.len() + self.bnb4.len(),
            ggml.chain(bnb4).sum(),
        )
    }

    /// Adds the tensor `name` (in the model's dtype, on any device): quantized onto `device` when `to`
    /// (`quantization_bit`: [`BaseStorage::Linears`] for GGML blocks,
    /// [`BaseStorage::Bnb4`] for bitsandbytes' 4-bit layout) holds it quantized
    /// ([`quantizes`]), else dense on `device`. A base read this way, weight by weight, is never whole and dense in
    /// memory, and reaches a GPU already quantized.
    pub fn insert_tensor(
        &mut self,
        name: String,
        t: Tensor,
        to: BaseStorage,
        device: &Device,
    ) -> Result<()> {
        if !quantizes(&name, t.dims(), to) {
            self.tensors.insert(name, t.to_device(device)?);
            return Ok(());
        }
        match to {
            BaseStorage::Linears(dtype) => {
                let q = QTensor::quantize_onto(&t.to_dtype(DType::F32)?, dtype, device)?;
                self.quantized.insert(name, QWeight::new(Arc::new(q))?);
            }
            BaseStorage::Bnb4(kind, double) => {
                let q = Bnb4Tensor::quantize_onto(&t, kind, double, device)
                    .map_err(|e| EngineError::Invalid(format!("{name}: {e}")))?;
                self.bnb4.insert(name, Arc::new(q));
            }
            BaseStorage::Dense | BaseStorage::Ggml(_) => {
                self.tensors.insert(name, t.to_device(device)?);
            }
        }
        Ok(())
    }

    /// `quantization_bit` over a base already read dense (a GGUF dequantized on load): moves the decoder layers'
    /// linear weights that `to` holds quantized into [`Self::quantized`] or [`Self::bnb4`] on `device`, one at a
    /// time ([`Self::insert_tensor`]); the rest stays where it is. Returns how many were quantized.
    pub fn quantize_linears(&mut self, to: BaseStorage, device: &Device) -> Result<usize> {
        let mut names: Vec<String> = self
            .tensors
            .iter()
            .filter(|(name, t)| quantizes(name, t.dims(), to))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        for name in &names {
            if let Some(t) = self.tensors.remove(name) {
                self.insert_tensor(name.clone(), t, to, device)?;
            }
        }
        Ok(names.len())
    }

    /// Moves every tensor (dense, GGML blocks, 4-bit) to `device`, one at a time, exactly.
    pub fn move_to(&mut self, device: &Device) -> Result<()> {
        for t in self.tensors.values_mut() {
            if !t.device().same_device(device) {
                *t = t.to_device(device)?;
            }
        }
        for q in self.quantized.values_mut() {
            *q = q.to_device(device)?;
        }
        for q in self.bnb4.values_mut() {
            if !q.device().same_device(device) {
                *q = Arc::new(q.to_device(device)?);
            }
        }
        Ok(())
    }
}
