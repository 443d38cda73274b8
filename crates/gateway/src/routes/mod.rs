//! Route modules; each exposes `configure(cfg)`. Paths:
//! `/` (chat page), `/api/openapi.json` and `/api/docs`, `/metrics`, and per model version
//! `/api/{version}/inference[/stream]`, `/api/{version}/models`, `/api/{version}/health/{live,ready}`.

pub mod health;
pub mod inference;
pub mod metrics;
pub mod models;
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
}

/// JSON 404 for paths no route matches.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("{} {}", req.method(), req.path())))
}

/// JSON 405 for a known path with the wrong method (each resource's default service).
pub async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
