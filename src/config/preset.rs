//! The preset: LLaMA-Factory's flat argument names with LLaMA-Factory's (and Hugging Face's) defaults.
//!
//! Every field here is an *implemented* key of [`super::keys::KEYS`]; a test keeps the two in step.
//! What each key does is written once, as the `help` of its [`super::keys::KeySpec`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Training stage (`stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Pt,
    #[default]
    Sft,
    Rm,
    Ppo,
    Dpo,
    Kto,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pt => "pt",
            Stage::Sft => "sft",
            Stage::Rm => "rm",
            Stage::Ppo => "ppo",
            Stage::Dpo => "dpo",
            Stage::Kto => "kto",
        }
    }
}

/// The preference loss of `stage: dpo` (`pref_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrefLoss {
    #[default]
    Sigmoid,
    Hinge,
    Ipo,
    KtoPair,
    Orpo,
    Simpo,
}

impl PrefLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            PrefLoss::Sigmoid => "sigmoid",
            PrefLoss::Hinge => "hinge",
            PrefLoss::Ipo => "ipo",
            PrefLoss::KtoPair => "kto_pair",
            PrefLoss::Orpo => "orpo",
            PrefLoss::Simpo => "simpo",
        }
    }

    /// ORPO and SimPO need no reference model (LLaMA-Factory's `use_ref_model`).
    pub fn uses_reference(self) -> bool {
        !matches!(self, PrefLoss::Orpo | PrefLoss::Simpo)
    }

    /// IPO, ORPO and SimPO average the log-probabilities over the answer's tokens; the others sum them.
    pub fn averages_logps(self) -> bool {
        matches!(self, PrefLoss::Ipo | PrefLoss::Orpo | PrefLoss::Simpo)
    }
}

/// What is trained (`finetuning_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FinetuningType {
    #[default]
    Lora,
    Oft,
    Freeze,
    Full,
}

impl FinetuningType {
    pub fn as_str(self) -> &'static str {
        match self {
            FinetuningType::Lora => "lora",
            FinetuningType::Oft => "oft",
            FinetuningType::Freeze => "freeze",
            FinetuningType::Full => "full",
        }
    }
}

/// One value of `lr_scheduler_kwargs`: a number (`min_lr_rate: 0.1`) or a name (`decay_type: linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SchedulerArg {
    Number(f64),
    Text(String),
}

impl SchedulerArg {
    pub fn number(&self) -> Option<f64> {
        match self {
            SchedulerArg::Number(v) => Some(*v),
            SchedulerArg::Text(_) => None,
        }
    }
}

/// Learning-rate schedule (`lr_scheduler_type`), Hugging Face's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    #[default]
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    Constant,
    ConstantWithWarmup,
    InverseSqrt,
    ReduceLrOnPlateau,
    CosineWithMinLr,
    WarmupStableDecay,
}

impl SchedulerType {
    /// The schedules termtune computes.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            SchedulerType::Linear
                | SchedulerType::Cosine
                | SchedulerType::CosineWithRestarts
                | SchedulerType::Polynomial
                | SchedulerType::Constant
                | SchedulerType::ConstantWithWarmup
                | SchedulerType::InverseSqrt
                | SchedulerType::CosineWithMinLr
                | SchedulerType::WarmupStableDecay
        )
    }
}

/// How several datasets are combined (`mix_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MixStrategy {
    #[default]
    Concat,
    InterleaveUnder,
    InterleaveOver,
    InterleaveOnce,
}

/// `save_strategy` / `eval_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntervalStrategy {
    No,
    Steps,
    Epoch,
    Best,
}

/// `infer_dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InferDtype {
    #[default]
    Auto,
    Float32,
    Float16,
    Bfloat16,
}

/// `quantization_method`: how `quantization_bit` quantizes the base at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QuantizationMethod {
    /// bitsandbytes' schemes (4-bit NF4/FP4; termtune's 8-bit is Q8_0 blocks).
    #[default]
    Bnb,
    Hqq,
    Eetq,
    Gptq,
    Awq,
    Aqlm,
    Quanto,
    Mxfp4,
    Fp8,
}

