//! Slot-based chat templates, a port of LLaMA-Factory's `data/template.py` + `formatter.py`.
//!
//! A formatter is a list of [`Slot`]s: text with a `{{content}}` placeholder, a named token, or the
//! tokenizer's bos/eos. [`Template::encode_elements`] turns a conversation into one element list per
//! message (turn 0 carries prefix + system + tools); the [`super::Encoder`] tokenises each element
//! separately, which is what LLaMA-Factory does (per-piece tokenisation, see LLAMAFACTORY_NOTES §5).

use super::convert::{Message, Role};
use super::reader::SkipReason;
use super::tools::{ToolFormat, format_function, format_tools, today_dmy};

/// One piece of a formatter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Literal text; `{{content}}` is replaced (once) by the message content.
    Text(String),
    /// A token by name (`{"token": "<x>"}`).
    Token(String),
    /// The tokenizer's bos token (`{"bos_token"}`); nothing when the tokenizer has none.
    Bos,
    /// The tokenizer's eos token (`{"eos_token"}`), after `replace_eos`.
    Eos,
}

fn t(s: &str) -> Slot {
    Slot::Text(s.to_string())
}

/// (prompt elements, answer elements) of one turn.
pub type TurnSlots = (Vec<Slot>, Vec<Slot>);

/// How turn 0 carries the system prompt (`template_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemplateClass {
    /// `Template`: prefix + system as its own block before the first user message.
    Plain,
    /// `Llama2Template`: the system text is fused into the first user message.
    Llama2,
    /// `ReasoningTemplate`: adds an empty `<think>` block to answers without one.
    Reasoning,
}

/// A chat template (LLaMA-Factory's `register_template` fields).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Template {
    pub name: String,
    pub class: TemplateClass,
    pub format_user: Vec<Slot>,
    pub format_assistant: Vec<Slot>,
    pub format_system: Vec<Slot>,
    pub format_function: Vec<Slot>,
    pub function_tool_format: ToolFormat,
    pub format_observation: Vec<Slot>,
    pub tool_format: ToolFormat,
    pub format_prefix: Vec<Slot>,
    pub default_system: String,
    pub stop_words: Vec<String>,
    pub thought_words: (String, String),
    pub efficient_eos: bool,
    pub replace_eos: bool,
    pub replace_jinja_template: bool,
    pub enable_thinking: bool,
    /// Keep the thoughts of earlier turns (LLaMA-Factory 0.9.5 `preserve_thinking`).
    pub preserve_thinking: bool,
}

/// The optional fields of `register_template`; `None` → LLaMA-Factory's default.
#[derive(Default)]
struct Reg {
    user: Option<Vec<Slot>>,
    assistant: Option<Vec<Slot>>,
    system: Option<Vec<Slot>>,
    function: Option<(Vec<Slot>, ToolFormat)>,
    observation: Option<Vec<Slot>>,
    tools: Option<ToolFormat>,
    prefix: Vec<Slot>,
    default_system: &'static str,
    stop_words: &'static [&'static str],
    efficient_eos: bool,
    replace_eos: bool,
    replace_jinja_template: bool,
    class: Option<TemplateClass>,
}

fn register(name: &str, r: Reg) -> Template {
    let default_slots = if r.efficient_eos {
        vec![t("{{content}}")]
    } else {
        vec![t("{{content}}"), Slot::Eos]
    };
    let content = vec![t("{{content}}")];
    let assistant = r.assistant.clone().unwrap_or_else(|| default_slots.clone());
    let (function, function_tool_format) = r.function.unwrap_or_else(|| {
        (
            r.assistant.clone().unwrap_or(default_slots),
            ToolFormat::Default,
        )
    });
    Template {
        name: name.to_string(),
        class: r.class.unwrap_or(TemplateClass::Plain),
        format_observation: r
            .observation
            .or_else(|| r.user.clone())
            .unwrap_or_else(|| content.clone()),
        format_user: r.user.unwrap_or_else(|| content.clone()),
        format_assistant: assistant,
        format_system: r.system.unwrap_or(content),
        format_function: function,
        function_tool_format,
        tool_format: r.tools.unwrap_or(ToolFormat::Default),
        format_prefix: r.prefix,
        default_system: r.default_system.to_string(),
        stop_words: r.stop_words.iter().map(|s| (*s).to_string()).collect(),
        thought_words: ("<think>\n".into(), "\n</think>\n\n".into()),
        efficient_eos: r.efficient_eos,
        replace_eos: r.replace_eos,
        replace_jinja_template: r.replace_jinja_template,
        enable_thinking: true,
        preserve_thinking: false,
    }
}

