//! From scores to metrics, with lm-evaluation-harness's definitions: `acc` is the argmax of
//! the summed log-probabilities (the first on a tie, as `np.argmax`), `acc_norm` the argmax of
//! the sum divided by the choice's length in characters without its leading space; LAMBADA's
//! `acc` is greedy last-word accuracy and its perplexity `exp(-mean log p(word))`. Standard
//! errors are the sample standard deviation over documents divided by `sqrt(n)`; the
//! perplexity's by the delta method (`ppl * se(mean log p)`).

use std::time::Instant;

use crate::score::{Scored, Scorer};
use crate::tasks::{Task, TaskKind};
use crate::Result;

/// A task's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskResult {
    pub n: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    /// `None` for LAMBADA (one continuation: nothing to normalise between).
    pub acc_norm: Option<f64>,
    pub acc_norm_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_stderr: Option<f64>,
    /// Requests whose context was cut from the left to fit the window.
    pub truncated: usize,
    /// Tokens the model read (after prefix sharing) and the wall time.
    pub tokens_fed: usize,
    pub seconds: f64,
    /// Every document's scores (lm-evaluation-harness's `--log_samples`).
    #[serde(skip)]
    pub samples: Vec<DocSample>,
}

/// One document's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DocSample {
    pub doc_id: u64,
    pub gold: Option<usize>,
    /// Summed log-probability of each choice, and its continuation's token count.
    pub logprobs: Vec<f64>,
    pub n_tokens: Vec<usize>,
    /// Whether each choice's continuation is the model's greedy one.
    pub greedy: Vec<bool>,
    /// The choice `acc` picks and the one `acc_norm` picks (multiple choice).
    pub pred: Option<usize>,
    pub pred_norm: Option<usize>,
    /// 1 when the document counts as right for `acc`.
    pub acc: f64,
}

/// Mean and standard error of the mean (sample std, `n - 1`).
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Index of the largest value, the first one on a tie.
fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Scores every document of `task`; `progress(done)` after each document.
pub fn evaluate(
    scorer: &Scorer,
    task: &Task,
    progress: &mut dyn FnMut(usize),
) -> Result<TaskResult> {
    let t0 = Instant::now();
    let (mut acc, mut acc_norm, mut word_lp) = (Vec::new(), Vec::new(), Vec::new());
    let (mut truncated, mut tokens_fed) = (0, 0);
    let mut samples = Vec::with_capacity(task.docs.len());
    for (i, doc) in task.docs.iter().enumerate() {
        let enc = scorer.encode(&doc.choices)?;
        truncated += enc.iter().filter(|e| e.truncated).count();
        tokens_fed += fed_tokens(&enc);
        let scores: Vec<Scored> = scorer.score_doc(&enc)?;
        let (mut pred, mut pred_norm) = (None, None);
        match task.kind {
            TaskKind::MultipleChoice => {
                let gold = doc
                    .gold
                    .expect("multiple-choice documents carry their gold choice");
                let hit = |i: usize| if i == gold { 1.0 } else { 0.0 };
                let best = argmax(scores.iter().map(|s| s.logprob));
                acc.push(hit(best));
                let per_char = scores.iter().zip(&doc.choices).map(|(s, r)| {
                    let text = r.continuation.strip_prefix(' ').unwrap_or(&r.continuation);
                    s.logprob / text.chars().count().max(1) as f64
                });
                let best_norm = argmax(per_char);
                acc_norm.push(hit(best_norm));
                (pred, pred_norm) = (Some(best), Some(best_norm));
            }
            TaskKind::LastWord => {
                let s = scores[0];
                acc.push(if s.greedy { 1.0 } else { 0.0 });
                word_lp.push(s.logprob);
            }
        }
        samples.push(DocSample {
            doc_id: doc.doc_id,
            gold: doc.gold,
            logprobs: scores.iter().map(|s| s.logprob).collect(),
            n_tokens: scores.iter().map(|s| s.n_tokens).collect(),
            greedy: scores.iter().map(|s| s.greedy).collect(),
            pred,
            pred_norm,
            acc: *acc.last().expect("pushed above"),
        });
        progress(i + 1);
    }
    let (acc, acc_stderr) = mean_stderr(&acc);
    let (acc_norm, acc_norm_stderr, perplexity, perplexity_stderr) = match task.kind {
        TaskKind::MultipleChoice => {
            let (m, s) = mean_stderr(&acc_norm);
            (Some(m), Some(s), None, None)
        }
        TaskKind::LastWord => {
            let (m, s) = mean_stderr(&word_lp);
            let ppl = (-m).exp();
            (None, None, Some(ppl), Some(ppl * s))
        }
    };
    Ok(TaskResult {
        n: task.docs.len(),
        acc,
        acc_stderr,
        acc_norm,
        acc_norm_stderr,
        perplexity,
        perplexity_stderr,
        truncated,
        tokens_fed,
        seconds: t0.elapsed().as_secs_f64(),
        samples,
    })
}

/// Tokens a document costs with its common prefix shared.
fn fed_tokens(enc: &[crate::score::Encoded]) -> usize {
    if enc.is_empty() {
        return 0;
    }
    let shared = crate::score::common_prefix(enc);
    shared + enc.iter().map(|e| e.input.len() - shared).sum::<usize>()
}
