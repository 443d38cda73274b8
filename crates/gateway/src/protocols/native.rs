//! streamgate's own protocol, for each model version:
//! - `POST /api/{version}/inference/stream` (JSON body) and `GET …/inference/stream?prompt=…`
//!   (for `EventSource`): `text/event-stream`, one `{"index","text"}` event per token that has
//!   text, a `{"finish_reason","usage"}` event, then `data: [DONE]`;
//! - `POST /api/{version}/inference`: the same generation as one JSON response.
//!
//! This module owns the wire types (with the bounds the OpenAPI document shows), their parsing
//! into a [`GenerationInput`], and the event encoding ([`NativeFormat`]); errors use the native
//! style of [`crate::error`].

use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use streamgate_inference::{FinishReason, SamplingParams, Usage};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::generation::{
    DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GenerationInput, PromptInput, ResumePoint, ValidGeneration, resume,
};
use crate::http::paths::resource;
use crate::protocols::wire::{self, BodyGenerationErrors, Query, QueryGenerationErrors, Stop};
use crate::sse::EventFormat;
use crate::state::AppState;
use crate::streams::StreamId;

/// A generation request (`POST` body). Bounds that depend on settings (`prompt` length,
/// `max_tokens` ceiling) are filled into the served OpenAPI document from them.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "Write a haiku about rivers.", "max_tokens": 64, "temperature": 0.7}))]
pub struct InferenceRequest {
    /// The prompt text: at least 1 character, at most `--max-prompt-bytes` bytes of UTF-8, and
    /// fewer tokens than the model's context (else 422 `prompt_too_long`).
    #[schema(min_length = 1)]
    pub prompt: String,
    /// Tokens to generate, 1..=`--max-tokens-limit` (default `--default-max-tokens`, 256).
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// 0 is greedy; up to 2. Default 0.7.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1]. Default 0.9.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens (0 = off, the default).
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 0, maximum = 4_294_967_295_u64)]
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling (default: random).
    #[serde(default, deserialize_with = "wire::opt_u64")]
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    /// > 1 discourages repeating tokens; (0, 10]. Default 1 (off).
    #[schema(exclusive_minimum = 0.0, maximum = 10.0)]
    pub repetition_penalty: Option<f64>,
    #[schema(schema_with = wire::stop_schema)]
    pub stop: Option<Stop>,
    /// Treat `prompt` as a user message and apply the model's chat template (default false).
    #[serde(default)]
    pub chat: bool,
}

/// The same request as a query string (`GET …/inference/stream?prompt=…`, for `EventSource`).
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InferenceQuery {
    /// The prompt text: the POST body's limits, and at most 4096 characters (so that it fits in
    /// a URL percent-encoded).
    #[param(min_length = 1, max_length = 4096, example = "Write a haiku about rivers.")]
    #[serde(deserialize_with = "wire::query_prompt")]
    pub prompt: String,
    #[param(minimum = 1, example = 64)]
    pub max_tokens: Option<u32>,
    #[param(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    #[param(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[param(minimum = 0, maximum = 4_294_967_295_u64)]
    pub top_k: Option<u32>,
    #[param(minimum = 0)]
    pub seed: Option<u64>,
    #[param(exclusive_minimum = 0.0, maximum = 10.0)]
    pub repetition_penalty: Option<f64>,
    /// One stop sequence.
    #[param(min_length = 1, max_length = 64)]
    pub stop: Option<String>,
    /// Apply the model's chat template (`true`/`false`).
    pub chat: Option<bool>,
}

impl From<InferenceQuery> for InferenceRequest {
    fn from(q: InferenceQuery) -> Self {
        Self {
            prompt: q.prompt,
            max_tokens: q.max_tokens,
            temperature: q.temperature,
            top_p: q.top_p,
            top_k: q.top_k,
            seed: q.seed,
            repetition_penalty: q.repetition_penalty,
            stop: q.stop.map(Stop::One),
            chat: q.chat.unwrap_or(false),
        }
    }
}

impl InferenceRequest {
    /// The request with the native defaults filled in.
    pub fn into_input(self) -> GenerationInput {
        GenerationInput {
            prompt: if self.chat {
                PromptInput::UserMessage(self.prompt)
            } else {
                PromptInput::Text(self.prompt)
            },
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
                top_p: self.top_p.unwrap_or(DEFAULT_TOP_P),
                top_k: self.top_k.unwrap_or(0) as usize,
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                seed: self.seed,
            },
            stop: Stop::into_vec(self.stop),
        }
    }
}

/// The response of `POST /api/{version}/inference`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"version": "v1", "text": "Rivers bend and run", "finish_reason": "stop",
    "usage": {"prompt_tokens": 12, "completion_tokens": 5}}))]
pub struct InferenceResponse {
    /// The model version that served the request.
    pub version: String,
    pub text: String,
    #[schema(value_type = String, example = "stop")]
    pub finish_reason: FinishReason,
    #[schema(value_type = Object)]
    pub usage: Usage,
}

/// A token event of the native stream (`data: {...}`).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"index": 0, "text": "Hel"}))]
pub struct TokenEventSchema {
    /// The token's position in the output (tokens without text send no event).
    pub index: usize,
    #[schema(min_length = 1)]
    pub text: String,
}

/// The last event before `[DONE]` of a stream that ran to its end.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"finish_reason": "stop", "usage": {"prompt_tokens": 12, "completion_tokens": 5}}))]
pub struct FinishEventSchema {
    #[schema(value_type = String, pattern = "^(stop|length|cancelled)$")]
    pub finish_reason: FinishReason,
    pub usage: UsageSchema,
}

