//! On-policy training: PPO (a KL-penalised reward, a value head, GAE) and GRPO (group-relative
//! advantages, no value head). Each step samples responses to a batch of prompts with the
//! policy (batched decoding, one KV-cache row per sample), scores them, and takes
//! `epochs x minibatches` clipped-objective updates on them.
//!
//! PPO here is the recipe of Ziegler et al. / Stiennon et al. as TRL's last `PPOTrainer`
//! implemented it: per-token reward `-kl_coef (log π - log π_ref)` with the score added at the
//! last token (a response without an end-of-turn token scores `missing_eos_penalty`), scores
//! whitened over the batch, GAE, whitened advantages, the clipped surrogate and the clipped
//! value loss. The value head shares the policy's trunk (one model in memory, as TRL's older
//! `AutoModelForCausalLMWithValueHead`); it starts from the reward model's head when there is
//! one, else at zero.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use kiln_chat::ChatFormat;
use kiln_data::IncrementalDecoder;
use kiln_model::{CausalLm, KvCache, Llama, ModelConfig, ScalarHead, SplitMix64};

use crate::learner::{
    init_run_dir, open_model, step_items, Learner, Metrics, MetricsLog, RlhfObserver,
};
use crate::losses::{
    clipped_surrogate, clipped_value_loss, gae, group_advantages, kl_k3, whiten, AdaptiveKl,
};
use crate::reward::{RewardItem, RewardSource};
use crate::seqs::{forward_backward, OutputGrads, Padding, Seq, SeqBatch, Wanted};
use crate::{read_prompts, Method, PromptRecord, RlhfConfig, RlhfError};

/// Most sequences per forward/backward within a minibatch.
const MICRO: usize = 8;
/// Most padded tokens per forward/backward: the trunk keeps about 30 KB of activations per
/// token per layer for the backward, so long prompts go through a few at a time (16 samples
/// of 1,000-token prompts in chunks of 8 peaked at 11 GB on SmolLM2-135M).
const MICRO_TOKENS: usize = 4096;

/// Consecutive chunks of `items` of at most [`MICRO`] sequences and [`MICRO_TOKENS`] padded
/// tokens (count x longest; a single longer sequence goes alone).
fn micro_chunks<T>(items: &[T], len: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let l = len(item).max(longest);
        let count = i - start + 1;
        if count > 1 && (count > MICRO || count * l > MICRO_TOKENS) {
            chunks.push(&items[start..i]);
            (start, longest) = (i, len(item));
        } else {
            longest = l;
        }
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// Where the reward comes from, as given on the command line.
#[derive(Debug, Clone)]
pub enum RewardSpec {
    Model(PathBuf),
    Fn(String),
    Cmd(String),
}

#[derive(Debug, Clone)]
pub struct OnlineSource {
    pub model: PathBuf,
    pub prompts: Vec<PathBuf>,
    pub reward: RewardSpec,
}

/// One sampled response.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt: usize,
    pub seq: Seq,
    /// Whether it ended with an end-of-turn token within the budget.
    pub ended: bool,
    pub text: String,
}