const QWEN_USER: &str = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n";
const QWEN_ASSISTANT: &str = "{{content}}<|im_end|>\n";
const QWEN_SYSTEM: &str = "<|im_start|>system\n{{content}}<|im_end|>\n";
const QWEN_OBSERVATION: &str = "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n";
const LLAMA3_USER: &str = "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";

fn qwen_like(name: &str, default_system: &'static str, class: TemplateClass) -> Template {
    register(
        name,
        Reg {
            user: Some(vec![t(QWEN_USER)]),
            assistant: Some(vec![t(QWEN_ASSISTANT)]),
            system: Some(vec![t(QWEN_SYSTEM)]),
            function: Some((vec![t(QWEN_ASSISTANT)], ToolFormat::Qwen)),
            observation: Some(vec![t(QWEN_OBSERVATION)]),
            tools: Some(ToolFormat::Qwen),
            default_system,
            stop_words: &["<|im_end|>"],
            replace_eos: true,
            class: Some(class),
            ..Reg::default()
        },
    )
}

fn smollm_like(name: &str, default_system: &'static str) -> Template {
    register(
        name,
        Reg {
            user: Some(vec![t(QWEN_USER)]),
            assistant: Some(vec![t(QWEN_ASSISTANT)]),
            system: Some(vec![t(QWEN_SYSTEM)]),
            default_system,
            stop_words: &["<|im_end|>"],
            ..Reg::default()
        },
    )
}

/// Names of the built-in templates.
pub const BUILTIN_NAMES: &[&str] = &[
    "alpaca",
    "chatml",
    "default",
    "empty",
    "gemma",
    "gemma3",
    "llama2",
    "llama3",
    "mistral",
    "phi4",
    "qwen",
    "qwen3",
    "qwen3_nothink",
    "smollm",
    "smollm2",
    "vicuna",
    "zephyr",
];

