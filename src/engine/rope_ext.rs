//! Extending a model's context with RoPE scaling, as LLaMA-Factory's `rope_scaling` key does
//! (`model_utils/rope.py`, `configure_rope`): the config.json is rewritten before the model is built, so training,
//! chat and an exported config.json all compute the extended model.
//!
//! The pretraining length is the scaling's `original_max_position_embeddings` when the model already has one
//! (llama3, yarn), else `max_position_embeddings`. With a target length (training: `cutoff_len`) the factor is
//! ⌈target / length⌉, and a target that fits leaves the model as it is; without one (inference) the factor is 2.
//! The new scaling replaces the model's own, and `max_position_embeddings` becomes length × factor.

use serde_json::{Map, Value, json};

use super::arch::{ModelConfig, RopeScaling};
use super::error::{EngineError, Result};

/// The `rope_scaling` values termtune computes (LLaMA-Factory's `dynamic` is not among them).
pub const KINDS: &[&str] = &["linear", "yarn", "llama3"];

/// What [`extend_context`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextExtension {
    /// The config now holds `scaling`; the model's positions went from `from` to `to`.
    Extended {
        scaling: RopeScaling,
        from: usize,
        to: usize,
    },
    /// The target length fits the model's `positions`: nothing changed (LLaMA-Factory disables the scaling).
    Fits { target: usize, positions: usize },
}

impl ContextExtension {
    /// One line for a run's log and `termtune check`.
    pub fn describe(&self, kind: &str) -> String {
        match self {
            Self::Extended { scaling, from, to } => format!(
                "rope_scaling {kind}: factor {} ({from} → {to} positions)",
                scaling.factor()
            ),
            Self::Fits { target, positions } => format!(
                "rope_scaling {kind}: off, as in LLaMA-Factory (cutoff_len {target} fits the model's {positions} positions)"
            ),
        }
    }
}

