//! The gateway's one error type and its one wire schema, mapped to HTTP in exactly one place
//! ([`ApiError::response`]) and to an SSE event in exactly one place ([`ApiError::to_sse_data`]).
//!
//! A leaf module: it imports nothing from the rest of the crate. Bodies come in two styles of the
//! same [`ErrorBody`] schema: streamgate's own `{"error": {"code", "message"}}`, and OpenAI's
//! `{"error": {"code", "message", "type", "param"}}` for the OpenAI-compatible routes. 5xx bodies
//! carry a fixed message; the detail goes to the request log (which reads it off the response).

use std::time::Duration;

use actix_web::error::{JsonPayloadError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use streamgate_inference::InferenceError;
use utoipa::ToSchema;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("the query string is not valid: {0}")]
    InvalidQuery(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    #[error("no route for {0}")]
    NotFound(String),
    #[error("unknown model version '{0}'")]
    UnknownVersion(String),
    #[error("no such stream (or it is no longer kept)")]
    UnknownStream,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("this origin is not allowed to call the API (see ALLOWED_ORIGINS / ALLOWED_ORIGIN_REGEX)")]
    OriginNotAllowed,
    #[error("a valid API key is required: send Authorization: Bearer <key>")]
    Unauthorized,
    #[error("too many requests: slow down (see the RateLimit-* and Retry-After headers)")]
    RateLimited,
    #[error("too many open streams for this client (at most {max})")]
    TooManyStreams { max: usize },
    #[error("the server is busy: {0}")]
    Overloaded(String),
    #[error("the model is not ready")]
    NotReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Inference(InferenceError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// How long a client should wait before retrying a 503.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The machine-readable `error.code` of every error body (the OpenAPI document lists exactly these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidQuery,
    InvalidRequest,
    PromptTooLong,
    PayloadTooLarge,
    UnsupportedMediaType,
    NotFound,
    UnknownModelVersion,
    UnknownStream,
    /// The OpenAI-style code for an unknown `model`.
    ModelNotFound,
    MethodNotAllowed,
    OriginNotAllowed,
    Unauthorized,
    RateLimited,
    TooManyStreams,
    Overloaded,
    NotReady,
    ShuttingDown,
    EngineStopped,
    /// A remote model server (an upstream version) failed.
    UpstreamError,
    /// A remote model server sent nothing within its first-byte timeout.
    UpstreamTimeout,
    InternalError,
}

impl ErrorCode {
    pub const ALL: [Self; 22] = [
        Self::InvalidJson,
        Self::InvalidQuery,
        Self::InvalidRequest,
        Self::PromptTooLong,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::NotFound,
        Self::UnknownModelVersion,
        Self::UnknownStream,
        Self::ModelNotFound,
        Self::MethodNotAllowed,
        Self::OriginNotAllowed,
        Self::Unauthorized,
        Self::RateLimited,
        Self::TooManyStreams,
        Self::Overloaded,
        Self::NotReady,
        Self::ShuttingDown,
        Self::EngineStopped,
        Self::UpstreamError,
        Self::UpstreamTimeout,
        Self::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidRequest => "invalid_request",
            Self::PromptTooLong => "prompt_too_long",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::NotFound => "not_found",
            Self::UnknownModelVersion => "unknown_model_version",
            Self::UnknownStream => "unknown_stream",
            Self::ModelNotFound => "model_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited => "rate_limited",
            Self::TooManyStreams => "too_many_streams",
            Self::Overloaded => "overloaded",
            Self::NotReady => "not_ready",
            Self::ShuttingDown => "shutting_down",
            Self::EngineStopped => "engine_stopped",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::InternalError => "internal_error",
        }
    }
}

/// Which shape an error body takes: ours, or OpenAI's (under `/v1/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    Native,
    OpenAi,
}

/// Every error body, in both styles.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_request", "message": "prompt must not be empty"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// What went wrong, for people (5xx: a fixed message).
    pub message: String,
    /// OpenAI style only: `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kind: Option<&'static str>,
    /// OpenAI style only: always `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = true)]
    pub param: Option<serde_json::Value>,
}

