//! The ONNX engine: a dedicated worker thread owns the model, fed by a bounded admission queue.
//!
//! The worker keeps up to `max_active` sequences and advances them round-robin, one step each, so
//! concurrent streams all make progress: a decode step is one token; a prompt is processed in
//! chunks of [`EngineConfig::prefill_chunk`] tokens, one chunk per step, so a long prompt neither
//! stalls the other streams for its whole length nor needs activation memory for all of it at
//! once. Before each step it checks whether the sequence's receiver is gone (the client
//! disconnected) and, if so, frees that sequence's KV cache.
//! Nothing heavy runs on the async runtime: the prompt is tokenized on tokio's blocking pool, then
//! the job is `try_send`-ed into the queue and the stream returned at once, so a caller can start
//! its response (and keep-alives) while the request waits for a slot and its prompt is processed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::SystemTime;

use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{InferenceError, Result};
use crate::generator::{
    BoxFuture, EngineStats, FinishReason, GenerationEvent, GenerationRequest, Generator, ModelInfo,
    ReceiverStream, TokenStream, Usage, validate_request,
};
use crate::model::{DecoderModel, Interrupt, KvCache, SessionOptions};
use crate::model_files::ModelFiles;
use crate::runtime::init_runtime;
use crate::sampling::Sampler;
use crate::stop::{StopCheck, StopMatcher};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};

/// How to start an [`OnnxEngine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Folder with model.onnx, tokenizer.json and the JSON configs.
    pub model_dir: PathBuf,
    /// Path of libonnxruntime.so.
    pub ort_dylib_path: PathBuf,
    /// ONNX Runtime intra-op threads.
    pub intra_threads: usize,
    /// Sequences decoded concurrently (round-robin).
    pub max_active: usize,
    /// Requests that may wait for a free slot before new ones get `Overloaded`.
    pub queue_capacity: usize,
    /// Prompt tokens per forward pass ([`DEFAULT_PREFILL_CHUNK`]).
    pub prefill_chunk: usize,
}

type EventSender = UnboundedSender<Result<GenerationEvent>>;

/// Prompts up to this size are tokenized on the calling task (tens of microseconds).
const INLINE_TOKENIZE_BYTES: usize = 1024;

/// Default prompt tokens per forward pass. Attention's scratch grows with chunk x context, and
/// ONNX Runtime's arena keeps its peak: 256 keeps a 2,000-token prompt's peak small while the
/// matrix products still see enough rows to run at full speed.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

struct Job {
    prompt_ids: Vec<u32>,
    request: GenerationRequest,
    events: EventSender,
}

#[derive(Default)]
struct Shared {
    active: AtomicUsize,
    queued: AtomicUsize,
    tokens_generated: AtomicU64,
    cancelled: AtomicU64,
    completed: AtomicU64,
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
    shared: Arc<Shared>,
    /// Stops a forward pass in progress (a long prefill) at shutdown.
    interrupt: Interrupt,
}

impl OnnxEngine {
    /// Load ONNX Runtime, the tokenizer and the model, then start the worker thread.
    pub fn start(config: &EngineConfig) -> Result<Self> {
        let env = init_runtime(&config.ort_dylib_path)?;
        let files = ModelFiles::read(&config.model_dir)?;
        let tokenizer = TextTokenizer::from_file(&files.tokenizer_path)?;
        let model =
            DecoderModel::load(&env, &files, &SessionOptions { intra_threads: config.intra_threads })?;
        let mut eos = files.eos_token_ids.clone();
        eos.extend(files.eos_token_text.as_deref().and_then(|t| tokenizer.token_to_id(t)));
        let context_length = files.context_length.unwrap_or(2048);
        let info = ModelInfo {
            name: files.name.clone(),
            path: files.dir.clone(),
            context_length,
            vocab_size: model.shape().vocab_size,
            loaded_at: SystemTime::now(),
            engine: "onnx",
            layout: model.layout().as_str(),
        };
        let chat = ChatTemplate::new(
            files.chat_template.as_deref(),
            files.bos_token_text.as_deref(),
            files.eos_token_text.as_deref(),
        )
        .map_err(|e| InferenceError::ModelFiles { path: files.dir.clone(), reason: e.to_string() })?;
        let queue_capacity = config.queue_capacity.max(1);
        let interrupt = model.interrupt();
        let (queue, jobs) = mpsc::sync_channel(queue_capacity);
        let shared = Arc::new(Shared::default());
        shared.running.store(true, Ordering::SeqCst);
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            eos,
            context_length,
            max_active: config.max_active.max(1),
            prefill_chunk: config.prefill_chunk.max(1),
            shared: Arc::clone(&shared),
            active: Vec::new(),
        };
        // Detached: the worker ends on its own once `stopping` is set or the queue closes.
        std::thread::Builder::new()
            .name(format!("inference-{}", files.name))
            .spawn(move || worker.run(jobs))
            .map_err(|e| InferenceError::Runtime(format!("could not start the worker thread: {e}")))?;
        Ok(Self { info, chat, tokenizer, queue, queue_capacity, shared, interrupt })
    }
}

