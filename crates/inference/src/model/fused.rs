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
use ort::session::{IoBinding, Session};
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
}

/// Finished sequences shorter than this are not kept for reuse (recomputing them is cheap).
const MIN_PREFIX_TOKENS: usize = 16;

/// A fused-layout session, owned by one worker thread.
pub struct FusedModel {
    session: Session,
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
}

impl FusedModel {
    pub(super) fn new(
        session: Session,
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
        Ok(Self {
            session,
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
        })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
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
        // A sequence set aside right after its prompt ran decodes from its pool row: its positions
        // go there first (the scheduler decodes a finished prompt before another takes staging, so
        // this is a safeguard).
        if !self.parked.is_empty() {
            for cache in caches.iter() {
                if let Some((len, kv)) = self.parked.remove(&cache.slot) {
                    self.pool.write_rows(cache.slot, &kv, len, len, self.slot_len, &self.shape)?;
                }
            }
        }
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
        for cache in caches.iter() {
            if self.staged == Some(cache.slot) {
                self.commit_staging(cache.slot, cache.len)?;
            }
        }
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
        let batch = ids.len();
        // A lone sequence gets a padding row, so that the step takes the multi-row kernels.
        if let (1, Some(row)) = (batch, self.padding_row) {
            ids.push(0);
            slots.push(row as i64);
        }
        let rows = ids.len();
        let input_ids = Tensor::from_array(([rows, 1usize], ids)).map_err(rt)?;
        let slots = Tensor::from_array(([rows], slots)).map_err(rt)?;
        self.pool.binding.bind_input("input_ids", &input_ids).map_err(rt)?;
        self.pool.binding.bind_input("slots", &slots).map_err(rt)?;
        // The batch changes from step to step: ONNX Runtime allocates this step's logits (a bound
        // tensor would fix their shape).
        self.pool.binding.bind_output_to_device("logits", &MemoryInfo::default()).map_err(rt)?;
        let mut outputs =
            self.session.run_binding_with_options(&self.pool.binding, &self.interrupt.0).map_err(rt)?;
        let logits = outputs
            .remove("logits")
            .ok_or_else(|| InferenceError::Runtime("the model produced no 'logits' output".into()))?;
        drop(outputs);
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let logits = self.batch_logits.insert(logits);
        let (_, data) = logits.try_extract_tensor_mut::<f32>().map_err(rt)?;
        let want = batch * self.shape.vocab_size;
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
        let mut binding = session.create_binding().map_err(rt)?;
        let mut kv = Vec::with_capacity(past_names.len());
        let len = dims.iter().product();
        for (past, present) in past_names.iter().zip(present_names) {
            // Zeroed by the allocator on demand: a page costs memory only once a position in it
            // is written. Owned by the tensor (so binding it as an input copies nothing); the
            // output is a view of the same memory, which makes GroupQueryAttention write in place.
            let mut buffer = Tensor::from_array((dims, vec![0f32; len])).map_err(rt)?;
            binding.bind_input(past.as_str(), &buffer).map_err(rt)?;
            let view =
                TensorRefMut::from_array_view_mut((dims, buffer.extract_tensor_mut().1)).map_err(rt)?;
            binding.bind_output(present.as_str(), view).map_err(rt)?;
            kv.push(buffer);
        }
        let seqlens_k = Tensor::from_array(([rows], vec![0i32; rows])).map_err(rt)?;
        let total_len = Tensor::from_array((Vec::<usize>::new(), vec![0i32])).map_err(rt)?;
        binding.bind_input("seqlens_k", &seqlens_k).map_err(rt)?;
        binding.bind_input("total_sequence_length", &total_len).map_err(rt)?;
        Ok(Self { binding, kv, seqlens_k, total_len, rows })
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
