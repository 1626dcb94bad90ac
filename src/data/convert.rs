//! Rows → LLaMA-Factory's internal form (`_prompt`, `_response`, `_system`, `_tools`), following
//! `data/converter.py` (alpaca, sharegpt, openai), with validation: a bad row is a [`SkipReason`].

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use super::Stage;
use super::reader::{Location, RawRow, SkipReason};
use super::registry::{DatasetAttr, Formatting};

/// Message role (LLaMA-Factory's `Role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    User,
    Assistant,
    System,
    Function,
    Observation,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Function => "function",
            Role::Observation => "observation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// One converted example: `prompt` alternates user/assistant and ends with a user (or observation) turn;
/// `response` holds one assistant message (SFT), two (chosen, rejected) for pairs, or for KTO the
/// answer plus an empty dummy. For `pt` the text is `prompt[0].content` and `response` is empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<Message>,
    pub response: Vec<Message>,
    pub system: String,
    pub tools: String,
    pub kto_tag: Option<bool>,
    /// Stage kto: an unrelated answer to this prompt for the KL estimate (the previous example's answer within
    /// its preprocessing batch, LLaMA-Factory's `FeedbackDatasetProcessor`); set by the pipeline.
    pub kl_answer: Option<Message>,
    pub file: Arc<PathBuf>,
    pub location: Location,
}

impl Example {
    /// A kto example's answer: the non-empty one of its two response slots (the first for a desirable answer, the
    /// second for an undesirable one, as LLaMA-Factory's feedback processor picks it).
    pub fn kto_answer(&self) -> Option<&Message> {
        self.response
            .iter()
            .find(|m| !m.content.is_empty())
            .or_else(|| self.response.get(1))
    }

    /// The example with each `(from, to)` substitution applied to every message and the system
    /// prompt (identity placeholders like `{{name}}`).
    #[must_use]
    pub fn filled(mut self, placeholders: &[(String, String)]) -> Example {
        if placeholders.is_empty() {
            return self;
        }
        let fill = |text: &mut String| {
            for (from, to) in placeholders {
                if text.contains(from.as_str()) {
                    *text = text.replace(from.as_str(), to);
                }
            }
        };
        for m in self.prompt.iter_mut().chain(self.response.iter_mut()) {
            fill(&mut m.content);
        }
        fill(&mut self.system);
        self
    }
}

fn opt_str(row: &Value, column: &str) -> Result<Option<String>, SkipReason> {
    match row.get(column) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(SkipReason::WrongType {
            column: column.to_string(),
            expected: "a string",
        }),
    }
}

fn req_str(row: &Value, column: &str) -> Result<String, SkipReason> {
    opt_str(row, column)?.ok_or_else(|| SkipReason::MissingColumn(column.to_string()))
}

/// The `tools` column as a JSON string (a list/object is serialised like Python's `json.dumps`).
fn tools_column(row: &Value, column: Option<&str>) -> Result<String, SkipReason> {
    let Some(column) = column else {
        return Ok(String::new());
    };
    match row.get(column) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v @ (Value::Array(_) | Value::Object(_))) => Ok(super::pyjson::dumps(v)),
        Some(_) => Err(SkipReason::WrongType {
            column: column.to_string(),
            expected: "a JSON string or list of tools",
        }),
    }
}

/// Converts one row of dataset `attr` for `stage`.
pub fn convert(attr: &DatasetAttr, row: &RawRow, stage: Stage) -> Result<Example, SkipReason> {
    let (prompt, response, system, tools, kto_tag) = match attr.formatting {
        Formatting::Alpaca => convert_alpaca(attr, &row.value, stage)?,
        Formatting::Sharegpt => convert_sharegpt(attr, &row.value, false)?,
        Formatting::Openai => convert_sharegpt(attr, &row.value, true)?,
    };
    let example = Example {
        prompt,
        response,
        system,
        tools,
        kto_tag,
        kl_answer: None,
        file: Arc::clone(&row.file),
        location: row.location,
    };
    validate(&example, stage, attr.ranking)?;
    Ok(example)
}

