//! The generate loop: prefill each prompt into its row of the KV cache, then sample one token
//! per row per step (every projection runs once over all active rows), streaming text as it
//! becomes printable and stopping a row at a stop token, a stop string, the token budget or
//! the end of the context window. One prompt is a batch of one: `generate` and
//! `generate_batch` run the same code, so a prompt's continuation does not depend on the
//! batch it is in (for greedy decoding; sampled rows each draw from their own sampler).

use candle_core::{DType, Tensor};
use kiln_data::{IncrementalDecoder, KilnTokenizer};
use kiln_model::{CausalLm, KvCache};

use crate::{InferError, Sampler};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Token ids that end generation (EOS and every other stop id the model declares).
    pub stop_tokens: Vec<u32>,
    /// Keep the last tokens of a prompt that does not fit, instead of failing.
    pub truncate_prompt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    StopToken,
    StopString,
    MaxTokens,
    ContextFull,
}

impl FinishReason {
    /// OpenAI's names: `stop` (a stop token or string) or `length` (budget or context).
    pub fn openai_name(self) -> &'static str {
        match self {
            FinishReason::StopToken | FinishReason::StopString => "stop",
            FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    /// `log p(token)` of each generated token under the model (temperature 1, no top-k/p).
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Restricts which token may come next (structured output): implemented by the JSON
/// automaton in [`crate::json`].
pub trait TokenConstraint: Send {
    /// Whether `id` may come next.
    fn allows(&self, id: u32) -> bool;
    /// Moves past `id`, which [`allows`](Self::allows) accepted.
    fn accept(&mut self, id: u32);
    /// Whether the output so far is a complete value: the sequence then ends.
    fn is_complete(&self) -> bool;
}

/// One sequence being generated: its tokens, text and what has been emitted. The generate
/// loop below and the server's scheduler both step sequences through
/// [`push`](Self::push), so stop handling is the same everywhere.
pub struct Sequence {
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    /// The `top_logprobs` most likely tokens at each step (empty lists when not asked for).
    top_logprobs: Vec<Vec<(u32, f32)>>,
    want_top: usize,
    decoder: IncrementalDecoder,
    text: String,
    /// Bytes of `text` already returned by `push`.
    emitted: usize,
    prompt_tokens: usize,
    finish: Option<FinishReason>,
    /// Which of the stop strings ended the sequence.
    matched_stop: Option<usize>,
    constraint: Option<Box<dyn TokenConstraint>>,
}

/// `log softmax(row)[id]`.
fn logprob(row: &[f32], id: u32) -> f32 {
    row[id as usize] - crate::sampling::log_sum_exp(row)
}

/// The prompt as it will be fed: EOS for an empty prompt, the last tokens of a long one.
pub fn prepare_prompt(
    tokenizer: &KilnTokenizer,
    prompt_ids: &[u32],
    max_seq_len: usize,
    opts: &GenerateOptions,
) -> Result<Vec<u32>, InferError> {
    let mut prompt: Vec<u32> = prompt_ids.to_vec();
    if prompt.is_empty() {
        // Documents are separated by EOS in training, so EOS is the natural "start of text".
        prompt.extend(tokenizer.eos_id());
        if prompt.is_empty() {
            return Err(InferError::Sampling(
                "empty prompt and the tokenizer has no EOS token to start from".into(),
            ));
        }
    }
    if prompt.len() >= max_seq_len {
        if !opts.truncate_prompt {
            return Err(InferError::PromptTooLong {
                prompt: prompt.len(),
                max_seq_len,
            });
        }
        // Leave room for at least one new token.
        let keep = max_seq_len.saturating_sub(opts.max_new_tokens.clamp(1, max_seq_len / 2));
        prompt = prompt[prompt.len() - keep..].to_vec();
    }
    Ok(prompt)
}

impl Sequence {
    /// A sequence after a prompt of `prompt_tokens` tokens, recording the `top_logprobs` most
    /// likely tokens at each step.
    pub fn new(prompt_tokens: usize, top_logprobs: usize) -> Self {
        Self {
            generated: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            want_top: top_logprobs,
            decoder: IncrementalDecoder::new(),
            text: String::new(),
            emitted: 0,
            prompt_tokens,
            finish: None,
            matched_stop: None,
            constraint: None,
        }
    }

    /// Special tokens other than the stop tokens stay in the text (a server reading tool calls
    /// written between special tokens such as Qwen's `<tool_call>`).
    pub fn keeping_special_tokens(mut self) -> Self {
        self.decoder = IncrementalDecoder::keeping_special();
        self
    }

    /// Only tokens `constraint` allows are sampled; the sequence ends when it is complete.
    pub fn with_constraint(mut self, constraint: Box<dyn TokenConstraint>) -> Self {
        self.constraint = Some(constraint);
        self
    }

    pub fn tokens(&self) -> &[u32] {
        &self.generated
    }

    pub fn logprobs(&self) -> &[f32] {
        &self.logprobs
    }

    pub fn top_logprobs(&self) -> &[Vec<(u32, f32)>] {
        &self.top_logprobs
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The index (in `GenerateOptions::stop_strings`) of the stop string that ended the
    /// sequence, if one did.
    pub fn matched_stop(&self) -> Option<usize> {
        self.matched_stop
    }

    /// The token to feed next, if the sequence goes on.
    pub fn next_input(&self) -> Option<u32> {
        match self.finish {
            None => self.generated.last().copied(),
            Some(_) => None,
        }
    }

    /// Samples the next token from `logits` (or finishes) and returns the newly printable
    /// text. `cached` is how many positions the sequence's KV row holds.
    pub fn push(
        &mut self,
        tokenizer: &KilnTokenizer,
        logits: &[f32],
        sampler: &mut Sampler,
        opts: &GenerateOptions,
        cached: usize,
        max_seq_len: usize,
    ) -> Result<String, InferError> {
        if self.generated.len() >= opts.max_new_tokens {
            return self.finish(tokenizer, FinishReason::MaxTokens);
        }
        // A model's vocabulary may be padded past the tokenizer's: never sample those ids.
        let row = &logits[..tokenizer.vocab_size().min(logits.len())];
        let next = match &mut self.constraint {
            None => sampler.sample(row),
            Some(c) if c.is_complete() => {
                return self.finish(tokenizer, FinishReason::StopToken);
            }
            Some(c) => match sampler.sample_allowed(row, |id| c.allows(id)) {
                Some(id) => {
                    c.accept(id);
                    id
                }
                // No token continues the value (the vocabulary cannot spell it): stop.
                None => return self.finish(tokenizer, FinishReason::StopToken),
            },
        };
        if opts.stop_tokens.contains(&next) {
            return self.finish(tokenizer, FinishReason::StopToken);
        }
        self.generated.push(next);
        self.logprobs.push(logprob(row, next));
        if self.want_top > 0 {
            self.top_logprobs
                .push(crate::sampling::top_logprobs(row, self.want_top));
        }
        self.text.push_str(&self.decoder.push(tokenizer, next)?);
        if let Some((cut, which)) = opts
            .stop_strings
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.text.find(s.as_str()).map(|at| (at, i)))
            .min()
        {
            self.text.truncate(cut);
            self.finish = Some(FinishReason::StopString);
            self.matched_stop = Some(which);
            return Ok(self.take_new(self.text.len()));
        }
        // Emit what can no longer become part of a stop string.
        let hold_back = opts.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut safe = self.text.len().saturating_sub(hold_back.saturating_sub(1));
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let piece = self.take_new(safe);
        if cached + 1 > max_seq_len {
            // The sampled token was kept but cannot be fed: the context is full.
            let rest = self.finish(tokenizer, FinishReason::ContextFull)?;
            return Ok(piece + &rest);
        }
        Ok(piece)
    }

    fn take_new(&mut self, upto: usize) -> String {
        if upto > self.emitted {
            let s = self.text[self.emitted..upto].to_string();
            self.emitted = upto;
            s
        } else {
            String::new()
        }
    }

    /// Ends the sequence (a server cancelling it, or the loop at a stop) and returns the text
    /// not yet emitted.
    pub fn finish(
        &mut self,
        tokenizer: &KilnTokenizer,
        reason: FinishReason,
    ) -> Result<String, InferError> {
        self.finish = Some(reason);
        self.text.push_str(&self.decoder.finish(tokenizer)?);
        Ok(self.take_new(self.text.len()))
    }

    /// The finished sequence as a [`Generation`].
    pub fn into_generation(self, prefill_s: f64, decode_s: f64) -> Generation {
        Generation {
            token_ids: self.generated,
            logprobs: self.logprobs,
            text: self.text,
            finish_reason: self.finish.unwrap_or(FinishReason::MaxTokens),
            prompt_tokens: self.prompt_tokens,
            prefill_s,
            decode_s,
        }
    }
}

/// Generates a continuation of `prompt_ids`. `on_text` receives each newly printable piece of
/// the continuation (never the prompt, never a stop string).
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    tokenizer: &KilnTokenizer,
    prompt_ids: &[u32],
    sampler: &mut Sampler,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, InferError> {
    let mut out = run(
        model,
        tokenizer,
        &[prompt_ids.to_vec()],
        std::slice::from_mut(sampler),
        opts,
        |_, piece| on_text(piece),
    )?;
    Ok(out.remove(0))
}

/// Generates continuations of every prompt as one batch: each row has its own sampler
/// (`samplers.len() == prompts.len()`) and stops on its own; the others go on. Results are
/// in prompt order.
pub fn generate_batch<M: CausalLm + ?Sized>(
    model: &M,
    tokenizer: &KilnTokenizer,
    prompts: &[Vec<u32>],
    samplers: &mut [Sampler],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>, InferError> {
    run(model, tokenizer, prompts, samplers, opts, |_, _| {})
}

fn run<M: CausalLm + ?Sized>(
    model: &M,
    tokenizer: &KilnTokenizer,
    prompts: &[Vec<u32>],
    samplers: &mut [Sampler],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>, InferError> {
    if samplers.len() != prompts.len() {
        return Err(InferError::Sampling(format!(
            "{} samplers for {} prompts",
            samplers.len(),
            prompts.len()
        )));
    }
    let max_seq_len = model.config().max_seq_len;
    let prepared = prompts
        .iter()
        .map(|p| prepare_prompt(tokenizer, p, max_seq_len, opts))
        .collect::<Result<Vec<_>, _>>()?;
    for (sampler, prompt) in samplers.iter_mut().zip(&prepared) {
        sampler.start(prompt);
    }
    let mut cache = KvCache::new();
    let t0 = std::time::Instant::now();
    let mut last: Vec<Vec<f32>> = Vec::with_capacity(prepared.len());
    for (r, p) in prepared.iter().enumerate() {
        last.push(row_values(&model.prefill_row(r, p, &mut cache)?, 0)?);
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut rows: Vec<Sequence> = prepared.iter().map(|p| Sequence::new(p.len(), 0)).collect();
    let mut active: Vec<usize> = (0..rows.len()).collect();
    while !active.is_empty() {
        let mut feed_rows = Vec::with_capacity(active.len());
        let mut feed = Vec::with_capacity(active.len());
        for (i, &r) in active.iter().enumerate() {
            let piece = rows[r].push(
                tokenizer,
                &last[i],
                &mut samplers[r],
                opts,
                cache.row_len(r),
                max_seq_len,
            )?;
            if !piece.is_empty() {
                on_text(r, &piece);
            }
            if let Some(token) = rows[r].next_input() {
                feed_rows.push(r);
                feed.push(token);
            }
        }
        active = feed_rows;
        if active.is_empty() {
            break;
        }
        let logits = model.decode_step(&active, &feed, &mut cache)?;
        last = (0..active.len())
            .map(|i| row_values(&logits, i))
            .collect::<Result<_, _>>()?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(rows
        .into_iter()
        .map(|r| r.into_generation(prefill_s, decode_s))
        .collect())
}

pub fn row_values(logits: &Tensor, i: usize) -> Result<Vec<f32>, InferError> {
    Ok(logits.get(i)?.to_dtype(DType::F32)?.to_vec1()?)
}
