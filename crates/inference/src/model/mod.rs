//! The ONNX Runtime session of one decoder model and its KV cache, in either of two graph layouts.
//!
//! - [`fused`]: the default model's graph (scripts/model_prep/llama_fused.py, the shape of ONNX
//!   Runtime's generative-AI builder on CPU): `GroupQueryAttention` over a pool of KV rows bound as
//!   both past and present, quantized `MatMulNBits` projections, logits of the last position only.
//!   Every decoding sequence advances in one forward pass. Recognized by its `seqlens_k` input.
//! - [`optimum`]: a Hugging Face Optimum "text-generation-with-past" export (fp32, the cache grows
//!   by concatenation each step); a decode step runs its sequences one after another.
//!   Recognized by its `attention_mask` input.
//!
//! The layout is read from the graph's inputs when the session is created; the scheduler sees only
//! [`DecoderModel`] and [`KvCache`] (prefill a chunk, decode a batch, release), so a new layout
//! touches this module alone.

pub mod attention;
pub mod fused;
mod graph;
pub mod optimum;
pub mod prefix_cache;

pub use graph::{Interrupt, ModelShape};

use ort::environment::Environment;
use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};

use crate::error::{InferenceError, Result};
use crate::model_files::ModelFiles;

/// Which graph layout a model folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Fused contrib-op graph with a shared past/present KV buffer.
    Fused,
    /// Optimum fp32 export with a concatenating KV cache.
    Optimum,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fused => "fused",
            Self::Optimum => "optimum",
        }
    }
}

/// Session options that are settings, not model facts.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// ONNX Runtime intra-op threads for this session.
    pub intra_threads: usize,
    /// Whether those threads spin for work between runs (ONNX Runtime's default) instead of
    /// sleeping: see [`crate::EngineConfig::spinning`].
    pub spinning: bool,
    /// ONNX Runtime's profile file prefix ([`crate::EngineConfig::ort_profile`]).
    pub profile: Option<PathBuf>,
    /// The fused layout's KV pool (the Optimum layout allocates per sequence).
    pub pool: fused::PoolOptions,
    /// Run `GroupQueryAttention` with this crate's kernel ([`attention`]) instead of ONNX
    /// Runtime's.
    pub own_attention: bool,
}

/// One sequence's attention cache: a pool row (fused) or its own tensors (Optimum).
pub enum KvCache {
    Fused(fused::Cache),
    Optimum(optimum::Cache),
}

