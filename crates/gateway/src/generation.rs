//! The generation service every protocol shares: a request parsed from any wire format
//! ([`GenerationInput`]) is validated once, into a [`ValidGeneration`] — as TGI's router validates
//! once into a `ValidGenerateRequest` — and then streamed as SSE in the protocol's
//! [`EventFormat`] or collected into one response.
//!
//! Checks live where their facts live: the gateway's limits (prompt bytes, `max_tokens` ceiling,
//! stop sequences) here, from the settings; what every engine relies on (non-empty prompt,
//! `max_tokens` ≥ 1, sampling ranges) in `GenerationRequest::new`, which is the only way to build
//! the engine's request, so the engine never checks the same fields again. The wire types state
//! the same bounds in the OpenAPI document.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;
use prometheus::IntGauge;
use streamgate_inference::{
    ChatMessage, FinishReason, GenerationEvent, GenerationRequest, Generator, InferenceError, SamplingParams,
    Usage,
};

use crate::error::ApiError;
use crate::http::rate_limit::{StreamPermit, client_of};
use crate::http::request_log::RequestLog;
use crate::settings::Settings;
use crate::sse::{
    EventFormat, Replay, SharedReplay, StreamMetrics, TokenEvents, event_stream_response, lock, sse_response,
};
use crate::state::AppState;
use crate::streams::StreamId;

/// Defaults for optional sampling fields of the native and AI SDK protocols (the OpenAI protocol
/// keeps OpenAI's: 1 and 1).
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
pub const DEFAULT_TOP_P: f64 = 0.9;
/// At most this many stop sequences, each 1 to this many characters.
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_STOP_CHARS: usize = 64;

/// What a protocol's prompt is.
#[derive(Debug)]
pub enum PromptInput {
    /// Text already in the model's prompt format.
    Text(String),
    /// One user message, rendered with the model's chat template (limits apply to the message).
    UserMessage(String),
    /// A conversation of `(role, text)` turns, rendered with the chat template (limits apply to
    /// the rendered prompt). Roles: `system` (or `developer`), `user`, `assistant`.
    Chat(Vec<(String, String)>),
}

/// A generation request as a protocol parsed it, not yet validated.
#[derive(Debug)]
pub struct GenerationInput {
    pub prompt: PromptInput,
    /// `None`: `--default-max-tokens`.
    pub max_tokens: Option<u32>,
    /// With the protocol's defaults filled in.
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

/// A request that passed every check, with the engine that will run it.
pub struct ValidGeneration {
    version: String,
    model: Arc<dyn Generator>,
    request: GenerationRequest,
    /// The AI SDK chat this reply belongs to (its stream can be resumed by chat id).
    chat_id: Option<String>,
}

/// A generation run to its end (non-streaming routes).
#[derive(Debug)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

impl ValidGeneration {
    /// Look the version up (404), refuse while draining (503), apply the limits and the chat
    /// template (422). Tags the request's log line with the version.
    pub fn new(
        state: &AppState,
        version: &str,
        input: GenerationInput,
        req: &HttpRequest,
    ) -> Result<Self, ApiError> {
        let model =
            Arc::clone(state.models.get(version).ok_or_else(|| ApiError::UnknownVersion(version.into()))?);
        if let Some(log) = RequestLog::of(req) {
            log.set_version(version);
        }
        if state.shutdown.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        let request = validate(&state.settings, model.as_ref(), input)?;
        Ok(Self { version: version.to_owned(), model, request, chat_id: None })
    }

    /// Register the stream under an AI SDK chat id too.
    pub fn for_chat(mut self, chat_id: Option<String>) -> Self {
        self.chat_id = chat_id;
        self
    }

