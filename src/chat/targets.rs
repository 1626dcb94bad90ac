//! What there is to chat with in a run folder, and the facts the chat header shows about an
//! adapter, read from its files only (no model is loaded).
//!
//! A run folder (`output_dir`) holds the final adapter in the folder itself and complete
//! checkpoints as `checkpoint-N/`. The trainer writes a checkpoint into `.checkpoint-N.tmp/` and
//! renames it when complete, so listing `checkpoint-N/` folders that hold `trainer_state.json`
//! never offers a half-written one (the chat reads files only; it never touches the trainer's
//! tensors).

use std::path::{Path, PathBuf};

use crate::engine::adapter::{AdapterConfig, CONFIG_FILE, WEIGHTS_FILE};
use crate::trainer::checkpoint::list_checkpoints;

/// What a chat slot runs: the preset's base model alone, with one adapter merged in, or a model folder a freeze or
/// full fine-tuning run wrote (in place of the base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTarget {
    Base,
    Adapter(PathBuf),
    Model(PathBuf),
}

/// Whether `dir` is a saved model (config.json and safetensors weights, no adapter_config.json): a freeze or full
/// fine-tuning run folder or checkpoint.
pub fn is_model_folder(dir: &Path) -> bool {
    !dir.join(CONFIG_FILE).is_file()
        && dir.join("config.json").is_file()
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file())
}

/// A typed folder as a target: a model folder is chatted with in place of the base, anything else as an adapter
/// (whose problems [`describe_adapter`] names).
pub fn folder_target(dir: PathBuf) -> ChatTarget {
    if is_model_folder(&dir) {
        ChatTarget::Model(dir)
    } else {
        ChatTarget::Adapter(dir)
    }
}

/// One entry of the target picker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetEntry {
    /// What the picker shows ("final adapter (step 40)", "checkpoint-20").
    pub label: String,
    pub target: ChatTarget,
}

/// The header facts of an adapter folder.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub path: PathBuf,
    pub r: usize,
    pub alpha: f64,
    /// `target_modules`, comma separated (or the regex PEFT allows).
    pub targets: String,
    /// Optimizer step: `global_step` of `trainer_state.json`, else the `checkpoint-N` name.
    pub step: Option<u64>,
}

/// Why an adapter folder cannot be chatted with.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "{0}: no such folder; give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
    )]
    Missing(PathBuf),
    #[error(
        "{0}: no {CONFIG_FILE}; is this a PEFT LoRA adapter folder (a run's output_dir or checkpoint-N)?"
    )]
    NoConfig(PathBuf),
    #[error("{0}: no {WEIGHTS_FILE}; the adapter is incomplete (still being written?)")]
    NoWeights(PathBuf),
    #[error("{path}: cannot read {CONFIG_FILE}: {why}")]
    BadConfig { path: PathBuf, why: String },
}

/// Reads `adapter_config.json` (and `trainer_state.json` when present) of `dir`.
pub fn describe_adapter(dir: &Path) -> Result<AdapterInfo, TargetError> {
    if !dir.is_dir() {
        return Err(TargetError::Missing(dir.to_path_buf()));
    }
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(TargetError::NoConfig(dir.to_path_buf()));
    }
    if !dir.join(WEIGHTS_FILE).is_file() {
        return Err(TargetError::NoWeights(dir.to_path_buf()));
    }
    let bad = |why: String| TargetError::BadConfig {
        path: dir.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad(e.to_string()))?;
    let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let targets = cfg.target_leaves().map_or_else(
        || cfg.target_modules.as_str().unwrap_or("?").to_string(),
        |mut v| {
            v.sort();
            v.join(",")
        },
    );
    Ok(AdapterInfo {
        path: dir.to_path_buf(),
        r: cfg.r,
        alpha: cfg.lora_alpha,
        targets,
        step: adapter_step(dir),
    })
}

