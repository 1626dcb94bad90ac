//! A template bound to a tokenizer: special-token fixes (`fix_special_tokens`), per-piece tokenisation,
//! stop tokens, warnings, and chat prompts for generation.

use serde_json::Value as Json;
use tokenizers::{AddedToken, Tokenizer};

use super::convert::{Message, Role};
use super::jinja::{JinjaTemplate, parse_template};
use super::reader::SkipReason;
use super::template::{BUILTIN_NAMES, Slot, Template, builtin, find_markers};
use super::tools::ToolFormat;
use super::{DataError, DataOptions};

/// A template + tokenizer, ready to encode conversations.
#[derive(Debug)]
pub struct Encoder {
    pub template: Template,
    /// The tokenizer after the template's fixes (eos replaced, stop words added).
    pub tokenizer: Tokenizer,
    pub bos: Option<(String, u32)>,
    pub eos: (String, u32),
    pub pad_id: u32,
    /// Generation stops at any of these (eos + stop words).
    pub stop_ids: Vec<u32>,
    /// `add_bos_token` of the tokenizer config (used by `pt` without packing).
    pub add_bos_token: bool,
    /// Tokens that were not in the vocabulary and were added (the model's embeddings must grow).
    pub added_tokens: Vec<String>,
    /// The tokenizer's own chat template when `template` is unset (used for chat prompts).
    pub jinja: Option<JinjaTemplate>,
    /// Warnings for the user (base model with a chat template, missing special tokens, …).
    pub warnings: Vec<String>,
    /// `default_system` of the options; with the tokenizer's Jinja template it is sent as a system message.
    pub default_system_override: Option<String>,
    /// Ids of the pieces that repeat in every example (content-free slots, the default system block),
    /// tokenised once.
    static_pieces: std::collections::HashMap<String, Vec<u32>>,
}

/// (prompt ids, answer ids) of one turn.
pub type TurnIds = (Vec<u32>, Vec<u32>);

/// A rendered chat prompt for generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    pub text: String,
    pub ids: Vec<u32>,
    pub stop_ids: Vec<u32>,
}

/// A special token of `tokenizer_config.json` (a string or an AddedToken object with `content`).
pub fn config_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The `chat_template` of a tokenizer config: a string, or the `default` entry of a list of named ones.
pub fn config_chat_template(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    }
}

