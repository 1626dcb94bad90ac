//! Value and cross-field rules, as LLaMA-Factory's `__post_init__`s and `parser.py` apply them.
//! Every rule adds to one list: all problems are reported at once.

use super::preset::{
    FinetuningType, IntervalStrategy, PrefLoss, Preset, QuantizationMethod, RopeScalingArg, Stage,
    comma_list,
};
use super::{ConfigIssue, Origin};

/// What the preset is about to be used for: some keys are needed only to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Train,
    Chat,
    Export,
    /// `termtune predict`: generate for the evaluation data and score it.
    Predict,
}

/// Optimizers that are AdamW with decoupled weight decay, which termtune implements.
const ADAMW_NAMES: &[&str] = &["adamw_torch", "adamw_torch_fused", "adamw_hf"];

/// `freeze_trainable_modules`' names over every architecture termtune builds (the engine checks a name against the
/// model it loads, `engine::model::freeze_module_names`; a test keeps the two lists equal).
pub const FREEZE_LAYER_MODULES: &[&str] = &[
    "all",
    "self_attn",
    "mlp",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
];

/// `freeze_extra_modules`' names (lm_head only on an untied model).
pub const FREEZE_EXTRA_MODULES: &[&str] = &["embed_tokens", "norm", "lm_head"];

