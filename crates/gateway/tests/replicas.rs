//! Replicas sharing state through Redis: two real `streamgate` binaries on 127.0.0.1:0 with
//! `--state redis://…`, a real `redis-server` started on a free port, real HTTP and SSE.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A chat prompt SmolLM2 answers at length under greedy decoding (checked: 400 tokens, no EOS):
/// a stream that outlasts the grace period however fast the machine decodes.
const LONG: &str = "Write the numbers from 1 to 1000, separated by commas.";

/// Two replicas of the same model behind one Redis.
fn replicas(redis: &RedisServer, model: &str, extra: &[&str]) -> (Server, Server) {
    let url = redis.url();
    let mut args = vec!["--model", model, "--state", url.as_str(), "--intra-threads", "1"];
    args.extend_from_slice(extra);
    (Server::start(&args), Server::start(&args))
}

fn smollm2_v1() -> String {
    format!("v1={}", smollm2().display())
}

fn tiny_v1() -> String {
    format!("v1={}", tiny_model().display())
}

async fn metrics(server: &Server) -> String {
    let mut res = client().get(server.url("/metrics")).send().await.unwrap();
    String::from_utf8(res.body().await.unwrap().to_vec()).unwrap()
}

/// The text of native token events.
fn text_of(payloads: &[String]) -> String {
    payloads
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_owned))
        .collect()
}

fn stream_query(max_tokens: u32) -> String {
    format!(
        "/api/v1/inference/stream?prompt={}&chat=true&max_tokens={max_tokens}&temperature=0",
        LONG.replace(' ', "+").replace(',', "%2C")
    )
}

