//! The fused layout (scripts/model_prep/llama_fused.py): one graph of ONNX Runtime contrib ops
//! whose `GroupQueryAttention` writes new positions into the very KV buffer it reads.
//!
//! ```text
//! input_ids               i64 [batch, seq]
//! seqlens_k               i32 [batch]          positions cached after this run, minus 1
//! total_sequence_length   i32 []
//! past_key_values.{i}.key f32 [batch, kv_heads, capacity, head_dim]   (and .value)
//! -> logits               f32 [batch, 1, vocab]                       last position only
//! -> present.{i}.key      f32 [batch, kv_heads, capacity, head_dim]   bound to the past buffer
//! ```
//!
//! Each sequence owns an [`IoBinding`] made once, when its cache is created: every KV buffer is
//! bound as both `past_key_values.*` and `present.*`, the logits output to the model's one
//! preallocated buffer, and three tiny input tensors whose contents are rewritten in place. A
//! decode step therefore binds nothing, allocates no tensor and copies no cache; its cost does not
//! grow with the position beyond attention itself. The logits are read where ONNX Runtime wrote them.

use ort::memory::Allocator;
use ort::session::{IoBinding, Session};
use ort::value::{Tensor, TensorElementType};

use super::{CacheIo, Interrupt, ModelShape, unsupported};
use crate::error::{InferenceError, Result};
use crate::model_files::ModelFiles;

/// One sequence's KV buffers and the binding that feeds them to the graph.
pub struct Cache {
    binding: IoBinding,
    /// `[k0, v0, k1, v1, ...]`, each `[1, kv_heads, capacity, head_dim]`; also held by `binding`.
    _kv: Vec<Tensor<f32>>,
    /// The decode step's one input id, rewritten in place.
    next_id: Tensor<i64>,
    seqlens_k: Tensor<i32>,
    total_len: Tensor<i32>,
    /// Whether `input_ids` is bound to `next_id` (rather than to a prompt chunk).
    decoding: bool,
    len: usize,
    capacity: usize,
}

impl Cache {
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

/// A fused-layout session, owned by one worker thread.
pub struct FusedModel {
    session: Session,
    shape: ModelShape,
    interrupt: Interrupt,
    past_names: Vec<String>,
    present_names: Vec<String>,
    /// `[1, 1, vocab]`, bound as the `logits` output of every sequence's binding.
    logits: Tensor<f32>,
}

impl FusedModel {
    pub(super) fn new(session: Session, files: &ModelFiles, interrupt: Interrupt) -> Result<Self> {
        let shape = discover_shape(&session, files)?;
        let (past_names, present_names) = shape.cache_names();
        let logits = Tensor::<f32>::new(&Allocator::default(), [1usize, 1, shape.vocab_size])
            .map_err(InferenceError::runtime)?;
        Ok(Self { session, shape, interrupt, past_names, present_names, logits })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    /// KV buffers for `capacity` positions (uninitialized: the graph reads only positions it has
    /// written), bound once as both past and present.
    pub fn new_cache(&mut self, capacity: usize) -> Result<Cache> {
        let capacity = capacity.max(1);
        let rt = InferenceError::runtime;
        let dims = [1usize, self.shape.kv_heads, capacity, self.shape.head_dim];
        let mut binding = self.session.create_binding().map_err(rt)?;
        let mut kv = Vec::with_capacity(self.past_names.len());
        for (past, present) in self.past_names.iter().zip(&self.present_names) {
            let mut buffer = Tensor::<f32>::new(&Allocator::default(), dims).map_err(rt)?;
            binding.bind_input(past.as_str(), &buffer).map_err(rt)?;
            binding.bind_output(present.as_str(), &mut buffer).map_err(rt)?;
            kv.push(buffer);
        }
        binding.bind_output("logits", &mut self.logits).map_err(rt)?;
        let next_id = Tensor::from_array(([1usize, 1], vec![0i64])).map_err(rt)?;
        let seqlens_k = Tensor::from_array(([1usize], vec![0i32])).map_err(rt)?;
        let total_len = Tensor::from_array((Vec::<usize>::new(), vec![0i32])).map_err(rt)?;
        binding.bind_input("seqlens_k", &seqlens_k).map_err(rt)?;
        binding.bind_input("total_sequence_length", &total_len).map_err(rt)?;
        Ok(Cache { binding, _kv: kv, next_id, seqlens_k, total_len, decoding: false, len: 0, capacity })
    }

    /// Run `tokens` at positions `cache.len()..` and return the last one's logits, in place.
    pub fn forward(&mut self, tokens: &[u32], cache: &mut Cache) -> Result<&mut [f32]> {
        let rt = InferenceError::runtime;
        let total = cache.len + tokens.len();
        if total > cache.capacity {
            return Err(InferenceError::Runtime(format!(
                "{total} positions do not fit this sequence's cache of {}",
                cache.capacity
            )));
        }
        let total_i32 =
            i32::try_from(total).map_err(|_| InferenceError::Runtime("sequence too long".into()))?;
        if let [id] = tokens {
            cache.next_id.extract_tensor_mut().1[0] = i64::from(*id);
            if !cache.decoding {
                cache.binding.bind_input("input_ids", &cache.next_id).map_err(rt)?;
                cache.decoding = true;
            }
        } else {
            // A prompt (chunk): its own tensor, once per prompt; the binding keeps it alive.
            let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
            let chunk = Tensor::from_array(([1usize, ids.len()], ids)).map_err(rt)?;
            cache.binding.bind_input("input_ids", &chunk).map_err(rt)?;
            cache.decoding = false;
        }
        cache.seqlens_k.extract_tensor_mut().1[0] = total_i32 - 1;
        cache.total_len.extract_tensor_mut().1[0] = total_i32;
        // The outputs are the bound buffers; nothing to take from the returned map.
        drop(self.session.run_binding_with_options(&cache.binding, &self.interrupt.0).map_err(rt)?);
        cache.len = total;
        Ok(self.logits.extract_tensor_mut().1)
    }
}

/// Layers, KV heads, head size and vocabulary from the graph, naming whatever is missing.
fn discover_shape(session: &Session, files: &ModelFiles) -> Result<ModelShape> {
    let fail = |reason: String| unsupported(files, format!("fused layout (input 'seqlens_k'): {reason}"));
    let inputs = session.inputs();
    for (name, ty) in [
        ("input_ids", TensorElementType::Int64),
        ("seqlens_k", TensorElementType::Int32),
        ("total_sequence_length", TensorElementType::Int32),
    ] {
        let found = inputs
            .iter()
            .find(|i| i.name() == name)
            .ok_or_else(|| fail(format!("missing input '{name}'")))?;
        if found.dtype().tensor_type() != Some(ty) {
            return Err(fail(format!("input '{name}' must be {ty:?}")));
        }
    }
    let io = CacheIo::read(session)
        .map_err(fail)?
        .ok_or_else(|| fail("missing input 'past_key_values.0.key'".into()))?;
    let (Some(kv_heads), Some(head_dim)) = (io.past_dim(1), io.past_dim(3)) else {
        return Err(fail("past_key_values must have fixed KV-head and head-size dimensions".into()));
    };
    let vocab_size =
        io.vocab_size.ok_or_else(|| fail("the logits' vocabulary dimension is not fixed".into()))?;
    let layers = io.layers;
    Ok(ModelShape { layers, kv_heads, head_dim, vocab_size })
}
