//! Text generation with a KV cache: greedy or sampled, streamed token by token, cancellable.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;

use super::error::{EngineError, Result};
use super::model::{KvCache, Model};

/// Sampling settings (LLaMA-Factory / transformers names and meanings).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// ≤ 0 → greedy.
    pub temperature: f64,
    /// None or ≥ 1 → disabled.
    pub top_p: Option<f64>,
    /// None or 0 → disabled.
    pub top_k: Option<usize>,
    /// 1.0 → disabled (applied over prompt + generated tokens, as transformers does).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 512,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repetition_penalty: 1.0,
            seed: 42,
        }
    }
}

impl GenerationParams {
    fn sampling(&self) -> Sampling {
        if self.temperature <= 0.0 {
            return Sampling::ArgMax;
        }
        let temperature = self.temperature;
        let p = self.top_p.filter(|p| *p < 1.0);
        let k = self.top_k.filter(|k| *k > 0);
        match (k, p) {
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (None, None) => Sampling::All { temperature },
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop id was produced (not included in the output).
    Stop(u32),
    MaxTokens,
    Cancelled,
}

/// Where the time of one generation went: the prompt's forward pass (with the first token's sampling) and the
/// forward passes of the tokens after it (one each, the stop token's included).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GenerationTiming {
    /// Prompt tokens read (those after the ones a [`PromptCache`] already held).
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from a [`PromptCache`] (not read again).
    pub cached_tokens: usize,
    pub prompt: Duration,
    /// Forward passes after the prompt's.
    pub decoded_tokens: usize,
    pub decode: Duration,
}

impl GenerationTiming {
    fn per_sec(n: usize, d: Duration) -> f64 {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    }
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        Self::per_sec(self.prompt_tokens, self.prompt)
    }
    pub fn decode_tokens_per_sec(&self) -> f64 {
        Self::per_sec(self.decoded_tokens, self.decode)
    }
    /// `prompt 104 tokens in 0.41 s (253.7 tokens/s); decode 127 tokens in 1.62 s (78.4 tokens/s)`, with
    /// `prompt 12 tokens (+ 230 cached) in …` when a [`PromptCache`] held the first 230.
    pub fn describe(&self) -> String {
        let cached = if self.cached_tokens > 0 {
            format!(" (+ {} cached)", self.cached_tokens)
        } else {
            String::new()
        };
        format!(
            "prompt {} tokens{cached} in {:.2} s ({:.1} tokens/s); decode {} tokens in {:.2} s ({:.1} tokens/s)",
            self.prompt_tokens,
            self.prompt.as_secs_f64(),
            self.prompt_tokens_per_sec(),
            self.decoded_tokens,
            self.decode.as_secs_f64(),
            self.decode_tokens_per_sec()
        )
    }
}