    /// Queue the request and answer with its token stream as SSE in `format`, holding the
    /// client's stream slot for as long as the stream is open. The stream is registered as
    /// resumable (`X-Stream-Id`, event ids `STREAM-SEQ`). `started` is when the request arrived
    /// (time to first token is measured from it).
    pub async fn stream<F: EventFormat>(
        self,
        state: &AppState,
        format: F,
        req: &HttpRequest,
        started: Instant,
    ) -> Result<HttpResponse, ApiError> {
        let permit = stream_permit(state, req)?;
        let tokens = self.model.generate(self.request).await.inspect_err(|e| count_rejection(state, e))?;
        let metrics = StreamMetrics::new(&state.metrics, &self.version);
        let hub = &state.streams;
        let replay = Replay::new(tokens, format, metrics, RequestLog::of(req), started, hub.enabled());
        let (owner, chat) = (client_of(req), self.chat_id.as_deref());
        let id = hub.enabled().then(|| {
            let id = hub.register(owner, &self.version, chat, Arc::clone(&replay));
            if let Some(replicas) = &state.replicas {
                replicas.share(id, owner, &self.version, chat, &mut lock(&replay));
            }
            id
        });
        Ok(read(state, &self.version, replay, id, 0, permit, req))
    }

    /// Run the generation to its end. If the client goes away, this future is dropped with the
    /// token stream, which cancels the generation.
    pub async fn collect(self, state: &AppState) -> Result<Completion, ApiError> {
        let mut tokens =
            self.model.generate(self.request).await.inspect_err(|e| count_rejection(state, e))?;
        let mut text = String::new();
        while let Some(event) = tokens.next().await {
            match event? {
                GenerationEvent::Token { text: t, .. } => text.push_str(&t),
                // A non-streamed answer is the answer's text only.
                GenerationEvent::Reasoning { .. } => {}
                GenerationEvent::Finished { reason, usage } => {
                    return Ok(Completion { text, finish_reason: reason, usage });
                }
            }
        }
        Err(ApiError::Internal("the token stream ended without a finish event".into()))
    }
}

/// Where a resumed stream picks up.
#[derive(Debug, Clone, Copy)]
pub enum ResumePoint {
    /// After event `n` (its sequence number); 0 is the start.
    After(usize),
    /// From the start, if it is still running (the AI SDK's resume: 204 when it has ended).
    Live,
}

impl ResumePoint {
    /// The first event to send of a stream with `len` events so far, `ended` or not; `Ok(None)`
    /// for [`ResumePoint::Live`] when it has ended.
    fn cursor(self, len: usize, ended: bool) -> Result<Option<usize>, ApiError> {
        match self {
            Self::Live if ended => Ok(None),
            Self::Live => Ok(Some(0)),
            // A client cannot have seen an event that was not sent.
            Self::After(n) if n > len => Err(ApiError::UnknownStream),
            // It saw everything: send `[DONE]` again, so the resumed stream ends like any other.
            Self::After(n) if n == len && ended => Ok(Some(n.saturating_sub(1))),
            Self::After(n) => Ok(Some(n)),
        }
    }
}

/// Continue stream `id` of `version` for the client of `req`: the events after `from`, then the
/// live ones, ending with `[DONE]` like any stream. The same generation — the model does not run
/// again. A stream this replica does not have is looked up in the shared state backend, if any,
/// and followed from there. 404 for an unknown id and for another client's stream alike;
/// `Ok(None)` for [`ResumePoint::Live`] when the stream has ended.
pub async fn resume(
    state: &AppState,
    version: &str,
    id: StreamId,
    replay: Option<SharedReplay>,
    from: ResumePoint,
    req: &HttpRequest,
) -> Result<Option<HttpResponse>, ApiError> {
    if let Some(log) = RequestLog::of(req) {
        log.set_version(version);
    }
    let Some(replay) = replay.or_else(|| state.streams.find(id, client_of(req), version)) else {
        return resume_remote(state, version, id, from, req).await;
    };
    let cursor = {
        let r = lock(&replay);
        from.cursor(r.len(), r.finished().is_some())?
    };
    let Some(cursor) = cursor else { return Ok(None) };
    let permit = stream_permit(state, req)?;
    state.metrics.resumed_streams.with_label_values(&[version]).inc();
    Ok(Some(read(state, version, replay, Some(id), cursor, permit, req)))
}

/// [`resume`] of a stream another replica runs (or ran), read from the shared state backend.
async fn resume_remote(
    state: &AppState,
    version: &str,
    id: StreamId,
    from: ResumePoint,
    req: &HttpRequest,
) -> Result<Option<HttpResponse>, ApiError> {
    let replicas = state.replicas.as_ref().ok_or(ApiError::UnknownStream)?;
    let stream = replicas.find(id, client_of(req), version).await.ok_or(ApiError::UnknownStream)?;
    let len = match from {
        ResumePoint::After(n) => stream.seen_len(n),
        ResumePoint::Live => stream.len,
    };
    let Some(cursor) = from.cursor(len, stream.done)? else { return Ok(None) };
    let permit = stream_permit(state, req)?;
    state.metrics.resumed_streams.with_label_values(&[version]).inc();
    let active = ActiveStream::new(state.metrics.active_streams.with_label_values(&[version]));
    let (retry_hint, name) = (stream.retry, id.to_string());
    // The stream slot and the gauge are held for as long as the response streams.
    let events = replicas.follow(stream, cursor).map(move |event| {
        let _held = (&permit, &active);
        event
    });
    let keep_alive = Duration::from_secs(state.settings.sse_keep_alive_secs);
    Ok(Some(event_stream_response(events, Some(&name), retry_hint, keep_alive, req)))
}

/// Counts one open stream in the active-streams gauge while it lives.
struct ActiveStream(IntGauge);

impl ActiveStream {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The SSE response of one client reading `replay` from event `cursor`, holding its stream slot;
/// a registered stream (`id`) sends ids and waits out the grace period when the client leaves.
fn read(
    state: &AppState,
    version: &str,
    replay: SharedReplay,
    id: Option<StreamId>,
    cursor: usize,
    permit: Option<StreamPermit>,
    req: &HttpRequest,
) -> HttpResponse {
    let active = state.metrics.active_streams.with_label_values(&[version]);
    let name = id.map(|id| id.to_string().into());
    let events =
        TokenEvents::attach(replay, name, cursor, state.shutdown.signal(), active, RequestLog::of(req))
            .holding(permit);
    let events = match id {
        Some(id) => events.on_detach(state.streams.detach_hook(id)),
        None => events,
    };
    sse_response(events, Duration::from_secs(state.settings.sse_keep_alive_secs), req)
}

/// The client's stream slot (429 `too_many_streams` when it already holds the maximum).
fn stream_permit(state: &AppState, req: &HttpRequest) -> Result<Option<StreamPermit>, ApiError> {
    client_of(req)
        .map(|key| state.stream_slots.acquire(key))
        .transpose()
        .inspect_err(|_| state.metrics.rate_limited.with_label_values(&["streams"]).inc())
}

/// Count 503 refusals by reason for `/metrics`.
fn count_rejection(state: &AppState, error: &InferenceError) {
    if let InferenceError::Overloaded { .. } = error {
        state.metrics.rejected.with_label_values(&["queue_full"]).inc();
    }
}

/// The gateway's limits, then the engine's request (which checks the rest).
fn validate(
    settings: &Settings,
    model: &dyn Generator,
    input: GenerationInput,
) -> Result<GenerationRequest, ApiError> {
    let invalid = |m: String| Err(ApiError::InvalidRequest(m));
    // A conversation is rendered with the model's template, and kept beside the prompt for an
    // engine that takes messages (a remote model server applies its own template).
    let (prompt, messages) = match input.prompt {
        PromptInput::Text(text) => (check_prompt(settings, text)?, None),
        PromptInput::UserMessage(text) => {
            // The template makes any message a non-empty prompt; an empty message is still empty.
            if text.is_empty() {
                return invalid("prompt must not be empty".into());
            }
            let messages = vec![ChatMessage::new("user", check_prompt(settings, text)?)];
            (model.render_chat(&messages)?, Some(messages))
        }
        PromptInput::Chat(turns) => {
            let messages = chat_messages(turns)?;
            (check_prompt(settings, model.render_chat(&messages)?)?, Some(messages))
        }
    };
    let max_tokens = input.max_tokens.map_or(settings.default_max_tokens, |n| n as usize);
    if max_tokens > settings.max_tokens_limit {
        return invalid(format!("max_tokens must be between 1 and {}", settings.max_tokens_limit));
    }
    if input.stop.len() > MAX_STOP_SEQUENCES {
        return invalid(format!("at most {MAX_STOP_SEQUENCES} stop sequences"));
    }
    if input.stop.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
        return invalid(format!("stop sequences must be 1 to {MAX_STOP_CHARS} characters"));
    }
    let request = GenerationRequest::new(prompt, max_tokens, input.sampling, input.stop)?;
    Ok(match messages {
        Some(messages) => request.with_messages(messages),
        None => request,
    })
}

/// A `max_tokens`-like field that does not reach the engine (OpenAI's `max_tokens` beside a
/// `max_completion_tokens`, which wins) still has to be in range.
pub fn check_unused_max_tokens(settings: &Settings, value: Option<u32>) -> Result<(), ApiError> {
    match value {
        Some(n) if n == 0 || n as usize > settings.max_tokens_limit => Err(ApiError::InvalidRequest(
            format!("max_tokens must be between 1 and {}", settings.max_tokens_limit),
        )),
        _ => Ok(()),
    }
}

/// The prompt byte limit (the engine refuses an empty prompt).
fn check_prompt(settings: &Settings, prompt: String) -> Result<String, ApiError> {
    if prompt.len() > settings.max_prompt_bytes {
        return Err(ApiError::InvalidRequest(format!(
            "prompt is {} bytes; the limit is {}",
            prompt.len(),
            settings.max_prompt_bytes
        )));
    }
    Ok(prompt)
}

/// Chat turns as the inference crate's messages: roles checked (`developer` is `system`).
fn chat_messages(turns: Vec<(String, String)>) -> Result<Vec<ChatMessage>, ApiError> {
    if turns.is_empty() {
        return Err(ApiError::InvalidRequest("messages must not be empty".into()));
    }
    turns
        .into_iter()
        .map(|(role, content)| match role.as_str() {
            "system" | "developer" => Ok(ChatMessage::new("system", content)),
            "user" | "assistant" => Ok(ChatMessage::new(role, content)),
            other => Err(ApiError::InvalidRequest(format!("unsupported message role '{other}'"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use streamgate_inference::{MockConfig, MockEngine};

    fn input(prompt: PromptInput) -> GenerationInput {
        GenerationInput { prompt, max_tokens: None, sampling: SamplingParams::default(), stop: vec![] }
    }

    fn check(input: GenerationInput) -> Result<GenerationRequest, ApiError> {
        let settings = Settings::parse_from([
            "streamgate",
            "--max-prompt-bytes",
            "8",
            "--max-tokens-limit",
            "10",
            "--default-max-tokens",
            "5",
        ]);
        let model = MockEngine::new(MockConfig { tokens: 4, interval: std::time::Duration::ZERO })
            .unwrap_or_else(|e| unreachable!("{e}"));
        validate(&settings, &model, input)
    }

    #[test]
    fn each_limit_is_checked_once_with_a_clear_error() {
        let text = |s: &str| PromptInput::Text(s.into());
        assert!(check(input(text("hi"))).is_ok_and(|r| r.max_tokens() == 5 && r.prompt() == "hi"));
        let refused = [
            input(text("")),
            input(PromptInput::UserMessage(String::new())),
            input(text("123456789")),
            GenerationInput { max_tokens: Some(11), ..input(text("a")) },
            GenerationInput { max_tokens: Some(0), ..input(text("a")) },
            GenerationInput { stop: vec!["".into()], ..input(text("a")) },
            GenerationInput { stop: vec!["x".repeat(65)], ..input(text("a")) },
            GenerationInput { stop: vec!["x".into(); 5], ..input(text("a")) },
            GenerationInput {
                sampling: SamplingParams { temperature: 2.5, ..SamplingParams::default() },
                ..input(text("a"))
            },
            input(PromptInput::Chat(vec![])),
            input(PromptInput::Chat(vec![("robot".into(), "hi".into())])),
        ];
        for case in refused {
            let shown = format!("{case:?}");
            let err = check(case).err();
            assert!(err.as_ref().is_some_and(|e| e.code() == "invalid_request"), "{shown}: {err:?}");
        }
    }

    #[test]
    fn stop_sequences_are_counted_in_characters() {
        let ok = GenerationInput { stop: vec!["é".repeat(64)], ..input(PromptInput::Text("a".into())) };
        assert!(check(ok).is_ok());
    }
}
