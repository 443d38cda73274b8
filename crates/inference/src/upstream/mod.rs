//! Remote model servers as token sources: a [`Generator`] that streams from an OpenAI-compatible
//! API (vLLM, TGI, llama.cpp's server, Ollama, a hosted API, another streamgate), so the gateway
//! in front serves it exactly as it serves a local model.
//!
//! - A conversation goes to `/chat/completions`, a raw prompt to `/completions`, streamed, with
//!   `stream_options.include_usage` so the upstream's own usage is carried through.
//! - `generate` returns once the upstream's first event has arrived: until then a failure (refused
//!   connection, timeout, a 5xx or 503, a stream that breaks) moves on to the next URL; after it,
//!   an upstream error or a stream that ends without `[DONE]` is an error item of the token
//!   stream (the gateway's error event, then `[DONE]`). A 429 is passed back at once (the client
//!   is told to wait), with the upstream's `Retry-After`.
//! - Each upstream chunk becomes one event as it arrives; dropping the token stream drops the
//!   response, which closes the upstream connection, so the upstream stops generating.
//! - A URL that fails [`BREAKER_FAILURES`] times in a row is taken out for [`BREAKER_OPEN`]
//!   (circuit breaker), then tried again; readiness reports each URL.
//! - One pooled HTTP client per version (reqwest: keep-alive, HTTP/2 where TLS negotiates it).

mod openai;
pub mod spec;
mod sse;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures_core::Stream;

use crate::chat::ChatMessage;
use crate::error::{InferenceError, Result};
pub use crate::generator::UpstreamStatus;
use crate::generator::{
    BoxFuture, EngineStats, FinishReason, GenerationEvent, GenerationRequest, Generator, ModelInfo,
    TokenStream, Usage,
};
pub use openai::{Chunk, Payload, parse as parse_payload};
pub use spec::{SCHEME, UpstreamSpec, is_upstream};
pub use sse::SseReader;

/// Failures in a row that take a URL out.
pub const BREAKER_FAILURES: u32 = 3;
/// How long a URL stays out before it is tried again.
pub const BREAKER_OPEN: Duration = Duration::from_secs(30);

/// What went wrong with an upstream, for metrics (`errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection could not be made.
    Connect,
    /// No first event within the first-byte timeout.
    Timeout,
    /// An error status (429, 503, 5xx, 4xx).
    Status,
    /// The stream broke: malformed events, an error event, an end without `[DONE]`.
    Protocol,
    /// The connection dropped mid-stream.
    Disconnected,
}

impl FailureKind {
    pub const ALL: [Self; 5] =
        [Self::Connect, Self::Timeout, Self::Status, Self::Protocol, Self::Disconnected];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Status => "status",
            Self::Protocol => "protocol",
            Self::Disconnected => "disconnected",
        }
    }
}

/// An upstream version's settings, the API key already looked up by the caller.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub spec: UpstreamSpec,
    pub api_key: Option<String>,
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// One URL: its breaker and counters.
struct Target {
    url: String,
    breaker: Mutex<Breaker>,
    open_streams: AtomicUsize,
    first_byte_micros: AtomicU64,
    first_byte_count: AtomicU64,
    errors: [AtomicU64; 5],
}

impl Target {
    fn available(&self, now: Instant) -> bool {
        let breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        breaker.open_until.is_none_or(|until| now >= until)
    }

    fn failed(&self, kind: FailureKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        breaker.failures = breaker.failures.saturating_add(1);
        if breaker.failures >= BREAKER_FAILURES {
            breaker.open_until = Some(Instant::now() + BREAKER_OPEN);
        }
    }

