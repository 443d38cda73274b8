//! Micro-benchmarks of the per-request and per-token hot paths (criterion):
//! - `rate_limit/identify_and_check`: client identification (peer + forwarded headers → key) and
//!   a keyed GCRA check, with 1,000,000 clients already tracked; target < 1 µs median.
//! - `sse/encode_event`: one token event through the native format and actix-web-lab's SSE body.
//! - `sampling/*`: choosing one token from a 49,152-token vocabulary (SmolLM2's) at the native
//!   API's defaults (temperature 0.7, top-p 0.9), by the engine's sampler and by the whole-vocabulary
//!   sort it replaced (the baseline, kept here to measure against), per sequence and token.
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
use streamgate_inference::sampling::Sampler;
use streamgate_inference::{FinishReason, GenerationEvent, SamplingParams, TokenStream, Usage};

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

/// Logits shaped like a small language model's: a normal bulk (sd 2.5) and a few clear leaders
/// 12-16 above it; deterministic (xorshift, Box-Muller).
fn synthetic_logits(vocab: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut logits: Vec<f32> = (0..vocab)
        .map(|_| ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos() * 2.5) as f32)
        .collect();
    for (i, lead) in [16.0, 15.2, 14.1, 13.5, 12.0].into_iter().enumerate() {
        logits[(i * 7919 + 11) % vocab] = lead;
    }
    logits
}

/// The sampler before 2026-12-02: every token's (id, logit) sorted, then softmax
/// and the nucleus cut in sorted order. The baseline the engine's sampler is measured against.
fn full_sort_sample(
    logits: &[f32],
    temperature: f32,
    top_p: f64,
    draw: f64,
    scratch: &mut Vec<(u32, f32)>,
) -> u32 {
    let inv_t = 1.0 / temperature;
    scratch.clear();
    scratch.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
    scratch.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let max = scratch.first().map_or(0.0, |c| c.1);
    let mut total = 0.0f64;
    for c in scratch.iter_mut() {
        c.1 = (c.1 - max).exp();
        total += f64::from(c.1);
    }
    let target = top_p * total;
    let mut mass = 0.0f64;
    let keep = scratch.iter().position(|c| {
        mass += f64::from(c.1);
        mass >= target
    });
    scratch.truncate(keep.map_or(scratch.len(), |k| k + 1));
    let mut left = draw * mass.min(total);
    for c in scratch.iter() {
        left -= f64::from(c.1);
        if left <= 0.0 {
            return c.0;
        }
    }
    scratch.last().map_or(0, |c| c.0)
}

fn sampling(c: &mut Criterion) {
    let mut logits = synthetic_logits(49_152);
    let params =
        |top_p| SamplingParams { temperature: 0.7, top_p, seed: Some(1), ..SamplingParams::default() };
    let mut group = c.benchmark_group("sampling");
    group.throughput(Throughput::Elements(1));
    let mut nucleus = Sampler::new(params(0.9));
    group.bench_function("top_p_0.9", |b| b.iter(|| black_box(nucleus.sample(&mut logits, &[]))));
    let mut whole = Sampler::new(params(1.0));
    group.bench_function("top_p_1", |b| b.iter(|| black_box(whole.sample(&mut logits, &[]))));
    let mut scratch = Vec::new();
    let mut i = 0u32;
    group.bench_function("top_p_0.9_full_sort_baseline", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let draw = f64::from(i % 1000) / 1000.0;
            black_box(full_sort_sample(&logits, 0.7, 0.9, draw, &mut scratch))
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

criterion_group!(benches, rate_limit, sse_encoding, sampling, limiter_memory);
criterion_main!(benches);