/// Every problem of `p` for `purpose`. Issues carry the key; [`super::parse`] adds its location.
pub fn validate(p: &Preset, purpose: Purpose) -> Vec<ConfigIssue> {
    let mut out = Vec::new();
    let mut bad = |key: &str, message: String| {
        out.push(ConfigIssue {
            key: key.to_string(),
            message,
            origin: Origin::Preset,
        });
    };

    if p.model_name_or_path.trim().is_empty() {
        bad(
            "model_name_or_path",
            "`model_name_or_path` is required: a hub id (HuggingFaceTB/SmolLM2-135M-Instruct), a local folder or a .gguf file".into(),
        );
    }

    // ### method
    if p.stage == Stage::Ppo {
        bad(
            "stage",
            "`stage: ppo` is not supported yet; termtune trains `sft`, `pt`, `rm`, `dpo` (with `pref_loss` sigmoid, hinge, ipo, orpo or simpo) and `kto`".into(),
        );
    }
    if matches!(p.stage, Stage::Dpo | Stage::Kto | Stage::Rm) {
        validate_preference(p, &mut bad);
    }
    if p.ref_model.is_some() && !p.uses_reference() {
        bad(
            "ref_model",
            format!(
                "`ref_model` is the reference of stages dpo (sigmoid, hinge, ipo) and kto; {} uses none: remove it",
                if p.stage == Stage::Dpo {
                    format!("`pref_loss: {}`", p.pref_loss.as_str())
                } else {
                    format!("`stage: {}`", p.stage.as_str())
                }
            ),
        );
    }
    if p.ref_model_adapters.is_some() && p.ref_model.is_none() {
        bad(
            "ref_model_adapters",
            "`ref_model_adapters` are merged into `ref_model`, which is not set; set `ref_model` (the reference's base) or remove them".into(),
        );
    }
    if let Some(b) = p.ref_model_quantization_bit {
        if p.ref_model.is_none() {
            bad(
                "ref_model_quantization_bit",
                "`ref_model_quantization_bit` quantizes `ref_model`, which is not set (the reference is the base with the adapter off, or a frozen copy of it); set `ref_model` or remove it".into(),
            );
        } else if !matches!(b, 4 | 8) {
            bad(
                "ref_model_quantization_bit",
                format!("`ref_model_quantization_bit` must be 4 or 8 (bitsandbytes), got {b}"),
            );
        } else if p
            .ref_model
            .as_deref()
            .is_some_and(|m| m.to_ascii_lowercase().ends_with(".gguf"))
        {
            bad(
                "ref_model_quantization_bit",
                "the .gguf `ref_model` is already quantized (its blocks stay as they are); remove `ref_model_quantization_bit`".into(),
            );
        }
    }
    match p.quantization_bit {
        None | Some(4 | 8) => {}
        Some(b) => bad(
            "quantization_bit",
            format!("`quantization_bit` must be 4 or 8 (bitsandbytes), got {b}"),
        ),
    }
    if p.rope_scaling == Some(RopeScalingArg::Dynamic) {
        bad(
            "rope_scaling",
            "`rope_scaling: dynamic` is not supported: dynamic NTK changes the RoPE frequencies with each batch's length (transformers keeps the longest seen), and LLaMA-Factory itself warns that it may not work well with fine-tuning; use `linear`, `yarn` or `llama3`".into(),
        );
    }
    if p.quantization_method != QuantizationMethod::Bnb {
        bad(
            "quantization_method",
            format!(
                "`quantization_method: {}` is not supported; termtune quantizes with `bnb` (4-bit NF4/FP4 as bitsandbytes, 8-bit as Q8_0 blocks): set `quantization_method: bnb` or remove it",
                p.quantization_method.as_str()
            ),
        );
    }
    if p.quantization_bit.is_some() {
        if p.finetuning_type != FinetuningType::Lora {
            bad(
                "quantization_bit",
                format!(
                    "a quantized base trains with `finetuning_type: lora` only (LLaMA-Factory's rule); it is `{}`",
                    p.finetuning_type.as_str()
                ),
            );
        }
        if p.model_name_or_path.to_ascii_lowercase().ends_with(".gguf") {
            bad(
                "quantization_bit",
                "the .gguf base is already quantized (its blocks stay as they are); remove `quantization_bit`".into(),
            );
        }
    }
    if p.finetuning_type == FinetuningType::Oft {
        bad(
            "finetuning_type",
            "`finetuning_type: oft` is not supported yet; use lora, freeze or full".into(),
        );
    }
    let lora = p.finetuning_type == FinetuningType::Lora;
    if p.lora_rank == 0 {
        bad("lora_rank", "`lora_rank` must be at least 1".into());
    }
    if p.lora_alpha == Some(0) {
        bad(
            "lora_alpha",
            "`lora_alpha` must be at least 1 (remove it for the default 2 x lora_rank)".into(),
        );
    }
    if !(0.0..1.0).contains(&p.lora_dropout) {
        bad(
            "lora_dropout",
            format!("`lora_dropout` must be in [0, 1), got {}", p.lora_dropout),
        );
    }
    let targets = comma_list(&p.lora_target);
    if targets.is_empty() {
        bad(
            "lora_target",
            "`lora_target` is empty; use `all` or module names like q_proj,v_proj".into(),
        );
    }
    for t in &targets {
        if !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bad(
                "lora_target",
                format!(
                    "`lora_target`: {t:?} is not a module name (write names like q_proj,v_proj, comma separated)"
                ),
            );
        }
        if t == "lm_head" {
            bad(
                "lora_target",
                "`lora_target`: LoRA on lm_head is not supported; leave it out".into(),
            );
        }
    }
    if p.use_rslora && !lora {
        bad(
            "use_rslora",
            "`use_rslora` is only valid for LoRA training (finetuning_type: lora)".into(),
        );
    }
    if p.use_dora && !lora {
        bad(
            "use_dora",
            "`use_dora` is only valid for LoRA training (finetuning_type: lora)".into(),
        );
    }
    if let Some(r) = p.loraplus_lr_ratio {
        if !lora {
            bad(
                "loraplus_lr_ratio",
                "`loraplus_lr_ratio` is only valid for LoRA training (finetuning_type: lora)"
                    .into(),
            );
        } else if !(r.is_finite() && r > 0.0) {
            bad(
                "loraplus_lr_ratio",
                format!("`loraplus_lr_ratio` must be a positive number (16 is usual), got {r}"),
            );
        }
    }
    validate_pissa(p, &mut bad);
    if p.use_muon && p.loraplus_lr_ratio.is_some() {
        bad(
            "use_muon",
            "`use_muon` and `loraplus_lr_ratio` each choose the optimizer (LLaMA-Factory would silently use LoRA+'s AdamW): set one of them".into(),
        );
    }
    if p.adapter_name_or_path.is_some() && !lora {
        bad(
            "adapter_name_or_path",
            "`adapter_name_or_path` is only valid with `finetuning_type: lora`".into(),
        );
    }
    if p.finetuning_type == FinetuningType::Freeze {
        for (key, list, known) in [
            (
                "freeze_trainable_modules",
                Some(p.freeze_trainable_modules.as_str()),
                FREEZE_LAYER_MODULES,
            ),
            (
                "freeze_extra_modules",
                p.freeze_extra_modules.as_deref(),
                FREEZE_EXTRA_MODULES,
            ),
        ] {
            let names = list.map(comma_list).unwrap_or_default();
            if key == "freeze_trainable_modules" && names.is_empty() {
                bad(
                    key,
                    "`freeze_trainable_modules` is empty: name `all` or the parts to train".into(),
                );
            }
            for m in names {
                if !known.contains(&m.as_str()) {
                    bad(
                        key,
                        format!(
                            "`{key}`: unknown module `{m}`; choose from {}",
                            known.join(", ")
                        ),
                    );
                }
            }
        }
    }
    if p.finetuning_type == FinetuningType::Freeze && p.freeze_trainable_layers == 0 {
        bad(
            "freeze_trainable_layers",
            "`freeze_trainable_layers` must not be 0 (n > 0: the last n layers, n < 0: the first n)".into(),
        );
    }

    // ### dataset
    for (key, on) in [
        ("neat_packing", p.neat_packing),
        ("train_on_prompt", p.train_on_prompt),
        ("mask_history", p.mask_history),
    ] {
        if on && p.stage != Stage::Sft {
            bad(key, format!("`{key}` is only valid for `stage: sft`"));
        }
    }
    if p.mask_history && p.train_on_prompt {
        bad(
            "mask_history",
            "`mask_history` is incompatible with `train_on_prompt`; set one of them to false"
                .into(),
        );
    }
    if p.cutoff_len == 0 {
        bad("cutoff_len", "`cutoff_len` must be at least 1".into());
    }
    if p.max_samples == Some(0) {
        bad(
            "max_samples",
            "`max_samples` must be at least 1 (remove it to use every example)".into(),
        );
    }
    if p.val_size < 0.0 || (p.val_size >= 1.0 && p.val_size.fract() != 0.0) {
        bad(
            "val_size",
            format!(
                "`val_size` must be a fraction in [0, 1) or a whole number of examples, got {}",
                p.val_size
            ),
        );
    }
    if p.streaming && p.max_steps <= 0 {
        bad(
            "streaming",
            "`streaming: true` needs `max_steps` (the number of examples is unknown in advance)"
                .into(),
        );
    }
    if p.streaming && p.val_size > 0.0 && p.val_size < 1.0 {
        bad(
            "val_size",
            "with `streaming: true`, `val_size` must be a whole number of examples".into(),
        );
    }
    if p.mix_strategy == super::preset::MixStrategy::InterleaveOnce {
        bad(
            "mix_strategy",
            "`mix_strategy: interleave_once` is not supported yet; use concat, interleave_under or interleave_over".into(),
        );
    }
    if purpose == Purpose::Predict {
        if !p.has_validation_split() {
            bad(
                "eval_dataset",
                "`termtune predict` scores `eval_dataset` (LLaMA-Factory's predict data): name it, e.g. `eval_dataset=alpaca_en_demo`, or hold out part of `dataset` with `val_size`".into(),
            );
        }
        if p.predict_with_generate == Some(false) {
            bad(
                "predict_with_generate",
                "`predict_with_generate: false` asks for the loss alone, which training reports as eval_loss; `termtune predict` generates: set it to true or remove it".into(),
            );
        }
    }
    if purpose == Purpose::Train && p.do_predict && !p.has_validation_split() {
        bad(
            "do_predict",
            "`do_predict: true` predicts on `eval_dataset` after training, but there is none: name it, or hold out part of `dataset` with `val_size`".into(),
        );
    }
    if purpose == Purpose::Train && p.datasets().is_empty() {
        bad(
            "dataset",
            "`dataset` is required to train: names from dataset_dir/dataset_info.json, comma separated".into(),
        );
    }

    // ### output / train
    if p.logging_steps == 0 {
        bad("logging_steps", "`logging_steps` must be at least 1".into());
    }
    if p.save_steps == 0 {
        bad("save_steps", "`save_steps` must be at least 1".into());
    }
    if p.save_total_limit == Some(0) {
        bad(
            "save_total_limit",
            "`save_total_limit` must be at least 1 (remove it to keep every checkpoint)".into(),
        );
    }
    if p.save_strategy == IntervalStrategy::Best {
        bad(
            "save_strategy",
            "`save_strategy: best` is not supported yet; use steps, epoch or no".into(),
        );
    }
    if p.per_device_train_batch_size == 0 {
        bad(
            "per_device_train_batch_size",
            "`per_device_train_batch_size` must be at least 1".into(),
        );
    }
    if p.per_device_eval_batch_size == 0 {
        bad(
            "per_device_eval_batch_size",
            "`per_device_eval_batch_size` must be at least 1".into(),
        );
    }
    if p.gradient_accumulation_steps == 0 {
        bad(
            "gradient_accumulation_steps",
            "`gradient_accumulation_steps` must be at least 1".into(),
        );
    }
    if p.learning_rate.is_nan() || p.learning_rate <= 0.0 {
        bad(
            "learning_rate",
            format!("`learning_rate` must be > 0, got {}", p.learning_rate),
        );
    }
    if p.max_steps <= 0 && (p.num_train_epochs.is_nan() || p.num_train_epochs <= 0.0) {
        bad(
            "num_train_epochs",
            "`num_train_epochs` must be > 0 (or set `max_steps`)".into(),
        );
    }
    if !p.lr_scheduler_type.is_supported() {
        bad(
            "lr_scheduler_type",
            "`reduce_lr_on_plateau` is not supported yet; use linear, cosine, cosine_with_restarts, cosine_with_min_lr, polynomial, constant, constant_with_warmup, inverse_sqrt or warmup_stable_decay".into(),
        );
    } else {
        for (key, message) in scheduler_kwargs_problems(p) {
            bad(key, message);
        }
    }
    if !(0.0..=1.0).contains(&p.warmup_ratio) {
        bad(
            "warmup_ratio",
            format!("`warmup_ratio` must be in [0, 1], got {}", p.warmup_ratio),
        );
    }
    if let Some(a) = p.neftune_noise_alpha
        && !(a.is_finite() && a >= 0.0)
    {
        bad(
            "neftune_noise_alpha",
            format!("`neftune_noise_alpha` must be a number ≥ 0 (5 is usual), got {a}"),
        );
    }
    let eps = p.label_smoothing_factor;
    if !(eps.is_finite() && (0.0..1.0).contains(&eps)) {
        bad(
            "label_smoothing_factor",
            format!("`label_smoothing_factor` must be in [0, 1) (0.1 is usual), got {eps}"),
        );
    } else if eps > 0.0 && !matches!(p.stage, Stage::Sft | Stage::Pt) {
        bad(
            "label_smoothing_factor",
            format!(
                "`label_smoothing_factor` smooths the language-model loss of sft and pt; stage `{}` computes its own loss (TRL's), so it would have no effect: remove it",
                serde_json::to_value(p.stage)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
        );
    }
    if p.use_dft_loss && p.stage != Stage::Sft {
        bad(
            "use_dft_loss",
            "`use_dft_loss` is LLaMA-Factory's SFT loss: set `stage: sft` or remove it".into(),
        );
    } else if p.use_dft_loss && p.label_smoothing_factor > 0.0 {
        bad(
            "use_dft_loss",
            "`use_dft_loss` replaces the loss, so `label_smoothing_factor` would be ignored (as in LLaMA-Factory): set one of them".into(),
        );
    }
    if p.use_eaft_loss {
        if p.stage != Stage::Sft {
            bad(
                "use_eaft_loss",
                "`use_eaft_loss` is LLaMA-Factory's SFT loss: set `stage: sft` or remove it".into(),
            );
        } else if p.use_dft_loss {
            bad(
                "use_eaft_loss",
                "`use_dft_loss` and `use_eaft_loss` each replace the loss (LLaMA-Factory would silently use DFT): set one of them".into(),
            );
        } else if p.label_smoothing_factor > 0.0 {
            bad(
                "use_eaft_loss",
                "`use_eaft_loss` replaces the loss, so `label_smoothing_factor` would be ignored (as in LLaMA-Factory): set one of them".into(),
            );
        }
    }
    if !(p.eaft_alpha.is_finite() && p.eaft_alpha >= 0.0) {
        bad(
            "eaft_alpha",
            format!(
                "`eaft_alpha` must be a number ≥ 0 (1.0 is LLaMA-Factory's default), got {}",
                p.eaft_alpha
            ),
        );
    }
    if p.weight_decay < 0.0 {
        bad("weight_decay", "`weight_decay` must be ≥ 0".into());
    }
    for (key, v) in [("adam_beta1", p.adam_beta1), ("adam_beta2", p.adam_beta2)] {
        if !(0.0..1.0).contains(&v) {
            bad(key, format!("`{key}` must be in [0, 1), got {v}"));
        }
    }
    if p.adam_epsilon <= 0.0 {
        bad("adam_epsilon", "`adam_epsilon` must be > 0".into());
    }
    if p.max_grad_norm < 0.0 {
        bad(
            "max_grad_norm",
            "`max_grad_norm` must be ≥ 0 (0 disables clipping)".into(),
        );
    }
    if !ADAMW_NAMES.contains(&p.optim.as_str()) {
        bad(
            "optim",
            format!(
                "`optim: {}` is not supported yet; termtune's optimizer is AdamW (adamw_torch)",
                p.optim
            ),
        );
    }
    if p.bf16 && p.fp16 {
        bad("fp16", "`bf16` and `fp16` cannot both be true".into());
    }
    if p.pure_bf16 && p.fp16 {
        bad(
            "pure_bf16",
            "`pure_bf16` and `fp16` cannot both be true".into(),
        );
    }

    // ### eval
    if p.eval_strategy == IntervalStrategy::Best {
        bad(
            "eval_strategy",
            "`eval_strategy: best` is not valid; use no, steps or epoch".into(),
        );
    }
    let has_val = p.has_validation_split();
    if p.eval_strategy != IntervalStrategy::No && !has_val && purpose == Purpose::Train {
        bad(
            "eval_strategy",
            "`eval_strategy` asks for evaluation but there is no validation split: set `val_size` or `eval_dataset`".into(),
        );
    }
    if p.eval_steps == Some(0) {
        bad("eval_steps", "`eval_steps` must be at least 1".into());
    }
    if p.early_stopping_steps == Some(0) {
        bad(
            "early_stopping_steps",
            "`early_stopping_steps` must be at least 1 (evaluations without improvement)".into(),
        );
    } else if p.early_stopping_steps.is_some() && !p.load_best_model_at_end {
        bad(
            "early_stopping_steps",
            "`early_stopping_steps` needs `load_best_model_at_end: true` (as the Hugging Face Trainer's EarlyStoppingCallback)".into(),
        );
    }
    if p.load_best_model_at_end && purpose == Purpose::Train {
        if p.stage == Stage::Rm {
            // LLaMA-Factory refuses it for rm (the value head is saved beside the adapter, not restored with it).
            bad(
                "load_best_model_at_end",
                "`load_best_model_at_end` is not available for `stage: rm` (as in LLaMA-Factory): remove it".into(),
            );
        } else if p.eval_strategy == IntervalStrategy::No {
            bad(
                "load_best_model_at_end",
                "`load_best_model_at_end` needs evaluations: set `eval_strategy: steps` (or epoch) and `val_size` or `eval_dataset`".into(),
            );
        } else if p.save_strategy != p.eval_strategy {
            bad(
                "load_best_model_at_end",
                format!(
                    "`load_best_model_at_end` needs `save_strategy` to match `eval_strategy` ({}), so that each evaluated step has its checkpoint",
                    format!("{:?}", p.eval_strategy).to_lowercase()
                ),
            );
        } else if p.eval_strategy == IntervalStrategy::Steps
            && !p.save_steps.is_multiple_of(p.eval_steps_resolved().max(1))
        {
            bad(
                "save_steps",
                format!(
                    "with `load_best_model_at_end`, `save_steps` ({}) must be a multiple of `eval_steps` ({})",
                    p.save_steps,
                    p.eval_steps_resolved()
                ),
            );
        }
    }
    if p.load_best_model_at_end || p.metric_for_best_model.is_some() {
        let (metric, _) = p.best_metric();
        let stage_metric = matches!(p.stage, Stage::Dpo | Stage::Kto)
            && ["eval_rewards/", "eval_logps/", "eval_logits/"]
                .iter()
                .any(|pre| metric.starts_with(pre));
        let accuracy = metric == "eval_accuracy" && p.compute_accuracy;
        if !(metric == "eval_loss" || accuracy || stage_metric) {
            bad(
                "metric_for_best_model",
                format!(
                    "`metric_for_best_model: {}` is not a metric this run evaluates: use loss, accuracy (with `compute_accuracy: true`) or, for dpo and kto, a stage metric such as rewards/accuracies",
                    p.metric_for_best_model.as_deref().unwrap_or("loss")
                ),
            );
        }
    }

    // ### generation
    if p.temperature < 0.0 {
        bad(
            "temperature",
            "`temperature` must be ≥ 0 (0 is greedy)".into(),
        );
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        bad(
            "top_p",
            format!("`top_p` must be in (0, 1], got {}", p.top_p),
        );
    }
    if p.repetition_penalty <= 0.0 {
        bad(
            "repetition_penalty",
            "`repetition_penalty` must be > 0 (1.0 disables it)".into(),
        );
    }
    if p.max_new_tokens == 0 {
        bad(
            "max_new_tokens",
            "`max_new_tokens` must be at least 1".into(),
        );
    }

    // ### export
    if p.export_size.is_nan() || p.export_size <= 0.0 {
        bad(
            "export_size",
            "`export_size` (GB per shard) must be > 0".into(),
        );
    }
    if purpose == Purpose::Export
        && p.export_format == super::preset::ExportFormat::Gguf
        && p.rope_scaling == Some(RopeScalingArg::Yarn)
    {
        bad(
            "rope_scaling",
            "GGUF export does not write YaRN RoPE scaling yet: set `export_format: safetensors`, or train with `rope_scaling: linear`".into(),
        );
    }
    if purpose == Purpose::Export && p.export_dir.is_none() {
        bad(
            "export_dir",
            "`export_dir` is required to export: the folder to write the merged model to".into(),
        );
    }
    out
}