type Parts = (Vec<Message>, Vec<Message>, String, String, Option<bool>);

fn kto_value(row: &Value, attr: &DatasetAttr) -> Result<Option<bool>, SkipReason> {
    let Some(col) = attr.kto_tag.as_deref() else {
        return Ok(None);
    };
    match row.get(col) {
        Some(Value::Bool(b)) => Ok(Some(*b)),
        None | Some(Value::Null) => Err(SkipReason::MissingColumn(col.to_string())),
        Some(_) => Err(SkipReason::WrongType {
            column: col.to_string(),
            expected: "true or false",
        }),
    }
}

fn kto_response(answer: Message, tag: bool) -> Vec<Message> {
    let dummy = Message::new(Role::Assistant, "");
    if tag {
        vec![answer, dummy]
    } else {
        vec![dummy, answer]
    }
}

fn convert_alpaca(attr: &DatasetAttr, row: &Value, stage: Stage) -> Result<Parts, SkipReason> {
    let mut prompt = Vec::new();
    if let Some(col) = attr.history.as_deref() {
        match row.get(col) {
            None | Some(Value::Null) => {}
            Some(Value::Array(turns)) => {
                let bad = || SkipReason::WrongType {
                    column: col.to_string(),
                    expected: "a list of [query, answer] string pairs",
                };
                for turn in turns {
                    let pair = turn.as_array().ok_or_else(bad)?;
                    let (Some(q), Some(a)) = (
                        pair.first().and_then(Value::as_str),
                        pair.get(1).and_then(Value::as_str),
                    ) else {
                        return Err(bad());
                    };
                    if pair.len() != 2 {
                        return Err(bad());
                    }
                    prompt.push(Message::new(Role::User, q));
                    prompt.push(Message::new(Role::Assistant, a));
                }
            }
            Some(_) => {
                return Err(SkipReason::WrongType {
                    column: col.to_string(),
                    expected: "a list of [query, answer] string pairs",
                });
            }
        }
    }
    let instruction = opt_str(row, &attr.prompt)?;
    let input = opt_str(row, &attr.query)?;
    if instruction.is_none() && input.is_none() {
        return Err(SkipReason::MissingColumn(attr.prompt.clone()));
    }
    let query: Vec<String> = [instruction, input]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect();
    prompt.push(Message::new(Role::User, query.join("\n")));

    let system = match attr.system.as_deref() {
        Some(c) => opt_str(row, c)?.unwrap_or_default(),
        None => String::new(),
    };
    let tools = tools_column(row, attr.tools.as_deref())?;
    let kto_tag = kto_value(row, attr)?;
    let response = if let Some(tag) = kto_tag {
        kto_response(
            Message::new(Role::Assistant, req_str(row, &attr.response)?),
            tag,
        )
    } else if attr.ranking {
        let chosen_col = attr.chosen.as_deref().unwrap_or("chosen");
        let rejected_col = attr.rejected.as_deref().unwrap_or("rejected");
        let chosen = req_str(row, chosen_col)?;
        let rejected = req_str(row, rejected_col)?;
        vec![
            Message::new(Role::Assistant, chosen),
            Message::new(Role::Assistant, rejected),
        ]
    } else if stage == Stage::Pt {
        match opt_str(row, &attr.response)? {
            Some(r) => vec![Message::new(Role::Assistant, r)],
            None => Vec::new(),
        }
    } else {
        vec![Message::new(Role::Assistant, req_str(row, &attr.response)?)]
    };
    Ok((prompt, response, system, tools, kto_tag))
}

