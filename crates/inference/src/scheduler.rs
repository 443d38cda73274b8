//! The ONNX engine: a dedicated worker thread owns the model, fed by a bounded admission queue,
//! and runs a step loop that batches every decoding sequence into one forward pass.
//!
//! ```text
//! loop {
//!     drop sequences whose client left                   (their slot is free at once)
//!     admit queued jobs while a KV slot is free          (queue full → Overloaded, at generate)
//!     prefill: one chunk of the shortest prompt          (a cached prefix is copied, not rerun)
//!     decode:  one token for every decoding sequence     (one forward pass for all of them)
//!     (with mixed steps, prefill and decode share one pass when both have work: `mixed_step`)
//!     per sequence: sample → detokenize → stop check → event; finished ones free their slot
//! }
//! ```
//!
//! A prompt runs in chunks of up to [`EngineConfig::prefill_chunk`] tokens while nothing else
//! decodes, or while prompts waiting outnumber the streams decoding (1.2 to 1, a burst fills the
//! batch first); otherwise its chunk is sized to take about [`EngineConfig::prefill_pace`] decode
//! steps (costs measured as it runs), so a long prompt slows running streams by about that much
//! per step instead of stalling them for its whole length. The prompt with the fewest tokens left
//! gets the next chunk ([`pick_prompt`]), so a short request is not held behind a long prompt.
//! Nothing heavy runs on the async runtime: the prompt is tokenized on tokio's blocking pool, then
//! the job is `try_send`-ed into the queue and the stream returned at once, so a caller can start
//! its response (and keep-alives) while the request waits for a slot and its prompt is processed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::unbounded_channel;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{InferenceError, Result};
use crate::generator::{
    BoxFuture, EngineStats, FinishReason, GenerationRequest, Generator, ModelInfo, ReceiverStream,
    TokenStream,
};
use crate::model::fused::PoolOptions;
use crate::model::{DecoderModel, Interrupt, SessionOptions};
use crate::model_files::ModelFiles;
use crate::runtime::init_runtime;
use crate::sequence::{EventSender, Sequence, Step, TokenRules};
use crate::tokenizer::TextTokenizer;

/// How to start an [`OnnxEngine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Folder with model.onnx, tokenizer.json and the JSON configs.
    pub model_dir: PathBuf,
    /// Path of libonnxruntime.so.
    pub ort_dylib_path: PathBuf,
    /// ONNX Runtime intra-op threads.
    pub intra_threads: usize,
    /// Whether the intra-op threads spin between runs (ONNX Runtime's default). A lone model's
    /// next step then starts a little sooner (measured: a few percent more tokens/s for ~25 % more
    /// CPU); several models sharing the same cores must not spin, or each one's idle threads take
    /// the cores the other is computing on (measured: two models decoding at once made 1.4-1.7x more
    /// tokens/s in all with their threads sleeping; docs/benchmarks.md).
    pub spinning: bool,
    /// Sequences decoded together (the KV pool's rows).
    pub max_active: usize,
    /// Requests that may wait for a free slot before new ones get `Overloaded`.
    pub queue_capacity: usize,
    /// Prompt tokens per forward pass when nothing else decodes ([`DEFAULT_PREFILL_CHUNK`]).
    pub prefill_chunk: usize,
    /// Positions per sequence (prompt + output); `None`: the model's own context length, capped
    /// at [`DEFAULT_MAX_CONTEXT`]. Each KV slot holds this many positions.
    pub context_length: Option<usize>,
    /// Megabytes of finished sequences' KV kept for prefix reuse (0: off).
    pub prefix_cache_mb: usize,
    /// While other sequences decode, a prompt chunk is sized to take about this many decode steps'
    /// time ([`DEFAULT_PREFILL_PACE`]); 0 runs whole `prefill_chunk`s (fastest admission, longest
    /// stalls for running streams).
    pub prefill_pace: f64,
    /// Make a sequence's tokens independent of how many others decode with it, at some cost to a
    /// lone stream's speed (see [`PoolOptions::batch_invariant`]).
    pub batch_invariant: bool,
    /// Run decode rows and a prompt chunk in one forward pass where the model folder has the
    /// mixed-step graph (see [`PoolOptions::mixed_steps`]).
    pub mixed_steps: bool,
    /// Run the fused graph's `GroupQueryAttention` nodes with this crate's kernel
    /// ([`crate::model::attention`]: AVX-512 / AVX2 where the CPU has them) instead of ONNX
    /// Runtime's; a graph it does not suit runs on ONNX Runtime's kernels anyway.
    pub own_attention: bool,
    /// Write ONNX Runtime's per-node profile (Chrome trace JSON, one file per graph session,
    /// named from this prefix) when the engine stops: a development aid, it slows every step.
    pub ort_profile: Option<PathBuf>,
}