impl QuantizationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bnb => "bnb",
            Self::Hqq => "hqq",
            Self::Eetq => "eetq",
            Self::Gptq => "gptq",
            Self::Awq => "awq",
            Self::Aqlm => "aqlm",
            Self::Quanto => "quanto",
            Self::Mxfp4 => "mxfp4",
            Self::Fp8 => "fp8",
        }
    }
}

/// `quantization_type`: the 4-bit code of `quantization_bit: 4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QuantizationType {
    /// NormalFloat4 (QLoRA's data type).
    #[default]
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bits).
    Fp4,
}

/// `rope_scaling`: extend the model's context with this RoPE scaling (LLaMA-Factory's `configure_rope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeScalingArg {
    Linear,
    /// Refused: its frequencies change with each batch's length.
    Dynamic,
    Yarn,
    Llama3,
}

impl RopeScalingArg {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Dynamic => "dynamic",
            Self::Yarn => "yarn",
            Self::Llama3 => "llama3",
        }
    }
}

/// `export_format` (termtune only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    #[default]
    Safetensors,
    Gguf,
}

/// `export_gguf_type` (termtune only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum GgufType {
    #[serde(rename = "f32")]
    F32,
    #[default]
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_1")]
    Q4_1,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output (or a tied embedding) and for the attn_v and
    /// ffn_down of the layers `use_more_bits` picks.
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

