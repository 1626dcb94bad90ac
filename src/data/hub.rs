//! Datasets on the Hugging Face Hub: a `dataset_info.json` entry with `hf_hub_url` (LLaMA-Factory's own
//! registry names most of its datasets this way: `alpaca_en` is `llamafactory/alpaca_en`), or any repo id when
//! `dataset_dir: ONLINE`. The repository's data files are chosen as Hugging Face `datasets` chooses them for
//! `load_dataset(repo, name=subset, data_dir=folder, split=split)`, downloaded into the standard hub cache
//! (`<cache>/datasets--org--name/…`, shared with Python tools) and read like local files.
//!
//! How the files are chosen (datasets 5, `data_files.py` / `load.py`):
//! 1. The dataset card (`README.md`) front matter's `configs:`: the one named `subset`, else the one marked
//!    `default: true`, else the one named `default`, else the only one; its `data_files` (a pattern, a list, or
//!    a list of `{split, path}`) and `data_dir`.
//! 2. Otherwise the default patterns, under `folder`: `data/{split}-NNNNN-of-NNNNN*.*` shards
//!    (what `push_to_hub` writes); else split names in folder names (`train/`, `validation/`, `test/` and their
//!    synonyms), else in file names (`train.jsonl`, `my_test-00.csv`); else every file is `train`.
//!
//! Hidden files and folders (`.x`, `__x`) and the card are never data. Of the chosen files, those of the most
//! common type are read (json and jsonl count as one). Online, the file list comes from the Hub and each file is
//! taken from the cache when it is already there; offline (`HF_HUB_OFFLINE=1`), or when the Hub does not answer
//! and the cache holds the dataset, the cached snapshot's files are used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSetBuilder};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value;

use super::DataError;
use crate::engine::hub::{Forward, HubOptions, HubProgress, looks_like_hub_id};

/// Where a hub dataset is: LLaMA-Factory's `hf_hub_url`, `subset` (the `name` of `load_dataset`) and `folder`
/// (its `data_dir`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubSource {
    pub repo: String,
    pub subset: Option<String>,
    pub folder: Option<String>,
}

/// `datasets`' `FILES_TO_IGNORE` (by file name).
const IGNORED: &[&str] = &[
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

/// The split keywords of `datasets` (`SPLIT_KEYWORDS`), for the three default splits.
const SPLITS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];
const SEP: &str = "[-._ 0-9]";

/// LLaMA-Factory's loader type of a data file, by extension (its `FILEEXT2TYPE`).
fn loader(file: &str) -> Option<&'static str> {
    let ext = file.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "json" | "jsonl" => "json",
        "txt" => "text",
        "csv" => "csv",
        "parquet" => "parquet",
        "arrow" => "arrow",
        _ => return None,
    })
}

fn hidden(file: &str) -> bool {
    file.split('/')
        .any(|part| part.starts_with('.') || part.starts_with("__"))
}

/// A pattern's matcher; `*` and `?` stay within one path part and `**/` also matches no folder, as in fsspec's
/// glob. Each pattern is compiled once and run over every file.
fn glob(pattern: &str) -> Result<Glob, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("bad data_files pattern `{pattern}`: {e}"))
}

