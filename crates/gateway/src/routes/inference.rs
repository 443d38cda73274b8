//! The native generation API of each model version:
//! - `POST /api/{version}/inference/stream` (JSON body) and `GET …/inference/stream?prompt=…`
//!   (for `EventSource`): `text/event-stream`, one `{"index","text"}` event per token, a
//!   `{"finish_reason","usage"}` event, then `data: [DONE]`;
//! - `POST /api/{version}/inference`: the same generation as one JSON response.
//!
//! Wire types are validated into an inference `GenerationRequest` before anything is queued.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use streamgate_inference::{
    ChatMessage, FinishReason, GenerationEvent, GenerationRequest, Generator, SamplingParams, Usage,
};
use utoipa::{IntoParams, ToSchema};

use crate::app::AppState;
use crate::error::ApiError;
use crate::rate_limit::{StreamPermit, client_of};
use crate::request_log::RequestLog;
use crate::routes::resource;
use crate::settings::Settings;
use crate::sse::{EventFormat, NativeFormat, StreamMetrics, TokenEvents, sse_response};

/// Defaults for optional sampling fields (documented in docs/api.md and the OpenAPI schema).
pub const DEFAULT_TEMPERATURE: f32 = 0.7;
pub const DEFAULT_TOP_P: f32 = 0.9;
/// At most this many stop sequences, each at most this many bytes.
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_STOP_BYTES: usize = 64;

/// Stop sequences: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(stop: Option<Self>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

/// A generation request (`POST` body).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// The prompt text (non-empty; at most `--max-prompt-bytes`, and shorter than the model's context in tokens).
    pub prompt: String,
    /// Tokens to generate, 1..=`--max-tokens-limit` (default `--default-max-tokens`, 256).
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// 0 is greedy; up to 2. Default 0.7.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1]. Default 0.9.
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 = off, the default).
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling (default: random).
    pub seed: Option<u64>,
    /// > 1 discourages repeating tokens; (0, 10]. Default 1 (off).
    pub repetition_penalty: Option<f32>,
    /// Up to 4 sequences that end generation (not included in the output).
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
    /// The prompt text.
    pub prompt: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    /// One stop sequence.
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

/// The response of `POST /api/{version}/inference`.
#[derive(Debug, Serialize, ToSchema)]
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
pub struct TokenEventSchema {
    pub index: usize,
    pub text: String,
}

/// Limits and checks every generation request passes before it reaches a model.
pub fn validate_generation(
    settings: &Settings,
    prompt: &str,
    max_tokens: Option<u32>,
    sampling: SamplingParams,
    stop: Vec<String>,
) -> Result<GenerationRequest, ApiError> {
    let invalid = |m: String| Err(ApiError::InvalidRequest(m));
    if prompt.is_empty() {
        return invalid("prompt must not be empty".into());
    }
    if prompt.len() > settings.max_prompt_bytes {
        return invalid(format!(
            "prompt is {} bytes; the limit is {}",
            prompt.len(),
            settings.max_prompt_bytes
        ));
    }
    let max_tokens = max_tokens.map_or(settings.default_max_tokens, |n| n as usize);
    if max_tokens == 0 || max_tokens > settings.max_tokens_limit {
        return invalid(format!("max_tokens must be between 1 and {}", settings.max_tokens_limit));
    }
    if stop.len() > MAX_STOP_SEQUENCES {
        return invalid(format!("at most {MAX_STOP_SEQUENCES} stop sequences"));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return invalid(format!("stop sequences must be 1 to {MAX_STOP_BYTES} bytes"));
    }
    sampling.validate().map_err(ApiError::from)?;
    Ok(GenerationRequest { prompt: prompt.to_owned(), max_tokens, sampling, stop })
}

impl InferenceRequest {
    /// Validate against the settings and the model (chat template), into an inference request.
    pub fn into_generation(
        self,
        settings: &Settings,
        model: &dyn Generator,
    ) -> Result<GenerationRequest, ApiError> {
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: self.top_p.unwrap_or(DEFAULT_TOP_P),
            top_k: self.top_k.unwrap_or(0) as usize,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed: self.seed,
        };
        let mut request = validate_generation(
            settings,
            &self.prompt,
            self.max_tokens,
            sampling,
            Stop::into_vec(self.stop),
        )?;
        if self.chat {
            request.prompt = model.render_chat(&[ChatMessage::new("user", self.prompt)])?;
        }
        Ok(request)
    }
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
        (status = 200, description = "`data: {\"index\":0,\"text\":\"Hel\"}` per token, then `data: {\"finish_reason\":\"stop\",\"usage\":{...}}`, then `data: [DONE]`; keep-alive comments while waiting", content_type = "text/event-stream", body = TokenEventSchema),
        (status = 400, body = crate::routes::openapi::ErrorResponse), (status = 404, body = crate::routes::openapi::ErrorResponse),
        (status = 413, body = crate::routes::openapi::ErrorResponse), (status = 415, body = crate::routes::openapi::ErrorResponse),
        (status = 422, body = crate::routes::openapi::ErrorResponse), (status = 429, body = crate::routes::openapi::ErrorResponse),
        (status = 503, body = crate::routes::openapi::ErrorResponse)))]
