//! Hugging Face Hub ids (`HuggingFaceTB/SmolLM2-135M-Instruct`) → a local snapshot folder, through hf-hub 0.5 and
//! the standard Python cache layout (`<cache>/models--org--name/{refs/<rev>, snapshots/<sha>/…, blobs/…}`), so
//! models already downloaded by Python tools are reused and the other way round.
//!
//! Cache first: a snapshot of the requested revision with config.json, tokenizer.json and every safetensors file
//! is used without any network access (offline, config + weights suffice).
//! Environment (read by [`HubOptions::from_env`]; hf-hub 0.5 itself only reads `HF_HOME` and `HF_ENDPOINT`):
//! `HF_HUB_CACHE` / `HUGGINGFACE_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`, `HF_ENDPOINT`, `HF_TOKEN`,
//! `HF_TOKEN_PATH`, `HF_HUB_OFFLINE` (`1`/`true`/`yes`/`on`: cache only).

use std::path::{Path, PathBuf};

use hf_hub::api::Progress;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// Files of a model repository that termtune needs besides the weights (all optional but `config.json`).
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "`{id}` is not a hub id (expected `organisation/name`, letters, digits, `-`, `_`, `.`); for a local model pass an existing folder or .gguf file"
    )]
    BadId { id: String },
    #[error(
        "model `{id}` (revision {revision}) is not in the local Hugging Face cache ({cache}) and offline mode is on (HF_HUB_OFFLINE); run once online, or pass a local folder (config.json, tokenizer.json, *.safetensors) or a .gguf file"
    )]
    NotCached {
        id: String,
        revision: String,
        cache: PathBuf,
    },
    #[error(
        "model `{id}` is not in the local Hugging Face cache ({cache}) and the Hub at {endpoint} did not answer ({message}); run once online or set HF_HUB_OFFLINE=1 with a pre-populated cache, or pass a local folder or a .gguf file"
    )]
    Unreachable {
        id: String,
        cache: PathBuf,
        endpoint: String,
        message: String,
    },
    #[error("downloading `{file}` of model `{id}` from {endpoint} into {cache} failed: {message}")]
    Download {
        id: String,
        file: String,
        cache: PathBuf,
        endpoint: String,
        message: String,
    },
    #[error(
        "model `{id}` has no safetensors weights (model.safetensors or {INDEX}); termtune loads safetensors or GGUF only"
    )]
    NoWeights { id: String },
    #[error("{path}: {message}")]
    Cache { path: PathBuf, message: String },
}

/// Where and how to reach the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder (`…/huggingface/hub`).
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// Cache only, never touch the network.
    pub offline: bool,
    pub revision: String,
}

impl HubOptions {
    /// Options from the process environment (see the module docs).
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Options from a variable lookup, with Python `huggingface_hub`'s precedence:
    /// cache = `HF_HUB_CACHE` > `HUGGINGFACE_HUB_CACHE` > `$HF_HOME/hub` > `$XDG_CACHE_HOME/huggingface/hub` >
    /// `~/.cache/huggingface/hub`; token = `HF_TOKEN` > file `HF_TOKEN_PATH` > `$HF_HOME/token`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let home = get("HOME").map(PathBuf::from).unwrap_or_default();
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN").or_else(|| {
            let path = get("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = get("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self {
            cache_dir,
            endpoint: get("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| "https://huggingface.co".into()),
            token,
            offline,
            revision: "main".into(),
        }
    }
}

/// Download progress, for the UI or a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubProgress {
    /// A file taken from the cache.
    Cached {
        file: String,
    },
    /// A download starts (`bytes` = file size).
    Start {
        file: String,
        bytes: u64,
    },
    /// Bytes received so far for `file`.
    Advance {
        file: String,
        done: u64,
        total: u64,
    },
    Done {
        file: String,
    },
}

/// `org/name` with the characters the Hub allows; a path that exists locally is never a hub id.
pub fn looks_like_hub_id(s: &str) -> bool {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.starts_with('-')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match s.split_once('/') {
        Some((org, name)) => ok_part(org) && ok_part(name) && !Path::new(s).exists(),
        None => false,
    }
}

/// The cache folder of one model (`<cache>/models--org--name`).
pub fn model_cache_dir(id: &str, opts: &HubOptions) -> PathBuf {
    opts.cache_dir
        .join(Repo::new(id.to_string(), RepoType::Model).folder_name())
}

/// The snapshot folder of `id` at `opts.revision` if the cache holds a complete one (config.json and every
/// safetensors file the index names).
pub fn cached_snapshot(id: &str, opts: &HubOptions) -> Option<PathBuf> {
    let repo = model_cache_dir(id, opts);
    let commit = std::fs::read_to_string(repo.join("refs").join(&opts.revision))
        .ok()
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|| opts.revision.clone());
    let snap = repo.join("snapshots").join(commit);
    if !snap.join("config.json").is_file() {
        return None;
    }
    let shards = weight_files(&snap).ok()?;
    shards
        .iter()
        .all(|f| snap.join(f).is_file())
        .then_some(snap)
}

