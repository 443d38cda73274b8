//! `GET /api/openapi.json`: the OpenAPI 3 document generated from the route annotations (utoipa),
//! and `GET /api/docs`: a self-contained page that renders it (no CDN, works offline).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::routes::{ai_sdk, health, inference, models, openai, resource};

/// Every error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorObject {
    /// Machine-readable: invalid_json, invalid_request, prompt_too_long, payload_too_large,
    /// unsupported_media_type, not_found, unknown_model_version, method_not_allowed,
    /// origin_not_allowed, rate_limited, unauthorized, overloaded, not_ready, shutting_down, internal_error.
    pub code: String,
    pub message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "streamgate", description = "Stream model output as server-sent events. Each configured model \
        version is served under /api/{version}/ (e.g. v1 and v2 side by side)."),
    paths(
        inference::stream_post, inference::stream_get, inference::complete,
        models::list, models::describe, health::live, health::ready,
        ai_sdk::chat, openai::chat_completions, openai::list_models,
    ),
    components(schemas(
        ErrorResponse, ErrorObject, inference::InferenceRequest, inference::InferenceResponse,
        inference::TokenEventSchema, inference::Stop, models::ModelDescription, health::HealthStatus,
        ai_sdk::UiChatRequest, ai_sdk::UiMessage, ai_sdk::UiPart,
        openai::ChatCompletionRequest, openai::ChatMessageIn, openai::MessageContent, openai::ContentPart, openai::StreamOptions,
    )),
    tags((name = "inference", description = "Generate text"), (name = "models"), (name = "health"),
        (name = "ai-sdk", description = "The AI SDK UI message stream protocol (useChat)"),
        (name = "openai", description = "OpenAI-compatible chat completions"))
)]
pub struct ApiDoc;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/openapi.json").route(web::get().to(openapi_json)))
        .service(resource("/api/docs").route(web::get().to(docs_page)));
}

async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

async fn docs_page() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(include_str!("../../static/docs.html"))
}
