//! Presets: LLaMA-Factory's flat YAML, read with every problem reported at once.
//!
//! Layers: defaults ← preset file ← `KEY=VALUE` overrides. [`load`] parses, classifies every key
//! ([`keys`]), type-checks each implemented key on its own (so one bad value does not hide the
//! next), then runs the cross-field rules of [`validate`]. [`save`] writes the grouped form
//! (`### model`, `### method`, …) that `llamafactory-cli train` reads.

pub mod keys;
pub mod preset;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_norway::{Mapping, Value};

pub use keys::{Class, Group, KEYS, KeySpec};
pub use preset::{
    ExportFormat, FinetuningType, GgufType, InferDtype, IntervalStrategy, MixStrategy, PrefLoss,
    Preset, QuantizationMethod, QuantizationType, RopeScalingArg, SchedulerArg, SchedulerType,
    Stage, comma_list,
};
pub use validate::{FREEZE_EXTRA_MODULES, FREEZE_LAYER_MODULES, Purpose, validate};

/// Where a value came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line and column (1-based) of the preset file.
    File { line: usize, column: usize },
    /// A `KEY=VALUE` override on the command line.
    Override,
    /// Nowhere: a default, or a rule about the whole preset.
    Preset,
}

/// One problem with a preset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key the problem is about (empty for the file as a whole).
    pub key: String,
    pub message: String,
    pub origin: Origin,
}

/// A key that is accepted but changes nothing in termtune.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigNote {
    pub key: String,
    pub reason: &'static str,
}

/// A parsed preset and everything noticed while reading it.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub preset: Preset,
    /// Keys that are kept for the round trip but have no effect here, in file order, with values.
    pub passthrough: IndexMap<String, Value>,
    /// No-effect keys found (a subset of `passthrough`).
    pub notes: Vec<ConfigNote>,
}

/// All the problems of a preset, with the file they are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub path: Option<PathBuf>,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .path
            .as_ref()
            .map_or_else(|| "<preset>".to_string(), |p| p.display().to_string());
        let n = self.issues.len();
        writeln!(f, "{name}: {n} problem{}", if n == 1 { "" } else { "s" })?;
        for issue in &self.issues {
            match issue.origin {
                Origin::File { line, column } => write!(f, "  {name}:{line}:{column}: ")?,
                Origin::Override => write!(f, "  command line: ")?,
                Origin::Preset => write!(f, "  ")?,
            }
            writeln!(f, "{}", issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads a preset file, applies `KEY=VALUE` overrides and validates it for `purpose`.
pub fn load(path: &Path, overrides: &[String], purpose: Purpose) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        path: Some(path.to_path_buf()),
        issues: vec![ConfigIssue {
            key: String::new(),
            message: format!(
                "cannot read the preset: {e}; check the path (presets live in presets/)"
            ),
            origin: Origin::Preset,
        }],
    })?;
    parse(&text, overrides, purpose).map_err(|issues| ConfigErrors {
        path: Some(path.to_path_buf()),
        issues,
    })
}

/// `presets/*.yaml` of the working folder and of termtune's user presets folder.
pub fn list_presets() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [PathBuf::from("presets"), user_presets_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            found.sort();
            out.extend(found);
        }
    }
    out
}

/// `~/.config/termtune/presets` (or `$XDG_CONFIG_HOME/termtune/presets`).
pub fn user_presets_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map_or_else(|| crate::fsutil::home_dir().join(".config"), PathBuf::from)
        .join("termtune")
        .join("presets")
}

