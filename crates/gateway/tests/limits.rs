//! Rate limits, API keys and the concurrent-stream cap, in process over the tiny model.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use actix_web::http::header;
use actix_web::test::{self, TestRequest};
use common::*;
use serde_json::Value;
use streamgate_gateway::create_app;

const KEY: &str = "sk-test-0123456789abcdef";

fn get(path: &str, peer: &str) -> TestRequest {
    TestRequest::get().uri(path).peer_addr(peer.parse().unwrap())
}

fn header_u64(
    res: &actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
    name: &str,
) -> Option<u64> {
    res.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

#[actix_web::test]
async fn exactly_the_burst_passes_then_429_with_headers() {
    let app = test::init_service(create_app(tiny_state(&["--rate-limit", "60/min:3"]))).await;
    for remaining in [2, 1, 0] {
        let res = test::call_service(&app, get("/api/v1/models", "198.51.100.1:4000").to_request()).await;
        assert_eq!(res.status(), 200);
        assert_eq!(header_u64(&res, "ratelimit-limit"), Some(3));
        assert_eq!(header_u64(&res, "ratelimit-remaining"), Some(remaining));
        assert!(header_u64(&res, "ratelimit-reset").is_some());
    }
    let res = test::call_service(&app, get("/api/v1/models", "198.51.100.1:4000").to_request()).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header_u64(&res, "ratelimit-remaining"), Some(0));
    let retry = header_u64(&res, "retry-after").expect("Retry-After");
    assert!((1..=1).contains(&retry), "one request per second replenishes: {retry}");
    let body: Value = test::read_body_json(res).await;
    assert_eq!(body["error"]["code"], "rate_limited");
    // A different version has its own quota; health and metrics are exempt.
    assert_eq!(
        test::call_service(&app, get("/api/v2/models", "198.51.100.1:4000").to_request()).await.status(),
        200
    );
    for _ in 0..10 {
        let res =
            test::call_service(&app, get("/api/v1/health/live", "198.51.100.1:4000").to_request()).await;
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("ratelimit-limit").is_none());
    }
    assert_eq!(
        test::call_service(&app, get("/metrics", "198.51.100.1:4000").to_request()).await.status(),
        200
    );
}

#[actix_web::test]
async fn clients_are_separate_and_forwarded_headers_need_a_trusted_proxy() {
    let app = test::init_service(create_app(tiny_state(&[
        "--rate-limit",
        "60/min:1",
        "--trusted-proxies",
        "10.0.0.0/8",
    ])))
    .await;
    let status = |req: TestRequest| {
        let app = &app;
        async move { test::call_service(app, req.to_request()).await.status().as_u16() }
    };
    // Two direct clients do not share a quota.
    assert_eq!(status(get("/api/v1/models", "203.0.113.1:1")).await, 200);
    assert_eq!(status(get("/api/v1/models", "203.0.113.1:2")).await, 429);
    assert_eq!(status(get("/api/v1/models", "203.0.113.2:1")).await, 200);
    // An untrusted peer cannot escape its quota by claiming another address.
    let spoof =
        |xff: &'static str| get("/api/v1/models", "203.0.113.1:3").insert_header(("x-forwarded-for", xff));
    assert_eq!(status(spoof("192.0.2.55")).await, 429);
    assert_eq!(status(spoof("192.0.2.56")).await, 429);
    // Behind a trusted proxy, the forwarded address is the client.
    let proxied =
        |xff: &'static str| get("/api/v1/models", "10.0.0.7:9").insert_header(("x-forwarded-for", xff));
    assert_eq!(status(proxied("192.0.2.10")).await, 200);
    assert_eq!(status(proxied("192.0.2.10")).await, 429);
    assert_eq!(status(proxied("192.0.2.11")).await, 200);
    // IPv6 addresses in one /64 are one client.
    assert_eq!(status(get("/api/v1/models", "[2001:db8:1:2::1]:1")).await, 200);
    assert_eq!(status(get("/api/v1/models", "[2001:db8:1:2::ffff]:1")).await, 429);
}

#[actix_web::test]
async fn api_keys_identify_clients_and_never_reach_the_logs() {
    let (state, logs) = tiny_state_logged(&["--api-keys", KEY, "--rate-limit", "60/min:2"]);
    let app = test::init_service(create_app(state)).await;
    let missing = test::call_service(&app, get("/api/v1/models", "192.0.2.1:1").to_request()).await;
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers().get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
    let body: Value = test::read_body_json(missing).await;
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = get("/api/v1/models", "192.0.2.1:1")
        .insert_header((header::AUTHORIZATION, "Bearer sk-wrong-0123456789abcdef"));
    assert_eq!(test::call_service(&app, wrong.to_request()).await.status(), 401);

    // The key is the client: the same key from two addresses shares one quota.
    let with_key = |peer: &str| {
        get("/api/v1/models", peer).insert_header((header::AUTHORIZATION, format!("Bearer {KEY}")))
    };
    assert_eq!(test::call_service(&app, with_key("192.0.2.1:1").to_request()).await.status(), 200);
    assert_eq!(test::call_service(&app, with_key("192.0.2.2:1").to_request()).await.status(), 200);
    assert_eq!(test::call_service(&app, with_key("192.0.2.3:1").to_request()).await.status(), 429);

    // Probes and the page need no key.
    assert_eq!(
        test::call_service(&app, get("/api/v1/health/ready", "192.0.2.1:1").to_request()).await.status(),
        200
    );
    assert_eq!(test::call_service(&app, get("/", "192.0.2.1:1").to_request()).await.status(), 200);

    let text = logs.text();
    assert!(!text.contains(KEY), "the key itself must never be logged");
    assert!(text.contains("\"client\":\"key:"), "the log names the client by fingerprint: {text}");
}

#[actix_web::test]
async fn open_streams_per_client_are_capped() {
    let app = test::init_service(create_app(tiny_state(&["--max-streams-per-client", "1"]))).await;
    let stream = || {
        TestRequest::post()
            .uri("/api/v1/inference/stream")
            .peer_addr("192.0.2.9:1".parse().unwrap())
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .set_payload(r#"{"prompt":"Hello","max_tokens":50}"#)
            .to_request()
    };
    let first = test::call_service(&app, stream()).await;
    assert_eq!(first.status(), 200);
    // The first stream is still open (its body not read): a second one is refused.
    let second = test::call_service(&app, stream()).await;
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key(header::RETRY_AFTER));
    let body: Value = test::read_body_json(second).await;
    assert_eq!(body["error"]["code"], "too_many_streams");
    // Another client is not affected.
    let other = TestRequest::post()
        .uri("/api/v1/inference/stream")
        .peer_addr("192.0.2.10:1".parse().unwrap())
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(r#"{"prompt":"Hello","max_tokens":2}"#)
        .to_request();
    assert_eq!(test::call_service(&app, other).await.status(), 200);
    // Finishing (or dropping) the first stream frees the slot.
    let _ = test::read_body(first).await;
    assert_eq!(test::call_service(&app, stream()).await.status(), 200);
}
