//! Choosing the next token from logits: greedy (temperature 0), temperature, top-k, top-p,
//! repetition penalty, and a seeded RNG so a given seed reproduces the same text.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{InferenceError, Result};

/// Temperatures below this are greedy: dividing logits by a tinier one overflows f32.
pub const GREEDY_BELOW: f64 = 1e-5;

/// Sampling parameters, validated by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or anything below [`GREEDY_BELOW`]) means greedy; otherwise logits are divided by it.
    /// Range [0, 2].
    pub temperature: f64,
    /// Keep the `k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability mass reaches `p`; 1 disables. Range (0, 1].
    pub top_p: f64,
    /// > 1 discourages tokens already in the prompt or output (CTRL / Hugging Face rule). Range (0, 10].
    pub repetition_penalty: f64,
    /// RNG seed; `None` picks one at random.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// Reject values that would make sampling meaningless (NaN, negative, out of range).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(InferenceError::InvalidRequest(what.to_owned()));
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return bad("temperature must be between 0 and 2");
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be greater than 0 and at most 1");
        }
        if !(self.repetition_penalty.is_finite()
            && self.repetition_penalty > 0.0
            && self.repetition_penalty <= 10.0)
        {
            return bad("repetition_penalty must be greater than 0 and at most 10");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// Per-sequence sampler state (the RNG).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch buffer of (token, logit) candidates, reused across steps.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Self { params, rng, candidates: Vec::new() }
    }

    /// Pick the next token. `logits` is modified in place (penalty); `history` holds the prompt
    /// and generated ids so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, self.params.repetition_penalty as f32);
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        // Applied in f32, the logits' precision (the same numbers as when the parameters were f32).
        let inv_t = 1.0 / self.params.temperature as f32;
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
        // Softmax over the survivors (max-subtracted for stability), then nucleus cut.
        let max = self.candidates.first().map_or(0.0, |c| c.1);
        let mut total = 0.0f64;
        for c in &mut self.candidates {
            c.1 = (c.1 - max).exp();
            total += f64::from(c.1);
        }
        if self.params.top_p < 1.0 {
            let target = f64::from(self.params.top_p as f32) * total;
            let mut mass = 0.0f64;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                mass += f64::from(c.1);
                if mass >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
            total = mass.min(total);
        }
        let mut draw = self.rng.random::<f64>() * total;
        for c in &self.candidates {
            draw -= f64::from(c.1);
            if draw <= 0.0 {
                return c.0;
            }
        }
        self.candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::with_capacity(history.len());
    for &id in history {
        if seen.insert(id)
            && let Some(l) = logits.get_mut(id as usize)
        {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(temperature: f64, top_k: usize, top_p: f64, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed: Some(seed) }
    }

    #[test]
    fn greedy_picks_the_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(params(1.5, 1, 1.0, 7));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.4, 0.45], &[]), 1);
        }
    }

    #[test]
    fn small_top_p_keeps_only_the_head() {
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [5.0, 1.0, 1.0, 1.0], &[]), 0);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..40).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11));
        let ones = (0..4000).filter(|_| s.sample(&mut [3f32.ln(), 0.0], &[]) == 0).count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() });
        assert_eq!(s.sample(&mut [2.0, 1.5, -1.0], &[0, 0]), 1);
        let mut negative = [-1.0, -1.5];
        apply_repetition_penalty(&mut negative, &[0], 2.0);
        assert_eq!(negative, [-2.0, -1.5]);
    }

    #[test]
    fn validation_rejects_nonsense() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        for bad in [
            SamplingParams { temperature: f64::NAN, ..ok.clone() },
            SamplingParams { temperature: -0.1, ..ok.clone() },
            SamplingParams { temperature: 2.5, ..ok.clone() },
            SamplingParams { top_p: 0.0, ..ok.clone() },
            SamplingParams { top_p: 1.5, ..ok.clone() },
            SamplingParams { repetition_penalty: 0.0, ..ok.clone() },
            SamplingParams { repetition_penalty: f64::INFINITY, ..ok.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn sampled_token_is_always_in_range(
            logits in proptest::collection::vec(-50f32..50f32, 1..200),
            temperature in 0f64..2f64, top_k in 0usize..50, top_p in 0.01f64..1f64, seed in any::<u64>(),
        ) {
            let mut s = Sampler::new(params(temperature, top_k, top_p, seed));
            let mut l = logits.clone();
            let id = s.sample(&mut l, &[0, 1, 2]) as usize;
            prop_assert!(id < logits.len());
            if top_k == 1 || temperature < GREEDY_BELOW {
                prop_assert_eq!(id, argmax(&logits) as usize);
            }
        }
    }
}
