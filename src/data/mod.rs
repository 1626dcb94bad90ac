//! Datasets → token batches, exactly as LLaMA-Factory does it (UI-free; never imports ratatui/crossterm).
//!
//! Flow: [`registry`] (`dataset_info.json`) → [`reader`] (json / jsonl / folder rows, bad rows counted) →
//! [`convert`] (alpaca / sharegpt / openai / text → [`convert::Example`]) → [`encoder::Encoder`]
//! (a [`template::Template`] or the tokenizer's Jinja `chat_template`, per-piece tokenisation) →
//! [`process`] (labels, `cutoff_len` with `infer_seqlen`) → [`pack`] (knapsack packing, collate, sampler) →
//! [`stats`] (preview and statistics). [`pipeline::prepare_dataset`] runs it all, with a [`cache`].
//!
//! For the engine:
//! ```no_run
//! # fn demo(tokenizer: tokenizers::Tokenizer, tokenizer_config: serde_json::Value) -> Result<(), termtune::data::DataError> {
//! use termtune::data::{DataOptions, Encoder, Message, Role, Sampler, prepare_dataset};
//! let opts = DataOptions { dataset: vec!["identity".into()], template: Some("qwen".into()), ..DataOptions::default() };
//! let enc = Encoder::new(&opts, &tokenizer, &tokenizer_config)?; // warnings in enc.warnings
//! // enc.added_tokens: new tokens (e.g. a replaced eos) → grow the embeddings; use enc.tokenizer from now on.
//! let data = prepare_dataset(&opts, &enc)?; // cached on disk; data.stats for the UI
//! for batch in data.epoch_batches(opts.per_device_train_batch_size, Sampler::Random, opts.seed, 0) {
//!     // batch.input_ids / labels / position_ids (row-major batch_size × seq_len); with
//!     // batch.block_diagonal attention stays inside one sequence_ids run (neat packing), else a
//!     // causal + padding (attention_mask) mask.
//! #   let _ = batch;
//! }
//! let prompt = enc.chat_prompt(Some("Be terse."), &[Message::new(Role::User, "Hi")])?;
//! // generate from prompt.ids until a token in prompt.stop_ids
//! # let _ = prompt; Ok(()) }
//! ```

pub mod cache;
pub mod convert;
pub mod encoder;
pub mod error;
pub mod hub;
pub mod jinja;
pub mod pack;
pub mod pipeline;
pub mod process;
pub mod pyjson;
pub mod reader;
pub mod registry;
pub mod stats;
pub mod template;
pub mod tools;

use std::path::PathBuf;

pub use convert::{Example, Message, Role};
pub use encoder::{ChatPrompt, Encoder};
pub use error::DataError;
pub use pack::{Batch, PackedSequence, Sampler};
pub use pipeline::{PreparedDataset, prepare_dataset};
pub use process::{IGNORE_INDEX, TokenizedExample};
pub use reader::{SkipReason, SkipRecord};
pub use stats::{DatasetStats, Preview};
pub use template::Template;

/// Training stage (LLaMA-Factory's `stage`). Only `pt` and `sft` are tokenised now; the preference stages
/// parse and validate their data (pairs, `kto_tag`) for later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Stage {
    Pt,
    #[default]
    Sft,
    Rm,
    Dpo,
    Kto,
    Ppo,
}

impl Stage {
    /// Parses LLaMA-Factory's spelling.
    pub fn parse(s: &str) -> Option<Stage> {
        Some(match s {
            "pt" => Stage::Pt,
            "sft" => Stage::Sft,
            "rm" => Stage::Rm,
            "dpo" => Stage::Dpo,
            "kto" => Stage::Kto,
            "ppo" => Stage::Ppo,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pt => "pt",
            Stage::Sft => "sft",
            Stage::Rm => "rm",
            Stage::Dpo => "dpo",
            Stage::Kto => "kto",
            Stage::Ppo => "ppo",
        }
    }

    /// Stages whose datasets must be `ranking: true` (pairs).
    pub fn needs_ranking(self) -> bool {
        matches!(self, Stage::Rm | Stage::Dpo)
    }

    /// Whether an example is two sequences (pairs for dpo and rm; the example and its KL sequence for kto).
    pub fn in_pairs(self) -> bool {
        matches!(self, Stage::Rm | Stage::Dpo | Stage::Kto)
    }
}

/// `val_size`: a fraction of the train set (0 < v < 1) or a row count (v ≥ 1), like LLaMA-Factory.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ValSize {
    #[default]
    None,
    Fraction(f64),
    Count(usize),
}

impl ValSize {
    /// LLaMA-Factory's rule: `val_size < 1` is a fraction, otherwise an integer count.
    pub fn from_f64(v: f64) -> ValSize {
        if v <= 1e-6 {
            ValSize::None
        } else if v < 1.0 {
            ValSize::Fraction(v)
        } else {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            ValSize::Count(v as usize)
        }
    }

