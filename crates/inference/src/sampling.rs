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
    /// Scratch buffer of (token, weight) candidates, reused across steps.
    candidates: Vec<(u32, f32)>,
    /// Scratch buffer of every token's softmax weight, reused across steps.
    weights: Vec<f32>,
}

/// Tokens whose weight is at least e^-8 ≈ 3.4e-4 of the top token's (their logit, after
/// temperature, within 8 nats of it) are the first candidates for the nucleus. Only when they
/// hold less than `top_p` of the mass are more tokens looked at (the floor is squared each time).
const FIRST_FLOOR: f32 = 3.354_626_3e-4;

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Self { params, rng, candidates: Vec::new(), weights: Vec::new() }
    }

    /// Pick the next token. `logits` is modified in place (penalty); `history` holds the prompt
    /// and generated ids so far.
    ///
    /// Temperature sampling draws from softmax(logits / temperature), cut to the `top_k` most
    /// likely tokens and then to the nucleus: the fewest most likely tokens whose mass reaches
    /// `top_p` (ties in order of token id). Nothing sorts the whole vocabulary: one vectorized
    /// pass computes every token's weight, and only the tokens near the top are sorted (a sort of
    /// 49,152 candidates per token took ~2 ms, a fifth of a one-row decode step, per stream).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, self.params.repetition_penalty as f32);
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        // Applied in f32, the logits' precision (the same numbers as when the parameters were f32).
        let inv_t = 1.0 / self.params.temperature as f32;
        let k = self.params.top_k;
        if k > 0 && k < logits.len() {
            return self.sample_top_k(logits, inv_t, k);
        }
        let total = softmax_weights(logits, inv_t, &mut self.weights);
        if !(total > 0.0 && total.is_finite()) {
            return argmax(logits);
        }
        self.candidates.clear();
        let near_top = self.weights.iter().enumerate().filter(|(_, w)| **w >= FIRST_FLOOR);
        self.candidates.extend(near_top.map(|(i, &w)| (i as u32, w)));
        if self.params.top_p >= 1.0 {
            return self.draw_everything(total);
        }
        let target = f64::from(self.params.top_p as f32) * total;
        let mut floor = FIRST_FLOOR;
        loop {
            self.candidates.sort_unstable_by(by_weight_desc);
            let mut mass = 0.0f64;
            let reached = self.candidates.iter().position(|c| {
                mass += f64::from(c.1);
                mass >= target
            });
            let everything = floor == 0.0;
            if let Some(last) = reached.or(everything.then(|| self.candidates.len().saturating_sub(1))) {
                self.candidates.truncate(last + 1);
                return self.draw_candidates(mass.min(total));
            }
            // The tokens near the top hold less than top_p: lower the floor and look again.
            let lower = if floor < 1e-30 { 0.0 } else { floor * floor };
            let band =
                self.weights.iter().enumerate().filter(|(_, w)| **w < floor && **w > 0.0 && **w >= lower);
            self.candidates.extend(band.map(|(i, &w)| (i as u32, w)));
            floor = lower;
        }
    }

    /// The `k` largest logits, then softmax and the nucleus over them.
    fn sample_top_k(&mut self, logits: &[f32], inv_t: f32, k: usize) -> u32 {
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
        self.candidates.select_nth_unstable_by(k - 1, by_weight_desc);
        self.candidates.truncate(k);
        self.candidates.sort_unstable_by(by_weight_desc);
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
        self.draw_candidates(total)
    }

    /// A token from the candidates, in proportion to their weights (`total`: their sum).
    fn draw_candidates(&mut self, total: f64) -> u32 {
        let mut draw = self.rng.random::<f64>() * total;
        self.walk_candidates(&mut draw).unwrap_or_else(|| self.candidates.last().map_or(0, |c| c.0))
    }

    /// The candidate where `draw` (a point in `0..total` of the weights) falls, taking their
    /// weights off it; `None` when it lies beyond them.
    fn walk_candidates(&self, draw: &mut f64) -> Option<u32> {
        for c in &self.candidates {
            *draw -= f64::from(c.1);
            if *draw <= 0.0 {
                return Some(c.0);
            }
        }
        None
    }

    /// A token from the whole softmax (no nucleus cut): the candidates near the top first (where
    /// almost every draw lands), then every other token, each in token order.
    fn draw_everything(&mut self, total: f64) -> u32 {
        let mut draw = self.rng.random::<f64>() * total;
        if let Some(id) = self.walk_candidates(&mut draw) {
            return id;
        }
        let mut last = self.candidates.last().map_or(0, |c| c.0);
        for (i, &w) in self.weights.iter().enumerate() {
            if w < FIRST_FLOOR && w > 0.0 {
                last = i as u32;
                draw -= f64::from(w);
                if draw <= 0.0 {
                    return last;
                }
            }
        }
        last
    }
}

/// Every token's weight `exp(logit * inv_t - max)` into `weights` (the top token's weight is
/// 1), and their sum; 0 when no logit is finite.
fn softmax_weights(logits: &[f32], inv_t: f32, weights: &mut Vec<f32>) -> f64 {
    // The largest scaled logit is the scaled largest logit (rounding is monotone).
    let max = max_logit(logits) * inv_t;
    weights.clear();
    if !max.is_finite() {
        return 0.0;
    }
    weights.resize(logits.len(), 0.0);
    for (w, &l) in weights.iter_mut().zip(logits) {
        *w = exp_nonpositive(l * inv_t - max);
    }
    // Four running sums, so the adds do not wait on each other.
    let mut sums = [0f64; 4];
    let chunks = weights.chunks_exact(4);
    let rest: f64 = chunks.remainder().iter().map(|&w| f64::from(w)).sum();
    for chunk in chunks {
        for (sum, &w) in sums.iter_mut().zip(chunk) {
            *sum += f64::from(w);
        }
    }
    sums.iter().sum::<f64>() + rest
}