/// The split → files of a repo without `configs:`, by `datasets`' default patterns; `files` are relative to the
/// data folder.
fn default_splits(files: &[String]) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // `data/{split}-00000-of-00001*.*`: the split is whatever comes before the shard numbers.
    let sharded =
        glob("data/*-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*")?.compile_matcher();
    for f in files {
        if sharded.is_match(f)
            && let Some(split) = f.strip_prefix("data/").and_then(shard_split)
        {
            out.entry(split).or_default().push(f.clone());
        }
    }
    if !out.is_empty() {
        return Ok(out);
    }
    let dir_patterns = [
        "**/{k}/**",
        "**/{k}{s}*/**",
        "**/*{s}{k}/**",
        "**/*{s}{k}{s}*/**",
    ];
    let name_patterns = ["**/{k}{s}*", "**/*{s}{k}{s}*"];
    for patterns in [&dir_patterns[..], &name_patterns[..]] {
        for (split, keywords) in SPLITS {
            let mut set = GlobSetBuilder::new();
            for k in *keywords {
                for p in patterns {
                    set.add(glob(&p.replace("{k}", k).replace("{s}", SEP))?);
                }
            }
            let set = set
                .build()
                .map_err(|e| format!("bad split patterns: {e}"))?;
            let hits: Vec<String> = files.iter().filter(|f| set.is_match(f)).cloned().collect();
            if !hits.is_empty() {
                out.insert((*split).to_string(), hits);
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
    }
    out.insert("train".into(), files.to_vec());
    Ok(out)
}

/// `train` of `train-00000-of-00003.parquet` (the split part of a shard name).
fn shard_split(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    (0..bytes.len()).find_map(|i| {
        let rest = &name[i..];
        let b = rest.as_bytes();
        let shard = b.len() >= 15
            && b[0] == b'-'
            && b[1..6].iter().all(u8::is_ascii_digit)
            && &b[6..10] == b"-of-"
            && b[10..15].iter().all(u8::is_ascii_digit);
        (shard && i > 0).then(|| name[..i].to_string())
    })
}

/// The dataset card's front matter (`---` YAML `---`) as JSON, if any.
fn card_metadata(readme: &str) -> Result<Option<Value>, String> {
    let mut lines = readme.lines();
    if lines.next().map(str::trim_end) != Some("---") {
        return Ok(None);
    }
    let mut yaml = String::new();
    for line in lines {
        if line.trim_end() == "---" {
            return serde_norway::from_str::<Value>(&yaml)
                .map(Some)
                .map_err(|e| format!("README.md metadata is not valid YAML ({e})"));
        }
        yaml.push_str(line);
        yaml.push('\n');
    }
    Ok(None)
}

/// Split → patterns of one `configs:` entry's `data_files`.
fn config_patterns(data_files: &Value) -> Result<BTreeMap<String, Vec<String>>, String> {
    let strings = |v: &Value| -> Result<Vec<String>, String> {
        match v {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("`data_files` entry {x} is not a path"))
                })
                .collect(),
            other => Err(format!("`path` {other} is not a path or a list of paths")),
        }
    };
    let mut out = BTreeMap::new();
    match data_files {
        Value::String(_) => {
            out.insert("train".to_string(), strings(data_files)?);
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            out.insert("train".to_string(), strings(data_files)?);
        }
        Value::Array(items) => {
            for item in items {
                let split = item
                    .get("split")
                    .and_then(Value::as_str)
                    .unwrap_or("train")
                    .to_string();
                let path = item
                    .get("path")
                    .ok_or_else(|| format!("`data_files` entry {item} has no `path`"))?;
                out.entry(split)
                    .or_insert_with(Vec::new)
                    .extend(strings(path)?);
            }
        }
        Value::Object(map) => {
            for (split, path) in map {
                out.insert(split.clone(), strings(path)?);
            }
        }
        other => return Err(format!("`data_files` {other} is not understood")),
    }
    Ok(out)
}