    /// Number of validation rows taken out of `n`.
    pub fn count_of(self, n: usize) -> usize {
        match self {
            ValSize::None => 0,
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            ValSize::Fraction(f) => ((n as f64) * f).ceil() as usize,
            ValSize::Count(c) => c,
        }
        .min(n)
    }
}

/// `mix_strategy` for several datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum MixStrategy {
    #[default]
    Concat,
    /// Interleave until the first dataset is exhausted (`interleave_under`).
    InterleaveUnder,
    /// Interleave until every dataset is exhausted, cycling the short ones (`interleave_over`).
    InterleaveOver,
}

impl MixStrategy {
    pub fn parse(s: &str) -> Option<MixStrategy> {
        Some(match s {
            "concat" => MixStrategy::Concat,
            "interleave_under" => MixStrategy::InterleaveUnder,
            "interleave_over" => MixStrategy::InterleaveOver,
            _ => return None,
        })
    }
}

/// Resolved data options, LLaMA-Factory key names and defaults. The config module fills it from a preset.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// `dataset`: names in `dataset_dir/dataset_info.json`.
    pub dataset: Vec<String>,
    /// `eval_dataset`: names used for evaluation instead of a `val_size` split.
    pub eval_dataset: Vec<String>,
    /// `dataset_dir` (default `data`).
    pub dataset_dir: PathBuf,
    /// `template`: a built-in name, or `None` for the tokenizer's own Jinja `chat_template`.
    pub template: Option<String>,
    /// `cutoff_len` (default 2048).
    pub cutoff_len: usize,
    pub train_on_prompt: bool,
    pub mask_history: bool,
    /// `max_samples`: keep the first N rows of each dataset.
    pub max_samples: Option<usize>,
    pub val_size: ValSize,
    /// `packing`: `None` → on for `pt`, off otherwise.
    pub packing: Option<bool>,
    /// `neat_packing`: packing without cross-attention between examples (implies packing).
    pub neat_packing: bool,
    /// `streaming`: read JSONL lazily with bounded memory (requires `max_steps`).
    pub streaming: bool,
    /// `buffer_size` of the streaming shuffle buffer (default 16384).
    pub buffer_size: usize,
    pub mix_strategy: MixStrategy,
    pub interleave_probs: Option<Vec<f64>>,
    /// `default_system`: overrides the template's default system prompt.
    pub default_system: Option<String>,
    /// `enable_thinking` for reasoning templates (default true).
    pub enable_thinking: bool,
    /// `preserve_thinking`: keep earlier turns' thoughts for reasoning templates (default false).
    pub preserve_thinking: bool,
    /// Text substitutions applied to every message and system prompt after conversion, e.g.
    /// `("{{name}}", "Termie")` for the identity dataset (termtune's `identity_name`/`identity_author`).
    pub placeholders: Vec<(String, String)>,
    /// `tool_format`: overrides the template's tool format (`default`, `qwen`, `llama3`, `mistral`).
    pub tool_format: Option<String>,
    /// `seed` (default 42).
    pub seed: u64,
    pub stage: Stage,
    /// For statistics (steps per epoch) and the batch collator.
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    pub max_steps: Option<usize>,
    /// Ignore and rewrite the tokenised-dataset cache.
    pub overwrite_cache: bool,
    /// Folder of the tokenised-dataset cache (default: `$TERMTUNE_CACHE`, `$XDG_CACHE_HOME/termtune` or
    /// `~/.cache/termtune`, then `datasets/`). Entries are keyed by contents, so one folder serves all runs.
    pub tokenized_path: Option<PathBuf>,
    /// How to reach the Hugging Face Hub for hub datasets (`None`: from the environment, as for models).
    pub hub: Option<crate::engine::hub::HubOptions>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            dataset: Vec::new(),
            eval_dataset: Vec::new(),
            dataset_dir: PathBuf::from("data"),
            template: None,
            cutoff_len: 2048,
            train_on_prompt: false,
            mask_history: false,
            max_samples: None,
            val_size: ValSize::None,
            packing: None,
            neat_packing: false,
            streaming: false,
            buffer_size: 16384,
            mix_strategy: MixStrategy::Concat,
            interleave_probs: None,
            default_system: None,
            enable_thinking: true,
            preserve_thinking: false,
            placeholders: Vec::new(),
            tool_format: None,
            seed: 42,
            stage: Stage::Sft,
            per_device_train_batch_size: 1,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: None,
            overwrite_cache: false,
            tokenized_path: None,
            hub: None,
        }
    }
}

impl DataOptions {
    /// Whether examples are packed: `neat_packing` implies it; unset → on for `pt` only (LLaMA-Factory).
    pub fn packing_enabled(&self) -> bool {
        self.neat_packing || self.packing.unwrap_or(self.stage == Stage::Pt)
    }
}
