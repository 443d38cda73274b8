//! The fused layout (scripts/model_prep/llama_fused.py): one graph of ONNX Runtime contrib ops
//! whose `GroupQueryAttention` writes new positions into the very KV buffer it reads, with a pool
//! of cache rows ("slots") that a decode step feeds together.
//!
//! ```text
//! input_ids               i64 [batch, seq]
//! slots                   i64 [batch]          the cache row each input row extends
//! seqlens_k               i32 [rows]           positions cached after this run, minus 1, per row
//! total_sequence_length   i32 []               max over rows of seqlens_k + 1
//! past_key_values.{i}.key f32 [rows, kv_heads, slot_len, head_dim]   (and .value)
//! -> logits               f32 [batch, 1, vocab]                     last position only
//! -> present.{i}.key      f32 [rows, kv_heads, slot_len, head_dim]   bound to the past buffer
//! ```
//!
//! Two sets of buffers, each bound once (as both `past_key_values.*` and `present.*`) in its own
//! [`IoBinding`]:
//! - the **pool**, `[slots, ...]`: every decoding sequence owns one row. A decode step runs all
//!   decoding sequences in one pass (`slots` says which rows; idle rows cost one position of
//!   attention); no row is re-packed when a sequence joins or leaves.
//! - the **staging** row, `[1, ...]`: prompts run here, one chunk per call, because
//!   GroupQueryAttention takes a prompt chunk with a past only for a single row. Before the
//!   sequence's first decode step with others its positions are copied into its pool row (once
//!   per prompt). A sequence that decodes alone does so in staging — from its first step, or
//!   copied back once the others have finished — until another prompt needs staging or another
//!   sequence decodes with it: a one-row step skips the per-row cost every idle pool row adds to
//!   attention (a lone stream in a 16-row pool: 1.1-1.45x per step).
//!
//! A prompt may take staging from another whose prompt is under way (the scheduler runs the
//! shortest first): the other's positions are set aside, compact, and copied back when its turn
//! comes (its pool row cannot hold them: an idle row's position 0 is written by every pool step).
//!
//! A finished sequence's positions go to the [`PrefixCache`]; a new prompt that starts with the
//! same tokens gets them copied into staging and runs only the rest.

use std::collections::HashMap;

use ort::memory::{Allocator, MemoryInfo};
use ort::session::{IoBinding, Session, SessionOutputs};
use ort::value::{DynValue, Tensor, TensorElementType, TensorRefMut};

use super::graph::{CacheIo, Interrupt, ModelShape, unsupported};
use super::prefix_cache::PrefixCache;
use crate::error::{InferenceError, Result};
use crate::model_files::ModelFiles;

/// One sequence's place in the model: its pool row and how many positions it has cached.
#[derive(Debug)]
pub struct Cache {
    slot: usize,
    len: usize,
}

impl Cache {
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

/// `[k0, v0, k1, v1, ...]` buffers of `rows` cache rows, and the binding that feeds them.
struct Buffers {
    binding: IoBinding,
    kv: Vec<Tensor<f32>>,
    seqlens_k: Tensor<i32>,
    total_len: Tensor<i32>,
    rows: usize,
}

/// How big the pool is and how much prefix cache to keep: settings, not model facts.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Pool rows: sequences decoded together.
    pub slots: usize,
    /// Positions per row (the longest sequence, prompt plus output).
    pub slot_len: usize,
    /// Bytes of finished sequences' KV kept for prefix reuse (0: off).
    pub prefix_cache_bytes: usize,
    /// Run a lone decoding sequence with a padding row, so that every decode step takes ONNX
    /// Runtime's matrix-matrix kernels and a sequence's tokens never depend on how many others
    /// share its steps (a lone row takes the matrix-vector kernels, whose rounding differs).
    pub batch_invariant: bool,
    /// Load the folder's mixed-step graph (model_mixed.onnx), so that a prompt chunk shares a
    /// forward pass with the decode rows instead of taking one of its own (running streams' gaps
    /// while a prompt is admitted: about the chunk's tokens' share of a step, not a whole pass). A
    /// second ONNX Runtime session: the server holds the prepacked weights twice (~+190 MB for
    /// SmolLM2-135M; MatMulNBits does not share them between sessions).
    pub mixed_steps: bool,
}

