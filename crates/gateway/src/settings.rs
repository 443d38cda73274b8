//! The one settings struct: every option is a CLI flag and an environment variable (clap `env`),
//! parsed once in `main`, validated before anything starts. `streamgate --help` lists them all.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use std::num::NonZeroU32;

use clap::Parser;

use crate::http::client_identity::Cidr;
use crate::http::rate_limit::{RateRule, ScopedRule};
use crate::replicas::StateBackend;
use streamgate_inference::upstream::{SCHEME, UpstreamConfig, UpstreamSpec, is_upstream};

/// Where a model version's tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A model folder, run here on ONNX Runtime.
    Folder(PathBuf),
    /// Remote OpenAI-compatible servers (`openai+URL[|URL…]?model=NAME…`).
    Upstream(UpstreamSpec),
}

/// A model version served at `/api/<version>/…`, from a model folder or remote servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub version: String,
    pub source: ModelSource,
}

impl FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (version, dir) =
            s.split_once('=').ok_or_else(|| format!("'{s}' is not VERSION=DIR (e.g. v1=models/a)"))?;
        let valid = !version.is_empty()
            && version.len() <= 32
            && version
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && version.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
        if !valid {
            return Err(format!(
                "version '{version}' must be a lowercase name like v1 (letters, digits, - and _)"
            ));
        }
        if dir.is_empty() {
            return Err(format!("version '{version}' has an empty model folder"));
        }
        let source = if is_upstream(dir) {
            ModelSource::Upstream(UpstreamSpec::parse(dir).map_err(|e| format!("version '{version}': {e}"))?)
        } else {
            ModelSource::Folder(PathBuf::from(dir))
        };
        Ok(Self { version: version.to_owned(), source })
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            ModelSource::Folder(dir) => write!(f, "{}={}", self.version, dir.display()),
            ModelSource::Upstream(spec) => {
                write!(f, "{}={}{}?model={}", self.version, SCHEME, spec.urls.join("|"), spec.model)
            }
        }
    }
}

/// Which engine serves the model versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The model folders, on ONNX Runtime.
    Onnx,
    /// A benchmarking aid with no model: `--mock-tokens` tokens every `--mock-interval-ms`.
    Mock,
}

/// Whether ONNX Runtime's intra-op threads spin for work between runs (`--ort-spinning`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Spinning {
    /// On when this process runs one model folder, off when it runs several: spinning threads of
    /// one model take the cores another is computing on.
    Auto,
    On,
    Off,
}

/// Which kernel runs the default model's attention (`--attention-kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttentionKernel {
    /// streamgate's own (AVX-512 / AVX2 where the CPU has them): reads each key/value head once
    /// for all the query heads that share it, and splits long caches between threads.
    Streamgate,
    /// ONNX Runtime's `GroupQueryAttention`.
    Onnxruntime,
}