impl EngineConfig {
    /// One sequence at a time, one thread, a one-deep queue, every other setting at its default:
    /// what a library caller or a test starts from (`EngineConfig { max_active: 8, ..base }`).
    pub fn new(model_dir: PathBuf, ort_dylib_path: PathBuf) -> Self {
        Self {
            model_dir,
            ort_dylib_path,
            intra_threads: 1,
            spinning: true,
            max_active: 1,
            queue_capacity: 1,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            context_length: None,
            prefix_cache_mb: DEFAULT_PREFIX_CACHE_MB,
            prefill_pace: DEFAULT_PREFILL_PACE,
            batch_invariant: false,
            ort_profile: None,
            mixed_steps: false,
            own_attention: true,
        }
    }
}

/// Default megabytes of KV kept for prefix reuse.
pub const DEFAULT_PREFIX_CACHE_MB: usize = 256;

/// A prompt chunk takes about one decode step while others decode: their inter-token gaps at most
/// about double while a long prompt is admitted.
pub const DEFAULT_PREFILL_PACE: f64 = 1.0;

/// Prompts up to this size are tokenized on the calling task (tens of microseconds).
const INLINE_TOKENIZE_BYTES: usize = 1024;

/// Default prompt tokens per forward pass. Attention's scratch grows with chunk x context, and
/// ONNX Runtime's arena keeps its peak: 256 keeps a 2,000-token prompt's peak small while the
/// matrix products still see enough rows to run at full speed.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// The default cap on positions per sequence. Every KV slot is this long; its memory is taken as
/// positions are written, and a slot keeps what it has touched, so the pool's worst case is
/// slots x this x the model's KV bytes per position (SmolLM2-135M: 46 KB per position).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

struct Job {
    prompt_ids: Vec<u32>,
    request: GenerationRequest,
    events: EventSender,
    queued_at: Instant,
}

#[derive(Default)]
struct Shared {
    active: AtomicUsize,
    queued: AtomicUsize,
    tokens_generated: AtomicU64,
    cancelled: AtomicU64,
    completed: AtomicU64,
    batch_size: AtomicUsize,
    peak_batch_size: AtomicUsize,
    decode_steps: AtomicU64,
    mixed_steps: AtomicU64,
    admitted: AtomicU64,
    queue_wait_micros: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_tokens_reused: AtomicU64,
    running: AtomicBool,
    stopping: AtomicBool,
}

/// A real model behind a worker thread. Dropping it stops the worker; open streams end with
/// `FinishReason::Cancelled`.
pub struct OnnxEngine {
    info: ModelInfo,
    chat: ChatTemplate,
    tokenizer: TextTokenizer,
    queue: SyncSender<Job>,
    queue_capacity: usize,
    slots: usize,
    shared: Arc<Shared>,
    /// Stops a forward pass in progress (a long prefill) at shutdown.
    interrupt: Interrupt,
    /// The worker thread, for [`OnnxEngine::shutdown`] to wait on.
    worker: Option<std::thread::JoinHandle<()>>,
}

