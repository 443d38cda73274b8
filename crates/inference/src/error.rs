//! The inference crate's one error type. Every fallible public call returns [`InferenceError`];
//! the gateway maps each variant to an HTTP status in exactly one place.

use std::path::PathBuf;

/// Errors from loading a model or generating text.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// Engine settings that cannot work with this model on this machine.
    #[error("engine settings: {0}")]
    Config(String),

    /// The ONNX Runtime shared library could not be loaded.
    #[error(
        "could not load the ONNX Runtime library at {path}: {reason}. \
         Run `make setup` to fetch it, or point ORT_DYLIB_PATH / --ort-dylib-path at libonnxruntime.so.{expected_version}"
    )]
    RuntimeLibrary { path: PathBuf, reason: String, expected_version: &'static str },

    /// A model folder is missing a file, or a file does not parse.
    #[error("model folder {path}: {reason}")]
    ModelFiles { path: PathBuf, reason: String },

    /// The ONNX graph does not have the inputs/outputs of an Optimum decoder export.
    #[error("model {path} is not a supported decoder export: {reason}")]
    UnsupportedModel { path: PathBuf, reason: String },

    /// ONNX Runtime failed while creating a session or running the graph.
    #[error("onnx runtime: {0}")]
    Runtime(String),

    /// The tokenizer failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The prompt (in tokens) does not leave room for a single generated token.
    #[error("prompt is {prompt_tokens} tokens; the model's context is {context_length} tokens")]
    PromptTooLong { prompt_tokens: usize, context_length: usize },

    /// The request is invalid (empty prompt, out-of-range parameter, bad chat template input...).
    #[error("{0}")]
    InvalidRequest(String),

    /// The bounded admission queue is full: try again later.
    #[error("the model's queue is full ({capacity} waiting requests)")]
    Overloaded { capacity: usize },

    /// The engine's worker has stopped (shutdown or a fatal error).
    #[error("the inference engine is not running")]
    EngineStopped,

    /// A remote model server failed: no connection, an error status, or a stream that broke.
    #[error("upstream {url}: {message}")]
    Upstream { url: String, message: String },

    /// A remote model server sent nothing within the first-byte timeout.
    #[error("upstream {url}: no answer within {after_ms} ms")]
    UpstreamTimeout { url: String, after_ms: u64 },

    /// A remote model server refused for rate (429): the client should wait this many seconds.
    #[error("the upstream model server is rate limiting")]
    UpstreamRateLimited { retry_after: Option<u64> },

    /// No remote model server can take the request now (each answered 503, or each was taken
    /// out by its circuit breaker).
    #[error("no upstream model server is available: {reason}")]
    UpstreamUnavailable { retry_after: Option<u64>, reason: String },
}

impl InferenceError {
    pub(crate) fn runtime(e: impl std::fmt::Display) -> Self {
        Self::Runtime(e.to_string())
    }

    pub(crate) fn tokenizer(e: impl std::fmt::Display) -> Self {
        Self::Tokenizer(e.to_string())
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = InferenceError> = std::result::Result<T, E>;