/// Generate after `prompt_ids`. `on_token` sees each new id (stop ids excluded) and may break to cancel;
/// `cancel` is polled between tokens. Returns the new ids and why it stopped.
pub fn generate(
    model: &Model,
    prompt_ids: &[u32],
    params: &GenerationParams,
    stop_ids: &[u32],
    cancel: Option<&AtomicBool>,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<(Vec<u32>, StopReason)> {
    generate_timed(model, prompt_ids, params, stop_ids, cancel, on_token).map(|(o, s, _)| (o, s))
}

/// [`generate`], also saying where the time went (`on_token`'s own time included).
pub fn generate_timed(
    model: &Model,
    prompt_ids: &[u32],
    params: &GenerationParams,
    stop_ids: &[u32],
    cancel: Option<&AtomicBool>,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<(Vec<u32>, StopReason, GenerationTiming)> {
    let mut fresh = PromptCache::default();
    generate_cached(
        model, prompt_ids, params, stop_ids, cancel, &mut fresh, on_token,
    )
}

/// The KV cache a generation leaves behind and the tokens in it (the prompt and the answer's tokens read after
/// it), for the next generation of the same model: a prompt that starts with some of those tokens reads only the
/// tokens after them, as llama.cpp's server reuses a slot's cache (a chat's earlier turns and system prompt are
/// not read again each turn). The kept keys and values were computed when those tokens were read (a prompt's
/// product tiles or a decode step's kernels): with dense weights a reused prefix equals a recomputed one up to the
/// order of float additions (`tests/chat_smollm2.rs`); with a quantized GGUF each product rounds its activations to
/// 8 bits, so an answer's tokens read one at a time differ from a fresh read of them by a rounding step here and
/// there (2–3 % of the largest logit on SmolLM2's Q4_1 file; llama.cpp's own incremental read differs from its
/// fresh read by 1.9 % there).
#[derive(Default)]
pub struct PromptCache {
    held: Option<(Vec<u32>, KvCache)>,
}

impl PromptCache {
    /// Forgets what is held (its memory too).
    pub fn clear(&mut self) {
        self.held = None;
    }

    /// Tokens whose keys and values are held.
    pub fn len(&self) -> usize {
        self.held.as_ref().map_or(0, |(ids, _)| ids.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache for `prompt_ids` and how many of its first tokens it holds: the longest common prefix, short of
    /// the prompt's last token (its forward pass gives the first logits); the rest is truncated away.
    fn take_for(&mut self, model: &Model, prompt_ids: &[u32]) -> Result<(KvCache, usize)> {
        let Some((ids, mut cache)) = self.held.take() else {
            return Ok((KvCache::new(model.layers.len()), 0));
        };
        if cache.seq_len != ids.len() || cache.num_layers() != model.layers.len() {
            return Ok((KvCache::new(model.layers.len()), 0));
        }
        let common = ids
            .iter()
            .zip(prompt_ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt_ids.len().saturating_sub(1));
        cache.truncate(common)?;
        Ok((cache, common))
    }
}

/// [`generate_timed`] starting from what `prompt_cache` holds of the prompt, leaving it the cache of this
/// generation (emptied if the generation fails).
pub fn generate_cached(
    model: &Model,
    prompt_ids: &[u32],
    params: &GenerationParams,
    stop_ids: &[u32],
    cancel: Option<&AtomicBool>,
    prompt_cache: &mut PromptCache,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<(Vec<u32>, StopReason, GenerationTiming)> {
    if prompt_ids.is_empty() {
        return Err(EngineError::Invalid(
            "generation needs a non-empty prompt".into(),
        ));
    }
    let (mut cache, cached) = prompt_cache.take_for(model, prompt_ids)?;
    let mut read: Vec<u32> = prompt_ids[..cached].to_vec();
    let out = generate_with(
        model,
        prompt_ids,
        params,
        stop_ids,
        cancel,
        (&mut cache, cached, &mut read),
        on_token,
    )?;
    prompt_cache.held = Some((read, cache));
    Ok(out)
}

/// The generation loop: the prompt from `cached` on is read into `cache` (which holds its first `cached` tokens),
/// every token read is appended to `read`.
fn generate_with(
    model: &Model,
    prompt_ids: &[u32],
    params: &GenerationParams,
    stop_ids: &[u32],
    cancel: Option<&AtomicBool>,
    (cache, cached, read): (&mut KvCache, usize, &mut Vec<u32>),
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<(Vec<u32>, StopReason, GenerationTiming)> {
    let mut lp = LogitsProcessor::from_sampling(params.seed, params.sampling());
    let mut context: Vec<u32> = prompt_ids.to_vec();
    let mut out = Vec::new();
    let mut input_ids: Vec<u32> = prompt_ids[cached..].to_vec();
    let mut timing = GenerationTiming {
        prompt_tokens: prompt_ids.len() - cached,
        cached_tokens: cached,
        ..GenerationTiming::default()
    };
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let done = |timing: &mut GenerationTiming, first: Option<Instant>, forwards: usize| {
        let now = Instant::now();
        match first {
            None => timing.prompt = now - start,
            Some(f) => {
                timing.prompt = f - start;
                timing.decode = now - f;
                timing.decoded_tokens = forwards.saturating_sub(1);
            }
        }
        *timing
    };
    for step in 0..params.max_new_tokens {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Ok((out, StopReason::Cancelled, done(&mut timing, first, step)));
        }
        let input = Tensor::new(input_ids.as_slice(), &model.device)?.unsqueeze(0)?;
        let logits = model.forward_cached(&input, cache, true)?;
        read.append(&mut input_ids);
        let mut logits = Model::last_logits(&logits)?.to_dtype(DType::F32)?;
        if params.repetition_penalty != 1.0 {
            logits = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                params.repetition_penalty,
                &context,
            )?;
        }
        let next = lp.sample(&logits)?;
        if first.is_none() {
            first = Some(Instant::now());
        }
        if stop_ids.contains(&next) {
            let t = done(&mut timing, first, step + 1);
            return Ok((out, StopReason::Stop(next), t));
        }
        out.push(next);
        context.push(next);
        if on_token(next).is_break() {
            let t = done(&mut timing, first, step + 1);
            return Ok((out, StopReason::Cancelled, t));
        }
        input_ids.push(next);
    }
    let t = done(&mut timing, first, params.max_new_tokens);
    Ok((out, StopReason::MaxTokens, t))
}

/// Generate after each of `prompts` at once, left-padded into one batch with a KV cache (what
/// transformers' `generate` does for a batch). Each row samples with its own generator seeded with
/// `params.seed`, so a row's answer does not depend on the batch it is in (greedy rows equal
/// [`generate`] up to floating-point summation order). Finished rows leave the batch. `on_token(row, id)`
/// sees each new id; `cancel` is polled between steps (remaining rows end [`StopReason::Cancelled`]).
pub fn generate_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    stop_ids: &[u32],
    cancel: Option<&AtomicBool>,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<(Vec<u32>, StopReason)>> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(EngineError::Invalid(format!(
            "generation needs a non-empty prompt (batch row {i} is empty)"
        )));
    }
    let n = prompts.len();
    let mut outs: Vec<(Vec<u32>, StopReason)> = vec![(Vec::new(), StopReason::MaxTokens); n];
    if n == 0 || params.max_new_tokens == 0 {
        return Ok(outs);
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Live rows: (original index, left padding, generator, context for the repetition penalty).
    let mut live: Vec<(usize, usize, LogitsProcessor, Vec<u32>)> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                i,
                longest - p.len(),
                LogitsProcessor::from_sampling(params.seed, params.sampling()),
                p.clone(),
            )
        })
        .collect();
    let mut ids: Vec<u32> = Vec::with_capacity(n * longest);
    for p in prompts {
        ids.extend(std::iter::repeat_n(0, longest - p.len()));
        ids.extend_from_slice(p);
    }
    let mut input = Tensor::from_vec(ids, (n, longest), &model.device)?;
    let mut cache = KvCache::new(model.layers.len());
    for _ in 0..params.max_new_tokens {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            for (i, ..) in &live {
                outs[*i].1 = StopReason::Cancelled;
            }
            return Ok(outs);
        }
        let pads: Vec<usize> = live.iter().map(|r| r.1).collect();
        let logits = model.forward_cached_padded(&input, &mut cache, &pads, true)?;
        // (rows, 1, vocab) → (rows, vocab) on the host: one copy per step, then each row samples.
        let logits = logits
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        let mut keep = Vec::with_capacity(live.len());
        let mut next_ids = Vec::with_capacity(live.len());
        for (row, (i, _, lp, context)) in live.iter_mut().enumerate() {
            let mut l = logits.get(row)?;
            if params.repetition_penalty != 1.0 {
                l = candle_transformers::utils::apply_repeat_penalty(
                    &l,
                    params.repetition_penalty,
                    context,
                )?;
            }
            let next = lp.sample(&l)?;
            if stop_ids.contains(&next) {
                outs[*i].1 = StopReason::Stop(next);
                continue;
            }
            outs[*i].0.push(next);
            context.push(next);
            on_token(*i, next);
            keep.push(row);
            next_ids.push(next);
        }
        if keep.is_empty() {
            return Ok(outs);
        }
        if keep.len() < live.len() {
            cache.select_rows(&keep)?;
            let mut it = keep.iter().peekable();
            let mut row = 0;
            live.retain(|_| {
                let k = it.peek().is_some_and(|&&r| r == row);
                if k {
                    it.next();
                }
                row += 1;
                k
            });
        }
        let b = next_ids.len();
        input = Tensor::from_vec(next_ids, (b, 1), &model.device)?;
    }
    Ok(outs)
}

