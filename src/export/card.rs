//! Adapter export: a PEFT adapter folder (config, weights, tokenizer files when present) with a model card
//! `README.md` that says what the adapter is and how to load it with PEFT, vLLM and llama.cpp.

use std::path::Path;

use serde_json::Value as Json;

use super::{ExportError, write_json, write_text};
use crate::config::Preset;
use crate::engine::adapter::{AdapterConfig, CONFIG_FILE, WEIGHTS_FILE};

/// Files of an adapter folder that travel with the export (training state such as optimizer moments does not).
/// The files of an adapter folder an adapter-only export copies.
pub(crate) const COPIED: &[&str] = &[
    WEIGHTS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Copies the adapter at `src` into `dst` with `base_model_name_or_path` set to `base_name` and a model card.
pub fn write_adapter_folder(
    src: &Path,
    dst: &Path,
    preset: &Preset,
    base_name: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ExportError> {
    let cfg_path = src.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| ExportError::io(format!("reading {}", cfg_path.display()), e))?;
    let mut raw: Json = serde_json::from_str(&text).map_err(|e| {
        ExportError::Unsupported(format!("{}: not valid JSON: {e}", cfg_path.display()))
    })?;
    let cfg: AdapterConfig = serde_json::from_value(raw.clone()).map_err(|e| {
        ExportError::Unsupported(format!(
            "{}: not a PEFT LoRA config: {e}",
            cfg_path.display()
        ))
    })?;
    if let Json::Object(m) = &mut raw {
        m.insert(
            "base_model_name_or_path".into(),
            Json::String(base_name.to_string()),
        );
    }
    progress(&format!("copying the adapter {}", src.display()));
    write_json(&dst.join(CONFIG_FILE), &raw)?;
    for f in COPIED {
        let p = src.join(f);
        if p.is_file() {
            std::fs::copy(&p, dst.join(f)).map_err(|e| {
                ExportError::io(format!("copying {} to {}", p.display(), dst.display()), e)
            })?;
        }
    }
    write_text(&dst.join("README.md"), &model_card(&cfg, preset, base_name))
}

fn targets(cfg: &AdapterConfig) -> String {
    match cfg.target_leaves() {
        Some(list) => list.join(", "),
        None => format!("regex `{}`", cfg.target_modules.as_str().unwrap_or("?")),
    }
}

/// The model card: YAML front matter for the Hub, then the adapter's facts and loading recipes.
pub fn model_card(cfg: &AdapterConfig, preset: &Preset, base_name: &str) -> String {
    let dataset = preset
        .dataset
        .clone()
        .unwrap_or_else(|| "(not recorded)".into());
    let template = preset
        .template
        .clone()
        .unwrap_or_else(|| "the tokenizer's chat template".into());
    let scale = cfg.scale();
    let datasets_yaml: String = preset
        .dataset
        .as_deref()
        .map(|d| {
            crate::config::comma_list(d)
                .iter()
                .map(|x| format!("  - {x}\n"))
                .collect()
        })
        .unwrap_or_default();
    let mut s = String::new();
    s.push_str("---\n");
    s.push_str(&format!("base_model: {base_name}\n"));
    s.push_str("library_name: peft\npipeline_tag: text-generation\n");
    s.push_str("tags:\n  - lora\n  - peft\n  - termtune\n  - llama-factory\n");
    if !datasets_yaml.is_empty() {
        s.push_str("datasets:\n");
        s.push_str(&datasets_yaml);
    }
    s.push_str("---\n\n");
    s.push_str(&format!("# LoRA adapter for {base_name}\n\n"));
    s.push_str("Trained with termtune (LLaMA-Factory compatible). This folder is a Hugging Face PEFT adapter: ");
    s.push_str("`adapter_config.json` + `adapter_model.safetensors`.\n\n");
    s.push_str("| | |\n|---|---|\n");
    s.push_str(&format!("| base model | `{base_name}` |\n"));
    s.push_str(&format!("| rank r | {} |\n", cfg.r));
    s.push_str(&format!(
        "| lora_alpha | {} (scale {scale:.4}{}) |\n",
        cfg.lora_alpha,
        if cfg.use_rslora { ", rsLoRA" } else { "" }
    ));
    s.push_str(&format!("| lora_dropout | {} |\n", cfg.lora_dropout));
    if cfg.use_dora {
        s.push_str("| DoRA | yes: a magnitude vector per adapted module (`use_dora`) |\n");
    }
    s.push_str(&format!("| target modules | {} |\n", targets(cfg)));
    s.push_str(&format!("| dataset | {dataset} |\n"));
    s.push_str(&format!("| chat template | {template} |\n\n"));
    s.push_str("## Load it\n\nPEFT (Python):\n\n```python\n");
    s.push_str(
        "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n",
    );
    s.push_str("model = AutoPeftModelForCausalLM.from_pretrained(\"PATH/TO/THIS/FOLDER\")\n");
    s.push_str(&format!(
        "tokenizer = AutoTokenizer.from_pretrained(\"{base_name}\")\n"
    ));
    s.push_str(
        "model = model.merge_and_unload()  # optional: fold the adapter into the weights\n```\n\n",
    );
    if cfg.use_dora {
        // vLLM refuses DoRA adapters ("vLLM does not yet support DoRA") and llama.cpp's LoRA GGUF has no
        // magnitude vector: both take the merged model instead.
        s.push_str(
            "vLLM and llama.cpp serve plain LoRA adapters only: for them, export the merged model (`termtune export` \
             without `--adapter-only`, `export_format: gguf` for llama.cpp).\n\n",
        );
    } else {
        s.push_str("vLLM:\n\n```sh\n");
        s.push_str(&format!(
            "vllm serve {base_name} --enable-lora --max-lora-rank {} --lora-modules my-adapter=PATH/TO/THIS/FOLDER\n```\n\n",
            cfg.r.max(8).next_power_of_two()
        ));
        s.push_str("llama.cpp (convert the adapter to GGUF, then load it on top of a GGUF of the same base):\n\n```sh\n");
        s.push_str(&format!(
            "python convert_lora_to_gguf.py PATH/TO/THIS/FOLDER --base-model-id {base_name} --outfile adapter.gguf\n"
        ));
        s.push_str("llama-cli -m base.gguf --lora adapter.gguf\n```\n\n");
    }
    s.push_str(
        "termtune / LLaMA-Factory: set `adapter_name_or_path: PATH/TO/THIS/FOLDER` next to ",
    );
    s.push_str(&format!("`model_name_or_path: {base_name}`.\n"));
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::engine::{LoraSpec, LoraTargets};

    /// A DoRA adapter's card says so and sends vLLM and llama.cpp users to the merged export (neither serves DoRA
    /// adapters); a plain LoRA card keeps their recipes.
    #[test]
    fn a_dora_card_says_dora_and_points_servers_to_the_merged_model() {
        let spec = |use_dora| LoraSpec {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: LoraTargets::All,
            use_rslora: false,
            use_dora,
            seed: 0,
            init: Default::default(),
        };
        let p = Preset::default();
        let dora = model_card(&AdapterConfig::for_spec(&spec(true), "base"), &p, "base");
        assert!(dora.contains("| DoRA | yes"), "{dora}");
        assert!(dora.contains("export the merged model"), "{dora}");
        assert!(!dora.contains("--lora-modules"), "{dora}");
        let lora = model_card(&AdapterConfig::for_spec(&spec(false), "base"), &p, "base");
        assert!(!lora.contains("DoRA"), "{lora}");
        assert!(lora.contains("--lora-modules") && lora.contains("convert_lora_to_gguf.py"));
    }
}