/// The keys of stages dpo, kto and rm (LLaMA-Factory's `FinetuningArguments` and TRL's rules).
fn validate_preference(p: &Preset, bad: &mut impl FnMut(&str, String)) {
    let stage = p.stage.as_str();
    let mut positive = Vec::new();
    if p.stage != Stage::Rm {
        positive.push(("pref_beta", p.pref_beta));
        if !(p.pref_ftx.is_finite() && p.pref_ftx >= 0.0) {
            bad(
                "pref_ftx",
                format!("`pref_ftx` must be 0 or more, got {}", p.pref_ftx),
            );
        }
    }
    if p.stage == Stage::Kto {
        positive.push(("kto_chosen_weight", p.kto_chosen_weight));
        positive.push(("kto_rejected_weight", p.kto_rejected_weight));
    }
    for (key, v) in positive {
        if !(v.is_finite() && v > 0.0) {
            bad(key, format!("`{key}` must be a positive number, got {v}"));
        }
    }
    if p.stage == Stage::Dpo {
        validate_dpo_loss(p, bad);
    }
    if p.packing == Some(true) {
        bad(
            "packing",
            format!(
                "`packing` does not apply to `stage: {stage}` (each answer is its own sequence); remove it"
            ),
        );
    }
    if p.compute_accuracy {
        bad(
            "compute_accuracy",
            format!(
                "`compute_accuracy` is for `stage: sft`; a {stage} evaluation logs {}",
                if p.stage == Stage::Rm {
                    "`eval_accuracy` by itself"
                } else {
                    "`eval_rewards/*`"
                }
            ),
        );
    }
    if p.do_predict {
        bad(
            "do_predict",
            format!(
                "`do_predict` is for `stage: sft` here; run `termtune predict` on the trained adapter with `stage: sft`{}",
                if p.stage == Stage::Rm {
                    ", or `termtune score` for the reward model's scores"
                } else {
                    ""
                }
            ),
        );
    }
}