/// Parses preset text (see [`load`]).
pub fn parse(
    text: &str,
    overrides: &[String],
    purpose: Purpose,
) -> Result<Loaded, Vec<ConfigIssue>> {
    let mut issues = Vec::new();
    let mut entries: Vec<(String, Value, Origin)> = Vec::new();

    let root: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let origin = e.location().map_or(Origin::Preset, |l| Origin::File {
                line: l.line(),
                column: l.column(),
            });
            let detail = strip_location(&e.to_string());
            let hint = if detail.contains("duplicate entry") {
                "each key may appear once; delete the repeated line"
            } else {
                "a preset is flat `key: value` lines, one per line, not indented"
            };
            return Err(vec![ConfigIssue {
                key: String::new(),
                message: format!("not valid YAML: {detail}; {hint}"),
                origin,
            }]);
        }
    };
    match root {
        Value::Null => {}
        Value::Mapping(map) => {
            for (k, v) in map {
                match k {
                    Value::String(key) => {
                        let origin = locate(text, &key);
                        entries.push((key, v, origin));
                    }
                    other => issues.push(ConfigIssue {
                        key: String::new(),
                        message: format!(
                            "keys must be names like `learning_rate`, found {}",
                            describe(&other)
                        ),
                        origin: Origin::Preset,
                    }),
                }
            }
        }
        other => {
            return Err(vec![ConfigIssue {
                key: String::new(),
                message: format!(
                    "a preset is a mapping of `key: value` lines, found {}",
                    describe(&other)
                ),
                origin: Origin::File { line: 1, column: 1 },
            }]);
        }
    }

    for item in overrides {
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                let value = if v.trim().is_empty() {
                    Value::Null
                } else {
                    serde_norway::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()))
                };
                let key = k.trim().to_string();
                entries.retain(|(existing, _, _)| *existing != key);
                entries.push((key, value, Origin::Override));
            }
            _ => issues.push(ConfigIssue {
                key: String::new(),
                message: format!("override `{item}` is not KEY=VALUE (e.g. learning_rate=2e-4)"),
                origin: Origin::Override,
            }),
        }
    }

    let mut good = Mapping::new();
    let mut passthrough = IndexMap::new();
    let mut notes = Vec::new();
    let mut origins: IndexMap<String, Origin> = IndexMap::new();
    for (key, value, origin) in entries {
        origins.insert(key.clone(), origin.clone());
        let Some(spec) = keys::find(&key) else {
            let hint = keys::suggest(&key)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_else(|| "; see README.md for the keys termtune knows".into());
            issues.push(ConfigIssue {
                message: format!("unknown key `{key}`{hint}"),
                key,
                origin,
            });
            continue;
        };
        match spec.class {
            Class::Implemented => match check_one(&key, value) {
                Ok(v) => {
                    good.insert(Value::String(key), v);
                }
                Err(message) => issues.push(ConfigIssue {
                    key,
                    message,
                    origin,
                }),
            },
            Class::NoEffect => {
                if !keys::WRITTEN_BY_TERMTUNE.contains(&key.as_str()) {
                    notes.push(ConfigNote {
                        key: key.clone(),
                        reason: spec.help,
                    });
                }
                passthrough.insert(key, value);
            }
            Class::Unsupported { neutral } => {
                if is_neutral(&value, neutral) {
                    passthrough.insert(key, value);
                } else {
                    issues.push(ConfigIssue {
                        message: format!(
                            "`{key}: {}` is not supported yet: {}; remove the key (or set it to {neutral})",
                            inline(&value),
                            spec.help
                        ),
                        key,
                        origin,
                    });
                }
            }
        }
    }

    if let Some(value) = passthrough.get("do_train") {
        let origin = origins.get("do_train").cloned().unwrap_or(Origin::Preset);
        if let Some(message) = do_train_issue(value, purpose) {
            issues.push(ConfigIssue {
                key: "do_train".into(),
                message,
                origin,
            });
        }
    }

    let preset: Preset = match serde_norway::from_value(Value::Mapping(good)) {
        Ok(p) => p,
        Err(e) => {
            issues.push(ConfigIssue {
                key: String::new(),
                message: format!("cannot read the preset: {e}"),
                origin: Origin::Preset,
            });
            return Err(issues);
        }
    };

    for mut issue in validate(&preset, purpose) {
        if let Some(origin) = origins.get(&issue.key) {
            issue.origin = origin.clone();
        }
        issues.push(issue);
    }
    // Report in file order: problems with a line first, by line, then the rest.
    issues.sort_by_key(|i| match i.origin {
        Origin::File { line, column } => (0, line, column),
        Origin::Override => (1, 0, 0),
        Origin::Preset => (2, 0, 0),
    });

    if issues.is_empty() {
        Ok(Loaded {
            preset,
            passthrough,
            notes,
        })
    } else {
        Err(issues)
    }
}

