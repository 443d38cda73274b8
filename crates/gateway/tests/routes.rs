//! Route tests: the real `create_app` in process, over the real tiny ONNX model.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use actix_web::http::header;
use actix_web::test::{self, TestRequest};
use common::*;
use serde_json::{Value, json};
use streamgate_gateway::create_app;

const STREAM: &str = "/api/v1/inference/stream";

async fn call(req: TestRequest) -> (u16, actix_web::http::header::HeaderMap, String) {
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    let res = test::call_service(&app, req.to_request()).await;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = test::read_body(res).await;
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn post_json(path: &str, body: &str) -> TestRequest {
    TestRequest::post()
        .uri(path)
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(body.to_owned())
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("error body is not JSON: {body}"));
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error.code in {body}")).to_owned()
}

#[actix_web::test]
async fn post_stream_sends_token_events_finish_and_done() {
    let (status, headers, body) =
        call(post_json(STREAM, r#"{"prompt":"Hello there","max_tokens":6,"seed":3}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get(header::CONTENT_TYPE).unwrap(), "text/event-stream");
    assert_eq!(headers.get(header::CACHE_CONTROL).unwrap(), "no-cache");
    assert_eq!(headers.get("x-accel-buffering").unwrap(), "no");
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let finish: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    let completion = finish["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(["stop", "length"].contains(&finish["finish_reason"].as_str().unwrap()));
    assert!(finish["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let tokens = &data[..data.len() - 2];
    assert!(!tokens.is_empty() && tokens.len() <= completion, "one event per token with text");
    let mut last_index = None;
    for t in tokens {
        let v: Value = serde_json::from_str(t).unwrap();
        let index = v["index"].as_u64().unwrap() as usize;
        assert!(index < completion && last_index.is_none_or(|l| index > l), "indexes count tokens: {t}");
        assert!(!v["text"].as_str().unwrap().is_empty(), "no event without text: {t}");
        last_index = Some(index);
    }
}

#[actix_web::test]
async fn get_stream_serves_eventsource_clients() {
    let (status, headers, body) =
        call(TestRequest::get().uri("/api/v2/inference/stream?prompt=Hi&max_tokens=3")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get(header::CONTENT_TYPE).unwrap(), "text/event-stream");
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]");
}

#[actix_web::test]
async fn non_streaming_returns_one_json_document() {
    let (status, _, body) =
        call(post_json("/api/v1/inference", r#"{"prompt":"Hello","max_tokens":4,"temperature":0}"#)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], "v1");
    assert!(v["text"].is_string());
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 4);
}

#[actix_web::test]
async fn greedy_stream_equals_non_streaming_text() {
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    let body = r#"{"prompt":"The quick brown fox","max_tokens":12,"temperature":0}"#;
    let streamed =
        test::read_body(test::call_service(&app, post_json(STREAM, body).to_request()).await).await;
    let text: String = sse_data(&String::from_utf8_lossy(&streamed))
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_owned))
        .collect();
    let whole: Value = test::read_body_json(
        test::call_service(&app, post_json("/api/v1/inference", body).to_request()).await,
    )
    .await;
    assert_eq!(whole["text"], text);
}

#[actix_web::test]
async fn bad_requests_get_clear_json_errors() {
    let long_prompt = "x".repeat(40 * 1024);
    let huge_body = format!(r#"{{"prompt":"{}"}}"#, "y".repeat(70 * 1024));
    let too_many_tokens = "token ".repeat(300);
    let cases: Vec<(&str, TestRequest, u16, &str)> = vec![
        ("invalid JSON", post_json(STREAM, r#"{"prompt":"#), 400, "invalid_json"),
        ("not an object", post_json(STREAM, r#"["prompt"]"#), 422, "invalid_request"),
        ("wrong type", post_json(STREAM, r#"{"prompt":5}"#), 422, "invalid_request"),
        (
            "invalid UTF-8",
            TestRequest::post()
                .uri(STREAM)
                .insert_header((header::CONTENT_TYPE, "application/json"))
                .set_payload(b"{\"prompt\":\"\xff\xfe\"}".to_vec()),
            400,
            "invalid_json",
        ),
        ("empty prompt", post_json(STREAM, r#"{"prompt":""}"#), 422, "invalid_request"),
        ("missing prompt", post_json(STREAM, r#"{"max_tokens":3}"#), 422, "invalid_request"),
        ("unknown field", post_json(STREAM, r#"{"prompt":"a","temprature":1}"#), 422, "invalid_request"),
        (
            "huge max_tokens",
            post_json(STREAM, r#"{"prompt":"a","max_tokens":99999999999}"#),
            422,
            "invalid_request",
        ),
        (
            "float max_tokens",
            post_json(STREAM, r#"{"prompt":"a","max_tokens":1e30}"#),
            422,
            "invalid_request",
        ),
        (
            "max_tokens over limit",
            post_json(STREAM, r#"{"prompt":"a","max_tokens":5000}"#),
            422,
            "invalid_request",
        ),
        ("zero max_tokens", post_json(STREAM, r#"{"prompt":"a","max_tokens":0}"#), 422, "invalid_request"),
        (
            "negative max_tokens",
            post_json(STREAM, r#"{"prompt":"a","max_tokens":-5}"#),
            422,
            "invalid_request",
        ),
        (
            "negative temperature",
            post_json(STREAM, r#"{"prompt":"a","temperature":-1}"#),
            422,
            "invalid_request",
        ),
        (
            "huge temperature",
            post_json(STREAM, r#"{"prompt":"a","temperature":1e300}"#),
            422,
            "invalid_request",
        ),
        ("NaN string", post_json(STREAM, r#"{"prompt":"a","temperature":"NaN"}"#), 422, "invalid_request"),
        (
            "out-of-range number",
            post_json(STREAM, r#"{"prompt":"a","temperature":1e999}"#),
            400,
            "invalid_json",
        ),
        ("top_p zero", post_json(STREAM, r#"{"prompt":"a","top_p":0}"#), 422, "invalid_request"),
        ("negative seed", post_json(STREAM, r#"{"prompt":"a","seed":-1}"#), 422, "invalid_request"),
        (
            "too many stops",
            post_json(STREAM, r#"{"prompt":"a","stop":["1","2","3","4","5"]}"#),
            422,
            "invalid_request",
        ),
        ("empty stop", post_json(STREAM, r#"{"prompt":"a","stop":""}"#), 422, "invalid_request"),
        (
            "prompt over byte limit",
            post_json(STREAM, &format!(r#"{{"prompt":"{long_prompt}"}}"#)),
            422,
            "invalid_request",
        ),
        (
            "prompt over context",
            post_json(STREAM, &format!(r#"{{"prompt":"{too_many_tokens}"}}"#)),
            422,
            "prompt_too_long",
        ),
        ("oversized body", post_json(STREAM, &huge_body), 413, "payload_too_large"),
        ("wrong method", TestRequest::delete().uri(STREAM), 405, "method_not_allowed"),
        ("put on inference", TestRequest::put().uri("/api/v1/inference"), 405, "method_not_allowed"),
        (
            "wrong content type",
            TestRequest::post()
                .uri(STREAM)
                .insert_header((header::CONTENT_TYPE, "text/plain"))
                .set_payload(r#"{"prompt":"a"}"#),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            TestRequest::post().uri(STREAM).set_payload(r#"{"prompt":"a"}"#),
            415,
            "unsupported_media_type",
        ),
        (
            "unknown version",
            post_json("/api/v9/inference/stream", r#"{"prompt":"a"}"#),
            404,
            "unknown_model_version",
        ),
        ("unknown path", TestRequest::get().uri("/api/v1/nope"), 404, "not_found"),
        (
            "GET without prompt",
            TestRequest::get().uri("/api/v1/inference/stream?max_tokens=3"),
            422,
            "invalid_request",
        ),
        (
            "GET bad number",
            TestRequest::get().uri("/api/v1/inference/stream?prompt=a&max_tokens=abc"),
            422,
            "invalid_request",
        ),
        (
            "GET unknown param",
            TestRequest::get().uri("/api/v1/inference/stream?prompt=a&bogus=1"),
            422,
            "invalid_request",
        ),
    ];
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    for (name, req, status, code) in cases {
        let res = test::call_service(&app, req.to_request()).await;
        let got = res.status().as_u16();
        let content_type =
            res.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("").to_owned());
        let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
        assert_eq!(got, status, "{name}: {body}");
        assert_eq!(content_type.as_deref(), Some("application/json"), "{name}");
        assert_eq!(error_code(&body), code, "{name}: {body}");
    }
}

#[actix_web::test]
async fn request_id_is_echoed_or_generated() {
    let (_, headers, _) =
        call(TestRequest::get().uri("/api/v1/health/live").insert_header(("x-request-id", "abc-123"))).await;
    assert_eq!(headers.get("x-request-id").unwrap(), "abc-123");
    let (_, headers, _) = call(TestRequest::get().uri("/api/v1/health/live")).await;
    assert_eq!(headers.get("x-request-id").unwrap().len(), 32);
    let (_, headers, _) =
        call(TestRequest::get().uri("/api/v1/health/live").insert_header(("x-request-id", "has space")))
            .await;
    assert_ne!(headers.get("x-request-id").unwrap(), "has space");
}

#[actix_web::test]
async fn models_health_metrics_and_openapi() {
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    let get = |uri: &str| TestRequest::get().uri(uri).to_request();

    let model: Value = test::read_body_json(test::call_service(&app, get("/api/v2/models")).await).await;
    assert_eq!(model["version"], "v2");
    assert_eq!(model["context_length"], 256);
    assert_eq!(model["vocab_size"], 384);
    assert!(model["loaded_since"].as_str().unwrap().ends_with('Z'));
    let all: Value = test::read_body_json(test::call_service(&app, get("/api/models")).await).await;
    assert_eq!(all.as_array().unwrap().len(), 2);

    for uri in ["/api/v1/health/live", "/api/v1/health/ready"] {
        assert_eq!(test::call_service(&app, get(uri)).await.status(), 200, "{uri}");
    }
    assert_eq!(test::call_service(&app, get("/api/v7/health/ready")).await.status(), 404);

    let _ = test::read_body(
        test::call_service(&app, post_json(STREAM, r#"{"prompt":"a","max_tokens":2}"#).to_request()).await,
    )
    .await;
    let metrics =
        String::from_utf8(test::read_body(test::call_service(&app, get("/metrics")).await).await.to_vec())
            .unwrap();
    for family in [
        "streamgate_http_requests_total",
        "streamgate_tokens_streamed_total",
        "streamgate_time_to_first_token_seconds_bucket",
        "streamgate_active_streams",
        "streamgate_engine_active_generations",
    ] {
        assert!(metrics.contains(family), "missing {family}");
    }
    assert!(metric(&metrics, r#"streamgate_tokens_streamed_total{version="v1"}"#).unwrap() >= 1.0);
    assert_eq!(metric(&metrics, r#"streamgate_active_streams{version="v1"}"#), Some(0.0));

    let doc: Value = test::read_body_json(test::call_service(&app, get("/api/openapi.json")).await).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/{version}/inference/stream",
        "/api/{version}/inference",
        "/api/{version}/models",
        "/api/{version}/health/ready",
    ] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }
    assert!(doc["components"]["schemas"]["InferenceRequest"].is_object());
    let docs = test::call_service(&app, get("/api/docs")).await;
    assert_eq!(docs.status(), 200);
    let page =
        String::from_utf8(test::read_body(test::call_service(&app, get("/")).await).await.to_vec()).unwrap();
    assert!(page.contains("EventSource"));
}

#[actix_web::test]
async fn readiness_is_503_while_draining() {
    let state = tiny_state(&[]);
    let app = test::init_service(create_app(state.clone())).await;
    state.shutdown.begin_drain();
    let res = test::call_service(&app, TestRequest::get().uri("/api/v1/health/ready").to_request()).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key(header::RETRY_AFTER));
    let live = test::call_service(&app, TestRequest::get().uri("/api/v1/health/live").to_request()).await;
    assert_eq!(live.status(), 200, "liveness stays up while draining");
    let refused = test::call_service(&app, post_json(STREAM, r#"{"prompt":"a"}"#).to_request()).await;
    assert_eq!(refused.status(), 503);
}

#[actix_web::test]
async fn cors_allows_listed_and_pattern_origins_only() {
    let state = tiny_state(&[
        "--allowed-origins",
        "https://app.example.com",
        "--allowed-origin-regex",
        r"https://your-project-[a-z0-9-]+\.vercel\.app",
    ]);
    let app = test::init_service(create_app(state)).await;
    let with_origin = |origin: &str| {
        TestRequest::get().uri("/api/v1/models").insert_header((header::ORIGIN, origin)).to_request()
    };

    for origin in ["https://app.example.com", "https://your-project-git-x-team.vercel.app"] {
        let res = test::call_service(&app, with_origin(origin)).await;
        assert_eq!(res.status(), 200, "{origin}");
        assert_eq!(res.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).unwrap(), origin);
        assert!(res.headers().get_all(header::VARY).any(|v| v == "Origin"));
    }
    for origin in [
        "https://your-project-x.vercel.app.evil.com",
        "https://evil.com/?https://your-project-x.vercel.app",
        "http://your-project-x.vercel.app",
        "null",
        "https://evil.com",
    ] {
        let res = test::call_service(&app, with_origin(origin)).await;
        assert_eq!(res.status(), 403, "{origin}");
        assert!(res.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none(), "{origin}");
        let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
        assert_eq!(error_code(&body), "origin_not_allowed");
    }

    let preflight = |origin: &str| {
        TestRequest::default()
            .method(actix_web::http::Method::OPTIONS)
            .uri(STREAM)
            .insert_header((header::ORIGIN, origin))
            .insert_header((header::ACCESS_CONTROL_REQUEST_METHOD, "POST"))
            .insert_header((header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type"))
            .to_request()
    };
    let ok = test::call_service(&app, preflight("https://your-project-abc.vercel.app")).await;
    assert_eq!(ok.status(), 204);
    assert!(
        ok.headers().get(header::ACCESS_CONTROL_ALLOW_METHODS).unwrap().to_str().unwrap().contains("POST")
    );
    assert!(
        ok.headers()
            .get(header::ACCESS_CONTROL_ALLOW_HEADERS)
            .unwrap()
            .to_str()
            .unwrap()
            .contains("content-type")
    );
    let denied = test::call_service(&app, preflight("https://your-project-abc.vercel.app.evil.com")).await;
    assert_eq!(denied.status(), 403);

    // Same-origin requests from the bundled page pass without configuration.
    let same = TestRequest::get()
        .uri("/api/v1/models")
        .insert_header((header::HOST, "gateway.local:8000"))
        .insert_header((header::ORIGIN, "http://gateway.local:8000"))
        .to_request();
    assert_eq!(test::call_service(&app, same).await.status(), 200);
    // No Origin: not a browser cross-origin request.
    let plain = TestRequest::get().uri("/api/v1/models").to_request();
    assert_eq!(test::call_service(&app, plain).await.status(), 200);
}

#[actix_web::test]
async fn chat_flag_applies_the_model_template() {
    let (status, _, body) = call(post_json(
        "/api/v1/inference",
        &json!({"prompt": "hi", "chat": true, "max_tokens": 2}).to_string(),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    // ChatML wrapping of "hi" is 9+ tokens in the tiny vocabulary; the bare prompt is 1-2.
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5, "{body}");
}

#[actix_web::test]
async fn invalid_utf8_in_a_query_string_is_a_400_json_error() {
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    for uri in [
        "/api/v1/inference/stream?prompt=%ff%fe",
        "/api/v1/inference/stream?prompt=ok&stop=%c3",
        "/api/v1/inference/stream?%ff=1&prompt=ok",
    ] {
        let res = test::call_service(&app, TestRequest::get().uri(uri).to_request()).await;
        assert_eq!(res.status(), 400, "{uri}");
        assert_eq!(res.headers().get(header::CONTENT_TYPE).unwrap(), "application/json", "{uri}");
        let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
        assert_eq!(error_code(&body), "invalid_query", "{uri}: {body}");
    }
    // Valid percent-encoded UTF-8 still streams.
    let ok = TestRequest::get().uri("/api/v1/inference/stream?prompt=caf%C3%A9+au+lait&max_tokens=2");
    let res = test::call_service(&app, ok.to_request()).await;
    assert_eq!(res.status(), 200);
}

#[actix_web::test]
async fn every_route_in_the_path_table_is_served_and_405_says_allow() {
    use streamgate_gateway::http::paths::ROUTES;
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    for route in ROUTES {
        let uri = route.pattern.replace("{version}", "v1");
        for method in route.allow.split(", ") {
            let req = TestRequest::default()
                .method(method.parse().unwrap())
                .uri(&uri)
                .insert_header((header::CONTENT_TYPE, "application/json"))
                .set_payload("{}");
            let res = test::call_service(&app, req.to_request()).await;
            let status = res.status().as_u16();
            let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
            // Served: anything but the 404 of no route (an unknown stream id is a 404 of its own).
            let unrouted = status == 404 && body.contains(r#""code":"not_found""#);
            assert!(status != 405 && !unrouted, "{method} {uri}: {status} {body}");
        }
        for method in ["DELETE", "PUT", "PATCH", "TRACE"] {
            let req = TestRequest::default().method(method.parse().unwrap()).uri(&uri);
            let res = test::call_service(&app, req.to_request()).await;
            assert_eq!(res.status(), 405, "{method} {uri}");
            assert_eq!(res.headers().get(header::ALLOW).unwrap(), route.allow, "{method} {uri}");
            let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
            assert_eq!(error_code(&body), "method_not_allowed", "{method} {uri}");
        }
    }
    // The OpenAI routes answer in OpenAI's error style.
    let res = test::call_service(&app, TestRequest::delete().uri("/v1/models").to_request()).await;
    let body: Value = test::read_body_json(res).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

/// Every data event of a stream, as JSON (not `[DONE]`).
fn events(body: &str) -> Vec<Value> {
    sse_data(body).iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[actix_web::test]
async fn no_stream_carries_an_event_with_empty_text() {
    let app = test::init_service(create_app(tiny_state(&[]))).await;
    // Multi-byte characters and sampling at temperature 1 make the tiny model emit tokens whose
    // text is held back (partial characters) and end-of-sequence tokens, which have no text.
    let mut token_events = 0;
    for seed in 0..6 {
        let native = json!({"prompt": "Café 中文 🚀", "max_tokens": 40, "temperature": 1.0, "seed": seed});
        let res = test::call_service(&app, post_json(STREAM, &native.to_string()).to_request()).await;
        let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
        for e in events(&body).iter().filter(|e| e.get("text").is_some()) {
            token_events += 1;
            assert_ne!(e["text"], "", "native: {e}");
        }
        let openai = json!({"model": "v1", "stream": true, "max_tokens": 40, "seed": seed,
            "messages": [{"role": "user", "content": "Café 中文 🚀"}]});
        let res =
            test::call_service(&app, post_json("/v1/chat/completions", &openai.to_string()).to_request())
                .await;
        let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
        for e in events(&body).iter().skip(1) {
            assert_ne!(e["choices"][0]["delta"]["content"], "", "openai: {e}");
        }
        let ai_sdk = json!({"max_tokens": 40, "temperature": 1.0,
            "messages": [{"role": "user", "parts": [{"type": "text", "text": "Café 中文 🚀"}]}]});
        let res = test::call_service(&app, post_json("/api/v1/chat", &ai_sdk.to_string()).to_request()).await;
        let body = String::from_utf8_lossy(&test::read_body(res).await).into_owned();
        for e in events(&body).iter().filter(|e| e["type"] == "text-delta") {
            assert_ne!(e["delta"], "", "ai-sdk: {e}");
        }
    }
    assert!(token_events > 0, "the native streams sent tokens");
}

#[actix_web::test]
async fn the_openapi_document_states_the_served_bounds_and_versions() {
    let app = test::init_service(create_app(tiny_state(&["--max-tokens-limit", "300"]))).await;
    let doc: Value = test::read_body_json(
        test::call_service(&app, TestRequest::get().uri("/api/openapi.json").to_request()).await,
    )
    .await;
    let request = &doc["components"]["schemas"]["InferenceRequest"];
    assert_eq!(request["properties"]["max_tokens"]["maximum"], 300);
    assert_eq!(request["properties"]["prompt"]["minLength"], 1);
    assert_eq!(request["additionalProperties"], false, "unknown fields are refused");
    let version = &doc["paths"]["/api/{version}/models"]["get"]["parameters"][0]["schema"]["enum"];
    assert_eq!(version, &json!(["v1", "v2"]));
    // Integers written as whole floats are integers (JSON Schema), and accepted.
    let res = test::call_service(
        &app,
        post_json("/api/v1/inference", r#"{"prompt":"a","max_tokens":2.0,"seed":7.0,"top_k":3.0}"#)
            .to_request(),
    )
    .await;
    assert_eq!(res.status(), 200);
}
