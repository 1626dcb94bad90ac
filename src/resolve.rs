//! A preset, resolved into the option structs the engine and the data pipeline take. The only place
//! that knows both sides' vocabularies, so neither imports the other.

use candle_core::{DType, Device};

use crate::config::{self, FinetuningType, Preset};
use crate::data::{self, DataError, DataOptions, Encoder};
use crate::engine::generate::GenerationParams;
use crate::engine::hub::HubOptions;
use crate::engine::source::{self, LoadedSource, SourceError, SourceKind, SourceProgress};
use crate::engine::tokenizer::LoadedTokenizer;
use crate::engine::{Finetune, LoraSpec, LoraTargets, ModelFiles};

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
        hub: Some(dataset_hub_options(p)),
    }
}

/// How hub datasets are reached: as the model (environment, `cache_dir`, `hf_hub_token`), at the repo's `main`
/// (LLaMA-Factory passes no revision to `load_dataset`; `model_revision` is the model's).
pub fn dataset_hub_options(p: &Preset) -> HubOptions {
    let mut hub = ModelRef::of(p).hub_options();
    hub.revision = "main".into();
    hub
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
            modules: config::comma_list(&p.freeze_trainable_modules),
            extra: p
                .freeze_extra_modules
                .as_deref()
                .map(config::comma_list)
                .unwrap_or_default(),
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
        use_dora: p.use_dora,
        seed: p.seed,
        init: crate::engine::pissa::LoraInit::from_preset(p.pissa_init, p.pissa_iter),
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

/// Where a preset's model comes from: `model_name_or_path` and the keys that say how to reach the
/// hub for it. Every loader, the trainer's, chat's, export's, bench's and the TUI's, goes through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// `model_name_or_path`: a hub id, a model folder or a `.gguf` file.
    pub name_or_path: String,
    /// `model_revision`.
    pub revision: String,
    /// `cache_dir`: the hub cache instead of the environment's.
    pub cache_dir: Option<String>,
    /// `hf_hub_token`: the token instead of the environment's.
    pub hf_hub_token: Option<String>,
    /// `gguf_dequantize` (or `quantization_bit`): how a GGUF file's quantized weights are held.
    pub gguf: source::GgufWeights,
}

impl ModelRef {
    /// The preset's model.
    pub fn of(p: &Preset) -> Self {
        Self {
            name_or_path: p.model_name_or_path.clone(),
            revision: p.model_revision.clone(),
            cache_dir: p.cache_dir.clone(),
            hf_hub_token: p.hf_hub_token.clone(),
            // quantization_bit quantizes dense weights: a GGUF base is dequantized first.
            gguf: source::GgufWeights::of(p.gguf_dequantize || p.quantization_bit.is_some()),
        }
    }

    /// How to reach the hub: the environment (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, …), then
    /// `model_revision`, `cache_dir` and `hf_hub_token`.
    pub fn hub_options(&self) -> HubOptions {
        let mut hub = HubOptions::from_env();
        hub.revision.clone_from(&self.revision);
        if let Some(dir) = &self.cache_dir {
            hub.cache_dir = dir.into();
        }
        if let Some(token) = &self.hf_hub_token {
            hub.token = Some(token.clone());
        }
        hub
    }
}

/// A preset's model, loaded: weights and config (in the dtype asked, on the device asked), where it
/// came from, and the tokenizer its data is encoded with.
pub struct PresetModel {
    pub files: ModelFiles,
    pub kind: SourceKind,
    /// The name adapters record as `base_model_name_or_path`: the hub id when known.
    pub base_name: String,
    pub tokenizer: LoadedTokenizer,
}

