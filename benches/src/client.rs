//! A minimal HTTP/1.1 client for SSE load: one request per connection, chunked decoding, and
//! `data:` events timed as they arrive. Hand-written on tokio sockets so that 10,000 concurrent
//! streams cost little on the client side.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which wire protocol to speak (and how to recognise a token event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Route {
    /// `POST /api/v1/inference/stream` (native events; the FastAPI baseline serves the same).
    Native,
    /// `GET /api/v1/inference/stream?prompt=…` (what EventSource sends).
    NativeGet,
    /// `POST /v1/chat/completions` with `stream: true`.
    Openai,
    /// `POST /api/v1/chat` (AI SDK UI message stream).
    AiSdk,
}

impl Route {
    fn is_token(self, data: &str) -> bool {
        match self {
            Route::Native | Route::NativeGet => data.starts_with("{\"index\""),
            Route::Openai => data.contains("\"delta\":{\"content\":"),
            Route::AiSdk => data.contains("\"type\":\"text-delta\""),
        }
    }

    /// The raw request for one stream (`keep_alive`: the connection may carry the next one;
    /// `temperature`: sent when given, else the server's default applies).
    pub fn request(
        self,
        host: &str,
        version: &str,
        prompt: &str,
        max_tokens: usize,
        temperature: Option<f64>,
        keep_alive: bool,
    ) -> Vec<u8> {
        let json = |mut v: serde_json::Value| {
            if let (Some(t), Some(fields)) = (temperature, v.as_object_mut()) {
                fields.insert("temperature".to_owned(), serde_json::json!(t));
            }
            v.to_string()
        };
        let (method, path, body) = match self {
            Route::Native => (
                "POST",
                format!("/api/{version}/inference/stream"),
                Some(json(serde_json::json!({"prompt": prompt, "max_tokens": max_tokens}))),
            ),
            Route::NativeGet => {
                let q: String = prompt
                    .bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }
                    })
                    .collect();
                let t = temperature.map(|t| format!("&temperature={t}")).unwrap_or_default();
                (
                    "GET",
                    format!("/api/{version}/inference/stream?prompt={q}&max_tokens={max_tokens}{t}"),
                    None,
                )
            }
            Route::Openai => (
                "POST",
                "/v1/chat/completions".to_owned(),
                Some(json(serde_json::json!({"model": version, "stream": true, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": prompt}]}))),
            ),
            Route::AiSdk => (
                "POST",
                format!("/api/{version}/chat"),
                Some(json(serde_json::json!({"max_tokens": max_tokens,
                    "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": prompt}]}]}))),
            ),
        };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nConnection: {}\r\n",
            if keep_alive { "keep-alive" } else { "close" }
        );
        if let Some(body) = &body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        req.into_bytes()
    }
}

/// What one stream did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamResult {
    /// Seconds from the start of the run to the request.
    pub started_s: f64,
    pub status: u16,
    pub ttft_ms: Option<f64>,
    /// Gaps between consecutive token events.
    pub gaps_ms: Vec<f32>,
    pub tokens: usize,
    pub done: bool,
    pub error: Option<String>,
    pub duration_ms: f64,
}

/// A connection kept open between streams (HTTP/1.1 keep-alive), with bytes already read.
pub struct Connection {
    socket: TcpStream,
    leftover: Vec<u8>,
}

/// Run one stream to its end (or `deadline`), timing each token event. An open connection in
/// `conn` is reused and, when the response allows, left there for the next stream.
pub async fn run_stream(
    conn: &mut Option<Connection>,
    addr: &str,
    request: &[u8],
    route: Route,
    run_start: Instant,
    deadline: Instant,
) -> StreamResult {
    let started = Instant::now();
    let mut result = StreamResult { started_s: (started - run_start).as_secs_f64(), ..Default::default() };
    let reused = conn.take();
    match tokio::time::timeout_at(
        deadline.into(),
        stream_inner(reused, addr, request, route, started, &mut result),
    )
    .await
    {
        Ok(Ok(kept)) => *conn = kept,
        Ok(Err(e)) => result.error = Some(e),
        Err(_) => result.error = Some("timed out".into()),
    }
    result.duration_ms = started.elapsed().as_secs_f64() * 1e3;
    result
}

