//! The upstream engine against recorded streams: each fixture under `tests/fixtures/upstream/` is
//! what vLLM, TGI's Messages API, llama.cpp's server and the OpenAI API send for a streamed chat
//! completion (written from their documented formats), served by a minimal HTTP server on a free
//! port in bytes split at awkward places; plus malformed streams that must end in an error item,
//! never a panic or a hang.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use streamgate_inference::upstream::{UpstreamConfig, UpstreamEngine, UpstreamSpec};
use streamgate_inference::{
    ChatMessage, FinishReason, GenerationEvent, GenerationRequest, Generator, InferenceError, SamplingParams,
    Usage,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `body` in pieces of `split` bytes.
fn pieces(body: &[u8], split: usize) -> Vec<Vec<u8>> {
    body.chunks(split.max(1)).map(<[u8]>::to_vec).collect()
}

/// Serve one response per connection: `head` then each piece of the body (a pause between
/// them), then close. Returns the base URL and the requests received.
fn serve(
    head: &'static str,
    body: Vec<Vec<u8>>,
    connections: usize,
) -> (String, std::sync::mpsc::Receiver<String>) {
    serve_gated(head, body, connections, None)
}

/// [`serve`], holding back everything after the first piece until `gate` fires (so a test can
/// make sure the client has read the first event before the rest arrives).
fn serve_gated(
    head: &'static str,
    body: Vec<Vec<u8>>,
    connections: usize,
    gate: Option<std::sync::mpsc::Receiver<()>>,
) -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let mut stream = stream.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head and the Content-Length body.
            loop {
                let n = stream.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
            let _ = stream.write_all(head.as_bytes());
            for (n, piece) in body.iter().enumerate() {
                if n == 1
                    && let Some(gate) = &gate
                {
                    let _ = gate.recv_timeout(Duration::from_secs(10));
                }
                if stream.write_all(piece).is_err() {
                    break;
                }
                let _ = stream.flush();
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    (base, rx)
}

const OK_HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";

fn engine(urls: &[&str]) -> UpstreamEngine {
    let spec = format!("openai+{}?model=test-model&first_byte_timeout_ms=3000", urls.join("|"));
    let spec = UpstreamSpec::parse(&spec).unwrap();
    UpstreamEngine::start(UpstreamConfig { spec, api_key: Some("sk-test".into()) }).unwrap()
}

fn chat_request() -> GenerationRequest {
    GenerationRequest::new("user: Hi\n", 16, SamplingParams::default(), vec![])
        .unwrap()
        .with_messages(vec![ChatMessage::new("user", "Hi")])
}

/// (answer text, reasoning text, finish, usage, error) of one whole stream.
async fn run(
    engine: &UpstreamEngine,
) -> Result<(String, String, Option<(FinishReason, Usage)>, Option<String>), InferenceError> {
    run_then(engine, || ()).await
}

/// [`run`], calling `started` once the stream is handed over (its first event has arrived).
async fn run_then(
    engine: &UpstreamEngine,
    started: impl FnOnce(),
) -> Result<(String, String, Option<(FinishReason, Usage)>, Option<String>), InferenceError> {
    let mut stream = engine.generate(chat_request()).await?;
    started();
    let (mut text, mut reasoning, mut finish, mut error) = (String::new(), String::new(), None, None);
    let mut indices = Vec::new();
    while let Some(event) =
        tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("no hang")
    {
        match event {
            Ok(GenerationEvent::Token { index, text: t, .. }) => {
                indices.push(index);
                text.push_str(&t);
            }
            Ok(GenerationEvent::Reasoning { text: t }) => reasoning.push_str(&t),
            Ok(GenerationEvent::Finished { reason, usage }) => finish = Some((reason, usage)),
            Err(e) => error = Some(e.to_string()),
        }
    }
    assert_eq!(indices, (0..indices.len()).collect::<Vec<_>>(), "token indices count from 0");
    Ok((text, reasoning, finish, error))
}

#[tokio::test]
async fn recorded_streams_of_four_servers_parse_into_the_right_events() {
    let usage = |p, c| Usage { prompt_tokens: p, completion_tokens: c };
    let cases = [
        ("vllm.sse", "Hello there!", "The user greets me.", FinishReason::Stop, usage(12, 9)),
        ("tgi.sse", "Deep learning is", "", FinishReason::Length, usage(15, 3)),
        ("llamacpp.sse", "Bonjour à tous", "", FinishReason::Stop, usage(9, 3)),
        ("openai.sse", "Hi 👋", "", FinishReason::Stop, usage(8, 2)),
        ("quirks.sse", "ABCD", "", FinishReason::Stop, usage(0, 4)),
    ];
    for (name, text, reasoning, reason, usage) in cases {
        for split in [1, 7, 4096] {
            let (base, requests) = serve(OK_HEAD, pieces(&fixture(name), split), 1);
            let got = run(&engine(&[&base])).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                got,
                (text.to_owned(), reasoning.to_owned(), Some((reason, usage)), None),
                "{name} split {split}"
            );
            let request = requests.recv().unwrap();
            assert!(request.starts_with("POST /v1/chat/completions "), "{request}");
            assert!(
                request.contains("authorization: Bearer sk-test")
                    || request.contains("Authorization: Bearer sk-test")
            );
            assert!(request.contains(r#""stream_options":{"include_usage":true}"#), "{request}");
            assert!(request.contains(r#""model":"test-model""#));
        }
    }
}

#[tokio::test]
async fn broken_streams_end_with_an_error_not_a_panic() {
    // The first token arrives on its own; what follows it breaks the stream (after the first
    // token, no other URL may be tried: the failure is the stream's last item).
    let first = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n".to_vec();
    let long_line = format!("data: {}\n\n", "x".repeat(2 << 20)).into_bytes();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("no [DONE]", Vec::new(), "ended without [DONE]"),
        ("broken JSON after a token", b"data: {\"choices\":[{\"del\n\n".to_vec(), "not a JSON chunk"),
        (
            "an error event",
            b"data: {\"error\":{\"message\":\"CUDA out of memory\"}}\n\n".to_vec(),
            "CUDA out of memory",
        ),
        ("a line that never ends", long_line, "longer than"),
    ];
    for (what, rest, says) in cases {
        let mut body = vec![first.clone()];
        body.extend(pieces(&rest, 64 * 1024));
        let (gate, gated) = std::sync::mpsc::channel();
        let (base, _) = serve_gated(OK_HEAD, body, 1, Some(gated));
        let (text, _, finish, error) = run_then(&engine(&[&base]), move || {
            let _ = gate.send(());
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(text, "a", "{what}: the token before the failure was delivered");
        assert_eq!(finish, None, "{what}");
        assert!(error.as_deref().is_some_and(|e| e.contains(says)), "{what}: {error:?}");
    }
}

#[tokio::test]
async fn a_failure_before_the_first_token_moves_on_to_the_next_url() {
    // A dead port, then a server whose stream breaks before any event, then a good one.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let (broken, _) = serve(OK_HEAD, vec![b"data: {not json}\n\n".to_vec()], 1);
    let (good, _) = serve(OK_HEAD, vec![fixture("tgi.sse")], 1);
    let engine = engine(&[&dead, &broken, &good]);
    let (text, ..) = run(&engine).await.unwrap();
    assert_eq!(text, "Deep learning is");
    let status = engine.upstreams();
    let errors = |i: usize, kind: &str| status[i].errors.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n);
    assert_eq!(errors(0, "connect"), Some(1), "{status:?}");
    assert_eq!(errors(1, "protocol"), Some(1), "{status:?}");
    assert_eq!(status[2].first_byte_count, 1);
    assert!(status.iter().all(|s| s.available && s.open_streams == 0), "{status:?}");
}

#[tokio::test]
async fn upstream_refusals_keep_their_meaning() {
    let cases: [(&'static str, &str); 3] = [
        (
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "429",
        ),
        (
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "503",
        ),
        (
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 43\r\nConnection: close\r\n\r\n",
            "400",
        ),
    ];
    for (head, status) in cases {
        let body = if status == "400" {
            br#"{"error":{"message":"prompt is too long."}}"#.to_vec()
        } else {
            Vec::new()
        };
        let (base, _) = serve(head, vec![body], 1);
        let error = engine(&[&base]).generate(chat_request()).await.err();
        match (status, error) {
            ("429", Some(InferenceError::UpstreamRateLimited { retry_after: Some(7) })) => {}
            ("503", Some(InferenceError::UpstreamUnavailable { retry_after: Some(3), .. })) => {}
            ("400", Some(InferenceError::InvalidRequest(m))) if m.contains("prompt is too long") => {}
            (status, other) => panic!("{status}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn refusals_of_one_request_do_not_take_the_url_out() {
    let head = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let n = streamgate_inference::upstream::BREAKER_FAILURES as usize + 1;
    let (base, _) = serve(head, vec![Vec::new()], n);
    let engine = engine(&[&base]);
    for _ in 0..n {
        let error = engine.generate(chat_request()).await.err();
        assert!(matches!(error, Some(InferenceError::InvalidRequest(_))), "{error:?}");
    }
    assert!(engine.is_ready(), "a client's bad requests must not take the upstream out for everyone");
    assert!(engine.upstreams()[0].errors.iter().any(|(k, c)| *k == "status" && *c == n as u64));
}

#[tokio::test]
async fn a_url_that_keeps_failing_is_taken_out() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let engine = engine(&[&dead]);
    for _ in 0..streamgate_inference::upstream::BREAKER_FAILURES {
        assert!(engine.generate(chat_request()).await.is_err());
        assert!(engine.upstreams()[0].errors.iter().any(|(k, n)| *k == "connect" && *n > 0));
    }
    assert!(!engine.is_ready(), "every URL is out: not ready");
    assert!(!engine.upstreams()[0].available);
    let error = engine.generate(chat_request()).await.err();
    assert!(
        matches!(error, Some(InferenceError::UpstreamUnavailable { retry_after: Some(_), .. })),
        "{error:?}"
    );
}
