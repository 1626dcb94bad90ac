//! The preset as a form: every implemented key is a field (text, number, toggle, select or
//! checklist) with its one-line help, its current value and its validation problem.
//!
//! The form keeps the preset file's text and the user's edits as `KEY=VALUE` strings; after every
//! edit the candidate preset is rebuilt with [`config::parse`] (file ← edits), so the form shows
//! exactly the problems `termtune train` would report, and "show as command" is the edits.

use std::path::PathBuf;

use indexmap::IndexMap;
use serde_norway::Value;

use crate::config::{self, Class, ConfigIssue, Group, KEYS, Loaded, Purpose};
use crate::resolve::ModelRef;

/// What kind of input a field takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Text,
    Number,
    Toggle,
    /// One of a fixed list.
    Select(&'static [&'static str]),
    /// Any subset of a fixed list, written comma separated.
    Checklist(&'static [&'static str]),
    /// Dataset names: a checklist over `dataset_dir/dataset_info.json`, or typed.
    Datasets,
}

const STAGES: &[&str] = &["sft", "pt", "rm", "ppo", "dpo", "kto"];
const FINETUNING: &[&str] = &["lora", "freeze", "full", "oft"];
const PREF_LOSSES: &[&str] = &["sigmoid", "hinge", "ipo", "orpo", "simpo"];
const SCHEDULERS: &[&str] = &[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
];
const MIX: &[&str] = &[
    "concat",
    "interleave_under",
    "interleave_over",
    "interleave_once",
];
const INTERVAL: &[&str] = &["no", "steps", "epoch"];
const INFER_DTYPE: &[&str] = &["auto", "float32", "float16", "bfloat16"];
/// `rope_scaling`: none, then the kinds the engine computes.
static ROPE_SCALING: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    std::iter::once("")
        .chain(crate::engine::rope_ext::KINDS.iter().copied())
        .collect()
});
const EXPORT_FORMAT: &[&str] = &["safetensors", "gguf"];
const GGUF_TYPE: &[&str] = &["f32", "f16", "q8_0", "q4_k_m", "q4_0", "q4_1"];
/// Chat templates: the tokenizer's own (empty), then the data pipeline's built-ins (one list, so the
/// form can never offer a template the encoder does not know).
static TEMPLATES: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    std::iter::once("")
        .chain(crate::data::template::BUILTIN_NAMES.iter().copied())
        .collect()
});
/// LoRA target modules: `all` (every linear layer), then the engine's linear layers (one list, so
/// the form offers exactly what the model can adapt).
static LORA_TARGETS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    std::iter::once("all")
        .chain(crate::engine::model::LINEAR_LEAVES)
        .collect()
});

/// The input kind of `key`, from its name (selects) or its default value's type.
pub fn kind_of(key: &str, default: &Value) -> FieldKind {
    match key {
        "stage" => FieldKind::Select(STAGES),
        "finetuning_type" => FieldKind::Select(FINETUNING),
        "pref_loss" => FieldKind::Select(PREF_LOSSES),
        "lr_scheduler_type" => FieldKind::Select(SCHEDULERS),
        "mix_strategy" => FieldKind::Select(MIX),
        "save_strategy" | "eval_strategy" => FieldKind::Select(INTERVAL),
        "infer_dtype" => FieldKind::Select(INFER_DTYPE),
        "rope_scaling" => FieldKind::Select(ROPE_SCALING.as_slice()),
        "export_format" => FieldKind::Select(EXPORT_FORMAT),
        "export_gguf_type" => FieldKind::Select(GGUF_TYPE),
        "template" => FieldKind::Select(TEMPLATES.as_slice()),
        "lora_target" => FieldKind::Checklist(LORA_TARGETS.as_slice()),
        "dataset" | "eval_dataset" => FieldKind::Datasets,
        _ => match default {
            Value::Bool(_) => FieldKind::Toggle,
            Value::Number(_) => FieldKind::Number,
            _ => FieldKind::Text,
        },
    }
}

/// One field as the UI shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub key: &'static str,
    pub help: &'static str,
    pub kind: FieldKind,
    /// The value as text (edit, else file, else default); empty means unset.
    pub value: String,
    /// Edited in the form and not saved yet.
    pub edited: bool,
    /// Not in the file and not edited: the default applies.
    pub is_default: bool,
    pub issue: Option<String>,
}

/// The keys of one group that the form shows (implemented keys only).
pub fn keys_of(groups: &[Group]) -> Vec<&'static str> {
    KEYS.iter()
        .filter(|k| k.class == Class::Implemented && groups.contains(&k.group))
        .map(|k| k.name)
        .collect()
}