/// `pref_loss` and its options (stage dpo).
fn validate_dpo_loss(p: &Preset, bad: &mut impl FnMut(&str, String)) {
    if !(0.0..=0.5).contains(&p.dpo_label_smoothing) {
        bad(
            "dpo_label_smoothing",
            format!(
                "`dpo_label_smoothing` must be in [0, 0.5], got {}",
                p.dpo_label_smoothing
            ),
        );
    } else if p.dpo_label_smoothing > 0.0 && p.pref_loss != PrefLoss::Sigmoid {
        bad(
            "dpo_label_smoothing",
            format!(
                "`dpo_label_smoothing` applies to `pref_loss: sigmoid` only (it is `{}`); remove it",
                p.pref_loss.as_str()
            ),
        );
    }
    if !p.pref_bco_weight.is_finite() || p.pref_bco_weight < 0.0 {
        bad(
            "pref_bco_weight",
            format!(
                "`pref_bco_weight` must be a number ≥ 0 (0: no BCO term), got {}",
                p.pref_bco_weight
            ),
        );
    } else if p.pref_bco_weight > 1e-6 && matches!(p.pref_loss, PrefLoss::Orpo | PrefLoss::Simpo) {
        bad(
            "pref_bco_weight",
            format!(
                "`pref_bco_weight` mixes BCO into the losses with a reference model (sigmoid, hinge, ipo); `pref_loss: {}` has none, so it would do nothing: remove it",
                p.pref_loss.as_str()
            ),
        );
    }
    if let Some(a) = p.ld_alpha
        && !(0.0..=1.0).contains(&a)
    {
        bad(
            "ld_alpha",
            format!(
                "`ld_alpha` must be in [0, 1] (LD-DPO's weight of the longer answer's extra tokens), got {a}"
            ),
        );
    }
    if !p.simpo_gamma.is_finite() {
        bad(
            "simpo_gamma",
            format!("`simpo_gamma` must be a number, got {}", p.simpo_gamma),
        );
    }
    if p.pref_loss == PrefLoss::KtoPair {
        bad(
            "pref_loss",
            "`pref_loss: kto_pair` was removed from TRL (LLaMA-Factory's trainer no longer runs it); use sigmoid, hinge, ipo, orpo or simpo, or `stage: kto` for unpaired data".into(),
        );
    }
}