/// Finished sequences shorter than this are not kept for reuse (recomputing them is cheap).
const MIN_PREFIX_TOKENS: usize = 16;

/// The mixed-step graph (`model_mixed.onnx`): the decode rows on the pool and a prompt chunk on
/// staging in one pass, bound to the very same buffers.
struct Mixed {
    session: Session,
    binding: IoBinding,
}

/// A mixed step asked of a model loaded without its mixed-step graph (checked before the step
/// moves any sequence, so nothing is left half done).
fn no_mixed_graph() -> InferenceError {
    InferenceError::Runtime("this model has no mixed-step graph (model_mixed.onnx)".into())
}

/// A fused-layout session, owned by one worker thread.
pub struct FusedModel {
    session: Session,
    mixed: Option<Mixed>,
    shape: ModelShape,
    interrupt: Interrupt,
    slot_len: usize,
    pool: Buffers,
    staging: Buffers,
    /// `[1, 1, vocab]`, the staging binding's logits.
    staging_logits: Tensor<f32>,
    /// The last decode step's logits, `[batch, 1, vocab]` (allocated by ONNX Runtime per step).
    batch_logits: Option<DynValue>,
    /// The pool row whose sequence's positions are in staging (its prompt is running, or it
    /// decodes alone there).
    staged: Option<usize>,
    /// The staged sequence decodes in staging (it was alone): its positions move to its pool row
    /// as soon as staging is wanted or another sequence decodes with it.
    staged_decoding: bool,
    /// Positions in staging (the staged sequence's, prompt so far or prompt and output).
    staged_len: usize,
    /// Prompts under way that gave staging up to another: pool row -> (positions, their KV in
    /// [`Buffers::read_rows`]' compact layout).
    parked: HashMap<usize, (usize, Vec<f32>)>,
    /// With batch invariance, a pool row of its own that pads a lone decoding sequence (see
    /// [`PoolOptions::batch_invariant`]); it only ever holds the padding's one position.
    padding_row: Option<usize>,
    free: Vec<usize>,
    prefixes: PrefixCache,
    /// [`super::DecoderModel::attention`].
    pub(crate) attention: &'static str,
}

impl FusedModel {
    pub(super) fn new(
        session: Session,
        mixed: Option<Session>,
        files: &ModelFiles,
        interrupt: Interrupt,
        options: &PoolOptions,
    ) -> Result<Self> {
        let shape = discover_shape(&session, files)?;
        let (past_names, present_names) = shape.cache_names();
        let slots = options.slots.max(1);
        let slot_len = options.slot_len.max(1);
        let rt = InferenceError::runtime;
        let rows = slots + usize::from(options.batch_invariant);
        let position_bytes = shape.layers * 2 * shape.kv_heads * shape.head_dim * 4;
        check_pool_fits(rows + 1, slot_len, position_bytes, physical_memory_bytes())?;
        let pool = Buffers::new(&session, &shape, &past_names, &present_names, rows, slot_len)?;
        let mut staging = Buffers::new(&session, &shape, &past_names, &present_names, 1, slot_len)?;
        let mut staging_logits =
            Tensor::<f32>::new(&Allocator::default(), [1usize, 1, shape.vocab_size]).map_err(rt)?;
        staging.binding.bind_output("logits", &mut staging_logits).map_err(rt)?;
        let row_zero = Tensor::from_array(([1usize], vec![0i64])).map_err(rt)?;
        staging.binding.bind_input("slots", &row_zero).map_err(rt)?;
        let mut pool = pool;
        let mixed = match mixed {
            Some(session) => Some(Mixed::new(session, files, &shape, &mut pool, &mut staging)?),
            None => None,
        };
        Ok(Self {
            session,
            mixed,
            interrupt,
            slot_len,
            pool,
            staging,
            staging_logits,
            batch_logits: None,
            staged: None,
            staged_decoding: false,
            staged_len: 0,
            parked: HashMap::new(),
            padding_row: options.batch_invariant.then_some(slots),
            free: (0..slots).rev().collect(),
            prefixes: PrefixCache::new(options.prefix_cache_bytes, MIN_PREFIX_TOKENS),
            shape,
            attention: "onnxruntime",
        })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    /// Whether [`Self::mixed_step`] can run (the folder has the mixed-step graph).
    pub fn has_mixed_steps(&self) -> bool {
        self.mixed.is_some()
    }

    /// How many sequences can decode together (the pool's rows, less a padding row).
    pub fn slots(&self) -> usize {
        self.pool.rows - usize::from(self.padding_row.is_some())
    }

    /// Rows not held by a sequence.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Positions a sequence can hold.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Bytes of KV held for prefix reuse now.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefixes.bytes()
    }