/// The problem with a `do_train` value, if any. LLaMA-Factory trains only with `do_train: true`; termtune trains
/// a preset without the key (the presets it writes carry `do_train: true`), but does not train one whose
/// `do_train` says LLaMA-Factory would not.
fn do_train_issue(value: &Value, purpose: Purpose) -> Option<String> {
    match value {
        Value::Bool(true) => None,
        Value::Bool(false) | Value::Null if purpose == Purpose::Train => Some(format!(
            "`do_train: {}` means no training: LLaMA-Factory would not train this preset; set `do_train: true` (or remove the key) to train, or run `termtune predict` for a predict-only preset",
            inline(value)
        )),
        Value::Bool(false) | Value::Null => None,
        other => Some(format!(
            "`do_train` must be true or false (got {})",
            inline(other)
        )),
    }
}

/// Type-checks one implemented key by deserializing a preset that holds only it.
/// Numbers written as strings (`"1e-4"`, or `1e-4` read as a string by some YAML dialects) are
/// accepted as numbers, as LLaMA-Factory's OmegaConf does.
fn check_one(key: &str, value: Value) -> Result<Value, String> {
    let attempt = |v: &Value| {
        let mut m = Mapping::new();
        m.insert(Value::String(key.to_string()), v.clone());
        serde_norway::from_value::<Preset>(Value::Mapping(m))
    };
    match attempt(&value) {
        Ok(_) => Ok(value),
        Err(first) => {
            if let Value::String(s) = &value {
                let t = s.trim();
                let as_number = t
                    .parse::<i64>()
                    .map(Value::from)
                    .or_else(|_| t.parse::<f64>().map(Value::from));
                if let Ok(num) = as_number
                    && attempt(&num).is_ok()
                {
                    return Ok(num);
                }
            }
            let message = friendly_serde_error(&first.to_string());
            if message.contains(&inline(&value)) {
                Err(format!("`{key}`: {message}"))
            } else {
                Err(format!("`{key}`: {message} (got {})", inline(&value)))
            }
        }
    }
}

fn friendly_serde_error(msg: &str) -> String {
    let msg = strip_location(msg);
    let msg = msg
        .replace("expected u32", "expected a whole number ≥ 0")
        .replace("expected u64", "expected a whole number ≥ 0")
        .replace("expected usize", "expected a whole number ≥ 0")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace("expected a boolean", "expected true or false");
    msg.replace("invalid type: ", "wrong type: ")
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn is_neutral(value: &Value, neutral: &str) -> bool {
    if value.is_null() {
        return true;
    }
    let neutral: Value = serde_norway::from_str(neutral).unwrap_or(Value::Null);
    if *value == neutral {
        return true;
    }
    match (value.as_f64(), neutral.as_f64()) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-12,
        _ => false,
    }
}

