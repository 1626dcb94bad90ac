//! OpenAI's chat-completions wire format: the request as clients send it, checked into a [`Request`]
//! the worker can run, the JSON answers and chunks, and errors in OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`) with their HTTP status.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::data::pyjson::dumps;
use crate::data::tools::FunctionCall;
use crate::data::{Message, Role};
use crate::engine::generate::GenerationParams;

/// HTTP statuses used here (plain numbers so this module needs no HTTP crate).
pub mod status {
    pub const BAD_REQUEST: u16 = 400;
    pub const UNAUTHORIZED: u16 = 401;
    pub const NOT_FOUND: u16 = 404;
    pub const PAYLOAD_TOO_LARGE: u16 = 413;
    pub const INTERNAL: u16 = 500;
    pub const UNAVAILABLE: u16 = 503;
}

/// An error as OpenAI's clients expect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, …
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: status::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: status::INTERNAL,
            message: message.into(),
            kind: "server_error",
            code: None,
            param: None,
        }
    }

    /// The body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn to_json(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The reason for a bad request body, from serde_json's error.
pub fn body_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => ApiError::invalid(format!("invalid request body: {e}")),
        Category::Syntax | Category::Eof | Category::Io => ApiError::invalid(format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object \
             such as {{\"model\": \"…\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}."
        ))
        .with_code("invalid_json"),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    /// JSON text, as OpenAI sends it.
    arguments: String,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Debug, Deserialize)]
struct WireTool {
    #[serde(rename = "type")]
    kind: Option<String>,
    function: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// `POST /v1/chat/completions` as sent; unknown fields are ignored, as OpenAI's own server does for
/// the ones it does not act on.
#[derive(Debug, Deserialize)]
pub struct WireRequest {
    pub model: String,
    messages: Vec<WireMessage>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    seed: Option<i64>,
    tools: Option<Vec<WireTool>>,
    functions: Option<Value>,
}

/// A checked request, ready for the model worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub system: Option<String>,
    /// User turns or tool results ([`Role::Observation`]) alternating with assistant turns or function
    /// calls ([`Role::Function`]), ending with a user turn or a tool result.
    pub turns: Vec<Message>,
    /// The request's `tools` as LLaMA-Factory passes them to the template: a JSON list of the function
    /// schemas (`[{"name", "description", "parameters"}]`). None: no tools.
    pub tools: Option<String>,
    pub params: GenerationParams,
    /// `max_tokens` as the client set it (None: the preset's `max_new_tokens`, cut to the context).
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// At most this many `stop` sequences (OpenAI's limit).
pub const MAX_STOP: usize = 4;

fn content_text(content: Option<Content>, index: usize) -> Result<String, ApiError> {
    match content {
        None => Err(ApiError::invalid(format!(
            "messages[{index}].content is missing: every message needs text content"
        ))
        .with_param("messages")),
        Some(Content::Text(s)) => Ok(s),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::invalid(format!(
                            "messages[{index}] has a content part of type `{kind}`: termtune serves text \
                             models, so only `text` parts are accepted"
                        ))
                        .with_param("messages"));
                    }
                }
            }
            Ok(text)
        }
    }
}

/// The `tools` of a request as LLaMA-Factory passes them on: `json.dumps([tool.function, …])`, each
/// function with its `name`, `description` and `parameters` in that order (pydantic's field order).
/// An empty list is no tools.
fn tools_json(tools: Vec<WireTool>) -> Result<Option<String>, ApiError> {
    if tools.is_empty() {
        return Ok(None);
    }
    let bad = |m: String| ApiError::invalid(m).with_param("tools");
    let mut functions = Vec::new();
    for (i, tool) in tools.into_iter().enumerate() {
        let kind = tool.kind.as_deref().unwrap_or("function");
        if kind != "function" {
            return Err(bad(format!(
                "tools[{i}] has type `{kind}`: only `function` tools are supported"
            )));
        }
        let Some(Value::Object(f)) = tool.function else {
            return Err(bad(format!(
                "tools[{i}].function is missing: each tool is {{\"type\": \"function\", \"function\": \
                 {{\"name\", \"description\", \"parameters\"}}}}"
            )));
        };
        if !f.get("name").is_some_and(Value::is_string) {
            return Err(bad(format!(
                "tools[{i}].function.name is missing or not a string"
            )));
        }
        let mut out = serde_json::Map::new();
        for key in ["name", "description", "parameters"] {
            if let Some(v) = f.get(key) {
                out.insert(key.to_string(), v.clone());
            }
        }
        functions.push(Value::Object(out));
    }
    Ok(Some(dumps(&Value::Array(functions))))
}

