//! End to end: the real `streamgate` binary on 127.0.0.1:0 with the real SmolLM2 model (v1) and the
//! tiny model (v2), real HTTP, SSE parsed on the wire.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A prompt SmolLM2 answers at length under greedy decoding (checked: 120+ tokens, no EOS).
const LONG: &str = "Count from 1 to 300, separated by commas.";
/// A raw prompt SmolLM2 continues without end under greedy decoding (checked: 600 tokens, no
/// EOS), for streams that must outlast a timeout however fast the machine decodes.
const ENDLESS: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

fn both_models() -> Vec<String> {
    vec![
        "--model".into(),
        format!("v1={}", smollm2().display()),
        "--model".into(),
        format!("v2={}", tiny_model().display()),
    ]
}

fn start(extra: &[&str]) -> Server {
    let mut args: Vec<String> = both_models();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

async fn metrics(server: &Server) -> String {
    let mut res = client().get(server.url("/metrics")).send().await.unwrap();
    String::from_utf8(res.body().await.unwrap().to_vec()).unwrap()
}

async fn open_stream(server: &Server, version: &str, body: Value) -> SseReader<awc::ClientResponse> {
    let res = client()
        .post(server.url(&format!("/api/{version}/inference/stream")))
        .send_json(&body)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    SseReader::new(res)
}

#[actix_rt::test]
async fn tokens_stream_as_they_are_produced_from_both_versions() {
    let server = start(&[]);
    let mut v1 =
        open_stream(&server, "v1", json!({"prompt": LONG, "chat": true, "max_tokens": 48, "temperature": 0}))
            .await;
    let first: Value = serde_json::from_str(&v1.next_data().await.unwrap()).unwrap();
    assert_eq!(first["index"], 0);
    // The first token reached us while the model was still generating: nothing buffered it.
    let m = metrics(&server).await;
    assert_eq!(metric(&m, r#"streamgate_engine_active_generations{version="v1"}"#), Some(1.0), "{m}");

    // v2 (another model) serves in parallel while v1 streams.
    let mut v2 = open_stream(&server, "v2", json!({"prompt": "Hello", "max_tokens": 5})).await;
    assert_eq!(v2.rest().await.last().unwrap(), "[DONE]");

    let rest = v1.rest().await;
    assert_eq!(rest.last().unwrap(), "[DONE]");
    let finish: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(finish["finish_reason"], "length");
    assert_eq!(finish["usage"]["completion_tokens"], 48);
    assert_eq!(rest.len() - 2 + 1, 48, "one event per token");

    let log = server.request_log("/api/v1/inference/stream");
    assert_eq!(log["tokens"], 48);
    assert_eq!(log["finish_reason"], "length");
    assert!(log["ttft_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(log["status"], 200);
    assert!(log["request_id"].as_str().unwrap().len() >= 16);
}

#[actix_rt::test]
async fn the_real_model_answers_through_the_gateway() {
    let server = start(&[]);
    let mut res = client()
        .post(server.url("/api/v1/inference"))
        .send_json(&json!({"prompt": "What is the capital of Germany?", "chat": true, "max_tokens": 16, "temperature": 0}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert!(body["text"].as_str().unwrap().contains("Berlin"), "{body}");
    assert_eq!(body["finish_reason"], "stop");
}

#[actix_rt::test]
async fn client_disconnect_cancels_the_generation() {
    // No grace period: a disconnect cancels at once, as before streams were resumable.
    let server = start(&["--disconnect-grace-secs", "0"]);
    let mut stream = open_stream(
        &server,
        "v1",
        json!({"prompt": LONG, "chat": true, "max_tokens": 500, "temperature": 0}),
    )
    .await;
    assert!(stream.next_data().await.is_some());
    drop(stream);

    let mut last = String::new();
    for _ in 0..100 {
        last = metrics(&server).await;
        if metric(&last, r#"streamgate_engine_active_generations{version="v1"}"#) == Some(0.0)
            && metric(&last, r#"streamgate_active_streams{version="v1"}"#) == Some(0.0)
        {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&last, r#"streamgate_engine_active_generations{version="v1"}"#), Some(0.0), "{last}");
    assert_eq!(metric(&last, r#"streamgate_active_streams{version="v1"}"#), Some(0.0), "{last}");
    assert_eq!(
        metric(&last, r#"streamgate_engine_cancelled_generations{version="v1"}"#),
        Some(1.0),
        "{last}"
    );
    let tokens = metric(&last, r#"streamgate_engine_tokens_generated{version="v1"}"#).unwrap();
    assert!(tokens < 500.0, "generation stopped early ({tokens} tokens)");
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let later = metrics(&server).await;
    assert_eq!(
        metric(&later, r#"streamgate_engine_tokens_generated{version="v1"}"#),
        Some(tokens),
        "no work continues"
    );
    let log = server.request_log("/api/v1/inference/stream");
    assert_eq!(log["finish_reason"], "client_disconnected");
}

#[actix_rt::test]
async fn keep_alive_comments_flow_while_a_request_waits() {
    // One generation slot: the second stream waits behind the first, sending keep-alives.
    let server = start(&["--max-active-sequences", "1", "--sse-keep-alive-secs", "1"]);
    let mut first = open_stream(
        &server,
        "v1",
        json!({"prompt": LONG, "chat": true, "max_tokens": 160, "temperature": 0}),
    )
    .await;
    assert!(first.next_data().await.is_some());

    let mut waiting = client()
        .post(server.url("/api/v1/inference/stream"))
        .send_json(&json!({"prompt": "Hi", "max_tokens": 2}))
        .await
        .unwrap();
    assert_eq!(waiting.status(), 200, "headers arrive at once, before a slot is free");
    let mut raw = String::new();
    use futures_util::StreamExt;
    while !raw.contains("data: ") {
        let chunk = waiting.next().await.expect("more body").expect("chunk");
        raw.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let before_first_data = &raw[..raw.find("data: ").unwrap()];
    assert!(before_first_data.matches(": keep-alive").count() >= 2, "{raw:?}");
    drop(first);
}

#[actix_rt::test]
async fn sigterm_drains_open_streams_then_ends_them() {
    let server = start(&["--drain-timeout-secs", "3", "--shutdown-delay-secs", "1"]);
    let mut long =
        open_stream(&server, "v1", json!({"prompt": ENDLESS, "max_tokens": 1000, "temperature": 0})).await;
    let mut short = open_stream(&server, "v2", json!({"prompt": "Hi", "max_tokens": 3})).await;
    assert!(long.next_data().await.is_some());

    server.signal("TERM");
    // Readiness turns 503 as soon as the signal is handled (`kill` returns before that), while the
    // listener still accepts during the shutdown delay.
    let mut ready = client().get(server.url("/api/v1/health/ready")).send().await.unwrap();
    for _ in 0..40 {
        if ready.status() == 503 {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        ready = client().get(server.url("/api/v1/health/ready")).send().await.unwrap();
    }
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["error"]["code"], "shutting_down");
    // The short stream completes normally during the drain.
    assert_eq!(short.rest().await.last().unwrap(), "[DONE]");
    // New connections are refused once the delay is over.
    actix_rt::time::sleep(Duration::from_millis(1300)).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    assert!(std::net::TcpStream::connect(&address).is_err(), "listener must be closed");
    // The long one is ended at the drain timeout with an error event and [DONE].
    let rest = long.rest().await;
    assert_eq!(rest.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "shutting_down");

    let mut server = server;
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = server.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(status.expect("exited within the drain timeout").success());
}

#[test]
fn invalid_settings_stop_start_up_naming_the_setting() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .args(args)
            .envs(env.iter().copied())
            .current_dir(repo_root())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--allowed-origin-regex", "https://(unclosed"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("ALLOWED_ORIGIN_REGEX"), "{err}");
    let (code, err) = run(&["--port", "http"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--port"), "{err}");
    let (code, err) = run(&[], &[("STREAMGATE_SSE_KEEP_ALIVE_SECS", "0")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("STREAMGATE_SSE_KEEP_ALIVE_SECS"), "{err}");
    let (code, err) =
        run(&["--model", "v1=/nonexistent/model", "--ort-dylib-path", ort_dylib().to_str().unwrap()], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("v1") && err.contains("/nonexistent/model"), "{err}");
    let (code, err) = run(&["--ort-dylib-path", "/nonexistent/libonnxruntime.so"], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("make setup"), "{err}");
}

#[test]
fn help_documents_every_setting() {
    let out = Command::new(env!("CARGO_BIN_EXE_streamgate")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "STREAMGATE_HOST",
        "STREAMGATE_PORT",
        "STREAMGATE_MODELS",
        "ORT_DYLIB_PATH",
        "ALLOWED_ORIGINS",
        "ALLOWED_ORIGIN_REGEX",
        "STREAMGATE_LOG_LEVEL",
        "STREAMGATE_SSE_KEEP_ALIVE_SECS",
        "STREAMGATE_DRAIN_TIMEOUT_SECS",
        "STREAMGATE_MAX_BODY_BYTES",
        "STREAMGATE_MAX_PROMPT_BYTES",
        "STREAMGATE_MAX_TOKENS_LIMIT",
        "STREAMGATE_QUEUE_CAPACITY",
    ] {
        assert!(help.contains(env), "--help does not mention {env}");
    }
}

#[actix_rt::test]
async fn a_flood_past_capacity_gets_fast_503s_while_health_and_open_streams_keep_working() {
    // One slot and a 2-deep queue: of 12 simultaneous streams, the queue takes 2 (3 if the worker
    // has already moved the first into its slot when the burst arrives); the rest are refused.
    let server = start(&[
        "--max-active-sequences",
        "1",
        "--queue-capacity",
        "2",
        "--rate-limit",
        "off",
        "--max-streams-per-client",
        "0",
    ]);
    let health_url = server.url("/api/v1/health/live");
    let probing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = probing.clone();
    let prober = std::thread::spawn(move || {
        // Blocking client on its own thread, so the probe timing is not the test runtime's.
        let mut worst = Duration::ZERO;
        let mut probes = 0;
        while flag.load(std::sync::atomic::Ordering::SeqCst) {
            let started = std::time::Instant::now();
            let mut stream = std::net::TcpStream::connect(
                health_url.trim_start_matches("http://").split('/').next().unwrap(),
            )
            .unwrap();
            use std::io::{Read, Write};
            write!(stream, "GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            worst = worst.max(started.elapsed());
            probes += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (worst, probes)
    });

    let body = json!({"prompt": LONG, "chat": true, "max_tokens": 30, "temperature": 0});
    let requests = (0..12).map(|_| client().post(server.url("/api/v1/inference/stream")).send_json(&body));
    let responses = futures_util::future::join_all(requests).await;
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for res in responses {
        let res = res.unwrap();
        match res.status().as_u16() {
            200 => admitted.push(SseReader::new(res)),
            503 => {
                assert!(res.headers().contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!((2..=3).contains(&admitted.len()), "admitted {}, refused {refused}", admitted.len());
    assert_eq!(admitted.len() + refused, 12);
    for mut stream in admitted {
        let events = stream.rest().await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(finish["finish_reason"], "length", "every admitted stream completes");
    }
    probing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (worst, probes) = prober.join().unwrap();
    assert!(probes >= 5, "health was probed throughout ({probes} probes)");
    assert!(
        worst < Duration::from_millis(100),
        "liveness answered within 100 ms throughout (worst {worst:?})"
    );
    let m = metrics(&server).await;
    assert_eq!(metric(&m, r#"streamgate_rejected_total{reason="queue_full"}"#), Some(refused as f64));
}

/// Continuous batching on the real model: eight different prompts streamed at once, at temperature
/// 0, each get exactly the events they get alone, and the engine advanced them together.
#[actix_rt::test]
async fn concurrent_streams_get_exactly_their_solo_tokens_on_the_real_model() {
    let server = start(&[
        "--max-active-sequences",
        "8",
        "--rate-limit",
        "off",
        "--max-streams-per-client",
        "0",
        // Without it, a lone row runs ONNX Runtime's matrix-vector kernels, whose rounding differs
        // from the batched kernels' (and, through int8 activations, changes tokens within a few).
        "--batch-invariant",
        // Whole prompts per step: all eight are decoding together within eight steps.
        "--prefill-pace",
        "0",
    ]);
    let prompts = [
        "What is the capital of Germany?",
        "Name three colors.",
        "Write a haiku about the sea.",
        "What is 2 + 2?",
        "Explain what a KV cache is.",
        "List the days of the week.",
        "Count from 1 to 300, separated by commas.",
        "Say hello in French.",
    ];
    let body = |p: &str| json!({"prompt": p, "chat": true, "max_tokens": 16, "temperature": 0});
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(open_stream(&server, "v1", body(p)).await.rest().await);
    }
    let steps_before =
        metric(&metrics(&server).await, r#"streamgate_engine_decode_steps{version="v1"}"#).unwrap();
    // All eight requests are open before any is read.
    let mut streams =
        futures_util::future::join_all(prompts.iter().map(|p| open_stream(&server, "v1", body(p)))).await;
    let together = futures_util::future::join_all(streams.iter_mut().map(|s| s.rest())).await;
    for (i, events) in together.iter().enumerate() {
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(events, &alone[i], "prompt {:?} streamed differently next to others", prompts[i]);
    }
    let m = metrics(&server).await;
    let steps = metric(&m, r#"streamgate_engine_decode_steps{version="v1"}"#).unwrap() - steps_before;
    let tokens: usize = together.iter().map(|e| e.len() - 2).sum();
    // Round-robin would take one forward pass per token after each prompt's first.
    let round_robin = (tokens - prompts.len()) as f64;
    assert!(steps * 2.0 < round_robin, "{steps} decode steps for {tokens} tokens: not batched\n{m}");
    assert_eq!(metric(&m, r#"streamgate_engine_kv_slots{version="v1"}"#), Some(8.0), "{m}");
}
