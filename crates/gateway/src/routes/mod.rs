//! Route modules; each exposes `configure(cfg)`. Paths:
//! `/` (chat page), `/api/openapi.json` and `/api/docs`, `/metrics`, per model version
//! `/api/{version}/inference[/stream]`, `/api/{version}/chat` (AI SDK), `/api/{version}/models`,
//! `/api/{version}/health/{live,ready}`, and the OpenAI-compatible `/v1/chat/completions`, `/v1/models`.

pub mod ai_sdk;
pub mod health;
pub mod inference;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod openapi;
pub mod page;

use actix_web::{HttpRequest, HttpResponse, web};

use crate::error::ApiError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    page::configure(cfg);
    openapi::configure(cfg);
    metrics::configure(cfg);
    health::configure(cfg);
    models::configure(cfg);
    inference::configure(cfg);
    ai_sdk::configure(cfg);
    openai::configure(cfg);
}

/// A route's resource: methods it does not define get the JSON 405 (every route module uses this).
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

/// JSON 404 for paths no route matches.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, actix_web::Error> {
    Err(crate::error::error_for(req.path(), ApiError::NotFound(format!("{} {}", req.method(), req.path()))))
}

/// JSON 405 for a known path with the wrong method (see [`resource`]).
async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, actix_web::Error> {
    Err(crate::error::error_for(req.path(), ApiError::MethodNotAllowed))
}