impl Generator for OnnxEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(&self, request: GenerationRequest) -> BoxFuture<Result<TokenStream>> {
        let checked = validate_request(&request);
        let tokenizer = self.tokenizer.clone();
        let queue = self.queue.clone();
        let shared = Arc::clone(&self.shared);
        let (capacity, context_length) = (self.queue_capacity, self.info.context_length);
        Box::pin(async move {
            checked?;
            // Short prompts encode in microseconds, less than a hand-off to the blocking pool costs;
            // long ones (up to milliseconds) go there so the caller's event loop never stalls.
            let prompt_ids = if request.prompt.len() <= INLINE_TOKENIZE_BYTES {
                tokenizer.encode(&request.prompt)?
            } else {
                let prompt = request.prompt.clone();
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
            if let Err(e) = queue.try_send(Job { prompt_ids, request, events }) {
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
        EngineStats {
            active: self.shared.active.load(Ordering::SeqCst),
            queued: self.shared.queued.load(Ordering::SeqCst),
            queue_capacity: self.queue_capacity,
            tokens_generated: self.shared.tokens_generated.load(Ordering::SeqCst),
            cancelled: self.shared.cancelled.load(Ordering::SeqCst),
            completed: self.shared.completed.load(Ordering::SeqCst),
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
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.interrupt.terminate();
    }
}

/// One generation in progress, owned by the worker.
struct Sequence {
    events: EventSender,
    cache: KvCache,
    /// Prompt and generated ids (for the repetition penalty).
    history: Vec<u32>,
    /// What the next forward passes consume: the prompt first, then the last sampled token.
    next_input: Vec<u32>,
    /// How much of `next_input` has been run (prompt chunks already in the cache).
    fed: usize,
    prompt_len: usize,
    generated: usize,
    max_tokens: usize,
    events_sent: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
}

struct Worker {
    model: DecoderModel,
    tokenizer: TextTokenizer,
    eos: BTreeSet<u32>,
    context_length: usize,
    max_active: usize,
    prefill_chunk: usize,
    shared: Arc<Shared>,
    active: Vec<Sequence>,
}

enum Step {
    Continue,
    Finished(FinishReason),
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.shared.stopping.load(Ordering::SeqCst) {
                for seq in self.active.drain(..) {
                    finish(&self.shared, seq, FinishReason::Cancelled);
                }
                break;
            }
            // Idle: block for work. Busy: top up free slots without waiting.
            if self.active.is_empty() {
                match jobs.recv_timeout(std::time::Duration::from_millis(200)) {
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
            self.step_all();
        }
        self.shared.active.store(0, Ordering::SeqCst);
        self.shared.running.store(false, Ordering::SeqCst);
    }

    /// Give a queued job a slot: an empty cache, a sampler, a decoder.
    fn admit(&mut self, job: Job) {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        let Job { prompt_ids, request, events } = job;
        if events.is_closed() {
            self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
            return; // the client left while queued
        }
        // The cache holds every position this request can reach, reserved once (no growth per token).
        let capacity = prompt_ids.len().saturating_add(request.max_tokens).min(self.context_length);
        let cache = match self.model.new_cache(capacity) {
            Ok(cache) => cache,
            Err(e) => {
                let _ = events.send(Err(e));
                return;
            }
        };
        self.active.push(Sequence {
            events,
            cache,
            prompt_len: prompt_ids.len(),
            history: prompt_ids.clone(),
            next_input: prompt_ids,
            fed: 0,
            generated: 0,
            max_tokens: request.max_tokens,
            events_sent: 0,
            sampler: Sampler::new(request.sampling),
            decoder: IncrementalDecoder::new(),
            stop: StopMatcher::new(request.stop),
        });
        self.shared.active.store(self.active.len(), Ordering::SeqCst);
    }

    /// One decode step for every active sequence; finished and cancelled ones are removed.
    fn step_all(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let outcome = if self.active[i].events.is_closed() { None } else { Some(self.step(i)) };
            match outcome {
                Some(Ok(Step::Continue)) => i += 1,
                Some(Ok(Step::Finished(reason))) => {
                    let seq = self.active.swap_remove(i);
                    finish(&self.shared, seq, reason);
                }
                Some(Err(_)) if self.shared.stopping.load(Ordering::SeqCst) => {
                    // The run was interrupted by shutdown: the stream ends as cancelled.
                    let seq = self.active.swap_remove(i);
                    finish(&self.shared, seq, FinishReason::Cancelled);
                }
                Some(Err(e)) => {
                    let seq = self.active.swap_remove(i);
                    let _ = seq.events.send(Err(e));
                }
                None => {
                    // Receiver dropped: the client is gone. Dropping the sequence frees its cache.
                    self.active.swap_remove(i);
                    self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
                }
            }
            self.shared.active.store(self.active.len(), Ordering::SeqCst);
        }
    }

    fn step(&mut self, i: usize) -> Result<Step> {
        let seq = &mut self.active[i];
        let end = seq.next_input.len().min(seq.fed + self.prefill_chunk);
        let logits = self.model.forward(&seq.next_input[seq.fed..end], &mut seq.cache)?;
        if end < seq.next_input.len() {
            seq.fed = end; // more of the prompt to run before anything is sampled
            return Ok(Step::Continue);
        }
        let id = seq.sampler.sample(logits, &seq.history);
        seq.generated += 1;
        seq.history.push(id);
        self.shared.tokens_generated.fetch_add(1, Ordering::Relaxed);

        // Every sampled token yields exactly one Token event. On the last one (EOS, max_tokens,
        // or a full context) held-back text is flushed into it: an incomplete character decodes
        // lossily, and a partial stop sequence that never completed is released.
        let is_eos = self.eos.contains(&id);
        let at_length = seq.generated >= seq.max_tokens || seq.cache.len() >= self.context_length;
        let last = is_eos || at_length;
        let mut delta = if is_eos { String::new() } else { seq.decoder.push(&self.tokenizer, id)? };
        if last {
            delta.push_str(&seq.decoder.flush(&self.tokenizer)?);
        }
        match seq.stop.push(&delta) {
            StopCheck::Stopped(text) => {
                send_text(seq, id, text);
                return Ok(Step::Finished(FinishReason::Stop));
            }
            StopCheck::Continue(mut text) => {
                if last {
                    text.push_str(&seq.stop.finish());
                }
                send_text(seq, id, text);
            }
        }
        if is_eos {
            return Ok(Step::Finished(FinishReason::Stop));
        }
        if at_length {
            return Ok(Step::Finished(FinishReason::Length));
        }
        seq.next_input.clear();
        seq.next_input.push(id);
        seq.fed = 0;
        Ok(Step::Continue)
    }
}

fn send_text(seq: &mut Sequence, id: u32, text: String) {
    let _ = seq.events.send(Ok(GenerationEvent::Token { index: seq.events_sent, id, text }));
    seq.events_sent += 1;
}

/// The final event; dropping the sequence frees its KV cache.
fn finish(shared: &Shared, seq: Sequence, reason: FinishReason) {
    let usage = Usage { prompt_tokens: seq.prompt_len, completion_tokens: seq.generated };
    let _ = seq.events.send(Ok(GenerationEvent::Finished { reason, usage }));
    shared.completed.fetch_add(1, Ordering::SeqCst);
}
