//! Training on fixed preference pairs: the reward model (Bradley–Terry on a scalar head read at
//! the last token) and DPO (the policy's completion log-probabilities against a frozen
//! reference's). One loop, two losses: a new pairwise objective is a loss here, not a copy of
//! the trainer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use kiln_chat::{split_held_out, ChatFormat};
use kiln_model::{Llama, ModelConfig, SplitMix64};

use crate::learner::{
    init_run_dir, open_model, step_items, Chart, Learner, Metrics, MetricsLog, RlhfObserver,
};
use crate::losses::{bradley_terry, dpo, DpoLoss};
use crate::seqs::{
    completion_logprobs, forward_backward, OutputGrads, Padding, Seq, SeqBatch, Wanted,
};
use crate::{read_preferences, Method, PreferencePair, RlhfConfig, RlhfError};

/// A preference pair as token ids.
#[derive(Debug, Clone)]
pub struct EncodedPair {
    pub chosen: Seq,
    pub rejected: Seq,
    pub margin: f64,
}

/// What encoding a set of pairs did.
#[derive(Debug, Default, Clone)]
pub struct EncodeStats {
    /// Sequences (chosen or rejected) cut to `seq_len`.
    pub truncated: usize,
}

/// Cuts a prompt + completion longer than `seq_len` as TRL's DPO does: the prompt's start
/// first (keeping at least half the window for it when the completion is long), then the
/// completion's end. Returns the new ids and prompt length.
fn truncate(ids: &[u32], prompt_len: usize, seq_len: usize) -> (Vec<u32>, usize) {
    let completion = ids.len() - prompt_len;
    let keep_prompt = prompt_len.min(seq_len.saturating_sub(completion).max(seq_len / 2));
    let keep_completion = (seq_len - keep_prompt).min(completion);
    let mut cut = ids[prompt_len - keep_prompt..prompt_len].to_vec();
    cut.extend_from_slice(&ids[prompt_len..prompt_len + keep_completion]);
    (cut, keep_prompt)
}

/// Renders and tokenizes pairs with the chat template, as SFT renders conversations. Long
/// pairs are cut (see [`truncate`]), never dropped. A reward model reads its score at the last
/// token, so its sequences end with EOS (appended when the end-of-turn token is not EOS; kept
/// last when a sequence is cut).
pub fn encode_pairs(
    format: &ChatFormat,
    pairs: &[PreferencePair],
    seq_len: usize,
    method: Method,
) -> Result<(Vec<EncodedPair>, EncodeStats), RlhfError> {
    let eos = format.tokenizer.eos.as_ref().map(|e| e.0);
    let mut stats = EncodeStats::default();
    let mut out = Vec::new();
    for p in pairs {
        let mut seqs = Vec::with_capacity(2);
        for response in [&p.chosen, &p.rejected] {
            let (mut ids, mut prompt_len) =
                format.encode_completion(&p.prompt, response, &p.origin)?;
            let score_token = if method == Method::Rm { eos } else { None };
            if let Some(e) = score_token {
                if ids.last() == Some(&e) {
                    ids.pop();
                }
            }
            // Room for the score token at the end of a reward model's sequence.
            let room = seq_len.saturating_sub(usize::from(score_token.is_some()));
            if ids.len() > room {
                (ids, prompt_len) = truncate(&ids, prompt_len, room);
                stats.truncated += 1;
            }
            if let Some(e) = score_token {
                ids.push(e);
            }
            seqs.push(Seq { ids, prompt_len });
        }
        let rejected = seqs.pop().expect("two");
        let chosen = seqs.pop().expect("two");
        out.push(EncodedPair {
            chosen,
            rejected,
            margin: p.margin,
        });
    }
    Ok((out, stats))
}

/// Where the model and data come from.
#[derive(Debug, Clone)]
pub struct PairSource {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    /// DPO's `--ref` (else `dpo.reference`, else the starting model).
    pub reference: Option<PathBuf>,
}

/// Sequence log-probabilities of the reference model for each pair: `(chosen, rejected)`,
/// sums or (IPO) means per completion token.
type RefLogps = Vec<(f64, f64)>;

pub struct PairTrainer {
    pub cfg: RlhfConfig,
    pub run_dir: PathBuf,
    pub learner: Learner,
    pub train: Vec<EncodedPair>,
    pub val: Vec<EncodedPair>,
    ref_train: RefLogps,
    ref_val: RefLogps,
    config_toml: String,
    pub model_config: ModelConfig,
    pub stats: EncodeStats,
    pub skipped_records: usize,
}