impl OnnxEngine {
    /// Load ONNX Runtime, the tokenizer and the model, then start the worker thread.
    pub fn start(config: &EngineConfig) -> Result<Self> {
        let env = init_runtime(&config.ort_dylib_path)?;
        let files = ModelFiles::read(&config.model_dir)?;
        let tokenizer = TextTokenizer::from_file(&files.tokenizer_path)?;
        let context_length = config
            .context_length
            .unwrap_or(DEFAULT_MAX_CONTEXT)
            .min(files.context_length.unwrap_or(2048))
            .max(2);
        let max_active = config.max_active.max(1);
        let options = SessionOptions {
            intra_threads: config.intra_threads,
            spinning: config.spinning,
            profile: config.ort_profile.clone(),
            pool: PoolOptions {
                slots: max_active,
                slot_len: context_length,
                prefix_cache_bytes: config.prefix_cache_mb.saturating_mul(1 << 20),
                batch_invariant: config.batch_invariant,
                mixed_steps: config.mixed_steps,
            },
            own_attention: config.own_attention,
        };
        let model = DecoderModel::load(&env, &files, &options)?;
        let mut eos = files.eos_token_ids.clone();
        eos.extend(files.eos_token_text.as_deref().and_then(|t| tokenizer.token_to_id(t)));
        let info = ModelInfo {
            name: files.name.clone(),
            path: files.dir.clone(),
            context_length,
            vocab_size: model.shape().vocab_size,
            loaded_at: SystemTime::now(),
            engine: "onnx",
            layout: model.layout().as_str(),
            attention: model.attention(),
        };
        let chat = ChatTemplate::new(
            files.chat_template.as_deref(),
            files.bos_token_text.as_deref(),
            files.eos_token_text.as_deref(),
        )
        .map_err(|e| InferenceError::ModelFiles { path: files.dir.clone(), reason: e.to_string() })?;
        let queue_capacity = config.queue_capacity.max(1);
        let interrupt = model.interrupt();
        let slots = model.slots().unwrap_or(0);
        let (queue, jobs) = mpsc::sync_channel(queue_capacity);
        let shared = Arc::new(Shared::default());
        shared.running.store(true, Ordering::SeqCst);
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            eos,
            context_length,
            max_active,
            prefill_chunk: config.prefill_chunk.max(1),
            shared: Arc::clone(&shared),
            active: Vec::new(),
            pacing: Pacing { pace: config.prefill_pace.max(0.0), ..Pacing::default() },
        };
        // The worker ends on its own once `stopping` is set or the queue closes; dropping the
        // engine does not wait for it, `shutdown` does.
        let handle = std::thread::Builder::new()
            .name(format!("inference-{}", files.name))
            .spawn(move || worker.run(jobs))
            .map_err(|e| InferenceError::Runtime(format!("could not start the worker thread: {e}")))?;
        Ok(Self {
            info,
            chat,
            tokenizer,
            queue,
            queue_capacity,
            slots,
            shared,
            interrupt,
            worker: Some(handle),
        })
    }

    /// Stops the engine as dropping it does (open streams end with `Cancelled`, a forward pass in
    /// progress is interrupted) and waits until the worker has released the model: its sessions
    /// are closed (and an [`EngineConfig::ort_profile`] written) when this returns. Blocks the
    /// calling thread for up to one forward pass (or the idle worker's 200 ms poll).
    pub fn shutdown(mut self) {
        self.stop();
        if let Some(worker) = self.worker.take() {
            // A worker that panicked has nothing left to release.
            let _ = worker.join();
        }
    }

    fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.interrupt.terminate();
    }
}

