//! `dataset_info.json`: LLaMA-Factory's dataset registry (one entry per dataset name).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::DataError;
use super::hub::HubSource;

/// Where a dataset's rows are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DataSource {
    /// `file_name`: a file or folder, absolute or under `dataset_dir`.
    Local(PathBuf),
    /// `hf_hub_url` (with `subset`, `folder`), or a name under `dataset_dir: ONLINE`.
    Hub(HubSource),
}

/// LLaMA-Factory's `dataset_dir` value that makes every dataset name a Hugging Face Hub id.
pub const ONLINE: &str = "ONLINE";

/// `formatting` of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Formatting {
    Alpaca,
    Sharegpt,
    Openai,
}

/// One resolved `dataset_info.json` entry, with LLaMA-Factory's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatasetAttr {
    pub name: String,
    pub source: DataSource,
    pub formatting: Formatting,
    pub ranking: bool,
    pub num_samples: Option<usize>,
    pub split: String,
    // columns
    pub prompt: String,
    pub query: String,
    pub response: String,
    pub history: Option<String>,
    pub messages: String,
    pub system: Option<String>,
    pub tools: Option<String>,
    pub chosen: Option<String>,
    pub rejected: Option<String>,
    pub kto_tag: Option<String>,
    pub images: Option<String>,
    pub videos: Option<String>,
    pub audios: Option<String>,
    // sharegpt tags
    pub role_tag: String,
    pub content_tag: String,
    pub user_tag: String,
    pub assistant_tag: String,
    pub observation_tag: String,
    pub function_tag: String,
    pub system_tag: String,
}

impl DatasetAttr {
    fn new(name: &str, source: DataSource, formatting: Formatting) -> Self {
        let openai = formatting == Formatting::Openai;
        DatasetAttr {
            name: name.to_string(),
            source,
            formatting,
            ranking: false,
            num_samples: None,
            split: "train".into(),
            prompt: "instruction".into(),
            query: "input".into(),
            response: "output".into(),
            history: None,
            messages: if openai {
                "messages".into()
            } else {
                "conversations".into()
            },
            system: None,
            tools: None,
            chosen: None,
            rejected: None,
            kto_tag: None,
            images: None,
            videos: None,
            audios: None,
            role_tag: if openai { "role".into() } else { "from".into() },
            content_tag: if openai {
                "content".into()
            } else {
                "value".into()
            },
            user_tag: if openai {
                "user".into()
            } else {
                "human".into()
            },
            assistant_tag: if openai {
                "assistant".into()
            } else {
                "gpt".into()
            },
            observation_tag: if openai {
                "tool".into()
            } else {
                "observation".into()
            },
            function_tag: "function_call".into(),
            system_tag: "system".into(),
        }
    }
}

/// The registry file of `dataset_dir`.
pub fn registry_path(dataset_dir: &Path) -> PathBuf {
    dataset_dir.join("dataset_info.json")
}

/// Reads and parses `dataset_dir/dataset_info.json`.
pub fn load_registry(dataset_dir: &Path) -> Result<serde_json::Map<String, Value>, DataError> {
    if dataset_dir.to_string_lossy().starts_with("REMOTE:") {
        return Err(DataError::Option {
            key: "dataset_dir",
            message: "`REMOTE:<repo>` (a dataset_info.json on the Hub) is not read; download that dataset_info.json into a folder and set `dataset_dir` to it (its `hf_hub_url` entries then download as usual)".into(),
        });
    }
    let path = registry_path(dataset_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::MissingRegistry { path });
        }
        Err(e) => return Err(DataError::io(path, e)),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(DataError::MalformedRegistry {
            path,
            message: "the top level is not an object".into(),
        }),
        Err(e) => Err(DataError::MalformedRegistry {
            path,
            message: e.to_string(),
        }),
    }
}

