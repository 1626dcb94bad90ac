//! The tokenizer's own Jinja `chat_template`, rendered with minijinja under Hugging Face's semantics:
//! `trim_blocks` + `lstrip_blocks`, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! `tools`, `raise_exception`, `strftime_now`, a Python-style `tojson`, and the Python string/dict
//! methods chat templates use (`strip`, `startswith`, `split`, `items`, …).
//! [`parse_template`] derives LLaMA-Factory slots from it, as LLaMA-Factory's `parse_template` does.

use minijinja::value::{Kwargs, Rest, Serde};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use serde_json::Value as Json;

use super::DataError;
use super::template::{Slot, Template, TemplateClass};
use super::tools::{MONTHS, ToolFormat, now_utc};

/// A compiled chat template.
pub struct JinjaTemplate {
    env: Environment<'static>,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// Passed to the template as `enable_thinking` (Qwen3-style templates); `None` renders as none.
    pub enable_thinking: Option<bool>,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

fn to_json(v: &Value) -> Json {
    serde_json::to_value(v).unwrap_or(Json::Null)
}

fn strip_chars(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let pred = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
    let mut out = s;
    if left {
        out = out.trim_start_matches(pred);
    }
    if right {
        out = out.trim_end_matches(pred);
    }
    out.to_string()
}

/// Python methods called on values (what minijinja-contrib's pycompat would provide).
fn unknown_method(
    _state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let arg_str = |i: usize| args.get(i).and_then(|a| a.as_str().map(str::to_string));
    if let Some(s) = value.as_str() {
        return Ok(match method {
            "strip" => Value::from(strip_chars(s, arg_str(0).as_deref(), true, true)),
            "lstrip" => Value::from(strip_chars(s, arg_str(0).as_deref(), true, false)),
            "rstrip" => Value::from(strip_chars(s, arg_str(0).as_deref(), false, true)),
            "startswith" => Value::from(arg_str(0).is_some_and(|p| s.starts_with(&p))),
            "endswith" => Value::from(arg_str(0).is_some_and(|p| s.ends_with(&p))),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "title" => Value::from(
                s.split(' ')
                    .map(|w| {
                        let mut c = w.chars();
                        c.next()
                            .map(|f| {
                                f.to_uppercase().collect::<String>() + &c.as_str().to_lowercase()
                            })
                            .unwrap_or_default()
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            "replace" => {
                let (Some(a), Some(b)) = (arg_str(0), arg_str(1)) else {
                    return Err(invalid("replace() needs two strings"));
                };
                Value::from(s.replace(&a, &b))
            }
            "split" => {
                let parts: Vec<Value> = match arg_str(0) {
                    Some(sep) if !sep.is_empty() => {
                        s.split(sep.as_str()).map(Value::from).collect()
                    }
                    _ => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            "find" => {
                let Some(p) = arg_str(0) else {
                    return Err(invalid("find() needs a string"));
                };
                #[allow(clippy::cast_possible_wrap)]
                Value::from(s.find(&p).map_or(-1, |i| s[..i].chars().count() as i64))
            }
            "count" => Value::from(arg_str(0).map_or(0, |p| s.matches(&p).count())),
            "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
            _ => {
                return Err(Error::new(
                    ErrorKind::UnknownMethod,
                    format!("str has no method `{method}`"),
                ));
            }
        });
    }
    if matches!(value.kind(), minijinja::value::ValueKind::Map) {
        return match method {
            "items" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    let v = value.get_item(&k)?;
                    out.push(Value::from(vec![k, v]));
                }
                Ok(Value::from(out))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    out.push(value.get_item(&k)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let key = args.first().cloned().unwrap_or(Value::UNDEFINED);
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(Error::new(
                ErrorKind::UnknownMethod,
                format!("dict has no method `{method}`"),
            )),
        };
    }
    Err(Error::new(
        ErrorKind::UnknownMethod,
        format!("no method `{method}`"),
    ))
}

/// Python's `strftime` for the directives chat templates use.
fn strftime(fmt: &str) -> String {
    let (y, m, d, hh, mm, ss) = now_utc();
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(MONTHS[m as usize - 1]),
            Some('B') => out.push_str(FULL[m as usize - 1]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl JinjaTemplate {
    /// Compiles `source` with Hugging Face's environment settings.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<JinjaTemplate, DataError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| DataError::Jinja(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(unknown_method);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(invalid(msg))
        });
        env.add_function("strftime_now", |fmt: String| -> Result<Value, Error> {
            Ok(Value::from(strftime(&fmt)))
        });
        env.add_filter(
            "tojson",
            |v: Value, _rest: Rest<Value>, kwargs: Kwargs| -> Result<Value, Error> {
                let indent: Option<usize> = kwargs.get("indent")?;
                let json = to_json(&v);
                let text = match indent {
                    Some(n) => super::pyjson::dumps_indent(&json, n),
                    None => super::pyjson::dumps(&json),
                };
                Ok(Value::from_safe_string(text))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| DataError::Jinja(e.to_string()))?;
        Ok(JinjaTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            enable_thinking: None,
        })
    }

    /// Renders `messages` (`[{role, content}, …]`), like `apply_chat_template(tokenize=False)`.
    pub fn render(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        tools: Option<&Json>,
    ) -> Result<String, DataError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| DataError::Jinja(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            tools => tools.map(|t| Value::from(Serde(t))),
            enable_thinking => self.enable_thinking,
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            DataError::Jinja(msg)
        })
    }
}

fn msgs(list: &[(&str, &str)]) -> Json {
    Json::Array(
        list.iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect(),
    )
}

/// LLaMA-Factory's `parse_template`: derives user/assistant/system slots and the default system prompt
/// by rendering probe conversations whose contents are the `{{content}}` placeholder. `prefix` is what the
/// tokenizer adds to an empty text (e.g. a bos token).
pub fn parse_template(jinja: &JinjaTemplate, prefix: &str) -> Result<Template, DataError> {
    let ph = "{{content}}";
    let cut = |s: String, n: usize| -> String { s.get(n..).unwrap_or("").to_string() };
    let system_slot = cut(
        jinja.render(&msgs(&[("system", ph)]), false, None)?,
        prefix.len(),
    );
    let user_slot_empty_system = cut(
        jinja.render(&msgs(&[("system", ""), ("user", ph)]), true, None)?,
        prefix.len(),
    );
    let mut user_slot = cut(
        jinja.render(&msgs(&[("user", ph)]), true, None)?,
        prefix.len(),
    );
    let full = jinja.render(&msgs(&[("user", ph), ("assistant", ph)]), false, None)?;
    let assistant_slot = cut(full, prefix.len() + user_slot.len());
    let class = if assistant_slot.contains("<think>") {
        TemplateClass::Reasoning
    } else {
        TemplateClass::Plain
    };
    let assistant_slot = assistant_slot
        .replace("<think>", "")
        .replace("</think>", "")
        .trim_start_matches('\n')
        .to_string();
    let default_system = if user_slot.len() > user_slot_empty_system.len() {
        let default_system = find_diff(&user_slot_empty_system, &user_slot);
        let sole_system = system_slot.replacen(ph, &default_system, 1);
        user_slot = cut(user_slot, sole_system.len());
        default_system
    } else {
        String::new()
    };
    let prefix_slots = if prefix.is_empty() {
        Vec::new()
    } else {
        vec![Slot::Text(prefix.to_string())]
    };
    Ok(Template {
        name: "tokenizer chat_template".into(),
        class,
        format_user: vec![Slot::Text(user_slot.clone())],
        format_assistant: vec![Slot::Text(assistant_slot.clone())],
        format_system: vec![Slot::Text(system_slot)],
        format_function: vec![Slot::Text(assistant_slot)],
        function_tool_format: ToolFormat::Default,
        format_observation: vec![Slot::Text(user_slot)],
        tool_format: ToolFormat::Default,
        format_prefix: prefix_slots,
        default_system,
        stop_words: Vec::new(),
        thought_words: ("<think>\n".into(), "\n</think>\n\n".into()),
        efficient_eos: false,
        replace_eos: false,
        replace_jinja_template: false,
        enable_thinking: true,
        preserve_thinking: false,
    })
}

/// `find_diff`: the characters of `long` that are not matched, in order, by `short`.
fn find_diff(short: &str, long: &str) -> String {
    let s: Vec<char> = short.chars().collect();
    let l: Vec<char> = long.chars().collect();
    let (mut i, mut j) = (0, 0);
    let mut diff = String::new();
    while i < s.len() && j < l.len() {
        if s[i] == l[j] {
            i += 1;
        } else {
            diff.push(l[j]);
        }
        j += 1;
    }
    diff
}