/// A preset, with defaults filled in. `Option` fields are those whose absence means something
/// (`lora_alpha: None` is 2 x rank, `template: None` is the tokenizer's own template, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Preset {
    // ### model
    pub model_name_or_path: String,
    pub adapter_name_or_path: Option<String>,
    pub adapter_folder: Option<String>,
    pub cache_dir: Option<String>,
    pub model_revision: String,
    pub hf_hub_token: Option<String>,
    pub infer_dtype: InferDtype,
    pub quantization_bit: Option<u32>,
    pub quantization_method: QuantizationMethod,
    pub quantization_type: QuantizationType,
    pub double_quantization: bool,
    /// termtune only: load a GGUF base dequantized (transformers' numbers) instead of in its block types.
    pub gguf_dequantize: bool,
    /// `rope_scaling`: extend the context (None: the model's own RoPE).
    pub rope_scaling: Option<RopeScalingArg>,
    pub identity_name: Option<String>,
    pub identity_author: Option<String>,
    pub disable_gradient_checkpointing: bool,
    // ### method
    pub stage: Stage,
    pub finetuning_type: FinetuningType,
    pub lora_rank: u32,
    pub lora_alpha: Option<u32>,
    pub lora_dropout: f64,
    pub lora_target: String,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// LoRA+: lora_B's learning rate is `learning_rate × loraplus_lr_ratio` (None: one learning rate).
    pub loraplus_lr_ratio: Option<f64>,
    /// PiSSA (`pissa_init`): a new adapter starts from the weights' principal part, the base keeps the residual.
    pub pissa_init: bool,
    /// `pissa_iter`: the randomized SVD's subspace iterations, or -1 for the exact SVD.
    pub pissa_iter: i64,
    /// `pissa_convert`: also write `pissa_init/` and `pissa_converted/` (a plain LoRA on the original base).
    pub pissa_convert: bool,
    /// `use_muon`: LLaMA-Factory's Muon optimizer in place of AdamW.
    pub use_muon: bool,
    pub create_new_adapter: bool,
    pub freeze_trainable_layers: i64,
    /// `freeze_trainable_modules`: comma separated, `all` by default.
    pub freeze_trainable_modules: String,
    /// `freeze_extra_modules`: comma separated, none by default.
    pub freeze_extra_modules: Option<String>,
    pub pref_beta: f64,
    pub pref_ftx: f64,
    pub pref_loss: PrefLoss,
    pub dpo_label_smoothing: f64,
    pub simpo_gamma: f64,
    /// `ld_alpha` (LD-DPO): None, or the weight in [0, 1] of the longer answer's tokens past the shorter one's length.
    pub ld_alpha: Option<f64>,
    /// `pref_bco_weight`: BCO's loss mixed into dpo's losses with a reference, (dpo + w·bco) / (1 + w).
    pub pref_bco_weight: f64,
    pub kto_chosen_weight: f64,
    pub kto_rejected_weight: f64,
    pub ref_model: Option<String>,
    pub ref_model_adapters: Option<String>,
    /// `ref_model_quantization_bit`: `ref_model`'s decoder linears quantized as `quantization_bit` quantizes the
    /// base (4 or 8; `quantization_type`, `double_quantization`).
    pub ref_model_quantization_bit: Option<u32>,
    // ### dataset
    pub dataset: Option<String>,
    pub eval_dataset: Option<String>,
    pub dataset_dir: String,
    pub template: Option<String>,
    pub cutoff_len: usize,
    pub max_samples: Option<usize>,
    pub val_size: f64,
    pub train_on_prompt: bool,
    pub mask_history: bool,
    pub packing: Option<bool>,
    pub neat_packing: bool,
    pub streaming: bool,
    pub buffer_size: usize,
    pub mix_strategy: MixStrategy,
    pub interleave_probs: Option<String>,
    pub default_system: Option<String>,
    pub enable_thinking: bool,
    pub preserve_thinking: bool,
    pub tool_format: Option<String>,
    pub tokenized_path: Option<String>,
    pub overwrite_cache: bool,
    // ### output
    pub output_dir: String,
    pub logging_steps: u64,
    pub save_steps: u64,
    pub save_strategy: IntervalStrategy,
    pub save_total_limit: Option<u32>,
    pub overwrite_output_dir: bool,
    pub resume_from_checkpoint: Option<String>,
    // ### train
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub lr_scheduler_type: SchedulerType,
    pub lr_scheduler_kwargs: BTreeMap<String, SchedulerArg>,
    pub warmup_ratio: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    /// NEFTune's alpha: noise on the input embeddings while training (None: off).
    pub neftune_noise_alpha: Option<f64>,
    pub label_smoothing_factor: f64,
    /// LLaMA-Factory's DFT loss (stage sft).
    pub use_dft_loss: bool,
    /// LLaMA-Factory's EAFT loss (stage sft): each token's cross-entropy times (top-20 entropy / 3)^eaft_alpha.
    pub use_eaft_loss: bool,
    pub eaft_alpha: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub optim: String,
    pub seed: u64,
    pub data_seed: Option<u64>,
    pub bf16: bool,
    pub fp16: bool,
    pub pure_bf16: bool,
    pub group_by_length: bool,
    pub num_threads: usize,
    // ### eval
    pub eval_strategy: IntervalStrategy,
    pub eval_steps: Option<u64>,
    pub per_device_eval_batch_size: usize,
    pub do_predict: bool,
    pub compute_accuracy: bool,
    /// Keep the best checkpoint's weights at the end (Hugging Face's `load_best_model_at_end`).
    pub load_best_model_at_end: bool,
    /// The metric that ranks checkpoints (None: eval_loss).
    pub metric_for_best_model: Option<String>,
    /// None: the metric's default direction ([`Preset::best_metric`]).
    pub greater_is_better: Option<bool>,
    /// Evaluations without improvement before the run stops (`EarlyStoppingCallback`'s patience).
    pub early_stopping_steps: Option<u64>,
    /// Train in dataset order (LLaMA-Factory's `SequentialSampler`).
    pub disable_shuffling: bool,
    pub predict_with_generate: Option<bool>,
    // ### generation
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub max_length: usize,
    pub repetition_penalty: f64,
    pub skip_special_tokens: bool,
    // ### export
    pub export_dir: Option<String>,
    pub export_size: f64,
    pub export_format: ExportFormat,
    pub export_gguf_type: GgufType,
}

