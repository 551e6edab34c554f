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

/// One sequence being generated: its tokens, text and what has been emitted.
struct Row {
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    decoder: IncrementalDecoder,
    text: String,
    /// Bytes of `text` already passed to the callback.
    emitted: usize,
    prompt_tokens: usize,
    finish: Option<FinishReason>,
}

/// `log softmax(row)[id]`.
fn logprob(row: &[f32], id: u32) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
    (row[id as usize] - m) - z.ln() as f32
}

/// The prompt as it will be fed: EOS for an empty prompt, the last tokens of a long one.
fn prepare_prompt(
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

impl Row {
    /// Takes the sampled token (or finishes); returns the newly printable text.
    fn push(
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
        let next = sampler.sample(row);
        if opts.stop_tokens.contains(&next) {
            return self.finish(tokenizer, FinishReason::StopToken);
        }
        self.generated.push(next);
        self.logprobs.push(logprob(row, next));
        self.text.push_str(&self.decoder.push(tokenizer, next)?);
        if let Some(cut) = opts
            .stop_strings
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            self.finish = Some(FinishReason::StopString);
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

    fn finish(
        &mut self,
        tokenizer: &KilnTokenizer,
        reason: FinishReason,
    ) -> Result<String, InferError> {
        self.finish = Some(reason);
        self.text.push_str(&self.decoder.finish(tokenizer)?);
        Ok(self.take_new(self.text.len()))
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
    let mut cache = KvCache::new();
    let t0 = std::time::Instant::now();
    let mut last: Vec<Vec<f32>> = Vec::with_capacity(prepared.len());
    for (r, p) in prepared.iter().enumerate() {
        last.push(row_values(&model.prefill_row(r, p, &mut cache)?, 0)?);
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut rows: Vec<Row> = prepared
        .iter()
        .map(|p| Row {
            generated: Vec::new(),
            logprobs: Vec::new(),
            decoder: IncrementalDecoder::new(),
            text: String::new(),
            emitted: 0,
            prompt_tokens: p.len(),
            finish: None,
        })
        .collect();
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
            if rows[r].finish.is_none() {
                feed_rows.push(r);
                feed.push(*rows[r].generated.last().expect("a token was just pushed"));
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
        .map(|r| Generation {
            token_ids: r.generated,
            logprobs: r.logprobs,
            text: r.text,
            finish_reason: r.finish.expect("every row finishes"),
            prompt_tokens: r.prompt_tokens,
            prefill_s,
            decode_s,
        })
        .collect())
}

fn row_values(logits: &Tensor, i: usize) -> Result<Vec<f32>, InferError> {
    Ok(logits.get(i)?.to_dtype(DType::F32)?.to_vec1()?)
}
