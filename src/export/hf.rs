//! The Hugging Face folder of a merged export: `config.json`, `model.safetensors` or
//! `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`, tokenizer files and
//! `generation_config.json`, as `save_pretrained` writes them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value as Json, json};

use super::{ExportError, write_json};
use crate::config::Preset;
use crate::data::Encoder;
use crate::data::encoder::config_chat_template;
use crate::data::template::{Slot, TemplateClass};
use crate::engine::ModelFiles;
use crate::engine::source::SourceKind;
use crate::engine::weights::{self, save_safetensors};

/// What [`write_folder`] writes.
pub struct FolderInput<'a> {
    pub files: &'a ModelFiles,
    pub kind: &'a SourceKind,
    /// HF-named merged weights (any dtype; converted to `dtype`).
    pub tensors: &'a HashMap<String, Tensor>,
    pub dtype: DType,
    /// Largest shard in bytes.
    pub shard_bytes: u64,
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// `tokenizer_config.json` to write (with the chat template).
    pub tokenizer_config: &'a Json,
}

/// Tensor names in the order `save_pretrained` writes a llama-family state dict: embeddings, layers in numeric
/// order (each layer's tensors by name), final norm, lm_head.
pub fn ordered_names(tensors: &HashMap<String, Tensor>) -> Vec<String> {
    let key = |n: &str| -> (usize, usize, String) {
        if n == "model.embed_tokens.weight" {
            return (0, 0, String::new());
        }
        if let Some(rest) = n.strip_prefix("model.layers.")
            && let Some((i, tail)) = rest.split_once('.')
            && let Ok(i) = i.parse::<usize>()
        {
            return (1, i, tail.to_string());
        }
        if n == "lm_head.weight" {
            return (3, 0, String::new());
        }
        (2, 0, n.to_string())
    };
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort_by_key(|n| key(n));
    names
}

/// Groups tensors into shards of at most `max_bytes` (a tensor larger than that gets a shard of its own), the
/// greedy rule of `huggingface_hub.split_torch_state_dict_into_shards`.
pub fn plan_shards(sizes: &[(String, u64)], max_bytes: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut current_bytes = 0u64;
    for (name, bytes) in sizes {
        if !current.is_empty() && current_bytes + bytes > max_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(name.clone());
        current_bytes += bytes;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes the merged weights (sharded when needed) and the config/tokenizer/generation files into `dir`.
pub fn write_folder(
    dir: &Path,
    input: &FolderInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ExportError> {
    let dt = input.dtype;
    let names = ordered_names(input.tensors);
    let sizes: Vec<(String, u64)> = names
        .iter()
        .map(|n| {
            let elems = input.tensors[n].elem_count() as u64;
            (n.clone(), elems * dt.size_in_bytes() as u64)
        })
        .collect();
    let total_size: u64 = sizes.iter().map(|s| s.1).sum();
    let shards = plan_shards(&sizes, input.shard_bytes);
    let n = shards.len();
    let mut weight_map = Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        progress(&format!(
            "writing {file} ({} tensors, shard {}/{n})",
            shard.len(),
            i + 1
        ));
        let mut part = HashMap::new();
        for name in shard {
            part.insert(name.clone(), input.tensors[name].to_dtype(dt)?);
            weight_map.insert(name.clone(), json!(file));
        }
        save_safetensors(&part, &dir.join(&file)).map_err(|e| match e {
            crate::engine::EngineError::Io { source, .. }
                if crate::fsutil::is_disk_full(&source) =>
            {
                ExportError::DiskFullWhileWriting {
                    path: dir.join(&file),
                    source,
                }
            }
            other => ExportError::Engine(other),
        })?;
    }
    if n > 1 {
        let mut sorted: Vec<(String, Json)> = weight_map.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        write_json(
            &dir.join("model.safetensors.index.json"),
            &json!({
                "metadata": {"total_size": total_size},
                "weight_map": Json::Object(sorted.into_iter().collect()),
            }),
        )?;
    }

    progress("writing config.json, tokenizer and generation config");
    write_json(
        &dir.join("config.json"),
        &weights::saved_config(&input.files.config, dt),
    )?;
    // The tokenizer: the source's own tokenizer.json byte for byte when it came from a folder, else the
    // tokenizer termtune built (from GGUF metadata).
    let src_dir = &input.files.dir;
    let from_folder = matches!(input.kind, SourceKind::Folder | SourceKind::Hub { .. });
    let src_tok = src_dir.join("tokenizer.json");
    if from_folder && src_tok.is_file() {
        copy(&src_tok, &dir.join("tokenizer.json"))?;
    } else {
        input
            .tokenizer
            .save(dir.join("tokenizer.json"), true)
            .map_err(|e| ExportError::Unsupported(format!("cannot write tokenizer.json: {e}")))?;
    }
    if from_folder {
        // An image-and-text checkpoint's processor files travel too, so the export stays usable with images.
        let processor: &[&str] = if crate::engine::arch::is_image_text(&input.files.config) {
            &[
                "preprocessor_config.json",
                "processor_config.json",
                "chat_template.json",
                "tokenizer.model",
            ]
        } else {
            &[]
        };
        for extra in ["special_tokens_map.json", "chat_template.jinja"]
            .iter()
            .chain(processor)
        {
            let extra = *extra;
            let p = src_dir.join(extra);
            if p.is_file()
                && !(extra == "chat_template.jinja" && has_template(input.tokenizer_config))
            {
                copy(&p, &dir.join(extra))?;
            }
        }
    }
    write_json(&dir.join("tokenizer_config.json"), input.tokenizer_config)?;
    write_json(
        &dir.join("generation_config.json"),
        &weights::generation_config(&input.files.generation_config, &input.files.config),
    )?;
    Ok(())
}

fn has_template(cfg: &Json) -> bool {
    cfg.get("chat_template").is_some()
}

/// Copies a file's bytes; the copy gets a new file's permissions, not the source's (`std::fs::copy` would keep
/// an owner-only source file owner-only in the export).
fn copy(from: &Path, to: &Path) -> Result<(), ExportError> {
    std::fs::read(from)
        .and_then(|bytes| crate::fsutil::write_file(to, bytes))
        .map_err(|e| ExportError::io(format!("copying {} to {}", from.display(), to.display()), e))
}

/// `tokenizer_config.json` for the export: the source's, with `padding_side: left` (LLaMA-Factory saves it so)
/// and, when the preset names a template and the tokenizer has no chat template of its own (or the template
/// replaces it), the template as Jinja, as LLaMA-Factory's `fix_jinja_template` does.
pub fn tokenizer_config_with_template(
    preset: &Preset,
    encoder: &Encoder,
    files: &ModelFiles,
) -> Json {
    let mut cfg = match &files.tokenizer_config {
        Json::Object(m) => m.clone(),
        _ => Map::new(),
    };
    cfg.insert("padding_side".into(), json!("left"));
    let own = config_chat_template(&files.tokenizer_config);
    if preset.template.is_some() && (own.is_none() || encoder.template.replace_jinja_template) {
        cfg.insert("chat_template".into(), json!(jinja_from_template(encoder)));
    }
    Json::Object(cfg)
}

fn jinja_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\'', "\\'")
        .replace('\n', "\\n")
}