impl KvCache {
    /// Number of positions cached (prompt + generated so far).
    pub fn len(&self) -> usize {
        match self {
            Self::Fused(c) => c.len(),
            Self::Optimum(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An ONNX Runtime session for one decoder, owned by one worker thread.
pub enum DecoderModel {
    /// Boxed: its bindings and pool handles are large next to the Optimum session's.
    Fused(Box<fused::FusedModel>),
    Optimum(optimum::OptimumModel),
}

impl DecoderModel {
    /// Create the session, tell the layout from its inputs, and check it has everything that
    /// layout needs; a graph that is neither gets an error saying what was expected.
    pub fn load(env: &Environment, files: &ModelFiles, options: &SessionOptions) -> Result<Self> {
        let path = files.onnx_path.clone();
        let mixed_path = files.mixed_onnx_path.as_ref().filter(|_| options.pool.mixed_steps);
        // The mixed-step graph has the same weights under the same names: one container of
        // prepacked weights lets kernels that support it share theirs.
        let prepacked = mixed_path.map(|_| PrepackedWeights::new());
        let (session, own_attention) = open_session(env, &path, options, prepacked.as_ref())?;
        let interrupt = Interrupt::new()?;
        let has_input = |name: &str| session.inputs().iter().any(|i| i.name() == name);
        if has_input("seqlens_k") {
            let mixed = match mixed_path {
                // The same cache layout either way: a mixed-step session on the other kernel
                // would only round differently.
                Some(mixed) => Some(open_session(env, mixed, options, prepacked.as_ref())?.0),
                None => None,
            };
            let mut model = fused::FusedModel::new(session, mixed, files, interrupt, &options.pool)?;
            model.attention = if own_attention { attention::Simd::detected().label() } else { "onnxruntime" };
            Ok(Self::Fused(Box::new(model)))
        } else if has_input("attention_mask") {
            optimum::OptimumModel::new(session, files, interrupt).map(Self::Optimum)
        } else {
            Err(InferenceError::UnsupportedModel {
                path,
                reason: "expected a decoder with a KV cache in one of two layouts: the fused layout \
                         (inputs input_ids, seqlens_k, total_sequence_length, past_key_values.{i}.key/value) \
                         or an Optimum text-generation-with-past export (inputs input_ids, attention_mask, \
                         past_key_values.{i}.key/value)"
                    .into(),
            })
        }
    }

    pub fn layout(&self) -> Layout {
        match self {
            Self::Fused(_) => Layout::Fused,
            Self::Optimum(_) => Layout::Optimum,
        }
    }

    /// The kernel that runs the graph's attention: `streamgate-avx512`, `streamgate-avx2`,
    /// `streamgate-portable` ([`attention`]) or `onnxruntime`.
    pub fn attention(&self) -> &'static str {
        match self {
            Self::Fused(m) => m.attention,
            Self::Optimum(_) => "onnxruntime",
        }
    }

    pub fn shape(&self) -> &ModelShape {
        match self {
            Self::Fused(m) => m.shape(),
            Self::Optimum(m) => m.shape(),
        }
    }

    /// The handle that interrupts this model's runs.
    pub fn interrupt(&self) -> Interrupt {
        match self {
            Self::Fused(m) => m.interrupt(),
            Self::Optimum(m) => m.interrupt(),
        }
    }

    /// How many sequences one decode step can advance (the fused pool's rows; the Optimum layout
    /// runs them one after another, so any number).
    pub fn slots(&self) -> Option<usize> {
        match self {
            Self::Fused(m) => Some(m.slots()),
            Self::Optimum(_) => None,
        }
    }

    /// A cache for a new sequence; `None` when the fused pool has no free row.
    pub fn new_cache(&mut self) -> Result<Option<KvCache>> {
        match self {
            Self::Fused(m) => Ok(m.new_cache().map(KvCache::Fused)),
            Self::Optimum(m) => m.empty_cache().map(|c| Some(KvCache::Optimum(c))),
        }
    }

    /// Free a sequence's cache. `tokens` (the ids of its cached positions) offers its keys and
    /// values for prefix reuse, where the layout keeps any.
    pub fn release(&mut self, cache: KvCache, tokens: Option<&[u32]>) {
        if let (Self::Fused(m), KvCache::Fused(c)) = (self, cache) {
            m.release(c, tokens);
        }
    }

    /// A prompt has run: offer its positions for prefix reuse, where the layout keeps any.
    pub fn remember_prompt(&mut self, cache: &KvCache, prompt: &[u32]) {
        if let (Self::Fused(m), KvCache::Fused(c)) = (self, cache) {
            m.remember_prompt(c, prompt);
        }
    }

    /// Before a prompt runs: reuse the longest cached prefix of `prompt`; returns how many
    /// positions are already in `cache` (the caller runs only the rest).
    pub fn reuse_prefix(&mut self, prompt: &[u32], cache: &mut KvCache) -> Result<usize> {
        match (self, cache) {
            (Self::Fused(m), KvCache::Fused(c)) => m.reuse_prefix(prompt, c),
            _ => Ok(0),
        }
    }

    /// Run prompt `tokens` (at positions `cache.len()..`) and return the last one's logits. The
    /// slice is the model's own output buffer, valid until the next call; the sampler may modify it.
    pub fn prefill(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<&mut [f32]> {
        if tokens.is_empty() {
            return Err(InferenceError::InvalidRequest("no tokens to run".into()));
        }
        match (self, cache) {
            (Self::Fused(m), KvCache::Fused(c)) => m.prefill(tokens, c),
            (Self::Optimum(m), KvCache::Optimum(c)) => m.forward(tokens, c),
            _ => Err(mismatch()),
        }
    }

    /// Whether [`Self::mixed_step`] can run (a fused model with its mixed-step graph).
    pub fn has_mixed_steps(&self) -> bool {
        matches!(self, Self::Fused(m) if m.has_mixed_steps())
    }

    /// One decode token for each of `caches` and the prompt chunk `chunk` of `prompt`, in one
    /// forward pass: the decode rows' logits, then the chunk's last position's, `[(caches.len() + 1)
    /// * vocab]`, in the model's own buffer.
    pub fn mixed_step(
        &mut self,
        caches: &mut [&mut KvCache],
        ids: &[u32],
        chunk: &[u32],
        prompt: &mut KvCache,
    ) -> Result<&mut [f32]> {
        let (Self::Fused(m), KvCache::Fused(prompt)) = (self, prompt) else {
            return Err(InferenceError::Runtime("mixed steps need the fused layout".into()));
        };
        m.mixed_step(&mut fused_rows(caches)?, ids, chunk, prompt)
    }

    /// One token for each sequence (`ids[i]` extends `caches[i]`); the logits of all of them,
    /// `[caches.len() * vocab]`, in the model's own buffer.
    pub fn decode(&mut self, caches: &mut [&mut KvCache], ids: &[u32]) -> Result<&mut [f32]> {
        match self {
            Self::Fused(m) => m.decode(&mut fused_rows(caches)?, ids),
            Self::Optimum(m) => {
                let mut rows = caches
                    .iter_mut()
                    .map(|c| match &mut **c {
                        KvCache::Optimum(c) => Ok(c),
                        KvCache::Fused(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                m.decode(&mut rows, ids)
            }
        }
    }
}

/// One graph's session with the engine's settings; `prepacked` shares prepacked weights between
/// sessions of graphs with the same initializers; the flag says whether it runs this crate's
/// attention kernel. With [`SessionOptions::own_attention`] the
/// session first gets this crate's `GroupQueryAttention` kernel; a graph it does not suit (other
/// attention attributes, or `com.microsoft` ops that the optimizer adds and our domain hides, as
/// in an Optimum export) is opened again with ONNX Runtime's kernels alone.
fn open_session(
    env: &Environment,
    path: &Path,
    options: &SessionOptions,
    prepacked: Option<&PrepackedWeights>,
) -> Result<(Session, bool)> {
    if options.own_attention
        && let Ok(session) = build_session(env, path, options, prepacked, true)
    {
        return Ok((session, true));
    }
    Ok((build_session(env, path, options, prepacked, false)?, false))
}

fn build_session(
    env: &Environment,
    path: &Path,
    options: &SessionOptions,
    prepacked: Option<&PrepackedWeights>,
    own_attention: bool,
) -> Result<Session> {
    let mut builder = Session::builder(env)
        .map_err(InferenceError::runtime)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(InferenceError::runtime)?
        .with_intra_threads(options.intra_threads.max(1))
        .map_err(InferenceError::runtime)?
        .with_intra_op_spinning(options.spinning)
        .map_err(InferenceError::runtime)?;
    if let Some(prefix) = &options.profile {
        builder = builder.with_profiling(prefix).map_err(InferenceError::runtime)?;
    }
    if own_attention {
        let domain = attention::domain().map_err(InferenceError::runtime)?;
        builder = builder.with_operators(domain).map_err(InferenceError::runtime)?;
    }
    if let Some(weights) = prepacked {
        builder = builder.with_prepacked_weights(weights).map_err(InferenceError::runtime)?;
    }
    builder
        .commit_from_file(path)
        .map_err(|e| InferenceError::UnsupportedModel { path: path.to_path_buf(), reason: e.to_string() })
}

/// The fused caches of a batch (an Optimum one among them is a mismatch).
fn fused_rows<'a>(caches: &'a mut [&mut KvCache]) -> Result<Vec<&'a mut fused::Cache>> {
    caches
        .iter_mut()
        .map(|c| match &mut **c {
            KvCache::Fused(c) => Ok(c),
            KvCache::Optimum(_) => Err(mismatch()),
        })
        .collect()
}

fn mismatch() -> InferenceError {
    InferenceError::Runtime("a KV cache was used with a model of another layout".into())
}