/// Log levels accepted by `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// streamgate: stream model output to browsers and chat UIs as server-sent events.
#[derive(Debug, Clone, Parser)]
#[command(name = "streamgate", version, about, max_term_width = 100)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "STREAMGATE_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free port; the bound address is logged as `address`).
    #[arg(long, env = "STREAMGATE_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Model versions as VERSION=DIR, each served at /api/VERSION/… from its own loaded model, or
    /// VERSION=openai+URL[|URL…]?model=NAME[&api_key_env=VAR] for remote OpenAI-compatible servers
    /// (tried in order; the key is read from the variable VAR). Repeat the flag, or give a
    /// comma-separated list in the environment variable.
    #[arg(
        long = "model",
        env = "STREAMGATE_MODELS",
        value_delimiter = ',',
        default_value = "v1=.cache/models/smollm2-135m-instruct"
    )]
    pub models: Vec<ModelSpec>,

    /// `onnx` runs the model folders; `mock` is a token source with no model, for measuring the
    /// gateway alone (a benchmarking aid: never use it to serve users).
    #[arg(long, env = "STREAMGATE_ENGINE", value_enum, default_value_t = EngineKind::Onnx)]
    pub engine: EngineKind,

    /// With `--engine mock`: tokens per stream (capped by the request's max_tokens).
    #[arg(long, env = "STREAMGATE_MOCK_TOKENS", default_value_t = 64)]
    pub mock_tokens: usize,

    /// With `--engine mock`: milliseconds before each token (0 = as fast as possible).
    #[arg(long, env = "STREAMGATE_MOCK_INTERVAL_MS", default_value_t = 0)]
    pub mock_interval_ms: u64,

    /// Path of the ONNX Runtime shared library (libonnxruntime.so.1.31.1; `make setup` fetches it).
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = streamgate_inference::runtime::DEFAULT_DYLIB_PATH)]
    pub ort_dylib_path: PathBuf,

    /// ONNX Runtime intra-op threads per model (0 = the machine's cores).
    #[arg(long, env = "STREAMGATE_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// Whether those threads spin between runs (ONNX Runtime's default) or sleep. Spinning starts
    /// a lone model's next step a little sooner for more CPU; two models spinning on the same
    /// cores slow each other down (docs/benchmarks.md). `auto`: on with one model folder, off with
    /// several.
    #[arg(long, env = "STREAMGATE_ORT_SPINNING", value_enum, default_value_t = Spinning::Auto)]
    pub ort_spinning: Spinning,

    /// Generations decoded together per model: the KV pool's slots. Each decode step advances all
    /// of them in one forward pass.
    #[arg(long, env = "STREAMGATE_MAX_ACTIVE_SEQUENCES", default_value_t = 8)]
    pub max_active_sequences: usize,

    /// Requests that may wait for a free generation slot; beyond it, 503 with Retry-After.
    #[arg(long, env = "STREAMGATE_QUEUE_CAPACITY", default_value_t = 16)]
    pub queue_capacity: usize,

    /// Prompt tokens per forward pass: a longer prompt is processed in chunks, between which the
    /// other streams take their decode steps.
    #[arg(long, env = "STREAMGATE_PREFILL_CHUNK", default_value_t = streamgate_inference::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,

    /// While other streams decode, a new prompt's chunk takes about this many decode steps' time,
    /// so their inter-token gaps grow by about that factor while it is admitted; 0 runs whole
    /// --prefill-chunk chunks (fastest admission, longest stalls).
    #[arg(long, env = "STREAMGATE_PREFILL_PACE", default_value_t = streamgate_inference::DEFAULT_PREFILL_PACE)]
    pub prefill_pace: f64,

    /// Make every generation's tokens independent of how many others decode with it (temperature 0
    /// then reproduces exactly under any load). Costs a lone stream about a quarter of its decode
    /// speed: it runs with a padding row, because ONNX Runtime's one-row kernels round differently.
    #[arg(long, env = "STREAMGATE_BATCH_INVARIANT", default_value_t = false)]
    pub batch_invariant: bool,

    /// Run the decode steps and a new prompt's chunks in one forward pass, where the model folder
    /// has the mixed-step graph (model_mixed.onnx, written by `make setup`): running streams slow
    /// down by the chunk's share of a step while a prompt is admitted, instead of waiting for a
    /// pass of its own. Costs a second ONNX Runtime session: about 190 MB more memory for the
    /// default model.
    #[arg(long, env = "STREAMGATE_MIXED_STEPS", default_value_t = false)]
    pub mixed_steps: bool,

    /// The kernel for the fused graph's attention: streamgate's own (decode at long positions
    /// ~1.3-1.5x faster, measured) or ONNX Runtime's. A graph that streamgate's kernel does not
    /// suit (other attention attributes, an Optimum export) uses ONNX Runtime's either way.
    #[arg(long, env = "STREAMGATE_ATTENTION_KERNEL", value_enum, default_value_t = AttentionKernel::Streamgate)]
    pub attention_kernel: AttentionKernel,

    /// Positions per generation, prompt plus output (default: the model's context length, capped
    /// at 4096). Every KV slot holds this many positions, so the pool's memory is
    /// slots x this x the model's KV bytes per position.
    #[arg(long, env = "STREAMGATE_CONTEXT_LENGTH")]
    pub context_length: Option<usize>,

    /// Seconds a generation keeps running after its client disconnected, so that a reconnect
    /// (`Last-Event-ID`, the resume endpoints) continues it; 0 cancels it at once.
    #[arg(long, env = "STREAMGATE_DISCONNECT_GRACE_SECS", default_value_t = 5)]
    pub disconnect_grace_secs: u64,

    /// Seconds a finished stream's events stay readable for a resume.
    #[arg(long, env = "STREAMGATE_STREAM_RETENTION_SECS", default_value_t = 300)]
    pub stream_retention_secs: u64,

    /// Finished streams kept for resumes at most; past it the oldest go first.
    #[arg(long, env = "STREAMGATE_MAX_RETAINED_STREAMS", default_value_t = 1024)]
    pub max_retained_streams: usize,

    /// Where replicas keep what they share: `memory` (this process only: one replica, or sticky
    /// sessions) or a `redis://[:PASSWORD@]HOST[:PORT][/DB]` URL, for one per-client quota across
    /// every replica and resumes that land on any replica. If Redis stops answering, each replica
    /// carries on with its own quotas and streams (see /metrics) until it is back.
    #[arg(long, env = "STREAMGATE_STATE", default_value = "memory", hide_env_values = true)]
    pub state: StateBackend,

    /// Milliseconds a request waits for the shared state backend before this replica decides
    /// alone (its own quota), counted as an outage.
    #[arg(long, env = "STREAMGATE_STATE_TIMEOUT_MS", default_value_t = 250)]
    pub state_timeout_ms: u64,

    /// Prefix of every key streamgate writes in Redis (deployments sharing one Redis each use
    /// their own).
    #[arg(long, env = "STREAMGATE_STATE_KEY_PREFIX", default_value = "streamgate")]
    pub state_key_prefix: String,

    /// Megabytes of finished generations' KV kept so a prompt that starts the same way (a system
    /// prompt, a conversation's earlier turns) is not recomputed; 0 turns prefix reuse off.
    #[arg(long, env = "STREAMGATE_PREFIX_CACHE_MB", default_value_t = streamgate_inference::DEFAULT_PREFIX_CACHE_MB)]
    pub prefix_cache_mb: usize,

    /// Browser origins allowed by CORS, exactly (comma-separated), e.g. https://app.example.com.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// A regular expression for more allowed origins (preview deploys), matched against the whole
    /// origin, e.g. `https://your-project-[a-z0-9-]+\.vercel\.app`.
    #[arg(long, env = "ALLOWED_ORIGIN_REGEX")]
    pub allowed_origin_regex: Option<String>,

    /// Log level of the JSON logs on stdout.
    #[arg(long, env = "STREAMGATE_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Seconds between SSE keep-alive comments while no token is ready (≥ 1).
    #[arg(long, env = "STREAMGATE_SSE_KEEP_ALIVE_SECS", default_value_t = 15)]
    pub sse_keep_alive_secs: u64,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "STREAMGATE_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Largest accepted prompt, in bytes (the token limit is the model's context).
    #[arg(long, env = "STREAMGATE_MAX_PROMPT_BYTES", default_value_t = 32 * 1024)]
    pub max_prompt_bytes: usize,

    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "STREAMGATE_MAX_TOKENS_LIMIT", default_value_t = 1024)]
    pub max_tokens_limit: usize,

    /// `max_tokens` when a request does not say.
    #[arg(long, env = "STREAMGATE_DEFAULT_MAX_TOKENS", default_value_t = 256)]
    pub default_max_tokens: usize,

    /// On SIGTERM/SIGINT, seconds open streams may run before they are ended with an error event.
    #[arg(long, env = "STREAMGATE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// On SIGTERM/SIGINT, seconds to keep accepting connections (readiness already 503) before the
    /// listener closes, so a load balancer stops routing first. Counted inside the drain timeout.
    #[arg(long, env = "STREAMGATE_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,

    /// HTTP worker threads (0 = the machine's cores).
    #[arg(long, env = "STREAMGATE_HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,

    /// Listen backlog: connections the kernel queues before accept (bursts of new streams).
    #[arg(long, env = "STREAMGATE_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// API keys (comma-separated, ≥ 16 characters each). When any key is set (here or in the
    /// file), requests need `Authorization: Bearer <key>` and the key is the rate-limit client.
    #[arg(long, env = "API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,

    /// A file of API keys, one per line (`#` starts a comment).
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Proxies whose X-Forwarded-For / Forwarded headers are believed (comma-separated CIDRs,
    /// e.g. 10.0.0.0/8,127.0.0.1). From any other peer those headers are ignored.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<Cidr>,

    /// IPv6 clients are keyed by this prefix length (one /64 is one client by default).
    #[arg(long, env = "STREAMGATE_IPV6_PREFIX", default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_prefix: u8,

    /// Default per-client rate: COUNT/PERIOD (per s, min, hour), optionally :BURST, or `off`.
    #[arg(long, env = "STREAMGATE_RATE_LIMIT", default_value = "60/min")]
    pub rate_limit: RateRule,

    /// Requests a client may make at once before the rate applies (when a rule gives no :BURST).
    #[arg(long, env = "STREAMGATE_RATE_LIMIT_BURST", default_value = "20")]
    pub rate_limit_burst: NonZeroU32,

    /// Overrides as SCOPE=RULE (repeat, or comma-separate in the variable), SCOPE being a version
    /// (v1), a route kind (stream, complete, other) or both (v1.stream); e.g. v2.stream=120/min:30.
    #[arg(long = "rate-limit-rule", env = "STREAMGATE_RATE_LIMIT_RULES", value_delimiter = ',')]
    pub rate_limit_rules: Vec<ScopedRule>,

    /// Open streams a client may hold at once (0 = no cap).
    #[arg(long, env = "STREAMGATE_MAX_STREAMS_PER_CLIENT", default_value_t = 4)]
    pub max_streams_per_client: usize,

    /// Route patterns exempt from API keys and rate limits (comma-separated).
    #[arg(
        long,
        env = "STREAMGATE_RATE_LIMIT_EXEMPT",
        value_delimiter = ',',
        default_value = "/api/{version}/health/live,/api/{version}/health/ready,/metrics"
    )]
    pub rate_limit_exempt: Vec<String>,

    /// Seconds between sweeps that forget idle clients (keeps limiter memory bounded).
    #[arg(long, env = "STREAMGATE_RATE_LIMIT_EVICT_SECS", default_value_t = 60)]
    pub rate_limit_evict_secs: u64,
}

