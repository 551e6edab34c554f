//! Turning logits into the next token. Temperature 0 (or top-k 1) is greedy; otherwise the
//! distribution softmax(logits / T) is cut to the k most likely tokens, then to the smallest
//! set whose probability reaches top-p (Holtzman et al. 2020), renormalised and sampled with a
//! seeded RNG.

use kiln_model::SplitMix64;

use crate::InferError;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// What transformers users usually write: temperature 0.7, top-p 0.9.
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 0,
            top_p: 0.9,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), InferError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(InferError::Sampling(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferError::Sampling(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, InferError> {
        params.validate()?;
        let rng = SplitMix64::new(params.seed);
        Ok(Self { params, rng })
    }

    /// Picks the next token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let candidates = self.candidates(logits);
        let total: f64 = candidates.iter().map(|(_, p)| p).sum();
        let mut r = self.rng.next_f64() * total;
        for &(id, p) in &candidates {
            if r < p {
                return id;
            }
            r -= p;
        }
        candidates
            .last()
            .map(|c| c.0)
            .unwrap_or_else(|| argmax(logits))
    }

    /// The tokens that survive temperature, top-k and top-p, most likely first, with their
    /// (not yet renormalised) probabilities.
    pub fn candidates(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let t = self.params.temperature.max(1e-6);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .collect();
        let z: f64 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= z);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            probs.truncate(self.params.top_k);
        }
        top_p_prefix(&mut probs, self.params.top_p);
        probs
    }
}

/// Keeps the shortest prefix of `sorted` (descending) whose mass reaches `p`.
fn top_p_prefix(sorted: &mut Vec<(u32, f64)>, p: f64) {
    if p >= 1.0 {
        return;
    }
    let mut cumulative = 0.0;
    let mut keep = sorted.len();
    for (i, (_, prob)) in sorted.iter().enumerate() {
        cumulative += prob;
        if cumulative >= p {
            keep = i + 1;
            break;
        }
    }
    sorted.truncate(keep.max(1));
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_equals_top_k_one() {
        let logits = [0.1f32, 2.0, -1.0, 1.99, 0.5];
        let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut k1 = Sampler::new(SamplingParams {
            temperature: 1.3,
            top_k: 1,
            top_p: 1.0,
            seed: 9,
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(greedy.sample(&logits), 1);
            assert_eq!(k1.sample(&logits), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1
        let logits: Vec<f32> = [0.5f64, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let s = |top_p| {
            Sampler::new(SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p,
                seed: 0,
            })
            .unwrap()
        };
        let ids = |c: Vec<(u32, f64)>| c.into_iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(s(0.5).candidates(&logits)), vec![0]);
        assert_eq!(ids(s(0.6).candidates(&logits)), vec![0, 1]);
        assert_eq!(ids(s(0.75).candidates(&logits)), vec![0, 1]);
        assert_eq!(ids(s(0.8).candidates(&logits)).len(), 3);
        assert_eq!(ids(s(1.0).candidates(&logits)).len(), 4);
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let logits: Vec<f32> = [0.7f64, 0.2, 0.1].iter().map(|p| p.ln() as f32).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        let draw = |n| {
            let mut s = Sampler::new(params.clone()).unwrap();
            (0..n).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(50), draw(50));
        let ids = draw(20_000);
        let frac0 = ids.iter().filter(|&&i| i == 0).count() as f64 / ids.len() as f64;
        assert!((frac0 - 0.7).abs() < 0.02, "{frac0}");
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
    }
}
