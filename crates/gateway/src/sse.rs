//! Token streams as `text/event-stream` responses, for any wire format, replayable.
//!
//! A [`Replay`] is one generation's event log: it owns the inference crate's token stream and
//! renders each event as a `data:` payload in a wire format (an [`EventFormat`], which the
//! protocols implement); it always ends with `data: [DONE]`, and a failure after the stream has
//! started is the format's error event (then `[DONE]`) — never a cut connection. Payloads are kept
//! (shared, not copied) so a client that reconnects can be sent what it missed.
//!
//! [`TokenEvents`] is one client's reading of a replay: it sends the log from a cursor, each event
//! with the id `STREAM-SEQ`, and drives the token stream itself when it has caught up (so a live
//! stream costs what it did before replay existed: no task, no channel). Only the newest reader
//! drives; an older one ends when a newer one attaches. When the driving reader goes away before
//! the end, its detach hook decides: cancel now (the default without a resume window) or after a
//! grace period (`crate::streams`). Keep-alive comments flow while no token is ready. With a
//! shared state backend, an [`EventMirror`] copies each event out as it is appended, so another
//! replica can serve the resume.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpResponse, Responder};
use actix_web_lab::sse::{Data, Event, Sse};
use bytestring::ByteString;
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
    /// Events for reasoning text a remote model server sent apart from the answer.
    fn reasoning(&mut self, text: &str) -> Vec<String>;
    /// Events after the last token.
    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<String>;
    /// Events reporting a failure after the stream started.
    fn error(&mut self, error: &ApiError) -> Vec<String>;
    /// Start the stream with a `retry:` hint (for `EventSource` clients). A hint is an event of
    /// its own with no data, which some clients (OpenAI's Python SDK) cannot parse: off by default.
    fn retry_hint(&self) -> bool {
        false
    }
    /// Give every event an `id:` (resumable clients read it). OpenAI's Python SDK turns the blank
    /// line after a keep-alive comment into an empty event once it has seen an id, and fails on
    /// it, so the OpenAI format sends none (its streams resume by `X-Stream-Id` and `?after=N`).
    fn event_ids(&self) -> bool {
        true
    }
}

