//! Heads on the trunk's hidden states `(n, d)`, each with a hand-written backward that ends
//! in `d_hidden` (then [`Llama::backward_hidden`] takes over):
//!
//! - the LM head with cross-entropy (pretraining, SFT): `loss = sum_i -log softmax(h_i W^T)[y_i]`;
//! - per-token log-probabilities of given targets (DPO, PPO, GRPO):
//!   `logp_i = (h_i W^T)[y_i] - logsumexp(h_i W^T)`, with `d logits_i = g_i (onehot(y_i) - p_i)`;
//! - a scalar head read at one position per row (reward and value models):
//!   `r_b = h_{last(b)} · w`.
//!
//! With Gemma 2's final soft cap the LM logits are `z = c tanh(h W^T / c)`, and each backward
//! multiplies `d z` by `1 - (z / c)^2` before the projection's backward.

use candle_core::{DType, Device, Tensor, D};
use kiln_kernels as k;

use crate::linear::{Linear, LinearWeight};
use crate::{Grads, Llama, ModelError, SplitMix64};

impl Llama {
    /// LM logits of hidden states: `(n, d)` → `(n, v)`.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        self.cap_logits(self.output.forward(hidden)?)
    }

    /// The final soft cap `z = c tanh(x / c)` of the LM logits (Gemma 2's
    /// `final_logit_softcapping`); the identity without one.
    pub(crate) fn cap_logits(&self, x: Tensor) -> Result<Tensor, ModelError> {
        Ok(match self.cfg.final_logit_softcapping {
            None => x,
            Some(c) => ((x / c)?.tanh()? * c)?,
        })
    }

    /// [`Llama::cap_logits`] on rows held as plain values (the decode fast path).
    pub(crate) fn cap_logit_values(&self, x: &mut [f32]) {
        if let Some(c) = self.cfg.final_logit_softcapping {
            let c = c as f32;
            for v in x {
                *v = c * (*v / c).tanh();
            }
        }
    }

    /// The gradient through the cap from the capped logits `z`: `d x = d z (1 - (z / c)^2)`.
    fn cap_logits_backward(&self, z: &Tensor, dz: Tensor) -> Result<Tensor, ModelError> {
        Ok(match self.cfg.final_logit_softcapping {
            None => dz,
            Some(c) => {
                let slope = (1.0 - (z.to_dtype(dz.dtype())? / c)?.sqr()?)?;
                (dz * slope)?
            }
        })
    }

    /// LM head + cross-entropy: forward and backward of `loss_scale * sum(CE)` over the
    /// targets != -100 (`targets (n)` i64). Adds the head's gradient into `grads`; returns the
    /// (unscaled) loss sum and `d_hidden`.
    ///
    /// Only rows with a target go through the head (an ignored row's loss and gradient are
    /// zero), so SFT's prompt tokens cost no `(n, v)` logits; and the rows go through in chunks
    /// of at most [`LOGITS_CHUNK_ELEMENTS`] logits, so a large vocabulary never holds the whole
    /// `(n, v)` matrix at once.
    pub fn lm_loss_backward(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        loss_scale: f64,
        grads: &mut Grads,
    ) -> Result<(f64, Tensor), ModelError> {
        let targets = targets.flatten_all()?;
        let hidden = hidden.detach();
        let output = self.output_detached();
        let Some((rows, h, t)) = rows_with_targets(&hidden, &targets)? else {
            return Ok((0.0, hidden.zeros_like()?));
        };
        let mut loss_sum = 0.0;
        let mut d_parts = Vec::new();
        for (start, len) in logit_chunks(h.dim(0)?, self.cfg.vocab_size) {
            let (h, t) = (h.narrow(0, start, len)?, t.narrow(0, start, len)?);
            let (logits, ctx) = output.forward_saving(&h, None)?; // (len, v)
            let logits = self.cap_logits(logits)?;
            loss_sum += k::cross_entropy_sum(&logits, &t)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let dlogits = k::cross_entropy_backward(&logits, &t, loss_scale)?;
            let dlogits = self.cap_logits_backward(&logits, dlogits)?;
            drop(logits);
            d_parts.push(output.backward(ctx, &dlogits, grads)?);
        }
        let d_sel = if d_parts.len() == 1 {
            d_parts.pop().expect("one part")
        } else {
            Tensor::cat(&d_parts, 0)?
        };
        let d_hidden = match rows {
            None => d_sel,
            Some(rows) => hidden.zeros_like()?.index_add(&rows, &d_sel, 0)?,
        };
        Ok((loss_sum, d_hidden))
    }

    /// Forward only: the cross-entropy sum over the targets != -100 and their count, with the
    /// same row selection and chunking as [`Llama::lm_loss_backward`] (evaluation).
    pub fn lm_loss_sum(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
    ) -> Result<(f64, usize), ModelError> {
        let targets = targets.flatten_all()?;
        let Some((_, h, t)) = rows_with_targets(hidden, &targets)? else {
            return Ok((0.0, 0));
        };
        let n = h.dim(0)?;
        let n_targets = k::count_valid_targets(&t)?;
        let output = self.output_detached();
        let mut sum = 0.0;
        for (start, len) in logit_chunks(n, self.cfg.vocab_size) {
            let logits = self.cap_logits(output.forward(&h.narrow(0, start, len)?)?)?;
            sum += k::cross_entropy_sum(&logits, &t.narrow(0, start, len)?)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok((sum, n_targets))
    }

    /// `log p(targets[i] | prefix)` for every row of `hidden` at sampling temperature `T`:
    /// `log softmax(h_i W^T / T)[y_i]`; `targets (n)` u32 or i64 → `(n)` in the hidden states' dtype. Rows go through
    /// the head in chunks (see [`LOGITS_CHUNK_ELEMENTS`]).
    pub fn token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<Tensor, ModelError> {
        Ok(self.token_logprobs_entropy(hidden, targets, temperature)?.0)
    }

    /// [`Llama::token_logprobs`] and the entropy of each row's distribution at temperature
    /// `T`, `H_i = -sum_v p_iv log p_iv` (PPO's entropy metric), both `(n)`.
    pub fn token_logprobs_entropy(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<(Tensor, Tensor), ModelError> {
        check_temperature(temperature)?;
        let hidden = hidden.detach();
        let targets = targets.flatten_all()?;
        let output = self.output_detached();
        let (mut lps, mut ents) = (Vec::new(), Vec::new());
        for (start, len) in logprob_chunks(hidden.dim(0)?, self.cfg.vocab_size) {
            let logits = self.cap_logits(output.forward(&hidden.narrow(0, start, len)?)?)?;
            let (lp, ent) =
                k::token_logprobs_entropy(&logits, &targets.narrow(0, start, len)?, temperature)?;
            lps.push(lp);
            ents.push(ent);
        }
        if lps.is_empty() {
            let z = Tensor::zeros(0, hidden.dtype(), hidden.device())?;
            return Ok((z.clone(), z));
        }
        Ok((Tensor::cat(&lps, 0)?, Tensor::cat(&ents, 0)?))
    }

    /// Evaluation's head: `log p(targets[i] | prefix)` at temperature 1 and the most likely
    /// token of each row (`argmax_v z_iv`), both `(n)` (log-probs f32, ids u32). A
    /// continuation is what greedy decoding would produce when every target is its row's
    /// argmax (lm-evaluation-harness's `is_greedy`).
    pub fn token_logprobs_argmax(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let hidden = hidden.detach();
        let targets = targets.flatten_all()?;
        let output = self.output_detached();
        let (mut lps, mut best) = (Vec::new(), Vec::new());
        for (start, len) in logprob_chunks(hidden.dim(0)?, self.cfg.vocab_size) {
            let logits = self.cap_logits(output.forward(&hidden.narrow(0, start, len)?)?)?;
            let (lp, _) = k::token_logprobs_entropy(&logits, &targets.narrow(0, start, len)?, 1.0)?;
            lps.push(lp.to_dtype(DType::F32)?);
            best.push(logits.argmax(D::Minus1)?);
        }
        if lps.is_empty() {
            let d = hidden.device();
            return Ok((
                Tensor::zeros(0, DType::F32, d)?,
                Tensor::zeros(0, DType::U32, d)?,
            ));
        }
        Ok((Tensor::cat(&lps, 0)?, Tensor::cat(&best, 0)?))
    }

    /// Backward of [`Llama::token_logprobs`] given `d_logp (n)`: adds the head's gradient into
    /// `grads`, returns `d_hidden`. With `z = h W^T`,
    /// `d z_i = g_i (onehot(y_i) - softmax(z_i / T)) / T`. Recomputes the logits (one GEMM per
    /// chunk of [`LOGPROB_CHUNK_ELEMENTS`]) rather than keep `(n, v)`.
    pub fn token_logprobs_backward(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        d_logp: &Tensor,
        temperature: f64,
        grads: &mut Grads,
    ) -> Result<Tensor, ModelError> {
        check_temperature(temperature)?;
        let hidden = hidden.detach();
        let output = self.output_detached();
        let targets = targets.flatten_all()?.to_dtype(DType::I64)?;
        let d_logp = d_logp.flatten_all()?;
        let mut d_parts = Vec::new();
        for (start, len) in logprob_chunks(hidden.dim(0)?, self.cfg.vocab_size) {
            let h = hidden.narrow(0, start, len)?;
            let (logits, ctx) = output.forward_saving(&h, None)?;
            let logits = self.cap_logits(logits)?;
            let dlogits = k::token_logprobs_backward(
                &logits,
                &targets.narrow(0, start, len)?,
                &d_logp.narrow(0, start, len)?,
                temperature,
            )?;
            let dlogits = self.cap_logits_backward(&logits, dlogits)?;
            drop(logits);
            d_parts.push(output.backward(ctx, &dlogits, grads)?);
        }
        if d_parts.len() == 1 {
            return Ok(d_parts.pop().expect("one part"));
        }
        Ok(Tensor::cat(&d_parts, 0)?)
    }

    fn output_detached(&self) -> Linear {
        let mut o = self.output.clone();
        if let LinearWeight::Dense(w) = &o.weight {
            o.weight = LinearWeight::Dense(w.detach());
        }
        o
    }
}

fn check_temperature(t: f64) -> Result<(), ModelError> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(ModelError::Input(format!(
            "temperature must be positive, got {t}"
        )))
    }
}