fn convert_sharegpt(attr: &DatasetAttr, row: &Value, openai: bool) -> Result<Parts, SkipReason> {
    let col = attr.messages.as_str();
    let messages = match row.get(col) {
        Some(Value::Array(m)) => m,
        None | Some(Value::Null) => return Err(SkipReason::MissingColumn(col.to_string())),
        Some(_) => {
            return Err(SkipReason::WrongType {
                column: col.to_string(),
                expected: "a list of messages",
            });
        }
    };
    let bad_msg = || SkipReason::WrongType {
        column: col.to_string(),
        expected: if openai {
            "a list of {role, content} objects with string content"
        } else {
            "a list of messages with string role and content tags"
        },
    };
    let role_of = |m: &Value| -> Result<String, SkipReason> {
        m.get(&attr.role_tag)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(bad_msg)
    };
    let content_of = |m: &Value| -> Result<String, SkipReason> {
        match m.get(&attr.content_tag) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Null) if openai => Ok(String::new()),
            _ => Err(bad_msg()),
        }
    };
    let tag_role = |tag: &str| -> Option<Role> {
        if tag == attr.user_tag {
            Some(Role::User)
        } else if tag == attr.assistant_tag {
            Some(Role::Assistant)
        } else if tag == attr.observation_tag {
            Some(Role::Observation)
        } else if tag == attr.function_tag {
            Some(Role::Function)
        } else if tag == attr.system_tag {
            Some(Role::System)
        } else {
            None
        }
    };

    let mut rest: &[Value] = messages;
    let mut system = String::new();
    if let Some(first) = messages.first()
        && !attr.system_tag.is_empty()
        && role_of(first)? == attr.system_tag
    {
        system = content_of(first)?;
        rest = &messages[1..];
    } else if let Some(c) = attr.system.as_deref() {
        system = opt_str(row, c)?.unwrap_or_default();
    }

    let mut aligned: Vec<(Message, String)> = Vec::new();
    if openai {
        let mut tool_responses: Vec<String> = Vec::new();
        for m in rest {
            let mut tag = role_of(m)?;
            let mut content = content_of(m)?;
            if (tag == attr.assistant_tag || tag == attr.function_tag)
                && let Some(Value::Array(calls)) = m.get("tool_calls")
                && !calls.is_empty()
            {
                let functions: Vec<Value> = calls
                    .iter()
                    .map(|c| c.get("function").cloned().unwrap_or(Value::Null))
                    .collect();
                content = super::pyjson::dumps(&Value::Array(functions));
                tag.clone_from(&attr.function_tag);
            }
            if tag == attr.observation_tag {
                tool_responses.push(content);
                continue;
            }
            if !tool_responses.is_empty() {
                let merged = tool_responses.join("\n</tool_response>\n<tool_response>\n");
                aligned.push((
                    Message::new(Role::Observation, merged),
                    attr.observation_tag.clone(),
                ));
                tool_responses.clear();
            }
            let role = tag_role(&tag).ok_or_else(|| unknown_role(aligned.len(), &tag))?;
            aligned.push((Message::new(role, content), tag));
        }
    } else {
        for m in rest {
            let tag = role_of(m)?;
            let role = tag_role(&tag).ok_or_else(|| unknown_role(aligned.len(), &tag))?;
            aligned.push((Message::new(role, content_of(m)?), tag));
        }
    }
    for (i, (msg, tag)) in aligned.iter().enumerate() {
        let ok = if i % 2 == 0 {
            matches!(msg.role, Role::User | Role::Observation)
        } else {
            matches!(msg.role, Role::Assistant | Role::Function)
        };
        if !ok {
            return Err(SkipReason::InvalidRoleOrder {
                position: i + 1,
                role: tag.clone(),
                expected: expected_tags(attr, i),
            });
        }
    }
    let count = aligned.len();
    if (!attr.ranking && !count.is_multiple_of(2))
        || (attr.ranking && count.is_multiple_of(2))
        || count == 0
    {
        return Err(SkipReason::InvalidMessageCount {
            count,
            expected: if attr.ranking {
                "an odd number (the prompt; answers are in chosen/rejected)"
            } else {
                "an even, non-zero number (user/assistant pairs)"
            },
        });
    }
    let mut messages: Vec<Message> = aligned.into_iter().map(|(m, _)| m).collect();

    let tools = tools_column(row, attr.tools.as_deref())?;
    if openai {
        // LLaMA-Factory's OpenAIDatasetConverter (read from its source): without tools it sets or appends
        // "detailed thinking off" unless a thinking switch is already in the system prompt; with tools a
        // non-empty system prompt gets a trailing newline.
        let short = "detailed thinking off";
        if system.is_empty() {
            if tools.is_empty() {
                system = short.to_string();
            }
        } else if tools.is_empty() {
            if !system.contains("detailed thinking on") && !system.contains(short) {
                system = format!("{system}\n{short}");
            }
        } else {
            system.push('\n');
        }
    }

    let kto_tag = kto_value(row, attr)?;
    let (prompt, response) = if let Some(tag) = kto_tag {
        let answer = messages.pop().ok_or(SkipReason::EmptyAnswer)?;
        (messages, kto_response(answer, tag))
    } else if attr.ranking {
        let chosen_col = attr.chosen.as_deref().unwrap_or("chosen");
        let rejected_col = attr.rejected.as_deref().unwrap_or("rejected");
        let mut pair = Vec::new();
        for c in [chosen_col, rejected_col] {
            let m = match row.get(c) {
                Some(m @ Value::Object(_)) => m,
                None | Some(Value::Null) => return Err(SkipReason::MissingColumn(c.to_string())),
                Some(_) => {
                    return Err(SkipReason::WrongType {
                        column: c.to_string(),
                        expected: "a message object",
                    });
                }
            };
            let tag = m.get(&attr.role_tag).and_then(Value::as_str).unwrap_or("");
            let role = tag_role(tag);
            if !matches!(role, Some(Role::Assistant | Role::Function)) {
                return Err(SkipReason::InvalidPair(format!(
                    "`{c}` has role `{tag}`, expected `{}` or `{}`",
                    attr.assistant_tag, attr.function_tag
                )));
            }
            let content = m
                .get(&attr.content_tag)
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    SkipReason::InvalidPair(format!("`{c}` has no string `{}`", attr.content_tag))
                })?;
            pair.push(Message::new(role.unwrap_or(Role::Assistant), content));
        }
        (messages, pair)
    } else {
        let last = messages.pop().ok_or(SkipReason::EmptyAnswer)?;
        (messages, vec![last])
    };
    Ok((prompt, response, system, tools, kto_tag))
}

