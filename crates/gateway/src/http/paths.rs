//! The one path table: every route's pattern, its methods, its rate-limit scope and kind, whether
//! it is served without an API key, and which error style it speaks. Rate limits, API keys,
//! error shapes, 404 and 405 (with `Allow`) all read it; route modules register their handlers
//! through [`resource`], which refuses a pattern that is not in the table.

use std::str::FromStr;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};

use crate::error::{ApiError, ErrorStyle};

/// What a route does, for rate-limit rules (`stream`, `complete`, `other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Streaming generation (`…/inference/stream`, the chat protocols).
    Stream,
    /// Non-streaming generation (`…/inference`).
    Complete,
    /// Everything else that is not exempt (models, docs, the page).
    Other,
}

impl RouteKind {
    /// The name rules use (`stream`, `complete`, `other`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Complete => "complete",
            Self::Other => "other",
        }
    }
}

impl FromStr for RouteKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stream" => Ok(Self::Stream),
            "complete" => Ok(Self::Complete),
            "other" => Ok(Self::Other),
            _ => Err(format!("'{s}' is not a route kind (stream, complete, other)")),
        }
    }
}

/// Which quota a route counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The model version in the path (`/api/{version}/…`).
    Version,
    /// The OpenAI-compatible API (its `model` field names the version).
    OpenAi,
    /// Everything else shares one quota.
    Global,
}

/// The quota key of [`Scope::OpenAi`] routes, and of routes outside any version.
pub const OPENAI_SCOPE: &str = "openai";
pub const GLOBAL_SCOPE: &str = "*";

/// One route of the gateway.
#[derive(Debug)]
pub struct RouteSpec {
    /// actix pattern; `{version}` matches one path segment.
    pub pattern: &'static str,
    /// The methods it answers, as sent in `Allow`.
    pub allow: &'static str,
    pub kind: RouteKind,
    pub scope: Scope,
    /// Served without an API key when keys are on (pages a browser loads; still rate-limited).
    pub public: bool,
}

const fn route(pattern: &'static str, allow: &'static str, kind: RouteKind, scope: Scope) -> RouteSpec {
    RouteSpec { pattern, allow, kind, scope, public: false }
}

const fn public(pattern: &'static str) -> RouteSpec {
    RouteSpec { pattern, allow: "GET", kind: RouteKind::Other, scope: Scope::Global, public: true }
}

/// Every route. A browser's EventSource cannot send an Authorization header, so the page and
/// the API description are public; the API itself is not.
pub const ROUTES: &[RouteSpec] = &[
    public("/"),
    public("/api/docs"),
    public("/api/openapi.json"),
    route("/metrics", "GET", RouteKind::Other, Scope::Global),
    route("/api/models", "GET", RouteKind::Other, Scope::Global),
    route("/api/{version}/models", "GET", RouteKind::Other, Scope::Version),
    route("/api/{version}/health/live", "GET", RouteKind::Other, Scope::Version),
    route("/api/{version}/health/ready", "GET", RouteKind::Other, Scope::Version),
    route("/api/{version}/inference/stream", "GET, POST", RouteKind::Stream, Scope::Version),
    route("/api/{version}/inference", "POST", RouteKind::Complete, Scope::Version),
    route("/api/{version}/chat", "POST", RouteKind::Stream, Scope::Version),
    route("/api/{version}/chat/{chat_id}/stream", "GET", RouteKind::Stream, Scope::Version),
    route("/api/{version}/streams/{id}", "GET", RouteKind::Stream, Scope::Version),
    route("/v1/chat/completions", "POST", RouteKind::Stream, Scope::OpenAi),
    route("/v1/completions", "POST", RouteKind::Stream, Scope::OpenAi),
    route("/v1/models", "GET", RouteKind::Other, Scope::Global),
];

/// The table entry whose pattern matches `path`.
pub fn route_for(path: &str) -> Option<&'static RouteSpec> {
    ROUTES.iter().find(|r| matches_pattern(r.pattern, path))
}

/// The rate-limit scope (a version name, [`OPENAI_SCOPE`] or [`GLOBAL_SCOPE`]) and kind of a
/// path. Paths no route matches count against their version (`/api/{version}/…`) or the global
/// quota.
pub fn classify(path: &str) -> (&str, RouteKind) {
    let version = || path.trim_start_matches('/').split('/').nth(1).unwrap_or(GLOBAL_SCOPE);
    match route_for(path) {
        Some(r) => match r.scope {
            Scope::Version => (version(), r.kind),
            Scope::OpenAi => (OPENAI_SCOPE, r.kind),
            Scope::Global => (GLOBAL_SCOPE, r.kind),
        },
        None => {
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            match segments.as_slice() {
                ["api", version, _, ..] => (version, RouteKind::Other),
                _ => (GLOBAL_SCOPE, RouteKind::Other),
            }
        }
    }
}

