//! OpenAI-compatible API: `POST /v1/chat/completions` (streamed `chat.completion.chunk`s or one
//! `chat.completion`) and `GET /v1/models`. The `model` is a configured version name (`v1`).
//! Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use streamgate_inference::{ChatMessage, FinishReason, SamplingParams, Usage};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::ApiError;
use crate::routes::inference::{
    Stop, collect_text, model_for_generation, stream_generation, validate_generation,
};
use crate::routes::resource;
use crate::sse::EventFormat;

/// An [`ApiError`] rendered in OpenAI's error shape (same status).
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl std::fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl OpenAiError {
    /// `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(error: &ApiError) -> serde_json::Value {
        let kind = match error.status_code().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        let code = match error {
            ApiError::UnknownVersion(_) => "model_not_found",
            other => other.code(),
        };
        json!({"error": {"message": error.public_message(), "type": kind, "param": null, "code": code}})
    }
}

impl ResponseError for OpenAiError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        // Start from the native response for its status and headers (Retry-After, WWW-Authenticate).
        let mut native = self.0.error_response();
        let mut response = HttpResponse::build(native.status());
        for (name, value) in native.headers_mut().drain() {
            if let Some(name) = name
                && name != actix_web::http::header::CONTENT_TYPE
                && name != actix_web::http::header::CONTENT_LENGTH
            {
                response.insert_header((name, value));
            }
        }
        response.json(Self::body(&self.0))
    }
}

/// Message content: a string, or a list of parts of which the `text` ones are used.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `developer` (treated as system), `user` or `assistant`.
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The request body of `POST /v1/chat/completions`. Fields OpenAI defines that streamgate does
/// not use (e.g. `user`, `presence_penalty`) are accepted and ignored, as other compatible
/// servers do; `n` must be 1.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// A configured model version, e.g. `v1` (see `GET /v1/models`).
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    /// Default 1.
    pub temperature: Option<f32>,
    /// Default 1.
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
}

/// Turn chat messages into inference chat messages: roles checked, text parts joined.
pub fn chat_messages(
    messages: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let out: Vec<ChatMessage> = messages
        .into_iter()
        .map(|(role, content)| match role.as_str() {
            "system" | "developer" => Ok(ChatMessage::new("system", content)),
            "user" | "assistant" => Ok(ChatMessage::new(role, content)),
            other => Err(ApiError::InvalidRequest(format!("unsupported message role '{other}'"))),
        })
        .collect::<Result<_, _>>()?;
    if out.is_empty() {
        return Err(ApiError::InvalidRequest("messages must not be empty".into()));
    }
    Ok(out)
}

fn content_text(content: Option<MessageContent>) -> String {
    match content {
        None => String::new(),
        Some(MessageContent::Text(t)) => t,
        Some(MessageContent::Parts(parts)) => {
            parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect::<Vec<_>>().join("")
        }
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/chat/completions").route(web::post().to(chat_completions)))
        .service(resource("/v1/models").route(web::get().to(list_models)));
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// OpenAI's model list; the ids are the configured versions.
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses((status = 200, description = "`{\"object\":\"list\",\"data\":[{\"id\":\"v1\",\"object\":\"model\",…}]}`")))]
pub async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    let data: Vec<_> = state
        .models
        .iter()
        .map(|(version, model)| {
            let created = model.info().loaded_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            json!({"id": version, "object": "model", "created": created, "owned_by": "streamgate"})
        })
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// Chat completions, streamed (`stream: true`) or not.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "`chat.completion`, or with `stream: true` an event stream of `chat.completion.chunk` objects ending with `data: [DONE]`"),
        (status = 400, description = "OpenAI-shaped error"), (status = 404, description = "unknown model"),
        (status = 422, description = "OpenAI-shaped error"), (status = 429, description = "rate limited"),
        (status = 503, description = "overloaded")))]
pub async fn chat_completions(
    state: web::Data<AppState>,
    body: web::Json<ChatCompletionRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, OpenAiError> {
    let started = Instant::now();
    let body = body.into_inner();
    let model = model_for_generation(&state, &body.model, &req)?;
    if body.n.is_some_and(|n| n != 1) {
        return Err(ApiError::InvalidRequest("only n = 1 is supported".into()).into());
    }
    let messages = chat_messages(body.messages.into_iter().map(|m| (m.role, content_text(m.content))))?;
    let prompt = model.render_chat(&messages).map_err(ApiError::from)?;
    let sampling = SamplingParams {
        temperature: body.temperature.unwrap_or(1.0),
        top_p: body.top_p.unwrap_or(1.0),
        top_k: 0,
        repetition_penalty: 1.0,
        seed: body.seed,
    };
    let request = validate_generation(
        &state.settings,
        &prompt,
        body.max_completion_tokens.or(body.max_tokens),
        sampling,
        Stop::into_vec(body.stop),
    )?;
    let id = format!("chatcmpl-{:024x}", rand::rng().random::<u128>() >> 32);
    let created = unix_now();
    if !body.stream {
        let (text, reason, usage) = collect_text(model.as_ref(), request, &state).await?;
        return Ok(HttpResponse::Ok().json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": null}],
            "usage": usage_json(usage),
        })));
    }
    let format = ChunkFormat {
        id,
        created,
        model: body.model.clone(),
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
    };
    Ok(stream_generation(&state, &body.model, model.as_ref(), request, format, &req, started).await?)
}

fn usage_json(usage: Usage) -> serde_json::Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// `chat.completion.chunk` events: the role first, content deltas, the finish reason, usage if asked.
pub struct ChunkFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: serde_json::Value,
}

impl ChunkFormat {
    fn chunk(&self, choices: serde_json::Value) -> Option<String> {
        serde_json::to_string(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
        })
        .ok()
    }
}

impl EventFormat for ChunkFormat {
    fn start(&mut self) -> Vec<String> {
        self.chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        )
        .into_iter()
        .collect()
    }

    fn token(&mut self, _index: usize, text: &str) -> Option<String> {
        if text.is_empty() {
            return None;
        }
        self.chunk(json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}]))
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<String> {
        let reason = match reason {
            FinishReason::Length => "length",
            FinishReason::Stop | FinishReason::Cancelled => "stop",
        };
        let mut out: Vec<String> =
            self.chunk(json!([{"index": 0, "delta": {}, "finish_reason": reason}])).into_iter().collect();
        if self.include_usage {
            let mut usage_chunk = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_json(usage),
            });
            if let Some(obj) = usage_chunk.as_object_mut() {
                obj.retain(|_, v| !v.is_null());
            }
            out.extend(serde_json::to_string(&usage_chunk).ok());
        }
        out
    }

    fn error(&mut self, error: &ApiError) -> Vec<String> {
        vec![OpenAiError::body(error).to_string()]
    }
}