/// The messages as LLaMA-Factory's `_process_request` reads them: an optional system message, then
/// user or tool messages (`tool` → a tool result) at even places and assistant or function messages at
/// odd ones, ending at an even place. An assistant message with `tool_calls` becomes a function call
/// whose content is `json.dumps([{"name", "arguments"}, …])` (the arguments as the JSON text sent).
fn read_messages(messages: Vec<WireMessage>) -> Result<(Option<String>, Vec<Message>), ApiError> {
    let mut system = None;
    let mut turns = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let role = m.role.as_str();
        if matches!(role, "system" | "developer") {
            if i > 0 {
                return Err(ApiError::invalid(format!(
                    "messages[{i}] is a {role} message: only the first message may be one"
                ))
                .with_param("messages"));
            }
            system = Some(content_text(m.content, i)?);
            continue;
        }
        let (allowed, want) = if turns.len() % 2 == 0 {
            (["user", "tool"], "a user (or tool) message")
        } else {
            (
                ["assistant", "function"],
                "an assistant (or function) message",
            )
        };
        if !allowed.contains(&role) {
            if !matches!(role, "user" | "tool" | "assistant" | "function") {
                return Err(ApiError::invalid(format!(
                    "messages[{i}] has an unknown role `{role}` (use system, user, assistant, tool or function)"
                ))
                .with_param("messages"));
            }
            return Err(ApiError::invalid(format!(
                "messages[{i}] is a {role} message where {want} was expected: after an optional system \
                 message, user (or tool) and assistant (or function) messages must alternate, starting with \
                 a user message"
            ))
            .with_param("messages"));
        }
        let calls = m.tool_calls.unwrap_or_default();
        let message = match role {
            "assistant" if !calls.is_empty() => {
                let list: Vec<Value> = calls
                    .into_iter()
                    .map(|c| json!({"name": c.function.name, "arguments": c.function.arguments}))
                    .collect();
                Message::new(Role::Function, dumps(&Value::Array(list)))
            }
            "user" => Message::new(Role::User, content_text(m.content, i)?),
            "assistant" => Message::new(Role::Assistant, content_text(m.content, i)?),
            "function" => Message::new(Role::Function, content_text(m.content, i)?),
            _ => Message::new(Role::Observation, content_text(m.content, i)?),
        };
        turns.push(message);
    }
    if turns.len() % 2 == 0 {
        return Err(ApiError::invalid(
            "messages must end with a user message or a tool result (after an optional system message)",
        )
        .with_param("messages"));
    }
    Ok((system, turns))
}

impl WireRequest {
    /// Checks the request and fills in what it leaves out from `defaults` (the preset's generation
    /// settings). `seed` is used when the request names none.
    pub fn check(self, defaults: &GenerationParams, seed: u64) -> Result<Request, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(format!(
                "n = {n} is not supported: termtune api returns exactly one choice (n = 1); send \
                 several requests instead"
            ))
            .with_param("n")
            .with_code("unsupported_parameter"));
        }
        if self
            .functions
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid(
                "`functions` (OpenAI's deprecated form of tools) is not supported: send the functions as \
                 `tools`, each {\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}",
            )
            .with_param("functions")
            .with_code("unsupported_parameter"));
        }
        let tools = tools_json(self.tools.unwrap_or_default())?;
        let stream = self.stream.unwrap_or(false);
        if stream && tools.is_some() {
            // LLaMA-Factory: "Cannot stream function calls." The calls are read from the whole answer.
            return Err(ApiError::invalid(
                "cannot stream function calls: a request with `tools` is answered whole, because the calls \
                 are read from the complete answer; send it without `stream` (or without `tools`)",
            )
            .with_param("stream")
            .with_code("unsupported_parameter"));
        }
        let (system, turns) = read_messages(self.messages)?;
        let mut params = defaults.clone();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(format!(
                    "temperature = {t} is out of range: use a number from 0 (greedy) to 2"
                ))
                .with_param("temperature"));
            }
            params.temperature = t;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(format!(
                    "top_p = {p} is out of range: use a number above 0 and at most 1"
                ))
                .with_param("top_p"));
            }
            params.top_p = Some(p);
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            Some(m) => {
                return Err(ApiError::invalid(format!(
                    "max_tokens = {m} is out of range: use at least 1"
                ))
                .with_param("max_tokens"));
            }
        };
        params.seed = self.seed.map_or(seed, i64::cast_unsigned);
        let stop: Vec<String> = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(format!(
                "stop has {} sequences: at most {MAX_STOP} are allowed",
                stop.len()
            ))
            .with_param("stop"));
        }
        Ok(Request {
            system,
            turns,
            tools,
            params,
            max_tokens,
            stop,
            stream,
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

/// Why an answer ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model's end token or a `stop` sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The answer is function calls (`tools` were given and the template's tool format found them).
    ToolCalls,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Of the prompt's tokens, those whose keys and values the model kept from the previous request (OpenAI's
    /// `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// What every response names: its id, creation time and the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// The whole answer (`object: chat.completion`).
pub fn completion(h: &Header, text: &str, finish: Finish, usage: Usage) -> Value {
    json!({
        "id": h.id,
        "object": "chat.completion",
        "created": h.created,
        "model": h.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish.as_str(),
        }],
        "usage": usage.to_json(),
    })
}