/// A built-in template by LLaMA-Factory name (definitions copied from `template.py`).
pub fn builtin(name: &str) -> Option<Template> {
    Some(match name {
        "alpaca" => register(
            name,
            Reg {
                user: Some(vec![t("### Instruction:\n{{content}}\n\n### Response:\n")]),
                assistant: Some(vec![t("{{content}}"), Slot::Eos, t("\n\n")]),
                default_system: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
                replace_jinja_template: true,
                ..Reg::default()
            },
        ),
        "chatml" => register(
            name,
            Reg {
                user: Some(vec![t(QWEN_USER)]),
                assistant: Some(vec![t(QWEN_ASSISTANT)]),
                system: Some(vec![t(QWEN_SYSTEM)]),
                observation: Some(vec![t(
                    "<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
                )]),
                stop_words: &["<|im_end|>", "<|im_start|>"],
                replace_eos: true,
                replace_jinja_template: true,
                ..Reg::default()
            },
        ),
        "default" => register(
            name,
            Reg {
                user: Some(vec![t("Human: {{content}}"), Slot::Eos, t("\nAssistant:")]),
                assistant: Some(vec![t("{{content}}"), Slot::Eos, t("\n")]),
                system: Some(vec![t("System: {{content}}"), Slot::Eos, t("\n")]),
                replace_jinja_template: true,
                ..Reg::default()
            },
        ),
        "empty" => register(
            name,
            Reg {
                assistant: Some(vec![t("{{content}}")]),
                ..Reg::default()
            },
        ),
        // LLaMA-Factory's gemma3 is gemma's text format (plus an image plugin termtune does not use).
        "gemma" | "gemma3" => register(
            name,
            Reg {
                user: Some(vec![t(
                    "<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
                )]),
                assistant: Some(vec![t("{{content}}<end_of_turn>\n")]),
                system: Some(vec![t("{{content}}\n\n")]),
                observation: Some(vec![t(
                    "<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
                )]),
                prefix: vec![Slot::Bos],
                stop_words: &["<end_of_turn>"],
                replace_eos: true,
                class: Some(TemplateClass::Llama2),
                ..Reg::default()
            },
        ),
        "llama2" => register(
            name,
            Reg {
                user: Some(vec![Slot::Bos, t("[INST] {{content}} [/INST]")]),
                system: Some(vec![t("<<SYS>>\n{{content}}\n<</SYS>>\n\n")]),
                class: Some(TemplateClass::Llama2),
                ..Reg::default()
            },
        ),
        "llama3" => register(
            name,
            Reg {
                user: Some(vec![t(LLAMA3_USER)]),
                assistant: Some(vec![t("{{content}}<|eot_id|>")]),
                system: Some(vec![t(
                    "<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
                )]),
                function: Some((vec![t("{{content}}<|eot_id|>")], ToolFormat::Llama3)),
                observation: Some(vec![t(
                    "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                )]),
                tools: Some(ToolFormat::Llama3),
                prefix: vec![Slot::Bos],
                stop_words: &["<|eot_id|>", "<|eom_id|>"],
                replace_eos: true,
                ..Reg::default()
            },
        ),
        "mistral" => register(
            name,
            Reg {
                user: Some(vec![t("[INST] {{content}}[/INST]")]),
                assistant: Some(vec![t(" {{content}}"), Slot::Eos]),
                system: Some(vec![t("{{content}}\n\n")]),
                function: Some((
                    vec![t("[TOOL_CALLS] {{content}}"), Slot::Eos],
                    ToolFormat::Mistral,
                )),
                observation: Some(vec![t(
                    "[TOOL_RESULTS] {\"content\": {{content}}}[/TOOL_RESULTS]",
                )]),
                tools: Some(ToolFormat::Mistral),
                prefix: vec![Slot::Bos],
                class: Some(TemplateClass::Llama2),
                ..Reg::default()
            },
        ),
        "phi4" => register(
            name,
            Reg {
                user: Some(vec![t(
                    "<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",
                )]),
                assistant: Some(vec![t("{{content}}<|im_end|>")]),
                system: Some(vec![t("<|im_start|>system<|im_sep|>{{content}}<|im_end|>")]),
                stop_words: &["<|im_end|>"],
                replace_eos: true,
                ..Reg::default()
            },
        ),
        "qwen" => qwen_like(
            name,
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            TemplateClass::Plain,
        ),
        "qwen3" => qwen_like(name, "", TemplateClass::Reasoning),
        "qwen3_nothink" => qwen_like(name, "", TemplateClass::Plain),
        "smollm" => smollm_like(name, ""),
        "smollm2" => smollm_like(
            name,
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
        ),
        "vicuna" => register(
            name,
            Reg {
                user: Some(vec![t("USER: {{content}} ASSISTANT:")]),
                default_system: "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.",
                replace_jinja_template: true,
                ..Reg::default()
            },
        ),
        "zephyr" => register(
            name,
            Reg {
                user: Some(vec![
                    t("<|user|>\n{{content}}"),
                    Slot::Eos,
                    t("<|assistant|>\n"),
                ]),
                system: Some(vec![t("<|system|>\n{{content}}"), Slot::Eos]),
                default_system: "You are Zephyr, a helpful assistant.",
                ..Reg::default()
            },
        ),
        _ => return None,
    })
}

/// `StringFormatter.apply`: replaces the first `{{content}}` of each text slot.
pub fn apply(slots: &[Slot], content: &str) -> Vec<Slot> {
    slots
        .iter()
        .map(|s| match s {
            Slot::Text(text) => Slot::Text(text.replacen("{{content}}", content, 1)),
            other => other.clone(),
        })
        .collect()
}

/// Removes every `thought_words.0 … thought_words.1` block, then leading newlines (`remove_thought`).
pub fn remove_thought(content: &str, thought: &(String, String)) -> String {
    let mut out = String::new();
    let mut rest = content;
    while let Some(start) = rest.find(&thought.0) {
        let after = &rest[start + thought.0.len()..];
        let Some(end) = after.find(&thought.1) else {
            break;
        };
        out.push_str(&rest[..start]);
        rest = &after[end + thought.1.len()..];
    }
    out.push_str(rest);
    out.trim_start_matches('\n').to_string()
}

impl Template {
    /// Builds a template from its definition, validating a `tool_format` override.
    pub fn with_tool_format(mut self, tool_format: ToolFormat) -> Self {
        // `get_template_and_fix_tokenizer`: the function formatter becomes the default slots.
        self.format_function = if self.efficient_eos {
            vec![t("{{content}}")]
        } else {
            vec![t("{{content}}"), Slot::Eos]
        };
        self.function_tool_format = tool_format;
        self.tool_format = tool_format;
        self
    }

    /// The empty thought (`add_thought()`), e.g. `<think>\n\n</think>\n\n`.
    pub fn empty_thought(&self) -> String {
        format!("{}{}", self.thought_words.0, self.thought_words.1)
    }

    fn has_thought(&self, content: &str) -> bool {
        content.contains(self.thought_words.0.trim())
            || content.contains(self.thought_words.1.trim())
    }

    /// `_encode`: one element list per message. `system` empty → the template's default system.
    pub fn encode_elements(
        &self,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Result<Vec<Vec<Slot>>, SkipReason> {
        let system = if system.is_empty() {
            self.default_system.as_str()
        } else {
            system
        };
        let mut encoded = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let mut elements = Vec::new();
            let mut system_text = String::new();
            if i == 0 {
                elements.extend(self.format_prefix.iter().cloned());
                if !system.is_empty() || !tools.is_empty() {
                    let tool_text = if tools.is_empty() {
                        String::new()
                    } else {
                        format_tools(self.tool_format, tools, &today_dmy())
                            .map_err(SkipReason::InvalidTools)?
                    };
                    let full = format!("{system}{tool_text}");
                    if self.class == TemplateClass::Llama2 {
                        if let Some(Slot::Text(s)) =
                            apply(&self.format_system, &full).into_iter().next()
                        {
                            system_text = s;
                        }
                    } else {
                        elements.extend(apply(&self.format_system, &full));
                    }
                }
            }
            match message.role {
                Role::User => {
                    let content = format!("{system_text}{}", message.content);
                    elements.extend(apply(&self.format_user, &content));
                }
                Role::Assistant => elements.extend(apply(&self.format_assistant, &message.content)),
                Role::Observation => {
                    elements.extend(apply(&self.format_observation, &message.content))
                }
                Role::Function => {
                    let thought_words =
                        (self.class != TemplateClass::Llama2).then_some(&self.thought_words);
                    let text = self.function_text(&message.content, thought_words)?;
                    elements.extend(apply(&self.format_function, &text));
                }
                Role::System => {
                    return Err(SkipReason::InvalidShape(
                        "a system message after the first turn".into(),
                    ));
                }
            }
            encoded.push(elements);
        }
        Ok(encoded)
    }

    /// `FunctionFormatter.apply` before the slots: a leading thought is kept, the JSON call is formatted.
    fn function_text(
        &self,
        content: &str,
        thought_words: Option<&(String, String)>,
    ) -> Result<String, SkipReason> {
        let mut thought = String::new();
        let mut body = content.to_string();
        if let Some((open, close)) = thought_words
            && let Some(start) = content.find(open.as_str())
            && let Some(end) = content[start + open.len()..].find(close.as_str())
        {
            let stop = start + open.len() + end + close.len();
            thought = content[start..stop].to_string();
            body = content.replacen(&thought, "", 1);
        }
        let text = format_function(self.function_tool_format, &body)
            .map_err(SkipReason::InvalidFunctionCall)?;
        Ok(format!("{thought}{text}"))
    }

    /// `encode_multiturn` as elements: (prompt, answer) pairs, with the reasoning template's empty thought.
    /// `discard_history_cot` (LLaMA-Factory 0.9.5: `mask_history and not preserve_thinking`) removes the
    /// thoughts of earlier answers and adds the empty thought to the last answer only.
    pub fn multiturn_elements(
        &self,
        messages: &[Message],
        system: &str,
        tools: &str,
        discard_history_cot: bool,
    ) -> Result<Vec<TurnSlots>, SkipReason> {
        let mut messages = messages.to_vec();
        let reasoning = self.class == TemplateClass::Reasoning;
        if reasoning && !self.enable_thinking {
            for m in messages.iter_mut().skip(1).step_by(2) {
                m.content = remove_thought(&m.content, &self.thought_words);
            }
        }
        let n = messages.len();
        if reasoning && discard_history_cot {
            for i in (1..n.saturating_sub(2)).step_by(2) {
                messages[i].content = remove_thought(&messages[i].content, &self.thought_words);
            }
        }
        let mut encoded = self.encode_elements(&messages, system, tools)?;
        if reasoning {
            let turns: Vec<usize> = if discard_history_cot {
                vec![n.saturating_sub(2)]
            } else {
                (0..n.saturating_sub(1)).step_by(2).collect()
            };
            for i in turns {
                if !self.has_thought(&messages[i + 1].content) {
                    if self.enable_thinking {
                        encoded[i + 1].insert(0, Slot::Text(self.empty_thought()));
                    } else {
                        encoded[i].push(Slot::Text(self.empty_thought()));
                    }
                }
            }
        }
        let mut pairs = Vec::new();
        let mut it = encoded.into_iter();
        while let (Some(p), Some(a)) = (it.next(), it.next()) {
            pairs.push((p, a));
        }
        Ok(pairs)
    }

    /// `encode_oneturn` as elements: everything but the last message is the prompt.
    pub fn oneturn_elements(
        &self,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Result<(Vec<Slot>, Vec<Slot>), SkipReason> {
        let mut messages = messages.to_vec();
        let n = messages.len();
        if self.class == TemplateClass::Reasoning {
            if !self.preserve_thinking {
                for i in (1..n.saturating_sub(2)).step_by(2) {
                    messages[i].content = remove_thought(&messages[i].content, &self.thought_words);
                }
            }
            if !self.enable_thinking
                && let Some(last) = messages.last_mut()
            {
                last.content = remove_thought(&last.content, &self.thought_words);
            }
        }
        let encoded = self.encode_elements(&messages, system, tools)?;
        let mut prompt: Vec<Slot> = Vec::new();
        let mut iter = encoded.into_iter();
        let mut response = Vec::new();
        for (i, e) in iter.by_ref().enumerate() {
            if i + 1 == n {
                response = e;
            } else {
                prompt.extend(e);
            }
        }
        if self.class == TemplateClass::Reasoning
            && messages
                .last()
                .is_some_and(|m| !self.has_thought(&m.content))
        {
            if self.enable_thinking {
                response.insert(0, Slot::Text(self.empty_thought()));
            } else {
                prompt.push(Slot::Text(self.empty_thought()));
            }
        }
        Ok((prompt, response))
    }

    /// All literal texts of the formatters (for the special-token check).
    pub fn marker_texts(&self) -> Vec<&str> {
        [
            &self.format_user,
            &self.format_assistant,
            &self.format_system,
            &self.format_observation,
            &self.format_prefix,
        ]
        .into_iter()
        .flatten()
        .filter_map(|s| match s {
            Slot::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
    }

    /// Templates meant for base models (no special chat tokens).
    pub fn is_base_template(&self) -> bool {
        matches!(
            self.name.as_str(),
            "default" | "alpaca" | "empty" | "vicuna"
        )
    }
}

/// Chat-marker-like substrings of `text`: `<|…|>` and gemma's `<start_of_turn>`-style turn markers, the
/// markers that a chat model's tokenizer has as special tokens. Bracket markers such as `[INST]` and tags
/// such as `<tool_response>` are plain text in several tokenizers, so they are not reported.
pub fn find_markers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let Some(len) = after.find('>') else { break };
        let inner = &after[..len];
        let bare = inner.trim_start_matches('/');
        let pipe = inner.len() >= 2
            && inner.starts_with('|')
            && inner.ends_with('|')
            && !inner.contains(' ');
        let word =
            bare.ends_with("_turn") && bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if pipe || word {
            out.push(format!("<{inner}>"));
            rest = &after[len + 1..];
        } else {
            rest = after;
        }
    }
    out
}