/// A value on one line, for messages.
fn inline(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => serde_norway::to_string(other)
            .map(|s| s.trim().replace('\n', " "))
            .unwrap_or_else(|_| "?".into()),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(s) => format!("the text {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a nested mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

/// Line and column of a top-level `key:` in the file text (presets are flat).
fn locate(text: &str, key: &str) -> Origin {
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let unquoted = trimmed
            .strip_prefix('"')
            .and_then(|r| r.strip_prefix(key))
            .and_then(|r| r.strip_prefix('"'))
            .or_else(|| trimmed.strip_prefix(key));
        if let Some(rest) = unquoted
            && rest.trim_start().starts_with(':')
            && line.len() == trimmed.len()
        {
            let colon = line.find(':').unwrap_or(0);
            let after = &line[colon + 1..];
            let column = colon + 2 + (after.len() - after.trim_start().len());
            return Origin::File {
                line: i + 1,
                column,
            };
        }
    }
    Origin::Preset
}

/// Keys always written by [`save`], even at their default, because a reader of the file needs them.
const ALWAYS_WRITTEN: &[&str] = &[
    "model_name_or_path",
    "stage",
    "finetuning_type",
    "dataset",
    "template",
    "cutoff_len",
    "output_dir",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "num_train_epochs",
    "lr_scheduler_type",
];

/// Renders a preset as LLaMA-Factory-style grouped YAML: keys that differ from the defaults (plus a
/// few always shown), then the pass-through keys, under `### group` headers. It always says
/// `do_train: true`, and `do_eval: true` when there is a validation split, so that `llamafactory-cli train`
/// trains (and evaluates) as termtune does.
pub fn to_yaml(loaded: &Loaded) -> String {
    let current = as_mapping(&loaded.preset);
    let defaults = as_mapping(&Preset::default());
    let mut out = String::new();
    for group in Group::ALL {
        let mut lines = Vec::new();
        for spec in KEYS.iter().filter(|k| k.group == group) {
            let key = Value::String(spec.name.to_string());
            let value = match spec.class {
                Class::Implemented => {
                    let Some(v) = current.get(&key) else { continue };
                    let differs = defaults.get(&key) != Some(v);
                    let lora_only = spec.name.starts_with("lora_")
                        || matches!(spec.name, "use_rslora" | "use_dora");
                    let show_default = ALWAYS_WRITTEN.contains(&spec.name)
                        || (lora_only
                            && loaded.preset.finetuning_type == FinetuningType::Lora
                            && spec.name != "lora_alpha");
                    if v.is_null() || !(differs || show_default) {
                        continue;
                    }
                    v.clone()
                }
                _ => match (spec.name, loaded.passthrough.get(spec.name)) {
                    // LLaMA-Factory trains only with `do_train: true` (a `false` is kept: such a preset
                    // cannot be trained by either program).
                    ("do_train", Some(Value::Bool(false))) => Value::Bool(false),
                    ("do_train", _) => Value::Bool(true),
                    // … and evaluates after training only with `do_eval: true`, which termtune always
                    // does when there is a validation split.
                    ("do_eval", _) if loaded.preset.has_validation_split() => Value::Bool(true),
                    (_, Some(v)) => v.clone(),
                    (_, None) => continue,
                },
            };
            lines.push(format!("{}: {}", spec.name, scalar_yaml(&value)));
        }
        if !lines.is_empty() {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str("### ");
            out.push_str(group.header());
            out.push('\n');
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
    }
    out
}

/// Writes [`to_yaml`] to `path` (through a temporary file and a rename, so a crash never leaves
/// half a preset), with an optional leading comment.
pub fn save(loaded: &Loaded, path: &Path, header_comment: Option<&str>) -> std::io::Result<()> {
    let mut text = String::new();
    if let Some(c) = header_comment {
        for line in c.lines() {
            text.push_str("# ");
            text.push_str(line);
            text.push('\n');
        }
    }
    text.push_str(&to_yaml(loaded));
    crate::fsutil::write_atomic(path, text.as_bytes())
}

fn as_mapping(preset: &Preset) -> Mapping {
    match serde_norway::to_value(preset) {
        Ok(Value::Mapping(m)) => m,
        _ => Mapping::new(),
    }
}

/// One value in flow style, on one line (`{num_cycles: 2.0}`, `"a: b"`, `1.0e-4`).
fn scalar_yaml(value: &Value) -> String {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            format_float(f)
        }
        Value::Mapping(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", scalar_yaml(k), scalar_yaml(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Sequence(s) => {
            let items: Vec<String> = s.iter().map(scalar_yaml).collect();
            format!("[{}]", items.join(", "))
        }
        other => serde_norway::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default(),
    }
}

/// Floats as LLaMA-Factory's examples write them: `1.0e-4`, `3.0`, `0.1`.
pub fn format_float(f: f64) -> String {
    if f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e7) {
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = if mantissa.contains('.') {
            mantissa.to_string()
        } else {
            format!("{mantissa}.0")
        };
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{}", exp.abs())
    } else if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// One line of the resolved configuration (`termtune check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEntry {
    pub group: Group,
    pub key: &'static str,
    /// The value as YAML (`null` when unset).
    pub value: String,
    /// How an unset value is resolved (`2 x lora_rank`, `from stage`, …).
    pub note: Option<String>,
    /// The value was not set in the file (or equals the default).
    pub is_default: bool,
}

