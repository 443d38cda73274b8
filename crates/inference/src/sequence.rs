//! One generation in progress, owned by the worker: its prompt and what of it is cached, its
//! sampler, detokenizer and stop matcher, and what happens to each token it samples
//! (sample → detokenize → stop check → one `Token` event). The step loop in [`crate::scheduler`]
//! decides when a sequence runs; this module decides what a token means for it.

use std::collections::BTreeSet;

use tokio::sync::mpsc::UnboundedSender;

use crate::error::Result;
use crate::generator::{FinishReason, GenerationEvent, GenerationRequest, Usage};
use crate::model::KvCache;
use crate::sampling::Sampler;
use crate::stop::{StopCheck, StopMatcher};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};

pub(crate) type EventSender = UnboundedSender<Result<GenerationEvent>>;

/// What every sequence's token handling reads: the same for all of them.
pub(crate) struct TokenRules<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub eos: &'a BTreeSet<u32>,
    /// Positions a sequence may reach.
    pub context_length: usize,
}

/// After a token: keep going, or the reason to stop.
pub(crate) enum Step {
    Continue,
    Finished(FinishReason),
}

pub(crate) struct Sequence {
    pub events: EventSender,
    pub cache: KvCache,
    /// Prompt ids, then each sampled id (the repetition penalty reads them all).
    history: Vec<u32>,
    prompt_len: usize,
    /// Prompt positions in the cache so far.
    fed: usize,
    generated: usize,
    max_tokens: usize,
    events_sent: usize,
    /// Times a shorter prompt ran ahead of this one after its own prompt had started.
    pub passed_over: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
}

impl Sequence {
    pub fn new(
        prompt_ids: Vec<u32>,
        request: GenerationRequest,
        events: EventSender,
        cache: KvCache,
    ) -> Self {
        let (_, max_tokens, sampling, stop) = request.into_parts();
        Self {
            events,
            cache,
            prompt_len: prompt_ids.len(),
            history: prompt_ids,
            fed: 0,
            generated: 0,
            max_tokens,
            events_sent: 0,
            passed_over: 0,
            sampler: Sampler::new(sampling),
            decoder: IncrementalDecoder::new(),
            stop: StopMatcher::new(stop),
        }
    }

    /// The prompt, and the cache to fill with it.
    pub fn prompt_and_cache(&mut self) -> (&[u32], &mut KvCache) {
        (&self.history[..self.prompt_len], &mut self.cache)
    }

    /// Still running its prompt (nothing sampled yet).
    pub fn is_prefilling(&self) -> bool {
        self.fed < self.prompt_len
    }

    /// Prompt tokens still to run.
    pub fn prompt_left(&self) -> usize {
        self.prompt_len - self.fed
    }

    /// Part of the prompt has run (so another taking its turn sets its positions aside).
    pub fn prompt_started(&self) -> bool {
        self.fed > 0 && self.is_prefilling()
    }

    /// Prompt positions already in the cache before any ran (a reused prefix).
    pub fn skip_prompt(&mut self, positions: usize) {
        self.fed = positions.min(self.prompt_len);
    }

    /// The next prompt tokens to run: about `max`, never a lone token when the prompt has more.
    /// ONNX Runtime computes a one-token run with other kernels than a longer one (matrix-vector
    /// against matrix-matrix; the difference grows through the layers), so keeping every chunk at
    /// two tokens or more makes a prompt's result independent of how it was cut.
    pub fn next_chunk(&self, max: usize) -> &[u32] {
        let take = chunk_len(self.prompt_len - self.fed, max);
        &self.history[self.fed..self.fed + take]
    }

    /// `n` more prompt tokens are in the cache; true when that completes the prompt.
    pub fn fed(&mut self, n: usize) -> bool {
        self.fed = (self.fed + n).min(self.prompt_len);
        !self.is_prefilling()
    }

    /// The token the next decode step feeds: the last one sampled.
    pub fn last_token(&self) -> u32 {
        self.history.last().copied().unwrap_or_default()
    }

    /// The ids of the positions in the cache (the last sampled token is not fed yet).
    pub fn cached_tokens(&self) -> &[u32] {
        &self.history[..self.cache.len().min(self.history.len())]
    }

    /// Sample from `logits` and send the token's event. Every sampled token yields exactly one
    /// `Token` event; on the last one (EOS, max_tokens, or a full context) held-back text is
    /// flushed into it: an incomplete character decodes lossily, and a partial stop sequence that
    /// never completed is released.
    pub fn on_logits(&mut self, logits: &mut [f32], rules: &TokenRules<'_>) -> Result<Step> {
        let id = self.sampler.sample(logits, &self.history);
        self.generated += 1;
        self.history.push(id);

        let is_eos = rules.eos.contains(&id);
        // The next decode step would write position `cache.len()`: the context must hold it.
        let at_length = self.generated >= self.max_tokens || self.cache.len() >= rules.context_length;
        let last = is_eos || at_length;
        let mut delta = if is_eos { String::new() } else { self.decoder.push(rules.tokenizer, id)? };
        if last {
            delta.push_str(&self.decoder.flush(rules.tokenizer)?);
        }
        match self.stop.push(&delta) {
            StopCheck::Stopped(text) => {
                self.send_text(id, text);
                return Ok(Step::Finished(FinishReason::Stop));
            }
            StopCheck::Continue(mut text) => {
                if last {
                    text.push_str(&self.stop.finish());
                }
                self.send_text(id, text);
            }
        }
        Ok(if is_eos {
            Step::Finished(FinishReason::Stop)
        } else if at_length {
            Step::Finished(FinishReason::Length)
        } else {
            Step::Continue
        })
    }

    fn send_text(&mut self, id: u32, text: String) {
        let _ = self.events.send(Ok(GenerationEvent::Token { index: self.events_sent, id, text }));
        self.events_sent += 1;
    }

    /// The final event.
    pub fn send_finished(&self, reason: FinishReason) {
        let usage = Usage { prompt_tokens: self.prompt_len, completion_tokens: self.generated };
        let _ = self.events.send(Ok(GenerationEvent::Finished { reason, usage }));
    }
}

/// How many of `remaining` prompt tokens the next chunk takes: about `max`, at least two, and never
/// so many that a lone token is left for the last chunk.
fn chunk_len(remaining: usize, max: usize) -> usize {
    let take = max.max(2).min(remaining);
    match remaining - take {
        1 if take > 2 => take - 1,
        1 => take + 1,
        _ => take,
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_len;

    #[test]
    fn prompt_chunks_are_never_a_lone_token() {
        for remaining in 1..40 {
            for max in 1..12 {
                let (mut left, mut chunks) = (remaining, Vec::new());
                while left > 0 {
                    let take = chunk_len(left, max);
                    assert!(take >= 1 && take <= left, "remaining {remaining}, max {max}");
                    chunks.push(take);
                    left -= take;
                }
                if remaining >= 2 {
                    assert!(chunks.iter().all(|&c| c >= 2), "remaining {remaining}, max {max}: {chunks:?}");
                }
                assert!(chunks.iter().all(|&c| c <= max.max(2) + 1), "{chunks:?}");
            }
        }
        assert_eq!(chunk_len(1, 256), 1, "a one-token prompt is one chunk");
        assert_eq!(chunk_len(300, 256), 256);
        assert_eq!(chunk_len(257, 256), 255, "leaves two, not one");
    }
}
