//! streamgate's inference crate: decoder language models on ONNX Runtime, served as async token
//! streams. It knows nothing about HTTP.
//!
//! Data flows `Generator::generate` → [`scheduler`] (bounded queue, worker thread, the step loop
//! that batches decoding sequences, cancellation) → `sequence` (one generation: sample →
//! detokenize → stop → event) and [`model`] (ORT session, KV slot pool, prefix cache) →
//! [`sampling`] / [`tokenizer`] / [`stop`]. [`upstream`] is the other kind of engine: a remote
//! OpenAI-compatible model server, streamed through the same [`Generator`] trait.

pub mod chat;
pub mod error;
pub mod generator;
pub mod mock;
pub mod model;
pub mod model_files;
pub mod runtime;
pub mod sampling;
pub mod scheduler;
mod sequence;
pub mod stop;
pub mod tokenizer;
pub mod upstream;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::{InferenceError, Result};
pub use generator::{
    BoxFuture, EngineStats, FinishReason, GenerationEvent, GenerationRequest, Generator, ModelInfo,
    TokenStream, Usage,
};
pub use mock::{MockConfig, MockEngine};
pub use sampling::SamplingParams;
pub use scheduler::{
    DEFAULT_MAX_CONTEXT, DEFAULT_PREFILL_CHUNK, DEFAULT_PREFILL_PACE, DEFAULT_PREFIX_CACHE_MB, EngineConfig,
    OnnxEngine,
};
pub use upstream::{UpstreamConfig, UpstreamEngine, UpstreamSpec, UpstreamStatus};

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;

    /// The committed tiny test model (models/tiny-llama).
    pub fn tiny_model_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama")
    }
}
