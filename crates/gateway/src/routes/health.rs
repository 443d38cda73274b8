//! Liveness (`/api/{version}/health/live`: the process answers) and readiness
//! (`/api/{version}/health/ready`: that version's model is loaded, its worker accepts work, and
//! the server is not draining; 503 otherwise).

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
    Ok(HttpResponse::Ok().json(HealthStatus { status: "ok" }))
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
    Ok(HttpResponse::Ok().json(HealthStatus { status: "ready" }))
}