impl ApiError {
    /// The stable, machine-readable code (native style).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::InvalidJson(_) => ErrorCode::InvalidJson,
            Self::InvalidQuery(_) => ErrorCode::InvalidQuery,
            Self::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Self::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::UnknownVersion(_) => ErrorCode::UnknownModelVersion,
            Self::UnknownStream => ErrorCode::UnknownStream,
            Self::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            Self::OriginNotAllowed => ErrorCode::OriginNotAllowed,
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::RateLimited => ErrorCode::RateLimited,
            Self::TooManyStreams { .. } => ErrorCode::TooManyStreams,
            Self::Overloaded(_) => ErrorCode::Overloaded,
            Self::NotReady => ErrorCode::NotReady,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::Inference(e) => match e {
                InferenceError::InvalidRequest(_) => ErrorCode::InvalidRequest,
                InferenceError::PromptTooLong { .. } => ErrorCode::PromptTooLong,
                InferenceError::Overloaded { .. } => ErrorCode::Overloaded,
                InferenceError::EngineStopped => ErrorCode::EngineStopped,
                InferenceError::Upstream { .. } => ErrorCode::UpstreamError,
                InferenceError::UpstreamTimeout { .. } => ErrorCode::UpstreamTimeout,
                InferenceError::UpstreamRateLimited { .. } => ErrorCode::RateLimited,
                InferenceError::UpstreamUnavailable { .. } => ErrorCode::Overloaded,
                _ => ErrorCode::InternalError,
            },
            Self::Internal(_) => ErrorCode::InternalError,
        }
    }

    /// The code as a string.
    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }

    /// The message a client sees: the error itself, except for server faults (an upstream's
    /// address and answer stay in the log too).
    pub fn public_message(&self) -> String {
        match self {
            Self::Inference(InferenceError::Upstream { .. }) => "the upstream model server failed".to_owned(),
            Self::Inference(InferenceError::UpstreamTimeout { .. }) => {
                "the upstream model server did not answer in time".to_owned()
            }
            Self::Inference(InferenceError::UpstreamUnavailable { .. }) => {
                "no upstream model server is available: retry later".to_owned()
            }
            _ if self.status_code().is_server_error()
                && self.status_code() != StatusCode::SERVICE_UNAVAILABLE =>
            {
                "internal server error".to_owned()
            }
            _ => self.to_string(),
        }
    }

    /// Seconds to send in `Retry-After`: an upstream's own, else ours for 503s and the stream
    /// cap (rate limits set their own headers).
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Inference(
                InferenceError::UpstreamRateLimited { retry_after }
                | InferenceError::UpstreamUnavailable { retry_after, .. },
            ) => Some(retry_after.unwrap_or(RETRY_AFTER.as_secs()).max(1)),
            _ if self.status_code() == StatusCode::SERVICE_UNAVAILABLE
                || matches!(self, Self::TooManyStreams { .. }) =>
            {
                Some(RETRY_AFTER.as_secs())
            }
            _ => None,
        }
    }

    /// The body of this error in `style`.
    pub fn body(&self, style: ErrorStyle) -> ErrorBody {
        let message = self.public_message();
        let error = match style {
            ErrorStyle::Native => ErrorDetail { code: self.error_code(), message, kind: None, param: None },
            ErrorStyle::OpenAi => ErrorDetail {
                code: match self {
                    Self::UnknownVersion(_) => ErrorCode::ModelNotFound,
                    other => other.error_code(),
                },
                message,
                kind: Some(match self.status_code().as_u16() {
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 => "not_found_error",
                    429 => "rate_limit_error",
                    500..=599 => "server_error",
                    _ => "invalid_request_error",
                }),
                param: Some(serde_json::Value::Null),
            },
        };
        ErrorBody { error }
    }

    /// The JSON of an error sent inside an SSE stream, as a `data:` line (clients that only read
    /// `data:` see it; an `event: error` would collide with EventSource's own error event).
    pub fn to_sse_data(&self) -> String {
        self.to_json(ErrorStyle::Native)
    }

    /// The body as JSON text.
    pub fn to_json(&self, style: ErrorStyle) -> String {
        serde_json::to_string(&self.body(style)).unwrap_or_else(|_| {
            r#"{"error":{"code":"internal_error","message":"internal server error"}}"#.into()
        })
    }

    /// The HTTP response for this error in `style`: status, `Retry-After` where it applies,
    /// `WWW-Authenticate` for 401, and the JSON body.
    pub fn response(&self, style: ErrorStyle) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let Some(seconds) = self.retry_after() {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(seconds)));
        }
        if matches!(self, Self::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(self.body(style))
    }

    /// The same, as an actix error that renders in `style` (for middleware and extractors).
    pub fn styled(self, style: ErrorStyle) -> actix_web::Error {
        StyledError { error: self, style }.into()
    }
}

/// An [`ApiError`] that renders in a chosen style (same status and headers).
#[derive(Debug)]
pub struct StyledError {
    pub error: ApiError,
    pub style: ErrorStyle,
}

impl std::fmt::Display for StyledError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl ResponseError for StyledError {
    fn status_code(&self) -> StatusCode {
        self.error.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.error.response(self.style)
    }
}

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> Self {
        match e {
            InferenceError::Overloaded { capacity } => {
                Self::Overloaded(format!("the model's queue is full ({capacity} waiting)"))
            }
            other => Self::Inference(other),
        }
    }
}

