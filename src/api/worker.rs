//! The model worker: one named thread owns the [`ChatSession`] and answers [`Job`]s one at a time,
//! taken from a bounded queue. Each job carries the channel its [`JobEvent`]s go to; when the HTTP
//! side drops it (the client went away), the next token's send fails and generation stops, and a job
//! whose client left while it waited is skipped.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;

use tokio::sync::mpsc::UnboundedSender;

use super::protocol::{ApiError, Finish, Request, Usage};
use crate::chat::ChatSession;
use crate::data::tools::{FunctionCall, extract_tool};
use crate::engine::generate::StopReason;

/// A request for the worker and where its answer goes.
#[derive(Debug)]
pub struct Job {
    pub request: Request,
    pub events: UnboundedSender<JobEvent>,
}

/// What the worker says about one job, in order: `Started`, `Text`…, then `Done`; or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The prompt fits and generation begins.
    Started {
        prompt_tokens: usize,
    },
    Text(String),
    Done {
        finish: Finish,
        usage: Usage,
        /// The function calls in the answer, when the request had `tools` and the template's tool
        /// format found some (LLaMA-Factory's `template.extract_tool`); the text events carried the
        /// raw answer.
        tool_calls: Option<Vec<FunctionCall>>,
    },
    Failed(ApiError),
}

/// Counters the server keeps (read by `termtune api`'s log and the tests).
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs waiting in the queue (not the one being answered).
    pub queued: AtomicU64,
    /// Answers finished and handed over.
    pub answered: AtomicU64,
    /// Jobs stopped or skipped because their client went away.
    pub cancelled: AtomicU64,
    /// Requests answered 503 because the queue was full.
    pub rejected: AtomicU64,
}

/// Holds back text that may be the start of a `stop` sequence, and cuts the answer at the first one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Adds a piece; returns the text that is safe to send and whether a stop sequence was reached
    /// (the text then ends just before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s)).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // The longest tail of `pending` that some stop sequence starts with.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        (out, false)
    }

    /// The text held back when the answer ended without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Serves jobs until every sender of `jobs` is gone.
pub fn run(session: &ChatSession, jobs: &Receiver<Job>, stats: &Stats) {
    while let Ok(job) = jobs.recv() {
        stats.queued.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            stats.cancelled.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        match answer(session, &job) {
            Outcome::Answered => {
                stats.answered.fetch_add(1, Ordering::SeqCst);
            }
            Outcome::Gone => {
                stats.cancelled.fetch_add(1, Ordering::SeqCst);
            }
            Outcome::Failed(e) => {
                tracing::warn!("api request failed: {}", e.message);
                let _ = job.events.send(JobEvent::Failed(e));
            }
        }
    }
}

enum Outcome {
    Answered,
    Gone,
    Failed(ApiError),
}

/// The prompt's limit: `max_tokens` must fit beside it in the context.
fn budget(
    prompt_tokens: usize,
    context: usize,
    max_tokens: Option<usize>,
    default: usize,
) -> Result<usize, ApiError> {
    let too_long = |message: String| {
        ApiError::invalid(message)
            .with_param("messages")
            .with_code("context_length_exceeded")
    };
    if prompt_tokens >= context {
        return Err(too_long(format!(
            "This model's maximum context length is {context} tokens. However, your messages resulted in \
             {prompt_tokens} tokens. Please reduce the length of the messages."
        )));
    }
    let room = context - prompt_tokens;
    match max_tokens {
        Some(m) if m > room => Err(too_long(format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens \
             ({prompt_tokens} in the messages, {m} in the completion). Please reduce the length of the \
             messages or completion.",
            prompt_tokens.saturating_add(m)
        ))),
        Some(m) => Ok(m),
        None => Ok(default.min(room)),
    }
}

