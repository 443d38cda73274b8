//! Model folders that do not fit: clear errors naming what is missing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use streamgate_inference::{EngineConfig, InferenceError, OnnxEngine};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamgate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(dir: &Path) -> Result<OnnxEngine, InferenceError> {
    OnnxEngine::start(&EngineConfig::new(dir.to_path_buf(), ort_dylib()))
}

#[test]
fn missing_model_onnx_is_named() {
    let dir = scratch("no-onnx");
    std::fs::copy(tiny_model_dir().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let err = start(&dir).err().expect("fails").to_string();
    assert!(err.contains("missing model.onnx"), "{err}");
}

#[test]
fn a_corrupt_onnx_file_is_unsupported_not_a_panic() {
    let dir = scratch("corrupt");
    std::fs::copy(tiny_model_dir().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("model.onnx"), b"definitely not protobuf").unwrap();
    assert!(matches!(start(&dir), Err(InferenceError::UnsupportedModel { .. })));
}

#[test]
fn a_graph_without_past_inputs_names_the_missing_input() {
    let err = start(&repo_root().join("models/fixtures/no-past")).err().expect("fails").to_string();
    assert!(err.contains("past_key_values.0.key"), "{err}");
}

#[test]
fn a_corrupt_tokenizer_is_a_model_files_error() {
    let dir = scratch("bad-tokenizer");
    std::fs::copy(tiny_model_dir().join("model.onnx"), dir.join("model.onnx")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{\"nope\": 1}").unwrap();
    assert!(matches!(start(&dir), Err(InferenceError::ModelFiles { .. })));
}
