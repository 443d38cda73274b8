//! The small surface the gateway depends on: the [`Generator`] trait, the request it takes and the
//! token stream it returns. No `ort` type appears here.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_core::Stream;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::chat::ChatMessage;
use crate::error::{InferenceError, Result};
use crate::sampling::SamplingParams;

/// One generation: a prompt (already in the model's prompt format) and how to continue it.
///
/// Valid by construction ([`GenerationRequest::new`] is the only way to build one), so the
/// engines never check the same fields again: a caller that validates its own limits first (the
/// gateway) gets each field checked exactly once.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    prompt: String,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    /// The conversation the prompt was rendered from, for engines that take messages (a remote
    /// model server applies its own template); local engines run the prompt.
    messages: Option<Vec<ChatMessage>>,
}

impl GenerationRequest {
    /// Checks what every engine relies on: a non-empty prompt, `max_tokens` ≥ 1, sampling
    /// parameters in range ([`SamplingParams::validate`]) and non-empty stop sequences.
    pub fn new(
        prompt: impl Into<String>,
        max_tokens: usize,
        sampling: SamplingParams,
        stop: Vec<String>,
    ) -> Result<Self> {
        let prompt = prompt.into();
        let invalid = |m: &str| Err(InferenceError::InvalidRequest(m.to_owned()));
        if prompt.is_empty() {
            return invalid("prompt must not be empty");
        }
        if max_tokens == 0 {
            return invalid("max_tokens must be at least 1");
        }
        sampling.validate()?;
        if stop.iter().any(String::is_empty) {
            return invalid("stop sequences must not be empty");
        }
        Ok(Self { prompt, max_tokens, sampling, stop, messages: None })
    }

    /// Attach the conversation `prompt` was rendered from.
    pub fn with_messages(mut self, messages: Vec<ChatMessage>) -> Self {
        self.messages = Some(messages);
        self
    }

    /// The conversation, when the prompt was rendered from one.
    pub fn messages(&self) -> Option<&[ChatMessage]> {
        self.messages.as_deref()
    }

    /// The prompt, already in the model's prompt format.
    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// Upper bound on generated tokens (≥ 1); the model's context may end generation sooner.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// Text that ends generation; it is not included in the output.
    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    /// The parts, for the engine that runs the request.
    pub(crate) fn into_parts(self) -> (String, usize, SamplingParams, Vec<String>) {
        (self.prompt, self.max_tokens, self.sampling, self.stop)
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the model's context length was reached.
    Length,
    /// The engine shut down before the generation finished.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Sampled tokens, including an end-of-sequence token.
    pub completion_tokens: usize,
}

/// What a token stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// One per sampled token (an end-of-sequence token included): the text completed by token
    /// `id`. `text` may be empty while a multi-byte character or a possible stop sequence is held
    /// back; the last token's event carries whatever was held. `index` counts from 0.
    Token { index: usize, id: u32, text: String },
    /// Reasoning text a remote model server sent apart from the answer (`reasoning_content`);
    /// local models send none.
    Reasoning { text: String },
    /// The last event of every stream that was not cut short by an error.
    Finished { reason: FinishReason, usage: Usage },
}

/// A stream of generation events; dropping it cancels the generation at its next step.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<GenerationEvent>> + Send>>;

/// A boxed, sendable future (what [`Generator::generate`] returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Facts about a loaded model, for `/models` endpoints and logs.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub context_length: usize,
    pub vocab_size: usize,
    #[serde(skip)]
    pub loaded_at: SystemTime,
    /// `onnx` for a real model, `mock` for the benchmarking token source, `upstream` for a remote
    /// model server.
    pub engine: &'static str,
    /// The ONNX graph layout (`fused` or `optimum`); `mock` for the mock engine; `openai` for a
    /// remote model server.
    pub layout: &'static str,
    /// The kernel that runs attention ([`crate::model::DecoderModel::attention`]); `none`
    /// without a local model.
    #[serde(skip)]
    pub attention: &'static str,
}

/// Counters of an engine, for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Generations being decoded now.
    pub active: usize,
    /// Requests waiting in the admission queue.
    pub queued: usize,
    pub queue_capacity: usize,
    /// Tokens sampled since start.
    pub tokens_generated: u64,
    /// Generations stopped because their stream was dropped.
    pub cancelled: u64,
    /// Generations that ran to a finish reason.
    pub completed: u64,
    /// Sequences one decode step can advance together (0: no fixed pool).
    pub slots: usize,
    /// Sequences advanced by the last decode step, and the most any step has advanced.
    pub batch_size: usize,
    pub peak_batch_size: usize,
    /// Decode steps (forward passes over the decoding sequences) since start.
    pub decode_steps: u64,
    /// Of those, steps that also ran a prompt chunk (mixed steps, `--mixed-steps`).
    pub mixed_steps: u64,
    /// Requests that left the queue for a slot since start.
    pub admitted: u64,
    /// Their summed time in the queue, in microseconds.
    pub queue_wait_micros: u64,
    /// Prompts that started from a cached prefix, and the positions they did not recompute.
    pub prefix_hits: u64,
    pub prefix_tokens_reused: u64,
}

/// One upstream URL as readiness and metrics see it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStatus {
    pub url: String,
    /// Not taken out by its circuit breaker.
    pub available: bool,
    pub open_streams: usize,
    /// Time to the first event of each answer: summed seconds and count.
    pub first_byte_seconds_sum: f64,
    pub first_byte_count: u64,
    /// Failures by kind (every kind, zeros included).
    pub errors: Vec<(&'static str, u64)>,
}

/// A text generator: the real ONNX engine, a remote model server, or the benchmarking mock.
pub trait Generator: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;

    /// Queue a request. Fails fast with [`InferenceError::Overloaded`] when the queue is full and
    /// with a typed error when the request is invalid (empty prompt, longer than the context);
    /// otherwise returns the stream at once. Its first event arrives when a slot is free and the
    /// prompt has been processed. Must be awaited inside a tokio runtime (tokenization runs on
    /// its blocking pool).
    fn generate(&self, request: GenerationRequest) -> BoxFuture<Result<TokenStream>>;

    /// Render a conversation into a prompt with the model's chat template.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String>;

    fn stats(&self) -> EngineStats;

    /// Whether the engine's worker is running and accepting work.
    fn is_ready(&self) -> bool;

    /// The remote model servers behind this generator, for readiness and metrics (none for a
    /// local model).
    fn upstreams(&self) -> Vec<UpstreamStatus> {
        Vec::new()
    }
}

/// Adapts a tokio receiver into a [`Stream`] (no extra crate for one impl).
pub(crate) struct ReceiverStream<T>(pub(crate) UnboundedReceiver<T>);

impl<T> Stream for ReceiverStream<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_requests_cannot_be_built() {
        let ok = SamplingParams::default();
        let bad = [
            GenerationRequest::new("", 4, ok.clone(), vec![]),
            GenerationRequest::new("Hi", 0, ok.clone(), vec![]),
            GenerationRequest::new("Hi", 4, SamplingParams { temperature: f64::NAN, ..ok.clone() }, vec![]),
            GenerationRequest::new("Hi", 4, ok.clone(), vec![String::new()]),
        ];
        for result in bad {
            assert!(matches!(result, Err(InferenceError::InvalidRequest(_))), "{result:?}");
        }
        let fine = GenerationRequest::new("Hi", 4, ok, vec!["\n".into()]);
        assert!(fine.is_ok_and(|r| r.prompt() == "Hi" && r.max_tokens() == 4 && r.stop().len() == 1));
    }
}
