//! `termtune api`: an OpenAI-compatible HTTP server, like `llamafactory-cli api` — `GET /v1/models`
//! and `POST /v1/chat/completions` (streamed as server-sent events, or whole), with tools as
//! LLaMA-Factory's API does them: the template renders the tools, calls and results, and the calls
//! are read back out of the whole answer (`finish_reason: "tool_calls"`).
//!
//! One model serves one request at a time: a worker thread ([`worker`]) owns the [`ChatSession`]
//! and takes jobs from a queue of `queue` places; a request that finds the queue full is answered
//! 503 at once. The HTTP side (axum on a tokio runtime of its own thread) checks the key, the body
//! and the request ([`protocol`]), hands the job over and relays the worker's events; when a client
//! goes away its events channel closes and the worker stops that answer at the next token.
//!
//! Binding beyond the loopback needs an API key (clients send `Authorization: Bearer KEY`):
//! without one [`ApiServer::start`] refuses.

pub mod protocol;
pub mod worker;

use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::thread::JoinHandle;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::chat::ChatSession;
use crate::engine::generate::GenerationParams;
use protocol::{ApiError, Header, WireRequest, status};
pub use worker::Stats;
use worker::{Job, JobEvent};

/// Default address and port (LLaMA-Factory's `API_PORT` default; loopback instead of its 0.0.0.0).
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8000;
/// Requests that may wait while one is answered.
pub const DEFAULT_QUEUE: usize = 16;
/// The largest request body accepted, in bytes.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// How the server listens and what it calls its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiOptions {
    pub host: String,
    /// 0: any free port (see [`ApiServer::addr`]).
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` when set; required to bind beyond the loopback.
    pub api_key: Option<String>,
    /// The model id of `/v1/models`, which requests must name.
    pub model_name: String,
    pub queue: usize,
    pub body_limit: usize,
}

impl ApiOptions {
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            api_key: None,
            model_name: model_name.into(),
            queue: DEFAULT_QUEUE,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }
}

/// Resolves `host:port`; refuses an address beyond the loopback when there is no API key.
pub fn check_bind(host: &str, port: u16, api_key: Option<&str>) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the API host `{host}`: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("the API host `{host}` resolves to no address"));
    }
    let open = addrs.iter().any(|a| !a.ip().is_loopback());
    if open && api_key.is_none_or(|k| k.trim().is_empty()) {
        return Err(format!(
            "refusing to listen on {host}:{port} without an API key: anyone who can reach that address could \
             use the model. Set API_KEY (or --api-key) and have clients send `Authorization: Bearer <key>`, \
             or listen on 127.0.0.1 (the default)"
        ));
    }
    Ok(addrs)
}

/// A running server: the HTTP thread and the model worker.
pub struct ApiServer {
    addr: SocketAddr,
    stats: Arc<Stats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<Result<(), String>>>,
}

struct AppState {
    jobs: SyncSender<Job>,
    model: String,
    created: u64,
    api_key: Option<String>,
    defaults: GenerationParams,
    body_limit: usize,
    stats: Arc<Stats>,
    next_id: AtomicU64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ApiServer {
    /// Checks the address, binds it, and starts the model worker (owning `session`) and the HTTP
    /// thread. Errors are messages for the user.
    pub fn start(session: ChatSession, opts: &ApiOptions) -> Result<ApiServer, String> {
        let key = opts.api_key.clone().filter(|k| !k.trim().is_empty());
        let addrs = check_bind(&opts.host, opts.port, key.as_deref())?;
        let listener = std::net::TcpListener::bind(&addrs[..])
            .map_err(|e| format!("cannot listen on {}:{}: {e}", opts.host, opts.port))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the listening address: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot set up the listening socket: {e}"))?;
        let stats = Arc::new(Stats::default());
        let (jobs, queue) = std::sync::mpsc::sync_channel(opts.queue);
        let defaults = session.params.clone();
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("api-model".into())
            .spawn(move || worker::run(&session, &queue, &worker_stats))
            .map_err(|e| format!("cannot start the model thread: {e}"))?;
        let state = Arc::new(AppState {
            jobs,
            model: opts.model_name.clone(),
            created: unix_now(),
            api_key: key,
            defaults,
            body_limit: opts.body_limit,
            stats: stats.clone(),
            next_id: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat_completions))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(opts.body_limit))
            .with_state(state);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let http = std::thread::Builder::new()
            .name("api-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("cannot use the listening socket: {e}"))?;
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await
                        .map_err(|e| format!("the HTTP server stopped: {e}"))
                })
            })
            .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
        tracing::info!(
            "api: listening on http://{addr}, model `{}`",
            opts.model_name
        );
        Ok(ApiServer {
            addr,
            stats,
            shutdown: Some(stop),
            http: Some(http),
        })
    }

    /// Where it listens (the real port when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Serves until the HTTP server stops (for `termtune api`, until the process is interrupted).
    pub fn wait(mut self) -> Result<(), String> {
        match self.http.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the HTTP thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for ApiServer {
    /// Stops accepting and lets open requests finish; the worker ends when the last of them does.
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        e.to_json().to_string(),
    )
        .into_response();
    if e.status == status::UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn json_response(v: &serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Compares without an early exit, so the time taken does not tell how much of a key was right.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let unauthorized = |m: &str| {
            ApiError::invalid(m)
                .with_status(status::UNAUTHORIZED)
                .with_code("invalid_api_key")
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(g) if same_key(g.trim().as_bytes(), key.as_bytes()) => Ok(()),
            Some(_) => Err(unauthorized("Incorrect API key provided.")),
            None => Err(unauthorized(
                "Missing API key: send the header `Authorization: Bearer <API_KEY>`.",
            )),
        }
    }

    fn header(&self) -> Header {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Header {
            id: format!("chatcmpl-{:016x}{n:06x}", rand::random::<u64>()),
            created: unix_now(),
            model: self.model.clone(),
        }
    }
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.authorize(&headers) {
        return error_response(&e);
    }
    json_response(&protocol::models(&s.model, s.created))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error_response(
        &ApiError::invalid(format!(
            "Unknown request URL: {method} {}. This server offers GET /v1/models and POST \
             /v1/chat/completions.",
            uri.path()
        ))
        .with_status(status::NOT_FOUND)
        .with_code("unknown_url"),
    )
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(e) = s.authorize(&headers) {
        return error_response(&e);
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error_response(
                &ApiError::invalid(format!(
                    "the request body is larger than the limit of {} bytes",
                    s.body_limit
                ))
                .with_status(status::PAYLOAD_TOO_LARGE)
                .with_code("request_too_large"),
            );
        }
        Err(rejection) => {
            return error_response(&ApiError::invalid(format!(
                "cannot read the request body: {rejection}"
            )));
        }
    };
    let wire: WireRequest = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return error_response(&protocol::body_error(&e)),
    };
    if wire.model != s.model {
        return error_response(
            &ApiError::invalid(format!(
                "The model `{}` does not exist: this server serves `{}` (see GET /v1/models).",
                wire.model, s.model
            ))
            .with_status(status::NOT_FOUND)
            .with_param("model")
            .with_code("model_not_found"),
        );
    }
    let request = match wire.check(&s.defaults, rand::random()) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let (stream, include_usage) = (request.stream, request.include_usage);
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    s.stats.queued.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = s.jobs.try_send(Job { request, events }) {
        s.stats.queued.fetch_sub(1, Ordering::SeqCst);
        let message = match e {
            TrySendError::Full(_) => {
                s.stats.rejected.fetch_add(1, Ordering::SeqCst);
                "The server is busy: the model is answering another request and the queue is full. \
                 Retry shortly."
            }
            TrySendError::Disconnected(_) => "The model worker has stopped; restart termtune api.",
        };
        return error_response(&ApiError {
            status: status::UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            code: Some("server_busy"),
            param: None,
        });
    }
    match rx.recv().await {
        Some(JobEvent::Started { .. }) => {}
        Some(JobEvent::Failed(e)) => return error_response(&e),
        _ => {
            return error_response(&ApiError::server(
                "the model worker stopped before answering",
            ));
        }
    }
    let h = s.header();
    if stream {
        sse(h, rx, include_usage)
    } else {
        whole(&h, rx).await
    }
}

/// Waits for the whole answer.
async fn whole(h: &Header, mut rx: UnboundedReceiver<JobEvent>) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Started { .. } => {}
            JobEvent::Text(t) => text.push_str(&t),
            JobEvent::Done {
                tool_calls: Some(calls),
                usage,
                ..
            } => return json_response(&protocol::tool_completion(h, &calls, usage)),
            JobEvent::Done { finish, usage, .. } => {
                return json_response(&protocol::completion(h, &text, finish, usage));
            }
            JobEvent::Failed(e) => return error_response(&e),
        }
    }
    error_response(&ApiError::server(
        "the model worker stopped in the middle of the answer",
    ))
}

/// Streams the answer as server-sent events: a role chunk, content chunks, a chunk with the
/// `finish_reason`, the usage chunk when asked, then `data: [DONE]`.
fn sse(h: Header, rx: UnboundedReceiver<JobEvent>, include_usage: bool) -> Response {
    let data = |v: serde_json::Value| Event::default().data(v.to_string());
    let first = data(protocol::chunk(
        &h,
        serde_json::json!({"role": "assistant", "content": ""}),
        None,
    ));
    let rest = futures::stream::unfold(Some(rx), move |rx| {
        let h = h.clone();
        async move {
            let mut rx = rx?;
            loop {
                let mut events: Vec<Event> = match rx.recv().await {
                    Some(JobEvent::Started { .. }) => continue,
                    Some(JobEvent::Text(t)) => {
                        let delta = serde_json::json!({"content": t});
                        return Some((vec![data(protocol::chunk(&h, delta, None))], Some(rx)));
                    }
                    Some(JobEvent::Done { finish, usage, .. }) => {
                        let mut v = vec![data(protocol::chunk(
                            &h,
                            serde_json::json!({}),
                            Some(finish),
                        ))];
                        if include_usage {
                            v.push(data(protocol::usage_chunk(&h, usage)));
                        }
                        v
                    }
                    Some(JobEvent::Failed(e)) => vec![data(e.to_json())],
                    None => vec![data(
                        ApiError::server("the model worker stopped in the middle of the answer")
                            .to_json(),
                    )],
                };
                events.push(Event::default().data("[DONE]"));
                return Some((events, None));
            }
        }
    });
    let stream = futures::stream::once(async move { vec![first] })
        .chain(rest)
        .flat_map(|v| futures::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(stream).into_response()
}