fn slots_to_jinja(slots: &[Slot], encoder: &Encoder, placeholder: &str) -> String {
    let mut items = Vec::new();
    for slot in slots {
        match slot {
            Slot::Text(text) => {
                let mut pieces = text.splitn(2, "{{content}}");
                let first = pieces.next().unwrap_or_default();
                if !first.is_empty() {
                    items.push(format!("'{}'", jinja_escape(first)));
                }
                if let Some(rest) = pieces.next() {
                    items.push(placeholder.to_string());
                    if !rest.is_empty() {
                        items.push(format!("'{}'", jinja_escape(rest)));
                    }
                }
            }
            Slot::Token(t) => items.push(format!("'{}'", jinja_escape(t))),
            Slot::Bos => {
                if let Some((b, _)) = &encoder.bos {
                    items.push(format!("'{}'", jinja_escape(b)));
                }
            }
            Slot::Eos => items.push(format!("'{}'", jinja_escape(&encoder.eos.0))),
        }
    }
    if items.is_empty() {
        "''".into()
    } else {
        items.join(" + ")
    }
}

/// LLaMA-Factory's `Template._get_jinja_template`: the slot template as a Hugging Face chat template.
pub fn jinja_from_template(encoder: &Encoder) -> String {
    let t = &encoder.template;
    let mut j = String::new();
    let prefix = slots_to_jinja(&t.format_prefix, encoder, "content");
    if prefix != "''" {
        j.push_str(&format!("{{{{ {prefix} }}}}"));
    }
    if !t.default_system.is_empty() {
        j.push_str(&format!(
            "{{% set system_message = '{}' %}}",
            jinja_escape(&t.default_system)
        ));
    }
    j.push_str(
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
         {% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}",
    );
    let system = slots_to_jinja(&t.format_system, encoder, "system_message");
    let llama2 = t.class == TemplateClass::Llama2;
    if !llama2 {
        j.push_str(&format!(
            "{{% if system_message is defined %}}{{{{ {system} }}}}{{% endif %}}"
        ));
    }
    j.push_str("{% for message in loop_messages %}{% set content = message['content'] %}");
    if llama2 {
        j.push_str(&format!(
            "{{% if loop.index0 == 0 and system_message is defined %}}{{% set content = {system} + message['content'] %}}{{% endif %}}"
        ));
    }
    let user = slots_to_jinja(&t.format_user, encoder, "content");
    let assistant = slots_to_jinja(&t.format_assistant, encoder, "content");
    j.push_str(&format!(
        "{{% if message['role'] == 'user' %}}{{{{ {user} }}}}{{% elif message['role'] == 'assistant' %}}{{{{ {assistant} }}}}{{% endif %}}{{% endfor %}}"
    ));
    j
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shards_split_greedily_and_oversized_tensors_get_their_own() {
        let sizes: Vec<(String, u64)> = [("a", 40), ("b", 40), ("c", 40), ("d", 150), ("e", 10)]
            .iter()
            .map(|(n, b)| ((*n).to_string(), *b))
            .collect();
        let plan = plan_shards(&sizes, 100);
        assert_eq!(
            plan,
            vec![vec!["a", "b"], vec!["c"], vec!["d"], vec!["e"]]
                .into_iter()
                .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        assert_eq!(plan_shards(&sizes, 1_000).len(), 1);
    }

    #[test]
    fn tensor_order_is_embeddings_layers_numerically_norm_head() {
        let t = Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap();
        let names = [
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
        ];
        let map: HashMap<String, Tensor> = names
            .iter()
            .map(|n| ((*n).to_string(), t.clone()))
            .collect();
        assert_eq!(
            ordered_names(&map),
            vec![
                "model.embed_tokens.weight",
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "model.norm.weight",
                "lm_head.weight"
            ]
        );
    }
}