    /// A pool row for a new sequence, or `None` when every row is taken.
    pub fn new_cache(&mut self) -> Option<Cache> {
        self.free.pop().map(|slot| Cache { slot, len: 0 })
    }

    /// Give a sequence's row back. With `tokens` (the ids of its cached positions), its keys and
    /// values are kept for prefix reuse first.
    pub fn release(&mut self, cache: Cache, tokens: Option<&[u32]>) {
        let position_bytes = self.pool.kv.len() * self.shape.kv_heads * self.shape.head_dim * 4;
        let worth_keeping =
            |t: &&[u32]| t.len() == cache.len && self.prefixes.accepts(t.len(), t.len() * position_bytes);
        if let Some(tokens) = tokens.filter(worth_keeping) {
            let (source, row) =
                if self.staged == Some(cache.slot) { (&self.staging, 0) } else { (&self.pool, cache.slot) };
            if let Some(kv) = source.read_rows(row, cache.len, self.slot_len, &self.shape) {
                self.prefixes.insert(tokens.to_vec(), kv);
            }
        }
        if self.staged == Some(cache.slot) {
            self.staged = None;
            self.staged_decoding = false;
        }
        self.parked.remove(&cache.slot);
        self.free.push(cache.slot);
    }

    /// Keep a prompt's positions for prefix reuse as soon as it has run (`tokens`: the prompt), so
    /// requests arriving meanwhile with the same start (a long system prompt) need not wait for this
    /// one to finish. Its finished entry (prompt and output) later replaces this one.
    pub fn remember_prompt(&mut self, cache: &Cache, tokens: &[u32]) {
        let position_bytes = self.pool.kv.len() * self.shape.kv_heads * self.shape.head_dim * 4;
        if self.staged != Some(cache.slot)
            || tokens.len() != cache.len
            || !self.prefixes.accepts(tokens.len(), tokens.len() * position_bytes)
        {
            return;
        }
        if let Some(kv) = self.staging.read_rows(0, cache.len, self.slot_len, &self.shape) {
            self.prefixes.insert(tokens.to_vec(), kv);
        }
    }

    /// Before a prompt's first chunk: copy the longest cached prefix of `prompt` into staging and
    /// return how many positions were reused (the caller runs only the rest).
    pub fn reuse_prefix(&mut self, prompt: &[u32], cache: &mut Cache) -> Result<usize> {
        if cache.len != 0 {
            return Ok(0);
        }
        self.take_staging(cache)?;
        let Some((entry, shared)) = self.prefixes.lookup(prompt) else { return Ok(0) };
        let entry_len = entry.tokens().len();
        self.staging.write_rows(0, entry.kv(), entry_len, shared, self.slot_len, &self.shape)?;
        cache.len = shared;
        self.staged_len = shared;
        Ok(shared)
    }

    /// Run a prompt chunk at positions `cache.len()..` in staging; the last position's logits, in place.
    pub fn prefill(&mut self, tokens: &[u32], cache: &mut Cache) -> Result<&mut [f32]> {
        let rt = InferenceError::runtime;
        self.take_staging(cache)?;
        let total = self.check_fits(cache.len, tokens.len())?;
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let chunk = Tensor::from_array(([1usize, ids.len()], ids)).map_err(rt)?;
        self.staging.binding.bind_input("input_ids", &chunk).map_err(rt)?;
        self.staging.seqlens_k.extract_tensor_mut().1[0] = total - 1;
        self.staging.total_len.extract_tensor_mut().1[0] = total;
        drop(self.session.run_binding_with_options(&self.staging.binding, &self.interrupt.0).map_err(rt)?);
        cache.len += tokens.len();
        self.staged_len = cache.len;
        Ok(self.staging_logits.extract_tensor_mut().1)
    }

