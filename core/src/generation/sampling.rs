//! Choosing the next token: greedy, or seeded sampling with temperature, top-k and top-p.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Parameters of seeded sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the softmax; must be > 0.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p`; 1.0 keeps all.
    pub top_p: f32,
    /// Seed of the random stream; the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// How the next token is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// The most likely token; ties go to the lowest id.
    Greedy,
    /// A draw from the (truncated, tempered) distribution.
    Sample(SamplingParams),
}

/// Sampling parameters that make no distribution.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number above 0 (got {0}); use greedy decoding for temperature 0")]
    Temperature(f32),
    #[error("top_p must be in (0, 1] (got {0})")]
    TopP(f32),
}

impl Decoding {
    /// Checks the parameters once, before any token is generated.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if let Decoding::Sample(p) = self {
            if !(p.temperature.is_finite() && p.temperature > 0.0) {
                return Err(SamplingError::Temperature(p.temperature));
            }
            if !(p.top_p > 0.0 && p.top_p <= 1.0) {
                return Err(SamplingError::TopP(p.top_p));
            }
        }
        Ok(())
    }
}

/// Picks tokens from logits according to a [`Decoding`], holding the random stream.
#[derive(Debug, Clone)]
pub struct TokenSampler {
    decoding: Decoding,
    rng: ChaCha8Rng,
    scratch: Vec<(u32, f32)>,
}

impl TokenSampler {
    /// A sampler for `decoding`; fails on parameters that make no distribution.
    pub fn new(decoding: Decoding) -> Result<Self, SamplingError> {
        decoding.validate()?;
        let seed = match decoding {
            Decoding::Greedy => 0,
            Decoding::Sample(p) => p.seed,
        };
        Ok(Self { decoding, rng: ChaCha8Rng::seed_from_u64(seed), scratch: Vec::new() })
    }

    /// The next token id given one position's logits. Ids in `banned` are never chosen.
    pub fn next_token(&mut self, logits: &[f32], banned: &[u32]) -> u32 {
        match self.decoding {
            Decoding::Greedy => argmax(logits, banned),
            Decoding::Sample(p) => self.sample(logits, banned, p),
        }
    }

    fn sample(&mut self, logits: &[f32], banned: &[u32], p: SamplingParams) -> u32 {
        let candidates = &mut self.scratch;
        candidates.clear();
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(id, l)| l.is_finite() && !banned.contains(&(*id as u32)))
                .map(|(id, &l)| (id as u32, l / p.temperature)),
        );
        if candidates.is_empty() {
            return argmax(logits, banned);
        }
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            candidates.truncate(p.top_k);
        }
        candidates.sort_unstable_by(by_logit_desc);
        let max = candidates[0].1;
        let mut total = 0.0f64;
        for c in candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1 as f64;
        }
        if p.top_p < 1.0 {
            let mut cumulative = 0.0f64;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1 as f64 / total;
                if cumulative >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
            total = candidates.iter().map(|c| c.1 as f64).sum();
        }
        let mut draw = self.rng.random::<f64>() * total;
        for c in candidates.iter() {
            draw -= c.1 as f64;
            if draw <= 0.0 {
                return c.0;
            }
        }
        candidates.last().expect("candidates is not empty").0
    }
}

fn argmax(logits: &[f32], banned: &[u32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (id, &l) in logits.iter().enumerate() {
        if banned.contains(&(id as u32)) || l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((id, l));
        }
    }
    best.map(|(id, _)| id as u32).unwrap_or(0)
}

/// Probability the softmax of `logits` gives to `token`.
pub fn softmax_probability(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    logits.get(token as usize).map_or(0.0, |&l| (((l - max) as f64).exp() / total) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_params(seed: u64) -> SamplingParams {
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed }
    }

    #[test]
    fn greedy_picks_the_largest_logit_and_the_lowest_id_on_ties() {
        let mut s = TokenSampler::new(Decoding::Greedy).unwrap();
        assert_eq!(s.next_token(&[0.1, 3.0, -1.0, 3.0], &[]), 1);
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        let mut greedy = TokenSampler::new(Decoding::Greedy).unwrap();
        assert_eq!(greedy.next_token(&[0.0, 9.0, 1.0], &[1]), 2);
        let mut sampler = TokenSampler::new(Decoding::Sample(sample_params(3))).unwrap();
        for _ in 0..200 {
            assert_ne!(sampler.next_token(&[0.0, 9.0, 1.0], &[1]), 1);
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = TokenSampler::new(Decoding::Sample(sample_params(seed))).unwrap();
            (0..32).map(|_| s.next_token(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        let p = SamplingParams { top_k: 1, ..sample_params(1) };
        let mut s = TokenSampler::new(Decoding::Sample(p)).unwrap();
        assert!((0..100).all(|_| s.next_token(&logits, &[]) == 1));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.665, 0.245, 0.090]: p = 0.6 keeps only token 0, p = 0.8 keeps 0 and 1.
        let logits = [2.0, 1.0, 0.0];
        let mut narrow =
            TokenSampler::new(Decoding::Sample(SamplingParams { top_p: 0.6, ..sample_params(5) })).unwrap();
        assert!((0..200).all(|_| narrow.next_token(&logits, &[]) == 0));
        let mut wider =
            TokenSampler::new(Decoding::Sample(SamplingParams { top_p: 0.8, ..sample_params(5) })).unwrap();
        let drawn: Vec<u32> = (0..400).map(|_| wider.next_token(&logits, &[])).collect();
        assert!(drawn.contains(&1) && !drawn.contains(&2));
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 0.25 and 0.75
        let mut s = TokenSampler::new(Decoding::Sample(sample_params(11))).unwrap();
        let ones = (0..4000).filter(|_| s.next_token(&logits, &[]) == 1).count();
        assert!((2800..3200).contains(&ones), "token 1 drawn {ones} of 4000 times");
    }

    #[test]
    fn invalid_parameters_are_refused_with_advice() {
        let err =
            TokenSampler::new(Decoding::Sample(SamplingParams { temperature: 0.0, ..sample_params(0) }))
                .unwrap_err();
        assert!(err.to_string().contains("greedy"));
        assert!(
            TokenSampler::new(Decoding::Sample(SamplingParams { top_p: 0.0, ..sample_params(0) })).is_err()
        );
    }

    #[test]
    fn softmax_probability_of_equal_logits_is_uniform() {
        assert!((softmax_probability(&[1.0, 1.0, 1.0, 1.0], 2) - 0.25).abs() < 1e-6);
    }
}
