//! CORS: an exact list of allowed origins plus one regular expression (for preview deploys),
//! matched against the *whole* origin. Preflights are answered here; a request from an origin
//! that is not allowed gets a 403 JSON error before any work is done.
//!
//! Requests without an `Origin` header (curl, servers, SDKs) are not browser cross-origin requests
//! and pass through; so do same-origin requests (the bundled page).

use std::collections::HashSet;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use regex::Regex;

use crate::error::ApiError;
use crate::http::paths::error_response_for;

const ALLOWED_METHODS: &str = "GET, POST, OPTIONS";
const ALLOWED_HEADERS: &str =
    "authorization, content-type, accept, x-request-id, last-event-id, cache-control";
const EXPOSED_HEADERS: &str = "x-request-id, x-stream-id, retry-after, ratelimit-limit, ratelimit-remaining, ratelimit-reset, x-vercel-ai-ui-message-stream";
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

/// Compile the origin regex anchored at both ends, so `https://x.vercel.app.evil.com` cannot match
/// a pattern meant for `https://x.vercel.app`.
pub fn compile_origin_regex(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$")).size_limit(1 << 20).build()
}

/// An allowed origin must be `scheme://host[:port]`, nothing more (no path, no trailing slash).
pub fn check_origin_setting(origin: &str) -> Result<(), String> {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err(format!("'{origin}' is not an origin like https://app.example.com"));
    };
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err(format!("'{origin}' is not an origin like https://app.example.com (no path or slash)"));
    }
    Ok(())
}

/// Which origins may call the API from a browser.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    exact: HashSet<String>,
    pattern: Option<Regex>,
}

impl OriginPolicy {
    /// Build from validated settings (an invalid regex is rejected at start-up by `Settings::validate`).
    pub fn new(exact: &[String], pattern: Option<&str>) -> Result<Self, regex::Error> {
        Ok(Self {
            exact: exact.iter().map(|o| o.trim_end_matches('/').to_owned()).collect(),
            pattern: pattern.map(compile_origin_regex).transpose()?,
        })
    }

    /// `null` (sandboxed iframes, file://) is only allowed when listed explicitly.
    pub fn allows(&self, origin: &str) -> bool {
        if self.exact.contains(origin) {
            return true;
        }
        origin != "null" && self.pattern.as_ref().is_some_and(|re| re.is_match(origin))
    }
}

/// actix middleware (`from_fn`) applying the policy it finds in `Data<OriginPolicy>` (none: only
/// requests without `Origin` or from the same origin pass).
pub async fn cors_middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, actix_web::Error> {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    };
    let allowed = {
        let policy = req.app_data::<web::Data<OriginPolicy>>();
        let origin_str = origin.to_str().unwrap_or("");
        is_same_origin(&req, origin_str) || policy.is_some_and(|p| p.allows(origin_str))
    };
    let is_preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !allowed {
        let response = error_response_for(req.path(), ApiError::OriginNotAllowed);
        return Ok(req.into_response(response).map_into_right_body());
    }
    if is_preflight {
        let response = HttpResponse::build(StatusCode::NO_CONTENT)
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
            .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, ALLOWED_METHODS))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOWED_HEADERS))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE_SECS))
            .insert_header((header::VARY, "Origin"))
            .finish();
        return Ok(req.into_response(response).map_into_right_body());
    }
    let mut res = next.call(req).await?;
    let headers = res.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED_HEADERS));
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    Ok(res.map_into_left_body())
}

/// The page served at `/` calls the API from its own origin; browsers still send `Origin` on POST.
fn is_same_origin(req: &ServiceRequest, origin: &str) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let scheme = if req.app_config().secure() { "https" } else { "http" };
    origin.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) == Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OriginPolicy {
        OriginPolicy::new(
            &["https://app.example.com".to_owned()],
            Some(r"https://your-project-[a-z0-9-]+\.vercel\.app"),
        )
        .unwrap_or_default()
    }

    #[test]
    fn exact_and_pattern_origins_are_allowed() {
        let p = policy();
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("https://your-project-git-feature-x.vercel.app"));
    }

    #[test]
    fn bypass_attempts_are_refused() {
        let p = policy();
        for origin in [
            "https://your-project-x.vercel.app.evil.com",
            "https://evil.com/?https://your-project-x.vercel.app",
            "http://your-project-x.vercel.app",
            "https://evil-your-project-x.vercel.app",
            "https://your-project-x.vercel.app:8443",
            "https://app.example.com.evil.com",
            "https://APP.example.com",
            "null",
            "",
        ] {
            assert!(!p.allows(origin), "{origin} must be refused");
        }
    }

    #[test]
    fn null_is_allowed_only_when_listed() {
        let listed = OriginPolicy::new(&["null".to_owned()], Some(".*")).unwrap_or_default();
        assert!(listed.allows("null"));
        let pattern_only = OriginPolicy::new(&[], Some(".*")).unwrap_or_default();
        assert!(!pattern_only.allows("null"));
    }

    #[test]
    fn origin_settings_are_checked() {
        assert!(check_origin_setting("https://a.example.com").is_ok());
        assert!(check_origin_setting("http://localhost:3000").is_ok());
        for bad in ["a.example.com", "https://a.example.com/", "ftp://x", "https://"] {
            assert!(check_origin_setting(bad).is_err(), "{bad}");
        }
    }
}