    /// One decode step for every sequence in `caches` (`ids[i]` at position `caches[i].len()`), in
    /// one forward pass; their logits, `[caches.len() * vocab]`, in place.
    pub fn decode(&mut self, caches: &mut [&mut Cache], ids: &[u32]) -> Result<&mut [f32]> {
        let rt = InferenceError::runtime;
        if caches.len() != ids.len() || caches.is_empty() {
            return Err(InferenceError::Runtime("a decode step needs one token per sequence".into()));
        }
        self.restore_parked(caches)?;
        if let [cache] = caches
            && self.padding_row.is_none()
            && self.staged.is_none_or(|slot| slot == cache.slot)
        {
            // Alone: a one-row step in staging (the same per-row arithmetic as a pool step). A
            // sequence left alone by others that finished goes back there first, one copy.
            if self.staged.is_none() {
                let (pool, staging) = (&self.pool.kv, &mut self.staging.kv);
                copy_positions(pool, cache.slot, staging, 0, cache.len, self.slot_len, &self.shape)?;
                self.staged = Some(cache.slot);
            }
            self.prefill(ids, cache)?;
            self.staged_decoding = true;
            return Ok(self.staging_logits.extract_tensor_mut().1);
        }
        self.unstage(caches)?;
        // A lone sequence gets a padding row, so that the step takes the multi-row kernels.
        let (input_ids, slots) = self.pool_inputs(caches, ids, self.padding_row)?;
        self.pool.binding.bind_input("input_ids", &input_ids).map_err(rt)?;
        self.pool.binding.bind_input("slots", &slots).map_err(rt)?;
        // The batch changes from step to step: ONNX Runtime allocates this step's logits (a bound
        // tensor would fix their shape).
        self.pool.binding.bind_output_to_device("logits", &MemoryInfo::default()).map_err(rt)?;
        let outputs =
            self.session.run_binding_with_options(&self.pool.binding, &self.interrupt.0).map_err(rt)?;
        let logits = take_logits(outputs)?;
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        self.keep_logits(logits, caches.len())
    }

    /// One decode step for every sequence in `caches` and the prompt chunk `chunk` of `prompt`
    /// (at positions `prompt.len()..`, in staging) in one forward pass of the mixed-step graph: the
    /// projections read their weights once for both. The decode rows' logits, then the chunk's
    /// last position's: `[(caches.len() + 1) * vocab]`, in place.
    pub fn mixed_step(
        &mut self,
        caches: &mut [&mut Cache],
        ids: &[u32],
        chunk: &[u32],
        prompt: &mut Cache,
    ) -> Result<&mut [f32]> {
        let rt = InferenceError::runtime;
        if self.mixed.is_none() {
            return Err(no_mixed_graph());
        }
        if caches.len() != ids.len() || caches.is_empty() || chunk.is_empty() {
            return Err(InferenceError::Runtime(
                "a mixed step needs one token per decoding sequence and a prompt chunk".into(),
            ));
        }
        if caches.iter().any(|c| c.slot == prompt.slot) {
            return Err(InferenceError::Runtime("a sequence cannot decode while its prompt runs".into()));
        }
        self.restore_parked(caches)?;
        // Staging is the chunk's: a decode row whose positions are there (a lone decoder, or a
        // prompt that has just finished) moves to its pool row first.
        self.unstage(caches)?;
        self.take_staging(prompt)?;
        let total = self.check_fits(prompt.len, chunk.len())?;
        let (input_ids, slots) = self.pool_inputs(caches, ids, None)?;
        let chunk_ids: Vec<i64> = chunk.iter().map(|&t| i64::from(t)).collect();
        let chunk_ids = Tensor::from_array(([1usize, chunk_ids.len()], chunk_ids)).map_err(rt)?;
        self.staging.seqlens_k.extract_tensor_mut().1[0] = total - 1;
        self.staging.total_len.extract_tensor_mut().1[0] = total;
        let Some(mixed) = self.mixed.as_mut() else { return Err(no_mixed_graph()) };
        mixed.binding.bind_input("input_ids", &input_ids).map_err(rt)?;
        mixed.binding.bind_input("slots", &slots).map_err(rt)?;
        mixed.binding.bind_input("chunk_ids", &chunk_ids).map_err(rt)?;
        mixed.binding.bind_output_to_device("logits", &MemoryInfo::default()).map_err(rt)?;
        let outputs =
            mixed.session.run_binding_with_options(&mixed.binding, &self.interrupt.0).map_err(rt)?;
        let logits = take_logits(outputs)?;
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        prompt.len += chunk.len();
        self.staged_len = prompt.len;
        self.keep_logits(logits, caches.len() + 1)
    }

