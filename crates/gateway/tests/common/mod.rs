//! Helpers for the gateway's tests: the real binary on 127.0.0.1:0 (end-to-end), the in-process
//! app over the tiny model (route tests), and an SSE reader for the wire format.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::web;
use streamgate_gateway::logging::discard_logger;
use streamgate_gateway::model_registry::ModelRegistry;
use streamgate_gateway::settings::Settings;
use streamgate_gateway::state::AppState;
use streamgate_inference::{EngineConfig, Generator, OnnxEngine};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tiny_model() -> PathBuf {
    repo_root().join("models/tiny-llama")
}

pub fn smollm2() -> PathBuf {
    let dir = repo_root().join(".cache/models/smollm2-135m-instruct");
    assert!(dir.join("model.onnx").is_file(), "{} is missing: run `make setup`", dir.display());
    dir
}

pub fn ort_dylib() -> PathBuf {
    repo_root().join(streamgate_inference::runtime::DEFAULT_DYLIB_PATH)
}

/// Settings as the binary would parse them from `args`.
pub fn settings(args: &[&str]) -> Settings {
    use clap::Parser;
    let mut all = vec!["streamgate"];
    all.extend_from_slice(args);
    let s = Settings::parse_from(all);
    s.validate().expect("valid test settings");
    s
}

/// In-process state over the tiny model, served as v1 and v2, with the given settings. Rate
/// limits and the stream cap are off unless `args` set them (the limit tests do).
pub fn tiny_state(args: &[&str]) -> web::Data<AppState> {
    tiny_state_with_logger(args, discard_logger())
}

/// A buffer the JSON logger writes into, for tests that read the logs.
#[derive(Clone, Default)]
pub struct LogBuffer(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Like [`tiny_state`], with JSON logs captured synchronously into the returned buffer.
pub fn tiny_state_logged(args: &[&str]) -> (web::Data<AppState>, LogBuffer) {
    use slog::Drain;
    let buffer = LogBuffer::default();
    let drain = Mutex::new(slog_json::Json::new(buffer.clone()).add_default_keys().build()).fuse();
    (tiny_state_with_logger(args, slog::Logger::root(drain, slog::o!())), buffer)
}

fn tiny_state_with_logger(args: &[&str], logger: slog::Logger) -> web::Data<AppState> {
    let mut all: Vec<&str> = args.to_vec();
    for (flag, off) in [("--rate-limit", "off"), ("--max-streams-per-client", "0")] {
        if !args.contains(&flag) {
            all.extend([flag, off]);
        }
    }
    let mut s = settings(&all);
    s.ort_dylib_path = ort_dylib();
    let mut models = ModelRegistry::new();
    for version in ["v1", "v2"] {
        let engine = OnnxEngine::start(&EngineConfig {
            max_active: s.max_active_sequences,
            queue_capacity: s.queue_capacity,
            prefix_cache_mb: 64,
            ..EngineConfig::new(tiny_model(), ort_dylib())
        })
        .expect("tiny model loads (run `make setup`)");
        models.insert(version, Arc::new(engine) as Arc<dyn Generator>);
    }
    web::Data::new(AppState::new(s, models, logger).expect("state"))
}

/// The `data:` payloads of an SSE body, in order (comments skipped).
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The real `streamgate` binary, killed on drop. Its JSON log lines are collected.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Server {
    /// Start with `args` (plus `--port 0`) and wait for the `listening` log line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .args(["--host", "127.0.0.1", "--port", "0", "--ort-dylib-path"])
            .arg(ort_dylib())
            .args(args)
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn streamgate");
        let stdout = child.stdout.take().expect("stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                    panic!("log line is not JSON: {line}");
                };
                if value["msg"] == "listening" {
                    let _ = tx.send(value["address"].as_str().unwrap_or_default().to_owned());
                }
                sink.lock().unwrap().push(value);
            }
        });
        let address = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!("server did not start: {}", String::from_utf8_lossy(&out.stderr));
            }
        };
        Server { child, base: format!("http://{address}"), logs }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log records with this `msg`.
    pub fn logs_with(&self, msg: &str) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().iter().filter(|v| v["msg"] == msg).cloned().collect()
    }

    /// Wait (bounded) for a `request` log line for `path`: it is written when the response body
    /// ends, which may be just after the client has read the last event.
    pub fn request_log(&self, path: &str) -> serde_json::Value {
        for _ in 0..200 {
            if let Some(line) = self.logs_with("request").into_iter().find(|l| l["path"] == path) {
                return line;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("no request log line for {path}");
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").args(["-s", name, &self.pid().to_string()]).status().expect("kill");
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP client for tests: awc with a long timeout (streams last seconds).
pub fn client() -> awc::Client {
    awc::Client::builder().timeout(Duration::from_secs(120)).finish()
}

/// Read an SSE response incrementally: yields each `data:` payload as it arrives.
pub struct SseReader<S> {
    body: S,
    buffer: String,
    /// The `id:` of the last event read that had one (what `EventSource` sends as `Last-Event-ID`).
    pub last_id: Option<String>,
}

impl<S> SseReader<S>
where
    S: futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
{
    pub fn new(body: S) -> Self {
        Self { body, buffer: String::new(), last_id: None }
    }

    /// The next `data:` payload, or `None` at the end of the body.
    pub async fn next_data(&mut self) -> Option<String> {
        use futures_util::StreamExt;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if let Some(id) = event.lines().find_map(|l| l.strip_prefix("id: ")) {
                    self.last_id = Some(id.to_owned());
                }
                let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                if !data.is_empty() {
                    return Some(data.join("\n"));
                }
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buffer.push_str(std::str::from_utf8(&bytes).expect("utf-8 SSE")),
                Some(Err(e)) => panic!("stream error: {e}"),
                None => return None,
            }
        }
    }

    /// Every remaining payload.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(d) = self.next_data().await {
            all.push(d);
        }
        all
    }
}

/// A value from the Prometheus text at /metrics (first sample whose line starts with `prefix`).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// A real `redis-server` (Debian's package; `make test` installs it) on a free loopback port,
/// with no persistence, stopped on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = RedisServer { child: None, port };
        redis.restart();
        redis
    }

    /// The URL for `--state`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start it (again, on the same port) and wait until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make test installs Debian's redis-server)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Stop it now (the gateways lose their shared state).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A command run against it, for checks.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut conn = redis::Client::open(self.url()).unwrap().get_connection().unwrap();
        cmd.query(&mut conn).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
