//! The gateway's one error type, mapped to HTTP in exactly one place ([`ResponseError`]) and to an
//! SSE event in exactly one place ([`ApiError::to_sse_data`]).
//!
//! Bodies are `{"error": {"code": "...", "message": "..."}}`. 5xx bodies carry a fixed message; the
//! detail goes to the request log (the logging middleware reads the error off the response).

use std::time::Duration;

use actix_web::error::{JsonPayloadError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use streamgate_inference::InferenceError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
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

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl ApiError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::NotFound(_) => "not_found",
            Self::UnknownVersion(_) => "unknown_model_version",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited => "rate_limited",
            Self::TooManyStreams { .. } => "too_many_streams",
            Self::Overloaded(_) => "overloaded",
            Self::NotReady => "not_ready",
            Self::ShuttingDown => "shutting_down",
            Self::Inference(e) => match e {
                InferenceError::InvalidRequest(_) => "invalid_request",
                InferenceError::PromptTooLong { .. } => "prompt_too_long",
                InferenceError::Overloaded { .. } => "overloaded",
                InferenceError::EngineStopped => "engine_stopped",
                _ => "internal_error",
            },
            Self::Internal(_) => "internal_error",
        }
    }

    /// The message a client sees: the error itself, except for server faults.
    pub fn public_message(&self) -> String {
        if self.status_code().is_server_error() && self.status_code() != StatusCode::SERVICE_UNAVAILABLE {
            "internal server error".to_owned()
        } else {
            self.to_string()
        }
    }

    /// 503s and the stream cap say when to come back (rate limits set their own headers).
    fn is_retryable(&self) -> bool {
        self.status_code() == StatusCode::SERVICE_UNAVAILABLE || matches!(self, Self::TooManyStreams { .. })
    }

    /// The JSON of an error sent inside an SSE stream, as a `data:` line (clients that only read
    /// `data:` see it; an `event: error` would collide with EventSource's own error event).
    pub fn to_sse_data(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: ErrorDetail { code: self.code(), message: self.public_message() },
        })
        .unwrap_or_else(|_| r#"{"error":{"code":"internal_error","message":"internal server error"}}"#.into())
    }
}

/// The error response for a request path: OpenAI's shape under `/v1/` (the OpenAI-compatible
/// API), ours everywhere else. Middleware and extractor errors go through here.
pub fn error_response_for(path: &str, error: ApiError) -> HttpResponse {
    if path.starts_with("/v1/") {
        crate::routes::openai::OpenAiError(error).error_response()
    } else {
        error.error_response()
    }
}

/// The same, as an actix error (for extractor error handlers).
pub fn error_for(path: &str, error: ApiError) -> actix_web::Error {
    if path.starts_with("/v1/") { crate::routes::openai::OpenAiError(error).into() } else { error.into() }
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
            Self::InvalidJson(_) => StatusCode::BAD_REQUEST,
            Self::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound(_) | Self::UnknownVersion(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::OriginNotAllowed => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::RateLimited | Self::TooManyStreams { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded(_) | Self::NotReady | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Inference(e) => match e {
                InferenceError::InvalidRequest(_) | InferenceError::PromptTooLong { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                InferenceError::Overloaded { .. } | InferenceError::EngineStopped => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.is_retryable() {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER.as_secs())));
        }
        if matches!(self, Self::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(ErrorBody { error: ErrorDetail { code: self.code(), message: self.public_message() } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::InvalidJson("x".into()), 400, "invalid_json"),
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
            (InferenceError::Runtime("onnx exploded".into()).into(), 500, "internal_error"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status_code().as_u16(), status, "{err}");
            assert_eq!(err.code(), code);
        }
    }

    #[test]
    fn server_faults_hide_details_and_503_says_when_to_retry() {
        let err: ApiError = InferenceError::Runtime("secret path /models/x".into()).into();
        assert_eq!(err.public_message(), "internal server error");
        assert!(!err.to_sse_data().contains("secret"));
        let busy: ApiError = InferenceError::Overloaded { capacity: 2 }.into();
        assert!(busy.error_response().headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn sse_error_is_a_json_error_object() {
        let data = ApiError::ShuttingDown.to_sse_data();
        let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
        assert_eq!(v["error"]["code"], "shutting_down");
    }
}
