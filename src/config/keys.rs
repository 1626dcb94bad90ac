//! Every key of LLaMA-Factory's argument set, classified for termtune.
//!
//! A key is one of three things here:
//! - **implemented**: a field of [`super::Preset`]; it changes what termtune does;
//! - **no effect**: a setting of LLaMA-Factory's Python machinery (workers, launchers, loggers of the
//!   training library) that cannot change the result of a termtune run; accepted and listed by `check`;
//! - **not supported yet**: it would change the result and termtune cannot honour it; accepted only
//!   while it holds its neutral value (`use_dora: false`), an error otherwise.
//!
//! Anything else is an unknown key: an error with a did-you-mean suggestion.
//!
//! Two no-effect keys are special ([`WRITTEN_BY_TERMTUNE`]): `do_train` and `do_eval` tell LLaMA-Factory to
//! train and evaluate, so the presets termtune saves carry them, and `termtune train` refuses `do_train: false`.

/// Where a key is written in a saved preset (LLaMA-Factory's `### group` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    Model,
    Method,
    Dataset,
    Output,
    Train,
    Eval,
    Generation,
    Export,
}

impl Group {
    pub const ALL: [Group; 8] = [
        Group::Model,
        Group::Method,
        Group::Dataset,
        Group::Output,
        Group::Train,
        Group::Eval,
        Group::Generation,
        Group::Export,
    ];

    pub fn header(self) -> &'static str {
        match self {
            Group::Model => "model",
            Group::Method => "method",
            Group::Dataset => "dataset",
            Group::Output => "output",
            Group::Train => "train",
            Group::Eval => "eval",
            Group::Generation => "generation",
            Group::Export => "export",
        }
    }
}

/// How termtune treats a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A field of the preset; `help` says what it does.
    Implemented,
    /// Accepted and ignored: it configures machinery termtune does not have; `help` says why.
    NoEffect,
    /// Accepted only with its neutral value (a YAML literal: `false`, `null`, `0`, …); any other
    /// value is an error that quotes `help` as the reason.
    Unsupported { neutral: &'static str },
}

/// One key of the argument set.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    pub name: &'static str,
    pub group: Group,
    pub class: Class,
    pub help: &'static str,
}

const fn imp(name: &'static str, group: Group, help: &'static str) -> KeySpec {
    KeySpec {
        name,
        group,
        class: Class::Implemented,
        help,
    }
}

const fn noe(name: &'static str, group: Group, help: &'static str) -> KeySpec {
    KeySpec {
        name,
        group,
        class: Class::NoEffect,
        help,
    }
}

const fn uns(
    name: &'static str,
    group: Group,
    neutral: &'static str,
    help: &'static str,
) -> KeySpec {
    KeySpec {
        name,
        group,
        class: Class::Unsupported { neutral },
        help,
    }
}

use Group::{Dataset, Eval, Export, Generation, Method, Model, Output, Train};

const MACHINERY: &str = "a setting of LLaMA-Factory's Python machinery; termtune trains on one device with the same mathematics";
const TRAINER_MACHINERY: &str =
    "a setting of the Hugging Face Trainer's machinery that does not change the result here";
const MULTIMODAL: &str = "multimodal processing; termtune trains text-only models";
const PREF_STAGE: &str = "used only by stage ppo, which termtune does not run yet";
const SPEED_ONLY: &str =
    "a speed or memory option of the Python stack; termtune computes the same result its own way";

/// The stages a preference key applies to (`None`: every stage): the TUI shows such a key for those stages only
/// (LLaMA-Factory's WebUI keeps them in its RLHF accordion).
pub fn stages_of(key: &str) -> Option<&'static [&'static str]> {
    match key {
        "pref_beta"
        | "pref_ftx"
        | "ref_model"
        | "ref_model_adapters"
        | "ref_model_quantization_bit" => Some(&["dpo", "kto"]),
        "pref_loss" | "dpo_label_smoothing" | "simpo_gamma" | "ld_alpha" | "pref_bco_weight" => {
            Some(&["dpo"])
        }
        "kto_chosen_weight" | "kto_rejected_weight" => Some(&["kto"]),
        _ => None,
    }
}