/// Loads the preset's model in `dtype` on `device` for `purpose` (a model without a tokenizer is refused: nothing
/// termtune does works without one).
pub fn load_model(
    p: &Preset,
    purpose: config::Purpose,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<PresetModel, SourceError> {
    load_model_to(
        p,
        purpose,
        dtype,
        device,
        crate::engine::memory::BaseStorage::Dense,
        progress,
    )
}

/// The length `rope_scaling` extends the context to for `purpose`, as LLaMA-Factory sets `model_max_length`:
/// `cutoff_len` in training; in chat, predict and export `cutoff_len` only when the preset sets it other than
/// LLaMA-Factory's default 2048 (its export rule; `None` makes the factor 2, its inference rule).
pub fn rope_target(p: &Preset, purpose: config::Purpose) -> Option<usize> {
    match purpose {
        config::Purpose::Train => Some(p.cutoff_len),
        _ => (p.cutoff_len != Preset::default().cutoff_len).then_some(p.cutoff_len),
    }
}

/// `rope_scaling` applied to a model's config.json for `purpose` ([`crate::engine::rope_ext`]): the line saying what
/// it did, `None` without the key.
pub fn extend_context(
    p: &Preset,
    purpose: config::Purpose,
    config: &mut serde_json::Value,
) -> Result<Option<String>, SourceError> {
    let Some(kind) = p.rope_scaling.map(config::RopeScalingArg::as_str) else {
        return Ok(None);
    };
    match crate::engine::rope_ext::extend_context(config, kind, rope_target(p, purpose)) {
        Ok(ext) => Ok(Some(ext.describe(kind))),
        Err(e) => Err(SourceError::Engine(crate::engine::EngineError::File {
            path: p.model_name_or_path.clone().into(),
            why: format!("`rope_scaling: {kind}`: {e}"),
        })),
    }
}

/// [`load_model`] with the decoder linear weights held as `to` ([`source::load_model_quantizing`]).
fn load_model_to(
    p: &Preset,
    purpose: config::Purpose,
    dtype: DType,
    device: &Device,
    to: crate::engine::memory::BaseStorage,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<PresetModel, SourceError> {
    let model = ModelRef::of(p);
    let LoadedSource {
        mut files,
        kind,
        base_name,
    } = source::load_model_quantizing(
        &model.name_or_path,
        &model.hub_options(),
        dtype,
        device,
        model.gguf,
        to,
        progress,
    )?;
    if let Some(line) = extend_context(p, purpose, &mut files.config)? {
        progress(SourceProgress::Note(line));
    }
    let tokenizer = LoadedTokenizer {
        tokenizer: files
            .tokenizer
            .clone()
            .ok_or_else(|| SourceError::NoTokenizer(model.name_or_path.clone()))?,
        tokenizer_config: files.tokenizer_config.clone(),
    };
    Ok(PresetModel {
        files,
        kind,
        base_name,
        tokenizer,
    })
}

/// Only the preset's tokenizer, without reading the weights (dataset statistics and previews).
pub fn load_tokenizer(
    p: &Preset,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<LoadedTokenizer, SourceError> {
    let model = ModelRef::of(p);
    source::load_tokenizer(&model.name_or_path, &model.hub_options(), progress)
}

/// The data encoder over a loaded tokenizer (template, special tokens, `opts`' chat settings).
pub fn encoder(opts: &DataOptions, tokenizer: &LoadedTokenizer) -> Result<Encoder, DataError> {
    Encoder::new(opts, &tokenizer.tokenizer, &tokenizer.tokenizer_config)
}

/// Why a preset's data encoder could not be had.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Data(#[from] DataError),
}

/// The preset's data options and encoder over its tokenizer alone, without reading the weights:
/// what dataset statistics and previews (`termtune check`, the TUI's Dataset pane) need.
pub fn load_encoder(
    p: &Preset,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<(DataOptions, Encoder), EncoderError> {
    let tokenizer = load_tokenizer(p, progress)?;
    let opts = data_options(p);
    let encoder = encoder(&opts, &tokenizer)?;
    Ok((opts, encoder))
}

/// The dtype the base weights and activations train in on `device`, and a note for the user when it is not what
/// the preset literally asked. On a GPU, `bf16`/`pure_bf16` train the base in bf16 (LoRA weights and AdamW stay
/// f32, as PEFT keeps them). On the CPU everything trains in f32: candle's CPU bf16 kernels are ~10× slower than
/// f32 (LLaMA-Factory's `qwen3_lora_sft.yaml` on SmolLM2: 8 tokens/s against ~90). `fp16` is refused: it needs
/// loss scaling, which termtune does not do.
pub fn train_dtype(p: &Preset, device: &Device) -> Result<(DType, Option<String>), String> {
    train_dtype_on(p, device.is_cpu())
}

/// [`train_dtype`] for a run on the CPU (`on_cpu`) or a GPU, without a device at hand (the TUI's estimate).
pub fn train_dtype_on(p: &Preset, on_cpu: bool) -> Result<(DType, Option<String>), String> {
    if p.fp16 {
        return Err("`fp16: true`: fp16 training needs loss scaling, which termtune does not do; use `bf16: true` (GPUs since Ampere: A100, L4, RTX 30xx, H100) or neither (f32)".into());
    }
    let half = p.bf16 || p.pure_bf16;
    if on_cpu {
        let note = half.then(|| {
            let key = if p.pure_bf16 { "pure_bf16" } else { "bf16" };
            format!("`{key}: true`: the CPU trains in f32 (candle's CPU bf16 kernels are about 10× slower); on a GPU the base trains in bf16")
        });
        return Ok((DType::F32, note));
    }
    // Full and freeze fine-tuning update the base weights themselves: LLaMA-Factory keeps them in f32 (master
    // weights) unless `pure_bf16`; a bf16 update below bf16's resolution would be lost.
    if p.bf16
        && !p.pure_bf16
        && !matches!(
            p.finetuning_type,
            FinetuningType::Lora | FinetuningType::Oft
        )
    {
        return Ok((
            DType::F32,
            Some("`bf16: true` with full or freeze fine-tuning: the trained weights stay f32 (as LLaMA-Factory's master weights) and the model computes in f32; `pure_bf16: true` trains them in bf16".into()),
        ));
    }
    Ok((if half { DType::BF16 } else { DType::F32 }, None))
}

/// The dtype for chat and export (`infer_dtype`; auto is f32 on CPU).
pub fn infer_dtype(p: &Preset, device: &Device) -> DType {
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

/// The 4-bit code `quantization_type` names.
fn four_bit(p: &Preset) -> crate::engine::bnb4::FourBit {
    match p.quantization_type {
        config::QuantizationType::Nf4 => crate::engine::bnb4::FourBit::Nf4,
        config::QuantizationType::Fp4 => crate::engine::bnb4::FourBit::Fp4,
    }
}

/// How the preset's base weights will be held, for the memory estimate: `quantization_bit`'s blocks, else as the
/// source keeps them (a GGUF's blocks, or dense).
pub fn base_storage(p: &Preset) -> crate::engine::memory::BaseStorage {
    if p.quantization_bit.is_some() {
        return base_storage_over(p, crate::engine::memory::BaseStorage::Dense);
    }
    base_storage_over(p, source::base_storage(&p.model_name_or_path))
}

/// [`base_storage`] for a source already probed (`source`: how the model source holds its weights).
pub fn base_storage_over(
    p: &Preset,
    source: crate::engine::memory::BaseStorage,
) -> crate::engine::memory::BaseStorage {
    use crate::engine::memory::BaseStorage;
    match p.quantization_bit {
        Some(8) => BaseStorage::Linears(candle_core::quantized::GgmlDType::Q8_0),
        Some(4) => BaseStorage::Bnb4(four_bit(p), p.double_quantization),
        _ if p.gguf_dequantize => BaseStorage::Dense,
        _ => source,
    }
}

/// The estimated peak memory of a training run of `p` over the model `cfg` on the CPU (`on_cpu`) or a GPU, its
/// base held as `base` (see [`base_storage`]): the training dtype and the estimate. `checkpointing` overrides the
/// preset's (`termtune check` shows both).
pub fn memory_estimate(
    p: &Preset,
    cfg: &crate::engine::ModelConfig,
    on_cpu: bool,
    base: crate::engine::memory::BaseStorage,
    checkpointing: Option<bool>,
    ref_cfg: Option<&crate::engine::ModelConfig>,
) -> Result<(DType, crate::engine::memory::MemoryEstimate), String> {
    let (dtype, _) = train_dtype_on(p, on_cpu)?;
    let ft = finetune(p).map_err(|e| e.to_string())?;
    let run = crate::engine::memory::RunShape {
        dtype,
        base,
        batch: p.sequences_per_micro_batch(),
        seq_len: p.cutoff_len,
        checkpointing: checkpointing.unwrap_or(!p.disable_gradient_checkpointing),
        head_chunk_rows: Some(crate::engine::layer::head_chunk_rows(
            cfg.vocab_size,
            on_cpu,
        )),
        muon: p.use_muon,
    };
    let mut est = crate::engine::memory::estimate(cfg, &ft, &run);
    est.reference = reference_weight_bytes(p, cfg, ref_cfg, dtype, base);
    Ok((dtype, est))
}

/// The bytes of a preference stage's frozen reference beside the policy: `ref_model`'s weights (`ref_cfg`, else
/// assumed the base's architecture) held as `ref_model_quantization_bit` says, a frozen copy of the base
/// (freeze/full without `ref_model`), or nothing (LoRA's reference is the base with the adapter off; orpo, simpo,
/// sft, pt and rm use none).
pub fn reference_weight_bytes(
    p: &Preset,
    cfg: &crate::engine::ModelConfig,
    ref_cfg: Option<&crate::engine::ModelConfig>,
    dtype: DType,
    base: crate::engine::memory::BaseStorage,
) -> u64 {
    use crate::engine::memory::{BaseStorage, base_weight_bytes};
    if !p.uses_reference() {
        return 0;
    }
    match reference_preset(p) {
        Some(rp) => base_weight_bytes(
            ref_cfg.unwrap_or(cfg),
            &Finetune::Frozen,
            dtype,
            base_storage_over(&rp, BaseStorage::Dense),
        ),
        None if p.finetuning_type == config::FinetuningType::Lora => 0,
        None => base_weight_bytes(cfg, &Finetune::Frozen, dtype, base),
    }
}

/// `ref_model` as a preset of its own (`None` without one): its name, `ref_model_adapters` as its adapters and
/// `ref_model_quantization_bit` as its `quantization_bit`, the rest the policy's.
pub fn reference_preset(p: &Preset) -> Option<Preset> {
    let name = p.ref_model.as_deref()?;
    let mut rp = p.clone();
    rp.model_name_or_path = name.to_string();
    rp.adapter_name_or_path.clone_from(&p.ref_model_adapters);
    rp.quantization_bit = p.ref_model_quantization_bit;
    Some(rp)
}

/// `ref_model`'s config when it is at hand without a download (for [`memory_estimate`]).
pub fn reference_config(p: &Preset) -> Option<crate::engine::ModelConfig> {
    let rp = reference_preset(p)?;
    let config = source::config_json(&rp.model_name_or_path, &ModelRef::of(&rp).hub_options())?;
    crate::engine::ModelConfig::from_hf_config(&config).ok()
}

/// The preset's base for training or chat: [`load_model`], its decoder linear weights quantized as
/// `quantization_bit` asks (Q8_0 blocks for 8; bitsandbytes' 4-bit layout for 4, `quantization_type`,
/// `double_quantization`). Each such weight is read on the host and quantized before the next is read, so neither
/// the host nor a GPU ever holds the base dense; a note says how many and the memory they now take.
pub fn load_base(
    p: &Preset,
    purpose: config::Purpose,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<PresetModel, SourceError> {
    let to = base_storage_over(p, crate::engine::memory::BaseStorage::Dense);
    if to == crate::engine::memory::BaseStorage::Dense {
        return load_model(p, purpose, dtype, device, progress);
    }
    let m = load_model_to(p, purpose, dtype, device, to, progress)?;
    let (n, bytes) = m.files.quantized_size();
    progress(SourceProgress::Note(format!(
        "quantization_bit {}: {n} linear weights quantized to {} ({})",
        p.quantization_bit.unwrap_or_default(),
        to.format_name().unwrap_or_default(),
        crate::fsutil::human_bytes(bytes as u64)
    )));
    Ok(m)
}

/// Where a reward model's value head sits for `preset`: beside the last adapter, else in the model folder; `None`
/// when the model is no reward model.
pub fn value_head_dir(preset: &Preset) -> Option<std::path::PathBuf> {
    let adapters = preset
        .adapter_name_or_path
        .as_deref()
        .map(crate::engine::adapter::parse_adapter_list)
        .unwrap_or_default();
    let dir = match adapters.last() {
        Some(last) => last.clone(),
        None => std::path::PathBuf::from(&preset.model_name_or_path),
    };
    dir.join(crate::engine::value_head::VALUE_HEAD_FILE)
        .is_file()
        .then_some(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_presets_hub_keys_win_over_the_environment() {
        let p = Preset {
            model_name_or_path: "org/model".into(),
            model_revision: "v2".into(),
            cache_dir: Some("/tmp/hub-cache".into()),
            hf_hub_token: Some("hf_preset".into()),
            ..Preset::default()
        };
        let hub = ModelRef::of(&p).hub_options();
        assert_eq!(hub.revision, "v2");
        assert_eq!(hub.cache_dir, std::path::PathBuf::from("/tmp/hub-cache"));
        assert_eq!(hub.token.as_deref(), Some("hf_preset"));
        // Unset keys leave the environment's settings.
        let env = HubOptions::from_env();
        let plain = ModelRef::of(&Preset::default()).hub_options();
        assert_eq!(
            (plain.cache_dir, plain.token, plain.revision),
            (env.cache_dir, env.token, "main".to_string())
        );
    }

    #[test]
    fn a_model_folder_without_a_tokenizer_is_refused_by_both_loaders() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        crate::engine::testing::tiny_llama(&model, 3, &crate::engine::testing::TinyOpts::default())
            .unwrap();
        std::fs::remove_file(model.join("tokenizer.json")).unwrap();
        let p = Preset {
            model_name_or_path: model.display().to_string(),
            ..Preset::default()
        };
        let full = load_model(
            &p,
            config::Purpose::Train,
            DType::F32,
            &Device::Cpu,
            &mut |_| {},
        )
        .err()
        .unwrap();
        let only = load_tokenizer(&p, &mut |_| {}).err().unwrap();
        for err in [full, only] {
            assert!(matches!(err, SourceError::NoTokenizer(_)), "{err}");
            assert!(err.to_string().contains("tokenizer.json"), "{err}");
        }
    }
}
