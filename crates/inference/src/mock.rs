//! A token source with no model behind it, for measuring the gateway alone: each stream emits a
//! configurable number of tokens at a configurable interval (0 = as fast as the reader takes them).
//! A benchmarking aid, selected explicitly (`--engine mock`); never a default and never what an
//! end-to-end test tests.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_core::Stream;
use tokio::time::{Instant, Sleep};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::Result;
use crate::generator::{
    BoxFuture, EngineStats, FinishReason, GenerationEvent, GenerationRequest, Generator, ModelInfo,
    TokenStream, Usage,
};

/// How the mock behaves.
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// Tokens per stream (fewer if the request's `max_tokens` is smaller).
    pub tokens: usize,
    /// Delay before each token; zero emits them back to back.
    pub interval: Duration,
}

/// The mock engine.
pub struct MockEngine {
    config: MockConfig,
    info: ModelInfo,
    chat: ChatTemplate,
}

impl MockEngine {
    pub fn new(config: MockConfig) -> Result<Self> {
        Ok(Self {
            config,
            info: ModelInfo {
                name: format!("mock ({} tokens every {} ms)", config.tokens, config.interval.as_millis()),
                path: "mock".into(),
                context_length: 1 << 20,
                vocab_size: 0,
                loaded_at: SystemTime::now(),
                engine: "mock",
                layout: "mock",
                attention: "none",
            },
            chat: ChatTemplate::new(None, None, None)?,
        })
    }
}

/// Words the mock cycles through (short, ASCII, like typical BPE tokens).
const WORDS: [&str; 8] = [" stream", "ing", " tokens", " to", " the", " browser", ",", " fast"];

struct MockStream {
    remaining: usize,
    index: usize,
    prompt_tokens: usize,
    interval: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl Stream for MockStream {
    type Item = Result<GenerationEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.remaining == 0 {
            self.done = true;
            let usage = Usage { prompt_tokens: self.prompt_tokens, completion_tokens: self.index };
            return Poll::Ready(Some(Ok(GenerationEvent::Finished { reason: FinishReason::Length, usage })));
        }
        let interval = self.interval;
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let next = sleep.deadline() + interval;
            sleep.as_mut().reset(next);
        }
        let index = self.index;
        self.index += 1;
        self.remaining -= 1;
        let text = WORDS[index % WORDS.len()].to_owned();
        Poll::Ready(Some(Ok(GenerationEvent::Token { index, id: index as u32, text })))
    }
}

impl Generator for MockEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(&self, request: GenerationRequest) -> BoxFuture<Result<TokenStream>> {
        let config = self.config;
        Box::pin(async move {
            let interval = config.interval;
            let sleep =
                (!interval.is_zero()).then(|| Box::pin(tokio::time::sleep_until(Instant::now() + interval)));
            Ok(Box::pin(MockStream {
                remaining: config.tokens.min(request.max_tokens()),
                index: 0,
                prompt_tokens: request.prompt().len().div_ceil(4),
                interval,
                sleep,
                done: false,
            }) as TokenStream)
        })
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.chat.render(messages)
    }

    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn request(max_tokens: usize) -> GenerationRequest {
        GenerationRequest::new("hi", max_tokens, SamplingParams::default(), vec![])
            .unwrap_or_else(|e| unreachable!("{e}"))
    }

    async fn drain(engine: &MockEngine, max_tokens: usize) -> Vec<GenerationEvent> {
        let mut stream = match engine.generate(request(max_tokens)).await {
            Ok(s) => s,
            Err(e) => unreachable!("{e}"),
        };
        let mut out = Vec::new();
        while let Some(Ok(e)) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
            out.push(e);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn emits_the_configured_tokens_at_the_interval() {
        let engine = MockEngine::new(MockConfig { tokens: 5, interval: Duration::from_millis(50) })
            .unwrap_or_else(|e| unreachable!("{e}"));
        let started = Instant::now();
        let events = drain(&engine, 100).await;
        assert_eq!(events.len(), 6);
        assert!(matches!(
            events[5],
            GenerationEvent::Finished { usage: Usage { completion_tokens: 5, .. }, .. }
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(250), "5 tokens, 50 ms apart (virtual time)");
    }

    #[tokio::test]
    async fn zero_interval_and_max_tokens_cap() {
        let engine = MockEngine::new(MockConfig { tokens: 64, interval: Duration::ZERO })
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(drain(&engine, 3).await.len(), 4);
    }
}