/// Resolves dataset `name` from a parsed registry.
pub fn resolve(
    registry: &serde_json::Map<String, Value>,
    registry_file: &Path,
    dataset_dir: &Path,
    name: &str,
) -> Result<DatasetAttr, DataError> {
    let malformed = |message: String| DataError::MalformedRegistry {
        path: registry_file.to_path_buf(),
        message,
    };
    let Some(entry) = registry.get(name) else {
        let mut known: Vec<&str> = registry
            .iter()
            .filter(|(_, v)| v.get("file_name").is_some())
            .map(|(k, _)| k.as_str())
            .collect();
        known.sort_unstable();
        let on_hub = registry
            .values()
            .filter(|v| v.get("file_name").is_none() && v.get("hf_hub_url").is_some())
            .count();
        let mut known = if known.is_empty() {
            "none with `file_name`".to_string()
        } else {
            known.join(", ")
        };
        if on_hub > 0 {
            known.push_str(&format!(", and {on_hub} on the Hugging Face Hub"));
        }
        return Err(DataError::UnknownDataset {
            name: name.to_string(),
            path: registry_file.to_path_buf(),
            known,
        });
    };
    let Some(entry) = entry.as_object() else {
        return Err(malformed(format!("entry `{name}` is not an object")));
    };
    let get_str =
        |obj: &serde_json::Map<String, Value>, key: &str| -> Result<Option<String>, DataError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(malformed(format!("`{name}.{key}` must be a string"))),
            }
        };
    let source = source_of(name, dataset_dir, &|key| get_str(entry, key))?;
    let formatting = match get_str(entry, "formatting")?.as_deref() {
        None | Some("alpaca") => Formatting::Alpaca,
        Some("sharegpt") => Formatting::Sharegpt,
        Some("openai") => Formatting::Openai,
        Some(other) => {
            return Err(malformed(format!(
                "`{name}.formatting` is `{other}`; use `alpaca`, `sharegpt` or `openai`"
            )));
        }
    };
    let mut attr = DatasetAttr::new(name, source, formatting);
    match entry.get("ranking") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => attr.ranking = *b,
        Some(_) => return Err(malformed(format!("`{name}.ranking` must be true or false"))),
    }
    match entry.get("num_samples") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let Some(n) = v.as_u64() else {
                return Err(malformed(format!(
                    "`{name}.num_samples` must be a positive integer"
                )));
            };
            attr.num_samples = usize::try_from(n).ok();
        }
    }
    if let Some(split) = get_str(entry, "split")? {
        attr.split = split;
    }
    if let Some(columns) = entry.get("columns") {
        let Some(columns) = columns.as_object() else {
            return Err(malformed(format!("`{name}.columns` must be an object")));
        };
        for (key, value) in columns {
            let Some(v) = value.as_str().map(str::to_string) else {
                return Err(malformed(format!(
                    "`{name}.columns.{key}` must be a string"
                )));
            };
            match key.as_str() {
                "prompt" => attr.prompt = v,
                "query" => attr.query = v,
                "response" => attr.response = v,
                "history" => attr.history = Some(v),
                "messages" => attr.messages = v,
                "system" => attr.system = Some(v),
                "tools" => attr.tools = Some(v),
                "chosen" => attr.chosen = Some(v),
                "rejected" => attr.rejected = Some(v),
                "kto_tag" => attr.kto_tag = Some(v),
                "images" => attr.images = Some(v),
                "videos" => attr.videos = Some(v),
                "audios" => attr.audios = Some(v),
                other => {
                    return Err(malformed(format!(
                        "`{name}.columns.{other}` is not a LLaMA-Factory column (prompt, query, response, history, messages, system, tools, images, videos, audios, chosen, rejected, kto_tag)"
                    )));
                }
            }
        }
    }
    if let Some(tags) = entry.get("tags") {
        let Some(tags) = tags.as_object() else {
            return Err(malformed(format!("`{name}.tags` must be an object")));
        };
        for (key, value) in tags {
            let Some(v) = value.as_str().map(str::to_string) else {
                return Err(malformed(format!("`{name}.tags.{key}` must be a string")));
            };
            match key.as_str() {
                "role_tag" => attr.role_tag = v,
                "content_tag" => attr.content_tag = v,
                "user_tag" => attr.user_tag = v,
                "assistant_tag" => attr.assistant_tag = v,
                "observation_tag" => attr.observation_tag = v,
                "function_tag" => attr.function_tag = v,
                "system_tag" => attr.system_tag = v,
                other => {
                    return Err(malformed(format!(
                        "`{name}.tags.{other}` is not a LLaMA-Factory tag (role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag)"
                    )));
                }
            }
        }
    }
    if attr.images.is_some() || attr.videos.is_some() || attr.audios.is_some() {
        return Err(DataError::Unsupported {
            name: name.to_string(),
            message: "images/videos/audios columns are not supported (termtune trains text-only models); pick a text-only dataset".into(),
        });
    }
    Ok(attr)
}