/// `log softmax(logits)[i, targets[i]]`: `(n, v)`, `(n)` → `(n)`.
pub fn logprobs_of(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let n = logits.dim(0)?;
    let m = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &m)?; // (n, 1)
    let idx = targets
        .flatten_all()?
        .to_dtype(DType::U32)?
        .reshape((n, 1))?;
    (logits.gather(&idx, 1)? - lse)?.squeeze(1)
}

/// A scalar head `w (1, d)` read at one position per row: the reward model's score and PPO's
/// value head (`score.weight`, as transformers' `LlamaForSequenceClassification` names it).
pub struct ScalarHead {
    pub linear: Linear,
}

impl ScalarHead {
    pub const NAME: &'static str = "score";

    /// Fresh head with std `1/sqrt(d+1)` (TRL's reward-model init).
    pub fn init(dim: usize, seed: u64, device: &Device) -> Result<Self, ModelError> {
        let mut rng = SplitMix64::new(seed);
        let std = 1.0 / ((dim + 1) as f64).sqrt();
        let w: Vec<f32> = (0..dim).map(|_| (rng.next_normal() * std) as f32).collect();
        Ok(Self::from_weight(Tensor::from_vec(w, (1, dim), device)?))
    }

    /// Over an existing `(1, d)` weight.
    pub fn from_weight(w: Tensor) -> Self {
        Self {
            linear: Linear::dense(Self::NAME, w),
        }
    }

