//! `GET /api/{version}/streams/{id}`: continue a stream after a lost connection, for clients
//! that read streams with `fetch` (the id comes from the `X-Stream-Id` header and every event's
//! id, `STREAM-SEQ`). Where to pick up: `Last-Event-ID`, else `?after=N`, else the start.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ErrorBody};
use crate::generation::{ResumePoint, resume};
use crate::http::paths::resource;
use crate::protocols::wire::Query;
use crate::state::AppState;
use crate::streams::StreamId;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ResumeQuery {
    /// Continue after this event (its sequence number, the `SEQ` of its id); 0 (the default)
    /// sends the stream from its start. `Last-Event-ID` wins when both are given.
    #[param(minimum = 0)]
    pub after: Option<u64>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/api/{version}/streams/{id}").route(web::get().to(resume_stream)));
}

/// Continue a stream: the events after the last one seen, then the live ones, then `[DONE]`.
#[utoipa::path(get, path = "/api/{version}/streams/{id}", tag = "inference",
    params(("version" = String, Path, description = "Model version, e.g. v1"),
        ("id" = String, Path, description = "The stream's id (`X-Stream-Id`, 32 hex digits)"),
        ResumeQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received (`STREAM-SEQ`)")),
    responses(
        (status = 200, description = "The stream's events (in its protocol) after the point given, then `data: [DONE]`", content_type = "text/event-stream", body = Object),
        (status = 404, description = "No such stream for this client (unknown, another client's, or no longer kept)", body = ErrorBody),
        (status = 422, description = "`after` is not a non-negative integer", body = ErrorBody),
        (status = 429, description = "Rate limited or too many open streams", body = ErrorBody)))]
pub async fn resume_stream(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    query: Query<ResumeQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (version, id) = path.into_inner();
    let id = StreamId::parse(&id).ok_or(ApiError::UnknownStream)?;
    let after = match req.headers().get("last-event-id") {
        Some(last) => match last.to_str().ok().and_then(StreamId::parse_event_id) {
            Some((same, seq)) if same == id => seq,
            _ => return Err(ApiError::UnknownStream),
        },
        None => usize::try_from(query.0.after.unwrap_or(0)).unwrap_or(usize::MAX),
    };
    resume(&state, &version, id, None, ResumePoint::After(after), &req).await?.ok_or(ApiError::UnknownStream)
}