    /// A sequence set aside right after its prompt ran decodes from its pool row: its positions
    /// go there first (the scheduler decodes a finished prompt before another takes staging, so
    /// this is a safeguard).
    fn restore_parked(&mut self, caches: &[&mut Cache]) -> Result<()> {
        if !self.parked.is_empty() {
            for cache in caches {
                if let Some((len, kv)) = self.parked.remove(&cache.slot) {
                    self.pool.write_rows(cache.slot, &kv, len, len, self.slot_len, &self.shape)?;
                }
            }
        }
        Ok(())
    }

    /// A sequence about to decode in the pool whose positions are in staging moves them to its row.
    fn unstage(&mut self, caches: &[&mut Cache]) -> Result<()> {
        for cache in caches {
            if self.staged == Some(cache.slot) {
                self.commit_staging(cache.slot, cache.len)?;
            }
        }
        Ok(())
    }

    /// A pool step's `seqlens_k` and `total_sequence_length` (set in place) and its `input_ids` and
    /// `slots`; `padding` adds that row to a lone sequence.
    fn pool_inputs(
        &mut self,
        caches: &[&mut Cache],
        ids: &[u32],
        padding: Option<usize>,
    ) -> Result<(Tensor<i64>, Tensor<i64>)> {
        let rt = InferenceError::runtime;
        let totals = caches.iter().map(|c| self.check_fits(c.len, 1)).collect::<Result<Vec<_>>>()?;
        let total = totals.iter().copied().max().unwrap_or(1);
        let seqlens = self.pool.seqlens_k.extract_tensor_mut().1;
        seqlens.fill(0); // idle rows: one position of attention, in their own free row
        for (cache, row_total) in caches.iter().zip(&totals) {
            let row = seqlens
                .get_mut(cache.slot)
                .ok_or_else(|| InferenceError::Runtime("a cache row outside the pool".into()))?;
            *row = row_total - 1;
        }
        self.pool.total_len.extract_tensor_mut().1[0] = total;
        let mut ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        let mut slots: Vec<i64> = caches.iter().map(|c| c.slot as i64).collect();
        if let (1, Some(row)) = (ids.len(), padding) {
            ids.push(0);
            slots.push(row as i64);
        }
        let rows = ids.len();
        let input_ids = Tensor::from_array(([rows, 1usize], ids)).map_err(rt)?;
        let slots = Tensor::from_array(([rows], slots)).map_err(rt)?;
        Ok((input_ids, slots))
    }

    /// Keep a step's logits (allocated by ONNX Runtime) and return the first `rows` of them.
    fn keep_logits(&mut self, logits: DynValue, rows: usize) -> Result<&mut [f32]> {
        let rt = InferenceError::runtime;
        let logits = self.batch_logits.insert(logits);
        let (_, data) = logits.try_extract_tensor_mut::<f32>().map_err(rt)?;
        let want = rows * self.shape.vocab_size;
        let got = data.len();
        data.get_mut(..want)
            .ok_or_else(|| InferenceError::Runtime(format!("expected {want} logits, got {got}")))
    }

