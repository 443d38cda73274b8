//! Runtime and model-loading failures are typed errors with instructions, never panics.
//! (Its own test binary: the ONNX Runtime library is loaded once per process.)
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::*;
use streamgate_inference::{EngineConfig, InferenceError, OnnxEngine};

fn config(model_dir: std::path::PathBuf, dylib: std::path::PathBuf) -> EngineConfig {
    EngineConfig::new(model_dir, dylib)
}

#[test]
fn missing_runtime_library_says_what_to_run() {
    let err = OnnxEngine::start(&config(tiny_model_dir(), "/nonexistent/libonnxruntime.so.1.31.1".into()))
        .err()
        .expect("must fail");
    assert!(matches!(err, InferenceError::RuntimeLibrary { .. }));
    let message = err.to_string();
    assert!(message.contains("make setup") && message.contains("ORT_DYLIB_PATH"), "{message}");
}

#[test]
fn not_a_library_is_an_error_not_a_panic() {
    let err = OnnxEngine::start(&config(tiny_model_dir(), tiny_model_dir().join("config.json"))).err();
    assert!(matches!(err, Some(InferenceError::RuntimeLibrary { .. })), "{err:?}");
}
