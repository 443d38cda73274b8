//! What both graph layouts read from an ONNX graph and share: its shape, the KV cache inputs and
//! outputs, the handle that interrupts a run, and the error for a graph that is not what its
//! layout needs. The layouts ([`super::fused`], [`super::optimum`]) import this module, never
//! their parent.

use std::sync::Arc;

use ort::session::{NoSelectedOutputs, RunOptions, Session};
use ort::value::TensorElementType;

use crate::error::{InferenceError, Result};
use crate::model_files::ModelFiles;

/// Shape facts discovered from the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
}

impl ModelShape {
    /// The cache's input and output names, `[k0, v0, k1, v1, ...]` each.
    pub(crate) fn cache_names(&self) -> (Vec<String>, Vec<String>) {
        let names = |prefix: &str| {
            (0..self.layers)
                .flat_map(|i| [format!("{prefix}.{i}.key"), format!("{prefix}.{i}.value")])
                .collect()
        };
        (names("past_key_values"), names("present"))
    }
}

/// A handle that stops a running forward pass (a long prefill) from another thread.
#[derive(Clone)]
pub struct Interrupt(pub(super) Arc<RunOptions<NoSelectedOutputs>>);

impl Interrupt {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self(Arc::new(RunOptions::new().map_err(InferenceError::runtime)?)))
    }

    /// Make the current and every later run of this model fail at once (shutdown).
    pub fn terminate(&self) {
        // A failure here only means the run finishes normally; shutdown proceeds either way.
        let _ = self.0.terminate();
    }
}

/// What both layouts read from a graph: its KV cache inputs and outputs and its vocabulary.
pub(crate) struct CacheIo {
    /// Layers, counted by `past_key_values.{i}.key` inputs; each has its value input and both
    /// `present.{i}.*` outputs.
    pub layers: usize,
    /// `past_key_values.0.key`'s dimensions (-1 where symbolic).
    pub past_dims: Vec<i64>,
    /// The last dimension of `logits`, when fixed.
    pub vocab_size: Option<usize>,
}

impl CacheIo {
    /// `Ok(None)` when the graph has no `past_key_values.0.key` (each layout explains that its way);
    /// otherwise the facts, or the name of the first missing or mistyped input or output.
    pub(crate) fn read(session: &Session) -> std::result::Result<Option<Self>, String> {
        let (inputs, outputs) = (session.inputs(), session.outputs());
        let input = |name: &str| inputs.iter().find(|o| o.name() == name);
        let has_output = |name: &str| outputs.iter().any(|o| o.name() == name);
        let Some(past) = input("past_key_values.0.key") else { return Ok(None) };
        let mut layers = 0;
        while input(&format!("past_key_values.{layers}.key")).is_some() {
            let value = format!("past_key_values.{layers}.value");
            if input(&value).is_none() {
                return Err(format!("missing input '{value}'"));
            }
            for name in [format!("present.{layers}.key"), format!("present.{layers}.value")] {
                if !has_output(&name) {
                    return Err(format!("missing output '{name}'"));
                }
            }
            layers += 1;
        }
        if past.dtype().tensor_type() != Some(TensorElementType::Float32) {
            return Err(format!(
                "past_key_values must be float32 (found {:?}); export the model in fp32",
                past.dtype().tensor_type()
            ));
        }
        let logits = outputs.iter().find(|o| o.name() == "logits").ok_or("missing output 'logits'")?;
        Ok(Some(Self {
            layers,
            past_dims: past.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default(),
            vocab_size: logits
                .dtype()
                .tensor_shape()
                .and_then(|s| s.last().copied())
                .filter(|d| *d > 0)
                .map(|d| d as usize),
        }))
    }

    /// Dimension `i` of the past input, when fixed in the graph.
    pub(crate) fn past_dim(&self, i: usize) -> Option<usize> {
        self.past_dims.get(i).copied().filter(|d| *d > 0).map(|d| d as usize)
    }
}

/// The error for a graph that has the layout's marker input but not the rest of it.
pub(crate) fn unsupported(files: &ModelFiles, reason: String) -> InferenceError {
    InferenceError::UnsupportedModel { path: files.onnx_path.clone(), reason }
}
