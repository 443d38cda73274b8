//! Paths and helpers shared by the inference crate's integration tests.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use futures_util::StreamExt;
use streamgate_inference::{
    EngineConfig, GenerationEvent, GenerationRequest, Generator, OnnxEngine, SamplingParams, TokenStream,
    runtime::DEFAULT_DYLIB_PATH,
};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tiny_model_dir() -> PathBuf {
    repo_root().join("models/tiny-llama")
}

/// The same tiny weights, quantized, in the fused layout (models/tiny-llama-fused).
pub fn tiny_fused_model_dir() -> PathBuf {
    repo_root().join("models/tiny-llama-fused")
}

/// The default model, SmolLM2-135M in the fused layout (`make setup` builds it).
pub fn smollm2_dir() -> PathBuf {
    repo_root().join(".cache/models/smollm2-135m-instruct")
}

/// The library `make setup` extracts (tests run through `make test`, which prepares it).
pub fn ort_dylib() -> PathBuf {
    repo_root().join(DEFAULT_DYLIB_PATH)
}

pub fn tiny_engine(max_active: usize, queue_capacity: usize) -> OnnxEngine {
    engine_with(&tiny_model_dir(), max_active, queue_capacity, streamgate_inference::DEFAULT_PREFILL_CHUNK)
}

pub fn engine_with(
    model_dir: &std::path::Path,
    max_active: usize,
    queue_capacity: usize,
    prefill_chunk: usize,
) -> OnnxEngine {
    OnnxEngine::start(&config_for(model_dir, max_active, queue_capacity, prefill_chunk))
        .expect("tiny engine starts (run `make setup` first)")
}

pub fn config_for(
    model_dir: &std::path::Path,
    max_active: usize,
    queue_capacity: usize,
    prefill_chunk: usize,
) -> EngineConfig {
    EngineConfig {
        max_active,
        queue_capacity,
        prefill_chunk,
        prefix_cache_mb: 64,
        ..EngineConfig::new(model_dir.to_path_buf(), ort_dylib())
    }
}

pub fn request(prompt: &str, max_tokens: usize) -> GenerationRequest {
    request_with(prompt, max_tokens, SamplingParams::default(), vec![])
}

/// A request with its own sampling parameters and stop sequences.
pub fn request_with(
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
) -> GenerationRequest {
    GenerationRequest::new(prompt, max_tokens, sampling, stop).expect("a valid request")
}

/// Drain a stream into its events.
pub async fn collect(mut stream: TokenStream) -> Vec<GenerationEvent> {
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event.expect("no error events"));
    }
    events
}

pub fn text_and_ids(events: &[GenerationEvent]) -> (String, Vec<u32>) {
    let mut text = String::new();
    let mut ids = Vec::new();
    for e in events {
        if let GenerationEvent::Token { text: t, id, .. } = e {
            text.push_str(t);
            ids.push(*id);
        }
    }
    (text, ids)
}

pub async fn generate(engine: &impl Generator, req: GenerationRequest) -> Vec<GenerationEvent> {
    collect(engine.generate(req).await.expect("admitted")).await
}