/// Served without an API key?
pub fn is_public(path: &str) -> bool {
    route_for(path).is_some_and(|r| r.public)
}

/// OpenAI's error shape under `/v1/` (the OpenAI-compatible API), ours everywhere else.
pub fn error_style(path: &str) -> ErrorStyle {
    if path.starts_with("/v1/") { ErrorStyle::OpenAi } else { ErrorStyle::Native }
}

/// The error response for a request path, in that path's style (middleware answers).
pub fn error_response_for(path: &str, error: ApiError) -> HttpResponse {
    error.response(error_style(path))
}

/// The same, as an actix error (extractor error handlers).
pub fn error_for(path: &str, error: ApiError) -> actix_web::Error {
    error.styled(error_style(path))
}

/// Does `path` match a route pattern whose `{…}` segments match any non-empty segment?
pub fn matches_pattern(pattern: &str, path: &str) -> bool {
    let (mut p, mut a) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), a.next()) {
            (None, None) => return true,
            (Some(ps), Some(s)) if (ps.starts_with('{') && ps.ends_with('}') && !s.is_empty()) || ps == s => {
            }
            _ => return false,
        }
    }
}

/// A route's resource, from the table: methods it does not define get a JSON 405 with `Allow`.
/// A pattern missing from the table is a programming error that the route tests catch (the
/// resource then answers 405 with an empty `Allow`).
pub fn resource(pattern: &'static str) -> actix_web::Resource {
    let allow = ROUTES.iter().find(|r| r.pattern == pattern).map_or("", |r| r.allow);
    web::resource(pattern).default_service(web::to(move |req: HttpRequest| async move {
        let mut response = error_response_for(req.path(), ApiError::MethodNotAllowed);
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        Ok::<_, actix_web::Error>(response)
    }))
}

/// JSON 404 for paths no route matches.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, actix_web::Error> {
    Err(error_for(req.path(), ApiError::NotFound(format!("{} {}", req.method(), req.path()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_classify_into_scopes() {
        assert_eq!(classify("/api/v1/inference/stream"), ("v1", RouteKind::Stream));
        assert_eq!(classify("/api/v2/inference"), ("v2", RouteKind::Complete));
        assert_eq!(classify("/api/v1/chat"), ("v1", RouteKind::Stream));
        assert_eq!(classify("/api/v1/models"), ("v1", RouteKind::Other));
        assert_eq!(classify("/api/v1/nope"), ("v1", RouteKind::Other));
        assert_eq!(classify("/api/v1/inference/stream/"), ("v1", RouteKind::Other));
        assert_eq!(classify("/v1/chat/completions"), ("openai", RouteKind::Stream));
        assert_eq!(classify("/v1/models"), ("*", RouteKind::Other));
        assert_eq!(classify("/api/models"), ("*", RouteKind::Other));
        assert_eq!(classify("/"), ("*", RouteKind::Other));
        assert!(matches_pattern("/api/{version}/health/live", "/api/v1/health/live"));
        assert!(!matches_pattern("/api/{version}/health/live", "/api/v1/health/live/x"));
        assert!(!matches_pattern("/metrics", "/metricsx"));
    }

    #[test]
    fn only_pages_are_public_and_only_v1_speaks_openai() {
        assert!(is_public("/") && is_public("/api/docs") && is_public("/api/openapi.json"));
        assert!(!is_public("/metrics") && !is_public("/api/v1/inference/stream") && !is_public("/x"));
        assert_eq!(error_style("/v1/models"), ErrorStyle::OpenAi);
        assert_eq!(error_style("/api/v1/models"), ErrorStyle::Native);
    }

    #[test]
    fn the_table_has_no_overlapping_patterns() {
        for (i, a) in ROUTES.iter().enumerate() {
            let concrete = a.pattern.replace("{version}", "v1");
            let first = ROUTES.iter().position(|r| matches_pattern(r.pattern, &concrete));
            assert_eq!(first, Some(i), "{} is shadowed", a.pattern);
        }
    }
}
