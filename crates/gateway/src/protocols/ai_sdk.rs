//! The AI SDK's UI message stream protocol (v1, AI SDK 5+), for `useChat`:
//! `POST /api/{version}/chat` takes `{messages: UIMessage[]}` and answers with SSE parts —
//! `start`, `start-step`, `text-start`, `text-delta`…, `text-end`, `finish-step`, `finish`
//! (or `error`) — then `data: [DONE]`, with the `x-vercel-ai-ui-message-stream: v1` header that
//! custom backends must send.

use std::time::Instant;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use streamgate_inference::{FinishReason, SamplingParams, Usage};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::generation::{
    DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GenerationInput, PromptInput, ResumePoint, ValidGeneration, resume,
};
use crate::http::paths::resource;
use crate::http::rate_limit::client_of;
use crate::protocols::wire::{self, BodyGenerationErrors};
use crate::sse::EventFormat;
use crate::state::AppState;

/// A part of a UI message; only `{"type":"text","text":…}` parts feed the prompt.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UiPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct UiMessage {
    pub id: Option<String>,
    /// `system` (or `developer`), `user` or `assistant`.
    #[schema(pattern = "^(system|developer|user|assistant)$")]
    pub role: String,
    #[serde(default)]
    pub parts: Vec<UiPart>,
}

/// The body `useChat`'s default transport sends (`id`, `trigger`, `messageId` and extra body
/// fields are accepted and ignored).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"id": "chat-1", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "Say hi"}]}]}))]
pub struct UiChatRequest {
    /// The chat's id (`useChat` sends it): its reply can be resumed at
    /// `GET /api/{version}/chat/{id}/stream`. At most 256 characters.
    #[schema(max_length = 256)]
    pub id: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<UiMessage>,
    /// Optional generation limit (a `body` field of `useChat`): 1..=`--max-tokens-limit`,
    /// default `--default-max-tokens`.
    #[serde(default, deserialize_with = "wire::opt_u32")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// 0 to 2. Default 0.7.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
}

/// One `data:` event of the UI message stream (then `[DONE]`).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"type": "text-delta", "id": "text-0", "delta": "Hel"}))]
pub struct UiStreamPart {
    #[serde(rename = "type")]
    #[schema(pattern = "^(start|start-step|text-start|text-delta|text-end|finish-step|finish|error)$")]
    pub kind: String,
    /// `start`.
    #[serde(rename = "messageId")]
    pub message_id: Option<String>,
    /// `text-start`, `text-delta`, `text-end`.
    pub id: Option<String>,
    /// `text-delta`: never empty.
    #[schema(min_length = 1)]
    pub delta: Option<String>,
    /// `finish`: `stop`, `length` or `other`.
    #[serde(rename = "finishReason")]
    pub finish_reason: Option<String>,
    /// `error`.
    #[serde(rename = "errorText")]
    pub error_text: Option<String>,
}

/// The longest chat id kept for resumes.
const MAX_CHAT_ID_CHARS: usize = 256;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/{version}/chat").route(web::post().to(chat)))
        .service(resource("/api/{version}/chat/{chat_id}/stream").route(web::get().to(resume_chat)));
}

/// `useChat({ resume: true })`: the reply of this chat still being generated, from its start
/// (the client drops the partial message it had). 204 when the chat has no reply in progress.
#[utoipa::path(get, path = "/api/{version}/chat/{chat_id}/stream", tag = "ai-sdk",
    params(("version" = String, Path, description = "Model version, e.g. v1"),
        ("chat_id" = String, Path, description = "The `id` the chat's POST carried")),
    responses(
        (status = 200, description = "The reply's UI message stream parts from its start, then `data: [DONE]`", content_type = "text/event-stream", body = UiStreamPart),
        (status = 204, description = "No reply of this chat is in progress"),
        (status = 404, description = "Unknown model version", body = crate::error::ErrorBody),
        (status = 429, description = "Rate limited or too many open streams", body = crate::error::ErrorBody)))]
pub async fn resume_chat(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (version, chat_id) = path.into_inner();
    state.models.get(&version).ok_or_else(|| ApiError::UnknownVersion(version.clone()))?;
    let owner = client_of(&req);
    let (id, replay) = match state.streams.find_chat(owner, &version, &chat_id) {
        Some((id, replay)) => (id, Some(replay)),
        // Not here: the chat's reply may run on another replica.
        None => match &state.replicas {
            Some(replicas) => match replicas.find_chat(owner, &version, &chat_id).await {
                Some(id) => (id, None),
                None => return Ok(HttpResponse::NoContent().finish()),
            },
            None => return Ok(HttpResponse::NoContent().finish()),
        },
    };
    let resumed = match resume(&state, &version, id, replay, ResumePoint::Live, &req).await {
        // The chat's stream is gone (cancelled or expired) since the chat pointed at it.
        Err(ApiError::UnknownStream) => None,
        other => other?,
    };
    match resumed {
        Some(mut response) => {
            response.headers_mut().insert(
                HeaderName::from_static("x-vercel-ai-ui-message-stream"),
                HeaderValue::from_static("v1"),
            );
            Ok(response)
        }
        None => Ok(HttpResponse::NoContent().finish()),
    }
}