impl Encoder {
    /// Resolves `opts.template` (or the tokenizer's `chat_template`) against `tokenizer`, applying
    /// `default_system`, `tool_format`, `enable_thinking` and the special-token fixes.
    pub fn new(
        opts: &DataOptions,
        tokenizer: &Tokenizer,
        tokenizer_config: &Json,
    ) -> Result<Encoder, DataError> {
        let mut warnings = Vec::new();
        let bos_token = config_token(tokenizer_config, "bos_token");
        let eos_token = config_token(tokenizer_config, "eos_token");
        let chat_template = config_chat_template(tokenizer_config);
        let mut jinja = None;
        let mut template = match opts.template.as_deref() {
            Some(name) => builtin(name).ok_or_else(|| DataError::UnknownTemplate {
                name: name.to_string(),
                known: BUILTIN_NAMES.join(", "),
            })?,
            None => {
                if let Some(source) = &chat_template {
                    let mut j = JinjaTemplate::new(
                        source,
                        bos_token.as_deref().unwrap_or(""),
                        eos_token.as_deref().unwrap_or(""),
                    )?;
                    let empty = tokenizer
                        .encode("", true)
                        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
                    let prefix = tokenizer
                        .decode(empty.get_ids(), false)
                        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
                    let t = parse_template(&j, &prefix)?;
                    // Chat prompts pass `enable_thinking: false` to Qwen3-style templates when asked to.
                    j.enable_thinking = (!opts.enable_thinking).then_some(false);
                    jinja = Some(j);
                    t
                } else {
                    warnings.push(
                        "`template` is not set and the tokenizer has no chat_template: using the `empty` template (raw text, no end token)"
                            .to_string(),
                    );
                    builtin("empty")
                        .ok_or_else(|| DataError::Tokenizer("missing builtin `empty`".into()))?
                }
            }
        };
        if opts.train_on_prompt && template.efficient_eos {
            return Err(DataError::Option {
                key: "train_on_prompt",
                message: format!(
                    "template `{}` does not support `train_on_prompt`",
                    template.name
                ),
            });
        }
        if let Some(tf) = opts.tool_format.as_deref() {
            let format = ToolFormat::parse(tf).ok_or_else(|| DataError::Option {
                key: "tool_format",
                message: format!(
                    "unknown tool format `{tf}`; use one of {}",
                    ToolFormat::NAMES.join(", ")
                ),
            })?;
            template = template.with_tool_format(format);
        }
        if let Some(system) = &opts.default_system {
            template.default_system.clone_from(system);
        }
        template.enable_thinking = opts.enable_thinking;
        if template.class == super::template::TemplateClass::Reasoning {
            warnings.push(format!(
                "template `{}` is a reasoning template (an empty <think> block is added to answers without one); use the `_nothink` variant if the model is not a reasoning model",
                template.name
            ));
        }
        template.preserve_thinking = opts.preserve_thinking;

        // Warnings before the tokenizer is changed.
        if opts.template.is_some() && !template.is_base_template() && chat_template.is_none() {
            warnings.push(format!(
                "the tokenizer has no chat_template, so this looks like a base model, but template `{}` is a chat template; base models usually train with `default` or `alpaca`",
                template.name
            ));
        }
        let mut missing: Vec<String> = template
            .marker_texts()
            .into_iter()
            .flat_map(find_markers)
            .chain(template.stop_words.iter().cloned())
            .filter(|m| tokenizer.token_to_id(m).is_none())
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            warnings.push(format!(
                "template `{}` uses {} which the tokenizer does not have as tokens: they will be split into plain text pieces (or added as new tokens if they are stop words); is this the model's template?",
                template.name,
                missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
            ));
        }

        // fix_special_tokens
        let mut tok = tokenizer.clone();
        let mut added_tokens = Vec::new();
        let mut add = |tok: &mut Tokenizer, word: &str| -> Result<u32, DataError> {
            let existing = tok.token_to_id(word);
            // Registering an existing token as special keeps its id (HF does the same).
            tok.add_special_tokens([AddedToken::from(word.to_string(), true)])
                .map_err(|e| DataError::Tokenizer(format!("cannot add `{word}`: {e}")))?;
            if existing.is_none() {
                added_tokens.push(word.to_string());
            }
            tok.token_to_id(word)
                .ok_or_else(|| DataError::Tokenizer(format!("`{word}` has no id after adding it")))
        };
        let mut stop_words: &[String] = &template.stop_words;
        let eos = if template.replace_eos {
            let Some(first) = template.stop_words.first() else {
                return Err(DataError::Tokenizer(
                    "stop words are required to replace the eos token".into(),
                ));
            };
            stop_words = &template.stop_words[1..];
            let id = add(&mut tok, first)?;
            (first.clone(), id)
        } else if let Some(e) = eos_token
            .as_deref()
            .and_then(|e| tok.token_to_id(e).map(|id| (e.to_string(), id)))
        {
            e
        } else {
            let id = add(&mut tok, "<|endoftext|>")?;
            ("<|endoftext|>".to_string(), id)
        };
        let pad_id = config_token(tokenizer_config, "pad_token")
            .and_then(|p| tok.token_to_id(&p))
            .unwrap_or(eos.1);
        let mut stop_ids = vec![eos.1];
        for w in stop_words {
            let id = add(&mut tok, w)?;
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        if !added_tokens.is_empty() {
            warnings.push(format!(
                "added {} new token(s) to the tokenizer ({}): the model's embeddings must be resized",
                added_tokens.len(),
                added_tokens.join(", ")
            ));
        }
        let bos = bos_token.and_then(|b| tok.token_to_id(&b).map(|id| (b, id)));
        let add_bos_token = tokenizer_config
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        Ok(Encoder {
            template,
            tokenizer: tok,
            bos,
            eos,
            pad_id,
            stop_ids,
            add_bos_token,
            added_tokens,
            jinja,
            warnings,
            default_system_override: opts.default_system.clone(),
            static_pieces: std::collections::HashMap::new(),
        }
        .with_static_pieces())
    }