/// Samples `samples_per_prompt` responses to each prompt at `temperature` (softmax sampling
/// over the whole vocabulary, the distribution whose log-probabilities the loss uses), all
/// decoded as one batch. A response ends at a token of `stop` (kept as its last token) or
/// after `max_new_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn sample_responses(
    model: &Llama,
    format: &ChatFormat,
    prompts: &[(usize, Vec<u32>)],
    samples_per_prompt: usize,
    temperature: f64,
    max_new_tokens: usize,
    stop: &[u32],
    rng: &mut SplitMix64,
) -> Result<Vec<Sample>, RlhfError> {
    let mut cache = KvCache::new();
    let mut samples = Vec::new();
    let mut logits: Vec<Vec<f32>> = Vec::new();
    for (p, ids) in prompts {
        // One prefill per prompt; its samples start from copies of that cache row.
        let first = samples.len();
        let l = model
            .prefill_row(first, ids, &mut cache)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for k in 0..samples_per_prompt {
            cache.copy_row(first, first + k);
            logits.push(l.clone());
            samples.push(Sample {
                prompt: *p,
                seq: Seq {
                    ids: ids.clone(),
                    prompt_len: ids.len(),
                },
                ended: false,
                text: String::new(),
            });
        }
    }
    let ctx = model.config().max_seq_len;
    let mut active: Vec<usize> = (0..samples.len()).collect();
    let mut weights = Vec::new();
    let mut next_logits = logits;
    while !active.is_empty() {
        let mut still = Vec::new();
        let mut feed = Vec::new();
        for (k, &row) in active.iter().enumerate() {
            let tok = sample_token(&next_logits[k], temperature, rng, &mut weights);
            let s = &mut samples[row];
            s.seq.ids.push(tok);
            let n_new = s.seq.ids.len() - s.seq.prompt_len;
            if stop.contains(&tok) {
                s.ended = true;
            } else if n_new < max_new_tokens && s.seq.ids.len() < ctx {
                still.push(row);
                feed.push(tok);
            }
        }
        if still.is_empty() {
            break;
        }
        let out = model.decode_step(&still, &feed, &mut cache)?;
        next_logits = (0..still.len())
            .map(|k| Ok(out.get(k)?.to_vec1::<f32>()?))
            .collect::<Result<_, RlhfError>>()?;
        active = still;
    }
    for s in &mut samples {
        let body: Vec<u32> = s
            .seq
            .completion()
            .iter()
            .copied()
            .filter(|t| !stop.contains(t))
            .collect();
        let mut dec = IncrementalDecoder::new();
        let mut text = String::new();
        for &t in &body {
            text.push_str(&dec.push(&format.tokenizer.tokenizer, t)?);
        }
        text.push_str(&dec.finish(&format.tokenizer.tokenizer)?);
        s.text = text;
    }
    Ok(samples)
}

/// A draw from `softmax(logits / T)`. `weights` is scratch space reused across calls (the
/// decode loop calls this once per row per token over the whole vocabulary).
fn sample_token(
    logits: &[f32],
    temperature: f64,
    rng: &mut SplitMix64,
    weights: &mut Vec<f64>,
) -> u32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    weights.clear();
    weights.extend(logits.iter().map(|&x| ((x as f64 - m) / temperature).exp()));
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, x) in weights.iter().enumerate() {
        u -= x;
        if u <= 0.0 {
            return i as u32;
        }
    }
    (weights.len() - 1) as u32
}

/// Per-sample data of one rollout, what the updates read.
struct Rollout {
    samples: Vec<Sample>,
    /// Per sample, per completion token.
    old_logp: Vec<Vec<f64>>,
    advantages: Vec<Vec<f64>>,
    /// PPO only.
    old_values: Vec<Vec<f64>>,
    returns: Vec<Vec<f64>>,
    /// GRPO with β > 0: the reference's log-probabilities.
    ref_logp: Vec<Vec<f64>>,
}

pub struct OnlineTrainer {
    pub cfg: RlhfConfig,
    pub run_dir: PathBuf,
    pub learner: Learner,
    /// The frozen reference: the base without adapters under LoRA, else a copy.
    reference: Llama,
    pub format: ChatFormat,
    pub prompts: Vec<PromptRecord>,
    prompt_ids: Vec<Vec<u32>>,
    pub reward: RewardSource,
    stop: Vec<u32>,
    rng: SplitMix64,
    kl: AdaptiveKl,
    config_toml: String,
    step: u64,
    /// Steps whose rollout could not teach anything (see `train_step`'s warning).
    stalled_steps: u64,
    pub model_config: ModelConfig,
}

/// The end of a run.
#[derive(Debug, Clone, Default)]
pub struct OnlineSummary {
    pub steps: u64,
    pub first: Metrics,
    pub last: Metrics,
    pub wall_s: f64,
    pub stopped_early: bool,
}