async fn stream_inner(
    conn: Option<Connection>,
    addr: &str,
    request: &[u8],
    route: Route,
    started: Instant,
    out: &mut StreamResult,
) -> Result<Option<Connection>, String> {
    let (mut socket, mut raw) = match conn {
        Some(c) => (c.socket, c.leftover),
        None => {
            let socket = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            socket.set_nodelay(true).map_err(|e| e.to_string())?;
            (socket, Vec::with_capacity(8192))
        }
    };
    socket.write_all(request).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 16384];
    // Status line and headers.
    let header_end = loop {
        if let Some(pos) = find(&raw, b"\r\n\r\n") {
            break pos;
        }
        let n = socket.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before the response".into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..header_end]).to_ascii_lowercase();
    out.status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.contains("transfer-encoding: chunked");
    let keep = !head.contains("connection: close");
    raw.drain(..header_end + 4);
    if out.status != 200 {
        // Error bodies are small and length-delimited; the connection is not reused.
        return Ok(None);
    }
    let mut body: Vec<u8> = Vec::with_capacity(8192);
    let mut last_token: Option<Instant> = None;
    loop {
        let finished = if chunked {
            decode_chunks(&mut raw, &mut body)?
        } else {
            body.append(&mut raw);
            false
        };
        while let Some(end) = find(&body, b"\n\n") {
            let event = String::from_utf8_lossy(&body[..end]).into_owned();
            body.drain(..end + 2);
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    out.done = true;
                    if !(chunked && keep) {
                        return Ok(None);
                    }
                }
                if data.starts_with("{\"error\"") || data.contains("\"type\":\"error\"") {
                    out.error = Some(data.to_owned());
                } else if route.is_token(data) {
                    let now = Instant::now();
                    match last_token {
                        None => out.ttft_ms = Some((now - started).as_secs_f64() * 1e3),
                        Some(prev) => out.gaps_ms.push((now - prev).as_secs_f32() * 1e3),
                    }
                    last_token = Some(now);
                    out.tokens += 1;
                }
            }
        }
        if finished {
            // The body ended cleanly: the connection can carry the next request.
            return Ok((keep && out.done).then_some(Connection { socket, leftover: raw }));
        }
        let n = socket.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Move every complete chunk from `raw` into `out`; `Ok(true)` after the last (zero) chunk.
pub fn decode_chunks(raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<bool, String> {
    let mut at = 0;
    let finished = loop {
        let Some(line_end) = find(&raw[at..], b"\r\n") else { break false };
        let size_str = std::str::from_utf8(&raw[at..at + line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_str:?}"))?;
        let data_start = at + line_end + 2;
        if size == 0 {
            // The last chunk, then the CRLF that ends the (trailer-less) body.
            if raw.len() < data_start + 2 {
                break false;
            }
            at = data_start + 2;
            break true;
        }
        if raw.len() < data_start + size + 2 {
            break false;
        }
        out.extend_from_slice(&raw[data_start..data_start + size]);
        at = data_start + size + 2;
    };
    raw.drain(..at);
    Ok(finished)
}

/// CPU seconds (user + system) and resident KiB of a process and all its descendants, from
/// /proc (a server with worker processes, like uvicorn with `--workers 2`, is counted whole).
pub fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let (mut cpu, mut rss) = one_process_usage(pid)?;
    let mut stack = children(pid);
    let mut seen = 0;
    while let Some(child) = stack.pop() {
        seen += 1;
        if seen > 4096 {
            break;
        }
        if let Some((c, r)) = one_process_usage(child) {
            cpu += c;
            rss += r;
        }
        stack.extend(children(child));
    }
    Some((cpu, rss))
}

/// Direct children of `pid` (from every thread's `children` list).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

fn one_process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name "(...)": state is field 3; utime/stime are fields 14/15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks / clock_ticks_per_second(), rss))
}

/// USER_HZ: 100 on Linux on every architecture streamgate targets.
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// A `Duration` as fractional milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_decode_across_reads() {
        let mut raw = b"5\r\nhello\r\n6\r\n world\r\n0".to_vec();
        let mut out = Vec::new();
        assert_eq!(decode_chunks(&mut raw, &mut out), Ok(false));
        assert_eq!(out, b"hello world");
        raw.extend_from_slice(b"\r\n");
        assert_eq!(decode_chunks(&mut raw, &mut out), Ok(false), "waits for the CRLF ending the body");
        raw.extend_from_slice(b"\r\n");
        assert_eq!(decode_chunks(&mut raw, &mut out), Ok(true));
        assert!(raw.is_empty(), "nothing of the next response is consumed");
        let mut partial = b"a\r\n01234".to_vec();
        assert_eq!(decode_chunks(&mut partial, &mut out), Ok(false));
        assert_eq!(partial, b"a\r\n01234", "an incomplete chunk waits for more bytes");
        assert!(decode_chunks(&mut b"zz\r\n".to_vec(), &mut out).is_err());
    }

    #[test]
    fn token_events_are_recognised_per_protocol() {
        assert!(Route::Native.is_token(r#"{"index":0,"text":"a"}"#));
        assert!(!Route::Native.is_token(r#"{"finish_reason":"stop"}"#));
        assert!(Route::Openai.is_token(r#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#));
        assert!(Route::AiSdk.is_token(r#"{"type":"text-delta","id":"t","delta":"a"}"#));
    }

    #[test]
    fn process_usage_counts_child_processes() {
        let own = process_usage(std::process::id()).map(|(_, rss)| rss);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap_or_else(|e| unreachable!("cannot run sleep: {e}"));
        let with_child = process_usage(std::process::id()).map(|(_, rss)| rss);
        let _ = child.kill();
        let _ = child.wait();
        assert!(own.is_some() && with_child > own, "{own:?} then {with_child:?}");
    }
}