    /// Scores `(rows.len())` read at the flat hidden-state indices `rows` (one per row).
    pub fn forward(&self, hidden: &Tensor, rows: &[usize]) -> Result<Tensor, ModelError> {
        let h = pick_rows(hidden, rows)?;
        Ok(self.linear.forward(&h)?.squeeze(1)?)
    }

    /// Backward given `d_scores (rows.len())`: adds `score.weight`'s gradient into `grads`,
    /// returns `d_hidden` (zero except at the rows read).
    pub fn backward(
        &self,
        hidden: &Tensor,
        rows: &[usize],
        d_scores: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor, ModelError> {
        let h = pick_rows(&hidden.detach(), rows)?;
        let mut lin = self.linear.clone();
        if let LinearWeight::Dense(w) = &lin.weight {
            lin.weight = LinearWeight::Dense(w.detach());
        }
        let (_, ctx) = lin.forward_saving(&h, None)?;
        let dy = d_scores.reshape((rows.len(), 1))?.to_dtype(h.dtype())?;
        let dh = lin.backward(ctx, &dy, grads)?; // (rows, d)
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            hidden.device(),
        )?;
        Ok(
            Tensor::zeros(hidden.shape(), hidden.dtype(), hidden.device())?
                .index_add(&idx, &dh, 0)?,
        )
    }
}

/// The flat index of each row's last non-padding token: `lengths[r]` real tokens at the start
/// of row `r` of a `(b, t)` batch (right padding).
pub fn last_token_rows(lengths: &[usize], t: usize) -> Result<Vec<usize>, ModelError> {
    lengths
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            if len == 0 || len > t {
                Err(ModelError::Input(format!(
                    "row {r} has {len} tokens; a scalar head needs 1..={t}"
                )))
            } else {
                Ok(r * t + len - 1)
            }
        })
        .collect()
}

