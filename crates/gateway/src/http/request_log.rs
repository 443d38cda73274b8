//! One JSON log line per request, written when the response body ends (so a stream's line has its
//! time to first token, tokens and finish reason): request id (from `X-Request-Id` or generated,
//! echoed back), method, path, route, status, client, model version, latency.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::HttpMessage;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web::{Bytes, Data};
use rand::Rng;
use slog::{Logger, error, info, warn};

use prometheus::IntCounterVec;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Default)]
struct Fields {
    version: Option<String>,
    client: Option<String>,
    ttft: Option<Duration>,
    tokens: Option<u64>,
    finish_reason: Option<&'static str>,
    error: Option<String>,
}

/// Per-request facts that handlers and streams add to the log line.
pub struct RequestLog {
    pub request_id: String,
    fields: Mutex<Fields>,
}

impl RequestLog {
    fn new(request_id: String) -> Self {
        Self { request_id, fields: Mutex::new(Fields::default()) }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Fields) -> R) -> R {
        let mut guard = self.fields.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn set_version(&self, version: &str) {
        self.with(|f| f.version = Some(version.to_owned()));
    }

    pub fn set_client(&self, client: String) {
        self.with(|f| f.client = Some(client));
    }

    pub fn set_time_to_first_token(&self, ttft: Duration) {
        self.with(|f| f.ttft = Some(ttft));
    }

    pub fn set_stream_outcome(&self, tokens: u64, finish_reason: &'static str) {
        self.with(|f| {
            f.tokens = Some(tokens);
            f.finish_reason = Some(finish_reason);
        });
    }

    pub fn set_error(&self, error: String) {
        self.with(|f| f.error = Some(error));
    }

    /// The request's log record, from the request extensions (inserted by the middleware).
    pub fn of(req: &actix_web::HttpRequest) -> Option<Arc<RequestLog>> {
        req.extensions().get::<Arc<RequestLog>>().cloned()
    }
}

/// A request id we accept from the client: short, printable, no spaces.
fn client_request_id(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())).then(|| s.to_owned())
}

fn generated_request_id() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// Where the request log goes: what the middleware reads (its own `Data<AccessLog>`).
pub struct AccessLog {
    pub logger: Logger,
    /// `http_requests_total` by route pattern and status.
    pub requests: IntCounterVec,
}

/// The middleware (`from_fn`).
pub async fn request_log_middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<LoggedBody>, actix_web::Error> {
    let started = Instant::now();
    let request_id =
        req.headers().get(REQUEST_ID).and_then(client_request_id).unwrap_or_else(generated_request_id);
    let log = Arc::new(RequestLog::new(request_id));
    req.extensions_mut().insert(Arc::clone(&log));
    let sink = req.app_data::<Data<AccessLog>>().cloned();
    let method = req.method().to_string();
    let path = req.path().to_owned();
    let peer = req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();

    let mut res = next.call(req).await?;
    if let Ok(value) = HeaderValue::from_str(&log.request_id) {
        res.headers_mut().insert(REQUEST_ID, value);
    }
    let status = res.status().as_u16();
    let route = res.request().match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    if let Some(error) = res.response().error() {
        log.set_error(error.to_string());
    }
    if let Some(sink) = &sink {
        sink.requests.with_label_values(&[route.as_str(), &status.to_string()]).inc();
    }
    let record =
        Record { logger: sink.map(|s| s.logger.clone()), log, method, path, route, status, peer, started };
    Ok(res.map_body(|_, body| LoggedBody { body: Some(body.boxed()), record: Some(record) }))
}

struct Record {
    logger: Option<Logger>,
    log: Arc<RequestLog>,
    method: String,
    path: String,
    route: String,
    status: u16,
    peer: String,
    started: Instant,
}

impl Record {
    fn emit(self) {
        let Some(logger) = self.logger else { return };
        let latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let fields = self.log.with(std::mem::take);
        let kv = slog::o!(
            "request_id" => self.log.request_id.clone(),
            "method" => self.method,
            "path" => self.path,
            "route" => self.route,
            "status" => self.status,
            "peer" => self.peer,
            "client" => fields.client,
            "version" => fields.version,
            "latency_ms" => latency_ms,
            "ttft_ms" => fields.ttft.map(|d| d.as_secs_f64() * 1e3),
            "tokens" => fields.tokens,
            "finish_reason" => fields.finish_reason,
            "error" => fields.error,
        );
        let logger = logger.new(kv);
        match self.status {
            500.. => error!(logger, "request"),
            400.. => warn!(logger, "request"),
            _ => info!(logger, "request"),
        }
    }
}

/// The response body, which logs the request once it has been sent or dropped.
pub struct LoggedBody {
    body: Option<BoxBody>,
    record: Option<Record>,
}

impl MessageBody for LoggedBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.as_ref().map_or(BodySize::None, MessageBody::size)
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Drop the body first: a stream writes its outcome (tokens, finish reason) when dropped.
        drop(self.body.take());
        if let Some(record) = self.record.take() {
            record.emit();
        }
    }
}