/// Where a replay's events are copied as they are appended (the replicas' shared store).
/// Called under the replay's lock: an implementation hands the event on and returns.
pub trait EventMirror: Send {
    /// Event `seq` (its id's SEQ, from 1) was appended.
    fn append(&mut self, seq: usize, data: &ByteString);
    /// The generation was cancelled before its end: nothing more is appended.
    fn cancelled(&mut self);
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

/// What a replay's driver needs to time and count tokens (resolved once: no label lookups per token).
struct Timing {
    metrics: StreamMetrics,
    started: Instant,
    last_token: Option<Instant>,
    /// Nothing was sent yet, or the token stream returned `Pending` since the last token: the
    /// next token is a new delivery, timed.
    waited: bool,
    /// Tokens rendered but not yet added to the shared counter (added whenever the stream waits).
    unreported: u64,
}

/// One generation's events, shared by the readers of its stream.
pub struct Replay {
    /// `None` once the generation ended or was cancelled.
    tokens: Option<TokenStream>,
    format: Box<dyn EventFormat>,
    /// The `data:` payloads kept: event `n` (its id's SEQ, from 1) is `events[n - 1 - sent_off]`.
    events: VecDeque<ByteString>,
    /// Events already handed out and not kept (a replay nobody can resume keeps nothing).
    sent_off: usize,
    /// Keep every event for later readers (resumable), or hand each out once.
    keep: bool,
    /// Why it ended, once `[DONE]` is the last event (or it was cancelled).
    finished: Option<&'static str>,
    finished_at: Option<Instant>,
    timing: Timing,
    /// The request that started it, told its time to first token and errors.
    log: Option<Arc<RequestLog>>,
    /// Tokens rendered (an event each, when they have text).
    rendered: u64,
    /// Bumped by every reader that attaches; only the reader holding the newest drives.
    epoch: u64,
    /// The format wants a `retry:` hint first.
    retry_hint: bool,
    /// The format's events carry ids.
    event_ids: bool,
    /// Where each event is copied too (another replica may resume the stream).
    mirror: Option<Box<dyn EventMirror>>,
}

/// A replay behind the lock its readers share.
pub type SharedReplay = Arc<Mutex<Replay>>;

/// Lock a replay; a panic elsewhere while holding it leaves it readable.
pub fn lock(replay: &SharedReplay) -> MutexGuard<'_, Replay> {
    replay.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replay {
    /// `started` is when the request arrived (time to first token is measured from it).
    /// `keep`: keep every event for later readers (a resumable stream); otherwise each event is
    /// handed to the one reader and dropped (no copy, nothing retained).
    pub fn new(
        tokens: TokenStream,
        mut format: impl EventFormat,
        metrics: StreamMetrics,
        log: Option<Arc<RequestLog>>,
        started: Instant,
        keep: bool,
    ) -> SharedReplay {
        let events = format.start().into_iter().map(ByteString::from).collect();
        let (retry_hint, event_ids) = (format.retry_hint(), format.event_ids());
        Arc::new(Mutex::new(Self {
            tokens: Some(tokens),
            format: Box::new(format),
            events,
            sent_off: 0,
            keep,
            finished: None,
            finished_at: None,
            timing: Timing { metrics, started, last_token: None, waited: true, unreported: 0 },
            log,
            rendered: 0,
            epoch: 0,
            retry_hint,
            event_ids,
            mirror: None,
        }))
    }

    /// Copy every event to `mirror` from now on, starting with those already appended.
    pub fn set_mirror(&mut self, mut mirror: Box<dyn EventMirror>) {
        for (n, data) in self.events.iter().enumerate() {
            mirror.append(self.sent_off + n + 1, data);
        }
        self.mirror = Some(mirror);
    }

    /// The format's `data:` payloads for `error` (what a reader on another replica sends if the
    /// stream's own replica goes away).
    pub fn error_payloads(&mut self, error: &ApiError) -> Vec<String> {
        self.format.error(error)
    }

    /// The format starts its streams with a `retry:` hint.
    pub fn retry_hint(&self) -> bool {
        self.retry_hint
    }

    /// The format's events carry ids.
    pub fn event_ids(&self) -> bool {
        self.event_ids
    }

    fn push(&mut self, data: ByteString) {
        if let Some(mirror) = &mut self.mirror {
            mirror.append(self.sent_off + self.events.len() + 1, &data);
        }
        self.events.push_back(data);
    }

    /// Events so far.
    pub fn len(&self) -> usize {
        self.sent_off + self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Event `n` (0-based) for a reader: a shared handle when events are kept, else the event
    /// itself (handed out once, in order).
    fn take(&mut self, n: usize) -> Option<ByteString> {
        if self.keep {
            return self.events.get(n.checked_sub(self.sent_off)?).cloned();
        }
        if n != self.sent_off {
            return None;
        }
        let event = self.events.pop_front()?;
        self.sent_off += 1;
        Some(event)
    }

    /// Why it ended, if it has.
    pub fn finished(&self) -> Option<&'static str> {
        self.finished
    }

    /// When it ended, if it has.
    pub fn finished_at(&self) -> Option<Instant> {
        self.finished_at
    }

    /// The newest reader's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Stop the generation now (its token stream is dropped, so the engine frees its slot at
    /// the next step). Nothing more is appended.
    pub fn cancel(&mut self) {
        if self.finished.is_none() {
            self.tokens = None;
            self.finish("client_disconnected");
            if let Some(mirror) = &mut self.mirror {
                mirror.cancelled();
            }
        }
    }

    fn finish(&mut self, reason: &'static str) {
        self.report_tokens();
        self.finished = Some(reason);
        self.finished_at = Some(Instant::now());
    }

    fn end_with(&mut self, events: Vec<String>, reason: &'static str) {
        for data in events {
            self.push(ByteString::from(data));
        }
        self.push(ByteString::from_static(DONE));
        self.tokens = None;
        self.finish(reason);
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
    fn on_token(&mut self, index: usize, text: &str) {
        let timing = &mut self.timing;
        if timing.waited {
            let now = Instant::now();
            match timing.last_token {
                None => {
                    let ttft = now.duration_since(timing.started);
                    timing.metrics.ttft.observe(ttft.as_secs_f64());
                    if let Some(log) = &self.log {
                        log.set_time_to_first_token(ttft);
                    }
                }
                Some(previous) => timing.metrics.gap.observe(now.duration_since(previous).as_secs_f64()),
            }
            timing.last_token = Some(now);
            timing.waited = false;
        }
        self.rendered += 1;
        timing.unreported += 1;
        if let Some(data) = self.format.token(index, text) {
            self.push(ByteString::from(data));
        }
    }

    /// Add the tokens rendered so far to the shared counter (one atomic add per delivery).
    fn report_tokens(&mut self) {
        if self.timing.unreported > 0 {
            self.timing.metrics.tokens.inc_by(self.timing.unreported);
            self.timing.unreported = 0;
        }
    }

    /// Drive the generation while no reader does (a grace period): `Ready` once it has ended or
    /// a reader with a newer epoch than `epoch` attached; `Pending` while tokens are awaited.
    pub fn drive_detached(&mut self, cx: &mut Context<'_>, epoch: u64) -> Poll<()> {
        loop {
            if self.epoch != epoch || self.finished.is_some() {
                return Poll::Ready(());
            }
            if self.drive(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Advance the generation by what is ready: `Ready` when events were appended or it ended,
    /// `Pending` (with `cx` woken later) when nothing is ready.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let before = self.len();
        loop {
            let Some(tokens) = self.tokens.as_mut() else { return Poll::Ready(()) };
            match tokens.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(GenerationEvent::Token { index, text, .. }))) => {
                    self.on_token(index, &text);
                    if self.len() > before {
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(Some(Ok(GenerationEvent::Reasoning { text }))) => {
                    for data in self.format.reasoning(&text) {
                        self.push(ByteString::from(data));
                    }
                    if self.len() > before {
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(Some(Ok(GenerationEvent::Finished { reason, usage }))) => {
                    let events = self.format.finish(reason, usage);
                    self.end_with(events, reason.as_str());
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    self.fail(&ApiError::from(e));
                    return Poll::Ready(());
                }
                Poll::Ready(None) => {
                    self.fail(&ApiError::Internal("the token stream ended without a finish event".into()));
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    self.timing.waited = true;
                    self.report_tokens();
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Called when the reader that drives a replay goes away before its end, with the epoch it
/// held: cancel now, or later if nobody resumes.
pub type DetachHook = Box<dyn FnOnce(&SharedReplay, u64) + Send>;

/// One client's reading of a replay: the SSE event stream of a response.
pub struct TokenEvents {
    replay: SharedReplay,
    /// The stream's id (`X-Stream-Id`); `None`: a replay nobody can resume.
    stream_id: Option<Arc<str>>,
    /// Events carry the id `STREAM-SEQ` (when the stream has an id and its format wants ids).
    ids: bool,
    /// The next event to send (0-based).
    cursor: usize,
    epoch: u64,
    shutdown: ShutdownSignal,
    active: IntGauge,
    log: Option<Arc<RequestLog>>,
    detach: Option<DetachHook>,
    /// Whatever must live as long as the stream (the client's stream slot), dropped with it.
    _held: Option<Box<dyn Send>>,
}

impl TokenEvents {
    /// A stream nobody can resume: its generation is cancelled as soon as this reader goes.
    pub fn new(
        tokens: TokenStream,
        format: impl EventFormat,
        metrics: StreamMetrics,
        shutdown: ShutdownSignal,
        log: Option<Arc<RequestLog>>,
        started: Instant,
    ) -> Self {
        let active = metrics.active.clone();
        let replay = Replay::new(tokens, format, metrics, log.clone(), started, false);
        Self::attach(replay, None, 0, shutdown, active, log)
    }

    /// Read `replay` from event `cursor` (0: the start), taking over from any earlier reader.
    pub fn attach(
        replay: SharedReplay,
        stream_id: Option<Arc<str>>,
        cursor: usize,
        shutdown: ShutdownSignal,
        active: IntGauge,
        log: Option<Arc<RequestLog>>,
    ) -> Self {
        let (epoch, ids) = {
            let mut r = lock(&replay);
            r.epoch += 1;
            (r.epoch, r.event_ids)
        };
        active.inc();
        Self { replay, stream_id, ids, cursor, epoch, shutdown, active, log, detach: None, _held: None }
    }

    /// Keep `guard` (e.g. the client's stream slot) alive for the life of this stream.
    pub fn holding(mut self, guard: impl Send + 'static) -> Self {
        self._held = Some(Box::new(guard));
        self
    }

    /// What happens to the generation when this reader goes before its end (default: cancel).
    pub fn on_detach(mut self, hook: DetachHook) -> Self {
        self.detach = Some(hook);
        self
    }

    fn event(&self, data: ByteString, seq: usize) -> Event {
        event(data, self.stream_id.as_deref().filter(|_| self.ids), seq)
    }
}

/// One SSE event: `data`, with the id `STREAM-SEQ` when the stream sends ids.
pub fn event(data: ByteString, stream_id: Option<&str>, seq: usize) -> Event {
    let data = Data::new(data);
    match stream_id {
        None => Event::Data(data),
        Some(id) => {
            let mut digits = itoa::Buffer::new();
            let seq = digits.format(seq);
            let mut full = String::with_capacity(id.len() + 1 + seq.len());
            full.push_str(id);
            full.push('-');
            full.push_str(seq);
            Event::Data(data.id(full))
        }
    }
}

impl Stream for TokenEvents {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let mut replay = lock(&this.replay);
            if replay.epoch != this.epoch {
                return Poll::Ready(None); // a newer reader took over
            }
            if let Some(data) = replay.take(this.cursor) {
                drop(replay);
                this.cursor += 1;
                return Poll::Ready(Some(Ok(this.event(data, this.cursor))));
            }
            if replay.finished.is_some() {
                return Poll::Ready(None);
            }
            if replay.drive(cx).is_ready() {
                continue;
            }
            if this.shutdown.as_mut().poll(cx).is_ready() {
                replay.fail(&ApiError::ShuttingDown);
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl Drop for TokenEvents {
    fn drop(&mut self) {
        self.active.dec();
        let (finished, tokens, driving) = {
            let mut replay = lock(&self.replay);
            replay.report_tokens();
            (replay.finished, replay.rendered, replay.epoch == self.epoch)
        };
        if let Some(log) = &self.log {
            log.set_stream_outcome(tokens, finished.unwrap_or("client_disconnected"));
        }
        if driving && finished.is_none() {
            match self.detach.take() {
                Some(hook) => hook(&self.replay, self.epoch),
                None => lock(&self.replay).cancel(),
            }
        }
    }
}

/// How often a browser's `EventSource` should retry a dropped stream (the `retry:` hint).
pub const RETRY: Duration = Duration::from_secs(1);

/// The response of one reader: SSE headers, a `retry:` hint first where the format wants one,
/// plus `X-Accel-Buffering: no` so nginx passes events through at once.
pub fn sse_response(events: TokenEvents, keep_alive: Duration, req: &actix_web::HttpRequest) -> HttpResponse {
    let stream_id = events.stream_id.clone();
    let retry_hint = lock(&events.replay).retry_hint;
    event_stream_response(events, stream_id.as_deref(), retry_hint, keep_alive, req)
}

/// An SSE response of any event stream (a local reader, or a stream read from another replica
/// through the shared store), with the stream's id in `X-Stream-Id`.
pub fn event_stream_response(
    events: impl Stream<Item = Result<Event, Infallible>> + 'static,
    stream_id: Option<&str>,
    retry_hint: bool,
    keep_alive: Duration,
    req: &actix_web::HttpRequest,
) -> HttpResponse {
    let mut sse = Sse::from_stream(events).with_keep_alive(keep_alive);
    if retry_hint {
        sse = sse.with_retry_duration(RETRY);
    }
    let mut response = sse.respond_to(req);
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    if let Some(id) = stream_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(HeaderName::from_static("x-stream-id"), id);
    }
    response.map_into_boxed_body()
}
