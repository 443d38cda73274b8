//! Prometheus metrics: requests by route and status, active streams, tokens streamed, time to
//! first token and inter-token gaps, rate-limited, rejected and resumed requests, the shared state backend's health,
//! each upstream URL's state, open streams, time to first byte and errors, and the engines' own
//! gauges (read at scrape time: generations, queue, KV slots, batch size, decode steps, queue
//! time, prefix-cache hits). Served as text at `GET /metrics`.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::model_registry::ModelRegistry;

/// All metric families, registered once at start-up.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub active_streams: IntGaugeVec,
    pub tokens_streamed: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token: HistogramVec,
    pub rate_limited: IntCounterVec,
    pub rejected: IntCounterVec,
    pub resumed_streams: IntCounterVec,
    /// 1 while the shared state backend (Redis) answers, 0 while this replica runs on its own
    /// state (degraded); 1 with the in-process backend.
    pub state_backend_up: IntGauge,
    /// Operations on the shared state backend that failed, by operation.
    pub state_errors: IntCounterVec,
    /// Rate-limit checks made against this replica's own quota because the shared one was down.
    pub quota_fallbacks: IntCounter,
    engine_active: IntGaugeVec,
    engine_queued: IntGaugeVec,
    engine_cancelled: IntGaugeVec,
    engine_tokens: IntGaugeVec,
    engine_slots: IntGaugeVec,
    engine_batch: IntGaugeVec,
    engine_decode_steps: IntGaugeVec,
    engine_admitted: IntGaugeVec,
    engine_queue_wait: GaugeVec,
    engine_prefix_hits: IntGaugeVec,
    engine_prefix_tokens: IntGaugeVec,
    upstream_up: IntGaugeVec,
    upstream_open: IntGaugeVec,
    upstream_first_byte_sum: GaugeVec,
    upstream_first_byte_count: IntGaugeVec,
    upstream_errors: IntGaugeVec,
}

