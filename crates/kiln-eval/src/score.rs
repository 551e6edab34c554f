//! Scoring requests as lm-evaluation-harness does (`TemplateLM._encode_pair` and
//! `HFLM._loglikelihood_tokens`):
//!
//! 1. trailing whitespace of the context moves to the start of the continuation;
//! 2. the continuation's tokens are `encode(context + continuation)` minus the first
//!    `len(encode(context))` tokens, and the model reads `encode(context)` followed by them
//!    (no special tokens, except a BOS in front when the model's tokenizer adds one; an empty
//!    context becomes the BOS, or EOS, token alone);
//! 3. sequences longer than the window keep their last `window + 1` tokens (the context is cut
//!    from the left; a continuation longer than the window is scored on its last `window`
//!    tokens);
//! 4. the score is the sum of the continuation's token log-probabilities, and the request is
//!    "greedy" when every continuation token is the argmax at its position.
//!
//! A document's choices share most of their input (the context, for HellaSwag; all but the
//! option, for WinoGrande): [`Scorer::score_doc`] runs their longest common prefix once,
//! copies its KV cache into one row per choice and feeds the rest of every choice as one
//! right-padded batch.

use candle_core::Tensor;
use kiln_data::ModelTokenizer;
use kiln_model::{KvCache, Llama};

use crate::requests::Request;
use crate::{EvalError, Result};

/// A request as the model sees it: `input` is fed, and the log-probabilities of `targets` are
/// read at the last `targets.len()` positions of `input` (each position predicts the next
/// token; the last target follows the input's end).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input: Vec<u32>,
    pub targets: Vec<u32>,
    /// Whether the context was cut from the left to fit the window.
    pub truncated: bool,
}

impl Encoded {
    /// Position in `input` of the output that predicts the first target.
    fn first_target(&self) -> usize {
        self.input.len() - self.targets.len()
    }
}

/// A request's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// `sum log p(continuation tokens | context)` (nats).
    pub logprob: f64,
    /// Every continuation token is the model's most likely next token.
    pub greedy: bool,
    /// Continuation tokens scored.
    pub n_tokens: usize,
}

/// Tokenises one request (steps 1-3 above) for a model with a `window`-token context.
pub fn encode_request(tok: &ModelTokenizer, req: &Request, window: usize) -> Result<Encoded> {
    let context = req.context.trim_end();
    let continuation = format!("{}{}", &req.context[context.len()..], req.continuation);
    let (mut ctx, cont) = if context.is_empty() {
        let start = tok
            .bos
            .as_ref()
            .or(tok.eos.as_ref())
            .map(|(id, _)| *id)
            .ok_or_else(|| {
                EvalError::Input(
                    "a request with an empty context needs a BOS or EOS token to start from; the tokenizer has neither".into(),
                )
            })?;
        (vec![start], tok.tokenizer.encode(&continuation)?)
    } else {
        let whole = tok.tokenizer.encode(&format!("{context}{continuation}"))?;
        let ctx = tok.tokenizer.encode(context)?;
        let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
        (ctx, cont)
    };
    if tok.add_bos && !context.is_empty() {
        if let Some((bos, _)) = &tok.bos {
            ctx.insert(0, *bos);
        }
    }
    // Too long for the window: keep the last `window + 1` tokens (the context is cut from the
    // left, as lm-evaluation-harness does). A continuation longer than the window itself
    // (lm-evaluation-harness stops with an assertion there) is scored on its last `window`
    // tokens, each with as much context as fits; both count as truncated.
    let scored = cont.len().min(window);
    let mut full = ctx;
    full.extend_from_slice(&cont);
    let truncated = full.len() > window + 1;
    let keep = &full[full.len().saturating_sub(window + 1)..];
    Ok(Encoded {
        input: keep[..keep.len() - 1].to_vec(),
        targets: cont[cont.len() - scored..].to_vec(),
        truncated,
    })
}

/// Scores documents with one model.
pub struct Scorer<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a ModelTokenizer,
}

impl<'a> Scorer<'a> {
    pub fn new(model: &'a Llama, tokenizer: &'a ModelTokenizer) -> Self {
        Self { model, tokenizer }
    }

