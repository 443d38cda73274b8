//! Application state, shared by every worker thread (behind `web::Data`, an `Arc`), and the
//! two-phase shutdown. Built once in `main` (and by the tests) from validated settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::web;
use slog::Logger;
use tokio::sync::watch;

use crate::http::client_identity::{ApiKeys, ClientResolver};
use crate::http::cors::OriginPolicy;
use crate::http::rate_limit::{ClientGate, RateLimits, SharedQuota, StreamSlots};
use crate::http::request_log::AccessLog;
use crate::metrics::Metrics;
use crate::model_registry::ModelRegistry;
use crate::replicas::{Replicas, SharedStateConfig, StateBackend};
use crate::settings::Settings;
use crate::sse::ShutdownSignal;
use crate::streams::{RemoteReaders, StreamHub};

/// Everything a handler may read.
pub struct AppState {
    pub settings: Settings,
    pub models: ModelRegistry,
    pub metrics: Metrics,
    pub logger: Logger,
    pub shutdown: Shutdown,
    pub stream_slots: Arc<StreamSlots>,
    /// Resumable streams (this replica's).
    pub streams: Arc<StreamHub>,
    /// The state shared with other replicas (`--state redis://…`), if any.
    pub replicas: Option<Arc<Replicas>>,
    /// What the HTTP layer's middleware reads, each as its own `Data` (see `create_app`).
    pub origin_policy: web::Data<OriginPolicy>,
    pub client_gate: web::Data<ClientGate>,
    pub access_log: web::Data<AccessLog>,
}

impl AppState {
    /// Settings must have passed `Settings::validate`. With `--state redis://…` this must run
    /// inside an actix system (the shared state's probe and writer start on it).
    pub fn new(settings: Settings, models: ModelRegistry, logger: Logger) -> Result<Self, String> {
        let origin_policy =
            OriginPolicy::new(&settings.allowed_origins, settings.allowed_origin_regex.as_deref())
                .map_err(|e| format!("ALLOWED_ORIGIN_REGEX: {e}"))?;
        let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
        let grace = Duration::from_secs(settings.disconnect_grace_secs);
        let retention = Duration::from_secs(settings.stream_retention_secs);
        let replicas = match &settings.state {
            StateBackend::Memory => None,
            StateBackend::Redis(url) => Some(Replicas::start(
                SharedStateConfig {
                    url: url.clone(),
                    timeout: Duration::from_millis(settings.state_timeout_ms),
                    key_prefix: settings.state_key_prefix.clone(),
                    grace,
                    retention,
                },
                &metrics,
                &logger,
            )?),
        };
        let api_keys = ApiKeys::load(&settings.api_keys, settings.api_keys_file.as_deref())
            .map_err(|e| format!("API_KEYS: {e}"))?;
        let client_gate = ClientGate {
            api_keys,
            resolver: ClientResolver::new(settings.trusted_proxies.clone(), settings.ipv6_prefix),
            limits: RateLimits::new(
                models.versions().map(str::to_owned),
                settings.rate_limit,
                settings.rate_limit_burst,
                &settings.rate_limit_rules,
                settings.rate_limit_exempt.clone(),
            ),
            shared: replicas.clone().map(|r| r as Arc<dyn SharedQuota>),
            refused: metrics.rate_limited.clone(),
            fallbacks: metrics.quota_fallbacks.clone(),
        };
        let access_log = AccessLog { logger: logger.clone(), requests: metrics.requests.clone() };
        let stream_slots = StreamSlots::new(settings.max_streams_per_client);
        let streams = StreamHub::new(
            grace,
            retention,
            settings.max_retained_streams,
            replicas.clone().map(|r| r as Arc<dyn RemoteReaders>),
        );
        Ok(Self {
            settings,
            models,
            metrics,
            logger,
            shutdown: Shutdown::new(),
            stream_slots,
            streams,
            replicas,
            origin_policy: web::Data::new(origin_policy),
            client_gate: web::Data::new(client_gate),
            access_log: web::Data::new(access_log),
        })
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