/// Incremental detokeniser: emits text only once it is complete UTF-8 (a multi-byte character split across
/// byte-level tokens is held back until its last byte arrives). Same offsets scheme as TGI/candle examples.
pub struct TextStreamer<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> TextStreamer<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Add a token; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tokens.push(id);
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.tokens[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (e.g. an incomplete character at the end), decoded lossily.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(full
            .strip_prefix(prefix.as_str())
            .filter(|d| !d.is_empty())
            .map(String::from))
    }
}

/// The answer to an already-rendered prompt (what `termtune chat --prompt` prints).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAnswer {
    pub text: String,
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub timing: GenerationTiming,
}

/// Encode a rendered prompt (the chat template already applied, so no extra special tokens are added), generate,
/// and stream text pieces to `on_text` (return `Break` to stop).
pub fn chat_completion(
    model: &Model,
    tokenizer: &Tokenizer,
    rendered_prompt: &str,
    params: &GenerationParams,
    stop_ids: &[u32],
    cancel: Option<&AtomicBool>,
    on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<ChatAnswer> {
    let enc = tokenizer
        .encode(rendered_prompt, false)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    stream_answer(
        model,
        tokenizer,
        enc.get_ids(),
        params,
        stop_ids,
        cancel,
        &mut PromptCache::default(),
        on_text,
    )
}

/// Generates after `prompt_ids` (from what `prompt_cache` holds of them) and streams the answer as text pieces to
/// `on_text` (complete UTF-8 only; return `Break` to stop). The one detokenising loop of `termtune chat`, the chat
/// pane and `termtune api`.
#[allow(clippy::too_many_arguments)]
pub fn stream_answer(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerationParams,
    stop_ids: &[u32],
    cancel: Option<&AtomicBool>,
    prompt_cache: &mut PromptCache,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<ChatAnswer> {
    let mut streamer = TextStreamer::new(tokenizer);
    let mut text = String::new();
    let mut err: Option<EngineError> = None;
    let (tokens, stop, timing) = generate_cached(
        model,
        prompt_ids,
        params,
        stop_ids,
        cancel,
        prompt_cache,
        |id| match streamer.push(id) {
            Ok(Some(piece)) => {
                text.push_str(&piece);
                on_text(&piece)
            }
            Ok(None) => ControlFlow::Continue(()),
            Err(e) => {
                err = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    if let Some(e) = err {
        return Err(e);
    }
    if let Some(rest) = streamer.finish()? {
        text.push_str(&rest);
        let _ = on_text(&rest);
    }
    Ok(ChatAnswer {
        text,
        tokens,
        stop,
        timing,
    })
}

/// Stop ids from config.json `eos_token_id` plus `generation_config.json` `eos_token_id`, plus `extra`.
pub fn stop_ids(model: &Model, generation_config: &serde_json::Value, extra: &[u32]) -> Vec<u32> {
    let mut ids = model.cfg.eos_token_ids.clone();
    match generation_config.get("eos_token_id") {
        Some(serde_json::Value::Array(a)) => {
            ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
        }
        Some(v) => ids.extend(v.as_u64().map(|v| v as u32)),
        None => {}
    }
    ids.extend_from_slice(extra);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A model ready for chat: weights (adapters merged), tokenizer, stop ids and the tokenizer config
/// (chat_template, bos/eos tokens) for the template renderer.
pub struct ChatModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub stop_ids: Vec<u32>,
    pub tokenizer_config: serde_json::Value,
}

/// Load a local HF folder for `termtune chat --model DIR [--adapter A[,B]]`: adapters are merged into the base
/// (LLaMA-Factory's inference behaviour). Stop ids = config + generation_config eos ids + the id of the
/// tokenizer_config `eos_token`, when it names a token.
pub fn load_chat_model(
    model_dir: &std::path::Path,
    adapters: &[std::path::PathBuf],
    dtype: DType,
    device: &candle_core::Device,
) -> Result<ChatModel> {
    let mut files = super::weights::load_hf_folder(model_dir, dtype, device)?;
    let mut model = Model::from_files(&files, dtype, device, &super::model::Finetune::Frozen)?;
    files.release_weights();
    super::adapter::merge_adapters(&mut model, adapters)?;
    let tokenizer = files
        .tokenizer
        .ok_or_else(|| super::error::EngineError::File {
            path: model_dir.join("tokenizer.json"),
            why: "missing; chat needs the model's tokenizer.json".into(),
        })?;
    Ok(ChatModel::new(
        model,
        tokenizer,
        files.tokenizer_config,
        &files.generation_config,
    ))
}

impl ChatModel {
    /// Assemble from parts (e.g. a GGUF model: `Model::from_tensors` + the tokenizer built from its metadata).
    /// Stop ids = config + generation_config eos ids + the id of tokenizer_config's `eos_token`.
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        tokenizer_config: serde_json::Value,
        generation_config: &serde_json::Value,
    ) -> Self {
        let eos_tok = match tokenizer_config.get("eos_token") {
            Some(serde_json::Value::String(s)) => tokenizer.token_to_id(s),
            Some(v) => v
                .get("content")
                .and_then(|c| c.as_str())
                .and_then(|s| tokenizer.token_to_id(s)),
            None => None,
        };
        let stop_ids = stop_ids(&model, generation_config, eos_tok.as_slice());
        Self {
            model,
            tokenizer,
            stop_ids,
            tokenizer_config,
        }
    }
}
