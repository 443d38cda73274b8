//! Micro-benchmarks of the per-request and per-token hot paths (criterion):
//! - `rate_limit/identify_and_check`: client identification (peer + forwarded headers → key) and
//!   a keyed GCRA check, with 1,000,000 clients already tracked; target < 1 µs median.
//! - `sse/encode_event`: one token event through the native format and actix-web-lab's SSE body.
//!
//! Also prints the limiter's memory with 1,000,000 keys before and after eviction.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::io::Write;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web_lab::sse::Sse;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use governor::Quota;
use governor::clock::{FakeRelativeClock, QuantaClock};
use streamgate_gateway::http::client_identity::{ClientKey, ClientResolver};
use streamgate_gateway::http::rate_limit::GovernorLimiter;
use streamgate_gateway::metrics::Metrics;
use streamgate_gateway::protocols::native::NativeFormat;
use streamgate_gateway::sse::{StreamMetrics, TokenEvents};
use streamgate_inference::{FinishReason, GenerationEvent, TokenStream, Usage};

const CLIENTS: u32 = 1_000_000;

fn quota() -> Quota {
    Quota::per_minute(NonZeroU32::new(60).unwrap()).allow_burst(NonZeroU32::new(20).unwrap())
}

fn rate_limit(c: &mut Criterion) {
    let limiter = GovernorLimiter::<ClientKey, _>::new(quota(), QuantaClock::default());
    for i in 0..CLIENTS {
        limiter.check_key(&ClientKey::V4(i));
    }
    let resolver = ClientResolver::new(vec!["10.0.0.0/8".parse().unwrap()], 64);
    let mut headers = HeaderMap::new();
    headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_static("198.51.100.7, 10.1.2.3"),
    );
    let direct: Vec<IpAddr> = (0..4096u32).map(|i| IpAddr::from((i * 244_141).to_be_bytes())).collect();
    let mut i = 0usize;
    let mut group = c.benchmark_group("rate_limit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("identify_and_check_direct_peer", |b| {
        b.iter(|| {
            i = (i + 1) % direct.len();
            let key = resolver.key_for(resolver.client_ip(direct[i], &HeaderMap::new()));
            black_box(limiter.check_key(&key))
        })
    });
    group.bench_function("identify_and_check_behind_proxy", |b| {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        b.iter(|| black_box(limiter.check_key(&resolver.key_for(resolver.client_ip(proxy, &headers)))))
    });
    group.finish();
}

fn sse_encoding(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let tokens = 256usize;
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Elements(tokens as u64 + 2));
    group.bench_function("encode_event", |b| {
        b.iter(|| {
            let mut events: Vec<streamgate_inference::Result<GenerationEvent>> = (0..tokens)
                .map(|index| Ok(GenerationEvent::Token { index, id: 42, text: " token".into() }))
                .collect();
            events.push(Ok(GenerationEvent::Finished {
                reason: FinishReason::Length,
                usage: Usage { prompt_tokens: 8, completion_tokens: tokens },
            }));
            let stream: TokenStream = Box::pin(futures_util::stream::iter(events));
            let body = TokenEvents::new(
                stream,
                NativeFormat,
                StreamMetrics::new(&metrics, "v1"),
                Box::pin(std::future::pending()),
                None,
                Instant::now(),
            );
            black_box(runtime.block_on(actix_web::body::to_bytes(Sse::from_stream(body))).unwrap())
        })
    });
    group.finish();
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4
}

fn limiter_memory(_: &mut Criterion) {
    let clock = FakeRelativeClock::default();
    let limiter = GovernorLimiter::<ClientKey, _>::new(quota(), clock.clone());
    let before = rss_kib();
    for i in 0..CLIENTS {
        limiter.check_key(&ClientKey::V6(u128::from(i) << 64));
    }
    let filled = rss_kib();
    clock.advance(Duration::from_secs(30));
    limiter.evict();
    let evicted = rss_kib();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "limiter memory: {CLIENTS} keys: RSS {before} KiB -> {filled} KiB (+{} bytes/key); after eviction {evicted} KiB, {} keys left",
        (filled.saturating_sub(before)) * 1024 / u64::from(CLIENTS),
        limiter.len()
    );
}

criterion_group!(benches, rate_limit, sse_encoding, limiter_memory);
criterion_main!(benches);
