//! `GET /api/{version}/models`: the model behind a version; `GET /api/models`: all of them.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::http::paths::resource;
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct ModelDescription {
    /// The version this model serves, e.g. `v1`.
    pub version: String,
    /// The model's name (config.json `_name_or_path`, else the folder name).
    pub name: String,
    /// The model folder.
    pub path: String,
    /// Maximum prompt + generated tokens.
    pub context_length: usize,
    pub vocab_size: usize,
    /// When the model finished loading (RFC 3339, UTC).
    pub loaded_since: String,
    /// `onnx`, or `mock` for the benchmarking token source.
    pub engine: &'static str,
    /// The ONNX graph layout: `fused` (the default model's quantized graph) or `optimum`
    /// (an fp32 Optimum export); `mock` for the mock engine.
    pub layout: &'static str,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/models").route(web::get().to(list)))
        .service(resource("/api/{version}/models").route(web::get().to(describe)));
}

/// Every model version this gateway serves.
#[utoipa::path(get, path = "/api/models", tag = "models", responses((status = 200, body = Vec<ModelDescription>)))]
pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let all: Vec<ModelDescription> =
        state.models.iter().map(|(version, model)| description(version, model.info())).collect();
    HttpResponse::Ok().json(all)
}

fn description(version: &str, info: &streamgate_inference::ModelInfo) -> ModelDescription {
    ModelDescription {
        version: version.to_owned(),
        name: info.name.clone(),
        path: info.path.display().to_string(),
        context_length: info.context_length,
        vocab_size: info.vocab_size,
        loaded_since: rfc3339(info.loaded_at),
        engine: info.engine,
        layout: info.layout,
    }
}

/// Describe the model serving this version.
#[utoipa::path(get, path = "/api/{version}/models", tag = "models",
    params(("version" = String, Path, description = "Model version, e.g. v1")),
    responses((status = 200, body = ModelDescription), (status = 404, description = "Unknown model version", body = ErrorBody)))]
pub async fn describe(
    state: web::Data<AppState>,
    version: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let info =
        state.models.get(&version).ok_or_else(|| ApiError::UnknownVersion(version.to_string()))?.info();
    Ok(HttpResponse::Ok().json(description(&version, info)))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a UTC time (civil-from-days; no date crate for one field).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_478_400 + 3_723)), "2026-11-24T01:02:03Z");
    }
}