/// The whole answer when it is function calls, as LLaMA-Factory gives it: `finish_reason` "tool_calls"
/// and a message of `tool_calls`, each `{"id": "call_<hex>", "type": "function", "function": {"name",
/// "arguments"}}`, with no content.
pub fn tool_completion(h: &Header, calls: &[FunctionCall], usage: Usage) -> Value {
    let tool_calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            json!({
                "id": format!("call_{:032x}", rand::random::<u128>()),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect();
    json!({
        "id": h.id,
        "object": "chat.completion",
        "created": h.created,
        "model": h.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": null, "tool_calls": tool_calls},
            "logprobs": null,
            "finish_reason": Finish::ToolCalls.as_str(),
        }],
        "usage": usage.to_json(),
    })
}

/// One streamed chunk (`object: chat.completion.chunk`) carrying `delta`.
pub fn chunk(h: &Header, delta: Value, finish: Option<Finish>) -> Value {
    json!({
        "id": h.id,
        "object": "chat.completion.chunk",
        "created": h.created,
        "model": h.model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish.map(Finish::as_str),
        }],
    })
}

/// The last chunk when `stream_options.include_usage` is set: no choices, the usage.
pub fn usage_chunk(h: &Header, usage: Usage) -> Value {
    json!({
        "id": h.id,
        "object": "chat.completion.chunk",
        "created": h.created,
        "model": h.model,
        "choices": [],
        "usage": usage.to_json(),
    })
}

