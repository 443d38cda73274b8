//! Liveness (`/api/{version}/health/live`: the process answers) and readiness
//! (`/api/{version}/health/ready`: that version's model is loaded, its worker accepts work, and
//! the server is not draining; 503 otherwise). For an upstream version, ready means at least one
//! of its URLs takes requests, and the body lists each URL's state.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::http::paths::resource;
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct HealthStatus {
    /// `ok` (live) or `ready`.
    pub status: &'static str,
    /// An upstream version's URLs and whether each takes requests (absent for a local model).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamHealth>,
}

#[derive(Serialize, ToSchema)]
pub struct UpstreamHealth {
    pub url: String,
    /// `false` while its circuit breaker has it out after repeated failures.
    pub available: bool,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/{version}/health/live").route(web::get().to(live)))
        .service(resource("/api/{version}/health/ready").route(web::get().to(ready)));
}

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/api/{version}/health/live", tag = "health",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    responses((status = 200, body = HealthStatus), (status = 404, description = "Unknown model version", body = ErrorBody)))]
pub async fn live(state: web::Data<AppState>, version: web::Path<String>) -> Result<HttpResponse, ApiError> {
    state.models.get(&version).ok_or_else(|| ApiError::UnknownVersion(version.into_inner()))?;
    Ok(HttpResponse::Ok().json(HealthStatus { status: "ok", upstreams: Vec::new() }))
}

/// The model is loaded and accepting work, and the server is not shutting down.
#[utoipa::path(get, path = "/api/{version}/health/ready", tag = "health",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    responses((status = 200, body = HealthStatus), (status = 404, description = "Unknown model version", body = ErrorBody),
        (status = 503, description = "Not ready: loading, stopped, or shutting down", body = ErrorBody)))]
pub async fn ready(state: web::Data<AppState>, version: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let model = state.models.get(&version).ok_or_else(|| ApiError::UnknownVersion(version.into_inner()))?;
    if state.shutdown.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    if !model.is_ready() {
        return Err(ApiError::NotReady);
    }
    let upstreams = model
        .upstreams()
        .into_iter()
        .map(|u| UpstreamHealth { url: u.url, available: u.available })
        .collect();
    Ok(HttpResponse::Ok().json(HealthStatus { status: "ready", upstreams }))
}