/// The preset being edited.
#[derive(Debug, Clone)]
pub struct Form {
    /// The preset file (None for a new, never-saved preset).
    pub path: Option<PathBuf>,
    base_text: String,
    file_values: IndexMap<String, String>,
    defaults: IndexMap<String, Value>,
    /// Edited keys and their text, in edit order.
    pub edits: IndexMap<String, String>,
    /// The candidate preset when it has no problems.
    pub loaded: Option<Loaded>,
    /// Every problem of the candidate preset, in the order `config::parse` reports them.
    pub issues: Vec<ConfigIssue>,
    /// The problems of the candidate preset for an export (kept with `issues`, so the Export pane
    /// does not parse the preset on every frame).
    pub export_issues: Vec<ConfigIssue>,
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => config::format_float(f),
            _ => n.to_string(),
        },
        other => serde_norway::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default(),
    }
}

impl Form {
    /// A form over preset text (the file's content) at `path`.
    pub fn new(path: Option<PathBuf>, text: &str) -> Self {
        let defaults = match serde_norway::to_value(config::Preset::default()) {
            Ok(Value::Mapping(m)) => m
                .into_iter()
                .filter_map(|(k, v)| match k {
                    Value::String(k) => Some((k, v)),
                    _ => None,
                })
                .collect(),
            _ => IndexMap::new(),
        };
        let file_values = match serde_norway::from_str::<Value>(text) {
            Ok(Value::Mapping(m)) => m
                .into_iter()
                .filter_map(|(k, v)| match k {
                    Value::String(k) => Some((k, value_text(&v))),
                    _ => None,
                })
                .collect(),
            _ => IndexMap::new(),
        };
        let mut form = Self {
            path,
            base_text: text.to_string(),
            file_values,
            defaults,
            edits: IndexMap::new(),
            loaded: None,
            issues: Vec::new(),
            export_issues: Vec::new(),
        };
        form.revalidate();
        form
    }

    /// The file name shown in the status bar.
    pub fn name(&self) -> String {
        self.path
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or_else(|| "new preset".into(), |n| n.to_string_lossy().into_owned())
    }

    pub fn is_dirty(&self) -> bool {
        !self.edits.is_empty()
    }

    fn default_value(&self, key: &str) -> Value {
        self.defaults.get(key).cloned().unwrap_or(Value::Null)
    }

    /// The saved value of `key` (file, else default) as text.
    pub fn saved_value(&self, key: &str) -> String {
        self.file_values
            .get(key)
            .cloned()
            .unwrap_or_else(|| value_text(&self.default_value(key)))
    }

    /// The current value of `key` as text.
    pub fn value(&self, key: &str) -> String {
        self.edits
            .get(key)
            .cloned()
            .unwrap_or_else(|| self.saved_value(key))
    }

    /// The model the form names, with the keys that say how to reach the hub for it (read from
    /// the fields, so it is there while other fields still have problems).
    pub fn model_ref(&self) -> ModelRef {
        let set = |key: &str| Some(self.value(key)).filter(|v| !v.is_empty());
        ModelRef {
            name_or_path: self.value("model_name_or_path"),
            revision: set("model_revision")
                .unwrap_or_else(|| config::Preset::default().model_revision),
            cache_dir: set("cache_dir"),
            hf_hub_token: set("hf_hub_token"),
            gguf: crate::engine::source::GgufWeights::of(
                self.value("gguf_dequantize") == "true" || set("quantization_bit").is_some(),
            ),
        }
    }

    pub fn kind(&self, key: &str) -> FieldKind {
        kind_of(key, &self.default_value(key))
    }

    /// The first problem about `key`.
    pub fn issue(&self, key: &str) -> Option<&ConfigIssue> {
        self.issues.iter().find(|i| i.key == key)
    }

    /// `key` as a field.
    pub fn field(&self, key: &'static str) -> Field {
        Field {
            key,
            help: config::keys::find(key).map_or("", |k| k.help),
            kind: self.kind(key),
            value: self.value(key),
            edited: self.edits.contains_key(key),
            is_default: !self.edits.contains_key(key) && !self.file_values.contains_key(key),
            issue: self.issue(key).map(|i| i.message.clone()),
        }
    }

    /// Sets `key` to `text` (an edit; setting the saved value again drops the edit).
    pub fn set(&mut self, key: &str, text: &str) {
        if text == self.saved_value(key) {
            self.edits.shift_remove(key);
        } else {
            self.edits.insert(key.to_string(), text.to_string());
        }
        self.revalidate();
    }