/// Applies `rope_scaling: kind` to `config` (a config.json, either transformers layout; a `gemma3` image-and-text
/// config's `text_config`), for sequences of `target` tokens (`None`: inference, factor 2).
pub fn extend_context(
    config: &mut Value,
    kind: &str,
    target: Option<usize>,
) -> Result<ContextExtension> {
    if !KINDS.contains(&kind) {
        return Err(EngineError::key(
            "rope_scaling",
            format!(
                "{kind:?} is not one termtune computes ({})",
                KINDS.join(", ")
            ),
        ));
    }
    let current = ModelConfig::from_hf_config(config)?;
    let from = match current.rope_scaling {
        Some(RopeScaling::Llama3(s)) => s.original_max_position_embeddings,
        Some(RopeScaling::Yarn(s)) => s.original_max_position_embeddings,
        _ => positions_of(config, &current).ok_or_else(|| {
            EngineError::key(
                "max_position_embeddings",
                "missing: the length rope_scaling would extend is unknown",
            )
        })?,
    };
    let factor = match target {
        Some(t) if t <= from => {
            return Ok(ContextExtension::Fits {
                target: t,
                positions: from,
            });
        }
        Some(t) => t.div_ceil(from) as f64,
        None => 2.0,
    };
    // The objects LLaMA-Factory writes.
    let object = match kind {
        "linear" => json!({"rope_type": "linear", "factor": factor}),
        "yarn" => json!({"rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": from}),
        _ => json!({"rope_type": "llama3", "factor": factor,
            "original_max_position_embeddings": from, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    };
    let to = from * factor as usize;
    let text = text_part(config, current.image_text)?;
    write_scaling(text, &object);
    text.insert("max_position_embeddings".into(), json!(to));
    let scaling = ModelConfig::from_hf_config(config)?
        .rope_scaling
        .ok_or_else(|| EngineError::key("rope_scaling", "the scaling did not reach the config"))?;
    Ok(ContextExtension::Extended { scaling, from, to })
}

/// The model's `max_position_embeddings` as its config.json gives it (a `gemma3` image-and-text checkpoint: its text
/// model's, Gemma3TextConfig's default when `text_config` leaves it out); `None` when the file does not say.
pub fn written_positions(config: &Value) -> Result<Option<usize>> {
    Ok(positions_of(config, &ModelConfig::from_hf_config(config)?))
}

/// [`written_positions`] of a config already read as `current`.
fn positions_of(config: &Value, current: &ModelConfig) -> Option<usize> {
    let text = if current.image_text {
        config.get("text_config")
    } else {
        Some(config)
    };
    let written = text
        .and_then(|t| t.get("max_position_embeddings"))
        .is_some_and(|m| !m.is_null());
    (written || current.image_text).then_some(current.max_position_embeddings)
}

/// The object that holds the text model's settings.
fn text_part(config: &mut Value, image_text: bool) -> Result<&mut Map<String, Value>> {
    let v = if image_text {
        config
            .get_mut("text_config")
            .ok_or_else(|| EngineError::key("text_config", "missing"))?
    } else {
        config
    };
    v.as_object_mut()
        .ok_or_else(|| EngineError::key("config.json", "expected an object"))
}

/// Puts `object` where the config keeps its (global) RoPE scaling: `rope_parameters` (transformers 5; for Gemma 3
/// its `full_attention` part), keeping its `rope_theta`, and `rope_scaling` (transformers 4) where that is the layout
/// or also present.
fn write_scaling(text: &mut Map<String, Value>, object: &Value) {
    let with_theta = |old: Option<&Value>| {
        let mut o = object.clone();
        if let (Some(map), Some(theta)) = (o.as_object_mut(), old.and_then(|p| p.get("rope_theta")))
        {
            map.insert("rope_theta".into(), theta.clone());
        }
        o
    };
    let mut wrote = false;
    if let Some(Value::Object(params)) = text.get_mut("rope_parameters") {
        if params.contains_key("full_attention") || params.contains_key("sliding_attention") {
            let full = with_theta(params.get("full_attention"));
            params.insert("full_attention".into(), full);
        } else {
            let new = with_theta(Some(&Value::Object(params.clone())));
            *params = new.as_object().cloned().unwrap_or_default();
        }
        wrote = true;
    }
    if !wrote || text.get("rope_scaling").is_some_and(|s| !s.is_null()) {
        text.insert("rope_scaling".into(), object.clone());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn llama(extra: Value) -> Value {
        let mut v = json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 2048,
            "rope_theta": 10000.0});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn factor_is_the_ceiling_of_target_over_length_as_in_llamafactory() {
        let mut v = llama(json!({}));
        let e = extend_context(&mut v, "linear", Some(5000)).unwrap();
        assert_eq!(
            e,
            ContextExtension::Extended {
                scaling: RopeScaling::Linear { factor: 3.0 },
                from: 2048,
                to: 6144
            }
        );
        assert_eq!(v["max_position_embeddings"], json!(6144));
        assert_eq!(
            v["rope_scaling"],
            json!({"rope_type": "linear", "factor": 3.0})
        );
        // Inference: factor 2; a target that fits changes nothing.
        let mut v = llama(json!({}));
        let e = extend_context(&mut v, "yarn", None).unwrap();
        assert!(matches!(e, ContextExtension::Extended { to: 4096, .. }));
        let mut v = llama(json!({}));
        let before = v.clone();
        let e = extend_context(&mut v, "llama3", Some(2048)).unwrap();
        assert_eq!(
            e,
            ContextExtension::Fits {
                target: 2048,
                positions: 2048
            }
        );
        assert_eq!(v, before);
    }

    #[test]
    fn a_model_scaled_already_extends_from_its_pretraining_length() {
        // Llama 3.1: llama3 scaling over 8192 pretraining positions, 131072 in all.
        let mut v = llama(
            json!({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        let e = extend_context(&mut v, "yarn", Some(20000)).unwrap();
        let ContextExtension::Extended {
            scaling: RopeScaling::Yarn(s),
            from,
            to,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((from, to, s.factor), (8192, 24576, 3.0));
        assert_eq!(s.original_max_position_embeddings, 8192);
        assert!((s.attention_factor - (0.1 * 3f64.ln() + 1.0)).abs() < 1e-15);
    }

    #[test]
    fn transformers_5_layouts_keep_their_rope_theta() {
        let mut v =
            llama(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}));
        v.as_object_mut().unwrap().remove("rope_theta");
        extend_context(&mut v, "linear", Some(4096)).unwrap();
        assert_eq!(
            v["rope_parameters"],
            json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
        );
        assert!(v.get("rope_scaling").is_none());
        let c = ModelConfig::from_hf_config(&v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.max_position_embeddings, 4096);

        // Gemma 3: the global layers' part; the sliding layers keep their own base, unscaled.
        let mut g = json!({"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 8, "max_position_embeddings": 32768, "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 512, "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}});
        extend_context(&mut g, "linear", Some(40000)).unwrap();
        let c = ModelConfig::from_hf_config(&g).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(
            (c.rope_theta, c.local_rope_theta),
            (1_000_000.0, Some(10_000.0))
        );
        assert_eq!(c.max_position_embeddings, 65536);
    }

    #[test]
    fn unknown_kinds_and_missing_lengths_are_errors_naming_the_key() {
        let mut v = llama(json!({}));
        let e = extend_context(&mut v, "dynamic", Some(4096))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_scaling") && e.contains("dynamic"), "{e}");
        let mut v = llama(json!({}));
        v.as_object_mut().unwrap().remove("max_position_embeddings");
        let e = extend_context(&mut v, "linear", Some(4096))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_position_embeddings"), "{e}");
    }
}
