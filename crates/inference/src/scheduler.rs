//! The ONNX engine: a dedicated worker thread owns the model, fed by a bounded admission queue.
//!
//! The worker keeps up to `max_active` sequences and advances them round-robin, one decode step
//! each, so concurrent streams all make progress. Before each step it checks whether the
//! sequence's receiver is gone (the client disconnected) and, if so, frees that sequence's KV cache.
//! Nothing here runs on the async runtime: handlers only `try_send` into the queue and await a
//! oneshot for admission.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::SystemTime;

use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

use crate::error::{InferenceError, Result};
use crate::generator::{
    BoxFuture, EngineStats, FinishReason, GenerationEvent, GenerationRequest, Generator, ModelInfo,
    ReceiverStream, TokenStream, Usage, validate_request,
};
use crate::model::{DecoderModel, KvCache, SessionOptions};
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
}

type EventSender = UnboundedSender<Result<GenerationEvent>>;

struct Job {
    request: GenerationRequest,
    admitted: oneshot::Sender<Result<()>>,
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
    queue: SyncSender<Job>,
    queue_capacity: usize,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
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
            chat_template: files.chat_template.clone(),
            bos_token: files.bos_token_text.clone(),
            eos_token: files.eos_token_text.clone(),
        };
        let queue_capacity = config.queue_capacity.max(1);
        let (queue, jobs) = mpsc::sync_channel(queue_capacity);
        let shared = Arc::new(Shared::default());
        shared.running.store(true, Ordering::SeqCst);
        let worker = Worker {
            model,
            tokenizer,
            eos,
            context_length,
            max_active: config.max_active.max(1),
            shared: Arc::clone(&shared),
            active: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("inference-{}", files.name))
            .spawn(move || worker.run(jobs))
            .map_err(|e| InferenceError::Runtime(format!("could not start the worker thread: {e}")))?;
        Ok(Self { info, queue, queue_capacity, shared, worker: Some(handle) })
    }
}

impl Generator for OnnxEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(&self, request: GenerationRequest) -> BoxFuture<Result<TokenStream>> {
        let submitted = validate_request(&request).and_then(|()| {
            let (admitted, admission) = oneshot::channel();
            let (events, receiver) = unbounded_channel();
            self.shared.queued.fetch_add(1, Ordering::SeqCst);
            match self.queue.try_send(Job { request, admitted, events }) {
                Ok(()) => Ok((admission, receiver)),
                Err(e) => {
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    Err(match e {
                        TrySendError::Full(_) => InferenceError::Overloaded { capacity: self.queue_capacity },
                        TrySendError::Disconnected(_) => InferenceError::EngineStopped,
                    })
                }
            }
        });
        Box::pin(async move {
            let (admission, receiver) = submitted?;
            admission.await.map_err(|_| InferenceError::EngineStopped)??;
            Ok(Box::pin(ReceiverStream(receiver)) as TokenStream)
        })
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
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The worker notices `stopping` between steps; detach rather than block the caller.
        drop(self.worker.take());
    }
}

/// One generation in progress, owned by the worker.
struct Sequence {
    events: EventSender,
    cache: KvCache,
    /// Prompt and generated ids (for the repetition penalty).
    history: Vec<u32>,
    /// What the next forward pass consumes: the prompt first, then the last sampled token.
    next_input: Vec<u32>,
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

    /// Tokenize and check the prompt, answer the admission oneshot, and add the sequence.
    fn admit(&mut self, job: Job) {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        let Job { request, admitted, events } = job;
        let prepared = self.tokenizer.encode(&request.prompt).and_then(|ids| {
            if ids.is_empty() {
                return Err(InferenceError::InvalidRequest("the prompt encodes to no tokens".into()));
            }
            if ids.len() >= self.context_length {
                return Err(InferenceError::PromptTooLong {
                    prompt_tokens: ids.len(),
                    context_length: self.context_length,
                });
            }
            Ok(ids)
        });
        let cache = prepared.and_then(|ids| self.model.empty_cache().map(|cache| (ids, cache)));
        let (ids, cache) = match cache {
            Ok(ok) => ok,
            Err(e) => {
                let _ = admitted.send(Err(e));
                return;
            }
        };
        if admitted.send(Ok(())).is_err() {
            return; // the caller gave up while queued
        }
        self.active.push(Sequence {
            events,
            cache,
            prompt_len: ids.len(),
            history: ids.clone(),
            next_input: ids,
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
        let mut logits = self.model.forward(&seq.next_input, &mut seq.cache)?;
        let id = seq.sampler.sample(&mut logits, &seq.history);
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