/// The whole table, in the order a saved preset lists keys within a group.
pub const KEYS: &[KeySpec] = &[
    // ### model
    imp(
        "model_name_or_path",
        Model,
        "Base model: a hub id (org/name), a local Hugging Face folder or a .gguf file.",
    ),
    imp(
        "adapter_name_or_path",
        Model,
        "PEFT adapter folder(s) to load on top of the base, comma separated; several are merged for inference.",
    ),
    imp(
        "adapter_folder",
        Model,
        "A folder whose subfolders are adapters to load, as with adapter_name_or_path.",
    ),
    imp(
        "cache_dir",
        Model,
        "Where hub models and datasets are cached (default: the Hugging Face cache, HF_HOME).",
    ),
    imp(
        "model_revision",
        Model,
        "Hub revision (branch, tag or commit) of the base model.",
    ),
    imp(
        "hf_hub_token",
        Model,
        "Token for gated or private hub models and datasets (default: HF_TOKEN).",
    ),
    imp(
        "infer_dtype",
        Model,
        "Dtype for chat and export: auto, float32, float16 or bfloat16.",
    ),
    imp(
        "identity_name",
        Model,
        "termtune only: fills {{name}} in the identity dataset (LLaMA-Factory leaves the placeholder).",
    ),
    imp(
        "identity_author",
        Model,
        "termtune only: fills {{author}} in the identity dataset.",
    ),
    noe(
        "trust_remote_code",
        Model,
        "termtune never runs Python code shipped with a model",
    ),
    noe(
        "use_fast_tokenizer",
        Model,
        "termtune always uses the Rust tokenizers library (the fast tokenizer)",
    ),
    noe("low_cpu_mem_usage", Model, MACHINERY),
    noe("model_max_length", Model, MACHINERY),
    noe(
        "flash_attn",
        Model,
        "attention kernel choice; termtune's attention computes the same result",
    ),
    noe("use_unsloth", Model, SPEED_ONLY),
    noe("use_unsloth_gc", Model, SPEED_ONLY),
    noe("enable_liger_kernel", Model, SPEED_ONLY),
    noe(
        "upcast_layernorm",
        Model,
        "termtune always computes norms in float32",
    ),
    noe(
        "upcast_lmhead_output",
        Model,
        "termtune always computes the loss in float32",
    ),
    imp(
        "disable_gradient_checkpointing",
        Model,
        "Keep every layer's activations instead of recomputing them in the backward: faster, more memory.",
    ),
    noe("use_reentrant_gc", Model, MACHINERY),
    noe("print_param_status", Model, MACHINERY),
    noe(
        "infer_backend",
        Model,
        "termtune has one inference engine of its own",
    ),
    noe("offload_folder", Model, MACHINERY),
    noe(
        "use_kv_cache",
        Model,
        "termtune's generation always uses a KV cache",
    ),
    noe(
        "ms_hub_token",
        Model,
        "ModelScope hub, not used by termtune",
    ),
    noe("om_hub_token", Model, "Modelers hub, not used by termtune"),
    noe("use_v1_kernels", Model, SPEED_ONLY),
    noe("image_max_pixels", Model, MULTIMODAL),
    noe("image_min_pixels", Model, MULTIMODAL),
    noe("image_do_pan_and_scan", Model, MULTIMODAL),
    noe("crop_to_patches", Model, MULTIMODAL),
    noe("video_max_pixels", Model, MULTIMODAL),
    noe("video_min_pixels", Model, MULTIMODAL),
    noe("video_fps", Model, MULTIMODAL),
    noe("video_maxlen", Model, MULTIMODAL),
    noe("use_audio_in_video", Model, MULTIMODAL),
    noe("audio_sampling_rate", Model, MULTIMODAL),
    noe(
        "vllm_maxlen",
        Model,
        "vLLM inference settings; termtune has its own engine",
    ),
    noe(
        "vllm_gpu_util",
        Model,
        "vLLM inference settings; termtune has its own engine",
    ),
    noe(
        "vllm_enforce_eager",
        Model,
        "vLLM inference settings; termtune has its own engine",
    ),
    noe(
        "vllm_max_lora_rank",
        Model,
        "vLLM inference settings; termtune has its own engine",
    ),
    noe(
        "vllm_config",
        Model,
        "vLLM inference settings; termtune has its own engine",
    ),
    noe(
        "sglang_maxlen",
        Model,
        "SGLang inference settings; termtune has its own engine",
    ),
    noe(
        "sglang_mem_fraction",
        Model,
        "SGLang inference settings; termtune has its own engine",
    ),
    noe(
        "sglang_tp_size",
        Model,
        "SGLang inference settings; termtune has its own engine",
    ),
    noe(
        "sglang_config",
        Model,
        "SGLang inference settings; termtune has its own engine",
    ),
    noe(
        "sglang_lora_backend",
        Model,
        "SGLang inference settings; termtune has its own engine",
    ),
    imp(
        "quantization_bit",
        Model,
        "Quantize the base's decoder linear layers at load (QLoRA: LoRA trains over them; chat decodes with them): 4 = bitsandbytes' 4-bit layout (quantization_type, double_quantization; about 4.1 bits per weight), 8 = blocks of 32 int8 weights with one f16 scale (GGML Q8_0, 8.5 bits per weight). Embeddings, norms and lm_head stay dense.",
    ),
    imp(
        "quantization_method",
        Model,
        "How quantization_bit quantizes: bnb (bitsandbytes' schemes) is the one termtune runs; hqq, eetq and the pre-quantized formats are refused.",
    ),
    imp(
        "quantization_type",
        Model,
        "quantization_bit 4: nf4 (NormalFloat4, QLoRA's) or fp4; blocks of 64 weights with a float absmax, as bitsandbytes.",
    ),
    imp(
        "double_quantization",
        Model,
        "quantization_bit 4: quantize the per-block absmax again (8-bit, blocks of 256), 0.37 bits per weight saved, as bitsandbytes' compress_statistics.",
    ),
    imp(
        "gguf_dequantize",
        Model,
        "termtune only: load a GGUF base dequantized (the numbers transformers computes from the file) instead of in its block types as llama.cpp runs it (about its file size in memory, quantized kernels, activations rounded to 8 bits per product).",
    ),
    uns(
        "quantization_device_map",
        Model,
        "null",
        "on-the-fly quantization is not supported yet",
    ),
    imp(
        "rope_scaling",
        Model,
        "Extend the context: linear, yarn or llama3 RoPE scaling by ceil(cutoff_len / the model's length) in training (off when cutoff_len fits), 2 in chat and export unless cutoff_len is set other than 2048, as LLaMA-Factory; replaces the model's own scaling. dynamic is refused.",
    ),
    uns(
        "resize_vocab",
        Model,
        "false",
        "resizing the vocabulary is not supported yet",
    ),
    uns(
        "split_special_tokens",
        Model,
        "false",
        "splitting special tokens is not supported yet",
    ),
    uns(
        "add_tokens",
        Model,
        "null",
        "adding tokens to the vocabulary is not supported yet",
    ),
    uns(
        "add_special_tokens",
        Model,
        "null",
        "adding special tokens is not supported yet",
    ),
    uns(
        "new_special_tokens_config",
        Model,
        "null",
        "adding special tokens is not supported yet",
    ),
    uns(
        "init_special_tokens",
        Model,
        "noise_init",
        "adding special tokens is not supported yet",
    ),
    uns(
        "train_from_scratch",
        Model,
        "false",
        "training from random weights is not supported",
    ),
    uns(
        "mixture_of_depths",
        Model,
        "null",
        "mixture-of-depths is not supported",
    ),
    uns(
        "shift_attn",
        Model,
        "false",
        "LongLoRA shift attention is not supported",
    ),
    uns(
        "use_mca",
        Model,
        "false",
        "Megatron-Core training is not supported",
    ),
    uns(
        "use_megatron_bridge",
        Model,
        "false",
        "Megatron training is not supported",
    ),
    uns(
        "use_hyper_parallel",
        Model,
        "false",
        "hyper-parallel training is not supported",
    ),
    uns("use_kt", Model, "false", "KTransformers is not supported"),
    uns("fp8", Model, "false", "FP8 training is not supported"),
    uns(
        "fp8_backend",
        Model,
        "auto",
        "FP8 training is not supported",
    ),
    uns(
        "fp8_enable_fsdp_float8_all_gather",
        Model,
        "false",
        "FP8 training is not supported",
    ),
    // ### method
    imp(
        "stage",
        Method,
        "Training stage: sft (supervised fine-tuning), pt (pre-training on raw text), dpo (preference pairs; see pref_loss), kto (answers tagged good or bad) or rm (a reward model on preference pairs).",
    ),
    noe(
        "do_train",
        Method,
        "LLaMA-Factory trains only with `do_train: true`, so termtune writes it into every preset it saves; `termtune train` refuses `do_train: false`",
    ),
    imp(
        "finetuning_type",
        Method,
        "lora (adapters only), freeze (last layers only) or full (every weight).",
    ),
    imp(
        "lora_rank",
        Method,
        "LoRA rank r: the width of the adapter matrices.",
    ),
    imp(
        "lora_alpha",
        Method,
        "LoRA scale numerator: the update is scaled by alpha/r (default 2 x rank).",
    ),
    imp(
        "lora_dropout",
        Method,
        "Dropout on the LoRA branch input during training.",
    ),
    imp(
        "lora_target",
        Method,
        "Modules that get adapters: all (every linear but lm_head) or names like q_proj,v_proj.",
    ),
    imp(
        "use_rslora",
        Method,
        "Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r.",
    ),
    imp(
        "use_dora",
        Method,
        "DoRA: a trainable magnitude per output rescales each adapted weight row (PEFT's use_dora).",
    ),
    imp(
        "loraplus_lr_ratio",
        Method,
        "LoRA+: lora_B (and DoRA magnitudes) learn at learning_rate x this ratio (16 is the paper's).",
    ),
    imp(
        "pissa_init",
        Method,
        "PiSSA: A and B start as each weight's r principal singular directions and the base keeps the residual (PEFT's init_lora_weights pissa).",
    ),
    imp(
        "pissa_iter",
        Method,
        "PiSSA's SVD: subspace iterations of the randomized SVD (16), or -1 for the exact SVD.",
    ),
    imp(
        "pissa_convert",
        Method,
        "PiSSA: also write pissa_init/ (the start) and pissa_converted/ (a plain rank-2r LoRA for the original base) in output_dir.",
    ),
    imp(
        "create_new_adapter",
        Method,
        "With adapter_name_or_path: merge the given adapters and train a fresh one.",
    ),
    imp(
        "freeze_trainable_layers",
        Method,
        "freeze: the last n decoder layers are trained (negative: the first n).",
    ),
    imp(
        "freeze_trainable_modules",
        Method,
        "freeze: the parts of the trainable layers that are trained, comma separated: all, or self_attn, mlp, input_layernorm, post_attention_layernorm (Gemma 3: its four norms).",
    ),
    imp(
        "freeze_extra_modules",
        Method,
        "freeze: modules outside the layers trained too, comma separated: embed_tokens, norm, lm_head (untied). Matched by name as LLaMA-Factory does, so norm also trains every layer's norms.",
    ),
    noe(
        "deepspeed",
        Method,
        "DeepSpeed shards training across GPUs; termtune trains on one device with the same mathematics",
    ),
    imp(
        "pref_beta",
        Method,
        "stages dpo and kto: beta, the weight of the log-ratio against the reference (0.1): larger keeps the policy closer to it.",
    ),
    imp(
        "pref_ftx",
        Method,
        "stages dpo and kto: weight of the SFT loss (the chosen answer's mean token loss) added to the preference loss (0: none).",
    ),
    imp(
        "pref_bco_weight",
        Method,
        "stage dpo, losses with a reference (sigmoid, hinge, ipo): the weight w of BCO's loss mixed in as (dpo + w·bco) / (1 + w), its reward baseline the running mean of the batches' mean rewards (0: none).",
    ),
    imp(
        "pref_loss",
        Method,
        "stage dpo: sigmoid (DPO), hinge (SLiC), ipo, orpo or simpo (the last two use no reference model).",
    ),
    imp(
        "dpo_label_smoothing",
        Method,
        "stage dpo, sigmoid loss: the assumed share of flipped preference labels, in [0, 0.5] (cDPO; 0: plain DPO).",
    ),
    imp(
        "kto_chosen_weight",
        Method,
        "stage kto: the weight of a desirable answer's loss (1.0).",
    ),
    imp(
        "kto_rejected_weight",
        Method,
        "stage kto: the weight of an undesirable answer's loss (1.0).",
    ),
    imp(
        "simpo_gamma",
        Method,
        "stage dpo, simpo loss: the target reward margin gamma (0.5).",
    ),
    imp(
        "ld_alpha",
        Method,
        "stage dpo: LD-DPO, the weight in [0, 1] of the policy's log-probabilities of the longer answer's tokens past the shorter answer's length (null: off, every token counts once), so that the preference is not learnt from length.",
    ),
    noe("ppo_buffer_size", Method, PREF_STAGE),
    noe("ppo_epochs", Method, PREF_STAGE),
    noe("ppo_score_norm", Method, PREF_STAGE),
    noe("ppo_target", Method, PREF_STAGE),
    noe("ppo_whiten_rewards", Method, PREF_STAGE),
    imp(
        "ref_model",
        Method,
        "stages dpo and kto: a separate reference model (hub id, folder or .gguf; same tokenizer) instead of the base with the adapter off (LoRA) or a frozen copy of the starting weights.",
    ),
    imp(
        "ref_model_adapters",
        Method,
        "stages dpo and kto: adapter folder(s) merged into ref_model, comma separated.",
    ),
    imp(
        "ref_model_quantization_bit",
        Method,
        "stages dpo and kto with ref_model: quantize the reference's decoder linear layers at load, 4 or 8, as quantization_bit quantizes the base (quantization_type, double_quantization); about 0.3x (4) or 0.55x (8) of its 16-bit weight memory.",
    ),
    noe("reward_model", Method, PREF_STAGE),
    noe("reward_model_adapters", Method, PREF_STAGE),
    noe("reward_model_quantization_bit", Method, PREF_STAGE),
    noe("reward_model_type", Method, PREF_STAGE),
    noe("galore_target", Method, "used only with use_galore"),
    noe("galore_rank", Method, "used only with use_galore"),
    noe(
        "galore_update_interval",
        Method,
        "used only with use_galore",
    ),
    noe("galore_scale", Method, "used only with use_galore"),
    noe("galore_proj_type", Method, "used only with use_galore"),
    noe("galore_layerwise", Method, "used only with use_galore"),
    noe("apollo_target", Method, "used only with use_apollo"),
    noe("apollo_rank", Method, "used only with use_apollo"),
    noe(
        "apollo_update_interval",
        Method,
        "used only with use_apollo",
    ),
    noe("apollo_scale", Method, "used only with use_apollo"),
    noe("apollo_proj", Method, "used only with use_apollo"),
    noe("apollo_proj_type", Method, "used only with use_apollo"),
    noe("apollo_scale_type", Method, "used only with use_apollo"),
    noe("apollo_layerwise", Method, "used only with use_apollo"),
    noe("apollo_scale_front", Method, "used only with use_apollo"),
    noe("badam_mode", Method, "used only with use_badam"),
    noe("badam_start_block", Method, "used only with use_badam"),
    noe("badam_switch_mode", Method, "used only with use_badam"),
    noe("badam_switch_interval", Method, "used only with use_badam"),
    noe("badam_update_ratio", Method, "used only with use_badam"),
    noe("badam_mask_mode", Method, "used only with use_badam"),
    noe("badam_verbose", Method, "used only with use_badam"),
    noe("oft_rank", Method, "used only with finetuning_type: oft"),
    noe(
        "oft_block_size",
        Method,
        "used only with finetuning_type: oft",
    ),
    noe("oft_target", Method, "used only with finetuning_type: oft"),
    noe(
        "module_dropout",
        Method,
        "used only with finetuning_type: oft",
    ),
    noe("freeze_vision_tower", Method, MULTIMODAL),
    noe("freeze_multi_modal_projector", Method, MULTIMODAL),
    noe("freeze_language_model", Method, MULTIMODAL),
    noe(
        "use_swanlab",
        Method,
        "an external experiment tracker; termtune writes trainer_log.jsonl and its own plots",
    ),
    noe("swanlab_project", Method, "used only with use_swanlab"),
    noe("swanlab_workspace", Method, "used only with use_swanlab"),
    noe("swanlab_run_name", Method, "used only with use_swanlab"),
    noe("swanlab_mode", Method, "used only with use_swanlab"),
    noe("swanlab_api_key", Method, "used only with use_swanlab"),
    noe("swanlab_logdir", Method, "used only with use_swanlab"),
    noe(
        "swanlab_lark_webhook_url",
        Method,
        "used only with use_swanlab",
    ),
    noe("swanlab_lark_secret", Method, "used only with use_swanlab"),
    noe(
        "plot_loss",
        Method,
        "termtune always draws training_loss.png",
    ),
    noe(
        "include_effective_tokens_per_second",
        Method,
        "termtune always reports real (non-padding) tokens per second",
    ),
    noe("enable_torch_profiler", Method, MACHINERY),
    noe("profile_modules", Method, MACHINERY),
    noe("ray_run_name", Method, MACHINERY),
    noe("ray_storage_path", Method, MACHINERY),
    noe("ray_storage_filesystem", Method, MACHINERY),
    noe("ray_num_workers", Method, MACHINERY),
    noe("resources_per_worker", Method, MACHINERY),
    noe("placement_strategy", Method, MACHINERY),
    noe("ray_init_kwargs", Method, MACHINERY),
    noe("master_addr", Method, MACHINERY),
    noe("master_port", Method, MACHINERY),
    uns(
        "additional_target",
        Method,
        "null",
        "training extra modules fully next to LoRA (modules_to_save) is not supported yet",
    ),
    noe(
        "loraplus_lr_embedding",
        Method,
        "LoRA+'s learning rate of LoRA on embedding layers, which termtune does not adapt",
    ),
    uns(
        "use_llama_pro",
        Method,
        "false",
        "LLaMA Pro is not supported",
    ),
    uns("use_galore", Method, "false", "GaLore is not supported yet"),
    uns("use_apollo", Method, "false", "APOLLO is not supported yet"),
    uns("use_badam", Method, "false", "BAdam is not supported yet"),
    uns(
        "use_adam_mini",
        Method,
        "false",
        "Adam-mini is not supported yet",
    ),
    imp(
        "use_muon",
        Method,
        "Muon (LLaMA-Factory's): 2-D weights but embeddings and lm_head follow Newton-Schulz-orthogonalised momentum, the rest AdamW.",
    ),
    imp(
        "use_dft_loss",
        Method,
        "DFT loss (LLaMA-Factory): each answer token's cross-entropy weighted by its probability (detached); stage sft.",
    ),
    uns(
        "use_asft_loss",
        Method,
        "false",
        "the ASFT loss is not supported yet",
    ),
    uns(
        "asft_alpha",
        Method,
        "0.1",
        "the ASFT loss is not supported yet",
    ),
    imp(
        "use_eaft_loss",
        Method,
        "EAFT loss (LLaMA-Factory): each answer token's cross-entropy weighted by (entropy of its 20 largest logits / 3)^eaft_alpha (detached); stage sft.",
    ),
    imp(
        "eaft_alpha",
        Method,
        "EAFT's exponent on the entropy weight.",
    ),
    imp(
        "compute_accuracy",
        Method,
        "At evaluation, also the token accuracy (argmax = label) per example, averaged: eval_accuracy.",
    ),
    imp(
        "disable_shuffling",
        Method,
        "Train on the examples in dataset order, every epoch (no shuffle, no length grouping).",
    ),
    imp(
        "early_stopping_steps",
        Method,
        "Stop when metric_for_best_model has not improved for this many evaluations (needs load_best_model_at_end).",
    ),
    // ### dataset
    imp(
        "dataset",
        Dataset,
        "Dataset names from dataset_dir/dataset_info.json, comma separated.",
    ),
    imp(
        "eval_dataset",
        Dataset,
        "Datasets used only for evaluation, comma separated.",
    ),
    imp(
        "dataset_dir",
        Dataset,
        "Folder holding dataset_info.json and the data files; ONLINE: dataset names are Hugging Face Hub ids.",
    ),
    imp(
        "template",
        Dataset,
        "Chat template (llama3, qwen, chatml, ...); unset: the tokenizer's own chat_template.",
    ),
    imp(
        "cutoff_len",
        Dataset,
        "Maximum tokens per example after tokenisation; longer ones are truncated.",
    ),
    imp(
        "max_samples",
        Dataset,
        "Use at most this many examples from each dataset.",
    ),
    imp(
        "val_size",
        Dataset,
        "Held-out evaluation split: a fraction (0.1) or a number of examples (200).",
    ),
    imp(
        "train_on_prompt",
        Dataset,
        "Also train on prompt tokens (normally masked).",
    ),
    imp(
        "mask_history",
        Dataset,
        "Train only on the last assistant turn of each conversation.",
    ),
    imp(
        "packing",
        Dataset,
        "Pack several examples into each sequence (default: on for pt, off otherwise).",
    ),
    imp(
        "neat_packing",
        Dataset,
        "Packing without attention across packed examples (implies packing).",
    ),
    imp(
        "streaming",
        Dataset,
        "Read large JSON Lines datasets as a stream (needs max_steps).",
    ),
    imp(
        "buffer_size",
        Dataset,
        "Shuffle buffer size when streaming.",
    ),
    imp(
        "mix_strategy",
        Dataset,
        "How several datasets are mixed: concat, interleave_under or interleave_over.",
    ),
    imp(
        "interleave_probs",
        Dataset,
        "Sampling probabilities for the interleave strategies, comma separated.",
    ),
    imp(
        "default_system",
        Dataset,
        "System prompt used when an example has none (overrides the template's).",
    ),
    imp(
        "enable_thinking",
        Dataset,
        "Reasoning templates (qwen3): train on the empty thought block when true.",
    ),
    imp(
        "preserve_thinking",
        Dataset,
        "Reasoning templates: keep earlier turns' thoughts in the history.",
    ),
    imp(
        "tool_format",
        Dataset,
        "Tool-call format used to render tools (default: the template's).",
    ),
    imp(
        "tokenized_path",
        Dataset,
        "Where the tokenised dataset cache is kept (default: termtune's cache).",
    ),
    imp(
        "overwrite_cache",
        Dataset,
        "Tokenise again even if a cached tokenised dataset exists.",
    ),
    noe(
        "preprocessing_num_workers",
        Dataset,
        "termtune tokenises on all cores by itself",
    ),
    noe("preprocessing_batch_size", Dataset, MACHINERY),
    noe("dataloader_num_workers", Dataset, MACHINERY),
    noe("dataloader_pin_memory", Dataset, MACHINERY),
    noe("dataloader_persistent_workers", Dataset, MACHINERY),
    noe("dataloader_prefetch_factor", Dataset, MACHINERY),
    noe("dataloader_drop_last", Dataset, MACHINERY),
    noe("data_shared_file_system", Dataset, MACHINERY),
    noe(
        "ignore_pad_token_for_loss",
        Dataset,
        "termtune never trains on padding",
    ),
    noe("media_dir", Dataset, MULTIMODAL),
    noe("remove_unused_columns", Dataset, MACHINERY),
    uns(
        "eval_on_each_dataset",
        Dataset,
        "false",
        "separate evaluation per dataset is not supported yet",
    ),
    // ### output
    imp(
        "output_dir",
        Output,
        "Run folder: checkpoints, adapter, trainer_log.jsonl, plots.",
    ),
    imp(
        "logging_steps",
        Output,
        "Write a line to trainer_log.jsonl every n optimizer steps.",
    ),
    imp(
        "save_steps",
        Output,
        "Save a checkpoint every n optimizer steps.",
    ),
    imp(
        "save_strategy",
        Output,
        "When to save checkpoints: steps, epoch or no.",
    ),
    imp(
        "save_total_limit",
        Output,
        "Keep only the newest n checkpoints.",
    ),
    imp(
        "overwrite_output_dir",
        Output,
        "Start afresh in a used output_dir instead of resuming from its last checkpoint.",
    ),
    imp(
        "resume_from_checkpoint",
        Output,
        "Resume exactly from this checkpoint folder (default: the newest in output_dir).",
    ),
    noe(
        "save_only_model",
        Output,
        "termtune checkpoints always hold the optimizer state needed to resume",
    ),
    noe(
        "save_safetensors",
        Output,
        "termtune always writes safetensors",
    ),
    noe("logging_dir", Output, MACHINERY),
    noe("logging_strategy", Output, TRAINER_MACHINERY),
    noe("logging_first_step", Output, TRAINER_MACHINERY),
    noe(
        "logging_nan_inf_filter",
        Output,
        "termtune stops on a NaN or infinite loss",
    ),
    noe("run_name", Output, MACHINERY),
    noe("disable_tqdm", Output, MACHINERY),
    noe("log_level", Output, MACHINERY),
    noe("log_level_replica", Output, MACHINERY),
    noe(
        "report_to",
        Output,
        "external loggers; termtune writes trainer_log.jsonl and its own plots",
    ),
    noe("ddp_timeout", Output, MACHINERY),
    noe("ddp_find_unused_parameters", Output, MACHINERY),
    noe("ddp_backend", Output, MACHINERY),
    noe("local_rank", Output, MACHINERY),
    noe(
        "include_num_input_tokens_seen",
        Output,
        "termtune always counts tokens seen",
    ),
    noe(
        "include_tokens_per_second",
        Output,
        "termtune always reports tokens per second",
    ),
    noe("torch_compile", Output, SPEED_ONLY),
    noe("tf32", Output, SPEED_ONLY),
    noe("use_cpu", Output, "termtune picks its device by itself"),
    noe("hub_strategy", Output, MACHINERY),
    noe("hub_private_repo", Output, MACHINERY),
    noe("hub_token", Output, MACHINERY),
    uns(
        "push_to_hub",
        Output,
        "false",
        "pushing to the hub is not supported (the hub is often unreachable); upload the run folder yourself",
    ),
    uns(
        "hub_model_id",
        Output,
        "null",
        "pushing to the hub is not supported",
    ),
    uns(
        "save_on_each_node",
        Output,
        "false",
        "multi-node training is not supported",
    ),
    // ### train
    imp(
        "per_device_train_batch_size",
        Train,
        "Examples per micro-batch.",
    ),
    imp(
        "gradient_accumulation_steps",
        Train,
        "Micro-batches per optimizer step.",
    ),
    imp("learning_rate", Train, "Peak learning rate of AdamW."),
    imp(
        "num_train_epochs",
        Train,
        "Passes over the training data (may be fractional); ignored when max_steps > 0.",
    ),
    imp(
        "max_steps",
        Train,
        "Total optimizer steps; overrides num_train_epochs when > 0.",
    ),
    imp(
        "lr_scheduler_type",
        Train,
        "Learning-rate schedule (transformers' formulas): linear, cosine, cosine_with_restarts, cosine_with_min_lr, polynomial, constant, constant_with_warmup, inverse_sqrt, warmup_stable_decay.",
    ),
    imp(
        "lr_scheduler_kwargs",
        Train,
        "Schedule settings: num_cycles (cosine kinds); power, lr_end (polynomial); min_lr_rate or min_lr (cosine_with_min_lr, required); timescale (inverse_sqrt); num_decay_steps (required), num_stable_steps, min_lr_ratio, warmup_type, decay_type (warmup_stable_decay).",
    ),
    imp(
        "warmup_ratio",
        Train,
        "Fraction of the steps spent warming the learning rate up from 0.",
    ),
    imp(
        "warmup_steps",
        Train,
        "Warm-up steps (wins over warmup_ratio when > 0).",
    ),
    imp("weight_decay", Train, "AdamW decoupled weight decay."),
    imp("adam_beta1", Train, "AdamW beta1."),
    imp("adam_beta2", Train, "AdamW beta2."),
    imp("adam_epsilon", Train, "AdamW epsilon."),
    imp(
        "max_grad_norm",
        Train,
        "Clip the global gradient norm to this value (0 disables).",
    ),
    imp(
        "optim",
        Train,
        "Optimizer: adamw_torch (AdamW; adamw_hf and adamw_torch_fused are the same here).",
    ),
    imp(
        "seed",
        Train,
        "Random seed for initialisation, shuffling and dropout.",
    ),
    imp(
        "data_seed",
        Train,
        "Seed for the data order only (default: seed).",
    ),
    imp(
        "bf16",
        Train,
        "Compute in bfloat16 (adapters and optimizer state stay float32).",
    ),
    imp(
        "fp16",
        Train,
        "Compute in float16 (adapters and optimizer state stay float32).",
    ),
    imp(
        "pure_bf16",
        Train,
        "Keep even the trainable weights in bfloat16.",
    ),
    imp(
        "group_by_length",
        Train,
        "Batch examples of similar length together to waste less padding.",
    ),
    imp(
        "num_threads",
        Train,
        "termtune only: CPU threads of the training pool (0 = all cores); candle's elementwise ops keep their own pool.",
    ),
    noe(
        "gradient_checkpointing",
        Train,
        "LLaMA-Factory decides this itself; use disable_gradient_checkpointing",
    ),
    noe("gradient_checkpointing_kwargs", Train, MACHINERY),
    noe(
        "fsdp",
        Train,
        "FSDP shards training across GPUs; termtune trains on one device",
    ),
    noe(
        "fsdp_config",
        Train,
        "FSDP shards training across GPUs; termtune trains on one device",
    ),
    noe("accelerator_config", Train, MACHINERY),
    noe("half_precision_backend", Train, MACHINERY),
    noe("bf16_full_eval", Train, MACHINERY),
    noe("fp16_full_eval", Train, MACHINERY),
    noe("fp16_opt_level", Train, MACHINERY),
    noe("jit_mode_eval", Train, MACHINERY),
    noe("auto_find_batch_size", Train, MACHINERY),
    noe(
        "full_determinism",
        Train,
        "termtune runs are deterministic on CPU for a given seed",
    ),
    noe("skip_memory_metrics", Train, MACHINERY),
    noe("past_index", Train, MACHINERY),
    noe("label_names", Train, MACHINERY),
    noe("length_column_name", Train, MACHINERY),
    noe("optim_args", Train, MACHINERY),
    noe("optim_target_modules", Train, MACHINERY),
    noe(
        "average_tokens_across_devices",
        Train,
        "termtune normalises the loss by label tokens across the whole accumulated batch",
    ),
    imp(
        "neftune_noise_alpha",
        Train,
        "NEFTune: uniform noise of alpha/sqrt(length x hidden) on the input embeddings while training (5 is usual).",
    ),
    imp(
        "label_smoothing_factor",
        Train,
        "Label smoothing ε (transformers' LabelSmoother): each token's loss is (1-ε)·nll + ε·mean over the vocabulary of -log p; sft and pt.",
    ),
    uns("torch_empty_cache_steps", Train, "null", "not supported"),
    // ### eval
    imp(
        "eval_strategy",
        Eval,
        "When to evaluate on the validation split: no, steps or epoch.",
    ),
    imp(
        "eval_steps",
        Eval,
        "Evaluate every n optimizer steps (default: logging_steps).",
    ),
    imp(
        "per_device_eval_batch_size",
        Eval,
        "Examples per evaluation micro-batch.",
    ),
    noe(
        "do_eval",
        Eval,
        "termtune evaluates whenever val_size or eval_dataset gives a validation split, and then writes `do_eval: true` into the presets it saves",
    ),
    noe(
        "evaluation_strategy",
        Eval,
        "old name of eval_strategy; use eval_strategy",
    ),
    noe(
        "prediction_loss_only",
        Eval,
        "termtune's evaluation computes the loss only",
    ),
    noe("eval_accumulation_steps", Eval, MACHINERY),
    noe("eval_delay", Eval, MACHINERY),
    noe("eval_do_concat_batches", Eval, MACHINERY),
    imp(
        "do_predict",
        Eval,
        "Generate an answer for every eval_dataset example and score it (ROUGE, BLEU): `termtune predict`, or after training.",
    ),
    imp(
        "predict_with_generate",
        Eval,
        "Predict by generating (LLaMA-Factory's predict files and metrics); termtune's predict always generates.",
    ),
    imp(
        "load_best_model_at_end",
        Eval,
        "Finish with the weights of the checkpoint whose evaluation scored best (save_strategy = eval_strategy; the best checkpoint survives save_total_limit).",
    ),
    imp(
        "metric_for_best_model",
        Eval,
        "The evaluation metric that picks the best checkpoint: eval_loss (the default), eval_accuracy, or a stage metric such as eval_rewards/accuracies.",
    ),
    imp(
        "greater_is_better",
        Eval,
        "Whether a larger metric_for_best_model is better (default: false for metrics ending in loss, else true).",
    ),
    uns(
        "generation_max_length",
        Eval,
        "null",
        "batch prediction is not supported yet",
    ),
    uns(
        "generation_num_beams",
        Eval,
        "null",
        "batch prediction is not supported yet",
    ),
    // ### generation
    imp(
        "do_sample",
        Generation,
        "Sample (true) or decode greedily (false).",
    ),
    imp(
        "temperature",
        Generation,
        "Sampling temperature (0 means greedy).",
    ),
    imp(
        "top_p",
        Generation,
        "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.",
    ),
    imp(
        "top_k",
        Generation,
        "Sample only among the k most likely tokens (0 disables).",
    ),
    imp("max_new_tokens", Generation, "Longest answer in tokens."),
    imp(
        "max_length",
        Generation,
        "Longest prompt + answer in tokens (max_new_tokens wins).",
    ),
    imp(
        "repetition_penalty",
        Generation,
        "Penalty for tokens already in the context (1.0 disables).",
    ),
    imp(
        "skip_special_tokens",
        Generation,
        "Hide special tokens in answers.",
    ),
    uns(
        "num_beams",
        Generation,
        "1",
        "beam search is not supported yet",
    ),
    uns(
        "length_penalty",
        Generation,
        "1.0",
        "beam search is not supported yet",
    ),
    // ### export
    imp(
        "export_dir",
        Export,
        "Folder that termtune export writes the merged model to.",
    ),
    imp(
        "export_size",
        Export,
        "Largest safetensors shard of an export, in GB.",
    ),
    imp(
        "export_format",
        Export,
        "termtune only: safetensors (a Hugging Face folder) or gguf.",
    ),
    imp(
        "export_gguf_type",
        Export,
        "termtune only: tensor type of a GGUF export: f32, f16, q8_0, or llama.cpp's 4-bit q4_k_m, q4_0, q4_1 (each tensor typed as llama-quantize types it).",
    ),
    noe(
        "export_device",
        Export,
        "termtune merges on the device it runs on",
    ),
    uns(
        "export_legacy_format",
        Export,
        "false",
        "termtune writes safetensors only, never pickle (.bin) files",
    ),
    uns(
        "export_hub_model_id",
        Export,
        "null",
        "pushing to the hub is not supported",
    ),
    uns(
        "export_quantization_bit",
        Export,
        "null",
        "GPTQ export is not supported; use export_format: gguf with q8_0",
    ),
    uns(
        "export_quantization_dataset",
        Export,
        "null",
        "GPTQ export is not supported",
    ),
    uns(
        "export_quantization_nsamples",
        Export,
        "128",
        "GPTQ export is not supported",
    ),
    uns(
        "export_quantization_maxlen",
        Export,
        "1024",
        "GPTQ export is not supported",
    ),
];