impl Default for Preset {
    fn default() -> Self {
        Preset {
            model_name_or_path: String::new(),
            adapter_name_or_path: None,
            adapter_folder: None,
            cache_dir: None,
            model_revision: "main".into(),
            hf_hub_token: None,
            infer_dtype: InferDtype::Auto,
            quantization_bit: None,
            quantization_method: QuantizationMethod::Bnb,
            quantization_type: QuantizationType::Nf4,
            double_quantization: true,
            gguf_dequantize: false,
            rope_scaling: None,
            identity_name: None,
            identity_author: None,
            disable_gradient_checkpointing: false,
            stage: Stage::Sft,
            finetuning_type: FinetuningType::Lora,
            lora_rank: 8,
            lora_alpha: None,
            lora_dropout: 0.0,
            lora_target: "all".into(),
            use_rslora: false,
            use_dora: false,
            loraplus_lr_ratio: None,
            pissa_init: false,
            pissa_iter: 16,
            pissa_convert: false,
            use_muon: false,
            create_new_adapter: false,
            freeze_trainable_layers: 2,
            freeze_trainable_modules: "all".into(),
            freeze_extra_modules: None,
            pref_beta: 0.1,
            pref_ftx: 0.0,
            pref_loss: PrefLoss::Sigmoid,
            dpo_label_smoothing: 0.0,
            simpo_gamma: 0.5,
            ld_alpha: None,
            pref_bco_weight: 0.0,
            kto_chosen_weight: 1.0,
            kto_rejected_weight: 1.0,
            ref_model: None,
            ref_model_adapters: None,
            ref_model_quantization_bit: None,
            dataset: None,
            eval_dataset: None,
            dataset_dir: "data".into(),
            template: None,
            cutoff_len: 2048,
            max_samples: None,
            val_size: 0.0,
            train_on_prompt: false,
            mask_history: false,
            packing: None,
            neat_packing: false,
            streaming: false,
            buffer_size: 16384,
            mix_strategy: MixStrategy::Concat,
            interleave_probs: None,
            default_system: None,
            enable_thinking: true,
            preserve_thinking: false,
            tool_format: None,
            tokenized_path: None,
            overwrite_cache: false,
            output_dir: "trainer_output".into(),
            logging_steps: 500,
            save_steps: 500,
            save_strategy: IntervalStrategy::Steps,
            save_total_limit: None,
            overwrite_output_dir: false,
            resume_from_checkpoint: None,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: SchedulerType::Linear,
            lr_scheduler_kwargs: BTreeMap::new(),
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            neftune_noise_alpha: None,
            label_smoothing_factor: 0.0,
            use_dft_loss: false,
            use_eaft_loss: false,
            eaft_alpha: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            optim: "adamw_torch".into(),
            seed: 42,
            data_seed: None,
            bf16: false,
            fp16: false,
            pure_bf16: false,
            group_by_length: false,
            num_threads: 0,
            eval_strategy: IntervalStrategy::No,
            eval_steps: None,
            per_device_eval_batch_size: 8,
            do_predict: false,
            compute_accuracy: false,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            early_stopping_steps: None,
            disable_shuffling: false,
            predict_with_generate: None,
            do_sample: true,
            temperature: 0.95,
            top_p: 0.7,
            top_k: 50,
            max_new_tokens: 1024,
            max_length: 1024,
            repetition_penalty: 1.0,
            skip_special_tokens: true,
            export_dir: None,
            export_size: 5.0,
            export_format: ExportFormat::Safetensors,
            export_gguf_type: GgufType::F16,
        }
    }
}

/// Splits a comma list, trimming blanks and dropping empty items.
pub fn comma_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

impl Preset {
    /// `lora_alpha`, resolved: 2 x rank when unset (LLaMA-Factory).
    pub fn lora_alpha_resolved(&self) -> u32 {
        self.lora_alpha.unwrap_or(self.lora_rank * 2)
    }

    /// `packing`, resolved: on for `pt` when unset; `neat_packing` implies it.
    pub fn packing_resolved(&self) -> bool {
        self.neat_packing || self.packing.unwrap_or(self.stage == Stage::Pt)
    }