/// The files (repo-relative) of `split`, chosen from `listed` as `datasets` chooses them. `readme` is the card.
pub fn choose_files(
    src: &HubSource,
    split: &str,
    listed: &[String],
    readme: Option<&str>,
) -> Result<Vec<String>, String> {
    let configs = match readme.map(card_metadata).transpose()?.flatten() {
        Some(meta) => meta.get("configs").cloned(),
        None => None,
    };
    let usable: Vec<&String> = listed
        .iter()
        .filter(|f| !hidden(f) && loader(f).is_some())
        .filter(|f| !IGNORED.contains(&f.rsplit('/').next().unwrap_or(f)))
        .collect();
    let under = |dir: Option<&str>| -> Vec<String> {
        let prefix = dir.map(|d| format!("{}/", d.trim_matches('/')));
        usable
            .iter()
            .filter_map(|f| match &prefix {
                Some(p) => f.strip_prefix(p.as_str()).map(str::to_string),
                None => Some((*f).clone()),
            })
            .collect()
    };
    let (dir, splits): (Option<String>, BTreeMap<String, Vec<String>>) = match configs {
        Some(Value::Array(configs)) if !configs.is_empty() => {
            let name_of = |c: &Value| {
                c.get("config_name")
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                    .to_string()
            };
            let names: Vec<String> = configs.iter().map(name_of).collect();
            let chosen = match &src.subset {
                Some(s) => configs.iter().find(|c| name_of(c) == *s).ok_or_else(|| {
                    format!(
                        "no subset `{s}`; its subsets (configs of README.md): {}; fix `subset` in dataset_info.json",
                        names.join(", ")
                    )
                })?,
                None => configs
                    .iter()
                    .find(|c| c.get("default").and_then(Value::as_bool) == Some(true))
                    .or_else(|| configs.iter().find(|c| name_of(c) == "default"))
                    .or_else(|| (configs.len() == 1).then(|| &configs[0]))
                    .ok_or_else(|| {
                        format!(
                            "several subsets ({}) and no default; set `subset` in dataset_info.json",
                            names.join(", ")
                        )
                    })?,
            };
            let data_dir = chosen
                .get("data_dir")
                .and_then(Value::as_str)
                .map(str::to_string);
            let dir = match (&src.folder, data_dir) {
                (Some(f), _) => Some(f.clone()),
                (None, d) => d,
            };
            let files = under(dir.as_deref());
            let mut splits = BTreeMap::new();
            match chosen.get("data_files") {
                Some(df) => {
                    for (split, patterns) in config_patterns(df)? {
                        // Files in pattern order, each once.
                        let mut hits = Vec::new();
                        let mut seen = std::collections::HashSet::new();
                        for p in &patterns {
                            let m = glob(p)?.compile_matcher();
                            for f in files.iter().filter(|f| m.is_match(f)) {
                                if seen.insert(f) {
                                    hits.push(f.clone());
                                }
                            }
                        }
                        splits.insert(split, hits);
                    }
                }
                None => splits = default_splits(&files)?,
            }
            (dir, splits)
        }
        _ => {
            if let Some(s) = src.subset.as_deref().filter(|s| *s != "default") {
                return Err(format!(
                    "no subsets (no `configs:` in README.md), so `subset: {s}` cannot be chosen; remove `subset` (or use `folder` for a sub-folder)"
                ));
            }
            let files = under(src.folder.as_deref());
            (src.folder.clone(), default_splits(&files)?)
        }
    };
    let Some(files) = splits.get(split) else {
        let known: Vec<&str> = splits.keys().map(String::as_str).collect();
        return Err(format!(
            "no split `{split}` (its splits: {}); fix `split` in dataset_info.json",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    };
    // The most common file type wins (datasets picks the builder the same way); ties go to the first seen.
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for f in files {
        if let Some(l) = loader(f) {
            match counts.iter_mut().find(|(k, _)| *k == l) {
                Some((_, n)) => *n += 1,
                None => counts.push((l, 1)),
            }
        }
    }
    let Some(best) = counts
        .iter()
        .fold(None::<(&str, usize)>, |acc, &(k, n)| match acc {
            Some((_, m)) if m >= n => acc,
            _ => Some((k, n)),
        })
        .map(|(k, _)| k)
    else {
        return Err(format!(
            "no data files for split `{split}` that termtune reads (.json, .jsonl, .csv, .parquet, .arrow, .txt)"
        ));
    };
    let prefix = dir
        .as_deref()
        .map(|d| format!("{}/", d.trim_matches('/')))
        .unwrap_or_default();
    let mut chosen: Vec<String> = files
        .iter()
        .filter(|f| loader(f) == Some(best))
        .map(|f| format!("{prefix}{f}"))
        .collect();
    chosen.sort();
    Ok(chosen)
}

/// Every file of a cached snapshot, repo-relative with `/`.
fn snapshot_files(snap: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![snap.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(snap) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

fn cached_snapshot(repo: &str, opts: &HubOptions) -> Option<PathBuf> {
    let dir = opts
        .cache_dir
        .join(Repo::new(repo.to_string(), RepoType::Dataset).folder_name());
    let commit = std::fs::read_to_string(dir.join("refs").join(&opts.revision))
        .ok()
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|| opts.revision.clone());
    let snap = dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// The local paths of the data files of `src`'s `split`, downloaded when needed (with `progress`).
pub fn dataset_files(
    name: &str,
    src: &HubSource,
    split: &str,
    opts: &HubOptions,
    progress: &mut dyn FnMut(&HubProgress),
) -> Result<Vec<PathBuf>, DataError> {
    let fail = |message: String| DataError::Hub {
        name: name.to_string(),
        repo: src.repo.clone(),
        message,
    };
    if !looks_like_hub_id(&src.repo) {
        return Err(fail(
            "not a hub dataset id (expected `organisation/name`); fix `hf_hub_url` in dataset_info.json".into(),
        ));
    }
    let download_fix = format!(
        "run once online (or download it with `huggingface-cli download --repo-type dataset {}`)",
        src.repo
    );
    let from_cache = |why: &str, fix: &str| -> Result<Vec<PathBuf>, DataError> {
        let Some(snap) = cached_snapshot(&src.repo, opts) else {
            return Err(fail(format!(
                "{why}, and the hub cache ({}) does not hold it; {fix}",
                opts.cache_dir.display(),
            )));
        };
        let listed = snapshot_files(&snap);
        let readme = std::fs::read_to_string(snap.join("README.md")).ok();
        let files = choose_files(src, split, &listed, readme.as_deref()).map_err(fail)?;
        Ok(files.iter().map(|f| snap.join(f)).collect())
    };
    if opts.offline {
        return from_cache("offline mode is on (HF_HUB_OFFLINE)", &download_fix);
    }
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| fail(format!("cannot reach the Hub ({e})")))?;
    let repo_id = Repo::with_revision(src.repo.clone(), RepoType::Dataset, opts.revision.clone());
    let repo = api.repo(repo_id.clone());
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) => {
            // The Hub's answer, when it gave one (hf-hub reports `http status: N`).
            let text = e.to_string();
            let (why, fix) = if text.contains("status: 404") {
                (
                    format!("the Hub at {} has no such dataset", opts.endpoint),
                    "fix `hf_hub_url` in dataset_info.json (a private repo also needs HF_TOKEN or `hf_hub_token`)".to_string(),
                )
            } else if text.contains("status: 401") || text.contains("status: 403") {
                (
                    format!("the Hub at {} refused access ({text})", opts.endpoint),
                    "the dataset is gated or private: accept its terms on its Hub page and set HF_TOKEN (or `hf_hub_token`)".to_string(),
                )
            } else {
                (
                    format!("the Hub at {} did not answer ({text})", opts.endpoint),
                    download_fix.clone(),
                )
            };
            tracing::warn!(dataset = name, repo = %src.repo, "{why}; trying the hub cache");
            return from_cache(&why, &fix);
        }
    };
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let cache = Cache::new(opts.cache_dir.clone()).repo(repo_id);
    let mut fetch = |file: &str| -> Result<PathBuf, DataError> {
        if let Some(p) = cache.get(file) {
            progress(&HubProgress::Cached {
                file: file.to_string(),
            });
            return Ok(p);
        }
        tracing::info!(dataset = name, repo = %src.repo, file, "downloading");
        let forward = Forward {
            file: file.to_string(),
            done: 0,
            total: 0,
            sink: &mut *progress,
        };
        repo.download_with_progress(file, forward).map_err(|e| {
            fail(format!(
                "downloading `{file}` from {} into {} failed ({e})",
                opts.endpoint,
                opts.cache_dir.display()
            ))
        })
    };
    let readme = if listed.iter().any(|f| f == "README.md") {
        let p = fetch("README.md")?;
        Some(std::fs::read_to_string(&p).map_err(|e| DataError::io(&p, e))?)
    } else {
        None
    };
    let files = choose_files(src, split, &listed, readme.as_deref()).map_err(fail)?;
    files.iter().map(|f| fetch(f)).collect()
}