impl Generator for OnnxEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(&self, request: GenerationRequest) -> BoxFuture<Result<TokenStream>> {
        let tokenizer = self.tokenizer.clone();
        let queue = self.queue.clone();
        let shared = Arc::clone(&self.shared);
        let (capacity, context_length) = (self.queue_capacity, self.info.context_length);
        Box::pin(async move {
            // Short prompts encode in microseconds, less than a hand-off to the blocking pool costs;
            // long ones (up to milliseconds) go there so the caller's event loop never stalls.
            let prompt_ids = if request.prompt().len() <= INLINE_TOKENIZE_BYTES {
                tokenizer.encode(request.prompt())?
            } else {
                let prompt = request.prompt().to_owned();
                tokio::task::spawn_blocking(move || tokenizer.encode(&prompt))
                    .await
                    .map_err(|_| InferenceError::EngineStopped)??
            };
            if prompt_ids.is_empty() {
                return Err(InferenceError::InvalidRequest("the prompt encodes to no tokens".into()));
            }
            if prompt_ids.len() >= context_length {
                return Err(InferenceError::PromptTooLong {
                    prompt_tokens: prompt_ids.len(),
                    context_length,
                });
            }
            let (events, receiver) = unbounded_channel();
            shared.queued.fetch_add(1, Ordering::SeqCst);
            let job = Job { prompt_ids, request, events, queued_at: Instant::now() };
            if let Err(e) = queue.try_send(job) {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                return Err(match e {
                    TrySendError::Full(_) => InferenceError::Overloaded { capacity },
                    TrySendError::Disconnected(_) => InferenceError::EngineStopped,
                });
            }
            Ok(Box::pin(ReceiverStream(receiver)) as TokenStream)
        })
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.chat.render(messages)
    }

    fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            active: s.active.load(Ordering::SeqCst),
            queued: s.queued.load(Ordering::SeqCst),
            queue_capacity: self.queue_capacity,
            tokens_generated: s.tokens_generated.load(Ordering::SeqCst),
            cancelled: s.cancelled.load(Ordering::SeqCst),
            completed: s.completed.load(Ordering::SeqCst),
            slots: self.slots,
            batch_size: s.batch_size.load(Ordering::SeqCst),
            peak_batch_size: s.peak_batch_size.load(Ordering::SeqCst),
            decode_steps: s.decode_steps.load(Ordering::SeqCst),
            mixed_steps: s.mixed_steps.load(Ordering::SeqCst),
            admitted: s.admitted.load(Ordering::SeqCst),
            queue_wait_micros: s.queue_wait_micros.load(Ordering::SeqCst),
            prefix_hits: s.prefix_hits.load(Ordering::SeqCst),
            prefix_tokens_reused: s.prefix_tokens_reused.load(Ordering::SeqCst),
        }
    }

    fn is_ready(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst) && !self.shared.stopping.load(Ordering::SeqCst)
    }
}

impl Drop for OnnxEngine {
    fn drop(&mut self) {
        // The worker notices `stopping` between steps and ends open streams with `Cancelled`; a
        // forward pass in progress (a long prefill) is interrupted. Nothing here blocks the caller.
        self.stop();
    }
}

/// Prompts run in full chunks, not paced, while at least this many times as many wait for their
/// prompt as decode (text-generation-inference's `waiting_served_ratio` default).
const WAITING_SERVED_RATIO: f64 = 1.2;

/// Measured costs that size a prompt chunk while other sequences decode.
#[derive(Default)]
struct Pacing {
    /// Decode steps' time a chunk may take ([`EngineConfig::prefill_pace`]; 0: no limit).
    pace: f64,
    /// Recent decode step time, seconds (moving average).
    decode_secs: Option<f64>,
    /// Recent prompt cost per token, seconds (moving average over chunks of any size).
    prefill_secs_per_token: Option<f64>,
    /// Recent time a prompt chunk adds to a mixed step, per token (its step's time less a decode
    /// step's; moving average).
    mixed_secs_per_token: Option<f64>,
}

impl Pacing {
    const WEIGHT: f64 = 0.2;

    fn record_decode(&mut self, took: Duration) {
        self.decode_secs = Some(average(self.decode_secs, took.as_secs_f64()));
    }

    fn record_prefill(&mut self, tokens: usize, took: Duration) {
        let per_token = took.as_secs_f64() / tokens.max(1) as f64;
        self.prefill_secs_per_token = Some(average(self.prefill_secs_per_token, per_token));
    }

    fn record_mixed(&mut self, tokens: usize, took: Duration) {
        let Some(step) = self.decode_secs else { return };
        let added = (took.as_secs_f64() - step).max(0.0) / tokens.max(1) as f64;
        self.mixed_secs_per_token = Some(average(self.mixed_secs_per_token, added));
    }