/// `lr_scheduler_kwargs` checked against what the schedule's transformers function takes (an unknown key is a
/// TypeError there; a missing required one a ValueError).
fn scheduler_kwargs_problems(p: &Preset) -> Vec<(&'static str, String)> {
    use super::preset::{SchedulerArg, SchedulerType as S};
    let (allowed, required): (&[&str], &[&str]) = match p.lr_scheduler_type {
        S::Cosine | S::CosineWithRestarts => (&["num_cycles"], &[]),
        S::Polynomial => (&["power", "lr_end"], &[]),
        S::InverseSqrt => (&["timescale"], &[]),
        S::CosineWithMinLr => (&["num_cycles", "min_lr", "min_lr_rate"], &[]),
        S::WarmupStableDecay => (
            &[
                "num_decay_steps",
                "num_stable_steps",
                "min_lr_ratio",
                "num_cycles",
                "warmup_type",
                "decay_type",
            ],
            &["num_decay_steps"],
        ),
        S::Linear | S::Constant | S::ConstantWithWarmup | S::ReduceLrOnPlateau => (&[], &[]),
    };
    let kind = serde_json::to_value(p.lr_scheduler_type)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let takes = if allowed.is_empty() {
        "takes none".to_string()
    } else {
        format!("takes {}", allowed.join(", "))
    };
    let mut out = Vec::new();
    let kw = &p.lr_scheduler_kwargs;
    for (k, v) in kw {
        if !allowed.contains(&k.as_str()) {
            out.push((
                "lr_scheduler_kwargs",
                format!("`lr_scheduler_kwargs`: `{k}` is not a setting of `{kind}` (it {takes})"),
            ));
            continue;
        }
        let curve = matches!(k.as_str(), "warmup_type" | "decay_type");
        match (v, curve) {
            (SchedulerArg::Text(t), true)
                if matches!(t.as_str(), "linear" | "cosine" | "1-sqrt") => {}
            (_, true) => out.push((
                "lr_scheduler_kwargs",
                format!("`lr_scheduler_kwargs`: `{k}` must be linear, cosine or 1-sqrt"),
            )),
            (SchedulerArg::Text(t), false) => out.push((
                "lr_scheduler_kwargs",
                format!("`lr_scheduler_kwargs`: `{k}` must be a number, got `{t}`"),
            )),
            (SchedulerArg::Number(x), false) => {
                let whole = matches!(
                    k.as_str(),
                    "num_decay_steps" | "num_stable_steps" | "timescale"
                );
                if !x.is_finite() || *x < 0.0 || (whole && x.fract() != 0.0) {
                    out.push((
                        "lr_scheduler_kwargs",
                        format!(
                            "`lr_scheduler_kwargs`: `{k}` must be {} ≥ 0, got {x}",
                            if whole { "a whole number" } else { "a number" }
                        ),
                    ));
                }
            }
        }
    }
    for r in required {
        if !kw.contains_key(*r) {
            out.push((
                "lr_scheduler_kwargs",
                format!("`{kind}` needs `lr_scheduler_kwargs: {{{r}: N}}` (the steps of the final decay)"),
            ));
        }
    }
    if p.lr_scheduler_type == S::CosineWithMinLr {
        match (kw.contains_key("min_lr"), kw.contains_key("min_lr_rate")) {
            (true, true) => out.push((
                "lr_scheduler_kwargs",
                "`cosine_with_min_lr`: set one of `min_lr` and `min_lr_rate`, not both".into(),
            )),
            (false, false) => out.push((
                "lr_scheduler_kwargs",
                "`cosine_with_min_lr` needs `lr_scheduler_kwargs: {min_lr_rate: 0.1}` (the floor as a fraction of learning_rate) or `{min_lr: 1.0e-6}`".into(),
            )),
            _ => {}
        }
    }
    out
}