impl OnlineTrainer {
    pub fn new(
        method: Method,
        source: OnlineSource,
        config_file: Option<&Path>,
        overrides: &[String],
        run_dir: &Path,
        resume: bool,
        obs: &mut dyn RlhfObserver,
    ) -> Result<Self, RlhfError> {
        let device = Device::Cpu;
        let (mut cfg, format, model_config) =
            open_model(&source.model, method, config_file, overrides)?;
        let (mut prompts, skipped) = read_prompts(&source.prompts, cfg.base.sft.skip_bad_records)?;
        if let Some(n) = cfg.base.sft.max_records {
            prompts.truncate(n);
        }
        let o = cfg.online().clone();
        let mut prompt_ids = Vec::with_capacity(prompts.len());
        for p in &prompts {
            let ids = format.encode_prompt(&p.prompt)?;
            if ids.len() + o.max_new_tokens > model_config.max_seq_len {
                return Err(RlhfError::Record {
                    origin: p.origin.clone(),
                    msg: format!(
                        "the prompt is {} tokens; with max_new_tokens {} it exceeds the context of {}",
                        ids.len(),
                        o.max_new_tokens,
                        model_config.max_seq_len
                    ),
                });
            }
            prompt_ids.push(ids);
        }
        cfg.base
            .finalize(prompts.len().div_ceil(cfg.base.train.batch_size) as u64);
        let reward = match &source.reward {
            RewardSpec::Fn(spec) => RewardSource::Fn(crate::RewardFn::parse(spec)?),
            RewardSpec::Cmd(cmd) => RewardSource::Cmd(crate::RewardCmd::spawn(cmd)?),
            RewardSpec::Model(p) => {
                let rm = crate::RewardModel::load(p, &device)?;
                rm.check_tokenizer(&format.tokenizer)?;
                RewardSource::Model(Box::new(rm))
            }
        };
        // PPO's value head: the reward model's head when there is one, else zero, so that the
        // first advantages are the returns themselves rather than a random head's noise.
        let head = match (method, &reward) {
            (Method::Ppo, RewardSource::Model(rm)) => {
                if rm.config.dim != model_config.dim {
                    return Err(RlhfError::Config(format!(
                        "the reward model's hidden size {} differs from the policy's {}: its head cannot start the value head",
                        rm.config.dim, model_config.dim
                    )));
                }
                Some(rm.head.linear.weight.dequantize()?)
            }
            (Method::Ppo, _) => Some(candle_core::Tensor::zeros(
                (1, model_config.dim),
                candle_core::DType::F32,
                &device,
            )?),
            _ => None,
        };
        let learner = Learner::build(&source.model, &model_config, &cfg, head, &device)?;
        let reference = if learner.lora.is_some() {
            learner.model.without_lora()
        } else {
            let w = kiln_load::load_weights(&source.model, &device)?;
            Llama::new(&w.config, &w.params)?
        };
        let reward_desc = match &source.reward {
            RewardSpec::Model(p) => format!("model:{}", p.display()),
            RewardSpec::Fn(s) => format!("fn:{s}"),
            RewardSpec::Cmd(c) => format!("cmd:{c}"),
        };
        let src = vec![
            ("model", source.model.display().to_string()),
            (
                "prompts",
                source
                    .prompts
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("reward", reward_desc),
        ];
        let config_toml = init_run_dir(run_dir, &cfg, &model_config, &format, &src)?;
        let mut stop = format.end_of_turn().to_vec();
        stop.sort_unstable();
        stop.dedup();
        obs.on_message(&format!(
            "{}: {} prompts ({} skipped), reward {}, {}; {} steps of {} prompts x {} samples",
            method.section(),
            prompts.len(),
            skipped,
            reward.describe(),
            learner.mode,
            cfg.base.train.steps,
            cfg.base.train.batch_size,
            o.group_size
        ));
        let mut t = Self {
            kl: AdaptiveKl {
                coef: o.kl_coef,
                target: o.kl_target,
                horizon: o.kl_horizon,
            },
            rng: SplitMix64::new(cfg.base.train.seed ^ 0x0020_110C),
            cfg,
            run_dir: run_dir.to_path_buf(),
            learner,
            reference,
            format,
            prompts,
            prompt_ids,
            reward,
            stop,
            config_toml,
            step: 0,
            stalled_steps: 0,
            model_config,
        };
        if resume {
            let updates = (o.epochs * o.minibatches) as u64;
            match t.learner.resume(run_dir, &t.cfg, updates)? {
                Some((dir, step, rng, extra)) => {
                    t.step = step;
                    t.rng = rng;
                    if let Some(c) = extra["kl_coef"].as_f64() {
                        t.kl.coef = c;
                    }
                    obs.on_message(&format!("resumed from {} (step {step})", dir.display()));
                }
                None => obs.on_message("no checkpoint to resume from; starting fresh"),
            }
        }
        Ok(t)
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Per sample, the log-probabilities of its completion tokens under `model` and, with a
    /// `head` (PPO's value head), the values at the same positions: one trunk forward per
    /// chunk. The rollout policy's (with its head) and the reference's (without).
    #[allow(clippy::type_complexity)]
    fn outputs_of(
        &self,
        model: &Llama,
        head: Option<&ScalarHead>,
        samples: &[Sample],
    ) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>), RlhfError> {
        let t = self.cfg.online().temperature;
        let (mut lps, mut vals) = (Vec::new(), Vec::new());
        for chunk in micro_chunks(samples, |s| s.seq.ids.len()) {
            let seqs: Vec<&Seq> = chunk.iter().map(|s| &s.seq).collect();
            let b = SeqBatch::new(&seqs, Padding::Right, model.device())?;
            let hidden = model.hidden_states(&b.batch, None)?;
            let h = b.select(&hidden)?;
            let (lp, _) = model.token_logprobs_entropy(&h, &b.targets(h.device())?, t)?;
            let lp: Vec<f64> = lp.to_dtype(candle_core::DType::F64)?.to_vec1()?;
            lps.extend(b.spans.iter().map(|s| lp[s.clone()].to_vec()));
            if let Some(head) = head {
                let v: Vec<f64> = head
                    .forward(&h, &(0..b.rows.len()).collect::<Vec<_>>())?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1()?;
                vals.extend(b.spans.iter().map(|s| v[s.clone()].to_vec()));
            }
        }
        Ok((lps, vals))
    }

    /// One step: a rollout, its rewards and advantages, and the clipped updates on it.
    pub fn train_step(&mut self, obs: &mut dyn RlhfObserver) -> Result<Metrics, RlhfError> {
        let o = self.cfg.online().clone();
        let grpo = self.cfg.method == Method::Grpo;
        let tc = self.cfg.base.train.clone();
        let t_roll = Instant::now();
        let items = step_items(self.prompts.len(), tc.batch_size, tc.seed, self.step);
        let prompts: Vec<(usize, Vec<u32>)> = items
            .iter()
            .map(|&i| (i, self.prompt_ids[i].clone()))
            .collect();
        let samples = sample_responses(
            &self.learner.model,
            &self.format,
            &prompts,
            o.group_size,
            o.temperature,
            o.max_new_tokens,
            &self.stop,
            &mut self.rng,
        )?;
        let rollout_s = t_roll.elapsed().as_secs_f64();

        // Rewards.
        let reward_items: Vec<RewardItem> = samples
            .iter()
            .map(|s| RewardItem {
                prompt: self.prompts[s.prompt].user_text(),
                response: &s.text,
                record: &self.prompts[s.prompt].record,
                n_tokens: s.seq.completion().len() - usize::from(s.ended),
                seq: s.seq.clone(),
            })
            .collect();
        let raw = self.reward.score(&reward_items)?;
        drop(reward_items);
        let scores: Vec<f64> = raw
            .iter()
            .zip(&samples)
            .map(|(&r, s)| {
                if !s.ended && o.penalize_missing_eos {
                    o.missing_eos_penalty
                } else {
                    r
                }
            })
            .collect();

        // The rollout policy's log-probabilities (and values), and the reference's. With a
        // single update per rollout the policy is still the rollout policy when it updates, so
        // the old log-probabilities are the update's own (TRL does the same) and a forward
        // pass is saved.
        let single_update = o.epochs * o.minibatches == 1;
        let (old_logp, values) = if single_update && grpo {
            (Vec::new(), Vec::new())
        } else {
            let head = self.learner.head.as_ref().map(|h| &h.head);
            self.outputs_of(&self.learner.model, head, &samples)?
        };
        let measure_kl = !grpo || o.kl_coef > 0.0 || o.measure_kl;
        let ref_logp = if measure_kl {
            self.outputs_of(&self.reference, None, &samples)?.0
        } else {
            // Unused: no KL term and no KL metric; only the lengths are read.
            samples
                .iter()
                .map(|s| vec![f64::NAN; s.seq.completion().len()])
                .collect()
        };
        // KL(rollout policy || reference) per sequence, k1: sum_t log π - log π_ref. Without
        // old log-probabilities the single update measures it (before it changes anything).
        let kl_seq: Option<Vec<f64>> = (!old_logp.is_empty()).then(|| {
            old_logp
                .iter()
                .zip(&ref_logp)
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).sum())
                .collect()
        });
        let old_logp = if old_logp.is_empty() {
            ref_logp.iter().map(|r| vec![f64::NAN; r.len()]).collect()
        } else {
            old_logp
        };

