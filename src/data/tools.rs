//! Tool descriptions and function calls as text, following LLaMA-Factory's `tool_utils.py` for the
//! `default`, `qwen`, `llama3` and `mistral` tool formats: [`format_tools`] (the system-prompt text),
//! [`format_function`] (an assistant's call) and its inverse [`extract_tool`] (calls in a model's answer).

use serde_json::Value;

use super::pyjson::{dumps, dumps_indent};

/// A tool format (`tool_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolFormat {
    Default,
    Qwen,
    Llama3,
    Mistral,
}

impl ToolFormat {
    pub const NAMES: &'static [&'static str] = &["default", "qwen", "llama3", "mistral"];

    pub fn parse(name: &str) -> Option<ToolFormat> {
        Some(match name {
            "default" => ToolFormat::Default,
            "qwen" => ToolFormat::Qwen,
            "llama3" => ToolFormat::Llama3,
            "mistral" => ToolFormat::Mistral,
            _ => return None,
        })
    }
}

const DEFAULT_TOOL_PROMPT_HEAD: &str = "You have access to the following tools:\n";
const DEFAULT_TOOL_PROMPT_TAIL: &str = "Use the following format if using a tool:\n```\nAction: tool name (one of [{tool_names}])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{\"input\": \"hello world\", \"num_beams\": 5}```)\n```\n";

const QWEN_TOOL_PROMPT_HEAD: &str = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const QWEN_TOOL_PROMPT_TAIL: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

const LLAMA3_TOOL_PROMPT_HEAD: &str = "Cutting Knowledge Date: December 2023\nToday Date: ";
const LLAMA3_TOOL_PROMPT_MID: &str = "\n\nYou have access to the following functions. To call a function, please respond with JSON for a function call. Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n";

fn str_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => python_str(other),
    }
}

/// Python's `str()` of a JSON value, as `format()` would print it (used for odd schema fields).
fn python_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

fn unwrap_function(tool: &Value) -> &Value {
    if tool.get("type").and_then(Value::as_str) == Some("function") {
        tool.get("function").unwrap_or(tool)
    } else {
        tool
    }
}

/// The system-prompt text describing `tools` (a JSON string). Empty list → empty text.
pub fn format_tools(format: ToolFormat, tools_json: &str, today: &str) -> Result<String, String> {
    let tools: Value = serde_json::from_str(tools_json).map_err(|e| e.to_string())?;
    let list: Vec<Value> = match tools {
        Value::Array(list) => list,
        Value::Object(_) => vec![tools],
        _ => return Err("tools must be a JSON list of function schemas".into()),
    };
    if list.is_empty() {
        return Ok(String::new());
    }
    match format {
        ToolFormat::Default => {
            let mut tool_text = String::new();
            let mut names = Vec::new();
            for tool in &list {
                let tool = unwrap_function(tool);
                let name = tool
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or("a tool has no `name`")?;
                let params = tool.get("parameters");
                let required: Vec<&str> = params
                    .and_then(|p| p.get("required"))
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut param_text = String::new();
                if let Some(props) = params
                    .and_then(|p| p.get("properties"))
                    .and_then(Value::as_object)
                {
                    for (pname, param) in props {
                        let req = if required.contains(&pname.as_str()) {
                            ", required"
                        } else {
                            ""
                        };
                        let enum_text = match param.get("enum").and_then(Value::as_array) {
                            Some(e) if !e.is_empty() => format!(
                                ", should be one of [{}]",
                                e.iter().map(python_str).collect::<Vec<_>>().join(", ")
                            ),
                            _ => String::new(),
                        };
                        let items = match param.get("items") {
                            Some(i) if i.as_object().is_some_and(|o| !o.is_empty()) => {
                                format!(", where each item should be {}", str_of(i.get("type")))
                            }
                            _ => String::new(),
                        };
                        param_text.push_str(&format!(
                            "  - {pname} ({}{req}): {}{enum_text}{items}\n",
                            str_of(param.get("type")),
                            str_of(param.get("description"))
                        ));
                    }
                } else {
                    return Err(format!("tool `{name}` has no `parameters.properties`"));
                }
                tool_text.push_str(&format!(
                    "> Tool Name: {name}\nTool Description: {}\nTool Args:\n{param_text}\n",
                    str_of(tool.get("description"))
                ));
                names.push(name.to_string());
            }
            Ok(format!(
                "{DEFAULT_TOOL_PROMPT_HEAD}{tool_text}{}",
                DEFAULT_TOOL_PROMPT_TAIL.replace("{tool_names}", &names.join(", "))
            ))
        }
        ToolFormat::Qwen => {
            let mut tool_text = String::new();
            for tool in &list {
                let wrapped = wrap_function(tool);
                tool_text.push('\n');
                tool_text.push_str(&dumps(&wrapped));
            }
            Ok(format!(
                "{QWEN_TOOL_PROMPT_HEAD}{tool_text}{QWEN_TOOL_PROMPT_TAIL}"
            ))
        }
        ToolFormat::Llama3 => {
            let mut tool_text = String::new();
            for tool in &list {
                tool_text.push_str(&dumps_indent(&wrap_function(tool), 4));
                tool_text.push_str("\n\n");
            }
            Ok(format!(
                "{LLAMA3_TOOL_PROMPT_HEAD}{today}{LLAMA3_TOOL_PROMPT_MID}{tool_text}"
            ))
        }
        ToolFormat::Mistral => {
            let wrapped: Vec<Value> = list.iter().map(wrap_function).collect();
            Ok(format!(
                "[AVAILABLE_TOOLS] {}[/AVAILABLE_TOOLS]",
                dumps(&Value::Array(wrapped))
            ))
        }
    }
}