    /// `eval_steps`, resolved: `logging_steps` when unset (Hugging Face).
    pub fn eval_steps_resolved(&self) -> u64 {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    pub fn datasets(&self) -> Vec<String> {
        self.dataset.as_deref().map(comma_list).unwrap_or_default()
    }

    /// A PiSSA run whose adapter other tools cannot load as trained: PEFT re-runs the randomized SVD with a fresh
    /// random sketch each time it loads a `pissa_niter_N` adapter (termtune re-draws the same one), and the top-r
    /// subspace of a real weight is rarely converged after N iterations.
    pub fn pissa_warning(&self) -> Option<String> {
        (self.pissa_init && self.pissa_iter >= 0 && !self.pissa_convert).then(|| {
            "the PiSSA adapter loads as trained in termtune, which re-draws the same randomized SVD, but PEFT (vLLM, LLaMA-Factory) draws a new one each time it loads it, giving another model: for other tools set `pissa_convert: true` (pissa_converted/, a plain LoRA) or export it with `termtune export --adapter-only` (which converts it); or use `pissa_iter: -1` (the exact SVD)".to_string()
        })
    }

    /// Whether the stage scores against a reference model: dpo with a reference loss (not orpo or simpo), kto.
    pub fn uses_reference(&self) -> bool {
        match self.stage {
            Stage::Dpo => self.pref_loss.uses_reference(),
            Stage::Kto => true,
            _ => false,
        }
    }

    /// The sequences one micro-batch runs through the model with a graph: `per_device_train_batch_size` pairs are
    /// twice as many sequences for dpo and rm (chosen and rejected in one forward; a pair sharing its prompt in one
    /// row holds fewer tokens and at most their attention scores, `Batch::share_prompts`); kto's KL sequences run
    /// after its examples, without a graph.
    pub fn sequences_per_micro_batch(&self) -> usize {
        match self.stage {
            Stage::Dpo | Stage::Rm => 2 * self.per_device_train_batch_size,
            _ => self.per_device_train_batch_size,
        }
    }

    /// The micro-batch as a memory estimate names it: `batch 2`, or `batch 2 pairs (4 sequences)` for dpo and rm.
    pub fn micro_batch_words(&self) -> String {
        let n = self.per_device_train_batch_size;
        if self.sequences_per_micro_batch() == n {
            format!("batch {n}")
        } else {
            format!(
                "batch {n} pairs ({} sequences)",
                self.sequences_per_micro_batch()
            )
        }
    }

    /// Whether training has a validation split (`val_size` or `eval_dataset`): then termtune evaluates, at the
    /// latest after the last step (LLaMA-Factory's `do_eval: true`).
    /// The metric that ranks checkpoints as the Hugging Face Trainer names it (`eval_` prefixed; `eval_loss` by
    /// default) and whether larger is better (`greater_is_better`, else: not for a metric ending in `loss`).
    pub fn best_metric(&self) -> (String, bool) {
        let name = self.metric_for_best_model.as_deref().unwrap_or("loss");
        let name = if name.starts_with("eval_") {
            name.to_string()
        } else {
            format!("eval_{name}")
        };
        let greater = self.greater_is_better.unwrap_or(!name.ends_with("loss"));
        (name, greater)
    }

    pub fn has_validation_split(&self) -> bool {
        self.val_size > 0.0 || !self.eval_datasets().is_empty()
    }

    pub fn eval_datasets(&self) -> Vec<String> {
        self.eval_dataset
            .as_deref()
            .map(comma_list)
            .unwrap_or_default()
    }

    pub fn adapters(&self) -> Vec<String> {
        self.adapter_name_or_path
            .as_deref()
            .map(comma_list)
            .unwrap_or_default()
    }

    /// Seed for the data order: `data_seed`, else `seed`.
    pub fn data_seed_resolved(&self) -> u64 {
        self.data_seed.unwrap_or(self.seed)
    }

    /// Examples per optimizer step.
    pub fn examples_per_step(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }

    /// At most this many tokens per optimizer step (batch x accumulation x cutoff).
    pub fn max_tokens_per_step(&self) -> usize {
        self.examples_per_step() * self.cutoff_len
    }
}
