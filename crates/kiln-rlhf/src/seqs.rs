//! Prompt + completion sequences as model batches, and what the heads read from them: the
//! log-probability of each completion token (predicted from the position before it), a value
//! at the same positions, and a score at each sequence's last real token.

use std::ops::Range;

use candle_core::{Device, Tensor};
use kiln_model::{Grads, Llama, ScalarHead, TokenBatch};

use crate::RlhfError;

/// Token ids: the prompt, then the completion (`ids[prompt_len..]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Seq {
    pub fn completion(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }
}

/// Where the padding goes. Right padding needs no mask under causal attention; left padding
/// puts the pads in a segment of their own (positions restart at the first real token), so
/// both give the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Right,
    Left,
}

/// A batch of sequences and the flat hidden-state rows the heads read.
pub struct SeqBatch {
    pub batch: TokenBatch,
    /// Per sequence: the flat rows predicting its completion tokens, in order.
    pub spans: Vec<Range<usize>>,
    /// Flat hidden-state rows predicting completion tokens (position j - 1 for token j).
    pub rows: Vec<usize>,
    /// The completion token each of `rows` predicts.
    pub targets: Vec<u32>,
    /// The flat row of each sequence's last real token (where a scalar head reads).
    pub last: Vec<usize>,
}

/// The last real token of a row, from its attention mask (any padding side).
pub fn last_real_token(mask: &[bool]) -> Option<usize> {
    mask.iter().rposition(|&m| m)
}

impl SeqBatch {
    pub fn new(seqs: &[&Seq], padding: Padding, device: &Device) -> Result<Self, RlhfError> {
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(RlhfError::Config("an empty batch of sequences".into()));
        }
        let b = seqs.len();
        let (mut tokens, mut segs) = (Vec::with_capacity(b * t), Vec::with_capacity(b));
        let (mut spans, mut rows, mut targets, mut last) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, s) in seqs.iter().enumerate() {
            if s.prompt_len == 0 || s.prompt_len > s.ids.len() {
                return Err(RlhfError::Config(format!(
                    "a sequence of {} tokens with a prompt of {}: the prompt needs at least one token",
                    s.ids.len(),
                    s.prompt_len
                )));
            }
            let pad = t - s.ids.len();
            let mut mask = vec![true; s.ids.len()];
            let offset = match padding {
                Padding::Right => {
                    tokens.extend_from_slice(&s.ids);
                    tokens.extend(std::iter::repeat_n(0u32, pad));
                    mask.extend(std::iter::repeat_n(false, pad));
                    segs.push([vec![0u32; s.ids.len()], vec![1u32; pad]].concat());
                    0
                }
                Padding::Left => {
                    tokens.extend(std::iter::repeat_n(0u32, pad));
                    tokens.extend_from_slice(&s.ids);
                    let mut m = vec![false; pad];
                    m.extend(mask);
                    mask = m;
                    segs.push([vec![0u32; pad], vec![1u32; s.ids.len()]].concat());
                    pad
                }
            };
            let start = rows.len();
            for j in s.prompt_len..s.ids.len() {
                rows.push(r * t + offset + j - 1);
                targets.push(s.ids[j]);
            }
            spans.push(start..rows.len());
            last.push(r * t + last_real_token(&mask).expect("a sequence has tokens"));
        }
        let tokens = Tensor::from_vec(tokens, (b, t), device)?;
        let batch = match padding {
            // Causal attention never lets a real token see the pads after it.
            Padding::Right => TokenBatch::new(tokens),
            Padding::Left => TokenBatch::packed(tokens, &segs)?,
        };
        Ok(Self {
            batch,
            spans,
            rows,
            targets,
            last,
        })
    }

    fn index(&self, rows: &[usize], device: &Device) -> Result<Tensor, RlhfError> {
        let v: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        Ok(Tensor::from_vec(v, rows.len(), device)?)
    }

    /// The hidden states of the completion-predicting rows, `(rows, d)`.
    pub fn select(&self, hidden: &Tensor) -> Result<Tensor, RlhfError> {
        Ok(hidden.index_select(&self.index(&self.rows, hidden.device())?, 0)?)
    }

    /// Scatters `d_selected (rows, d)` back to `(b*t, d)`.
    pub fn scatter(&self, hidden: &Tensor, d_selected: &Tensor) -> Result<Tensor, RlhfError> {
        Ok(hidden.zeros_like()?.index_add(
            &self.index(&self.rows, hidden.device())?,
            d_selected,
            0,
        )?)
    }

    pub fn targets(&self, device: &Device) -> Result<Tensor, RlhfError> {
        Ok(Tensor::from_vec(
            self.targets.clone(),
            self.targets.len(),
            device,
        )?)
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>, RlhfError> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
}

/// Forward only: per completion token, `log p` at temperature `T` and the entropy.
pub fn completion_logprobs(
    model: &Llama,
    seqs: &SeqBatch,
    temperature: f64,
) -> Result<(Vec<f64>, Vec<f64>), RlhfError> {
    let hidden = model.hidden_states(&seqs.batch, None)?;
    let h = seqs.select(&hidden)?;
    let (lp, ent) = model.token_logprobs_entropy(&h, &seqs.targets(h.device())?, temperature)?;
    Ok((to_f64(&lp)?, to_f64(&ent)?))
}