    /// Staging belongs to one prompt at a time: whoever holds it gives it up (a lone decoding
    /// sequence to its pool row, a prompt under way to [`Self::parked`]), and a parked prompt
    /// gets its positions back.
    fn take_staging(&mut self, cache: &Cache) -> Result<()> {
        let parked = self.parked.get(&cache.slot).map(|(len, _)| *len);
        if self.staged != Some(cache.slot) && cache.len != parked.unwrap_or(0) {
            return Err(InferenceError::Runtime("this sequence's prompt is already processed".into()));
        }
        match self.staged {
            Some(slot) if slot == cache.slot => return Ok(()),
            Some(slot) => match self.staged_decoding {
                true => self.commit_staging(slot, self.staged_len)?,
                false => {
                    let kv =
                        self.staging.read_rows(0, self.staged_len, self.slot_len, &self.shape).ok_or_else(
                            || InferenceError::Runtime("staging is shorter than its prompt".into()),
                        )?;
                    self.parked.insert(slot, (self.staged_len, kv));
                }
            },
            None => {}
        }
        if let Some((len, kv)) = self.parked.remove(&cache.slot) {
            self.staging.write_rows(0, &kv, len, len, self.slot_len, &self.shape)?;
        }
        self.staged = Some(cache.slot);
        self.staged_decoding = false;
        self.staged_len = cache.len;
        Ok(())
    }

    /// Move the staged sequence's `len` positions into its pool row `slot`.
    fn commit_staging(&mut self, slot: usize, len: usize) -> Result<()> {
        copy_positions(&self.staging.kv, 0, &mut self.pool.kv, slot, len, self.slot_len, &self.shape)?;
        self.staged = None;
        self.staged_decoding = false;
        Ok(())
    }

    /// `len + new` positions as the graph's i32, if they fit a row.
    fn check_fits(&self, len: usize, new: usize) -> Result<i32> {
        let total = len + new;
        if total > self.slot_len {
            return Err(InferenceError::Runtime(format!(
                "{total} positions do not fit a cache row of {}",
                self.slot_len
            )));
        }
        i32::try_from(total).map_err(|_| InferenceError::Runtime("sequence too long".into()))
    }
}

impl Mixed {
    /// Check that the graph is the mixed step of the model's own graph and bind the pool (as the
    /// decode rows' cache) and staging (as the chunk's) in a binding of its own.
    fn new(
        session: Session,
        files: &ModelFiles,
        shape: &ModelShape,
        pool: &mut Buffers,
        staging: &mut Buffers,
    ) -> Result<Self> {
        let (past_names, present_names) = shape.cache_names();
        let inputs = session.inputs();
        let outputs = session.outputs();
        let chunk_past: Vec<String> = past_names.iter().map(|n| format!("chunk_{n}")).collect();
        let wanted = ["input_ids", "slots", "seqlens_k", "total_sequence_length", "chunk_ids"]
            .into_iter()
            .map(String::from)
            .chain(["chunk_seqlens_k", "chunk_total_sequence_length"].map(String::from))
            .chain(past_names.iter().cloned())
            .chain(chunk_past);
        for name in wanted {
            if !inputs.iter().any(|i| i.name() == name) {
                return Err(InferenceError::UnsupportedModel {
                    path: files.dir.join("model_mixed.onnx"),
                    reason: format!(
                        "not the mixed step of this folder's model.onnx: missing input '{name}' (rebuild \
                         the folder with scripts/model_prep/gguf_to_onnx.py, or delete model_mixed.onnx)"
                    ),
                });
            }
        }
        let chunk_present = present_names.iter().map(|n| format!("chunk_{n}"));
        for name in present_names.iter().cloned().chain(chunk_present).chain(["logits".to_string()]) {
            if !outputs.iter().any(|o| o.name() == name) {
                return Err(InferenceError::UnsupportedModel {
                    path: files.dir.join("model_mixed.onnx"),
                    reason: format!(
                        "not the mixed step of this folder's model.onnx: missing output '{name}'"
                    ),
                });
            }
        }
        let mut binding = session.create_binding().map_err(InferenceError::runtime)?;
        pool.bind(&mut binding, "", &past_names, &present_names)?;
        staging.bind(&mut binding, "chunk_", &past_names, &present_names)?;
        Ok(Self { session, binding })
    }
}