/// The step of an adapter folder: `global_step` in its `trainer_state.json`, else `N` of a
/// `checkpoint-N` folder name.
pub fn adapter_step(dir: &Path) -> Option<u64> {
    let from_state = std::fs::read_to_string(dir.join("trainer_state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("global_step").and_then(serde_json::Value::as_u64));
    from_state.or_else(|| {
        dir.file_name()?
            .to_str()?
            .strip_prefix("checkpoint-")?
            .parse()
            .ok()
    })
}

/// What `output_dir` offers, for the picker: the base model, the final adapter (when the run
/// wrote one), then every complete `checkpoint-N`, newest first.
pub fn list_targets(output_dir: &Path) -> Vec<TargetEntry> {
    let mut out = vec![TargetEntry {
        label: "base model, no adapter".into(),
        target: ChatTarget::Base,
    }];
    let step = adapter_step(output_dir).map_or_else(String::new, |s| format!(" (step {s})"));
    if output_dir.join(CONFIG_FILE).is_file() && output_dir.join(WEIGHTS_FILE).is_file() {
        out.push(TargetEntry {
            label: format!("final adapter{step}  {}", output_dir.display()),
            target: ChatTarget::Adapter(output_dir.to_path_buf()),
        });
    } else if is_model_folder(output_dir) {
        out.push(TargetEntry {
            label: format!("final model{step}  {}", output_dir.display()),
            target: ChatTarget::Model(output_dir.to_path_buf()),
        });
    }
    let mut checkpoints = list_checkpoints(output_dir);
    checkpoints.reverse();
    for (step, dir) in checkpoints {
        let target = if dir.join(CONFIG_FILE).is_file() {
            ChatTarget::Adapter(dir.clone())
        } else if is_model_folder(&dir) {
            ChatTarget::Model(dir.clone())
        } else {
            continue;
        };
        out.push(TargetEntry {
            label: format!("checkpoint-{step}  {}", dir.display()),
            target,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fake_adapter(dir: &Path, step: Option<u64>) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join(CONFIG_FILE),
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["v_proj","q_proj"]}"#,
        )
        .unwrap();
        std::fs::write(dir.join(WEIGHTS_FILE), b"").unwrap();
        if let Some(s) = step {
            std::fs::write(
                dir.join("trainer_state.json"),
                format!(r#"{{"global_step":{s}}}"#),
            )
            .unwrap();
        }
    }

    #[test]
    fn lists_final_adapter_then_complete_checkpoints_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        fake_adapter(out, Some(30));
        fake_adapter(&out.join("checkpoint-10"), Some(10));
        fake_adapter(&out.join("checkpoint-20"), Some(20));
        // Being written by the trainer: not offered.
        fake_adapter(&out.join(".checkpoint-30.tmp"), Some(30));
        let t = list_targets(out);
        let targets: Vec<&ChatTarget> = t.iter().map(|e| &e.target).collect();
        assert_eq!(
            targets,
            [
                &ChatTarget::Base,
                &ChatTarget::Adapter(out.to_path_buf()),
                &ChatTarget::Adapter(out.join("checkpoint-20")),
                &ChatTarget::Adapter(out.join("checkpoint-10")),
            ]
        );
        assert!(t[1].label.starts_with("final adapter (step 30)"));
    }

    #[test]
    fn a_freeze_or_full_run_offers_its_model_and_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        for d in [out.to_path_buf(), out.join("checkpoint-4")] {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config.json"), "{}").unwrap();
            std::fs::write(d.join("model.safetensors"), b"").unwrap();
            std::fs::write(d.join("trainer_state.json"), r#"{"global_step":4}"#).unwrap();
        }
        let t = list_targets(out);
        let targets: Vec<&ChatTarget> = t.iter().map(|e| &e.target).collect();
        assert_eq!(
            targets,
            [
                &ChatTarget::Base,
                &ChatTarget::Model(out.to_path_buf()),
                &ChatTarget::Model(out.join("checkpoint-4")),
            ]
        );
        assert!(
            t[1].label.starts_with("final model (step 4)"),
            "{}",
            t[1].label
        );
        assert_eq!(
            folder_target(out.to_path_buf()),
            ChatTarget::Model(out.to_path_buf())
        );
        let other = out.join("nope");
        assert_eq!(folder_target(other.clone()), ChatTarget::Adapter(other));
    }

    #[test]
    fn describes_an_adapter_and_names_what_is_wrong_with_a_bad_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("checkpoint-7");
        fake_adapter(&ck, None);
        let info = describe_adapter(&ck).unwrap();
        assert_eq!((info.r, info.alpha), (8, 16.0));
        assert_eq!(info.targets, "q_proj,v_proj");
        assert_eq!(info.step, Some(7), "from the folder name");
        let e = describe_adapter(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("no adapter_config.json"), "{e}");
        let e = describe_adapter(&tmp.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such folder"), "{e}");
    }
}
