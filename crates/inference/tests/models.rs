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

fn start_mixed(dir: &Path) -> Result<OnnxEngine, InferenceError> {
    OnnxEngine::start(&EngineConfig {
        mixed_steps: true,
        ..EngineConfig::new(dir.to_path_buf(), ort_dylib())
    })
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

/// A copy of the tiny fused folder with `mixed` as its model_mixed.onnx (or none).
fn fused_folder(name: &str, mixed: Option<&Path>) -> PathBuf {
    let dir = scratch(name);
    for file in std::fs::read_dir(tiny_fused_model_dir()).unwrap() {
        let file = file.unwrap().path();
        if file.file_name().is_some_and(|n| n != "model_mixed.onnx") {
            std::fs::copy(&file, dir.join(file.file_name().unwrap())).unwrap();
        }
    }
    let _ = std::fs::remove_file(dir.join("model_mixed.onnx"));
    if let Some(mixed) = mixed {
        std::fs::copy(mixed, dir.join("model_mixed.onnx")).unwrap();
    }
    dir
}

#[test]
fn a_fused_folder_without_its_mixed_step_graph_still_serves() {
    let dir = fused_folder("no-mixed", None);
    // --mixed-steps asks for it; without the file the engine runs prompt chunks in passes of their own.
    let engine = start_mixed(&dir).expect("a fused folder without model_mixed.onnx starts");
    drop(engine);
}

#[test]
fn a_mixed_step_graph_that_does_not_match_is_named() {
    // The plain fused graph in the mixed graph's place: it lacks the chunk inputs.
    let dir = fused_folder("wrong-mixed", Some(&tiny_fused_model_dir().join("model.onnx")));
    assert!(start(&dir).is_ok(), "not loaded without --mixed-steps");
    let err = start_mixed(&dir).err().expect("fails").to_string();
    assert!(err.contains("model_mixed.onnx") && err.contains("chunk_ids"), "{err}");
}