/// No-effect keys that termtune writes itself: LLaMA-Factory's switches for doing what termtune always does
/// (`do_train: true`; `do_eval: true` with a validation split). They are not listed as notes.
pub const WRITTEN_BY_TERMTUNE: &[&str] = &["do_train", "do_eval"];

/// The spec of `name`, if it is a known key.
pub fn find(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}

/// The known key closest to `name`, when one is close enough to be a likely typo.
pub fn suggest(name: &str) -> Option<&'static str> {
    let lowered = name.to_ascii_lowercase().replace('-', "_");
    if let Some(k) = find(&lowered) {
        return Some(k.name);
    }
    KEYS.iter()
        .map(|k| (k.name, strsim::jaro_winkler(&lowered, k.name)))
        .filter(|(_, score)| *score > 0.85)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn keys_are_unique() {
        let mut seen = HashSet::new();
        for k in KEYS {
            assert!(seen.insert(k.name), "duplicate key {}", k.name);
        }
    }

    #[test]
    fn unsupported_neutral_values_are_valid_yaml() {
        for k in KEYS {
            if let Class::Unsupported { neutral } = k.class {
                let parsed: Result<serde_norway::Value, _> = serde_norway::from_str(neutral);
                assert!(parsed.is_ok(), "{}: {neutral}", k.name);
            }
        }
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(suggest("learning_rat"), Some("learning_rate"));
        assert_eq!(suggest("lora-rank"), Some("lora_rank"));
        assert_eq!(suggest("Cutoff_Len"), Some("cutoff_len"));
        assert_eq!(suggest("completely_unrelated_thing_xyz"), None);
    }
}