/// The largest logit (NaN ignored), in eight lanes the compiler vectorizes.
fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    for chunk in chunks {
        for (lane, &l) in lanes.iter_mut().zip(chunk) {
            *lane = if l > *lane { l } else { *lane };
        }
    }
    lanes.iter().fold(rest, |m, &l| if l > m { l } else { m })
}

/// `e^x` for `x <= 0`, within 2e-7 relative of the true value, in straight-line arithmetic the
/// compiler vectorizes (libm's `expf` is a call per token). Below -87 (a weight under 1.7e-38 of
/// the top token's) it is 0; NaN counts as -87.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = if x > -87.0 { if x < 0.0 { x } else { 0.0 } } else { -87.0 };
    // x = n ln 2 + r, |r| <= ln 2 / 2; e^x = 2^n e^r.
    let t = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // e^r: Cephes' expf polynomial.
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from the bits: n is t's low mantissa bits (t and ROUND share an exponent), in -126..=0.
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    if x < -87.0 { 0.0 } else { e_r * two_n }
}

/// Most likely first; equal weights in order of token id (so the nucleus does not depend on the
/// order candidates were found in).
fn by_weight_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
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

    #[test]
    fn the_vectorized_exp_is_within_2e_7_of_the_true_one() {
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            assert!(((got - want) / want).abs() < 2e-7, "e^{x}: {got} vs {want}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-87.5), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_finite());
    }

    /// The definition the fast path must match: softmax over the whole vocabulary, sorted, the
    /// nucleus cut, a draw in sorted order (the sampler before it stopped sorting everything).
    fn by_full_sort(logits: &[f32], temperature: f64, top_p: f64, seed: u64) -> u32 {
        let mut weights = Vec::new();
        let total = softmax_weights(logits, 1.0 / temperature as f32, &mut weights);
        let mut c: Vec<(u32, f32)> = weights.into_iter().enumerate().map(|(i, w)| (i as u32, w)).collect();
        c.sort_by(by_weight_desc);
        let target = f64::from(top_p as f32) * total;
        let mut mass = 0.0;
        let keep = c.iter().position(|c| {
            mass += f64::from(c.1);
            mass >= target
        });
        c.truncate(keep.map_or(c.len(), |k| k + 1));
        let mut draw = rand::Rng::random::<f64>(&mut ChaCha8Rng::seed_from_u64(seed)) * mass.min(total);
        for x in &c {
            draw -= f64::from(x.1);
            if draw <= 0.0 {
                return x.0;
            }
        }
        c.last().map_or(0, |x| x.0)
    }

    #[test]
    fn a_nucleus_beyond_the_first_window_matches_the_full_sort() {
        // One token on top and 50,000 just past the first window: a nucleus of 0.5 takes the top
        // token and thousands of the others, so the window must widen (twice here).
        let mut logits = vec![-9.5f32; 50_000];
        logits[123] = 0.0;
        for (i, l) in logits.iter_mut().enumerate().skip(1000).step_by(7) {
            *l = -20.0 - (i % 13) as f32;
        }
        for seed in 0..20 {
            let mut s = Sampler::new(params(1.0, 0, 0.5, seed));
            assert_eq!(
                s.sample(&mut logits.clone(), &[]),
                by_full_sort(&logits, 1.0, 0.5, seed),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn without_a_nucleus_the_tail_is_drawn_as_often_as_its_mass() {
        // Token 0 at 0 and 20,000 tokens 9 nats below (outside the first window): token 0 holds
        // 1 / (1 + 2e4 * e^-9) ≈ 28.8 % of the mass, the tail the rest.
        let mut logits = vec![-9.0f32; 20_001];
        logits[0] = 0.0;
        let mut s = Sampler::new(params(1.0, 0, 1.0, 5));
        let zeros = (0..2000).filter(|_| s.sample(&mut logits, &[]) == 0).count();
        assert!((500..650).contains(&zeros), "{zeros}");
    }

    #[test]
    fn degenerate_logits_still_give_a_token() {
        let mut s = Sampler::new(params(0.7, 0, 0.9, 1));
        assert_eq!(s.sample(&mut [f32::NEG_INFINITY; 4], &[]), 0);
        assert!(s.sample(&mut [f32::NAN, 1.0, f32::NAN], &[]) < 3);
        assert!(s.sample(&mut [f32::INFINITY, 1.0], &[]) < 2);
    }

    proptest! {
        #[test]
        fn the_nucleus_is_the_full_sorts_nucleus(
            logits in proptest::collection::vec(-40f32..10f32, 1..3000),
            temperature in 0.05f64..2f64, top_p in 0.01f64..0.999f64, seed in any::<u64>(),
        ) {
            let mut s = Sampler::new(params(temperature, 0, top_p, seed));
            prop_assert_eq!(s.sample(&mut logits.clone(), &[]), by_full_sort(&logits, temperature, top_p, seed));
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