    /// Drops the edit of `key`.
    pub fn reset(&mut self, key: &str) {
        self.edits.shift_remove(key);
        self.revalidate();
    }

    /// The edits as LLaMA-Factory `KEY=VALUE` overrides (text fields quoted so they stay text).
    pub fn overrides(&self) -> Vec<String> {
        self.edits
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    return format!("{k}=");
                }
                match self.kind(k) {
                    FieldKind::Text
                    | FieldKind::Select(_)
                    | FieldKind::Checklist(_)
                    | FieldKind::Datasets => {
                        // Plain when YAML reads it back as this very string; quoted otherwise
                        // (`true`, `1e-3`, `a: b` would change type or fail).
                        match serde_norway::from_str::<Value>(v) {
                            Ok(Value::String(s)) if s == *v => format!("{k}={v}"),
                            _ => format!("{k}={}", serde_json::Value::String(v.clone())),
                        }
                    }
                    FieldKind::Number | FieldKind::Toggle => format!("{k}={v}"),
                }
            })
            .collect()
    }

    /// Rebuilds the candidate preset from the file text and the edits.
    pub fn revalidate(&mut self) {
        match config::parse(&self.base_text, &self.overrides(), Purpose::Train) {
            Ok(loaded) => {
                self.loaded = Some(loaded);
                self.issues.clear();
            }
            Err(issues) => {
                self.loaded = None;
                self.issues = issues;
            }
        }
        self.export_issues = self.check(Purpose::Export).err().unwrap_or_default();
    }

    /// The candidate preset validated for another `purpose` than training (an export needs
    /// `export_dir` but no dataset): the same file text and edits, the same rules as the CLI.
    pub fn check(&self, purpose: Purpose) -> Result<Loaded, Vec<ConfigIssue>> {
        config::parse(&self.base_text, &self.overrides(), purpose)
    }

    /// The lines "show as command" prints on the Export tab: `termtune export …` (with
    /// `--adapter-only` when `adapter_only`) and `llamafactory-cli export …`.
    pub fn export_commands(&self, adapter_only: bool) -> Vec<String> {
        let (path, tail) = self.command_parts();
        let flag = if adapter_only { " --adapter-only" } else { "" };
        vec![
            format!("termtune export {path}{flag}{tail}"),
            format!("llamafactory-cli export {path}{tail}"),
        ]
    }

    /// The preset path as a command names it and the edits as shell-quoted arguments.
    fn command_parts(&self) -> (String, String) {
        let path = self
            .path
            .as_ref()
            .map_or_else(|| "PRESET.yaml".into(), |p| p.display().to_string());
        let args: Vec<String> = self.overrides().iter().map(|o| shell_quote(o)).collect();
        let tail = if args.is_empty() {
            String::new()
        } else {
            format!(" {}", args.join(" "))
        };
        (path, tail)
    }

    /// The lines "show as command" prints: `termtune train …` and `llamafactory-cli train …`. The latter adds
    /// `do_train=true` (and `do_eval=true` when there is a validation split) unless the file says so already:
    /// LLaMA-Factory trains (and evaluates) only then.
    pub fn commands(&self) -> Vec<String> {
        let (path, tail) = self.command_parts();
        vec![
            format!("termtune train {path}{tail}"),
            format!(
                "llamafactory-cli train {path}{tail}{}",
                self.lf_train_flags()
            ),
        ]
    }

    /// ` do_train=true` / ` do_eval=true` for `llamafactory-cli train` where the preset does not say them.
    fn lf_train_flags(&self) -> String {
        let says_true = |key: &str| match &self.loaded {
            Some(l) => l.passthrough.get(key) == Some(&Value::Bool(true)),
            None => {
                serde_norway::from_str::<Value>(&self.base_text)
                    .ok()
                    .and_then(|v| v.get(key).cloned())
                    == Some(Value::Bool(true))
            }
        };
        let mut flags = String::new();
        if !says_true("do_train") {
            flags.push_str(" do_train=true");
        }
        let evaluates = self
            .loaded
            .as_ref()
            .is_some_and(|l| l.preset.has_validation_split());
        if evaluates && !says_true("do_eval") {
            flags.push_str(" do_eval=true");
        }
        flags
    }
}