pub async fn stream_post(
    state: web::Data<AppState>,
    version: web::Path<String>,
    body: web::Json<InferenceRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    stream(state, &version, body.into_inner(), &req).await
}

/// The same stream for `EventSource` (GET with a query string).
#[utoipa::path(get, path = "/api/{version}/inference/stream", tag = "inference",
    params(("version" = String, Path, description = "Model version, e.g. v1"), InferenceQuery),
    responses(
        (status = 200, description = "The same event stream as the POST form", content_type = "text/event-stream", body = TokenEventSchema),
        (status = 404, body = crate::routes::openapi::ErrorResponse), (status = 422, body = crate::routes::openapi::ErrorResponse),
        (status = 429, body = crate::routes::openapi::ErrorResponse), (status = 503, body = crate::routes::openapi::ErrorResponse)))]
pub async fn stream_get(
    state: web::Data<AppState>,
    version: web::Path<String>,
    query: web::Query<InferenceQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    stream(state, &version, query.into_inner().into(), &req).await
}

async fn stream(
    state: web::Data<AppState>,
    version: &str,
    body: InferenceRequest,
    req: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let model = model_for_generation(&state, version, req)?;
    let request = body.into_generation(&state.settings, model.as_ref())?;
    stream_generation(&state, version, model.as_ref(), request, NativeFormat, req, started).await
}

/// The engine serving `version` for a new generation: 404 for an unknown version, 503 while the
/// server drains. Tags the request's log line with the version.
pub fn model_for_generation<'a>(
    state: &'a AppState,
    version: &str,
    req: &HttpRequest,
) -> Result<&'a Arc<dyn Generator>, ApiError> {
    let model = state.models.get(version)?;
    if let Some(log) = RequestLog::of(req) {
        log.set_version(version);
    }
    if state.shutdown.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    Ok(model)
}

/// Queue `request` and answer with its token stream as SSE in `format`, holding the client's
/// stream slot for as long as the stream is open. `started` is when the request arrived.
pub async fn stream_generation<F: EventFormat>(
    state: &AppState,
    version: &str,
    model: &dyn Generator,
    request: GenerationRequest,
    format: F,
    req: &HttpRequest,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let permit = stream_permit(state, req)?;
    let tokens = model.generate(request).await.inspect_err(|e| count_rejection(state, e))?;
    let events = TokenEvents::new(
        tokens,
        format,
        StreamMetrics::new(&state.metrics, version),
        state.shutdown.signal(),
        RequestLog::of(req),
        started,
    )
    .holding(permit);
    Ok(sse_response(events, Duration::from_secs(state.settings.sse_keep_alive_secs), req))
}

/// The client's stream slot (429 `too_many_streams` when it already holds the maximum).
pub fn stream_permit(state: &AppState, req: &HttpRequest) -> Result<Option<StreamPermit>, ApiError> {
    client_of(req)
        .map(|key| state.stream_slots.acquire(key))
        .transpose()
        .inspect_err(|_| state.metrics.rate_limited.with_label_values(&["streams"]).inc())
}

/// Count 503 refusals by reason for `/metrics`.
pub fn count_rejection(state: &AppState, error: &streamgate_inference::InferenceError) {
    if let streamgate_inference::InferenceError::Overloaded { .. } = error {
        state.metrics.rejected.with_label_values(&["queue_full"]).inc();
    }
}

/// Generate and return the whole text as one JSON response.
#[utoipa::path(post, path = "/api/{version}/inference", tag = "inference",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    request_body = InferenceRequest,
    responses((status = 200, body = InferenceResponse),
        (status = 400, body = crate::routes::openapi::ErrorResponse), (status = 404, body = crate::routes::openapi::ErrorResponse),
        (status = 413, body = crate::routes::openapi::ErrorResponse), (status = 415, body = crate::routes::openapi::ErrorResponse),
        (status = 422, body = crate::routes::openapi::ErrorResponse), (status = 429, body = crate::routes::openapi::ErrorResponse),
        (status = 503, body = crate::routes::openapi::ErrorResponse)))]
pub async fn complete(
    state: web::Data<AppState>,
    version: web::Path<String>,
    body: web::Json<InferenceRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let model = model_for_generation(&state, &version, &req)?;
    let request = body.into_inner().into_generation(&state.settings, model.as_ref())?;
    let (text, finish_reason, usage) = collect_text(model.as_ref(), request, &state).await?;
    Ok(HttpResponse::Ok().json(InferenceResponse {
        version: version.into_inner(),
        text,
        finish_reason,
        usage,
    }))
}

/// Run a generation to the end and return its text (non-streaming routes). If the client goes
/// away, this future is dropped with the stream, which cancels the generation.
pub async fn collect_text(
    model: &dyn Generator,
    request: GenerationRequest,
    state: &AppState,
) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut tokens = model.generate(request).await.inspect_err(|e| count_rejection(state, e))?;
    let mut text = String::new();
    while let Some(event) = tokens.next().await {
        match event? {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished { reason, usage } => return Ok((text, reason, usage)),
        }
    }
    Err(ApiError::Internal("the token stream ended without a finish event".into()))
}
