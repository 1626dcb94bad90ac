//! A preset, resolved into the option structs the engine and the data pipeline take. The only place
//! that knows both sides' vocabularies, so neither imports the other.

use candle_core::DType;

use crate::config::{self, FinetuningType, Preset};
use crate::data::{self, DataOptions};
use crate::engine::generate::GenerationParams;
use crate::engine::{Finetune, LoraSpec, LoraTargets};

/// The data pipeline's options for a preset.
pub fn data_options(p: &Preset) -> DataOptions {
    DataOptions {
        dataset: p.datasets(),
        eval_dataset: p.eval_datasets(),
        dataset_dir: p.dataset_dir.clone().into(),
        template: p.template.clone(),
        cutoff_len: p.cutoff_len,
        train_on_prompt: p.train_on_prompt,
        mask_history: p.mask_history,
        max_samples: p.max_samples,
        val_size: data::ValSize::from_f64(p.val_size),
        packing: p.packing,
        neat_packing: p.neat_packing,
        streaming: p.streaming,
        buffer_size: p.buffer_size,
        mix_strategy: match p.mix_strategy {
            config::MixStrategy::Concat | config::MixStrategy::InterleaveOnce => {
                data::MixStrategy::Concat
            }
            config::MixStrategy::InterleaveUnder => data::MixStrategy::InterleaveUnder,
            config::MixStrategy::InterleaveOver => data::MixStrategy::InterleaveOver,
        },
        interleave_probs: p.interleave_probs.as_deref().map(|s| {
            config::comma_list(s)
                .iter()
                .filter_map(|x| x.parse().ok())
                .collect()
        }),
        default_system: p.default_system.clone(),
        enable_thinking: p.enable_thinking,
        preserve_thinking: p.preserve_thinking,
        placeholders: identity_placeholders(p),
        tool_format: p.tool_format.clone(),
        seed: p.data_seed_resolved(),
        stage: match p.stage {
            config::Stage::Pt => data::Stage::Pt,
            config::Stage::Sft => data::Stage::Sft,
            config::Stage::Rm => data::Stage::Rm,
            config::Stage::Ppo => data::Stage::Ppo,
            config::Stage::Dpo => data::Stage::Dpo,
            config::Stage::Kto => data::Stage::Kto,
        },
        per_device_train_batch_size: p.per_device_train_batch_size,
        gradient_accumulation_steps: p.gradient_accumulation_steps,
        num_train_epochs: p.num_train_epochs,
        max_steps: usize::try_from(p.max_steps).ok().filter(|s| *s > 0),
        overwrite_cache: p.overwrite_cache,
        tokenized_path: p.tokenized_path.clone().map(Into::into),
    }
}

/// `{{name}}` / `{{author}}` fillings from `identity_name` / `identity_author` (LLaMA-Factory leaves
/// the placeholders for the user to edit in the file; termtune takes them from the preset).
pub fn identity_placeholders(p: &Preset) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Some(name) = &p.identity_name {
        v.push(("{{name}}".to_string(), name.clone()));
    }
    if let Some(author) = &p.identity_author {
        v.push(("{{author}}".to_string(), author.clone()));
    }
    v
}

/// What is trained, as the engine builds it.
pub fn finetune(p: &Preset) -> Result<Finetune, crate::engine::EngineError> {
    Ok(match p.finetuning_type {
        FinetuningType::Lora | FinetuningType::Oft => Finetune::Lora(lora_spec(p)?),
        FinetuningType::Freeze => Finetune::Freeze {
            trainable_layers: p.freeze_trainable_layers,
        },
        FinetuningType::Full => Finetune::Full,
    })
}

/// The preset's LoRA hyper-parameters.
pub fn lora_spec(p: &Preset) -> Result<LoraSpec, crate::engine::EngineError> {
    Ok(LoraSpec {
        r: p.lora_rank as usize,
        alpha: f64::from(p.lora_alpha_resolved()),
        #[allow(clippy::cast_possible_truncation)]
        dropout: p.lora_dropout as f32,
        targets: LoraTargets::parse(&p.lora_target)?,
        use_rslora: p.use_rslora,
        seed: p.seed,
    })
}

/// Sampling settings: `do_sample: false` or `temperature: 0` is greedy.
pub fn generation_params(p: &Preset) -> GenerationParams {
    GenerationParams {
        max_new_tokens: p.max_new_tokens,
        temperature: if p.do_sample { p.temperature } else { 0.0 },
        top_p: Some(p.top_p),
        top_k: Some(p.top_k),
        #[allow(clippy::cast_possible_truncation)]
        repetition_penalty: p.repetition_penalty as f32,
        seed: p.seed,
    }
}

/// The compute dtype for training: bf16/fp16 when asked, else f32.
pub fn train_dtype(p: &Preset) -> DType {
    if p.bf16 || p.pure_bf16 {
        DType::BF16
    } else if p.fp16 {
        DType::F16
    } else {
        DType::F32
    }
}

/// The dtype for chat and export (`infer_dtype`; auto is f32 on CPU).
pub fn infer_dtype(p: &Preset, device: &candle_core::Device) -> DType {
    match p.infer_dtype {
        config::InferDtype::Float32 => DType::F32,
        config::InferDtype::Float16 => DType::F16,
        config::InferDtype::Bfloat16 => DType::BF16,
        config::InferDtype::Auto => {
            if device.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            }
        }
    }
}