/// Quotes a shell word when it needs it.
fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "=_-./,:+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The next option of a select after `current` (wrapping), backwards when `back`.
pub fn cycle(options: &[&str], current: &str, back: bool) -> String {
    let n = options.len();
    if n == 0 {
        return current.to_string();
    }
    let i = options.iter().position(|o| *o == current);
    let next = match (i, back) {
        (Some(i), false) => (i + 1) % n,
        (Some(i), true) => (i + n - 1) % n,
        (None, false) => 0,
        (None, true) => n - 1,
    };
    options[next].to_string()
}

/// Toggles `item` in a comma-separated list of names.
pub fn toggle_name(list: &str, item: &str) -> String {
    let mut items: Vec<String> = config::comma_list(list);
    if let Some(i) = items.iter().position(|x| x == item) {
        items.remove(i);
    } else {
        items.push(item.to_string());
    }
    items.join(",")
}

/// Toggles `item` in a comma-separated list (`all` is exclusive of the named modules).
pub fn toggle_item(list: &str, item: &str) -> String {
    let mut items: Vec<String> = config::comma_list(list);
    if let Some(i) = items.iter().position(|x| x == item) {
        items.remove(i);
    } else if item == "all" {
        items = vec!["all".into()];
    } else {
        items.retain(|x| x != "all");
        items.push(item.to_string());
    }
    items.join(",")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn edits_become_overrides_and_problems_name_the_key() {
        let mut f = Form::new(None, "model_name_or_path: m\ndataset: d\nlora_rank: 8\n");
        assert!(f.issues.is_empty(), "{:?}", f.issues);
        f.set("lora_rank", "0");
        assert_eq!(f.overrides(), vec!["lora_rank=0"]);
        assert!(f.issue("lora_rank").is_some(), "{:?}", f.issues);
        assert!(f.loaded.is_none());
        f.set("lora_rank", "8");
        assert!(!f.is_dirty());
        assert!(f.loaded.is_some());
    }

    #[test]
    fn text_edits_stay_text() {
        let mut f = Form::new(None, "model_name_or_path: m\ndataset: d\n");
        f.set("model_name_or_path", "org/name");
        assert_eq!(f.overrides(), vec!["model_name_or_path=org/name"]);
        f.set("model_name_or_path", "true");
        assert_eq!(f.overrides(), vec![r#"model_name_or_path="true""#]);
        assert_eq!(f.loaded.as_ref().unwrap().preset.model_name_or_path, "true");
    }

    #[test]
    fn checklist_all_is_exclusive() {
        assert_eq!(toggle_item("all", "q_proj"), "q_proj");
        assert_eq!(toggle_item("q_proj", "v_proj"), "q_proj,v_proj");
        assert_eq!(toggle_item("q_proj,v_proj", "all"), "all");
        assert_eq!(toggle_item("q_proj,v_proj", "q_proj"), "v_proj");
    }

    #[test]
    fn commands_carry_the_edits() {
        let mut f = Form::new(
            Some(PathBuf::from("presets/quickstart.yaml")),
            "model_name_or_path: m\ndataset: d\n",
        );
        f.set("learning_rate", "1e-3");
        assert_eq!(
            f.commands()[0],
            "termtune train presets/quickstart.yaml learning_rate=1e-3"
        );
        assert_eq!(
            f.commands()[1],
            "llamafactory-cli train presets/quickstart.yaml learning_rate=1e-3 do_train=true"
        );
    }

    #[test]
    fn the_llamafactory_command_trains_and_evaluates_like_termtune() {
        let path = Some(PathBuf::from("p.yaml"));
        // The file says do_train: nothing to add.
        let f = Form::new(
            path.clone(),
            "model_name_or_path: m\ndataset: d\ndo_train: true\n",
        );
        assert_eq!(f.commands()[1], "llamafactory-cli train p.yaml");
        // A validation split: termtune evaluates, so LLaMA-Factory is told to as well.
        let f = Form::new(
            path.clone(),
            "model_name_or_path: m\ndataset: d\nval_size: 0.1\n",
        );
        assert_eq!(
            f.commands()[1],
            "llamafactory-cli train p.yaml do_train=true do_eval=true"
        );
        let f = Form::new(
            path,
            "model_name_or_path: m\ndataset: d\ndo_train: true\ndo_eval: true\nval_size: 0.1\n",
        );
        assert_eq!(f.commands()[1], "llamafactory-cli train p.yaml");
    }

    #[test]
    fn do_train_false_is_a_problem_of_the_form() {
        let f = Form::new(None, "model_name_or_path: m\ndataset: d\ndo_train: false\n");
        let issue = f.issue("do_train").expect("an issue for do_train");
        assert!(issue.message.contains("do_train: true"), "{issue:?}");
    }
}