/// Where an entry's rows are, with LLaMA-Factory's precedence: a hub URL before `file_name` (ModelScope's or
/// Modelers' when `USE_MODELSCOPE_HUB` / `USE_OPENMIND_HUB` is set or the entry has no `hf_hub_url`), then
/// `script_url`, `cloud_file_name`, `file_name`.
fn source_of(
    name: &str,
    dataset_dir: &Path,
    get_str: &dyn Fn(&str) -> Result<Option<String>, DataError>,
) -> Result<DataSource, DataError> {
    let env_on = |k: &str| {
        std::env::var(k).is_ok_and(|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "1" | "true" | "y" | "yes" | "on"
            )
        })
    };
    let hf = get_str("hf_hub_url")?;
    let ms = get_str("ms_hub_url")?;
    let om = get_str("om_hub_url")?;
    let other = |what: &'static str, url: String, fix: &'static str| DataError::OtherSource {
        name: name.to_string(),
        what,
        url,
        fix,
    };
    const HF_ONLY: &str = "termtune downloads datasets from the Hugging Face Hub only: give the entry its `hf_hub_url` (and unset USE_MODELSCOPE_HUB / USE_OPENMIND_HUB), or download the files and register them with `file_name`";
    if let Some(url) = ms.filter(|_| env_on("USE_MODELSCOPE_HUB") || hf.is_none()) {
        return Err(other("ModelScope", url, HF_ONLY));
    }
    if let Some(url) = om.filter(|_| env_on("USE_OPENMIND_HUB") || hf.is_none()) {
        return Err(other("Modelers (openMind)", url, HF_ONLY));
    }
    if let Some(repo) = hf {
        return Ok(DataSource::Hub(HubSource {
            repo,
            subset: get_str("subset")?,
            folder: get_str("folder")?,
        }));
    }
    if let Some(url) = get_str("script_url")? {
        return Err(other(
            "a loading script",
            url,
            "dataset scripts are not run; download the data files and register them with `file_name`",
        ));
    }
    if let Some(url) = get_str("cloud_file_name")? {
        return Err(other(
            "cloud storage",
            url,
            "download the file and register it with `file_name`",
        ));
    }
    match get_str("file_name")? {
        Some(file_name) => Ok(DataSource::Local(dataset_dir.join(file_name))),
        None => Err(DataError::NoFileName {
            name: name.to_string(),
        }),
    }
}

/// A dataset named by its hub id (`dataset_dir: ONLINE`): LLaMA-Factory's defaults (alpaca columns, `train`).
pub fn online(name: &str) -> DatasetAttr {
    DatasetAttr::new(
        name,
        DataSource::Hub(HubSource {
            repo: name.to_string(),
            subset: None,
            folder: None,
        }),
        Formatting::Alpaca,
    )
}

/// Resolves every name of `names` through `dataset_dir/dataset_info.json` (with `dataset_dir: ONLINE`, each
/// name is a Hugging Face Hub dataset id).
pub fn resolve_all(dataset_dir: &Path, names: &[String]) -> Result<Vec<DatasetAttr>, DataError> {
    if dataset_dir == Path::new(ONLINE) {
        return Ok(names.iter().map(|n| online(n.trim())).collect());
    }
    let registry = load_registry(dataset_dir)?;
    let file = registry_path(dataset_dir);
    names
        .iter()
        .map(|n| resolve(&registry, &file, dataset_dir, n.trim()))
        .collect()
}