fn pick_rows(hidden: &Tensor, rows: &[usize]) -> Result<Tensor, ModelError> {
    let n = hidden.dim(0)?;
    if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
        return Err(ModelError::Input(format!(
            "row index {bad} is out of range for {n} hidden states"
        )));
    }
    let idx = Tensor::from_vec(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        rows.len(),
        hidden.device(),
    )?;
    Ok(hidden.index_select(&idx, 0)?)
}

/// Cross-entropy for callers that want one number: `(sum, n_valid)` of `-log p(target)` over
/// targets != -100 (`logits (..., v)`, `targets (...)` i64).
pub fn loss_sum(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize), ModelError> {
    let targets = targets.flatten_all()?;
    let logits = logits.reshape(((), logits.dim(D::Minus1)?))?;
    let n = k::count_valid_targets(&targets)?;
    Ok((k::cross_entropy_sum(&logits, &targets)?, n))
}

/// Most logits one chunk of the LM head holds (64 Mi f32 = 256 MiB).
pub const LOGITS_CHUNK_ELEMENTS: usize = 64 << 20;

/// Most logits the log-prob heads (DPO, PPO, GRPO) hold at once: 32 MB of f32, 170 rows of
/// SmolLM2's 49,152-token vocabulary or 55 of Qwen2.5's 151,936. Preference tuning runs two
/// sequences per pair and a reference pass beside the policy, so its head works in smaller
/// pieces than pretraining's: the fused kernels keep no other `(rows, v)` buffer, and a
/// chunk's GEMM stays large enough to run at full speed.
pub const LOGPROB_CHUNK_ELEMENTS: usize = 8 << 20;

/// `(start, len)` chunks of `n` rows so that `len * vocab` stays within
/// [`LOGITS_CHUNK_ELEMENTS`] (one chunk when it all fits).
fn logit_chunks(n: usize, vocab: usize) -> Vec<(usize, usize)> {
    chunks_within(n, vocab, LOGITS_CHUNK_ELEMENTS)
}

/// [`logit_chunks`] within [`LOGPROB_CHUNK_ELEMENTS`].
fn logprob_chunks(n: usize, vocab: usize) -> Vec<(usize, usize)> {
    chunks_within(n, vocab, LOGPROB_CHUNK_ELEMENTS)
}

fn chunks_within(n: usize, vocab: usize, elements: usize) -> Vec<(usize, usize)> {
    let per = (elements / vocab.max(1)).max(1);
    (0..n).step_by(per).map(|s| (s, per.min(n - s))).collect()
}

/// Gathered rows are padded (with ignored targets) to a multiple of this, so the head's
/// `(rows, v)` buffers come in few sizes and are reused step after step by the allocator.
const GATHER_MULTIPLE: usize = 128;

/// The rows of `hidden` whose target is not -100, with those targets: `None` when there are
/// none; the row index tensor is `None` when every row has a target (no gather needed).
#[allow(clippy::type_complexity)]
fn rows_with_targets(
    hidden: &Tensor,
    targets: &Tensor,
) -> Result<Option<(Option<Tensor>, Tensor, Tensor)>, ModelError> {
    let t: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
    let keep: Vec<u32> = (0..t.len() as u32)
        .filter(|&i| t[i as usize] != -100)
        .collect();
    if keep.is_empty() {
        return Ok(None);
    }
    if keep.len() == t.len() {
        return Ok(Some((None, hidden.clone(), targets.clone())));
    }
    // Pad with the first kept row (its target ignored): zero loss and zero gradient.
    let n_keep = keep.len().div_ceil(GATHER_MULTIPLE) * GATHER_MULTIPLE;
    let n_keep = n_keep.min(t.len());
    let mut keep = keep;
    let mut t_sel: Vec<i64> = keep.iter().map(|&i| t[i as usize]).collect();
    while keep.len() < n_keep {
        keep.push(keep[0]);
        t_sel.push(-100);
    }
    let rows = Tensor::from_vec(keep, n_keep, hidden.device())?;
    let t_sel = Tensor::from_vec(t_sel, n_keep, targets.device())?.to_dtype(targets.dtype())?;
    Ok(Some((
        Some(rows.clone()),
        hidden.index_select(&rows, 0)?,
        t_sel,
    )))
}