impl Buffers {
    /// Uninitialized buffers (the graph reads only positions it has written), bound once as both
    /// past and present, with in-place `seqlens_k` and `total_sequence_length` inputs.
    fn new(
        session: &Session,
        shape: &ModelShape,
        past_names: &[String],
        present_names: &[String],
        rows: usize,
        slot_len: usize,
    ) -> Result<Self> {
        let rt = InferenceError::runtime;
        let dims = [rows, shape.kv_heads, slot_len, shape.head_dim];
        let len = dims.iter().product();
        // Zeroed by the allocator on demand: a page costs memory only once a position in it is
        // written. Owned by the tensor (so binding it as an input copies nothing).
        let mut kv = past_names
            .iter()
            .map(|_| Tensor::from_array((dims, vec![0f32; len])).map_err(rt))
            .collect::<Result<Vec<_>>>()?;
        let seqlens_k = Tensor::from_array(([rows], vec![0i32; rows])).map_err(rt)?;
        let total_len = Tensor::from_array((Vec::<usize>::new(), vec![0i32])).map_err(rt)?;
        let mut binding = session.create_binding().map_err(rt)?;
        bind_buffers(&mut binding, "", &mut kv, &seqlens_k, &total_len, past_names, present_names)?;
        Ok(Self { binding, kv, seqlens_k, total_len, rows })
    }

    /// Bind these buffers in another binding too (`prefix` + the graph's names).
    fn bind(
        &mut self,
        binding: &mut IoBinding,
        prefix: &str,
        past_names: &[String],
        present_names: &[String],
    ) -> Result<()> {
        bind_buffers(
            binding,
            prefix,
            &mut self.kv,
            &self.seqlens_k,
            &self.total_len,
            past_names,
            present_names,
        )
    }

    /// Row `row`'s first `len` positions, compact: `[tensor][kv_head][position][head_dim]`.
    fn read_rows(&self, row: usize, len: usize, slot_len: usize, shape: &ModelShape) -> Option<Vec<f32>> {
        let span = len * shape.head_dim;
        let mut out = Vec::with_capacity(self.kv.len() * shape.kv_heads * span);
        for tensor in &self.kv {
            let data = tensor.extract_tensor().1;
            for head in 0..shape.kv_heads {
                let from = (row * shape.kv_heads + head) * slot_len * shape.head_dim;
                out.extend_from_slice(data.get(from..from + span)?);
            }
        }
        Some(out)
    }

    /// Write the first `take` positions of a compact entry of `entry_len` positions into row `row`.
    fn write_rows(
        &mut self,
        row: usize,
        entry: &[f32],
        entry_len: usize,
        take: usize,
        slot_len: usize,
        shape: &ModelShape,
    ) -> Result<()> {
        let (kv_heads, head_dim) = (shape.kv_heads, shape.head_dim);
        let take = take.min(entry_len).min(slot_len);
        for (t, tensor) in self.kv.iter_mut().enumerate() {
            let data = tensor.extract_tensor_mut().1;
            for head in 0..kv_heads {
                let from = (t * kv_heads + head) * entry_len * head_dim;
                let to = (row * kv_heads + head) * slot_len * head_dim;
                let (Some(s), Some(d)) =
                    (entry.get(from..from + take * head_dim), data.get_mut(to..to + take * head_dim))
                else {
                    return Err(InferenceError::Runtime("a prefix copy fell outside its buffer".into()));
                };
                d.copy_from_slice(s);
            }
        }
        Ok(())
    }
}

/// Bind KV buffers in `binding` as both past and present (`prefix` + the graph's names), with
/// their `seqlens_k` and `total_sequence_length`. The outputs are views of the inputs' memory,
/// which makes GroupQueryAttention write in place.
fn bind_buffers(
    binding: &mut IoBinding,
    prefix: &str,
    kv: &mut [Tensor<f32>],
    seqlens_k: &Tensor<i32>,
    total_len: &Tensor<i32>,
    past_names: &[String],
    present_names: &[String],
) -> Result<()> {
    let rt = InferenceError::runtime;
    for ((past, present), buffer) in past_names.iter().zip(present_names).zip(kv.iter_mut()) {
        binding.bind_input(format!("{prefix}{past}"), &*buffer).map_err(rt)?;
        let dims: Vec<usize> = buffer.shape().iter().map(|&d| d as usize).collect();
        let view = TensorRefMut::from_array_view_mut((dims, buffer.extract_tensor_mut().1)).map_err(rt)?;
        binding.bind_output(format!("{prefix}{present}"), view).map_err(rt)?;
    }
    binding.bind_input(format!("{prefix}seqlens_k"), seqlens_k).map_err(rt)?;
    binding.bind_input(format!("{prefix}total_sequence_length"), total_len).map_err(rt)?;
    Ok(())
}

