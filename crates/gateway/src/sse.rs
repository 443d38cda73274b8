//! Token streams as `text/event-stream` responses.
//!
//! [`TokenEvents`] is a small state machine over the inference crate's token stream: each event
//! becomes a `data:` line in a wire format ([`EventFormat`]: native, OpenAI chunks, AI SDK parts),
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
use serde::Serialize;
use streamgate_inference::{FinishReason, GenerationEvent, TokenStream, Usage};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::rate_limit::StreamPermit;
use crate::request_log::RequestLog;

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
    fn error(&mut self, error: &ApiError) -> Vec<String> {
        vec![error.to_sse_data()]
    }
}

/// streamgate's own format: `{"index":0,"text":"Hello"}` per token, then
/// `{"finish_reason":"stop","usage":{...}}`.
#[derive(Debug, Default)]
pub struct NativeFormat;

#[derive(Serialize)]
struct NativeToken<'a> {
    index: usize,
    text: &'a str,
}

#[derive(Serialize)]
struct NativeFinish {
    finish_reason: FinishReason,
    usage: Usage,
}

impl EventFormat for NativeFormat {
    fn token(&mut self, index: usize, text: &str) -> Option<String> {
        native_token_json(index, text)
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<String> {
        serde_json::to_string(&NativeFinish { finish_reason: reason, usage }).into_iter().collect()
    }
}

/// `{"index":N,"text":"…"}`, the hottest string the gateway builds (one per token). Text that
/// needs no JSON escaping (most tokens) is copied into a buffer of exactly the right size — one
/// allocation, which the SSE layer then takes over without another; anything else goes through
/// serde_json.
fn native_token_json(index: usize, text: &str) -> Option<String> {
    const HEAD: &str = "{\"index\":";
    const MIDDLE: &str = ",\"text\":\"";
    const TAIL: &str = "\"}";
    if text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        return serde_json::to_string(&NativeToken { index, text }).ok();
    }
    let mut digits = itoa::Buffer::new();
    let index = digits.format(index);
    let mut json = String::with_capacity(HEAD.len() + index.len() + MIDDLE.len() + text.len() + TAIL.len());
    json.push_str(HEAD);
    json.push_str(index);
    json.push_str(MIDDLE);
    json.push_str(text);
    json.push_str(TAIL);
    Some(json)
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
    /// The client's stream slot, released when the stream is dropped.
    _permit: Option<StreamPermit>,
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
            _permit: None,
        }
    }

    /// Hold the client's stream slot for the life of this stream.
    pub fn holding(mut self, permit: Option<StreamPermit>) -> Self {
        self._permit = permit;
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

#[cfg(test)]
mod tests {
    use super::*;
    use streamgate_inference::InferenceError;

    fn stream_of(items: Vec<streamgate_inference::Result<GenerationEvent>>) -> TokenStream {
        Box::pin(futures_util::stream::iter(items))
    }

    fn never() -> ShutdownSignal {
        Box::pin(std::future::pending())
    }

    /// The exact bytes a client receives, split into events.
    async fn wire(tokens: TokenStream, shutdown: ShutdownSignal) -> Vec<String> {
        let metrics = Metrics::new().unwrap_or_else(|e| unreachable!("{e}"));
        wire_with(&metrics, tokens, shutdown).await
    }

    async fn wire_with(metrics: &Metrics, tokens: TokenStream, shutdown: ShutdownSignal) -> Vec<String> {
        let events = TokenEvents::new(
            tokens,
            NativeFormat,
            StreamMetrics::new(metrics, "v1"),
            shutdown,
            None,
            Instant::now(),
        );
        let bytes = actix_web::body::to_bytes(Sse::from_stream(events)).await.unwrap_or_default();
        String::from_utf8_lossy(&bytes).split_terminator("\n\n").map(str::to_owned).collect()
    }

    #[actix_web::test]
    async fn tokens_then_finish_then_done() {
        let out = wire(
            stream_of(vec![
                Ok(GenerationEvent::Token { index: 0, id: 5, text: "Hel".into() }),
                Ok(GenerationEvent::Token { index: 1, id: 6, text: "lo\ndata: x".into() }),
                Ok(GenerationEvent::Finished {
                    reason: FinishReason::Length,
                    usage: Usage { prompt_tokens: 3, completion_tokens: 2 },
                }),
            ]),
            never(),
        )
        .await;
        assert_eq!(out.len(), 4, "{out:?}");
        assert_eq!(out[0], r#"data: {"index":0,"text":"Hel"}"#);
        // The newline travels escaped inside JSON, so it cannot break the event framing.
        assert_eq!(out[1], r#"data: {"index":1,"text":"lo\ndata: x"}"#);
        assert_eq!(
            out[2],
            r#"data: {"finish_reason":"length","usage":{"prompt_tokens":3,"completion_tokens":2}}"#
        );
        assert_eq!(out[3], "data: [DONE]");
    }

    #[actix_web::test]
    async fn an_error_mid_stream_is_a_data_event_then_done() {
        let out = wire(
            stream_of(vec![
                Ok(GenerationEvent::Token { index: 0, id: 5, text: "a".into() }),
                Err(InferenceError::Runtime("kaboom in /secret".into())),
            ]),
            never(),
        )
        .await;
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[1], r#"data: {"error":{"code":"internal_error","message":"internal server error"}}"#);
        assert_eq!(out[2], "data: [DONE]");
    }

    #[actix_web::test]
    async fn a_stream_that_ends_early_reports_an_error() {
        let out = wire(stream_of(vec![]), never()).await;
        assert_eq!(out.len(), 2);
        assert!(out[0].starts_with(r#"data: {"error":"#) && out[1] == "data: [DONE]");
    }

    #[actix_web::test]
    async fn shutdown_ends_a_waiting_stream_with_error_and_done() {
        let pending: TokenStream = Box::pin(futures_util::stream::pending());
        let out = wire(pending, Box::pin(std::future::ready(()))).await;
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].contains(r#""code":"shutting_down""#) && out[1] == "data: [DONE]", "{out:?}");
    }

    fn token(index: usize) -> streamgate_inference::Result<GenerationEvent> {
        Ok(GenerationEvent::Token { index, id: index as u32, text: "t".into() })
    }

    fn finished(tokens: usize) -> streamgate_inference::Result<GenerationEvent> {
        Ok(GenerationEvent::Finished {
            reason: FinishReason::Length,
            usage: Usage { prompt_tokens: 1, completion_tokens: tokens },
        })
    }

    /// (tokens counted, time-to-first-token samples, inter-token samples) for version v1.
    fn counts(metrics: &Metrics) -> (u64, u64, u64) {
        (
            metrics.tokens_streamed.with_label_values(&["v1"]).get(),
            metrics.time_to_first_token.with_label_values(&["v1"]).get_sample_count(),
            metrics.inter_token.with_label_values(&["v1"]).get_sample_count(),
        )
    }

    #[actix_web::test]
    async fn a_burst_of_ready_tokens_is_one_delivery_and_every_token_is_counted() {
        let metrics = Metrics::new().unwrap_or_else(|e| unreachable!("{e}"));
        let out =
            wire_with(&metrics, stream_of(vec![token(0), token(1), token(2), finished(3)]), never()).await;
        assert_eq!(out.len(), 5, "{out:?}");
        assert_eq!(counts(&metrics), (3, 1, 0));
    }

    #[actix_web::test]
    async fn tokens_that_had_to_be_waited_for_are_timed() {
        let metrics = Metrics::new().unwrap_or_else(|e| unreachable!("{e}"));
        // Each token arrives after the stream has returned Pending once.
        let tokens: TokenStream = Box::pin(futures_util::stream::unfold(0usize, |i| async move {
            tokio::task::yield_now().await;
            match i {
                0..3 => Some((token(i), i + 1)),
                3 => Some((finished(3), i + 1)),
                _ => None,
            }
        }));
        let out = wire_with(&metrics, tokens, never()).await;
        assert_eq!(out.len(), 5, "{out:?}");
        assert_eq!(counts(&metrics), (3, 1, 2), "one first-token sample, then a gap per waited-for token");
    }

    #[test]
    fn native_token_json_matches_serde_json_for_any_text() {
        for text in [
            "",
            "Hello",
            " world",
            "a\"b",
            "back\\slash",
            "line\nbreak",
            "tab\t",
            "\u{1}",
            "héllo ✓ 🦀",
            "</script>",
        ] {
            for index in [0, 7, 10, 12_345] {
                let expected = serde_json::to_string(&NativeToken { index, text }).ok();
                assert_eq!(native_token_json(index, text), expected, "{text:?}");
            }
        }
    }
}