/// Weight files a snapshot needs: the shards named by `model.safetensors.index.json`, else `model.safetensors`.
fn weight_files(snap: &Path) -> Result<Vec<String>, HubError> {
    let index = snap.join(INDEX);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| HubError::Cache {
            path: index.clone(),
            message: e.to_string(),
        })?;
        return shards_of_index(&text).map_err(|message| HubError::Cache {
            path: index,
            message,
        });
    }
    Ok(vec![SINGLE.to_string()])
}

fn shards_of_index(text: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = v["weight_map"]
        .as_object()
        .ok_or("no `weight_map` object")?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err("`weight_map` is empty".into());
    }
    Ok(files)
}

/// hf-hub's download progress → [`HubProgress`] events for `file`.
pub(crate) struct Forward<'a> {
    pub file: String,
    pub done: u64,
    pub total: u64,
    pub sink: &'a mut dyn FnMut(&HubProgress),
}

impl Progress for Forward<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.done = 0;
        (self.sink)(&HubProgress::Start {
            file: self.file.clone(),
            bytes: self.total,
        });
    }
    fn update(&mut self, size: usize) {
        self.done += size as u64;
        (self.sink)(&HubProgress::Advance {
            file: self.file.clone(),
            done: self.done,
            total: self.total,
        });
    }
    fn finish(&mut self) {
        (self.sink)(&HubProgress::Done {
            file: self.file.clone(),
        });
    }
}

/// Resolves a hub id to a local snapshot folder holding config, tokenizer and safetensors weights: from the cache
/// when it is complete, else by downloading the missing files (unless offline).
pub fn resolve(
    id: &str,
    opts: &HubOptions,
    progress: &mut dyn FnMut(&HubProgress),
) -> Result<PathBuf, HubError> {
    if !looks_like_hub_id(id) {
        return Err(HubError::BadId { id: id.to_string() });
    }
    // Online, a snapshot without tokenizer.json is completed from the Hub; offline, config + weights are enough
    // (the model loader then says what is missing).
    if let Some(snap) = cached_snapshot(id, opts)
        && (opts.offline || snap.join("tokenizer.json").is_file())
    {
        return Ok(snap);
    }
    if opts.offline {
        return Err(HubError::NotCached {
            id: id.to_string(),
            revision: opts.revision.clone(),
            cache: opts.cache_dir.clone(),
        });
    }
    let unreachable = |message: String| HubError::Unreachable {
        id: id.to_string(),
        cache: opts.cache_dir.clone(),
        endpoint: opts.endpoint.clone(),
        message,
    };
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| unreachable(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        opts.revision.clone(),
    ));
    let info = repo.info().map_err(|e| unreachable(e.to_string()))?;
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();

    let mut fetch = |file: &str| -> Result<PathBuf, HubError> {
        let cache = Cache::new(opts.cache_dir.clone()).repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            opts.revision.clone(),
        ));
        if let Some(p) = cache.get(file) {
            progress(&HubProgress::Cached {
                file: file.to_string(),
            });
            return Ok(p);
        }
        let fwd = Forward {
            file: file.to_string(),
            done: 0,
            total: 0,
            sink: &mut *progress,
        };
        repo.download_with_progress(file, fwd)
            .map_err(|e| HubError::Download {
                id: id.to_string(),
                file: file.to_string(),
                cache: opts.cache_dir.clone(),
                endpoint: opts.endpoint.clone(),
                message: e.to_string(),
            })
    };

    if !listed.contains(&"config.json") {
        return Err(HubError::Download {
            id: id.to_string(),
            file: "config.json".into(),
            cache: opts.cache_dir.clone(),
            endpoint: opts.endpoint.clone(),
            message: "the repository has no config.json (a GGUF-only repository? download the .gguf and pass its path)".into(),
        });
    }
    let mut snapshot = None;
    for f in MODEL_FILES {
        if listed.contains(f) {
            let p = fetch(f)?;
            if *f == "config.json" {
                snapshot = p.parent().map(Path::to_path_buf);
            }
        }
    }
    let weights = if listed.contains(&INDEX) {
        let p = fetch(INDEX)?;
        let text = std::fs::read_to_string(&p).map_err(|e| HubError::Cache {
            path: p.clone(),
            message: e.to_string(),
        })?;
        shards_of_index(&text).map_err(|message| HubError::Cache { path: p, message })?
    } else if listed.contains(&SINGLE) {
        vec![SINGLE.to_string()]
    } else {
        return Err(HubError::NoWeights { id: id.to_string() });
    };
    for w in &weights {
        fetch(w)?;
    }
    snapshot.ok_or_else(|| HubError::NoWeights { id: id.to_string() })
}
