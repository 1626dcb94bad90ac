//! `dataset_info.json`: LLaMA-Factory's dataset registry (one entry per dataset name).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::DataError;

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
    /// Absolute or `dataset_dir`-relative path of the file or folder.
    pub path: PathBuf,
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
    fn new(name: &str, path: PathBuf, formatting: Formatting) -> Self {
        let openai = formatting == Formatting::Openai;
        DatasetAttr {
            name: name.to_string(),
            path,
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
        return Err(DataError::UnknownDataset {
            name: name.to_string(),
            path: registry_file.to_path_buf(),
            known: if known.is_empty() {
                "none with `file_name`".into()
            } else {
                known.join(", ")
            },
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
    for hub in [
        "hf_hub_url",
        "ms_hub_url",
        "om_hub_url",
        "script_url",
        "cloud_file_name",
    ] {
        // LLaMA-Factory gives hub entries priority over `file_name`.
        if let Some(url) = get_str(entry, hub)? {
            return Err(DataError::HubDataset {
                name: name.to_string(),
                url,
            });
        }
    }
    let Some(file_name) = get_str(entry, "file_name")? else {
        return Err(DataError::NoFileName {
            name: name.to_string(),
        });
    };
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
    let mut attr = DatasetAttr::new(name, dataset_dir.join(file_name), formatting);
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

/// Resolves every name of `names` through `dataset_dir/dataset_info.json`.
pub fn resolve_all(dataset_dir: &Path, names: &[String]) -> Result<Vec<DatasetAttr>, DataError> {
    let registry = load_registry(dataset_dir)?;
    let file = registry_path(dataset_dir);
    names
        .iter()
        .map(|n| resolve(&registry, &file, dataset_dir, n.trim()))
        .collect()
}