/// Stream a chat reply in the AI SDK UI message stream protocol.
#[utoipa::path(post, path = "/api/{version}/chat", tag = "ai-sdk",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    request_body = UiChatRequest,
    responses(
        (status = 200, description = "UI message stream parts as SSE `data:` JSON, then `data: [DONE]`; header `x-vercel-ai-ui-message-stream: v1`", content_type = "text/event-stream", body = UiStreamPart),
        BodyGenerationErrors))]
pub async fn chat(
    state: web::Data<AppState>,
    version: web::Path<String>,
    body: web::Json<UiChatRequest>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let body = body.into_inner();
    if body.id.as_ref().is_some_and(|id| id.chars().count() > MAX_CHAT_ID_CHARS) {
        return Err(ApiError::InvalidRequest(format!("id is at most {MAX_CHAT_ID_CHARS} characters")));
    }
    let turns = body
        .messages
        .into_iter()
        .map(|m| {
            let text = m.parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect();
            (m.role, text)
        })
        .collect();
    let input = GenerationInput {
        prompt: PromptInput::Chat(turns),
        max_tokens: body.max_tokens,
        sampling: SamplingParams {
            temperature: body.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: DEFAULT_TOP_P,
            ..SamplingParams::default()
        },
        stop: Vec::new(),
    };
    let generation = ValidGeneration::new(&state, &version, input, &req)?.for_chat(body.id);
    let message_id = format!("msg-{:024x}", rand::rng().random::<u128>() >> 32);
    let format =
        UiMessageFormat { message_id, text_id: "text-0".into(), text_open: false, reasoning_open: false };
    let mut response = generation.stream(&state, format, &req, started).await?;
    response
        .headers_mut()
        .insert(HeaderName::from_static("x-vercel-ai-ui-message-stream"), HeaderValue::from_static("v1"));
    Ok(response)
}

/// UI message stream parts for one text reply.
pub struct UiMessageFormat {
    message_id: String,
    text_id: String,
    text_open: bool,
    /// A `reasoning-start` was sent and no `reasoning-end` yet.
    reasoning_open: bool,
}

/// The one reasoning part of a reply.
const REASONING_ID: &str = "reasoning-0";

impl UiMessageFormat {
    fn close_reasoning(&mut self) -> Option<String> {
        std::mem::take(&mut self.reasoning_open)
            .then(|| json!({"type": "reasoning-end", "id": REASONING_ID}).to_string())
    }

    fn close_text(&mut self) -> Option<String> {
        std::mem::take(&mut self.text_open)
            .then(|| json!({"type": "text-end", "id": self.text_id}).to_string())
    }
}

impl EventFormat for UiMessageFormat {
    fn start(&mut self) -> Vec<String> {
        self.text_open = true;
        vec![
            json!({"type": "start", "messageId": self.message_id}).to_string(),
            json!({"type": "start-step"}).to_string(),
            json!({"type": "text-start", "id": self.text_id}).to_string(),
        ]
    }

    fn token(&mut self, _index: usize, text: &str) -> Option<String> {
        (!text.is_empty())
            .then(|| json!({"type": "text-delta", "id": self.text_id, "delta": text}).to_string())
    }

    /// A reasoning part (`reasoning-start`, then `reasoning-delta`s; ended at the finish).
    fn reasoning(&mut self, text: &str) -> Vec<String> {
        let mut parts = Vec::new();
        if !std::mem::replace(&mut self.reasoning_open, true) {
            parts.push(json!({"type": "reasoning-start", "id": REASONING_ID}).to_string());
        }
        parts.push(json!({"type": "reasoning-delta", "id": REASONING_ID, "delta": text}).to_string());
        parts
    }

    fn finish(&mut self, reason: FinishReason, _usage: Usage) -> Vec<String> {
        let reason = match reason {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "other",
        };
        let mut out: Vec<String> = self.close_reasoning().into_iter().chain(self.close_text()).collect();
        out.push(json!({"type": "finish-step"}).to_string());
        out.push(json!({"type": "finish", "finishReason": reason}).to_string());
        out
    }

    fn error(&mut self, error: &ApiError) -> Vec<String> {
        vec![json!({"type": "error", "errorText": error.public_message()}).to_string()]
    }
}