fn answer(session: &ChatSession, job: &Job) -> Outcome {
    let r = &job.request;
    let tools = r.tools.as_deref().unwrap_or("");
    let prompt = match session.prompt_with_tools(r.system.as_deref(), &r.turns, tools) {
        Ok(p) => p,
        Err(e) => {
            return Outcome::Failed(
                ApiError::invalid(format!("cannot render the chat template: {e}")).with_param(
                    if tools.is_empty() {
                        "messages"
                    } else {
                        "tools"
                    },
                ),
            );
        }
    };
    let prompt_tokens = prompt.ids.len();
    let mut params = r.params.clone();
    params.max_new_tokens = match budget(
        prompt_tokens,
        session.context_len(),
        r.max_tokens,
        params.max_new_tokens,
    ) {
        Ok(n) => n,
        Err(e) => return Outcome::Failed(e),
    };
    if job
        .events
        .send(JobEvent::Started { prompt_tokens })
        .is_err()
    {
        return Outcome::Gone;
    }
    let mut matcher = StopMatcher::new(r.stop.clone());
    let mut stopped_at_sequence = false;
    let mut gone = false;
    let mut full = String::new();
    let result = session.complete(&prompt, &params, None, |piece| {
        if stopped_at_sequence || gone {
            return ControlFlow::Break(());
        }
        let (text, hit) = matcher.push(piece);
        full.push_str(&text);
        if !text.is_empty() && job.events.send(JobEvent::Text(text)).is_err() {
            gone = true;
            return ControlFlow::Break(());
        }
        if hit {
            stopped_at_sequence = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if gone {
        return Outcome::Gone;
    }
    let answer = match result {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(ApiError::server(format!("generation failed: {e}"))),
    };
    if !stopped_at_sequence {
        let rest = matcher.finish();
        full.push_str(&rest);
        if !rest.is_empty() && job.events.send(JobEvent::Text(rest)).is_err() {
            return Outcome::Gone;
        }
    }
    let tool_calls = r
        .tools
        .as_ref()
        .and_then(|_| extract_tool(session.encoder.template.tool_format, &full));
    let finish = match answer.stop {
        _ if tool_calls.is_some() => Finish::ToolCalls,
        _ if stopped_at_sequence => Finish::Stop,
        StopReason::Stop(_) => Finish::Stop,
        StopReason::MaxTokens => Finish::Length,
        // Only our own callback breaks generation, and both of its reasons are handled above.
        StopReason::Cancelled => Finish::Stop,
    };
    let usage = Usage {
        prompt_tokens,
        cached_tokens: answer.timing.cached_tokens,
        completion_tokens: answer.tokens.len(),
    };
    if job
        .events
        .send(JobEvent::Done {
            finish,
            usage,
            tool_calls,
        })
        .is_err()
    {
        return Outcome::Gone;
    }
    Outcome::Answered
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out.push_str(&t);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_sequence_split_across_pieces_is_cut() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D more"]),
            ("abc ".into(), true)
        );
        assert_eq!(run(&["xy", "b"], &["aab", "xy"]), ("aa".into(), true));
    }

    #[test]
    fn held_back_text_comes_out_when_no_stop_follows() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), ("abc ".into(), false));
        assert_eq!(m.push("x"), ("Ex".into(), false));
        assert_eq!(run(&["END"], &["a", "EN"]), ("aEN".into(), false));
        assert_eq!(run(&[], &["é", "b"]), ("éb".into(), false));
    }

    #[test]
    fn the_budget_names_the_context_length() {
        assert_eq!(budget(10, 512, None, 1024), Ok(502));
        assert_eq!(budget(10, 512, Some(20), 1024), Ok(20));
        let e = budget(600, 512, None, 1024).unwrap_err();
        assert!(e.message.contains("maximum context length is 512 tokens"));
        assert!(e.message.contains("600 tokens"));
        assert_eq!(e.code, Some("context_length_exceeded"));
        let e = budget(10, 512, Some(600), 1024).unwrap_err();
        assert!(
            e.message
                .contains("610 tokens (10 in the messages, 600 in the completion)")
        );
    }
}
