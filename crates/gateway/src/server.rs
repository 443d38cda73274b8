//! Start-up and shutdown: load every configured model, bind, serve, and drain on SIGTERM/SIGINT.
//!
//! Shutdown: readiness turns 503 at once; after `--shutdown-delay-secs` (default 0) the listener
//! closes; open streams may finish until `--drain-timeout-secs` after the signal; then the
//! remaining streams get an error event and `[DONE]`, and the process exits 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpServer, web};
use slog::{Logger, error, info};
use streamgate_inference::{EngineConfig, Generator, MockConfig, MockEngine, OnnxEngine, UpstreamEngine};

use crate::app::create_app;
use crate::model_registry::ModelRegistry;
use crate::settings::{AttentionKernel, EngineKind, ModelSource, Settings};
use crate::state::AppState;

/// Load each `--model VERSION=DIR` on its own engine (worker thread + ORT session), and set up
/// each `VERSION=openai+URL…` as an upstream engine (nothing contacted yet).
pub fn load_models(settings: &Settings, logger: &Logger) -> Result<ModelRegistry, String> {
    let mut registry = ModelRegistry::new();
    if settings.engine == EngineKind::Mock {
        let config = MockConfig {
            tokens: settings.mock_tokens,
            interval: Duration::from_millis(settings.mock_interval_ms),
        };
        for spec in &settings.models {
            let engine = MockEngine::new(config).map_err(|e| format!("mock engine: {e}"))?;
            slog::warn!(logger, "model loaded"; "version" => &spec.version, "name" => &engine.info().name,
                "engine" => "mock", "note" => "benchmarking aid: no model behind this version");
            registry.insert(spec.version.clone(), Arc::new(engine) as Arc<dyn Generator>);
        }
        return Ok(registry);
    }
    for spec in &settings.models {
        let started = Instant::now();
        let dir = match &spec.source {
            ModelSource::Folder(dir) => dir,
            ModelSource::Upstream(upstream) => {
                let config = settings.upstream_config(upstream).map_err(|e| e.to_string())?;
                let engine = UpstreamEngine::start(config)
                    .map_err(|e| format!("model version {}: {e}", spec.version))?;
                info!(logger, "model loaded"; "version" => &spec.version, "name" => &engine.info().name,
                    "engine" => "upstream", "urls" => upstream.urls.join(" "),
                    "connect_timeout_ms" => upstream.connect_timeout.as_millis() as u64,
                    "first_byte_timeout_ms" => upstream.first_byte_timeout.as_millis() as u64);
                registry.insert(spec.version.clone(), Arc::new(engine) as Arc<dyn Generator>);
                continue;
            }
        };
        let engine = OnnxEngine::start(&EngineConfig {
            model_dir: dir.clone(),
            ort_dylib_path: settings.ort_dylib_path.clone(),
            intra_threads: settings.intra_threads_or_cores(),
            spinning: settings.ort_spinning_enabled(),
            max_active: settings.max_active_sequences,
            queue_capacity: settings.queue_capacity,
            prefill_chunk: settings.prefill_chunk,
            context_length: settings.context_length,
            prefix_cache_mb: settings.prefix_cache_mb,
            prefill_pace: settings.prefill_pace,
            batch_invariant: settings.batch_invariant,
            mixed_steps: settings.mixed_steps,
            own_attention: settings.attention_kernel == AttentionKernel::Streamgate,
            ort_profile: None,
        })
        .map_err(|e| format!("model version {}: {e}", spec.version))?;
        let info = engine.info();
        info!(logger, "model loaded";
            "version" => &spec.version, "name" => &info.name, "path" => info.path.display().to_string(),
            "context_length" => info.context_length, "vocab_size" => info.vocab_size, "layout" => info.layout,
            "attention" => info.attention,
            "ort_spinning" => settings.ort_spinning_enabled(), "load_ms" => started.elapsed().as_millis() as u64);
        registry.insert(spec.version.clone(), Arc::new(engine) as Arc<dyn Generator>);
    }
    Ok(registry)
}

/// Serve until a shutdown signal has been handled. Logs `listening` with the bound `address`.
pub async fn serve(state: web::Data<AppState>) -> std::io::Result<()> {
    let settings = &state.settings;
    let logger = state.logger.clone();
    let drain = Duration::from_secs(settings.drain_timeout_secs);
    let delay = Duration::from_secs(settings.shutdown_delay_secs);
    let app_state = state.clone();
    let server = HttpServer::new(move || create_app(app_state.clone()))
        .workers(settings.http_workers_or_cores())
        .backlog(settings.listen_backlog)
        .disable_signals()
        // After the drain timeout, streams end themselves; allow a moment to flush those events.
        .shutdown_timeout(settings.drain_timeout_secs + 5)
        .bind((settings.host.as_str(), settings.port))?;
    for address in server.addrs() {
        info!(logger, "listening"; "address" => address.to_string(),
            "versions" => state.models.versions().collect::<Vec<_>>().join(","));
    }
    let server = server.run();
    let handle = server.handle();
    let sweeper = state.clone();
    actix_web::rt::spawn(async move {
        let mut every =
            actix_web::rt::time::interval(Duration::from_secs(sweeper.settings.rate_limit_evict_secs));
        loop {
            every.tick().await;
            let tracked = sweeper.client_gate.limits.evict_idle();
            slog::debug!(sweeper.logger, "rate limiter sweep"; "tracked_clients" => tracked);
        }
    });
    let streams = state.clone();
    actix_web::rt::spawn(async move {
        let mut every = actix_web::rt::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            let kept = streams.streams.evict();
            slog::trace!(streams.logger, "stream sweep"; "kept_streams" => kept);
        }
    });
    let shutdown_state = state.clone();
    actix_web::rt::spawn(async move {
        let signal = wait_for_signal().await;
        info!(shutdown_state.logger, "shutting down"; "signal" => signal, "drain_timeout_s" => drain.as_secs());
        shutdown_state.shutdown.begin_drain();
        let ender = shutdown_state.clone();
        actix_web::rt::spawn(async move {
            actix_web::rt::time::sleep(drain).await;
            info!(ender.logger, "drain timeout reached: ending open streams");
            ender.shutdown.end_streams();
        });
        actix_web::rt::time::sleep(delay).await;
        info!(shutdown_state.logger, "closing the listener");
        handle.stop(true).await;
    });
    let result = server.await;
    info!(logger, "stopped");
    result
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            // Without signal handlers we can only run until killed.
            std::future::pending::<()>().await;
            "none"
        }
    }
}

/// Log a fatal start-up error as JSON and say it on stderr too (the log may be piped away).
pub fn fatal(logger: &Logger, message: &str) {
    error!(logger, "start-up failed"; "error" => message);
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "streamgate: {message}");
}