        let mut rollout = Rollout {
            samples,
            old_logp,
            advantages: Vec::new(),
            old_values: Vec::new(),
            returns: Vec::new(),
            ref_logp,
        };
        if grpo {
            let adv = group_advantages(&scores, o.group_size);
            rollout.advantages = rollout
                .old_logp
                .iter()
                .zip(&adv)
                .map(|(lp, &a)| vec![a; lp.len()])
                .collect();
        } else {
            // The scores whitened over the batch (mean 0, std 1: Stiennon et al. normalise the
            // reward model's score the same way). Whitening the per-token rewards instead, as
            // TRL's `whiten_rewards` did, divides a score that sits on one token in forty by the
            // std of mostly-zero rewards and inflates it tenfold, and the value head then
            // spends the run chasing it.
            let mut step_scores = scores.clone();
            if o.whiten_rewards {
                whiten(&mut step_scores, true);
            }
            // Per-token rewards: the KL penalty everywhere, the score at the last token.
            let rewards: Vec<Vec<f64>> = rollout
                .old_logp
                .iter()
                .zip(&rollout.ref_logp)
                .zip(&step_scores)
                .map(|((lp, rl), &s)| {
                    let mut r: Vec<f64> = lp
                        .iter()
                        .zip(rl)
                        .map(|(a, b)| -self.kl.coef * (a - b))
                        .collect();
                    if let Some(last) = r.last_mut() {
                        *last += s;
                    }
                    r
                })
                .collect();
            let (mut adv, mut ret) = (Vec::new(), Vec::new());
            for (r, v) in rewards.iter().zip(&values) {
                let (a, rt) = gae(r, v, o.gamma, o.lam);
                adv.push(a);
                ret.push(rt);
            }
            let mut flat: Vec<f64> = adv.concat();
            whiten(&mut flat, true);
            let mut it = flat.into_iter();
            for a in &mut adv {
                for x in a.iter_mut() {
                    *x = it.next().expect("same length");
                }
            }
            rollout.advantages = adv;
            rollout.returns = ret;
            rollout.old_values = values;
        }