    /// Tokens for the next prompt chunk: `max` when nothing else decodes (or pacing is off);
    /// otherwise as many as take about `pace` decode steps — in a pass of their own, or added to a
    /// mixed step (`mixed`). The cost per token is measured on chunks of the sizes this picks, fixed
    /// overhead included, so the size settles where a chunk's time matches the budget.
    fn chunk(&self, others_decoding: bool, mixed: bool, max: usize) -> usize {
        if !others_decoding || self.pace <= 0.0 {
            return max;
        }
        let per_token = if mixed { self.mixed_secs_per_token } else { self.prefill_secs_per_token };
        match (self.decode_secs, per_token) {
            (Some(step), Some(per_token)) if per_token > 0.0 => {
                ((self.pace * step / per_token) as usize).clamp(1, max)
            }
            // Nothing measured yet: a small chunk, then the measurements take over.
            _ => max.min(16),
        }
    }
}

/// A prompt waiting for its next chunk, as [`pick_prompt`] sees it.
#[derive(Debug, Clone, Copy)]
struct PromptTurn {
    /// Prompt tokens still to run.
    left: usize,
    /// Part of it has run (its positions are in staging, or set aside while another runs).
    started: bool,
    /// Times a new prompt went ahead of it after it had started.
    passed_over: usize,
}

/// Which prompt gets the next chunk: the one with the fewest tokens left, the oldest on a tie, so
/// a short request that arrives while a long prompt is being processed runs its prompt next instead
/// of waiting for the long one's remaining chunks (shortest remaining first: the least total
/// waiting). A prompt under way that has been passed over `max_passes` times (the pool's size)
/// keeps its turn, so new short requests cannot hold a long prompt back indefinitely.
fn pick_prompt(turns: &[PromptTurn], max_passes: usize) -> Option<usize> {
    if let Some(i) = turns.iter().position(|t| t.started && t.passed_over >= max_passes) {
        return Some(i);
    }
    turns.iter().enumerate().min_by_key(|(_, t)| t.left).map(|(i, _)| i)
}

fn average(previous: Option<f64>, sample: f64) -> f64 {
    previous.map_or(sample, |p| p + Pacing::WEIGHT * (sample - p))
}