#[derive(Serialize, ToSchema)]
pub struct UsageSchema {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// One `data:` event of the native stream: a token, the finish, or an error (then `[DONE]`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum NativeEvent {
    Token(TokenEventSchema),
    Finish(FinishEventSchema),
    Error(ErrorBody),
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/api/{version}/inference/stream")
            .route(web::post().to(stream_post))
            .route(web::get().to(stream_get)),
    )
    .service(resource("/api/{version}/inference").route(web::post().to(complete)));
}

/// Stream a generation as server-sent events.
#[utoipa::path(post, path = "/api/{version}/inference/stream", tag = "inference",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    request_body = InferenceRequest,
    responses(
        (status = 200, description = "`data: {\"index\":0,\"text\":\"Hel\"}` per token with text, then `data: {\"finish_reason\":\"stop\",\"usage\":{...}}`, then `data: [DONE]`; keep-alive comments while waiting", content_type = "text/event-stream", body = NativeEvent),
        BodyGenerationErrors))]
pub async fn stream_post(
    state: web::Data<AppState>,
    version: web::Path<String>,
    body: web::Json<InferenceRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    stream(&state, &version, body.into_inner(), &req).await
}

/// The same stream for `EventSource` (GET with a query string). A request with `Last-Event-ID`
/// (what `EventSource` sends when it reconnects) continues that stream after that event instead
/// of starting a new generation.
#[utoipa::path(get, path = "/api/{version}/inference/stream", tag = "inference",
    params(("version" = String, Path, description = "Model version, e.g. v1"), InferenceQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received (`STREAM-SEQ`): continue that stream")),
    responses(
        (status = 200, description = "The same event stream as the POST form", content_type = "text/event-stream", body = NativeEvent),
        QueryGenerationErrors))]
pub async fn stream_get(
    state: web::Data<AppState>,
    version: web::Path<String>,
    query: Query<InferenceQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    if let Some(last) = req.headers().get("last-event-id") {
        let (id, seq) =
            last.to_str().ok().and_then(StreamId::parse_event_id).ok_or(ApiError::UnknownStream)?;
        return resume(&state, &version, id, None, ResumePoint::After(seq), &req)
            .await?
            .ok_or(ApiError::UnknownStream);
    }
    stream(&state, &version, query.0.into(), &req).await
}

async fn stream(
    state: &AppState,
    version: &str,
    body: InferenceRequest,
    req: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let generation = ValidGeneration::new(state, version, body.into_input(), req)?;
    generation.stream(state, NativeFormat, req, started).await
}

/// Generate and return the whole text as one JSON response.
#[utoipa::path(post, path = "/api/{version}/inference", tag = "inference",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    request_body = InferenceRequest,
    responses((status = 200, body = InferenceResponse),
        BodyGenerationErrors))]
pub async fn complete(
    state: web::Data<AppState>,
    version: web::Path<String>,
    body: web::Json<InferenceRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let generation = ValidGeneration::new(&state, &version, body.into_inner().into_input(), &req)?;
    let done = generation.collect(&state).await?;
    Ok(HttpResponse::Ok().json(InferenceResponse {
        version: version.into_inner(),
        text: done.text,
        finish_reason: done.finish_reason,
        usage: done.usage,
    }))
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
    /// Tokens without text (an end-of-sequence token, bytes held back until a character or a
    /// possible stop sequence is complete) send nothing.
    fn token(&mut self, index: usize, text: &str) -> Option<String> {
        if text.is_empty() {
            return None;
        }
        native_token_json(index, text)
    }

    /// `{"reasoning":"…"}`, apart from the answer's token events.
    fn reasoning(&mut self, text: &str) -> Vec<String> {
        serde_json::to_string(&serde_json::json!({ "reasoning": text })).into_iter().collect()
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<String> {
        serde_json::to_string(&NativeFinish { finish_reason: reason, usage }).into_iter().collect()
    }

    fn error(&mut self, error: &ApiError) -> Vec<String> {
        vec![error.to_sse_data()]
    }

    /// Browsers' `EventSource` reads this stream: tell it how soon to reconnect (and resume).
    fn retry_hint(&self) -> bool {
        true
    }
}

/// `{"index":N,"text":"…"}`, the hottest string the gateway builds (one per token). Text that
/// needs no JSON escaping (most tokens) is copied into a buffer of exactly the right size — one
/// allocation, which the SSE layer then takes over without another; anything else goes through
/// serde_json.
pub fn native_token_json(index: usize, text: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use actix_web_lab::sse::Sse;
    use streamgate_inference::{GenerationEvent, InferenceError, TokenStream};

    use crate::metrics::Metrics;
    use crate::sse::{ShutdownSignal, StreamMetrics, TokenEvents};

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
    async fn tokens_without_text_send_no_event() {
        let held = |index: usize| Ok(GenerationEvent::Token { index, id: 9, text: String::new() });
        let out = wire(
            stream_of(vec![
                Ok(GenerationEvent::Token { index: 0, id: 5, text: "a".into() }),
                held(1),
                Ok(GenerationEvent::Token { index: 2, id: 6, text: "é".into() }),
                held(3),
                Ok(GenerationEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: Usage { prompt_tokens: 1, completion_tokens: 4 },
                }),
            ]),
            never(),
        )
        .await;
        assert_eq!(out.len(), 4, "{out:?}");
        assert_eq!(out[1], r#"data: {"index":2,"text":"é"}"#);
        assert!(out.iter().all(|e| !e.contains(r#""text":"""#)), "{out:?}");
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