impl Metrics {
    /// Build and register every family. Fails only on a programming error (duplicate name).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("streamgate".into()), None)?;
        let latency_buckets =
            vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let gap_buckets = vec![0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 5.0];
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests by route pattern and status"),
                &["route", "status"],
            )?,
            active_streams: IntGaugeVec::new(
                Opts::new("active_streams", "SSE streams open now"),
                &["version"],
            )?,
            tokens_streamed: IntCounterVec::new(
                Opts::new("tokens_streamed_total", "Token events sent to clients"),
                &["version"],
            )?,
            time_to_first_token: HistogramVec::new(
                HistogramOpts::new("time_to_first_token_seconds", "From request to first token event")
                    .buckets(latency_buckets),
                &["version"],
            )?,
            inter_token: HistogramVec::new(
                HistogramOpts::new("inter_token_seconds", "Time between deliveries of token events to a client (tokens ready together are one delivery)")
                    .buckets(gap_buckets),
                &["version"],
            )?,
            rate_limited: IntCounterVec::new(
                Opts::new("rate_limited_total", "Requests refused with 429"),
                &["reason"],
            )?,
            resumed_streams: IntCounterVec::new(
                Opts::new("resumed_streams_total", "Streams continued by a reconnecting client (Last-Event-ID, resume endpoints)"),
                &["version"],
            )?,
            state_backend_up: IntGauge::new(
                "state_backend_up",
                "1 while the shared state backend (--state) answers; 0: degraded to this replica's own quotas and streams",
            )?,
            state_errors: IntCounterVec::new(
                Opts::new("state_errors_total", "Failed operations on the shared state backend"),
                &["op"],
            )?,
            quota_fallbacks: IntCounter::new(
                "quota_fallbacks_total",
                "Rate-limit checks answered by this replica's own quota while the shared backend was down",
            )?,
            rejected: IntCounterVec::new(
                Opts::new("rejected_total", "Requests refused with 503 (queue full, not ready, draining)"),
                &["reason"],
            )?,
            engine_active: IntGaugeVec::new(
                Opts::new("engine_active_generations", "Generations being decoded"),
                &["version"],
            )?,
            engine_queued: IntGaugeVec::new(
                Opts::new("engine_queued_requests", "Requests waiting in the admission queue"),
                &["version"],
            )?,
            engine_cancelled: IntGaugeVec::new(
                Opts::new("engine_cancelled_generations", "Generations cancelled because the client left"),
                &["version"],
            )?,
            engine_tokens: IntGaugeVec::new(
                Opts::new("engine_tokens_generated", "Tokens sampled by the engine since start"),
                &["version"],
            )?,
            engine_slots: IntGaugeVec::new(
                Opts::new("engine_kv_slots", "KV slots: generations one decode step can advance"),
                &["version"],
            )?,
            engine_batch: IntGaugeVec::new(
                Opts::new("engine_batch_size", "Generations advanced by the last decode step"),
                &["version"],
            )?,
            engine_decode_steps: IntGaugeVec::new(
                Opts::new(
                    "engine_decode_steps",
                    "Decode steps (one forward pass for every decoding generation) since start; \
                     tokens_generated / decode_steps is the mean batch",
                ),
                &["version"],
            )?,
            engine_admitted: IntGaugeVec::new(
                Opts::new("engine_admitted_requests", "Requests that left the queue for a KV slot since start"),
                &["version"],
            )?,
            engine_queue_wait: GaugeVec::new(
                Opts::new(
                    "engine_queue_wait_seconds_sum",
                    "Summed time admitted requests waited in the queue (divide by admitted_requests)",
                ),
                &["version"],
            )?,
            engine_prefix_hits: IntGaugeVec::new(
                Opts::new("engine_prefix_cache_hits", "Prompts that started from a cached prefix"),
                &["version"],
            )?,
            engine_prefix_tokens: IntGaugeVec::new(
                Opts::new("engine_prefix_cache_tokens", "Prompt positions copied from the prefix cache instead of recomputed"),
                &["version"],
            )?,
            upstream_up: IntGaugeVec::new(
                Opts::new("upstream_up", "1 while an upstream URL takes requests, 0 while its circuit breaker has it out"),
                &["version", "url"],
            )?,
            upstream_open: IntGaugeVec::new(
                Opts::new("upstream_open_streams", "Streams open to an upstream URL"),
                &["version", "url"],
            )?,
            upstream_first_byte_sum: GaugeVec::new(
                Opts::new(
                    "upstream_first_byte_seconds_sum",
                    "Summed time from request to an upstream's first event (divide by _count)",
                ),
                &["version", "url"],
            )?,
            upstream_first_byte_count: IntGaugeVec::new(
                Opts::new("upstream_first_byte_seconds_count", "Answers whose first event came from an upstream URL"),
                &["version", "url"],
            )?,
            upstream_errors: IntGaugeVec::new(
                Opts::new(
                    "upstream_errors_total",
                    "Upstream failures by kind (connect, timeout, status, protocol, disconnected), since start",
                ),
                &["version", "url", "kind"],
            )?,
            registry,
        };
        m.state_backend_up.set(1);
        let collectors: [Box<dyn prometheus::core::Collector>; 27] = [
            Box::new(m.upstream_up.clone()),
            Box::new(m.upstream_open.clone()),
            Box::new(m.upstream_first_byte_sum.clone()),
            Box::new(m.upstream_first_byte_count.clone()),
            Box::new(m.upstream_errors.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.active_streams.clone()),
            Box::new(m.tokens_streamed.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.inter_token.clone()),
            Box::new(m.rate_limited.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.resumed_streams.clone()),
            Box::new(m.state_backend_up.clone()),
            Box::new(m.state_errors.clone()),
            Box::new(m.quota_fallbacks.clone()),
            Box::new(m.engine_active.clone()),
            Box::new(m.engine_queued.clone()),
            Box::new(m.engine_cancelled.clone()),
            Box::new(m.engine_tokens.clone()),
            Box::new(m.engine_slots.clone()),
            Box::new(m.engine_batch.clone()),
            Box::new(m.engine_decode_steps.clone()),
            Box::new(m.engine_admitted.clone()),
            Box::new(m.engine_queue_wait.clone()),
            Box::new(m.engine_prefix_hits.clone()),
            Box::new(m.engine_prefix_tokens.clone()),
        ];
        for collector in collectors {
            m.registry.register(collector)?;
        }
        Ok(m)
    }

    /// Prometheus text exposition, with the engines' gauges refreshed first.
    pub fn render(&self, models: &ModelRegistry) -> String {
        for (version, model) in models.iter() {
            let stats = model.stats();
            self.engine_active.with_label_values(&[version]).set(stats.active as i64);
            self.engine_queued.with_label_values(&[version]).set(stats.queued as i64);
            self.engine_cancelled.with_label_values(&[version]).set(stats.cancelled as i64);
            self.engine_tokens.with_label_values(&[version]).set(stats.tokens_generated as i64);
            self.engine_slots.with_label_values(&[version]).set(stats.slots as i64);
            self.engine_batch.with_label_values(&[version]).set(stats.batch_size as i64);
            self.engine_decode_steps.with_label_values(&[version]).set(stats.decode_steps as i64);
            self.engine_admitted.with_label_values(&[version]).set(stats.admitted as i64);
            self.engine_queue_wait.with_label_values(&[version]).set(stats.queue_wait_micros as f64 / 1e6);
            self.engine_prefix_hits.with_label_values(&[version]).set(stats.prefix_hits as i64);
            self.engine_prefix_tokens.with_label_values(&[version]).set(stats.prefix_tokens_reused as i64);
            for upstream in model.upstreams() {
                let labels = [version, upstream.url.as_str()];
                self.upstream_up.with_label_values(&labels).set(i64::from(upstream.available));
                self.upstream_open.with_label_values(&labels).set(upstream.open_streams as i64);
                self.upstream_first_byte_sum.with_label_values(&labels).set(upstream.first_byte_seconds_sum);
                self.upstream_first_byte_count
                    .with_label_values(&labels)
                    .set(upstream.first_byte_count as i64);
                for (kind, count) in upstream.errors {
                    self.upstream_errors
                        .with_label_values(&[version, upstream.url.as_str(), kind])
                        .set(count as i64);
                }
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
