//! The Optimum "text-generation-with-past" layout: an fp32 export whose cache grows by
//! concatenation. Each call to [`OptimumModel::forward`] feeds new tokens plus the cache, and swaps
//! the cache for the graph's `present.*` outputs (an `Arc` handle, no copy):
//!
//! ```text
//! input_ids                  i64 [batch, seq]
//! attention_mask             i64 [batch, past + seq]
//! position_ids (optional)    i64 [batch, seq]
//! past_key_values.{i}.key    f32 [batch, kv_heads, past, head_dim]   (and .value), i in 0..layers
//! -> logits                  f32 [batch, seq, vocab]
//! -> present.{i}.key         f32 [batch, kv_heads, past + seq, head_dim]   (and .value)
//! ```
//!
//! Layer count, KV heads and head size come from the session's input metadata, so any model in
//! this layout loads without per-model code. This is the layout of users' own exports and of the
//! fp32 reference graph the fused default model is measured against.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use super::graph::{CacheIo, Interrupt, ModelShape, unsupported};
use crate::error::{InferenceError, Result};
use crate::model_files::ModelFiles;

/// Per-sequence attention cache: one key and one value tensor per layer.
pub struct Cache {
    /// `[k0, v0, k1, v1, ...]`, each `[1, kv_heads, len, head_dim]`.
    values: Vec<DynValue>,
    len: usize,
}

impl Cache {
    /// Number of positions cached (prompt + generated so far).
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

/// An Optimum-layout session, owned by one worker thread.
pub struct OptimumModel {
    session: Session,
    shape: ModelShape,
    has_position_ids: bool,
    interrupt: Interrupt,
    /// The last token's logits, copied out of the run's output.
    logits: Vec<f32>,
    /// A decode step's logits, one row per sequence.
    rows: Vec<f32>,
    /// Input names for the cache, in `Cache::values` order.
    past_names: Vec<String>,
    present_names: Vec<String>,
}

impl OptimumModel {
    /// Check the graph has the inputs and outputs of a decoder with past.
    pub(super) fn new(session: Session, files: &ModelFiles, interrupt: Interrupt) -> Result<Self> {
        let (shape, has_position_ids) = discover_shape(&session, files)?;
        let (past_names, present_names) = shape.cache_names();
        Ok(Self {
            logits: Vec::with_capacity(shape.vocab_size),
            rows: Vec::new(),
            session,
            shape,
            has_position_ids,
            interrupt,
            past_names,
            present_names,
        })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    /// A cache holding no positions (zero-length past tensors).
    pub fn empty_cache(&self) -> Result<Cache> {
        let dims = [1i64, self.shape.kv_heads as i64, 0, self.shape.head_dim as i64];
        let values = (0..self.shape.layers * 2)
            .map(|_| Tensor::<f32>::from_array((dims, Vec::<f32>::new())).map(Tensor::into_dyn))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(InferenceError::runtime)?;
        Ok(Cache { values, len: 0 })
    }

    /// Run `tokens` (at positions `cache.len()..`) through the model, extend the cache, and
    /// return the logits of the last token.
    pub fn forward(&mut self, tokens: &[u32], cache: &mut Cache) -> Result<&mut [f32]> {
        let seq = tokens.len();
        let total = cache.len + seq;
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let tensor_i64 = |data: Vec<i64>| {
            let dims = [1i64, data.len() as i64];
            Tensor::<i64>::from_array((dims, data)).map(Tensor::into_dyn).map_err(InferenceError::runtime)
        };
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + cache.values.len());
        inputs.push(("input_ids".into(), tensor_i64(ids)?.into()));
        inputs.push(("attention_mask".into(), tensor_i64(vec![1; total])?.into()));
        if self.has_position_ids {
            let positions = (cache.len as i64..total as i64).collect();
            inputs.push(("position_ids".into(), tensor_i64(positions)?.into()));
        }
        // The cache's tensors move into the run; on failure the sequence is dropped anyway.
        for (name, value) in self.past_names.iter().zip(cache.values.drain(..)) {
            inputs.push((Cow::Borrowed(name.as_str()), value.into()));
        }

        let mut outputs =
            self.session.run_with_options(inputs, &self.interrupt.0).map_err(InferenceError::runtime)?;
        {
            let value = outputs
                .get("logits")
                .ok_or_else(|| InferenceError::Runtime("the model produced no 'logits' output".into()))?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(InferenceError::runtime)?;
            let vocab = shape.last().copied().unwrap_or(0) as usize;
            if vocab == 0 || data.len() < vocab {
                return Err(InferenceError::Runtime(format!("unexpected logits shape {shape}")));
            }
            self.logits.clear();
            self.logits.extend_from_slice(&data[data.len() - vocab..]);
        }
        let mut present = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            present.push(
                outputs.remove(name).ok_or_else(|| {
                    InferenceError::Runtime(format!("the model produced no '{name}' output"))
                })?,
            );
        }
        cache.values = present;
        cache.len = total;
        Ok(&mut self.logits)
    }
}

impl OptimumModel {
    /// One token for each sequence, run one after another (this layout has no batched step); the
    /// logits rows side by side.
    pub fn decode(&mut self, caches: &mut [&mut Cache], ids: &[u32]) -> Result<&mut [f32]> {
        if caches.len() != ids.len() {
            return Err(InferenceError::Runtime("a decode step needs one token per sequence".into()));
        }
        let mut rows = std::mem::take(&mut self.rows);
        rows.clear();
        for (cache, &id) in caches.iter_mut().zip(ids) {
            rows.extend_from_slice(self.forward(&[id], cache)?);
        }
        self.rows = rows;
        Ok(&mut self.rows)
    }
}

/// Read layers / heads / head size / vocabulary from the graph's metadata, and name whatever is
/// missing when the graph is not a decoder-with-past export.
fn discover_shape(session: &Session, files: &ModelFiles) -> Result<(ModelShape, bool)> {
    let unsupported = |reason: String| unsupported(files, reason);
    let inputs = session.inputs();
    let input = |name: &str| inputs.iter().find(|o| o.name() == name);
    for required in ["input_ids", "attention_mask"] {
        if input(required).is_none() {
            return Err(unsupported(format!("missing input '{required}'")));
        }
    }
    if input("use_cache_branch").is_some() {
        return Err(unsupported(
            "this is a merged decoder (input 'use_cache_branch'); export with \
             `optimum-cli export onnx --task text-generation-with-past` and use decoder_model.onnx-style \
             single-graph output named model.onnx"
                .into(),
        ));
    }
    let io = CacheIo::read(session).map_err(unsupported)?.ok_or_else(|| {
        unsupported(
            "missing input 'past_key_values.0.key' (export with --task text-generation-with-past)".into(),
        )
    })?;
    let kv_heads = io.past_dim(1).or(files.config_kv_heads).ok_or_else(|| {
        unsupported(
            "the KV head count is symbolic in the graph and config.json has no num_key_value_heads".into(),
        )
    })?;
    let head_dim = io.past_dim(3).or(files.config_head_dim).ok_or_else(|| {
        unsupported("the head size is symbolic in the graph and config.json does not give it".into())
    })?;
    let vocab_size =
        io.vocab_size.ok_or_else(|| unsupported("the logits' vocabulary dimension is not fixed".into()))?;
    let layers = io.layers;
    Ok((ModelShape { layers, kv_heads, head_dim, vocab_size }, input("position_ids").is_some()))
}
