//! The connection to the shared state (Redis): the `--state` setting, the backend's health (a
//! probe that is also this replica's heartbeat), the key layout, and the one writer task that
//! copies every shared stream's events out, a pipelined batch per round trip.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytestring::ByteString;
use prometheus::{IntCounterVec, IntGauge};
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use slog::{Logger, info, warn};
use tokio::sync::mpsc;

use crate::http::client_identity::ClientKey;
use crate::metrics::Metrics;
use crate::sse::DONE;
use crate::streams::StreamId;

/// Where replicas keep what they share (`--state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateBackend {
    /// In this process only (the default): one replica, or sticky sessions.
    Memory,
    /// A Redis server every replica reaches, as a `redis://` URL.
    Redis(String),
}

impl FromStr for StateBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("memory") {
            return Ok(Self::Memory);
        }
        if s.starts_with("rediss://") {
            return Err("rediss:// (TLS) is not built in: reach Redis over a private network or a TLS sidecar, with redis://".into());
        }
        if !s.starts_with("redis://") && !s.starts_with("redis+unix://") && !s.starts_with("unix://") {
            return Err(format!("'{}' is neither `memory` nor a redis:// URL", redact(s)));
        }
        redis::Client::open(s).map_err(|e| format!("'{}' is not a Redis URL: {e}", redact(s)))?;
        Ok(Self::Redis(s.to_owned()))
    }
}

impl fmt::Display for StateBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(url) => f.write_str(&redact(url)),
        }
    }
}

/// A URL with any password replaced by `***` (for logs and errors).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// What the shared state needs to know of the settings.
#[derive(Debug, Clone)]
pub struct SharedStateConfig {
    pub url: String,
    /// Longest wait for one command before this replica decides alone.
    pub timeout: Duration,
    /// Every key starts with this and a colon.
    pub key_prefix: String,
    /// `--disconnect-grace-secs`.
    pub grace: Duration,
    /// `--stream-retention-secs`.
    pub retention: Duration,
}

/// This replica's connection to the shared state.
pub struct Replicas {
    pub(super) client: redis::Client,
    pub(super) conn: ConnectionManager,
    pub(super) config: SharedStateConfig,
    /// This replica's id (its heartbeat key says it is alive).
    pub(super) replica: String,
    up: AtomicBool,
    up_gauge: IntGauge,
    pub(super) errors: IntCounterVec,
    logger: Logger,
    pub(super) mirror: mpsc::UnboundedSender<MirrorOp>,
    /// Events queued for the writer; past [`MAX_QUEUED_EVENTS`] more are dropped (counted).
    pub(super) queued: Arc<AtomicUsize>,
}