#[actix_rt::test]
async fn a_stream_started_on_one_replica_continues_on_another_after_a_reconnect() {
    let redis = RedisServer::start();
    // A grace period much shorter than the generation: replica A keeps generating only because
    // replica B tells it (through Redis) that the stream is being read. And a small quota on the
    // `other` routes, which the end of the test spends across both replicas. Redis gets 2 s per
    // command instead of 250 ms: on a loaded test machine (other tests decode at the same time) a
    // slow answer would count as an outage, and a replica that thinks Redis is down resumes only
    // its own streams (a 404 here), which is what another test checks, not this one.
    let (a, b) = replicas(
        &redis,
        &smollm2_v1(),
        &["--disconnect-grace-secs", "1", "--rate-limit-rule", "other=4/min:4", "--state-timeout-ms", "2000"],
    );
    let whole: Value = client()
        .post(a.url("/api/v1/inference"))
        .send_json(&json!({"prompt": LONG, "chat": true, "max_tokens": 300, "temperature": 0}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // EventSource style: GET, read 5 events, drop the connection.
    let uri = stream_query(300);
    let res = client().get(a.url(&uri)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let stream_id = res.headers().get("x-stream-id").unwrap().to_str().unwrap().to_owned();
    let mut first = SseReader::new(res);
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(first.next_data().await.unwrap());
    }
    let last_id = first.last_id.clone().unwrap();
    assert_eq!(last_id, format!("{stream_id}-5"));
    drop(first);

    // The browser reconnects, and the load balancer sends it to the other replica.
    let res =
        client().get(b.url(&uri)).insert_header(("last-event-id", last_id.as_str())).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers().get("x-stream-id").unwrap().to_str().unwrap(), stream_id);
    let mut second = SseReader::new(res);
    let first_resumed = second.next_data().await.unwrap();
    assert_eq!(
        second.last_id.as_deref(),
        Some(format!("{stream_id}-6").as_str()),
        "no event skipped or repeated"
    );
    let mut rest = vec![first_resumed];
    rest.extend(second.rest().await);
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "a resumed stream ends like any other");
    let finish: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(finish["finish_reason"], "length", "it ran to its end, not cancelled");
    assert_eq!(whole["finish_reason"], "length");

    seen.extend(rest);
    assert_eq!(text_of(&seen), whole["text"].as_str().unwrap(), "the same text as an uninterrupted run");
    let on_b = metrics(&b).await;
    assert_eq!(
        metric(&on_b, r#"streamgate_engine_admitted_requests{version="v1"}"#),
        Some(0.0),
        "B's model never ran"
    );
    assert_eq!(metric(&on_b, r#"streamgate_resumed_streams_total{version="v1"}"#), Some(1.0));
    assert_eq!(metric(&on_b, r#"streamgate_active_streams{version="v1"}"#), Some(0.0), "{on_b}");

    // After the end, either replica answers a resume from the last event with `[DONE]` again.
    for server in [&a, &b] {
        let done = format!("{stream_id}-{}", seen.len());
        let uri = format!("/api/v1/streams/{stream_id}");
        let res = client().get(server.url(&uri)).insert_header(("last-event-id", done)).send().await.unwrap();
        assert_eq!(SseReader::new(res).rest().await, vec!["[DONE]"]);
    }

    // The same two replicas hold one quota for the client: 4 requests spread over both pass,
    // the 5th is refused whichever replica it reaches.
    assert_one_quota_across(&a, &b).await;
}

/// With a 4-request quota on `/api/v1/models`: A, B, A, B pass (remaining 3, 2, 1, 0), then
/// both refuse.
async fn assert_one_quota_across(a: &Server, b: &Server) {
    let mut remaining = Vec::new();
    for server in [a, b, a, b] {
        let res = client().get(server.url("/api/v1/models")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        remaining.push(res.headers().get("ratelimit-remaining").unwrap().to_str().unwrap().to_owned());
    }
    assert_eq!(remaining, ["3", "2", "1", "0"], "one quota, counted on both replicas");
    for server in [a, b] {
        let res = client().get(server.url("/api/v1/models")).send().await.unwrap();
        assert_eq!(res.status(), 429, "the 5th request in the window is refused wherever it lands");
        let retry: u64 = res.headers().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
        assert!((1..=15).contains(&retry), "retry after {retry} s");
    }
}

#[actix_rt::test]
async fn one_client_quota_holds_across_replicas() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis, &tiny_v1(), &["--rate-limit", "4/min:4"]);
    assert_one_quota_across(&a, &b).await;
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("streamgate:quota:*"));
    assert_eq!(keys, ["streamgate:quota:v1.other:4:7f000001"], "one key per scope and client");
}

#[actix_rt::test]
async fn another_clients_stream_is_not_found_on_any_replica() {
    let redis = RedisServer::start();
    let (alice, bob) = ("alice-key-0123456789abcdef", "bob-key-0123456789abcdef00");
    let keys = format!("{alice},{bob}");
    let (a, b) = replicas(&redis, &tiny_v1(), &["--api-keys", &keys]);
    let res = client()
        .post(a.url("/api/v1/inference/stream"))
        .bearer_auth(alice)
        .send_json(&json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}))
        .await
        .unwrap();
    let stream_id = res.headers().get("x-stream-id").unwrap().to_str().unwrap().to_owned();
    let all = SseReader::new(res).rest().await;
    assert_eq!(all.last().map(String::as_str), Some("[DONE]"));

    let resume = |server: &Server, key: &str, id: &str| {
        client().get(server.url(&format!("/api/v1/streams/{id}?after=2"))).bearer_auth(key).send()
    };
    for server in [&a, &b] {
        let mut theirs = resume(server, bob, &stream_id).await.unwrap();
        assert_eq!(theirs.status(), 404);
        let mut unknown = resume(server, bob, "0123456789abcdef0123456789abcdef").await.unwrap();
        assert_eq!(unknown.status(), 404);
        assert_eq!(
            theirs.body().await.unwrap(),
            unknown.body().await.unwrap(),
            "the same answer as an unknown id"
        );
    }
    let mine = resume(&b, alice, &stream_id).await.unwrap();
    assert_eq!(mine.status(), 200);
    assert_eq!(SseReader::new(mine).rest().await, all[2..], "its owner resumes it on the other replica");
}

#[actix_rt::test]
async fn redis_stopping_mid_run_degrades_to_local_state_without_errors() {
    let mut redis = RedisServer::start();
    let (a, b) = replicas(&redis, &smollm2_v1(), &["--rate-limit", "100/min:50"]);
    let res = client().get(a.url(&stream_query(64))).send().await.unwrap();
    let mut running = SseReader::new(res);
    running.next_data().await.unwrap();
    let ok_before = metrics(&a).await;
    assert_eq!(metric(&ok_before, "streamgate_state_backend_up"), Some(1.0));

    redis.stop();
    let rest = running.rest().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "the open stream is not disturbed");
    let finish: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(finish["finish_reason"], "length");

    // Every kind of request still succeeds on both replicas, answered with their own state.
    for server in [&a, &b] {
        for _ in 0..3 {
            let res = client().get(server.url("/api/v1/models")).send().await.unwrap();
            assert_eq!(res.status(), 200);
        }
        let res = client().get(server.url(&stream_query(4))).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let stream_id = res.headers().get("x-stream-id").unwrap().to_str().unwrap().to_owned();
        assert_eq!(SseReader::new(res).rest().await.last().map(String::as_str), Some("[DONE]"));
        // Resume still works on the replica that ran it.
        let res =
            client().get(server.url(&format!("/api/v1/streams/{stream_id}?after=1"))).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(SseReader::new(res).rest().await.last().map(String::as_str), Some("[DONE]"));
    }
    let degraded = metrics(&a).await;
    assert_eq!(metric(&degraded, "streamgate_state_backend_up"), Some(0.0), "{degraded}");
    assert!(metric(&degraded, "streamgate_quota_fallbacks_total").is_some_and(|n| n >= 1.0), "{degraded}");
    assert!(!a.logs_with("shared state backend unavailable: this replica uses its own quotas and resumes only its own streams").is_empty());
    for server in [&a, &b] {
        let failed: Vec<_> = server
            .logs_with("request")
            .into_iter()
            .filter(|l| l["status"].as_u64().unwrap_or(0) >= 500)
            .collect();
        assert!(failed.is_empty(), "no 5xx: {failed:?}");
    }

    // Redis is back: the probe notices within a few seconds.
    redis.restart();
    let mut up = None;
    for _ in 0..50 {
        up = metric(&metrics(&b).await, "streamgate_state_backend_up");
        if up == Some(1.0) {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up, Some(1.0), "the backend is used again once it answers");
}