/// A setting that cannot work, named so the operator knows which one to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {message}")]
pub struct SettingsError {
    pub setting: &'static str,
    pub message: String,
}

impl Settings {
    /// Checks clap cannot express. Returns the compiled origin regex so it is built once.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let fail = |setting: &'static str, message: String| Err(SettingsError { setting, message });
        if self.models.is_empty() {
            return fail("--model / STREAMGATE_MODELS", "at least one VERSION=DIR is required".into());
        }
        let mut versions: Vec<&str> = self.models.iter().map(|m| m.version.as_str()).collect();
        versions.sort_unstable();
        if let Some(w) = versions.windows(2).find(|w| w[0] == w[1]) {
            return fail("--model / STREAMGATE_MODELS", format!("version '{}' is given twice", w[0]));
        }
        for model in &self.models {
            if let ModelSource::Upstream(spec) = &model.source {
                self.upstream_config(spec)?;
            }
        }
        if self.sse_keep_alive_secs == 0 || self.sse_keep_alive_secs > 3600 {
            return fail("--sse-keep-alive-secs / STREAMGATE_SSE_KEEP_ALIVE_SECS", "must be 1..=3600".into());
        }
        if self.max_active_sequences == 0 || self.max_active_sequences > 256 {
            return fail(
                "--max-active-sequences / STREAMGATE_MAX_ACTIVE_SEQUENCES",
                "must be 1..=256".into(),
            );
        }
        if self.queue_capacity == 0 {
            return fail("--queue-capacity / STREAMGATE_QUEUE_CAPACITY", "must be at least 1".into());
        }
        if self.prefill_chunk == 0 || self.prefill_chunk > 8192 {
            return fail("--prefill-chunk / STREAMGATE_PREFILL_CHUNK", "must be 1..=8192".into());
        }
        if self.context_length.is_some_and(|n| !(16..=1_048_576).contains(&n)) {
            return fail("--context-length / STREAMGATE_CONTEXT_LENGTH", "must be 16..=1048576".into());
        }
        if !(0.0..=1000.0).contains(&self.prefill_pace) {
            return fail("--prefill-pace / STREAMGATE_PREFILL_PACE", "must be 0..=1000".into());
        }
        if self.disconnect_grace_secs > 3600 {
            return fail(
                "--disconnect-grace-secs / STREAMGATE_DISCONNECT_GRACE_SECS",
                "must be 0..=3600".into(),
            );
        }
        if self.stream_retention_secs > 86_400 {
            return fail(
                "--stream-retention-secs / STREAMGATE_STREAM_RETENTION_SECS",
                "must be 0..=86400".into(),
            );
        }
        if self.state_timeout_ms == 0 || self.state_timeout_ms > 10_000 {
            return fail("--state-timeout-ms / STREAMGATE_STATE_TIMEOUT_MS", "must be 1..=10000".into());
        }
        let prefix_ok = !self.state_key_prefix.is_empty()
            && self.state_key_prefix.len() <= 64
            && self.state_key_prefix.bytes().all(|b| b.is_ascii_graphic());
        if !prefix_ok {
            return fail(
                "--state-key-prefix / STREAMGATE_STATE_KEY_PREFIX",
                "must be 1 to 64 printable ASCII characters, no spaces".into(),
            );
        }
        if self.prefix_cache_mb > 1 << 20 {
            return fail("--prefix-cache-mb / STREAMGATE_PREFIX_CACHE_MB", "must be at most 1048576".into());
        }
        if self.max_tokens_limit == 0 {
            return fail("--max-tokens-limit / STREAMGATE_MAX_TOKENS_LIMIT", "must be at least 1".into());
        }
        if self.default_max_tokens == 0 || self.default_max_tokens > self.max_tokens_limit {
            return fail(
                "--default-max-tokens / STREAMGATE_DEFAULT_MAX_TOKENS",
                format!("must be 1..={} (the max tokens limit)", self.max_tokens_limit),
            );
        }
        if self.max_body_bytes < 1024 {
            return fail("--max-body-bytes / STREAMGATE_MAX_BODY_BYTES", "must be at least 1024".into());
        }
        if self.max_prompt_bytes == 0 || self.max_prompt_bytes > self.max_body_bytes {
            return fail(
                "--max-prompt-bytes / STREAMGATE_MAX_PROMPT_BYTES",
                "must be at least 1 and at most the max body size".into(),
            );
        }
        for origin in &self.allowed_origins {
            if let Err(message) = crate::http::cors::check_origin_setting(origin) {
                return fail("--allowed-origins / ALLOWED_ORIGINS", message);
            }
        }
        if self.shutdown_delay_secs > self.drain_timeout_secs {
            return fail(
                "--shutdown-delay-secs / STREAMGATE_SHUTDOWN_DELAY_SECS",
                "must not exceed the drain timeout".into(),
            );
        }
        if self.rate_limit_evict_secs == 0 {
            return fail(
                "--rate-limit-evict-secs / STREAMGATE_RATE_LIMIT_EVICT_SECS",
                "must be at least 1".into(),
            );
        }
        if let Err(message) =
            crate::http::client_identity::ApiKeys::load(&self.api_keys, self.api_keys_file.as_deref())
        {
            return fail("--api-keys / API_KEYS / API_KEYS_FILE", message);
        }
        if let Some(pattern) = &self.allowed_origin_regex
            && let Err(e) = crate::http::cors::compile_origin_regex(pattern)
        {
            return fail("--allowed-origin-regex / ALLOWED_ORIGIN_REGEX", e.to_string());
        }
        Ok(())
    }

    /// An upstream version's engine settings, with its API key read from the environment
    /// variable the spec names (a variable that is unset or empty is a start-up error).
    pub fn upstream_config(&self, spec: &UpstreamSpec) -> Result<UpstreamConfig, SettingsError> {
        let api_key = match &spec.api_key_env {
            None => None,
            Some(name) => match std::env::var(name) {
                Ok(key) if !key.trim().is_empty() => Some(key.trim().to_owned()),
                _ => {
                    return Err(SettingsError {
                        setting: "--model / STREAMGATE_MODELS",
                        message: format!("api_key_env names {name}, which is not set (or empty)"),
                    });
                }
            },
        };
        Ok(UpstreamConfig { spec: spec.clone(), api_key })
    }

    pub fn intra_threads_or_cores(&self) -> usize {
        if self.intra_threads > 0 { self.intra_threads } else { available_cores() }
    }

    /// `--ort-spinning` resolved: `auto` spins only when one model folder is loaded.
    pub fn ort_spinning_enabled(&self) -> bool {
        match self.ort_spinning {
            Spinning::On => true,
            Spinning::Off => false,
            Spinning::Auto => {
                self.models.iter().filter(|m| matches!(m.source, ModelSource::Folder(_))).count() <= 1
            }
        }
    }

    pub fn http_workers_or_cores(&self) -> usize {
        if self.http_workers > 0 { self.http_workers } else { available_cores() }
    }

    /// Settings for tests and embedding: the defaults, as if no flag or variable were given.
    pub fn defaults() -> Self {
        Self::parse_from(["streamgate"])
    }
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut all = vec!["streamgate"];
        all.extend_from_slice(args);
        Settings::try_parse_from(all).map_err(|e| e.to_string())
    }

    #[test]
    fn model_specs_parse_and_repeat() {
        let s = parse(&["--model", "v1=models/a", "--model", "v2=models/b"])
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            s.models.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            ["v1=models/a", "v2=models/b"]
        );
        assert!(s.validate().is_ok());
        let up = parse(&["--model", "v3=openai+http://gpu-1:8000/v1|http://gpu-2:8000/v1?model=llama"])
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(
            matches!(&up.models[0].source, ModelSource::Upstream(s) if s.urls.len() == 2 && s.model == "llama")
        );
        assert_eq!(
            up.models[0].to_string(),
            "v3=openai+http://gpu-1:8000/v1|http://gpu-2:8000/v1?model=llama"
        );
        assert!(parse(&["--model", "v3=openai+http://gpu/v1"]).is_err_and(|e| e.contains("model=NAME")));
        let unset =
            parse(&["--model", "v3=openai+http://gpu/v1?model=m&api_key_env=STREAMGATE_TEST_SURELY_UNSET"])
                .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(unset.validate().is_err_and(|e| e.message.contains("STREAMGATE_TEST_SURELY_UNSET")));
    }

    #[test]
    fn spinning_is_on_for_one_model_folder_and_off_for_several() {
        let spins = |args: &[&str]| {
            parse(args).map(|s| s.ort_spinning_enabled()).unwrap_or_else(|e| unreachable!("{e}"))
        };
        assert!(spins(&["--model", "v1=models/a"]));
        assert!(!spins(&["--model", "v1=models/a", "--model", "v2=models/b"]));
        // A remote upstream runs no ONNX Runtime threads here.
        assert!(spins(&["--model", "v1=models/a", "--model", "v2=openai+http://gpu/v1?model=m"]));
        assert!(spins(&["--model", "v1=models/a", "--model", "v2=models/b", "--ort-spinning", "on"]));
        assert!(!spins(&["--model", "v1=models/a", "--ort-spinning", "off"]));
        assert!(parse(&["--ort-spinning", "sometimes"]).is_err());
    }

    #[test]
    fn bad_values_name_the_setting() {
        assert!(parse(&["--model", "nonsense"]).is_err_and(|e| e.contains("VERSION=DIR")));
        assert!(parse(&["--model", "V1=x"]).is_err_and(|e| e.contains("lowercase")));
        assert!(parse(&["--port", "70000"]).is_err_and(|e| e.contains("--port")));
        let dup = parse(&["--model", "v1=a", "--model", "v1=b"]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(dup.validate().is_err_and(|e| e.setting.contains("--model") && e.message.contains("twice")));
        let regex =
            parse(&["--allowed-origin-regex", "https://(unclosed"]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(regex.validate().is_err_and(|e| e.setting.contains("ALLOWED_ORIGIN_REGEX")));
        let origin = parse(&["--allowed-origins", "example.com"]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(origin.validate().is_err_and(|e| e.setting.contains("ALLOWED_ORIGINS")));
        let tokens = parse(&["--default-max-tokens", "5000"]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(tokens.validate().is_err_and(|e| e.setting.contains("--default-max-tokens")));
        let keep_alive = parse(&["--sse-keep-alive-secs", "0"]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(keep_alive.validate().is_err());
        assert!(parse(&["--state", "redis:/nohost"]).is_err_and(|e| e.contains("--state")));
        let prefix = parse(&["--state-key-prefix", "a b"]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(prefix.validate().is_err_and(|e| e.setting.contains("--state-key-prefix")));
    }

    #[test]
    fn defaults_are_valid() {
        assert!(Settings::defaults().validate().is_ok());
    }
}
