//! Liveness (`/api/{version}/health/live`: the process answers) and readiness
//! (`/api/{version}/health/ready`: that version's model is loaded, its worker accepts work, and
//! the server is not draining; 503 otherwise).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::ApiError;
use crate::routes::resource;

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
    responses((status = 200, body = HealthStatus), (status = 404, body = crate::routes::openapi::ErrorResponse)))]
pub async fn live(state: web::Data<AppState>, version: web::Path<String>) -> Result<HttpResponse, ApiError> {
    state.models.get(&version)?;
    Ok(HttpResponse::Ok().json(HealthStatus { status: "ok" }))
}

/// The model is loaded and accepting work, and the server is not shutting down.
#[utoipa::path(get, path = "/api/{version}/health/ready", tag = "health",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    responses((status = 200, body = HealthStatus), (status = 503, body = crate::routes::openapi::ErrorResponse)))]
pub async fn ready(state: web::Data<AppState>, version: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let model = state.models.get(&version)?;
    if state.shutdown.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    if !model.is_ready() {
        return Err(ApiError::NotReady);
    }
    Ok(HttpResponse::Ok().json(HealthStatus { status: "ready" }))
}
