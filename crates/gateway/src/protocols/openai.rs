//! OpenAI-compatible API: `POST /v1/chat/completions` (streamed `chat.completion.chunk`s or one
//! `chat.completion`) and `GET /v1/models` (text completions: [`super::completions`]). The `model` is a configured version name (`v1`).
//! Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use streamgate_inference::{FinishReason, SamplingParams, Usage};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody, ErrorStyle};
use crate::generation::{GenerationInput, PromptInput, ValidGeneration, check_unused_max_tokens};
use crate::http::paths::resource;
use crate::protocols::wire::{self, BodyGenerationErrors, Stop};
use crate::sse::EventFormat;
use crate::state::AppState;

/// An [`ApiError`] rendered in OpenAI's error style (same status and headers).
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

impl ResponseError for OpenAiError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.0.response(ErrorStyle::OpenAi)
    }
}

/// `chat.completion`: the non-streamed answer.
#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    #[schema(pattern = "^chat\\.completion$")]
    pub object: String,
    pub created: u64,
    pub model: String,
    /// One choice: `{"index": 0, "message": {"role": "assistant", "content": …}, "finish_reason", "logprobs": null}`.
    #[schema(value_type = Vec<Object>, min_items = 1, max_items = 1)]
    pub choices: Vec<serde_json::Value>,
    #[schema(value_type = Object)]
    pub usage: serde_json::Value,
}

/// `chat.completion.chunk`: one event of the streamed answer (the last, with
/// `stream_options.include_usage`, has no choices and the usage).
#[derive(Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[schema(pattern = "^chat\\.completion\\.chunk$")]
    pub object: String,
    pub created: u64,
    pub model: String,
    #[schema(value_type = Vec<Object>, max_items = 1)]
    pub choices: Vec<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub usage: Option<serde_json::Value>,
}

/// One `data:` event of the OpenAI stream: a chunk, or an error (then `[DONE]`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum ChatStreamEvent {
    Chunk(ChatCompletionChunk),
    Error(ErrorBody),
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
    /// `developer` is treated as `system`.
    #[schema(pattern = "^(system|developer|user|assistant)$")]
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
#[schema(example = json!({"model": "v1", "messages": [{"role": "user", "content": "Say hi"}], "stream": true}))]
pub struct ChatCompletionRequest {
    /// A configured model version, e.g. `v1` (see `GET /v1/models`).
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// 1..=`--max-tokens-limit` (default `--default-max-tokens`); `max_completion_tokens` wins.
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    /// 0 to 2. Default 1.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// (0, 1]. Default 1.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "wire::opt_u64")]
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    #[schema(schema_with = wire::stop_schema)]
    pub stop: Option<Stop>,
    /// Only 1 is supported.
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
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

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// OpenAI's model list; the ids are the configured versions.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "`{\"object\":\"list\",\"data\":[{\"id\":\"v1\",\"object\":\"model\",…}]}`", body = Object)))]
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
        (status = 200, description = "`chat.completion`, or with `stream: true` an event stream of `chat.completion.chunk` objects ending with `data: [DONE]`",
            content((ChatCompletion = "application/json"), (ChatStreamEvent = "text/event-stream"))),
        BodyGenerationErrors))]
pub async fn chat_completions(
    state: web::Data<AppState>,
    body: web::Json<ChatCompletionRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, OpenAiError> {
    let started = Instant::now();
    let body = body.into_inner();
    if body.n.is_some_and(|n| n != 1) {
        return Err(ApiError::InvalidRequest("only n = 1 is supported".into()).into());
    }
    let (max_tokens, unused) = match body.max_completion_tokens {
        Some(n) => (Some(n), body.max_tokens),
        None => (body.max_tokens, None),
    };
    check_unused_max_tokens(&state.settings, unused)?;
    let input = GenerationInput {
        prompt: PromptInput::Chat(
            body.messages.into_iter().map(|m| (m.role, content_text(m.content))).collect(),
        ),
        max_tokens,
        sampling: sampling(body.temperature, body.top_p, body.seed),
        stop: Stop::into_vec(body.stop),
    };
    let generation = ValidGeneration::new(&state, &body.model, input, &req)?;
    let id = format!("chatcmpl-{:024x}", rand::rng().random::<u128>() >> 32);
    let created = unix_now();
    if !body.stream {
        let done = generation.collect(&state).await?;
        return Ok(HttpResponse::Ok().json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason, "logprobs": null}],
            "usage": usage_json(done.usage),
        })));
    }
    let format = ChunkFormat {
        id,
        created,
        model: body.model.clone(),
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
    };
    Ok(generation.stream(&state, format, &req, started).await?)
}

/// OpenAI's sampling fields with OpenAI's defaults (temperature 1, top_p 1; no top-k or penalty).
pub(crate) fn sampling(temperature: Option<f64>, top_p: Option<f64>, seed: Option<u64>) -> SamplingParams {
    SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        top_k: 0,
        repetition_penalty: 1.0,
        seed,
    }
}

pub(crate) fn usage_json(usage: Usage) -> serde_json::Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// OpenAI's name for why a generation ended.
pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
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

    /// `delta.reasoning_content`, as vLLM and DeepSeek send it.
    fn reasoning(&mut self, text: &str) -> Vec<String> {
        self.chunk(json!([{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": null}]))
            .into_iter()
            .collect()
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<String> {
        let reason = finish_reason(reason);
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
        vec![error.to_json(ErrorStyle::OpenAi)]
    }

    fn event_ids(&self) -> bool {
        false
    }
}