struct Worker {
    model: DecoderModel,
    tokenizer: TextTokenizer,
    eos: BTreeSet<u32>,
    context_length: usize,
    max_active: usize,
    prefill_chunk: usize,
    shared: Arc<Shared>,
    /// In admission order: the first prefilling one runs its prompt first.
    active: Vec<Sequence>,
    pacing: Pacing,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.shared.stopping.load(Ordering::SeqCst) {
                for seq in std::mem::take(&mut self.active) {
                    self.finish(seq, Ok(FinishReason::Cancelled));
                }
                break;
            }
            // A client that left frees its slot before anyone is admitted into it.
            self.drop_cancelled();
            // Idle: block for work. Busy: top up free slots without waiting.
            if self.active.is_empty() {
                match jobs.recv_timeout(Duration::from_millis(200)) {
                    Ok(job) => self.admit(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            while self.active.len() < self.max_active {
                match jobs.try_recv() {
                    Ok(job) => self.admit(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !self.mixed_step() {
                self.prefill_step();
                self.decode_step();
            }
            self.shared.active.store(self.active.len(), Ordering::SeqCst);
        }
        self.shared.active.store(0, Ordering::SeqCst);
        self.shared.running.store(false, Ordering::SeqCst);
    }

    /// Give a queued job a slot, a sampler and a decoder.
    fn admit(&mut self, job: Job) {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        let Job { prompt_ids, request, events, queued_at } = job;
        if events.is_closed() {
            self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
            return; // the client left while queued
        }
        let cache = match self.model.new_cache() {
            Ok(Some(cache)) => cache,
            Ok(None) => {
                // Unreachable while max_active equals the pool's rows; fail the request, not the worker.
                let _ = events.send(Err(InferenceError::Runtime("no free KV slot".into())));
                return;
            }
            Err(e) => {
                let _ = events.send(Err(e));
                return;
            }
        };
        self.shared.admitted.fetch_add(1, Ordering::SeqCst);
        let waited = u64::try_from(queued_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared.queue_wait_micros.fetch_add(waited, Ordering::SeqCst);
        self.active.push(Sequence::new(prompt_ids, request, events, cache));
        self.shared.active.store(self.active.len(), Ordering::SeqCst);
    }

    /// Sequences whose receiver is gone (the client disconnected) give their slot back now.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].events.is_closed() {
                let seq = self.active.remove(i);
                self.model.release(seq.cache, None);
                self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
            } else {
                i += 1;
            }
        }
        self.shared.active.store(self.active.len(), Ordering::SeqCst);
    }

    /// One chunk of the prompt with the fewest tokens left ([`pick_prompt`]).
    fn prefill_step(&mut self) {
        let Some((i, chunk)) = self.next_prompt(false) else { return };
        let outcome = self.prefill(i, chunk);
        self.settle(vec![(i, outcome)]);
    }

    /// The prompt to run next ([`pick_prompt`]) and its chunk's size; `None` when no prompt waits.
    /// `mixed`: the chunk shares a forward pass with the decode rows (sized by its added time).
    fn next_prompt(&mut self, mixed: bool) -> Option<(usize, usize)> {
        let prompts: Vec<usize> =
            (0..self.active.len()).filter(|&i| self.active[i].is_prefilling()).collect();
        let turns: Vec<PromptTurn> = prompts
            .iter()
            .map(|&i| {
                let s = &self.active[i];
                PromptTurn { left: s.prompt_left(), started: s.prompt_started(), passed_over: s.passed_over }
            })
            .collect();
        let pick = pick_prompt(&turns, self.max_active)?;
        let i = prompts[pick];
        if !turns[pick].started {
            // A new prompt goes ahead of those under way: each of them is passed over once more.
            for (&j, turn) in prompts.iter().zip(&turns) {
                if turn.started {
                    self.active[j].passed_over += 1;
                }
            }
        }
        let waiting = prompts.len();
        let decoding = self.active.len() - waiting;
        // Pace prompts only while they are few next to the streams they would hold up; a burst of
        // new requests fills the batch first (TGI's waiting-served ratio), which serves everyone sooner.
        let pace = decoding > 0 && (waiting as f64) < WAITING_SERVED_RATIO * decoding as f64;
        Some((i, self.pacing.chunk(pace, mixed, self.prefill_chunk)))
    }

    /// The next `chunk` tokens of sequence `i`'s prompt; before its first chunk, the longest cached
    /// prefix of it is reused instead of run.
    fn prompt_chunk(&mut self, i: usize, chunk: usize) -> Result<Vec<u32>> {
        let seq = &mut self.active[i];
        if seq.cache.is_empty() {
            let (prompt, cache) = seq.prompt_and_cache();
            let reused = self.model.reuse_prefix(prompt, cache)?;
            if reused > 0 {
                seq.skip_prompt(reused);
                self.shared.prefix_hits.fetch_add(1, Ordering::SeqCst);
                self.shared.prefix_tokens_reused.fetch_add(reused as u64, Ordering::SeqCst);
            }
        }
        Ok(seq.next_chunk(chunk).to_vec())
    }

    fn prefill(&mut self, i: usize, chunk: usize) -> Result<Option<Step>> {
        let tokens = self.prompt_chunk(i, chunk)?;
        let seq = &mut self.active[i];
        let n = tokens.len();
        let started = Instant::now();
        let logits = self.model.prefill(&tokens, &mut seq.cache)?;
        let took = started.elapsed();
        self.pacing.record_prefill(n, took);
        if !seq.fed(n) {
            return Ok(None); // more of the prompt to run before anything is sampled
        }
        let rules =
            TokenRules { tokenizer: &self.tokenizer, eos: &self.eos, context_length: self.context_length };
        let step = seq.on_logits(logits, &rules)?;
        self.shared.tokens_generated.fetch_add(1, Ordering::Relaxed);
        let (prompt, cache) = seq.prompt_and_cache();
        self.model.remember_prompt(cache, prompt);
        Ok(Some(step))
    }

    /// Where the model has a mixed-step graph and a prompt waits while others decode: one token
    /// for every decoding sequence and the next chunk of a prompt in one forward pass, so a prompt
    /// admitted under load costs the running streams only its own tokens' share of a step, not a
    /// pass of its own. Returns false, having run nothing, when that is not the case.
    fn mixed_step(&mut self) -> bool {
        if !self.model.has_mixed_steps() {
            return false;
        }
        let rows: Vec<usize> = (0..self.active.len()).filter(|&i| !self.active[i].is_prefilling()).collect();
        if rows.is_empty() || rows.len() == self.active.len() {
            return false;
        }
        let Some((p, chunk)) = self.next_prompt(true) else { return false };
        let tokens = match self.prompt_chunk(p, chunk) {
            Ok(tokens) => tokens,
            Err(e) => {
                self.settle(vec![(p, Err(e))]);
                return true;
            }
        };
        let n = tokens.len();
        let ids: Vec<u32> = rows.iter().map(|&i| self.active[i].last_token()).collect();
        self.shared.batch_size.store(rows.len(), Ordering::SeqCst);
        self.shared.peak_batch_size.fetch_max(rows.len(), Ordering::SeqCst);
        self.shared.decode_steps.fetch_add(1, Ordering::SeqCst);
        self.shared.mixed_steps.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let Self { model, active, tokenizer, eos, context_length, shared, pacing, .. } = self;
        let mut prompt = None;
        let mut caches = Vec::with_capacity(rows.len());
        for (i, seq) in active.iter_mut().enumerate() {
            if i == p {
                prompt = Some(&mut seq.cache);
            } else if rows.contains(&i) {
                caches.push(&mut seq.cache);
            }
        }
        let result = match prompt {
            Some(prompt) => model.mixed_step(&mut caches, &ids, &tokens, prompt),
            None => Err(InferenceError::Runtime("the prompt's sequence is gone".into())),
        };
        let mut prompt_done = false;
        let outcomes = match result {
            Ok(logits) => {
                pacing.record_mixed(n, started.elapsed());
                let rules = TokenRules { tokenizer, eos, context_length: *context_length };
                let vocab = logits.len() / (rows.len() + 1);
                let mut per_row = logits.chunks_exact_mut(vocab.max(1));
                let mut outcomes: Vec<_> = rows
                    .iter()
                    .zip(&mut per_row)
                    .map(|(&i, row)| {
                        let outcome = active[i].on_logits(row, &rules).map(Some);
                        shared.tokens_generated.fetch_add(1, Ordering::Relaxed);
                        (i, outcome)
                    })
                    .collect();
                let seq = &mut active[p];
                let outcome = match (seq.fed(n), per_row.next()) {
                    (false, _) => Ok(None), // more of the prompt to run before anything is sampled
                    (true, Some(row)) => {
                        prompt_done = true;
                        shared.tokens_generated.fetch_add(1, Ordering::Relaxed);
                        seq.on_logits(row, &rules).map(Some)
                    }
                    (true, None) => {
                        Err(InferenceError::Runtime("the mixed step gave no prompt logits".into()))
                    }
                };
                outcomes.push((p, outcome));
                outcomes
            }
            Err(e) => {
                let message = e.to_string();
                rows.iter().chain([&p]).map(|&i| (i, Err(InferenceError::Runtime(message.clone())))).collect()
            }
        };
        if prompt_done {
            let (prompt, cache) = self.active[p].prompt_and_cache();
            self.model.remember_prompt(cache, prompt);
        }
        self.settle(outcomes);
        true
    }

    /// One token for every sequence past its prompt, in one forward pass.
    fn decode_step(&mut self) {
        let rows: Vec<usize> = (0..self.active.len()).filter(|&i| !self.active[i].is_prefilling()).collect();
        if rows.is_empty() {
            return;
        }
        // A sequence that finished in this step's prefill is already gone: `rows` is fresh.
        let ids: Vec<u32> = rows.iter().map(|&i| self.active[i].last_token()).collect();
        self.shared.batch_size.store(rows.len(), Ordering::SeqCst);
        self.shared.peak_batch_size.fetch_max(rows.len(), Ordering::SeqCst);
        self.shared.decode_steps.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let Self { model, active, tokenizer, eos, context_length, shared, pacing, .. } = self;
        let mut caches: Vec<_> = active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| rows.contains(i))
            .map(|(_, s)| &mut s.cache)
            .collect();
        let outcomes = match model.decode(&mut caches, &ids) {
            Ok(logits) => {
                pacing.record_decode(started.elapsed());
                let rules = TokenRules { tokenizer, eos, context_length: *context_length };
                let vocab = logits.len() / rows.len().max(1);
                rows.iter()
                    .zip(logits.chunks_exact_mut(vocab.max(1)))
                    .map(|(&i, row)| {
                        let outcome = active[i].on_logits(row, &rules).map(Some);
                        shared.tokens_generated.fetch_add(1, Ordering::Relaxed);
                        (i, outcome)
                    })
                    .collect()
            }
            Err(e) => {
                let message = e.to_string();
                rows.iter().map(|&i| (i, Err(InferenceError::Runtime(message.clone())))).collect()
            }
        };
        self.settle(outcomes);
    }

    /// Remove the sequences that finished or failed (highest index first, so the others' indices
    /// hold), freeing their slots.
    fn settle(&mut self, mut outcomes: Vec<(usize, Result<Option<Step>>)>) {
        outcomes.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, outcome) in outcomes {
            let end = match outcome {
                Ok(None | Some(Step::Continue)) => continue,
                Ok(Some(Step::Finished(reason))) => Ok(reason),
                // The run was interrupted by shutdown: the stream ends as cancelled.
                Err(_) if self.shared.stopping.load(Ordering::SeqCst) => Ok(FinishReason::Cancelled),
                Err(e) => Err(e),
            };
            let seq = self.active.remove(i);
            self.finish(seq, end);
        }
        self.shared.active.store(self.active.len(), Ordering::SeqCst);
    }