    /// Counted without moving the breaker: a failure after the first event (the URL works, the
    /// stream did not), or an answer that refuses this request only.
    fn count(&self, kind: FailureKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn answered(&self, first_byte: Duration) {
        self.first_byte_micros
            .fetch_add(u64::try_from(first_byte.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.first_byte_count.fetch_add(1, Ordering::Relaxed);
        *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) = Breaker::default();
    }

    fn status(&self, now: Instant) -> UpstreamStatus {
        UpstreamStatus {
            url: self.url.clone(),
            available: self.available(now),
            open_streams: self.open_streams.load(Ordering::Relaxed),
            first_byte_seconds_sum: self.first_byte_micros.load(Ordering::Relaxed) as f64 / 1e6,
            first_byte_count: self.first_byte_count.load(Ordering::Relaxed),
            errors: FailureKind::ALL
                .iter()
                .map(|k| (k.as_str(), self.errors[*k as usize].load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

struct Shared {
    client: reqwest::Client,
    targets: Vec<Target>,
    model: String,
    api_key: Option<String>,
    first_byte_timeout: Duration,
    tokens: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
}

/// A model version served by remote OpenAI-compatible servers.
pub struct UpstreamEngine {
    info: ModelInfo,
    shared: Arc<Shared>,
}

/// Why one attempt failed, and whether the next URL may be tried.
struct Failure {
    error: InferenceError,
    kind: FailureKind,
    retry: bool,
}

fn retry_after(response: &reqwest::Response) -> Option<u64> {
    response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()
}

impl UpstreamEngine {
    /// Build the client (nothing is contacted yet: an upstream that is down at start is a
    /// request-time failure, like any other).
    pub fn start(config: UpstreamConfig) -> Result<Self> {
        let spec = config.spec;
        // TLS (https upstreams) uses rustls with the ring provider; installed once per process
        // (a second install is refused, which is fine: one is there).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(spec.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("streamgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| InferenceError::Config(format!("upstream HTTP client: {e}")))?;
        let targets = spec
            .urls
            .iter()
            .map(|url| Target {
                url: url.clone(),
                breaker: Mutex::default(),
                open_streams: AtomicUsize::new(0),
                first_byte_micros: AtomicU64::new(0),
                first_byte_count: AtomicU64::new(0),
                errors: Default::default(),
            })
            .collect();
        let info = ModelInfo {
            name: spec.model.clone(),
            path: PathBuf::from(spec.urls.join("|")),
            context_length: 0,
            vocab_size: 0,
            loaded_at: SystemTime::now(),
            engine: "upstream",
            layout: "openai",
            attention: "none",
        };
        let shared = Shared {
            client,
            targets,
            model: spec.model,
            api_key: config.api_key,
            first_byte_timeout: spec.first_byte_timeout,
            tokens: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        };
        Ok(Self { info, shared: Arc::new(shared) })
    }
}

impl Shared {
    /// Try each available URL in order until one streams.
    async fn open(self: Arc<Self>, request: GenerationRequest) -> Result<TokenStream> {
        let (path, body) = openai::request_body(&request, &self.model);
        // Serialized once; each attempt shares the same bytes.
        let body = bytes::Bytes::from(
            serde_json::to_vec(&body).map_err(|e| InferenceError::InvalidRequest(e.to_string()))?,
        );
        let now = Instant::now();
        let mut last = None;
        for index in 0..self.targets.len() {
            if !self.targets[index].available(now) {
                continue;
            }
            match self.attempt(index, path, &body).await {
                Ok(stream) => return Ok(stream),
                Err(Failure { error, kind, retry: false }) => {
                    // The upstream answered (a 429, or a refusal of this request): counted, but
                    // no reason to take the URL out for everyone.
                    self.targets[index].count(kind);
                    return Err(error);
                }
                Err(Failure { error, kind, retry: true }) => {
                    self.targets[index].failed(kind);
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| InferenceError::UpstreamUnavailable {
            retry_after: Some(BREAKER_OPEN.as_secs()),
            reason: "every upstream URL is taken out after repeated failures".into(),
        }))
    }

    async fn attempt(
        self: &Arc<Self>,
        index: usize,
        path: &str,
        body: &bytes::Bytes,
    ) -> Result<TokenStream, Failure> {
        let target = &self.targets[index];
        let url = &target.url;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.first_byte_timeout);
        let timed_out = || Failure {
            error: InferenceError::UpstreamTimeout {
                url: url.clone(),
                after_ms: u64::try_from(self.first_byte_timeout.as_millis()).unwrap_or(u64::MAX),
            },
            kind: FailureKind::Timeout,
            retry: true,
        };
        let upstream = |kind, retry, message: String| Failure {
            error: InferenceError::Upstream { url: url.clone(), message },
            kind,
            retry,
        };
        let mut post = self
            .client
            .post(format!("{url}{path}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .body(body.clone());
        if let Some(key) = &self.api_key {
            post = post.bearer_auth(key);
        }
        let response = match tokio::time::timeout_at(deadline, post.send()).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) if e.is_connect() => {
                return Err(upstream(FailureKind::Connect, true, format!("cannot connect: {e}")));
            }
            Ok(Err(e)) => {
                return Err(upstream(FailureKind::Disconnected, true, format!("request failed: {e}")));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(&response);
            let text = tokio::time::timeout_at(deadline, response.text()).await.ok().and_then(|t| t.ok());
            let message = openai::error_message(text.as_deref().unwrap_or_default());
            let (error, retry) = match status.as_u16() {
                429 => (InferenceError::UpstreamRateLimited { retry_after }, false),
                503 => (
                    InferenceError::UpstreamUnavailable { retry_after, reason: format!("{url}: {message}") },
                    true,
                ),
                400 | 413 | 422 => (
                    InferenceError::InvalidRequest(format!("the upstream refused the request: {message}")),
                    false,
                ),
                s => (
                    InferenceError::Upstream { url: url.clone(), message: format!("status {s}: {message}") },
                    s >= 500,
                ),
            };
            return Err(Failure { error, kind: FailureKind::Status, retry });
        }
        let mut stream = UpstreamStream {
            body: Box::pin(response.bytes_stream()),
            reader: SseReader::new(),
            pending: VecDeque::new(),
            index: 0,
            finish: None,
            usage: None,
            ended: false,
            answered: false,
            shared: Arc::clone(self),
            target: index,
        };
        target.open_streams.fetch_add(1, Ordering::Relaxed);
        // Until the first event: a failure here may still move on to the next URL.
        while stream.pending.is_empty() {
            let next = tokio::time::timeout_at(
                deadline,
                std::future::poll_fn(|cx| stream.body.as_mut().poll_next(cx)),
            );
            match next.await {
                Err(_) => return Err(timed_out()),
                Ok(None) => {
                    return Err(upstream(
                        FailureKind::Protocol,
                        true,
                        "the stream ended before any event".into(),
                    ));
                }
                Ok(Some(Err(e))) => {
                    return Err(upstream(FailureKind::Disconnected, true, format!("the stream broke: {e}")));
                }
                Ok(Some(Ok(bytes))) => {
                    if let Err(message) = stream.feed(&bytes) {
                        return Err(upstream(FailureKind::Protocol, true, message));
                    }
                }
            }
        }
        target.answered(started.elapsed());
        stream.answered = true;
        Ok(Box::pin(stream))
    }
}

/// One upstream answer as a token stream.
struct UpstreamStream {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    reader: SseReader,
    pending: VecDeque<Result<GenerationEvent>>,
    index: usize,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    /// `Finished` or an error was queued: nothing after it.
    ended: bool,
    /// Handed to the caller (its first event came): dropping it before the end is a cancel.
    answered: bool,
    shared: Arc<Shared>,
    target: usize,
}

impl UpstreamStream {
    /// Turn bytes into events; `Err` when the stream cannot be read any more.
    fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        let payloads = self.reader.push(bytes).map_err(|e| e.to_string())?;
        for data in payloads {
            if self.ended {
                break;
            }
            match openai::parse(&data)? {
                Payload::Done => {
                    let usage =
                        self.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: self.index });
                    let reason = self.finish.unwrap_or(FinishReason::Stop);
                    self.pending.push_back(Ok(GenerationEvent::Finished { reason, usage }));
                    self.ended = true;
                }
                Payload::Error(message) => return Err(format!("the upstream reported an error: {message}")),
                Payload::Chunk(chunk) => {
                    if !chunk.reasoning.is_empty() {
                        self.pending.push_back(Ok(GenerationEvent::Reasoning { text: chunk.reasoning }));
                    }
                    if !chunk.content.is_empty() {
                        let index = self.index;
                        self.index += 1;
                        self.pending.push_back(Ok(GenerationEvent::Token {
                            index,
                            id: 0,
                            text: chunk.content,
                        }));
                    }
                    self.finish = chunk.finish.or(self.finish);
                    self.usage = chunk.usage.or(self.usage);
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, kind: FailureKind, message: String) {
        let target = &self.shared.targets[self.target];
        target.count(kind);
        self.pending.push_back(Err(InferenceError::Upstream { url: target.url.clone(), message }));
        self.ended = true;
    }
}

impl Stream for UpstreamStream {
    type Item = Result<GenerationEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.pending.pop_front() {
                match &event {
                    Ok(GenerationEvent::Token { .. }) => {
                        this.shared.tokens.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(GenerationEvent::Finished { .. }) => {
                        this.shared.completed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                return Poll::Ready(Some(event));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.body.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    if let Err(message) = this.feed(&bytes) {
                        this.fail(FailureKind::Protocol, message);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.fail(FailureKind::Disconnected, format!("the stream broke: {e}"))
                }
                Poll::Ready(None) => {
                    this.fail(FailureKind::Protocol, "the stream ended without [DONE]".into())
                }
            }
        }
    }
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        self.shared.targets[self.target].open_streams.fetch_sub(1, Ordering::Relaxed);
        if self.answered && !self.ended {
            self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Generator for UpstreamEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(&self, request: GenerationRequest) -> BoxFuture<Result<TokenStream>> {
        Box::pin(Arc::clone(&self.shared).open(request))
    }

    /// The conversation as plain text, for the gateway's prompt limits and logs; the messages
    /// themselves are what the upstream gets (its own template applies).
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        Ok(messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect())
    }

    fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            active: s.targets.iter().map(|t| t.open_streams.load(Ordering::Relaxed)).sum(),
            tokens_generated: s.tokens.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            cancelled: s.cancelled.load(Ordering::Relaxed),
            ..EngineStats::default()
        }
    }

    fn is_ready(&self) -> bool {
        let now = Instant::now();
        self.shared.targets.iter().any(|t| t.available(now))
    }

    fn upstreams(&self) -> Vec<UpstreamStatus> {
        let now = Instant::now();
        self.shared.targets.iter().map(|t| t.status(now)).collect()
    }
}
