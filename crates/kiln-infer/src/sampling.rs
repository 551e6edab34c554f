//! Turning logits into the next token. Temperature 0 (or top-k 1) is greedy; otherwise the
//! distribution softmax(logits / T) is cut to the k most likely tokens, then to the smallest
//! set whose probability reaches top-p (Holtzman et al. 2020), then to the tokens at least
//! min-p times as likely as the most likely one (Nguyen et al. 2024), renormalised and
//! sampled with a seeded RNG.
//!
//! Before that, the logits are penalised for repetition, as the two conventions users know do
//! it: transformers' `repetition_penalty` r (Keskar et al. 2019) divides a positive logit by r
//! and multiplies a negative one by r for every token already in the prompt or the output;
//! OpenAI's `presence_penalty` and `frequency_penalty` subtract `presence * [count > 0] +
//! frequency * count` for the tokens of the output only.

use std::collections::{HashMap, HashSet};

use kiln_model::SplitMix64;

use crate::InferError;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f64,
    /// Keep the tokens whose probability is at least `min_p` times the largest (0 = all).
    pub min_p: f64,
    /// transformers' repetition penalty over prompt and output tokens (1.0 = off).
    pub repetition_penalty: f64,
    /// OpenAI's presence penalty over output tokens (0 = off).
    pub presence_penalty: f64,
    /// OpenAI's frequency penalty over output tokens (0 = off).
    pub frequency_penalty: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// What transformers users usually write: temperature 0.7, top-p 0.9.
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
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
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), InferError> {
        let bad = |what: &str, value: f64, range: &str| {
            Err(InferError::Sampling(format!(
                "{what} must be {range}, got {value}"
            )))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, ">= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p, "in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p, "in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition penalty", self.repetition_penalty, "> 0");
        }
        for (what, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(what, v, "in [-2, 2]");
            }
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// A seed for a run that was not given one: different every time.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS once per process and varies per instance; mixing in
    // the clock makes two samplers of one process differ too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}

pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_tokens: HashSet<u32>,
    /// How often each token has been sampled so far.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, InferError> {
        params.validate()?;
        let rng = SplitMix64::new(params.seed);
        Ok(Self {
            params,
            rng,
            prompt_tokens: HashSet::new(),
            output_counts: HashMap::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Tells the sampler the prompt (the repetition penalty covers its tokens) and forgets
    /// earlier output.
    pub fn start(&mut self, prompt: &[u32]) {
        self.output_counts.clear();
        self.prompt_tokens.clear();
        if self.params.repetition_penalty != 1.0 {
            self.prompt_tokens.extend(prompt.iter().copied());
        }
    }

    /// Picks the next token id from one row of logits and records it as output.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_allowed(logits, |_| true)
            .expect("every token is allowed")
    }

    /// [`sample`](Self::sample) restricted to the tokens `allowed` accepts (constrained
    /// decoding): the distribution is masked first, then cut and renormalised, so the draw
    /// is from the model's distribution over the allowed tokens. `None` when nothing is
    /// allowed.
    pub fn sample_allowed(&mut self, logits: &[f32], allowed: impl Fn(u32) -> bool) -> Option<u32> {
        let penalised;
        let logits = if self.params.has_penalties() {
            penalised = self.penalised(logits);
            &penalised[..]
        } else {
            logits
        };
        let id = if self.params.is_greedy() {
            argmax_where(logits, &allowed)?
        } else {
            let candidates = self.candidates_where(logits, &allowed);
            let total: f64 = candidates.iter().map(|(_, p)| p).sum();
            let mut r = self.rng.next_f64() * total;
            let mut pick = candidates.last()?.0;
            for &(id, p) in &candidates {
                if r < p {
                    pick = id;
                    break;
                }
                r -= p;
            }
            pick
        };
        *self.output_counts.entry(id).or_default() += 1;
        Some(id)
    }

    /// The logits with the repetition, presence and frequency penalties applied.
    fn penalised(&self, logits: &[f32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        let r = self.params.repetition_penalty as f32;
        if r != 1.0 {
            let seen = self
                .prompt_tokens
                .iter()
                .chain(self.output_counts.keys())
                .collect::<HashSet<_>>();
            for &id in seen {
                if let Some(l) = out.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        let (presence, frequency) = (
            self.params.presence_penalty as f32,
            self.params.frequency_penalty as f32,
        );
        if presence != 0.0 || frequency != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(l) = out.get_mut(id as usize) {
                    *l -= presence + frequency * count as f32;
                }
            }
        }
        out
    }

    /// The tokens that survive temperature, top-k, top-p and min-p, most likely first, with
    /// their (not yet renormalised) probabilities. Penalties are not applied here.
    pub fn candidates(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        self.candidates_where(logits, &|_| true)
    }

    fn candidates_where(&self, logits: &[f32], allowed: &dyn Fn(u32) -> bool) -> Vec<(u32, f64)> {
        let t = self.params.temperature.max(1e-6);
        let max = logits
            .iter()
            .enumerate()
            .filter(|&(i, _)| allowed(i as u32))
            .map(|(_, &l)| l)
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|&(i, _)| allowed(i as u32))
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .collect();
        let z: f64 = probs.iter().map(|(_, p)| p).sum();
        probs.iter_mut().for_each(|(_, p)| *p /= z);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            probs.truncate(self.params.top_k);
        }
        top_p_prefix(&mut probs, self.params.top_p);
        if self.params.min_p > 0.0 {
            if let Some(&(_, best)) = probs.first() {
                let floor = self.params.min_p * best;
                probs.retain(|&(_, p)| p >= floor);
            }
        }
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

/// Index of the largest allowed logit (the first one on ties).
fn argmax_where(logits: &[f32], allowed: &dyn Fn(u32) -> bool) -> Option<u32> {
    let mut best: Option<usize> = None;
    for (i, &l) in logits.iter().enumerate() {
        if best.is_none_or(|b| l > logits[b]) && allowed(i as u32) {
            best = Some(i);
        }
    }
    best.map(|b| b as u32)
}

/// `log softmax(logits)` of the `k` most likely tokens, most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let log_z = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - log_z))
        .collect()
}