/// The end of a run.
#[derive(Debug, Clone, Default)]
pub struct PairSummary {
    pub steps: u64,
    pub before: Metrics,
    pub after: Metrics,
    pub wall_s: f64,
    pub stopped_early: bool,
    pub last_checkpoint: Option<PathBuf>,
}

fn seq_logp(lp: &[f64], span: std::ops::Range<usize>, mean: bool) -> f64 {
    let n = span.len().max(1) as f64;
    let s: f64 = lp[span].iter().sum();
    if mean {
        s / n
    } else {
        s
    }
}

/// Mean of each metric over weighted parts.
fn weighted(parts: &[(f64, Metrics)]) -> Metrics {
    let total: f64 = parts.iter().map(|(w, _)| w).sum();
    let mut out = Metrics::new();
    for (w, m) in parts {
        for (k, v) in m {
            *out.entry(k.clone()).or_insert(0.0) += v * w / total;
        }
    }
    out
}

impl PairTrainer {
    /// Loads the model and data and prepares `run_dir` (resuming its newest checkpoint with
    /// `resume`).
    pub fn new(
        method: Method,
        source: PairSource,
        config_file: Option<&Path>,
        overrides: &[String],
        run_dir: &Path,
        resume: bool,
        obs: &mut dyn RlhfObserver,
    ) -> Result<Self, RlhfError> {
        let device = Device::Cpu;
        let (mut cfg, format, model_config) =
            open_model(&source.model, method, config_file, overrides)?;
        let (mut pairs, skipped_records) =
            read_preferences(&source.data, cfg.base.sft.skip_bad_records)?;
        if let Some(n) = cfg.base.sft.max_records {
            pairs.truncate(n);
        }
        let (tr, va) = split_held_out(pairs.len(), cfg.base.sft.val_fraction, cfg.base.train.seed);
        let pick = |ix: &[usize]| ix.iter().map(|&i| pairs[i].clone()).collect::<Vec<_>>();
        let seq_len = cfg.base.train.seq_len;
        let (train, mut stats) = encode_pairs(&format, &pick(&tr), seq_len, method)?;
        let (val, vs) = encode_pairs(&format, &pick(&va), seq_len, method)?;
        stats.truncated += vs.truncated;
        if train.is_empty() {
            return Err(RlhfError::Config(
                "no training pairs: the data holds none beyond the held-out ones".into(),
            ));
        }
        let per_step = cfg.base.train.batch_size * cfg.base.train.grad_accum;
        cfg.base.finalize(train.len().div_ceil(per_step) as u64);

        let head = match method {
            Method::Rm => Some(
                kiln_model::ScalarHead::init(
                    model_config.dim,
                    cfg.base.train.seed ^ 0x5C0E,
                    &device,
                )?
                .linear
                .weight
                .dequantize()?,
            ),
            _ => None,
        };
        let learner = Learner::build(&source.model, &model_config, &cfg, head, &device)?;
        let mut src = vec![
            ("model", source.model.display().to_string()),
            (
                "data",
                source
                    .data
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ];
        let reference = source.reference.clone().or_else(|| {
            (method == Method::Dpo)
                .then(|| cfg.dpo().reference.clone())
                .flatten()
        });
        if let Some(r) = &reference {
            src.push(("reference", r.display().to_string()));
        }
        let config_toml = init_run_dir(run_dir, &cfg, &model_config, &format, &src)?;
        // The held-out pairs as records, for evaluating the result later.
        let held_out: String = va
            .iter()
            .map(|&i| {
                let p = &pairs[i];
                let prompt: Vec<serde_json::Value> = p
                    .prompt
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect();
                serde_json::json!({"prompt": prompt, "chosen": p.chosen, "rejected": p.rejected})
                    .to_string()
                    + "\n"
            })
            .collect();
        kiln_train::write_atomic(&run_dir.join("held_out.jsonl"), held_out.as_bytes())?;
        obs.on_message(&format!(
            "{}: {} training pairs, {} held out; {} sequences cut to train.seq_len (the prompt's start first); {}",
            method.section(),
            train.len(),
            val.len(),
            stats.truncated,
            learner.mode
        ));
        let mut t = Self {
            cfg,
            run_dir: run_dir.to_path_buf(),
            learner,
            train,
            val,
            ref_train: Vec::new(),
            ref_val: Vec::new(),
            config_toml,
            model_config,
            stats,
            skipped_records,
        };
        if method == Method::Dpo {
            t.reference_logprobs(reference.as_deref(), &device, obs)?;
        }
        if resume {
            match t.learner.resume(run_dir, &t.cfg, 1)? {
                Some((dir, _, _, _)) => obs.on_message(&format!(
                    "resumed from {} (step {})",
                    dir.display(),
                    t.learner.step()
                )),
                None => obs.on_message("no checkpoint to resume from; starting fresh"),
            }
        }
        Ok(t)
    }

    /// DPO's reference log-probabilities, computed once before training (or read back from
    /// the run directory on resume, since a fully fine-tuned policy has moved since).
    fn reference_logprobs(
        &mut self,
        reference: Option<&Path>,
        device: &Device,
        obs: &mut dyn RlhfObserver,
    ) -> Result<(), RlhfError> {
        let path = self.run_dir.join("reference_logprobs.json");
        let n = (self.train.len(), self.val.len());
        if let Ok(text) = std::fs::read_to_string(&path) {
            let saved: (RefLogps, RefLogps) = serde_json::from_str(&text)
                .map_err(|e| RlhfError::Config(format!("{}: {e}", path.display())))?;
            if (saved.0.len(), saved.1.len()) == n {
                (self.ref_train, self.ref_val) = saved;
                return Ok(());
            }
        }
        let t0 = Instant::now();
        let owned;
        let model: &Llama = match reference {
            Some(p) => {
                let (_, ref_cfg) = kiln_load::load_model_config(p)?;
                if ref_cfg.vocab_size != self.model_config.vocab_size {
                    return Err(RlhfError::Config(format!(
                        "the reference model {} has a vocabulary of {}, the policy {}",
                        p.display(),
                        ref_cfg.vocab_size,
                        self.model_config.vocab_size
                    )));
                }
                let w = kiln_load::load_weights(p, device)?;
                owned = Llama::new(&w.config, &w.params)?;
                &owned
            }
            // Under LoRA the frozen base is the reference: no second copy of the weights.
            None if self.learner.lora.is_some() => {
                owned = self.learner.model.without_lora();
                &owned
            }
            None => &self.learner.model,
        };
        let mean = self.cfg.dpo().loss.length_normalised();
        let bs = self.cfg.base.train.batch_size;
        let total = (n.0 + n.1) as u64;
        let mut done = 0u64;
        let mut run =
            |pairs: &[EncodedPair], obs: &mut dyn RlhfObserver| -> Result<RefLogps, RlhfError> {
                let mut out = Vec::with_capacity(pairs.len());
                for chunk in pairs.chunks(bs) {
                    let (c, r) = pair_logps(model, chunk, 1.0, mean)?;
                    out.extend(c.into_iter().zip(r));
                    done += chunk.len() as u64;
                    obs.on_progress("reference log-probabilities (pairs)", done, total);
                }
                Ok(out)
            };
        self.ref_train = run(&self.train, obs)?;
        self.ref_val = run(&self.val, obs)?;
        kiln_train::write_atomic(
            &path,
            serde_json::to_string(&(&self.ref_train, &self.ref_val))
                .expect("invariant: serialises")
                .as_bytes(),
        )?;
        obs.on_message(&format!(
            "reference log-probabilities of {} pairs in {:.0} s",
            n.0 + n.1,
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn micro_batch<'a>(pairs: &[&'a EncodedPair]) -> Vec<&'a Seq> {
        let mut seqs: Vec<&Seq> = pairs.iter().map(|p| &p.chosen).collect();
        seqs.extend(pairs.iter().map(|p| &p.rejected));
        seqs
    }

    /// One optimizer step over the next `batch_size * grad_accum` pairs.
    pub fn train_step(&mut self) -> Result<Metrics, RlhfError> {
        let tc = &self.cfg.base.train;
        let per_step = tc.batch_size * tc.grad_accum;
        let items = step_items(self.train.len(), per_step, tc.seed, self.learner.step());
        let n_step = items.len() as f64;
        let lr = kiln_train::optim::lr_at(self.learner.step(), tc.steps, &self.cfg.base.optim);
        let (method, cfg) = (self.cfg.method, self.cfg.clone());
        let (train, ref_train) = (&self.train, &self.ref_train);
        let device = self.learner.model.device().clone();
        let (parts, grad_norm) = self.learner.optimizer_step(
            lr,
            cfg.base.optim.grad_clip,
            |model, head, grads, mut hg| {
                let mut parts = Vec::new();
                for chunk in items.chunks(cfg.base.train.batch_size) {
                    let pairs: Vec<&EncodedPair> = chunk.iter().map(|&i| &train[i]).collect();
                    let refs: Vec<(f64, f64)> = match method {
                        Method::Dpo => chunk.iter().map(|&i| ref_train[i]).collect(),
                        _ => Vec::new(),
                    };
                    let seqs = SeqBatch::new(&Self::micro_batch(&pairs), Padding::Right, &device)?;
                    let share = chunk.len() as f64 / n_step;
                    let m = forward_backward(
                        model,
                        head,
                        &seqs,
                        1.0,
                        Wanted {
                            logprobs: method == Method::Dpo,
                            scores: method == Method::Rm,
                            values: false,
                        },
                        grads,
                        hg.as_deref_mut(),
                        |out| pair_loss(&cfg, &pairs, &refs, &seqs, out, share),
                    )?;
                    parts.push((chunk.len() as f64, m));
                }
                Ok(parts)
            },
        )?;
        let mut m = weighted(&parts);
        m.insert("grad_norm".into(), grad_norm);
        m.insert("lr".into(), lr);
        Ok(m)
    }

    /// Held-out metrics (forward only): RM accuracy and margin; DPO rewards, margin and
    /// preference accuracy. Empty without held-out pairs.
    pub fn evaluate(&self) -> Result<Metrics, RlhfError> {
        let mut parts = Vec::new();
        let bs = self.cfg.base.train.batch_size;
        let model = &self.learner.model;
        for (k, chunk) in self.val.chunks(bs).enumerate() {
            let pairs: Vec<&EncodedPair> = chunk.iter().collect();
            let m = match self.cfg.method {
                Method::Rm => {
                    let head = &self.learner.head.as_ref().expect("a reward head").head;
                    let seqs =
                        SeqBatch::new(&Self::micro_batch(&pairs), Padding::Right, model.device())?;
                    let s = crate::seqs::last_token_scores(model, head, &seqs)?;
                    let (c, r) = s.split_at(chunk.len());
                    let margins: Vec<f64> = chunk.iter().map(|p| p.margin).collect();
                    rm_metrics(c, r, &margins, self.cfg.rm().center_coef)
                }
                _ => {
                    let mean = self.cfg.dpo().loss.length_normalised();
                    let (c, r) = pair_logps(model, chunk, 1.0, mean)?;
                    let refs = &self.ref_val[k * bs..k * bs + chunk.len()];
                    dpo_metrics(&self.cfg, &c, &r, refs).0
                }
            };
            parts.push((chunk.len() as f64, m));
        }
        Ok(weighted(&parts))
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf, RlhfError> {
        self.learner.save_checkpoint(
            self.learner.step(),
            &self.run_dir,
            &self.cfg,
            &self.config_toml,
            &SplitMix64::new(0),
            &serde_json::Value::Null,
        )
    }

    /// Runs to `train.steps` (or until `stop`): evaluates before and after and on schedule,
    /// checkpoints, plots.
    pub fn run(
        &mut self,
        obs: &mut dyn RlhfObserver,
        stop: &AtomicBool,
    ) -> Result<PairSummary, RlhfError> {
        let t0 = Instant::now();
        let start = self.learner.step();
        let total = self.cfg.base.train.steps;
        let mut log = MetricsLog::open(&self.run_dir, start)?;
        obs.on_start(total, start);
        let mut summary = PairSummary::default();
        if start == 0 && !self.val.is_empty() {
            summary.before = self.evaluate()?;
            log.write(0, true, &summary.before)?;
            obs.on_eval(0, &summary.before);
        }
        while self.learner.step() < total {
            if stop.load(Ordering::SeqCst) {
                summary.stopped_early = true;
                break;
            }
            let ts = Instant::now();
            let mut m = self.train_step()?;
            m.insert("step_s".into(), ts.elapsed().as_secs_f64());
            let step = self.learner.step();
            if !m["loss"].is_finite() {
                return Err(kiln_train::TrainError::Diverged {
                    step,
                    what: format!("loss is {}", m["loss"]),
                }
                .into());
            }
            if self.cfg.base.train.logs_at(step) {
                log.write(step, false, &m)?;
            }
            obs.on_step(step, &m);
            if !self.val.is_empty() && (self.cfg.base.train.evaluates_at(step) || step == total) {
                let e = self.evaluate()?;
                log.write(step, true, &e)?;
                obs.on_eval(step, &e);
                summary.after = e;
            }
            if self.cfg.base.train.checkpoints_at(step) || step == total {
                let dir = self.save_checkpoint()?;
                obs.on_checkpoint(&dir);
                summary.last_checkpoint = Some(dir);
            }
        }
        // A stop right after a scheduled checkpoint has nothing new to save.
        let done = self.learner.step();
        let saved_already = self.cfg.base.train.checkpoints_at(done) || done == total;
        if summary.stopped_early && done > start && !saved_already {
            let dir = self.save_checkpoint()?;
            obs.on_checkpoint(&dir);
            summary.last_checkpoint = Some(dir);
        }
        if let Some(spec) = &self.learner.lora {
            kiln_load::save_adapter(
                &self.run_dir.join("adapter"),
                &self.learner.params,
                spec,
                &self.learner.base,
            )?;
        }
        let charts: &[Chart] = match self.cfg.method {
            Method::Rm => &[
                (
                    "loss.png",
                    "Bradley-Terry loss",
                    &[("loss", false), ("loss", true)],
                ),
                (
                    "accuracy.png",
                    "pairwise accuracy",
                    &[("accuracy", false), ("accuracy", true)],
                ),
            ],
            _ => &[
                ("loss.png", "DPO loss", &[("loss", false), ("loss", true)]),
                (
                    "rewards.png",
                    "implicit rewards",
                    &[
                        ("reward_chosen", false),
                        ("reward_rejected", false),
                        ("margin", true),
                    ],
                ),
                (
                    "accuracy.png",
                    "preference accuracy",
                    &[("accuracy", false), ("accuracy", true)],
                ),
            ],
        };
        log.plot(&self.run_dir, charts)?;
        summary.steps = self.learner.step();
        summary.wall_s = t0.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// Sequence log-probabilities `(chosen, rejected)` of a chunk of pairs (forward only).
fn pair_logps(
    model: &Llama,
    pairs: &[EncodedPair],
    temperature: f64,
    mean: bool,
) -> Result<(Vec<f64>, Vec<f64>), RlhfError> {
    let refs: Vec<&EncodedPair> = pairs.iter().collect();
    let seqs = SeqBatch::new(
        &PairTrainer::micro_batch(&refs),
        Padding::Right,
        model.device(),
    )?;
    let (lp, _) = completion_logprobs(model, &seqs, temperature)?;
    let all: Vec<f64> = seqs
        .spans
        .iter()
        .map(|s| seq_logp(&lp, s.clone(), mean))
        .collect();
    let (c, r) = all.split_at(pairs.len());
    Ok((c.to_vec(), r.to_vec()))
}

fn rm_metrics(c: &[f64], r: &[f64], margins: &[f64], coef: f64) -> Metrics {
    let n = c.len() as f64;
    let l = bradley_terry(c, r, margins, coef);
    Metrics::from([
        ("loss".into(), l.loss),
        (
            "accuracy".into(),
            c.iter().zip(r).filter(|(a, b)| a > b).count() as f64 / n,
        ),
        (
            "margin".into(),
            c.iter().zip(r).map(|(a, b)| a - b).sum::<f64>() / n,
        ),
        ("reward_chosen".into(), c.iter().sum::<f64>() / n),
        ("reward_rejected".into(), r.iter().sum::<f64>() / n),
    ])
}

/// DPO's loss and TRL's metrics (implicit rewards `β (π - ref)`, their margin and accuracy),
/// with the gradient with respect to the sequence log-probabilities.
fn dpo_metrics(
    cfg: &RlhfConfig,
    c: &[f64],
    r: &[f64],
    refs: &[(f64, f64)],
) -> (Metrics, crate::losses::PairLoss) {
    let d = cfg.dpo();
    let (rc, rr): (Vec<f64>, Vec<f64>) = refs.iter().copied().unzip();
    let l = dpo(d.loss, d.beta, d.label_smoothing, c, r, &rc, &rr);
    let n = c.len() as f64;
    let rew_c: Vec<f64> = c.iter().zip(&rc).map(|(p, q)| d.beta * (p - q)).collect();
    let rew_r: Vec<f64> = r.iter().zip(&rr).map(|(p, q)| d.beta * (p - q)).collect();
    let m = Metrics::from([
        ("loss".into(), l.loss),
        ("reward_chosen".into(), rew_c.iter().sum::<f64>() / n),
        ("reward_rejected".into(), rew_r.iter().sum::<f64>() / n),
        (
            "margin".into(),
            rew_c.iter().zip(&rew_r).map(|(a, b)| a - b).sum::<f64>() / n,
        ),
        (
            "accuracy".into(),
            rew_c.iter().zip(&rew_r).filter(|(a, b)| a > b).count() as f64 / n,
        ),
        ("logp_chosen".into(), c.iter().sum::<f64>() / n),
        ("logp_rejected".into(), r.iter().sum::<f64>() / n),
    ]);
    (m, l)
}

/// The loss of one micro-batch (its share of the step's pairs) and its output gradients.
fn pair_loss(
    cfg: &RlhfConfig,
    pairs: &[&EncodedPair],
    refs: &[(f64, f64)],
    seqs: &SeqBatch,
    out: &crate::seqs::PolicyOutputs,
    share: f64,
) -> Result<(Metrics, OutputGrads), RlhfError> {
    let n = pairs.len();
    match cfg.method {
        Method::Rm => {
            let s = out.scores.as_ref().expect("scores were asked for");
            let (c, r) = s.split_at(n);
            let margins: Vec<f64> = pairs.iter().map(|p| p.margin).collect();
            let l = bradley_terry(c, r, &margins, cfg.rm().center_coef);
            let mut d: Vec<f64> = l.d_chosen.iter().map(|g| g * share).collect();
            d.extend(l.d_rejected.iter().map(|g| g * share));
            Ok((
                rm_metrics(c, r, &margins, cfg.rm().center_coef),
                OutputGrads {
                    d_scores: Some(d),
                    ..Default::default()
                },
            ))
        }
        _ => {
            let mean = cfg.dpo().loss == DpoLoss::Ipo;
            let seq: Vec<f64> = seqs
                .spans
                .iter()
                .map(|s| seq_logp(&out.logprobs, s.clone(), mean))
                .collect();
            let (c, r) = seq.split_at(n);
            let (m, l) = dpo_metrics(cfg, c, r, refs);
            // d loss / d token logp: the sequence's gradient (over its length for IPO's mean).
            let mut d = vec![0.0; out.logprobs.len()];
            for (k, span) in seqs.spans.iter().enumerate() {
                let g = if k < n {
                    l.d_chosen[k]
                } else {
                    l.d_rejected[k - n]
                };
                let g = if mean {
                    g / span.len().max(1) as f64
                } else {
                    g
                } * share;
                for x in &mut d[span.clone()] {
                    *x = g;
                }
            }
            Ok((
                m,
                OutputGrads {
                    d_logprobs: Some(d),
                    ..Default::default()
                },
            ))
        }
    }
}

#[cfg(test)]
mod truncation_tests {
    use super::truncate;

    #[test]
    fn long_pairs_lose_the_prompt_start_first_then_the_completion_end() {
        // 10 prompt tokens (0..10) and 10 completion tokens (100..110).
        let ids: Vec<u32> = (0..10).chain(100..110).collect();
        // Room for 12: the prompt keeps its last half of the window, the completion its start.
        let (cut, p) = truncate(&ids, 10, 12);
        assert_eq!(p, 6);
        assert_eq!(cut, [4, 5, 6, 7, 8, 9, 100, 101, 102, 103, 104, 105]);
        // A short prompt is kept whole; the completion is cut at its end.
        let ids: Vec<u32> = (0..4).chain(100..120).collect();
        let (cut, p) = truncate(&ids, 4, 10);
        assert_eq!((p, cut.len()), (4, 10));
        assert_eq!(&cut[..5], [0, 1, 2, 3, 100]);
        // A long prompt with a short completion keeps the whole completion.
        let ids: Vec<u32> = (0..30).chain(100..103).collect();
        let (cut, p) = truncate(&ids, 30, 10);
        assert_eq!((p, &cut[7..]), (7, &[100u32, 101, 102][..]));
    }
}