    /// The final event (or the error), then the slot goes back; a sequence that completed offers
    /// its cached positions for prefix reuse.
    fn finish(&mut self, seq: Sequence, end: Result<FinishReason>) {
        let keep = match end {
            Ok(reason) => {
                seq.send_finished(reason);
                self.shared.completed.fetch_add(1, Ordering::SeqCst);
                reason != FinishReason::Cancelled
            }
            Err(e) => {
                let _ = seq.events.send(Err(e));
                false
            }
        };
        let tokens = keep.then(|| seq.cached_tokens().to_vec());
        self.model.release(seq.cache, tokens.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(left: usize, started: bool, passed_over: usize) -> PromptTurn {
        PromptTurn { left, started, passed_over }
    }

    #[test]
    fn the_prompt_with_the_fewest_tokens_left_runs_next() {
        assert_eq!(pick_prompt(&[], 4), None);
        // A long prompt under way, then a short newcomer: the newcomer runs first.
        assert_eq!(pick_prompt(&[turn(1800, true, 0), turn(20, false, 0)], 4), Some(1));
        // Ties go to the oldest (admission order).
        assert_eq!(pick_prompt(&[turn(30, false, 0), turn(30, false, 0)], 4), Some(0));
        // A long prompt keeps its turn over a longer newcomer.
        assert_eq!(pick_prompt(&[turn(500, true, 0), turn(900, false, 0)], 4), Some(0));
    }

    #[test]
    fn a_prompt_passed_over_as_often_as_there_are_slots_keeps_its_turn() {
        assert_eq!(pick_prompt(&[turn(1800, true, 3), turn(20, false, 0)], 4), Some(1));
        assert_eq!(pick_prompt(&[turn(1800, true, 4), turn(20, false, 0)], 4), Some(0));
        // Only a prompt under way can claim it (a fresh one has not been passed over).
        assert_eq!(pick_prompt(&[turn(20, false, 0), turn(1800, true, 9), turn(5, false, 0)], 4), Some(1));
    }
}