/// `log sum exp(logits)`, computed stably in f64.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&x| ((x - m) as f64).exp()).sum();
    m + z.ln() as f32
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
            ..Default::default()
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
                ..Default::default()
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
            ..Default::default()
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
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        let logits: Vec<f32> = [0.5f64, 0.3, 0.15, 0.05]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            min_p: 0.2,
            ..Default::default()
        })
        .unwrap();
        // 0.2 x 0.5 = 0.1: 0.15 stays, 0.05 goes.
        let ids: Vec<u32> = s.candidates(&logits).into_iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![0, 1, 2]);
    }

    #[test]
    fn penalties_follow_transformers_and_openai() {
        let greedy_with = |params: SamplingParams, prompt: &[u32], draws: usize| {
            let mut s = Sampler::new(params).unwrap();
            s.start(prompt);
            let logits = [2.0f32, 1.5, -1.0];
            (0..draws).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        // Repetition penalty 2 on the prompt's token 0: 2.0 / 2 = 1.0 < 1.5.
        let rep = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy_with(rep.clone(), &[0], 1), vec![1]);
        assert_eq!(greedy_with(rep, &[], 2), vec![0, 1]);
        // A negative logit is multiplied: -1.0 * 2 stays the least likely.
        // Frequency 0.3: token 0 drops by 0.3 per use (2.0, 1.7, 1.4 < 1.5).
        let freq = SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy_with(freq, &[], 4), vec![0, 0, 1, 0]);
        // Presence 0.6 counts once: 2.0 - 0.6 = 1.4 < 1.5, then 1.5 - 0.6 < 1.4.
        let presence = SamplingParams {
            presence_penalty: 0.6,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy_with(presence, &[0], 3), vec![0, 1, 0]);
    }

    #[test]
    fn allowed_tokens_mask_the_distribution() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(g.sample_allowed(&logits, |id| id >= 2), Some(2));
        assert_eq!(g.sample_allowed(&logits, |_| false), None);
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 3,
            ..Default::default()
        })
        .unwrap();
        let draws: Vec<u32> = (0..2000)
            .map(|_| s.sample_allowed(&logits, |id| id % 2 == 1).unwrap())
            .collect();
        assert!(draws.iter().all(|&d| d == 1 || d == 3));
        // p(1) / p(3) = e^2 among the allowed: about 0.88.
        let frac1 = draws.iter().filter(|&&d| d == 1).count() as f64 / 2000.0;
        assert!((frac1 - 0.881).abs() < 0.03, "{frac1}");
    }

    #[test]
    fn top_logprobs_are_the_most_likely_in_order() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let top = top_logprobs(&logits, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let z = (1.0f64 + 2.0 * 2f64.exp() + 1f64.exp()).ln();
        assert!((top[0].1 as f64 - (2.0 - z)).abs() < 1e-6);
        assert_eq!(top_logprobs(&logits, 9).len(), 4);
    }

    #[test]
    fn fresh_seeds_differ() {
        assert_ne!(fresh_seed(), fresh_seed());
    }

    #[test]
    fn bad_parameters_are_rejected() {
        for bad in [
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: 3.0,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(bad).is_err());
        }
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