impl From<JsonPayloadError> for ApiError {
    fn from(e: JsonPayloadError) -> Self {
        match e {
            JsonPayloadError::OverflowKnownLength { limit, .. } | JsonPayloadError::Overflow { limit } => {
                Self::PayloadTooLarge { limit }
            }
            JsonPayloadError::ContentType => Self::UnsupportedMediaType,
            JsonPayloadError::Deserialize(e) if e.is_data() => Self::InvalidRequest(e.to_string()),
            JsonPayloadError::Deserialize(e) => Self::InvalidJson(e.to_string()),
            other => Self::InvalidJson(other.to_string()),
        }
    }
}

impl From<QueryPayloadError> for ApiError {
    fn from(e: QueryPayloadError) -> Self {
        Self::InvalidRequest(format!("invalid query string: {e}"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) | Self::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            Self::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound(_) | Self::UnknownVersion(_) | Self::UnknownStream => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::OriginNotAllowed => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::RateLimited | Self::TooManyStreams { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded(_) | Self::NotReady | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Inference(e) => match e {
                InferenceError::InvalidRequest(_) | InferenceError::PromptTooLong { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                InferenceError::Overloaded { .. }
                | InferenceError::EngineStopped
                | InferenceError::UpstreamUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                InferenceError::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                InferenceError::Upstream { .. } => StatusCode::BAD_GATEWAY,
                InferenceError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.response(ErrorStyle::Native)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::InvalidJson("x".into()), 400, "invalid_json"),
            (ApiError::InvalidQuery("x".into()), 400, "invalid_query"),
            (ApiError::InvalidRequest("x".into()), 422, "invalid_request"),
            (ApiError::PayloadTooLarge { limit: 1 }, 413, "payload_too_large"),
            (ApiError::UnsupportedMediaType, 415, "unsupported_media_type"),
            (ApiError::UnknownVersion("v9".into()), 404, "unknown_model_version"),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::RateLimited, 429, "rate_limited"),
            (ApiError::TooManyStreams { max: 4 }, 429, "too_many_streams"),
            (InferenceError::Overloaded { capacity: 2 }.into(), 503, "overloaded"),
            (
                InferenceError::PromptTooLong { prompt_tokens: 9, context_length: 8 }.into(),
                422,
                "prompt_too_long",
            ),
            (InferenceError::EngineStopped.into(), 503, "engine_stopped"),
            (InferenceError::Runtime("onnx exploded".into()).into(), 500, "internal_error"),
            (
                InferenceError::Upstream { url: "http://gpu".into(), message: "x".into() }.into(),
                502,
                "upstream_error",
            ),
            (
                InferenceError::UpstreamTimeout { url: "http://gpu".into(), after_ms: 1 }.into(),
                504,
                "upstream_timeout",
            ),
            (InferenceError::UpstreamRateLimited { retry_after: Some(9) }.into(), 429, "rate_limited"),
            (
                InferenceError::UpstreamUnavailable { retry_after: None, reason: "x".into() }.into(),
                503,
                "overloaded",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status_code().as_u16(), status, "{err}");
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn the_documented_codes_are_the_codes_sent() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap_or_default();
            assert_eq!(json.as_str(), Some(code.as_str()));
        }
    }

    #[test]
    fn server_faults_hide_details_and_503_says_when_to_retry() {
        let err: ApiError = InferenceError::Runtime("secret path /models/x".into()).into();
        assert_eq!(err.public_message(), "internal server error");
        assert!(!err.to_sse_data().contains("secret"));
        let busy: ApiError = InferenceError::Overloaded { capacity: 2 }.into();
        assert!(busy.error_response().headers().contains_key(header::RETRY_AFTER));
        let upstream: ApiError =
            InferenceError::Upstream { url: "http://10.0.0.7:8000/v1".into(), message: "status 500".into() }
                .into();
        assert!(!upstream.to_sse_data().contains("10.0.0.7"), "an upstream's address stays in the log");
        let limited: ApiError = InferenceError::UpstreamRateLimited { retry_after: Some(9) }.into();
        let retry = limited
            .error_response()
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok().map(str::to_owned));
        assert_eq!(retry.as_deref(), Some("9"), "the upstream's Retry-After is passed on");
    }

    #[test]
    fn sse_error_is_a_json_error_object() {
        let data = ApiError::ShuttingDown.to_sse_data();
        let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
        assert_eq!(v["error"]["code"], "shutting_down");
        assert!(v["error"].get("type").is_none() && v["error"].get("param").is_none());
    }

    #[test]
    fn openai_style_has_type_param_and_its_own_not_found_code() {
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::UnknownVersion("v9".into()).to_json(ErrorStyle::OpenAi))
                .unwrap_or_default();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert!(v["error"]["param"].is_null() && v["error"].get("param").is_some());
        let limited = ApiError::RateLimited.styled(ErrorStyle::OpenAi).error_response();
        assert_eq!(limited.status().as_u16(), 429);
    }
}
