//! Resumable streams on one replica: the real `create_app` in process over the tiny ONNX model
//! (the grace-period tests use the mock engine as a fixture, for a token rate they can count on).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::http::header;
use actix_web::test::{self, TestRequest};
use actix_web::web;
use common::*;
use serde_json::{Value, json};
use streamgate_gateway::create_app;
use streamgate_gateway::logging::discard_logger;
use streamgate_gateway::model_registry::ModelRegistry;
use streamgate_gateway::state::AppState;
use streamgate_inference::{Generator, MockConfig, MockEngine};

/// `(id, data)` of every event of an SSE body, in order.
fn events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter_map(|event| {
            let field = |name: &str| event.lines().find_map(|l| l.strip_prefix(name)).map(str::to_owned);
            field("data: ").map(|data| (field("id: "), data))
        })
        .collect()
}

/// Read a response body until it holds at least `n` events, then drop the connection.
async fn read_some(res: actix_web::dev::ServiceResponse<impl MessageBody + 'static>, n: usize) -> String {
    let mut body = Box::pin(res.into_body());
    let mut text = String::new();
    while events(&text).len() < n {
        match std::future::poll_fn(|cx| Pin::new(&mut body).as_mut().poll_next(cx)).await {
            Some(Ok(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    text
}

fn post_json(path: &str, body: &Value) -> TestRequest {
    TestRequest::post()
        .uri(path)
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(body.to_string())
}

/// The text of a native stream's token events.
fn text_of(events: &[(Option<String>, String)]) -> String {
    events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_owned))
        .collect()
}

const GREEDY: &str = "The quick brown fox";

#[actix_web::test]
async fn a_dropped_stream_resumes_after_its_last_event_without_repeating_or_skipping() {
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    let request = json!({"prompt": GREEDY, "max_tokens": 24, "temperature": 0});
    let whole: Value = test::read_body_json(
        test::call_service(&app, post_json("/api/v1/inference", &request).to_request()).await,
    )
    .await;

    let res = test::call_service(&app, post_json("/api/v1/inference/stream", &request).to_request()).await;
    let stream_id = res.headers().get("x-stream-id").unwrap().to_str().unwrap().to_owned();
    assert_eq!(stream_id.len(), 32);
    let first = events(&read_some(res, 3).await);
    assert!(first.len() >= 3);
    let seen = first.len();
    for (n, (id, _)) in first.iter().enumerate() {
        assert_eq!(id.as_deref(), Some(format!("{stream_id}-{}", n + 1).as_str()), "ids count the events");
    }

    let uri = format!("/api/v1/streams/{stream_id}?after={seen}");
    let res = test::call_service(&app, TestRequest::get().uri(&uri).to_request()).await;
    assert_eq!(res.status(), 200);
    let rest = events(&String::from_utf8_lossy(&test::read_body(res).await));
    assert_eq!(rest.first().and_then(|(id, _)| id.clone()), Some(format!("{stream_id}-{}", seen + 1)));
    assert_eq!(rest.last().map(|(_, d)| d.as_str()), Some("[DONE]"), "a resumed stream ends like any other");
    let all: Vec<_> = first.into_iter().chain(rest).collect();
    assert_eq!(text_of(&all), whole["text"].as_str().unwrap(), "the same generation, each event once");

    // Last-Event-ID works the same; after the end, a resume gets `[DONE]` again.
    let last = all.last().and_then(|(id, _)| id.clone()).unwrap();
    let again = TestRequest::get()
        .uri(&format!("/api/v1/streams/{stream_id}"))
        .insert_header(("last-event-id", last));
    let body = test::read_body(test::call_service(&app, again.to_request()).await).await;
    assert_eq!(sse_data(&String::from_utf8_lossy(&body)), vec!["[DONE]"]);
}

#[actix_web::test]
async fn eventsource_reconnects_continue_the_same_generation() {
    let state = tiny_state(&[]);
    let app = test::init_service(create_app(state.clone())).await;
    let uri = "/api/v1/inference/stream?prompt=Once+upon+a+time&max_tokens=20&temperature=0";
    let res = test::call_service(&app, TestRequest::get().uri(uri).to_request()).await;
    let first = events(&read_some(res, 2).await);
    let last_id = first.last().and_then(|(id, _)| id.clone()).unwrap();
    let admitted = state.models.get("v1").unwrap().stats().admitted;

    // What a browser's EventSource sends when it reconnects: the same URL and Last-Event-ID.
    let reconnect = TestRequest::get().uri(uri).insert_header(("last-event-id", last_id.as_str()));
    let rest = events(&String::from_utf8_lossy(
        &test::read_body(test::call_service(&app, reconnect.to_request()).await).await,
    ));
    assert_eq!(rest.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    assert_eq!(state.models.get("v1").unwrap().stats().admitted, admitted, "the model did not run again");
    let solo = test::call_service(&app, TestRequest::get().uri(uri).to_request()).await;
    let solo = events(&String::from_utf8_lossy(&test::read_body(solo).await));
    let joined: Vec<_> = first.into_iter().chain(rest).collect();
    assert_eq!(text_of(&joined), text_of(&solo));
}

#[actix_web::test]
async fn another_clients_stream_and_unknown_ids_are_the_same_404() {
    let (alice, bob) = ("sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef0");
    let keys = format!("{alice},{bob}");
    let app = test::init_service(create_app(tiny_state(&["--api-keys", &keys]))).await;
    let request = json!({"prompt": GREEDY, "max_tokens": 8});
    let res = test::call_service(
        &app,
        post_json("/api/v1/inference/stream", &request)
            .insert_header(("authorization", format!("Bearer {alice}")))
            .to_request(),
    )
    .await;
    let id = res.headers().get("x-stream-id").unwrap().to_str().unwrap().to_owned();
    let _ = test::read_body(res).await;

    let resume = |key: &str, uri: String| {
        TestRequest::get().uri(&uri).insert_header(("authorization", format!("Bearer {key}"))).to_request()
    };
    let mut answers = Vec::new();
    for (key, uri) in [
        (bob, format!("/api/v1/streams/{id}")),
        (alice, format!("/api/v1/streams/{}", "0".repeat(32))),
        (alice, format!("/api/v2/streams/{id}")),
        (alice, "/api/v1/streams/not-an-id".to_owned()),
        (alice, format!("/api/v1/streams/{id}?after=999")),
    ] {
        let res = test::call_service(&app, resume(key, uri.clone())).await;
        assert_eq!(res.status(), 404, "{uri}");
        let body: Value = test::read_body_json(res).await;
        answers.push(body);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "one answer for all: {answers:?}");
    assert_eq!(answers[0]["error"]["code"], "unknown_stream");
    let own = test::call_service(&app, resume(alice, format!("/api/v1/streams/{id}"))).await;
    assert_eq!(own.status(), 200, "its owner can read it");
}

/// v1 on the mock engine (a fixture: a token every `interval_ms`), with the given settings.
fn mock_state(args: &[&str], tokens: usize, interval_ms: u64) -> web::Data<AppState> {
    let mut all = vec!["--rate-limit", "off", "--max-streams-per-client", "0"];
    all.extend_from_slice(args);
    let mut models = ModelRegistry::new();
    let engine =
        MockEngine::new(MockConfig { tokens, interval: Duration::from_millis(interval_ms) }).unwrap();
    models.insert("v1", Arc::new(engine) as Arc<dyn Generator>);
    web::Data::new(AppState::new(settings(&all), models, discard_logger()).unwrap())
}

#[actix_web::test]
async fn without_a_grace_period_a_disconnect_cancels_at_once() {
    let state = mock_state(&["--disconnect-grace-secs", "0"], 1000, 5);
    let app = test::init_service(create_app(state.clone())).await;
    let res = test::call_service(
        &app,
        post_json("/api/v1/inference/stream", &json!({"prompt": "a", "max_tokens": 1000})).to_request(),
    )
    .await;
    let id = res.headers().get("x-stream-id").unwrap().to_str().unwrap().to_owned();
    let _ = read_some(res, 2).await;
    assert!(state.streams.is_empty(), "the stream is forgotten when its client leaves");
    let res =
        test::call_service(&app, TestRequest::get().uri(&format!("/api/v1/streams/{id}")).to_request()).await;
    assert_eq!(res.status(), 404);
}

#[actix_web::test]
async fn a_generation_waits_out_the_grace_period_then_is_cancelled() {
    let state = mock_state(&["--disconnect-grace-secs", "1"], 1000, 5);
    let app = test::init_service(create_app(state.clone())).await;
    let start = |_: ()| post_json("/api/v1/inference/stream", &json!({"prompt": "a", "max_tokens": 1000}));

    // Resumed within the grace period: the stream goes on from where the client left it.
    let res = test::call_service(&app, start(()).to_request()).await;
    let id = res.headers().get("x-stream-id").unwrap().to_str().unwrap().to_owned();
    let seen = events(&read_some(res, 2).await).len();
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    let res = test::call_service(
        &app,
        TestRequest::get().uri(&format!("/api/v1/streams/{id}?after={seen}")).to_request(),
    )
    .await;
    assert_eq!(res.status(), 200);
    let rest = events(&read_some(res, 3).await);
    assert_eq!(rest[0].0, Some(format!("{id}-{}", seen + 1)));
    let metrics = state.metrics.render(&state.models);
    assert!(metrics.contains(r#"streamgate_resumed_streams_total{version="v1"} 1"#), "{metrics}");

    // Not resumed: cancelled once the grace period is over, and forgotten.
    actix_web::rt::time::sleep(Duration::from_millis(1500)).await;
    let res =
        test::call_service(&app, TestRequest::get().uri(&format!("/api/v1/streams/{id}")).to_request()).await;
    assert_eq!(res.status(), 404, "cancelled after the grace period");
}

#[actix_web::test]
async fn a_use_chat_reply_in_progress_resumes_by_chat_id() {
    let state = mock_state(&[], 400, 5);
    let app = test::init_service(create_app(state)).await;
    let chat =
        json!({"id": "chat-42", "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]});
    let res = test::call_service(&app, post_json("/api/v1/chat", &chat).to_request()).await;
    let first = events(&read_some(res, 5).await);

    let res =
        test::call_service(&app, TestRequest::get().uri("/api/v1/chat/chat-42/stream").to_request()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers().get("x-vercel-ai-ui-message-stream").unwrap(), "v1");
    let replayed = events(&read_some(res, first.len()).await);
    assert_eq!(replayed[..first.len()], first[..], "from the start of the reply");
    assert!(replayed[0].1.contains(r#""type":"start""#));

    let none =
        test::call_service(&app, TestRequest::get().uri("/api/v1/chat/chat-7/stream").to_request()).await;
    assert_eq!(none.status(), 204, "no reply in progress");
}

#[actix_web::test]
async fn with_neither_grace_nor_retention_resume_is_off() {
    let state = mock_state(&["--disconnect-grace-secs", "0", "--stream-retention-secs", "0"], 20, 0);
    let app = test::init_service(create_app(state.clone())).await;
    let res =
        test::call_service(&app, post_json("/api/v1/inference/stream", &json!({"prompt": "a"})).to_request())
            .await;
    assert!(res.headers().get("x-stream-id").is_none());
    let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
    let all = events(&body);
    assert_eq!(all.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    assert!(all.iter().all(|(id, _)| id.is_none()), "no ids: nothing to resume");
    assert!(state.streams.is_empty(), "nothing registered or kept");
}
