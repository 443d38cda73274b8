//! streamgate in front of a remote model server: the real binary twice, the second one serving
//! the model as a real OpenAI-compatible upstream (`/v1/chat/completions`), the first one with
//! `--model v1=openai+http://…/v1?model=v1`. Real HTTP and SSE on both hops.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PROMPT: &str = "Once upon a time";
/// A chat prompt SmolLM2 answers at length under greedy decoding (400 tokens, no EOS).
const LONG: &str = "Write the numbers from 1 to 1000, separated by commas.";

fn upstream(model: String, extra: &[&str]) -> Server {
    let mut args = vec!["--model".to_owned(), model, "--rate-limit".into(), "off".into()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn front(urls: &[String], extra: &[&str]) -> Server {
    let spec = format!("v1=openai+{}?model=v1", urls.join("|"));
    let mut args = vec!["--model", spec.as_str(), "--rate-limit", "off"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

async fn metrics(server: &Server) -> String {
    let mut res = client().get(server.url("/metrics")).send().await.unwrap();
    String::from_utf8(res.body().await.unwrap().to_vec()).unwrap()
}

/// Poll a metric until it reads `want` (bounded), returning what it last read.
async fn wait_metric(server: &Server, name: &str, want: f64) -> Option<f64> {
    let mut last = None;
    for _ in 0..100 {
        last = metric(&metrics(server).await, name);
        if last == Some(want) {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

async fn sse(
    res: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
    >,
) -> Vec<Value> {
    assert_eq!(res.status(), 200);
    let all = SseReader::new(res).rest().await;
    assert_eq!(all.last().map(String::as_str), Some("[DONE]"), "{all:?}");
    all[..all.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// A raw prompt (not a conversation) goes to the upstream's `/completions`: streamgate serves
/// that too, with the same greedy text as its native route.
#[actix_rt::test]
async fn a_raw_prompt_through_the_front_is_a_text_completion_upstream() {
    let up = upstream(format!("v1={}", tiny_model().display()), &[]);
    let gw = front(&[up.url("/v1")], &[]);
    let raw = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0});
    let direct = sse(client().post(up.url("/api/v1/inference/stream")).send_json(&raw).await.unwrap()).await;
    let expected: String = direct.iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(!expected.is_empty());
    let completion_tokens = &direct.last().unwrap()["usage"]["completion_tokens"];

    let completions = sse(client()
        .post(up.url("/v1/completions"))
        .send_json(
            &json!({"model": "v1", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .await
        .unwrap())
    .await;
    assert!(completions.iter().all(|c| c["object"] == "text_completion"), "{completions:?}");
    let text: String = completions.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, expected, "the upstream's /v1/completions");
    assert_eq!(&completions.last().unwrap()["usage"]["completion_tokens"], completion_tokens);

    let through = sse(client().post(gw.url("/api/v1/inference/stream")).send_json(&raw).await.unwrap()).await;
    let text: String = through.iter().filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(text, expected, "a raw prompt through the front");
    assert_eq!(&through.last().unwrap()["usage"]["completion_tokens"], completion_tokens);
}

#[actix_rt::test]
async fn greedy_text_through_the_front_equals_the_upstream_on_every_route() {
    let up = upstream(format!("v1={}", tiny_model().display()), &[]);
    let gw = front(&[up.url("/v1")], &[]);
    let direct: Value = client()
        .post(up.url("/v1/chat/completions"))
        .send_json(&json!({"model": "v1", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = direct["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(!expected.is_empty());
    let completion_tokens = &direct["usage"]["completion_tokens"];

    let native = sse(client()
        .post(gw.url("/api/v1/inference/stream"))
        .send_json(&json!({"prompt": PROMPT, "chat": true, "max_tokens": 24, "temperature": 0}))
        .await
        .unwrap())
    .await;
    let text: String = native.iter().filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(text, expected, "native route");
    let finish = native.last().unwrap();
    assert_eq!(finish["finish_reason"], direct["choices"][0]["finish_reason"]);
    assert_eq!(
        &finish["usage"]["completion_tokens"], completion_tokens,
        "the upstream's usage is carried through"
    );

    let openai = sse(client()
        .post(gw.url("/v1/chat/completions"))
        .send_json(
            &json!({"model": "v1", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
            "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await
        .unwrap())
    .await;
    let text: String = openai.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, expected, "OpenAI route");
    assert_eq!(&openai.last().unwrap()["usage"]["completion_tokens"], completion_tokens);

    let ui = sse(client()
        .post(gw.url("/api/v1/chat"))
        .send_json(
            &json!({"messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": PROMPT}]}],
            "max_tokens": 24, "temperature": 0}),
        )
        .await
        .unwrap())
    .await;
    let text: String =
        ui.iter().filter(|p| p["type"] == "text-delta").filter_map(|p| p["delta"].as_str()).collect();
    assert_eq!(text, expected, "AI SDK route");

    // The front counts every answer against the upstream URL, and reports it ready.
    let m = metrics(&gw).await;
    let url = up.url("/v1");
    assert_eq!(
        metric(&m, &format!(r#"streamgate_upstream_first_byte_seconds_count{{url="{url}",version="v1"}}"#)),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &format!(r#"streamgate_upstream_open_streams{{url="{url}",version="v1"}}"#)),
        Some(0.0)
    );
    let ready: Value =
        client().get(gw.url("/api/v1/health/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["upstreams"], json!([{"url": url, "available": true}]));
}

#[actix_rt::test]
async fn killing_the_upstream_mid_stream_gives_an_error_event_then_done() {
    let mut up = upstream(format!("v1={}", smollm2().display()), &["--intra-threads", "1"]);
    let gw = front(&[up.url("/v1")], &[]);
    let res = client()
        .post(gw.url("/api/v1/inference/stream"))
        .send_json(&json!({"prompt": LONG, "chat": true, "max_tokens": 300, "temperature": 0}))
        .await
        .unwrap();
    let mut reader = SseReader::new(res);
    for _ in 0..3 {
        let token: Value = serde_json::from_str(&reader.next_data().await.unwrap()).unwrap();
        assert!(token["text"].is_string(), "{token}");
    }
    up.child.kill().unwrap();
    let rest = reader.rest().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_error", "{rest:?}");
    assert_eq!(wait_metric(&gw, r#"streamgate_active_streams{version="v1"}"#, 0.0).await, Some(0.0));
    let log = gw.request_log("/api/v1/inference/stream");
    assert!(
        log["error"].as_str().is_some_and(|e| e.contains(&up.url("/v1"))),
        "the log names the upstream: {log}"
    );
}

#[actix_rt::test]
async fn a_dead_first_url_fails_over_to_the_second_before_the_first_token() {
    let up = upstream(format!("v1={}", tiny_model().display()), &[]);
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", listener.local_addr().unwrap())
    };
    let gw = front(&[dead.clone(), up.url("/v1")], &[]);
    let events = sse(client()
        .post(gw.url("/api/v1/inference/stream"))
        .send_json(&json!({"prompt": PROMPT, "chat": true, "max_tokens": 8, "temperature": 0}))
        .await
        .unwrap())
    .await;
    assert!(events.iter().any(|e| e["text"].is_string()), "{events:?}");
    assert!(events.iter().all(|e| e.get("error").is_none()), "{events:?}");
    let m = metrics(&gw).await;
    assert_eq!(
        metric(
            &m,
            &format!(r#"streamgate_upstream_errors_total{{kind="connect",url="{dead}",version="v1"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            &format!(
                r#"streamgate_upstream_first_byte_seconds_count{{url="{}",version="v1"}}"#,
                up.url("/v1")
            )
        ),
        Some(1.0)
    );
}

#[actix_rt::test]
async fn a_client_disconnect_closes_the_upstream_connection() {
    // No grace period on either side: the stream is not kept for a resume, so leaving cancels.
    let up = upstream(
        format!("v1={}", smollm2().display()),
        &["--intra-threads", "1", "--disconnect-grace-secs", "0"],
    );
    let gw = front(&[up.url("/v1")], &["--disconnect-grace-secs", "0"]);
    let res = client()
        .post(gw.url("/v1/chat/completions"))
        .send_json(&json!({"model": "v1", "messages": [{"role": "user", "content": LONG}], "max_tokens": 300,
            "temperature": 0, "stream": true}))
        .await
        .unwrap();
    let mut reader = SseReader::new(res);
    for _ in 0..3 {
        reader.next_data().await.unwrap();
    }
    assert_eq!(metric(&metrics(&up).await, r#"streamgate_active_streams{version="v1"}"#), Some(1.0));
    drop(reader);
    assert_eq!(
        wait_metric(&up, r#"streamgate_active_streams{version="v1"}"#, 0.0).await,
        Some(0.0),
        "the upstream saw the close"
    );
    assert_eq!(
        wait_metric(&up, r#"streamgate_engine_active_generations{version="v1"}"#, 0.0).await,
        Some(0.0),
        "and stopped generating"
    );
    let url = up.url("/v1");
    assert_eq!(
        wait_metric(&gw, &format!(r#"streamgate_upstream_open_streams{{url="{url}",version="v1"}}"#), 0.0)
            .await,
        Some(0.0)
    );
}
