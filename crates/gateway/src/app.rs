//! Application state and the one `create_app` used by `main` and by every test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, web};
use slog::Logger;
use tokio::sync::watch;

use crate::client_identity::{ApiKeys, ClientResolver};
use crate::cors::{OriginPolicy, cors_middleware};
use crate::error::{ApiError, error_for};
use crate::metrics::Metrics;
use crate::model_registry::ModelRegistry;
use crate::rate_limit::{RateLimits, StreamSlots, client_middleware};
use crate::request_log::request_log_middleware;
use crate::routes;
use crate::settings::Settings;
use crate::sse::ShutdownSignal;

/// Shared by every worker thread (behind `web::Data`, an `Arc`).
pub struct AppState {
    pub settings: Settings,
    pub models: ModelRegistry,
    pub metrics: Metrics,
    pub logger: Logger,
    pub origin_policy: OriginPolicy,
    pub shutdown: Shutdown,
    pub api_keys: Option<ApiKeys>,
    pub client_resolver: ClientResolver,
    pub rate_limits: RateLimits,
    pub stream_slots: Arc<StreamSlots>,
}

impl AppState {
    /// Settings must have passed `Settings::validate`.
    pub fn new(settings: Settings, models: ModelRegistry, logger: Logger) -> Result<Self, String> {
        let origin_policy =
            OriginPolicy::new(&settings.allowed_origins, settings.allowed_origin_regex.as_deref())
                .map_err(|e| format!("ALLOWED_ORIGIN_REGEX: {e}"))?;
        let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
        let api_keys = ApiKeys::load(&settings.api_keys, settings.api_keys_file.as_deref())
            .map_err(|e| format!("API_KEYS: {e}"))?;
        let client_resolver = ClientResolver::new(settings.trusted_proxies.clone(), settings.ipv6_prefix);
        let rate_limits = RateLimits::new(
            models.versions().map(str::to_owned),
            settings.rate_limit,
            settings.rate_limit_burst,
            &settings.rate_limit_rules,
            settings.rate_limit_exempt.clone(),
        );
        let stream_slots = StreamSlots::new(settings.max_streams_per_client);
        Ok(Self {
            settings,
            models,
            metrics,
            logger,
            origin_policy,
            shutdown: Shutdown::new(),
            api_keys,
            client_resolver,
            rate_limits,
            stream_slots,
        })
    }

    /// Static pages and the API description are served without a key (still rate-limited);
    /// a browser's EventSource cannot send an Authorization header.
    pub fn is_public_without_key(&self, path: &str) -> bool {
        matches!(path, "/" | "/api/docs" | "/api/openapi.json")
    }
}

/// Graceful shutdown in two phases: draining (readiness reports 503, streams continue), then
/// forced end (open streams get an error event and `[DONE]`).
pub struct Shutdown {
    draining: AtomicBool,
    force_end: watch::Sender<bool>,
}

impl Shutdown {
    fn new() -> Self {
        Self { draining: AtomicBool::new(false), force_end: watch::channel(false).0 }
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn end_streams(&self) {
        self.begin_drain();
        self.force_end.send_replace(true);
    }

    /// A future that resolves when open streams must end.
    pub fn signal(&self) -> ShutdownSignal {
        let mut rx = self.force_end.subscribe();
        Box::pin(async move {
            if rx.wait_for(|ended| *ended).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// Build the application: middleware (request log outermost, then CORS, then client identity and
/// rate limits), extractor limits that
/// turn malformed input into JSON errors, every route module, and a JSON 404 for the rest.
pub fn create_app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let json = web::JsonConfig::default()
        .limit(state.settings.max_body_bytes)
        .content_type_required(true)
        .content_type(|mime| mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json"))
        .error_handler(|err, req| error_for(req.path(), ApiError::from(err)));
    let query =
        web::QueryConfig::default().error_handler(|err, req| error_for(req.path(), ApiError::from(err)));
    let payload = web::PayloadConfig::default().limit(state.settings.max_body_bytes);
    App::new()
        .app_data(state)
        .app_data(json)
        .app_data(query)
        .app_data(payload)
        .wrap(from_fn(client_middleware))
        .wrap(from_fn(cors_middleware))
        .wrap(from_fn(request_log_middleware))
        .configure(routes::configure)
        .default_service(web::to(routes::not_found))
}