/// One write for the event writer.
pub enum MirrorOp {
    /// A new stream: its hash (and the AI SDK chat pointing at it).
    Register { id: StreamId, fields: Vec<(&'static str, String)>, chat: Option<String> },
    /// Event `seq` of stream `id`.
    Event { id: StreamId, seq: usize, data: ByteString },
    /// The generation was cancelled: forget it, as this replica does.
    Cancelled { id: StreamId },
}

/// Events waiting for the writer at most (a replica producing events faster than Redis takes
/// them must not grow without bound): past it, events are not copied to Redis — their streams
/// still resume on this replica; elsewhere a reader sees the gap and ends them with an error.
pub(super) const MAX_QUEUED_EVENTS: usize = 65_536;
/// Ops written per round trip at most.
pub(super) const WRITE_BATCH: usize = 512;
/// A running stream's keys outlive the retention window by this much (a generation that runs
/// longer keeps being resumable here; its keys are renewed with every event).
const RUNNING_EXTRA: Duration = Duration::from_secs(3600);
/// A finished stream's keys live at least this long, so a reader still gets `[DONE]`.
const FINISHED_MIN: Duration = Duration::from_secs(5);

/// How often the probe pings Redis and renews this replica's heartbeat.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A replica whose heartbeat is this old is gone (its streams cannot continue).
const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

impl Replicas {
    /// Set up the connection (lazily: Redis may be down now) and start the probe and the event
    /// writer on the current actix system. Must run inside one.
    pub fn start(config: SharedStateConfig, metrics: &Metrics, logger: &Logger) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| format!("--state: '{}' is not a Redis URL: {e}", redact(&config.url)))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| format!("--state: {e}"))?;
        let (mirror, writes) = mpsc::unbounded_channel();
        let replica = format!("{:016x}", rand::rng().random::<u64>());
        let logger = logger.new(slog::o!("state" => "redis"));
        let this = Arc::new(Self {
            client,
            conn,
            config,
            replica,
            up: AtomicBool::new(true),
            up_gauge: metrics.state_backend_up.clone(),
            errors: metrics.state_errors.clone(),
            logger,
            mirror,
            queued: Arc::default(),
        });
        info!(this.logger, "shared state backend"; "url" => redact(&this.config.url), "replica" => &this.replica);
        actix_web::rt::spawn(Arc::clone(&this).probe());
        actix_web::rt::spawn(Arc::clone(&this).write_events(writes));
        Ok(this)
    }

    /// Whether Redis answered the last command (while it does not, nothing waits on it).
    pub fn healthy(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(super) fn key(&self, parts: fmt::Arguments<'_>) -> String {
        format!("{}:{parts}", self.config.key_prefix)
    }

    fn answered(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.up_gauge.set(1);
            info!(self.logger, "shared state backend answers again: quotas and streams are shared");
        }
    }

    pub(super) fn failed(&self, op: &'static str, error: &dyn fmt::Display) {
        self.errors.with_label_values(&[op]).inc();
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_gauge.set(0);
            warn!(self.logger, "shared state backend unavailable: this replica uses its own quotas and resumes only its own streams";
                "op" => op, "error" => error.to_string());
        }
    }

    /// Run `command` on the shared connection within the timeout; `None` (and the backend marked
    /// down) when Redis does not answer in time.
    pub(super) async fn run<T, F>(
        &self,
        op: &'static str,
        command: impl FnOnce(ConnectionManager) -> F,
    ) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match actix_web::rt::time::timeout(self.config.timeout, command(self.conn.clone())).await {
            Ok(Ok(value)) => {
                self.answered();
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(op, &e);
                None
            }
            Err(_) => {
                self.failed(op, &"timed out");
                None
            }
        }
    }

    pub(super) fn stream_key(&self, id: StreamId, part: &str) -> String {
        self.key(format_args!("stream:{id}:{part}"))
    }

    pub(super) fn chat_key(&self, owner: Option<ClientKey>, version: &str, chat: &str) -> String {
        self.key(format_args!("chat:{}:{version}:{chat}", owner_id(owner)))
    }

    fn running_ttl(&self) -> u64 {
        millis(self.config.retention + RUNNING_EXTRA)
    }

    /// The writer: every queued write, in order, a batch per round trip. While Redis is down the
    /// writes are dropped (counted): those streams resume only on this replica.
    async fn write_events(self: Arc<Self>, mut writes: mpsc::UnboundedReceiver<MirrorOp>) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while writes.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            let events = batch.iter().filter(|op| matches!(op, MirrorOp::Event { .. })).count();
            self.queued.fetch_sub(events, Ordering::Relaxed);
            if self.healthy() {
                let pipe = self.pipeline(&batch);
                self.run("stream_write", |mut conn| async move { pipe.query_async::<()>(&mut conn).await })
                    .await;
            } else {
                self.errors.with_label_values(&["stream_write_skipped"]).inc_by(batch.len() as u64);
            }
            batch.clear();
        }
    }

    /// One round trip for a batch: each stream's events in it go into one stream entry (id
    /// `0-SEQ` of its last event, one field per event: `SEQ` → data), so a busy replica writes a
    /// few entries per round trip rather than one per token.
    fn pipeline(&self, batch: &[MirrorOp]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let mut runs: Vec<(StreamId, Vec<(usize, &ByteString)>)> = Vec::new();
        for op in batch {
            match op {
                MirrorOp::Event { id, seq, data } => match runs.iter_mut().find(|(r, _)| r == id) {
                    Some((_, events)) => events.push((*seq, data)),
                    None => runs.push((*id, vec![(*seq, data)])),
                },
                MirrorOp::Register { id, fields, chat } => {
                    self.flush(&mut pipe, &mut runs, *id);
                    let meta = self.stream_key(*id, "meta");
                    pipe.cmd("HSET").arg(&meta).arg(fields.as_slice()).ignore();
                    pipe.cmd("PEXPIRE").arg(&meta).arg(self.running_ttl()).ignore();
                    if let Some(chat) = chat {
                        pipe.cmd("SET")
                            .arg(chat)
                            .arg(id.to_string())
                            .arg("PX")
                            .arg(self.running_ttl())
                            .ignore();
                    }
                }
                MirrorOp::Cancelled { id } => {
                    self.flush(&mut pipe, &mut runs, *id);
                    pipe.cmd("DEL")
                        .arg(self.stream_key(*id, "meta"))
                        .arg(self.stream_key(*id, "events"))
                        .ignore();
                }
            }
        }
        for (id, events) in runs {
            self.write_run(&mut pipe, id, &events);
        }
        pipe
    }

    /// Write stream `id`'s pending events now (before an op that must follow them).
    fn flush(
        &self,
        pipe: &mut redis::Pipeline,
        runs: &mut Vec<(StreamId, Vec<(usize, &ByteString)>)>,
        id: StreamId,
    ) {
        if let Some(at) = runs.iter().position(|(r, _)| *r == id) {
            let (_, events) = runs.remove(at);
            self.write_run(pipe, id, &events);
        }
    }

    fn write_run(&self, pipe: &mut redis::Pipeline, id: StreamId, events: &[(usize, &ByteString)]) {
        let Some(&(last, _)) = events.last() else { return };
        let key = self.stream_key(id, "events");
        let xadd = pipe.cmd("XADD").arg(&key).arg(format!("0-{last}"));
        for (seq, data) in events {
            xadd.arg(*seq).arg(&***data);
        }
        xadd.ignore();
        if events.iter().any(|(_, data)| &***data == DONE) {
            let finished = millis(self.config.retention.max(FINISHED_MIN));
            let meta = self.stream_key(id, "meta");
            pipe.cmd("HSET").arg(&meta).arg("done").arg(1).ignore();
            pipe.cmd("PEXPIRE").arg(&meta).arg(finished).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(finished).ignore();
        } else {
            pipe.cmd("PEXPIRE").arg(&key).arg(self.running_ttl()).ignore();
        }
    }

    /// Every second: renew this replica's heartbeat (which is also the health check).
    async fn probe(self: Arc<Self>) {
        let key = self.key(format_args!("replica:{}", self.replica));
        let ttl = HEARTBEAT_TTL.as_millis() as u64;
        let mut every = actix_web::rt::time::interval(PROBE_EVERY);
        loop {
            every.tick().await;
            let key = key.clone();
            self.run("probe", |mut conn| async move {
                redis::cmd("SET").arg(key).arg(1).arg("PX").arg(ttl).query_async::<()>(&mut conn).await
            })
            .await;
        }
    }
}

pub(super) fn owner_id(owner: Option<ClientKey>) -> String {
    owner.map_or_else(|| "-".to_owned(), |k| k.stable_id())
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_and_passwords_never_show() {
        assert_eq!("memory".parse::<StateBackend>(), Ok(StateBackend::Memory));
        assert_eq!(
            "redis://127.0.0.1:6379/0".parse::<StateBackend>(),
            Ok(StateBackend::Redis("redis://127.0.0.1:6379/0".into()))
        );
        let secret = "redis://:hunter2@cache:6379".parse::<StateBackend>();
        assert!(secret.as_ref().is_ok_and(|b| !b.to_string().contains("hunter2")), "{secret:?}");
        for bad in ["", "redis", "http://cache:6379", "postgres://x", "redis://cache:notaport"] {
            let refused = bad.parse::<StateBackend>();
            assert!(refused.is_err(), "{bad}: {refused:?}");
        }
        assert!("rediss://cache".parse::<StateBackend>().is_err_and(|e| e.contains("TLS")));
        assert!("http://:pw@x".parse::<StateBackend>().is_err_and(|e| !e.contains("pw")));
    }
}