        // Updates.
        let lr = kiln_train::optim::lr_at(self.step, tc.steps, &self.cfg.base.optim);
        let n = rollout.samples.len();
        let mut acc: Vec<(f64, Metrics)> = Vec::new();
        let mut grad_norms = Vec::new();
        for _ in 0..o.epochs {
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = (self.rng.next_f64() * (i + 1) as f64) as usize;
                order.swap(i, j.min(i));
            }
            let per = n.div_ceil(o.minibatches);
            for mb in order.chunks(per) {
                let (m, norm) = self.update(&rollout, mb, lr)?;
                grad_norms.push(norm);
                acc.push((1.0, m));
            }
        }
        let kl = match &kl_seq {
            Some(k) => k.iter().sum::<f64>() / n as f64,
            None => acc[0].1["kl_now"],
        };
        let total: f64 = acc.iter().map(|(w, _)| w).sum();
        let mut m = Metrics::new();
        for (w, x) in &acc {
            for (k, v) in x {
                *m.entry(k.clone()).or_insert(0.0) += v * w / total;
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let lens: Vec<f64> = rollout
            .samples
            .iter()
            .map(|s| s.seq.completion().len() as f64)
            .collect();
        m.insert("reward".into(), mean(&raw));
        m.insert("score".into(), mean(&scores));
        m.remove("kl_now");
        if measure_kl {
            m.insert("kl".into(), kl);
        }
        m.insert("response_len".into(), mean(&lens));
        m.insert(
            "eos_fraction".into(),
            rollout.samples.iter().filter(|s| s.ended).count() as f64 / n as f64,
        );
        // Runs that cannot learn say so: a group whose scores are all equal has zero
        // advantages (GRPO), and a rollout where every response hit the budget scores only the
        // missing-EOS penalty.
        let all_cut = rollout.samples.iter().all(|s| !s.ended);
        let flat = if grpo {
            let groups: Vec<&[f64]> = scores.chunks(o.group_size.max(1)).collect();
            let flat = groups
                .iter()
                .filter(|g| g.iter().all(|&x| x == g[0]))
                .count();
            m.insert(
                "zero_variance_groups".into(),
                flat as f64 / groups.len().max(1) as f64,
            );
            flat == groups.len()
        } else {
            false
        };
        if flat || all_cut {
            self.stalled_steps += 1;
            // The first time, then every 10th: a note, not a flood.
            if self.stalled_steps % 10 == 1 {
                let mut why = Vec::new();
                if flat {
                    why.push(
                        "every group's scores are equal, so every advantage, the loss and the \
                         update are zero"
                            .to_string(),
                    );
                }
                if all_cut {
                    let penalty = if o.penalize_missing_eos {
                        format!(
                            " and scored the missing-EOS penalty {} ({}.penalize_missing_eos = \
                             false turns it off)",
                            o.missing_eos_penalty,
                            self.cfg.method.section()
                        )
                    } else {
                        String::new()
                    };
                    why.push(format!(
                        "every response hit the {}-token budget{penalty}; raise --max-new-tokens",
                        o.max_new_tokens
                    ));
                }
                obs.on_message(&format!(
                    "warning: step {} cannot learn: {} ({} such steps so far)",
                    self.step + 1,
                    why.join("; "),
                    self.stalled_steps
                ));
            }
        }
        m.insert("grad_norm".into(), mean(&grad_norms));
        m.insert("lr".into(), lr);
        m.insert("kl_coef".into(), self.kl.coef);
        m.insert("rollout_s".into(), rollout_s);
        if !grpo && o.adaptive_kl {
            self.kl.update(kl, n);
        }
        self.step += 1;
        if o.sample_every > 0 && (self.step == 1 || self.step.is_multiple_of(o.sample_every)) {
            let s = &rollout.samples[0];
            obs.on_sample(
                self.step,
                self.prompts[s.prompt].user_text(),
                &s.text,
                raw[0],
            );
            let line = serde_json::json!({
                "step": self.step,
                "prompt": self.prompts[s.prompt].user_text(),
                "response": s.text,
                "reward": raw[0],
            });
            let path = self.run_dir.join("samples.jsonl");
            let mut text = std::fs::read_to_string(&path).unwrap_or_default();
            text.push_str(&(line.to_string() + "\n"));
            kiln_train::write_atomic(&path, text.as_bytes())?;
        }
        Ok(m)
    }

    /// One clipped update on the minibatch `mb` of the rollout.
    fn update(&mut self, r: &Rollout, mb: &[usize], lr: f64) -> Result<(Metrics, f64), RlhfError> {
        let o = self.cfg.online().clone();
        let grpo = self.cfg.method == Method::Grpo;
        let clip = self.cfg.base.optim.grad_clip;
        let n_tokens: usize = mb.iter().map(|&i| r.old_logp[i].len()).sum();
        let n_seqs = mb.len();
        let device = self.learner.model.device().clone();
        let (parts, norm) =
            self.learner
                .optimizer_step(lr, clip, |model, head, grads, mut hg| {
                    let mut parts = Vec::new();
                    for chunk in micro_chunks(mb, |&i| r.samples[i].seq.ids.len()) {
                        let seqs: Vec<&Seq> = chunk.iter().map(|&i| &r.samples[i].seq).collect();
                        let b = SeqBatch::new(&seqs, Padding::Right, &device)?;
                        let wanted = Wanted {
                            logprobs: true,
                            values: !grpo,
                            scores: false,
                        };
                        let m = forward_backward(
                            model,
                            head,
                            &b,
                            o.temperature,
                            wanted,
                            grads,
                            hg.as_deref_mut(),
                            |out| {
                                let mut d_lp = vec![0.0; out.logprobs.len()];
                                let mut d_v = vec![0.0; out.logprobs.len()];
                                let (mut pg, mut vl, mut clipped, mut vclipped, mut akl, mut ent) =
                                    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
                                let (mut kl3, mut kl_now) = (0.0, 0.0);
                                for (k, &i) in chunk.iter().enumerate() {
                                    let span = b.spans[k].clone();
                                    let len = span.len() as f64;
                                    // PPO: a mean over the minibatch's tokens; GRPO: over each
                                    // sequence's tokens, then over sequences.
                                    let w = if grpo {
                                        1.0 / (len * n_seqs as f64)
                                    } else {
                                        1.0 / n_tokens as f64
                                    };
                                    for (j, pos) in span.enumerate() {
                                        let lp = out.logprobs[pos];
                                        // NaN: a single update, at the rollout policy itself.
                                        let old = if r.old_logp[i][j].is_nan() {
                                            lp
                                        } else {
                                            r.old_logp[i][j]
                                        };
                                        // NaN without a reference pass; then not logged.
                                        kl_now += (lp - r.ref_logp[i][j]) / n_seqs as f64;
                                        let (l, g, c) = clipped_surrogate(
                                            lp,
                                            old,
                                            r.advantages[i][j],
                                            o.cliprange,
                                        );
                                        pg += l * w;
                                        d_lp[pos] += g * w;
                                        clipped += f64::from(u8::from(c)) / n_tokens as f64;
                                        akl += 0.5 * (lp - old) * (lp - old) / n_tokens as f64;
                                        ent += out.entropy[pos] / n_tokens as f64;
                                        if grpo && o.kl_coef > 0.0 {
                                            let (k3, gk) = kl_k3(lp, r.ref_logp[i][j]);
                                            kl3 += k3 * w;
                                            d_lp[pos] += o.kl_coef * gk * w;
                                        }
                                        if let Some(v) = &out.values {
                                            let (l, g, c) = clipped_value_loss(
                                                v[pos],
                                                r.old_values[i][j],
                                                r.returns[i][j],
                                                o.cliprange_value,
                                            );
                                            vl += l * w;
                                            d_v[pos] = o.vf_coef * g * w;
                                            vclipped += f64::from(u8::from(c)) / n_tokens as f64;
                                        }
                                    }
                                }
                                let mut m = Metrics::from([
                                    ("pg_loss".into(), pg),
                                    ("clip_fraction".into(), clipped),
                                    ("approx_kl".into(), akl),
                                    ("entropy".into(), ent),
                                    ("kl_now".into(), kl_now),
                                ]);
                                if grpo {
                                    m.insert("loss".into(), pg + o.kl_coef * kl3);
                                    m.insert("kl_k3".into(), kl3);
                                } else {
                                    m.insert("value_loss".into(), vl);
                                    m.insert("value_clip_fraction".into(), vclipped);
                                    m.insert("loss".into(), pg + o.vf_coef * vl);
                                }
                                Ok((
                                    m,
                                    OutputGrads {
                                        d_logprobs: Some(d_lp),
                                        d_values: (!grpo).then_some(d_v),
                                        d_scores: None,
                                    },
                                ))
                            },
                        )?;
                        parts.push(m);
                    }
                    Ok(parts)
                })?;
        // Each part's metrics are already weighted by its share of the minibatch: sum them.
        let mut m = Metrics::new();
        for p in parts {
            for (k, v) in p {
                *m.entry(k).or_insert(0.0) += v;
            }
        }
        Ok((m, norm))
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf, RlhfError> {
        self.learner.save_checkpoint(
            self.step,
            &self.run_dir,
            &self.cfg,
            &self.config_toml,
            &self.rng,
            &serde_json::json!({ "kl_coef": self.kl.coef }),
        )
    }

    pub fn run(
        &mut self,
        obs: &mut dyn RlhfObserver,
        stop: &AtomicBool,
    ) -> Result<OnlineSummary, RlhfError> {
        let t0 = Instant::now();
        let start = self.step;
        let total = self.cfg.base.train.steps;
        let mut log = MetricsLog::open(&self.run_dir, start)?;
        obs.on_start(total, start);
        let mut summary = OnlineSummary::default();
        while self.step < total {
            if stop.load(Ordering::SeqCst) {
                summary.stopped_early = true;
                break;
            }
            let ts = Instant::now();
            let mut m = self.train_step(obs)?;
            m.insert("step_s".into(), ts.elapsed().as_secs_f64());
            if !m["loss"].is_finite() {
                return Err(kiln_train::TrainError::Diverged {
                    step: self.step,
                    what: format!("loss is {}", m["loss"]),
                }
                .into());
            }
            if self.cfg.base.train.logs_at(self.step) {
                log.write(self.step, false, &m)?;
            }
            obs.on_step(self.step, &m);
            if summary.first.is_empty() {
                summary.first = m.clone();
            }
            summary.last = m;
            if self.cfg.base.train.checkpoints_at(self.step) || self.step == total {
                let dir = self.save_checkpoint()?;
                obs.on_checkpoint(&dir);
            }
        }
        // A stop right after a scheduled checkpoint has nothing new to save.
        let saved_already = self.cfg.base.train.checkpoints_at(self.step) || self.step == total;
        if summary.stopped_early && self.step > start && !saved_already {
            let dir = self.save_checkpoint()?;
            obs.on_checkpoint(&dir);
        }
        if let Some(spec) = &self.learner.lora {
            kiln_load::save_adapter(
                &self.run_dir.join("adapter"),
                &self.learner.params,
                spec,
                &self.learner.base,
            )?;
        }
        log.plot(
            &self.run_dir,
            &[
                (
                    "reward.png",
                    "reward (mean per step)",
                    &[("reward", false), ("score", false)],
                ),
                (
                    "kl.png",
                    "KL to the reference (nats per sequence)",
                    &[("kl", false)],
                ),
                (
                    "entropy.png",
                    "entropy (nats per token)",
                    &[("entropy", false)],
                ),
                (
                    "loss.png",
                    "loss",
                    &[("loss", false), ("value_loss", false)],
                ),
            ],
        )?;
        summary.steps = self.step;
        summary.wall_s = t0.elapsed().as_secs_f64();
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_chunks_bound_sequences_and_padded_tokens() {
        let lens = [
            100usize, 100, 3000, 500, 5000, 10, 10, 10, 10, 10, 10, 10, 10, 10,
        ];
        let chunks = micro_chunks(&lens, |&l| l);
        let sizes: Vec<Vec<usize>> = chunks.iter().map(|c| c.to_vec()).collect();
        assert_eq!(
            sizes,
            vec![
                vec![100, 100],
                vec![3000],
                vec![500],
                vec![5000],
                vec![10; 8],
                vec![10; 1],
            ]
        );
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), lens.len());
    }
}