/// `GET /v1/models`.
pub fn models(id: &str, created: u64) -> Value {
    json!({
        "object": "list",
        "data": [{"id": id, "object": "model", "created": created, "owned_by": "termtune"}],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<Request, ApiError> {
        serde_json::from_str::<WireRequest>(body)
            .map_err(|e| body_error(&e))?
            .check(&GenerationParams::default(), 5)
    }

    #[test]
    fn a_plain_request_takes_the_defaults() {
        let r = check(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.turns, vec![Message::new(Role::User, "hi")]);
        assert_eq!(r.params.seed, 5);
        assert_eq!(r.max_tokens, None);
        assert!(!r.stream);
    }

    #[test]
    fn system_parts_stop_and_sampling_are_read() {
        let r = check(
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "temperature":0,"top_p":0.5,"max_tokens":7,"stop":"x","seed":-1,"stream":true,
                "stream_options":{"include_usage":true},"tools":[]}"#,
        )
        .unwrap();
        assert_eq!(r.system.as_deref(), Some("be brief"));
        assert_eq!(r.turns[0].content, "ab");
        assert_eq!(r.params.temperature, 0.0);
        assert_eq!(r.params.top_p, Some(0.5));
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.params.seed, u64::MAX);
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn bad_requests_name_their_problem() {
        let cases = [
            ("{", "parse the JSON"),
            (r#"{"model":"m"}"#, "missing field `messages`"),
            (r#"{"messages":[]}"#, "missing field `model`"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"}],"n":2}"#,
                "n = 2",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"}],"tools":[{"type":"function"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant","content":"a"}]}"#,
                "must alternate",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
                "end with a user",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"}],"stop":["a","b","c","d","e"]}"#,
                "at most 4",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "image_url",
            ),
        ];
        for (body, needle) in cases {
            let e = check(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
            assert_eq!(
                e.to_json()["error"]["type"],
                "invalid_request_error",
                "{body}"
            );
        }
    }

    #[test]
    fn tools_and_tool_messages_become_llamafactorys_roles() {
        let r = check(
            r#"{"model":"m","tools":[{"type":"function","function":{"parameters":{"type":"object",
                "properties":{"city":{"type":"string"}}},"name":"get_weather","description":"Weather"}}],
                "messages":[{"role":"system","content":"S"},{"role":"user","content":"Paris?"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                "function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},
                {"role":"tool","tool_call_id":"call_1","content":"{\"t\": 22}"},
                {"role":"assistant","content":"22."},{"role":"user","content":"And Rome?"}]}"#,
        )
        .unwrap();
        // pydantic's field order (name, description, parameters), Python's separators.
        assert_eq!(
            r.tools.as_deref(),
            Some(
                r#"[{"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]"#
            )
        );
        assert_eq!(
            r.turns,
            vec![
                Message::new(Role::User, "Paris?"),
                // The arguments stay the JSON text the client sent (LLaMA-Factory's `_process_request`).
                Message::new(
                    Role::Function,
                    r#"[{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]"#
                ),
                Message::new(Role::Observation, r#"{"t": 22}"#),
                Message::new(Role::Assistant, "22."),
                Message::new(Role::User, "And Rome?"),
            ]
        );
        // A conversation may end with a tool result, and OpenAI's `function` role is a call.
        let r = check(
            r#"{"model":"m","messages":[{"role":"user","content":"a"},
                {"role":"function","content":"{\"name\": \"f\", \"arguments\": {}}"},
                {"role":"tool","content":"ok"}]}"#,
        )
        .unwrap();
        assert_eq!(r.tools, None);
        assert_eq!(
            r.turns.iter().map(|m| m.role).collect::<Vec<_>>(),
            vec![Role::User, Role::Function, Role::Observation]
        );
        // An empty list is no tools.
        let r = check(r#"{"model":"m","tools":[],"messages":[{"role":"user","content":"a"}]}"#);
        assert_eq!(r.unwrap().tools, None);
    }

    #[test]
    fn bad_tool_requests_name_their_problem() {
        let user = r#""messages":[{"role":"user","content":"a"}]"#;
        let tool = r#"{"type":"function","function":{"name":"f","parameters":{}}}"#;
        let cases = [
            (format!(r#"{{"model":"m",{user},"stream":true,"tools":[{tool}]}}"#), "stream", "cannot stream function calls"),
            (format!(r#"{{"model":"m",{user},"functions":[{{"name":"f"}}]}}"#), "functions", "send the functions as `tools`"),
            (format!(r#"{{"model":"m",{user},"tools":[{{"type":"function","function":{{"description":"x"}}}}]}}"#), "tools", "tools[0].function.name"),
            (format!(r#"{{"model":"m",{user},"tools":[{{"type":"code_interpreter"}}]}}"#), "tools", "code_interpreter"),
            (
                r#"{"model":"m","messages":[{"role":"tool","content":"a"},{"role":"user","content":"b"}]}"#.to_string(),
                "messages",
                "where an assistant (or function) message was expected",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"function","content":"b"}]}"#.to_string(),
                "messages",
                "end with a user message or a tool result",
            ),
            (
                r#"{"model":"m","messages":[{"role":"critic","content":"a"}]}"#.to_string(),
                "messages",
                "unknown role `critic`",
            ),
        ];
        for (body, param, needle) in cases {
            let e = check(&body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param, Some(param), "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn a_tool_call_answer_is_shaped_as_openais() {
        let h = Header {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
        };
        let calls = [FunctionCall {
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        }];
        let usage = Usage {
            prompt_tokens: 3,
            cached_tokens: 0,
            completion_tokens: 4,
        };
        let v = tool_completion(&h, &calls, usage);
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["role"], "assistant");
        assert!(choice["message"]["content"].is_null());
        let call = &choice["message"]["tool_calls"][0];
        let id = call["id"].as_str().unwrap();
        assert!(id.len() == 37 && id.starts_with("call_"), "{id}");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"city": "Paris"}"#);
        assert_eq!(v["usage"]["total_tokens"], 7);
    }
}