/// Every implemented key with its value, resolved (defaults filled in, `lora_alpha` computed, …),
/// for `termtune check`.
pub fn resolved_entries(preset: &Preset) -> Vec<ResolvedEntry> {
    let current = as_mapping(preset);
    let defaults = as_mapping(&Preset::default());
    let mut rows = Vec::new();
    for spec in KEYS.iter().filter(|k| k.class == Class::Implemented) {
        let key = Value::String(spec.name.to_string());
        let Some(v) = current.get(&key) else { continue };
        let is_default = defaults.get(&key) == Some(v);
        let (value, note) = match spec.name {
            "lora_alpha" if preset.lora_alpha.is_none() => (
                preset.lora_alpha_resolved().to_string(),
                Some("2 x lora_rank".to_string()),
            ),
            "packing" if preset.packing.is_none() => (
                preset.packing_resolved().to_string(),
                Some(
                    if preset.neat_packing {
                        "neat_packing"
                    } else {
                        "from stage"
                    }
                    .to_string(),
                ),
            ),
            "eval_steps" if preset.eval_steps.is_none() => (
                preset.eval_steps_resolved().to_string(),
                Some("logging_steps".to_string()),
            ),
            "data_seed" if preset.data_seed.is_none() => {
                (preset.seed.to_string(), Some("seed".to_string()))
            }
            "template" if preset.template.is_none() => (
                "null".to_string(),
                Some("the tokenizer's own chat_template".to_string()),
            ),
            _ if v.is_null() => ("null".to_string(), None),
            _ => (scalar_yaml(v), None),
        };
        rows.push(ResolvedEntry {
            group: spec.group,
            key: spec.name,
            value,
            note,
            is_default,
        });
    }
    rows
}

/// The README's key table (key, default, meaning) for every implemented key, grouped; a test keeps
/// README.md equal to it.
pub fn keys_markdown_table() -> String {
    let defaults = resolved_entries(&Preset::default());
    let mut out = String::from("| key | default | meaning |\n|---|---|---|\n");
    for group in Group::ALL {
        for row in defaults.iter().filter(|r| r.group == group) {
            let help = keys::find(row.key).map_or("", |k| k.help);
            let default = match (&row.note, row.value.as_str()) {
                (Some(note), _) if row.key != "template" => note.clone(),
                (_, "null") | (Some(_), _) => "unset".to_string(),
                (_, "\"\"") | (_, "''") => "(required)".to_string(),
                (_, v) => format!("`{v}`"),
            };
            out.push_str(&format!("| `{}` | {default} | {help} |\n", row.key));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_field_is_an_implemented_key_and_back() {
        let fields = as_mapping(&Preset::default());
        for (k, _) in &fields {
            let name = k.as_str().unwrap_or_default();
            let spec = keys::find(name).unwrap_or_else(|| panic!("field {name} has no key spec"));
            assert_eq!(spec.class, Class::Implemented, "{name}");
        }
        for spec in KEYS.iter().filter(|k| k.class == Class::Implemented) {
            assert!(
                fields.contains_key(Value::String(spec.name.into())),
                "implemented key {} is not a preset field",
                spec.name
            );
        }
    }

    #[test]
    fn locates_keys() {
        let text = "# c\nmodel_name_or_path: x\n  nested: 1\nlora_rank:   8\n";
        assert_eq!(
            locate(text, "lora_rank"),
            Origin::File {
                line: 4,
                column: 14
            }
        );
        assert_eq!(locate(text, "nested"), Origin::Preset);
    }

    #[test]
    fn floats_are_written_like_llamafactory() {
        assert_eq!(format_float(1e-4), "1.0e-4");
        assert_eq!(format_float(2.5e-5), "2.5e-5");
        assert_eq!(format_float(3.0), "3.0");
        assert_eq!(format_float(0.1), "0.1");
        assert_eq!(format_float(1e-8), "1.0e-8");
    }
}
