//! Token streams as `text/event-stream` responses, for any wire format.
//!
//! [`TokenEvents`] is a small state machine over the inference crate's token stream: each event
//! becomes a `data:` line in a wire format (an [`EventFormat`], which the protocols implement),
//! the stream always ends with `data: [DONE]`, and a failure after the stream has started is a
//! JSON `data:` event with an `error` object (then `[DONE]`) — never a cut connection. Keep-alive
//! comments flow while no token is ready; dropping the response (client gone) drops the token
//! stream, which cancels the generation at its next step.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpResponse, Responder};
use actix_web_lab::sse::{Data, Event, Sse};
use futures_core::Stream;
use prometheus::{Histogram, IntCounter, IntGauge};
use streamgate_inference::{FinishReason, GenerationEvent, TokenStream, Usage};

use crate::error::ApiError;
use crate::http::request_log::RequestLog;
use crate::metrics::Metrics;

/// The literal last event of every stream.
pub const DONE: &str = "[DONE]";

/// How token events are written on the wire. Each method returns `data:` payloads.
pub trait EventFormat: Send + Unpin + 'static {
    /// Events before the first token (e.g. an AI SDK `start` part).
    fn start(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// The event for one token, or `None` to send nothing (e.g. empty text).
    fn token(&mut self, index: usize, text: &str) -> Option<String>;
    /// Events after the last token.
    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<String>;
    /// Events reporting a failure after the stream started.
    fn error(&mut self, error: &ApiError) -> Vec<String>;
}

/// Per-stream metric handles, resolved once (no label lookups per token).
pub struct StreamMetrics {
    active: IntGauge,
    tokens: IntCounter,
    ttft: Histogram,
    gap: Histogram,
}

impl StreamMetrics {
    pub fn new(metrics: &Metrics, version: &str) -> Self {
        Self {
            active: metrics.active_streams.with_label_values(&[version]),
            tokens: metrics.tokens_streamed.with_label_values(&[version]),
            ttft: metrics.time_to_first_token.with_label_values(&[version]),
            gap: metrics.inter_token.with_label_values(&[version]),
        }
    }
}

/// Resolves when the server wants open streams to end now (drain timeout reached).
pub type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

enum State {
    Running,
    Finished,
}

/// The SSE event stream of one generation.
pub struct TokenEvents<F: EventFormat> {
    tokens: TokenStream,
    format: F,
    state: State,
    pending: VecDeque<String>,
    shutdown: ShutdownSignal,
    metrics: StreamMetrics,
    log: Option<Arc<RequestLog>>,
    started: Instant,
    last_token: Option<Instant>,
    /// Nothing was sent yet, or the token stream returned `Pending` since the last token: the
    /// next token is a new delivery, timed.
    waited: bool,
    tokens_sent: u64,
    /// Tokens sent but not yet added to the shared counter (added whenever the stream waits).
    tokens_unreported: u64,
    finish_reason: Option<&'static str>,
    /// Whatever must live as long as the stream (the client's stream slot), dropped with it.
    _held: Option<Box<dyn Send>>,
}

impl<F: EventFormat> TokenEvents<F> {
    /// `started` is when the request arrived (time to first token is measured from it).
    pub fn new(
        tokens: TokenStream,
        mut format: F,
        metrics: StreamMetrics,
        shutdown: ShutdownSignal,
        log: Option<Arc<RequestLog>>,
        started: Instant,
    ) -> Self {
        metrics.active.inc();
        let pending = format.start().into();
        Self {
            tokens,
            format,
            state: State::Running,
            pending,
            shutdown,
            metrics,
            log,
            started,
            last_token: None,
            waited: true,
            tokens_sent: 0,
            tokens_unreported: 0,
            finish_reason: None,
            _held: None,
        }
    }

    /// Keep `guard` (e.g. the client's stream slot) alive for the life of this stream.
    pub fn holding(mut self, guard: impl Send + 'static) -> Self {
        self._held = Some(Box::new(guard));
        self
    }

    fn end_with(&mut self, events: Vec<String>, reason: &'static str) {
        self.pending.extend(events);
        self.pending.push_back(DONE.to_owned());
        self.report_tokens();
        self.state = State::Finished;
        self.finish_reason = Some(reason);
    }

    fn fail(&mut self, error: &ApiError) {
        if let Some(log) = &self.log {
            log.set_error(error.to_string());
        }
        let events = self.format.error(error);
        self.end_with(events, "error");
    }

    /// Times the token and renders its event. The clock is read once per delivery: tokens that
    /// were already waiting when the stream was polled (a burst drained in one go) are sent
    /// back to back and add no gap, which keeps a clock read and a histogram update off the
    /// per-event path where the gateway is busiest; a token that had to be waited for is timed.
    fn on_token(&mut self, index: usize, text: &str) -> Option<String> {
        if self.waited {
            let now = Instant::now();
            match self.last_token {
                None => {
                    let ttft = now.duration_since(self.started);
                    self.metrics.ttft.observe(ttft.as_secs_f64());
                    if let Some(log) = &self.log {
                        log.set_time_to_first_token(ttft);
                    }
                }
                Some(previous) => self.metrics.gap.observe(now.duration_since(previous).as_secs_f64()),
            }
            self.last_token = Some(now);
            self.waited = false;
        }
        self.tokens_sent += 1;
        self.tokens_unreported += 1;
        self.format.token(index, text)
    }

    /// Add the tokens sent so far to the shared counter (one atomic add per delivery, not per token).
    fn report_tokens(&mut self) {
        if self.tokens_unreported > 0 {
            self.metrics.tokens.inc_by(self.tokens_unreported);
            self.tokens_unreported = 0;
        }
    }
}

impl<F: EventFormat> Stream for TokenEvents<F> {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Event::Data(Data::new(data)))));
            }
            if matches!(this.state, State::Finished) {
                return Poll::Ready(None);
            }
            match this.tokens.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(GenerationEvent::Token { index, text, .. }))) => {
                    if let Some(data) = this.on_token(index, &text) {
                        return Poll::Ready(Some(Ok(Event::Data(Data::new(data)))));
                    }
                }
                Poll::Ready(Some(Ok(GenerationEvent::Finished { reason, usage }))) => {
                    let events = this.format.finish(reason, usage);
                    this.end_with(events, reason.as_str());
                }
                Poll::Ready(Some(Err(e))) => this.fail(&ApiError::from(e)),
                Poll::Ready(None) => {
                    this.fail(&ApiError::Internal("the token stream ended without a finish event".into()))
                }
                Poll::Pending => {
                    this.waited = true;
                    this.report_tokens();
                    if this.shutdown.as_mut().poll(cx).is_ready() {
                        this.fail(&ApiError::ShuttingDown);
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<F: EventFormat> Drop for TokenEvents<F> {
    fn drop(&mut self) {
        self.report_tokens();
        self.metrics.active.dec();
        if let Some(log) = &self.log {
            log.set_stream_outcome(self.tokens_sent, self.finish_reason.unwrap_or("client_disconnected"));
        }
    }
}

/// The response: SSE headers plus `X-Accel-Buffering: no` so nginx passes events through at once.
pub fn sse_response<F: EventFormat>(
    events: TokenEvents<F>,
    keep_alive: Duration,
    req: &actix_web::HttpRequest,
) -> HttpResponse {
    let mut response = Sse::from_stream(events).with_keep_alive(keep_alive).respond_to(req);
    response
        .headers_mut()
        .insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    response.map_into_boxed_body()
}