fn wrap_function(tool: &Value) -> Value {
    if tool.get("type").and_then(Value::as_str) == Some("function") {
        tool.clone()
    } else {
        serde_json::json!({"type": "function", "function": tool})
    }
}

/// The assistant text of a `function_call` message (`content` is JSON `{"name", "arguments"}` or a list).
pub fn format_function(format: ToolFormat, content: &str) -> Result<String, String> {
    let calls: Value = serde_json::from_str(content).map_err(|e| format!("not JSON: {e}"))?;
    let calls = match calls {
        Value::Array(list) => list,
        other => vec![other],
    };
    let mut functions: Vec<(String, Value)> = Vec::new();
    for call in calls {
        let name = call
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a function call has no string `name`")?;
        let args = call
            .get("arguments")
            .ok_or("a function call has no `arguments`")?;
        functions.push((name.to_string(), args.clone()));
    }
    Ok(match format {
        ToolFormat::Default => functions
            .iter()
            .map(|(n, a)| format!("Action: {n}\nAction Input: {}", dumps(a)))
            .collect::<Vec<_>>()
            .join("\n"),
        ToolFormat::Qwen => functions
            .iter()
            .map(|(n, a)| {
                format!(
                    "<tool_call>\n{}\n</tool_call>",
                    dumps(&serde_json::json!({"name": n, "arguments": a}))
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        ToolFormat::Llama3 => {
            let objs: Vec<Value> = functions
                .iter()
                .map(|(n, a)| serde_json::json!({"name": n, "parameters": a}))
                .collect();
            if objs.len() == 1 {
                dumps(&objs[0])
            } else {
                dumps(&Value::Array(objs))
            }
        }
        ToolFormat::Mistral => {
            let objs: Vec<Value> = functions
                .iter()
                .map(|(n, a)| serde_json::json!({"name": n, "arguments": a}))
                .collect();
            dumps(&Value::Array(objs))
        }
    })
}

/// One function call found in a model's answer: the name and the arguments as JSON text
/// (`json.dumps(arguments, ensure_ascii=False)`), LLaMA-Factory's `FunctionCall`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

impl FunctionCall {
    fn new(name: &str, arguments: &Value) -> FunctionCall {
        FunctionCall {
            name: name.to_string(),
            arguments: dumps(arguments),
        }
    }
}

/// `tool_extractor` of `format`: the function calls in `content`, or `None` when the answer is plain
/// text (LLaMA-Factory then returns the content unchanged). One call that does not parse makes the
/// whole answer plain text, as there.
pub fn extract_tool(format: ToolFormat, content: &str) -> Option<Vec<FunctionCall>> {
    match format {
        ToolFormat::Default => extract_default(content),
        ToolFormat::Qwen => extract_qwen(content),
        ToolFormat::Llama3 => extract_json(content, "parameters"),
        ToolFormat::Mistral => extract_json(content, "arguments"),
    }
}

/// Python's `str.strip()` of whitespace.
fn py_strip(s: &str) -> &str {
    s.trim_matches(char::is_whitespace)
}

/// Whether `rest` matches `\s*` followed by `word`, or `\s*$` when `word` is empty.
fn ws_then(rest: &str, word: &str) -> bool {
    let t = rest.trim_start_matches(char::is_whitespace);
    if word.is_empty() {
        t.is_empty()
    } else {
        t.starts_with(word)
    }
}

/// `re.findall(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", content,
/// re.DOTALL)`, then each input `.strip().strip('"').strip("```")` and `json.loads`.
fn extract_default(content: &str) -> Option<Vec<FunctionCall>> {
    let mut found: Vec<(&str, &str)> = Vec::new();
    let mut pos = 0;
    while let Some(at) = content[pos..].find("Action:").map(|i| pos + i) {
        let after = &content[at + "Action:".len()..];
        let name_start = after.len() - after.trim_start_matches(char::is_whitespace).len();
        let name_len = after[name_start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len() - name_start);
        // The name is greedy but gives back characters until `\s*Action Input:` follows.
        let matched = (1..=name_len).rev().find_map(|n| {
            let rest = &after[name_start + n..];
            let t = rest.trim_start_matches(char::is_whitespace);
            t.strip_prefix("Action Input:")
                .map(|input| (&after[name_start..name_start + n], input))
        });
        let Some((name, input)) = matched else {
            pos = at + 1;
            continue;
        };
        let input_start = input.len() - input.trim_start_matches(char::is_whitespace).len();
        let input_at = content.len() - input.len() + input_start;
        // `.+?`: the shortest text (one character at least) followed by `\s*Action:` or `\s*$`.
        let mut end = None;
        for (i, c) in content[input_at..].char_indices() {
            let stop = input_at + i + c.len_utf8();
            let rest = &content[stop..];
            if ws_then(rest, "Action:") || ws_then(rest, "") {
                end = Some(stop);
                break;
            }
        }
        let Some(end) = end else {
            // Only whitespace after `Action Input:`: the regex gives one of it to `.+?`, which
            // then fails to parse as JSON.
            return None;
        };
        found.push((name, &content[input_at..end]));
        pos = end;
    }
    if found.is_empty() {
        return None;
    }
    let mut calls = Vec::new();
    for (name, input) in found {
        let input = py_strip(input).trim_matches('"').trim_matches('`');
        let arguments: Value = serde_json::from_str(input).ok()?;
        calls.push(FunctionCall::new(py_strip(name), &arguments));
    }
    Some(calls)
}

/// `re.findall(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", content, re.DOTALL)`, each a
/// JSON object with `name` and `arguments`.
fn extract_qwen(content: &str) -> Option<Vec<FunctionCall>> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut bodies = Vec::new();
    let mut pos = 0;
    while let Some(at) = content[pos..].find(OPEN).map(|i| pos + i) {
        let body_at = at + OPEN.len();
        let first = content[body_at..].chars().next().map_or(1, char::len_utf8);
        let mut search = body_at + first;
        let mut matched = None;
        while search <= content.len() {
            let Some(close) = content
                .get(search..)
                .and_then(|s| s.find(CLOSE))
                .map(|i| search + i)
            else {
                break;
            };
            let rest = &content[close + CLOSE.len()..];
            if ws_then(rest, OPEN) || ws_then(rest, "") {
                matched = Some(close);
                break;
            }
            search = close + 1;
        }
        match matched {
            Some(close) => {
                bodies.push(&content[body_at..close]);
                pos = close + CLOSE.len();
            }
            None => pos = at + 1,
        }
    }
    if bodies.is_empty() {
        return None;
    }
    let mut calls = Vec::new();
    for body in bodies {
        let tool: Value = serde_json::from_str(py_strip(body)).ok()?;
        let name = tool.get("name")?.as_str()?;
        calls.push(FunctionCall::new(name, tool.get("arguments")?));
    }
    Some(calls)
}

/// llama3 and mistral: the whole answer is one JSON call or a list of them, the arguments under
/// `key` (`parameters` / `arguments`).
fn extract_json(content: &str, key: &str) -> Option<Vec<FunctionCall>> {
    let tools: Value = serde_json::from_str(py_strip(content)).ok()?;
    let tools = match tools {
        Value::Array(list) => list,
        other => vec![other],
    };
    tools
        .iter()
        .map(|t| Some(FunctionCall::new(t.get("name")?.as_str()?, t.get(key)?)))
        .collect()
}

/// Today's date as Python's `strftime("%d %b %Y")` (UTC), for the llama3 tool prompt.
pub fn today_dmy() -> String {
    let (y, m, d, ..) = now_utc();
    format!("{d:02} {} {y}", MONTHS[m as usize - 1])
}

pub(crate) const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// (year, month 1-12, day, hour, minute, second) in UTC from the system clock.
pub(crate) fn now_utc() -> (i64, u32, u32, u32, u32, u32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = i64::try_from(secs).unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

/// Howard Hinnant's days → civil date algorithm.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2024-02-29 is day 19782 since the epoch (python: (date(2024,2,29)-date(1970,1,1)).days).
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn default_function_call_text() {
        let s = format_function(
            ToolFormat::Default,
            r#"{"name": "f", "arguments": {"x": [1, 2]}}"#,
        )
        .unwrap();
        assert_eq!(s, "Action: f\nAction Input: {\"x\": [1, 2]}");
    }

    fn calls(list: &[(&str, &str)]) -> Option<Vec<FunctionCall>> {
        Some(
            list.iter()
                .map(|(n, a)| FunctionCall {
                    name: (*n).into(),
                    arguments: (*a).into(),
                })
                .collect(),
        )
    }

    // The extractor cases of LLaMA-Factory's tests/data/test_formatter.py (@ff6d4d1), answer for answer.
    const FOO: &str = r#"{"foo": "bar", "size": 10}"#;
    const JOB: &str = r#"{"foo": "job", "size": 2}"#;

    #[test]
    fn default_extractor_on_llamafactorys_examples() {
        let one = "Action: test_tool\nAction Input: {\"foo\": \"bar\", \"size\": 10}";
        assert_eq!(
            extract_tool(ToolFormat::Default, one),
            calls(&[("test_tool", FOO)])
        );
        let two = "Action: test_tool\nAction Input: {\"foo\": \"bar\", \"size\": 10}\nAction: another_tool\nAction Input: {\"foo\": \"job\", \"size\": 2}";
        assert_eq!(
            extract_tool(ToolFormat::Default, two),
            calls(&[("test_tool", FOO), ("another_tool", JOB)])
        );
    }

    #[test]
    fn qwen_llama3_mistral_extractors_on_llamafactorys_examples() {
        let q1 = "<tool_call>\n{\"name\": \"test_tool\", \"arguments\": {\"foo\": \"bar\", \"size\": 10}}\n</tool_call>";
        assert_eq!(
            extract_tool(ToolFormat::Qwen, q1),
            calls(&[("test_tool", FOO)])
        );
        let q2 = format!(
            "{q1}\n<tool_call>\n{{\"name\": \"another_tool\", \"arguments\": {{\"foo\": \"job\", \"size\": 2}}}}\n</tool_call>"
        );
        assert_eq!(
            extract_tool(ToolFormat::Qwen, &q2),
            calls(&[("test_tool", FOO), ("another_tool", JOB)])
        );
        let l1 = "{\"name\": \"test_tool\", \"parameters\": {\"foo\": \"bar\", \"size\": 10}}\n";
        assert_eq!(
            extract_tool(ToolFormat::Llama3, l1),
            calls(&[("test_tool", FOO)])
        );
        let l2 = "[{\"name\": \"test_tool\", \"parameters\": {\"foo\": \"bar\", \"size\": 10}}, {\"name\": \"another_tool\", \"parameters\": {\"foo\": \"job\", \"size\": 2}}]";
        assert_eq!(
            extract_tool(ToolFormat::Llama3, l2),
            calls(&[("test_tool", FOO), ("another_tool", JOB)])
        );
        let m1 = "{\"name\": \"test_tool\", \"arguments\": {\"foo\": \"bar\", \"size\": 10}}";
        assert_eq!(
            extract_tool(ToolFormat::Mistral, m1),
            calls(&[("test_tool", FOO)])
        );
        let m2 = l2.replace("parameters", "arguments");
        assert_eq!(
            extract_tool(ToolFormat::Mistral, &m2),
            calls(&[("test_tool", FOO), ("another_tool", JOB)])
        );
        // The llama3 extractor wants `parameters`, mistral's `arguments`.
        assert_eq!(extract_tool(ToolFormat::Llama3, m1), None);
        assert_eq!(extract_tool(ToolFormat::Mistral, l1), None);
    }

    #[test]
    fn extractors_follow_the_regexes_edges() {
        // Plain answers and calls that do not parse are plain text.
        for f in [
            ToolFormat::Default,
            ToolFormat::Qwen,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
        ] {
            assert_eq!(extract_tool(f, "It is 22 degrees."), None, "{f:?}");
            assert_eq!(extract_tool(f, ""), None, "{f:?}");
        }
        assert_eq!(
            extract_tool(ToolFormat::Default, "Action: f\nAction Input: {oops"),
            None
        );
        // One bad call spoils all (LLaMA-Factory returns the content).
        assert_eq!(
            extract_tool(
                ToolFormat::Default,
                "Action: f\nAction Input: {}\nAction: g\nAction Input: nope"
            ),
            None
        );
        // Text before the first call is skipped; the input loses quotes and backticks around it.
        assert_eq!(
            extract_tool(
                ToolFormat::Default,
                "Let me look.\nAction: get_weather\nAction Input: ```{\"city\": \"Paris\"}```\n"
            ),
            calls(&[("get_weather", r#"{"city": "Paris"}"#)])
        );
        // The name gives back characters until `Action Input:` follows (regex backtracking).
        assert_eq!(
            extract_tool(ToolFormat::Default, "Action: fooAction Input: [1,2]"),
            calls(&[("foo", "[1, 2]")])
        );
        // Non-ASCII stays as it is (ensure_ascii=False).
        assert_eq!(
            extract_tool(
                ToolFormat::Default,
                "Action: f\nAction Input: {\"q\":\"é\"}"
            ),
            calls(&[("f", r#"{"q": "é"}"#)])
        );
        // qwen: a call followed by other text is not a call (the lookahead), text before it is fine.
        assert_eq!(
            extract_tool(
                ToolFormat::Qwen,
                "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call> and more"
            ),
            None
        );
        assert_eq!(
            extract_tool(
                ToolFormat::Qwen,
                "<think>\nok\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n"
            ),
            calls(&[("f", r#"{"a": 1}"#)])
        );
        assert_eq!(
            extract_tool(ToolFormat::Qwen, "<tool_call>{\"name\": \"f\"}</tool_call>"),
            None
        );
    }

    #[test]
    fn extract_inverts_format_function() {
        let call = r#"[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}, {"name": "now", "arguments": {}}]"#;
        for f in [
            ToolFormat::Default,
            ToolFormat::Qwen,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
        ] {
            let text = format_function(f, call).unwrap();
            assert_eq!(
                extract_tool(f, &text),
                calls(&[
                    ("get_weather", r#"{"city": "Paris", "days": [1, 2]}"#),
                    ("now", "{}")
                ]),
                "{f:?}: {text}"
            );
        }
    }
}