/// PiSSA's keys: LLaMA-Factory's rules (LoRA only, not on a quantized base, not where the reference is the base
/// with the adapter off, which PiSSA turns into the residual), and termtune's where LLaMA-Factory would silently do
/// something else (`pissa_init` beside an adapter it continues, `pissa_convert` without PiSSA).
fn validate_pissa(p: &Preset, bad: &mut impl FnMut(&str, String)) {
    if p.pissa_iter < -1 {
        bad(
            "pissa_iter",
            format!(
                "`pissa_iter` is the randomized SVD's number of subspace iterations (16 by default), or -1 for the exact SVD; got {}",
                p.pissa_iter
            ),
        );
    }
    if p.pissa_convert && !p.pissa_init {
        bad(
            "pissa_convert",
            "`pissa_convert` converts a PiSSA adapter into a plain LoRA: set `pissa_init: true` or remove it".into(),
        );
    }
    if !p.pissa_init {
        return;
    }
    if p.finetuning_type != FinetuningType::Lora {
        bad(
            "pissa_init",
            "`pissa_init` is only valid for LoRA training (finetuning_type: lora)".into(),
        );
        return;
    }
    if p.quantization_bit.is_some() {
        bad(
            "pissa_init",
            "PiSSA cannot start from a quantized base (LLaMA-Factory's rule: the residual must stay in 16 bits); remove `quantization_bit` or `pissa_init`".into(),
        );
    }
    if p.uses_reference() && p.ref_model.is_none() {
        bad(
            "pissa_init",
            format!(
                "stage {} scores against the base with the adapter off, which PiSSA makes the residual model; set `ref_model` to the base's path, or remove `pissa_init`",
                p.stage.as_str()
            ),
        );
    }
    if p.adapter_name_or_path.is_some() && !p.create_new_adapter {
        bad(
            "pissa_init",
            "with `adapter_name_or_path` the run continues that adapter (its own adapter_config.json says how it started); set `create_new_adapter: true` to start a PiSSA adapter on the merged model, or remove `pissa_init`".into(),
        );
    }
}