    /// The model's context length.
    pub fn window(&self) -> usize {
        self.model.config().max_seq_len
    }

    /// Tokenises a document's choices.
    pub fn encode(&self, choices: &[Request]) -> Result<Vec<Encoded>> {
        choices
            .iter()
            .map(|r| encode_request(self.tokenizer, r, self.window()))
            .collect()
    }

    /// Scores encoded requests together: their longest common prefix (up to the first position
    /// any of them is scored at) runs once, the rest as one batch.
    pub fn score_doc(&self, items: &[Encoded]) -> Result<Vec<Scored>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let first_needed = items.iter().map(Encoded::first_target).min().unwrap_or(0);
        let shared = common_prefix(items).min(first_needed);
        let mut cache = KvCache::new();
        if shared > 0 {
            let prefix =
                Tensor::new(&items[0].input[..shared], self.model.device())?.unsqueeze(0)?;
            self.model.forward_cached_hidden(&prefix, &mut cache)?;
            for row in 1..items.len() {
                cache.copy_row(0, row);
            }
        }
        let width = items
            .iter()
            .map(|e| e.input.len() - shared)
            .max()
            .unwrap_or(0);
        if width == 0 {
            // Nothing to score: every continuation is empty.
            return Ok(items
                .iter()
                .map(|_| Scored {
                    logprob: 0.0,
                    greedy: true,
                    n_tokens: 0,
                })
                .collect());
        }
        let mut tokens = Vec::with_capacity(items.len() * width);
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (r, e) in items.iter().enumerate() {
            let rest = &e.input[shared..];
            tokens.extend_from_slice(rest);
            tokens.extend(std::iter::repeat_n(0u32, width - rest.len()));
            let start = r * width + e.first_target() - shared;
            rows.extend((start..start + e.targets.len()).map(|i| i as u32));
            targets.extend_from_slice(&e.targets);
        }
        let device = self.model.device();
        let tokens = Tensor::from_vec(tokens, (items.len(), width), device)?;
        let hidden = self.model.forward_cached_hidden(&tokens, &mut cache)?;
        gather_scores(self.model, &hidden, &rows, &targets, items)
    }
}

/// Scores one request alone with a plain forward (no cache): the reference the shared-prefix
/// path is tested against.
pub fn score_alone(model: &Llama, e: &Encoded) -> Result<Scored> {
    if e.targets.is_empty() {
        return Ok(Scored {
            logprob: 0.0,
            greedy: true,
            n_tokens: 0,
        });
    }
    let tokens = Tensor::new(&e.input[..], model.device())?.unsqueeze(0)?;
    let hidden = model.hidden_states(&kiln_model::TokenBatch::new(tokens), None)?;
    let start = e.first_target();
    let rows: Vec<u32> = (start..e.input.len()).map(|i| i as u32).collect();
    Ok(gather_scores(model, &hidden, &rows, &e.targets, std::slice::from_ref(e))?[0])
}

/// Reads `targets` at hidden-state `rows` (in the items' order) and sums them per item.
fn gather_scores(
    model: &Llama,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
    items: &[Encoded],
) -> Result<Vec<Scored>> {
    let device = model.device();
    let picked = hidden.index_select(&Tensor::new(rows, device)?, 0)?;
    let (lp, best) = model.token_logprobs_argmax(&picked, &Tensor::new(targets, device)?)?;
    let (lp, best) = (lp.to_vec1::<f32>()?, best.to_vec1::<u32>()?);
    let mut out = Vec::with_capacity(items.len());
    let mut at = 0;
    for e in items {
        let n = e.targets.len();
        let span = at..at + n;
        out.push(Scored {
            logprob: lp[span.clone()].iter().map(|&x| x as f64).sum(),
            greedy: best[span.clone()] == targets[span],
            n_tokens: n,
        });
        at += n;
    }
    Ok(out)
}

/// Length of the token prefix all items' inputs share.
pub(crate) fn common_prefix(items: &[Encoded]) -> usize {
    let first = &items[0].input;
    let mut n = first.len();
    for e in &items[1..] {
        n = n.min(
            first
                .iter()
                .zip(&e.input)
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    n
}