/// Forward only: a scalar head at each sequence's last real token.
pub fn last_token_scores(
    model: &Llama,
    head: &ScalarHead,
    seqs: &SeqBatch,
) -> Result<Vec<f64>, RlhfError> {
    let hidden = model.hidden_states(&seqs.batch, None)?;
    to_f64(&head.forward(&hidden, &seqs.last)?)
}

/// What one forward of the policy gives a loss: per completion token its log-probability,
/// entropy and (with a value head) value; per sequence the head's score at the last token.
pub struct PolicyOutputs {
    pub logprobs: Vec<f64>,
    pub entropy: Vec<f64>,
    pub values: Option<Vec<f64>>,
    pub scores: Option<Vec<f64>>,
}

/// The gradients a loss hands back, each the length of its output (or `None`: unused).
#[derive(Default)]
pub struct OutputGrads {
    pub d_logprobs: Option<Vec<f64>>,
    pub d_values: Option<Vec<f64>>,
    pub d_scores: Option<Vec<f64>>,
}

/// What [`forward_backward`] reads: log-probabilities, values (a head at every completion
/// row) and scores (a head at the last token).
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted {
    pub logprobs: bool,
    pub values: bool,
    pub scores: bool,
}

/// One forward of the trunk and the heads asked for, a loss computed by `loss` from their
/// outputs, and the backward of that loss into `grads` (the trunk's) and `head_grads`.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<T>(
    model: &Llama,
    head: Option<&ScalarHead>,
    seqs: &SeqBatch,
    temperature: f64,
    wanted: Wanted,
    grads: &mut Grads,
    head_grads: Option<&mut Grads>,
    loss: impl FnOnce(&PolicyOutputs) -> Result<(T, OutputGrads), RlhfError>,
) -> Result<T, RlhfError> {
    let (hidden, trunk) = model.forward_hidden(&seqs.batch, None)?;
    let device = hidden.device().clone();
    let dtype = hidden.dtype();
    let need_head = wanted.values || wanted.scores;
    let head = match (need_head, head) {
        (true, Some(h)) => Some(h),
        (true, None) => return Err(RlhfError::Config("this loss needs a scalar head".into())),
        (false, _) => None,
    };
    let selected = if wanted.logprobs || wanted.values {
        Some(seqs.select(&hidden)?)
    } else {
        None
    };
    let targets = seqs.targets(&device)?;
    let (logprobs, entropy) = match (&selected, wanted.logprobs) {
        (Some(h), true) => {
            let (lp, ent) = model.token_logprobs_entropy(h, &targets, temperature)?;
            (to_f64(&lp)?, to_f64(&ent)?)
        }
        _ => (Vec::new(), Vec::new()),
    };
    let all_rows: Vec<usize> = (0..seqs.rows.len()).collect();
    let values = match (head, &selected, wanted.values) {
        (Some(hd), Some(h), true) => Some(to_f64(&hd.forward(h, &all_rows)?)?),
        _ => None,
    };
    let scores = match (head, wanted.scores) {
        (Some(hd), true) => Some(to_f64(&hd.forward(&hidden, &seqs.last)?)?),
        _ => None,
    };
    let outputs = PolicyOutputs {
        logprobs,
        entropy,
        values,
        scores,
    };
    let (result, g) = loss(&outputs)?;
    let tensor = |v: &[f64]| -> Result<Tensor, RlhfError> {
        Ok(Tensor::from_vec(v.to_vec(), v.len(), &device)?.to_dtype(dtype)?)
    };
    let mut d_hidden = hidden.zeros_like()?;
    let mut head_grads = head_grads;
    if let (Some(h), Some(d)) = (&selected, &g.d_logprobs) {
        let d_sel = model.token_logprobs_backward(h, &targets, &tensor(d)?, temperature, grads)?;
        d_hidden = (d_hidden + seqs.scatter(&hidden, &d_sel)?)?;
    }
    if let (Some(hd), Some(h), Some(d)) = (head, &selected, &g.d_values) {
        let hg = head_grads
            .as_mut()
            .ok_or_else(|| RlhfError::Config("a value loss needs the head's gradients".into()))?;
        let d_sel = hd.backward(h, &all_rows, &tensor(d)?, hg)?;
        d_hidden = (d_hidden + seqs.scatter(&hidden, &d_sel)?)?;
    }
    if let (Some(hd), Some(d)) = (head, &g.d_scores) {
        let hg = head_grads
            .as_mut()
            .ok_or_else(|| RlhfError::Config("a score loss needs the head's gradients".into()))?;
        d_hidden = (d_hidden + hd.backward(&hidden, &seqs.last, &tensor(d)?, hg)?)?;
    }
    drop(hidden);
    model.backward_hidden(trunk, &d_hidden, grads)?;
    Ok(result)
}