/// A step's `logits` output, out of the run's outputs.
fn take_logits(mut outputs: SessionOutputs<'_>) -> Result<DynValue> {
    outputs
        .remove("logits")
        .ok_or_else(|| InferenceError::Runtime("the model produced no 'logits' output".into()))
}

/// Copy the first `len` positions of row `from_row` of one set of KV buffers into row `to_row` of
/// another (staging and pool rows have the same `[kv_heads, slot_len, head_dim]` layout).
fn copy_positions(
    src: &[Tensor<f32>],
    from_row: usize,
    dst: &mut [Tensor<f32>],
    to_row: usize,
    len: usize,
    slot_len: usize,
    shape: &ModelShape,
) -> Result<()> {
    let (kv_heads, head_dim) = (shape.kv_heads, shape.head_dim);
    let span = len * head_dim;
    for (src, dst) in src.iter().zip(dst.iter_mut()) {
        let src = src.extract_tensor().1;
        let dst = dst.extract_tensor_mut().1;
        for head in 0..kv_heads {
            let from = (from_row * kv_heads + head) * slot_len * head_dim;
            let to = (to_row * kv_heads + head) * slot_len * head_dim;
            let (Some(s), Some(d)) = (src.get(from..from + span), dst.get_mut(to..to + span)) else {
                return Err(InferenceError::Runtime("a cache copy fell outside its buffer".into()));
            };
            d.copy_from_slice(s);
        }
    }
    Ok(())
}

/// Refuse a pool (its rows plus staging) larger than the machine's memory: allocating it would
/// abort the process, and filling it would bring in the OOM killer. Memory is taken as positions
/// are written, so a pool that fits may still be larger than what is free; that is the operator's
/// sizing (docs/configuration.md), not an error.
fn check_pool_fits(rows: usize, slot_len: usize, position_bytes: usize, memory: Option<u64>) -> Result<()> {
    let Some(memory) = memory else { return Ok(()) };
    let bytes = (rows as u128).saturating_mul(slot_len as u128).saturating_mul(position_bytes as u128);
    if bytes > u128::from(memory) {
        return Err(InferenceError::Config(format!(
            "the KV pool would need {} MiB ({rows} rows x {slot_len} positions x {position_bytes} bytes), \
             more than this machine's {} MiB: lower --max-active-sequences or --context-length",
            bytes >> 20,
            memory >> 20
        )));
    }
    Ok(())
}

/// Physical memory from /proc/meminfo (Linux); `None` where it cannot be read.
fn physical_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Layers, KV heads, head size and vocabulary from the graph, naming whatever is missing.
fn discover_shape(session: &Session, files: &ModelFiles) -> Result<ModelShape> {
    let fail = |reason: String| unsupported(files, format!("fused layout (input 'seqlens_k'): {reason}"));
    let inputs = session.inputs();
    for (name, ty) in [
        ("input_ids", TensorElementType::Int64),
        ("slots", TensorElementType::Int64),
        ("seqlens_k", TensorElementType::Int32),
        ("total_sequence_length", TensorElementType::Int32),
    ] {
        let found = inputs.iter().find(|i| i.name() == name).ok_or_else(|| {
            fail(format!(
                "missing input '{name}' (a fused graph from before slot pools: rebuild it with \
                 scripts/model_prep/gguf_to_onnx.py, or `make setup`)"
            ))
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_larger_than_memory_is_a_clear_error() {
        // SmolLM2: 46,080 bytes per position.
        assert!(check_pool_fits(9, 4096, 46_080, Some(24 << 30)).is_ok());
        let err = check_pool_fits(257, 1 << 20, 46_080, Some(24 << 30)).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("--context-length")), "{err:?}");
        assert!(check_pool_fits(usize::MAX, usize::MAX, usize::MAX, Some(1)).is_err(), "no overflow");
        assert!(check_pool_fits(257, 1 << 20, 46_080, None).is_ok(), "unknown memory: not checked");
        assert!(physical_memory_bytes().is_some_and(|m| m > 0));
    }
}