fn unknown_role(index: usize, tag: &str) -> SkipReason {
    SkipReason::InvalidRoleOrder {
        position: index + 1,
        role: tag.to_string(),
        expected: "a role named in `tags` (user/assistant/observation/function_call/system)".into(),
    }
}

fn expected_tags(attr: &DatasetAttr, index: usize) -> String {
    if index.is_multiple_of(2) {
        format!("`{}` or `{}`", attr.user_tag, attr.observation_tag)
    } else {
        format!("`{}` or `{}`", attr.assistant_tag, attr.function_tag)
    }
}

/// Shape checks of the processors (`supervised.py`, `pairwise.py`, `feedback.py`) plus empty answers.
fn validate(example: &Example, stage: Stage, ranking: bool) -> Result<(), SkipReason> {
    if example.prompt.len().is_multiple_of(2) {
        return Err(SkipReason::InvalidShape(format!(
            "{} prompt messages, expected an odd number",
            example.prompt.len()
        )));
    }
    match stage {
        Stage::Pt => Ok(()),
        _ if example.kto_tag.is_some() => {
            if example.response.iter().all(|m| m.content.trim().is_empty()) {
                Err(SkipReason::EmptyAnswer)
            } else {
                Ok(())
            }
        }
        _ if ranking => {
            if example.response.len() != 2 {
                return Err(SkipReason::InvalidPair(
                    "need exactly a chosen and a rejected answer".into(),
                ));
            }
            if example.response.iter().any(|m| m.content.trim().is_empty()) {
                return Err(SkipReason::EmptyAnswer);
            }
            Ok(())
        }
        _ => {
            if example.response.len() != 1 {
                return Err(SkipReason::InvalidShape(format!(
                    "{} responses, expected 1",
                    example.response.len()
                )));
            }
            if example.response[0].content.trim().is_empty() {
                return Err(SkipReason::EmptyAnswer);
            }
            Ok(())
        }
    }
}