    fn with_static_pieces(mut self) -> Self {
        let t = &self.template;
        let mut texts: Vec<String> = [
            &t.format_user,
            &t.format_assistant,
            &t.format_system,
            &t.format_observation,
            &t.format_function,
            &t.format_prefix,
        ]
        .into_iter()
        .flatten()
        .filter_map(|s| match s {
            Slot::Text(x) if !x.contains("{{content}}") => Some(x.clone()),
            _ => None,
        })
        .collect();
        if !t.default_system.is_empty() {
            texts.extend(
                super::template::apply(&t.format_system, &t.default_system)
                    .into_iter()
                    .filter_map(|s| match s {
                        Slot::Text(x) => Some(x),
                        _ => None,
                    }),
            );
        }
        texts.push(t.empty_thought());
        let pieces = texts
            .into_iter()
            .filter(|x| !x.is_empty())
            .map(|x| {
                let ids = self.encode_uncached(&x);
                (x, ids)
            })
            .collect();
        self.static_pieces = pieces;
        self
    }

    fn encode_uncached(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// Identifies template + tokenizer (+ special tokens) for the tokenised-dataset cache key.
    pub fn fingerprint(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}|{:?}|{}|{}",
            self.template,
            self.bos,
            self.eos,
            self.stop_ids,
            self.add_bos_token,
            self.tokenizer.to_string(false).unwrap_or_default()
        )
    }

    /// Tokenises one text piece without special-token post-processing (`add_special_tokens=False`).
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        if let Some(ids) = self.static_pieces.get(text) {
            return ids.clone();
        }
        self.encode_uncached(text)
    }

    /// `_convert_elements_to_ids`: each element is tokenised on its own.
    pub fn slots_to_ids(&self, slots: &[Slot]) -> Vec<u32> {
        let mut ids = Vec::new();
        for s in slots {
            match s {
                Slot::Text(t) => ids.extend(self.encode_text(t)),
                Slot::Token(t) => match self.tokenizer.token_to_id(t) {
                    Some(id) => ids.push(id),
                    None => ids.extend(self.encode_text(t)),
                },
                Slot::Bos => {
                    if let Some((_, id)) = &self.bos {
                        ids.push(*id);
                    }
                }
                Slot::Eos => ids.push(self.eos.1),
            }
        }
        ids
    }

    /// The text of elements, as LLaMA-Factory's generated Jinja would print it.
    pub fn slots_to_text(&self, slots: &[Slot]) -> String {
        let mut out = String::new();
        for s in slots {
            match s {
                Slot::Text(t) | Slot::Token(t) => out.push_str(t),
                Slot::Bos => {
                    if let Some((b, _)) = &self.bos {
                        out.push_str(b);
                    }
                }
                Slot::Eos => out.push_str(&self.eos.0),
            }
        }
        out
    }

    /// `encode_multiturn`: (prompt ids, answer ids) per turn (see [`Template::multiturn_elements`]).
    pub fn encode_multiturn(
        &self,
        messages: &[Message],
        system: &str,
        tools: &str,
        discard_history_cot: bool,
    ) -> Result<Vec<TurnIds>, SkipReason> {
        Ok(self
            .template
            .multiturn_elements(messages, system, tools, discard_history_cot)?
            .iter()
            .map(|(p, a)| (self.slots_to_ids(p), self.slots_to_ids(a)))
            .collect())
    }

    /// `encode_oneturn`: (prompt ids, answer ids) where the answer is the last message.
    pub fn encode_oneturn(
        &self,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Result<TurnIds, SkipReason> {
        let (p, a) = self.template.oneturn_elements(messages, system, tools)?;
        Ok((self.slots_to_ids(&p), self.slots_to_ids(&a)))
    }

    /// The rendered text of each (prompt, answer) turn.
    pub fn render_multiturn(
        &self,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Result<Vec<(String, String)>, SkipReason> {
        Ok(self
            .template
            .multiturn_elements(messages, system, tools, false)?
            .iter()
            .map(|(p, a)| (self.slots_to_text(p), self.slots_to_text(a)))
            .collect())
    }

    /// A chat prompt for generation: `system` (None → the template's default) + `turns` (alternating
    /// user/assistant, ending with a user turn) + the generation prompt. With a named template this is
    /// LLaMA-Factory's `encode_oneturn` with an empty answer; without one, the tokenizer's own Jinja
    /// template renders it (`add_generation_prompt=True`) and the whole text is tokenised.
    pub fn chat_prompt(
        &self,
        system: Option<&str>,
        turns: &[Message],
    ) -> Result<ChatPrompt, DataError> {
        self.chat_prompt_with_tools(system, turns, "")
    }

    /// [`Encoder::chat_prompt`] with `tools` (a JSON list of function schemas, "" for none) and turns
    /// that may include function calls ([`Role::Function`], the call as JSON `{"name", "arguments"}` or
    /// a list of them) and tool results ([`Role::Observation`]); the last turn is a user turn or a tool
    /// result. They are rendered by the template's formatters and its tool format, the code that
    /// encodes training data (LLaMA-Factory's `chat_model.chat(messages, system, tools)`). The
    /// tokenizer's own Jinja template has no tool format: tools need a named template.
    pub fn chat_prompt_with_tools(
        &self,
        system: Option<&str>,
        turns: &[Message],
        tools: &str,
    ) -> Result<ChatPrompt, DataError> {
        let bad = |m: String| DataError::Option {
            key: "chat",
            message: m,
        };
        if !matches!(
            turns.last().map(|m| m.role),
            Some(Role::User | Role::Observation)
        ) {
            return Err(bad(
                "the conversation must end with a user message or a tool result".into(),
            ));
        }
        let uses_tools = !tools.is_empty()
            || turns
                .iter()
                .any(|m| matches!(m.role, Role::Function | Role::Observation));
        if let Some(j) = &self.jinja {
            if uses_tools {
                return Err(DataError::Option {
                    key: "template",
                    message: format!(
                        "template `{}` (the tokenizer's own chat_template, used because the preset sets no \
                         `template`) has no tool format, so it cannot render tools, function calls or tool \
                         results; set `template:` in the preset to the model's LLaMA-Factory template (e.g. \
                         `qwen`, `llama3`, `mistral`, `chatml`), whose tool format (`tool_format:` to change \
                         it) renders them as training does",
                        self.template.name
                    ),
                });
            }
            let mut msgs = Vec::new();
            let system = system
                .map(str::to_string)
                .or_else(|| self.default_system_override.clone());
            if let Some(s) = system {
                msgs.push(serde_json::json!({"role": "system", "content": s}));
            }
            for m in turns {
                msgs.push(serde_json::json!({"role": m.role.as_str(), "content": m.content}));
            }
            let text = j.render(&Json::Array(msgs), true, None)?;
            let ids = self.encode_text(&text);
            return Ok(ChatPrompt {
                text,
                ids,
                stop_ids: self.stop_ids.clone(),
            });
        }
        let mut messages = turns.to_vec();
        messages.push(Message::new(Role::Assistant, ""));
        let (prompt, _) = self
            .template
            .oneturn_elements(&messages, system.unwrap_or(""), tools)
            .map_err(|e| bad(e.to_string()))?;
        Ok(ChatPrompt {
            text: self.slots_to_text(&prompt),
            ids: self.slots_to_ids(&prompt),
            stop_ids: self.stop_ids.clone(),
        })
    }
}
