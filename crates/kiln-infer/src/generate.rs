//! The generate loop: prefill the prompt into the KV cache, then sample one token at a time,
//! streaming text as it becomes printable and stopping at EOS, a stop string, the token budget
//! or the end of the context window.

use candle_core::{DType, Tensor};
use kiln_data::{IncrementalDecoder, KilnTokenizer};
use kiln_model::{CausalLm, KvCache};

use crate::{InferError, Sampler};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Token ids that end generation (EOS).
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

#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
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
    let max_seq_len = model.config().max_seq_len;
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
    let device = model.device().clone();
    let mut cache = KvCache::new();
    let mut decoder = IncrementalDecoder::new();
    let mut text = String::new();
    let mut emitted = 0; // bytes of `text` already passed to on_text
    let hold_back = opts.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut generated = Vec::new();

    let t0 = std::time::Instant::now();
    let input = Tensor::from_slice(&prompt, (1, prompt.len()), &device)?;
    let mut logits = model.forward_decode(&input, &mut cache)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();

    let finish_reason = loop {
        if generated.len() >= opts.max_new_tokens {
            break FinishReason::MaxTokens;
        }
        let mut row: Vec<f32> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
        // A model's vocabulary may be padded past the tokenizer's: never sample those ids.
        row.truncate(tokenizer.vocab_size().min(row.len()));
        let next = sampler.sample(&row);
        if opts.stop_tokens.contains(&next) {
            break FinishReason::StopToken;
        }
        generated.push(next);
        text.push_str(&decoder.push(tokenizer, next)?);
        if let Some(cut) = opts
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
            if cut > emitted {
                on_text(&text[emitted..]);
            }
            emitted = text.len();
            break FinishReason::StopString;
        }
        // Emit what can no longer become part of a stop string.
        let mut safe = text.len().saturating_sub(hold_back.saturating_sub(1));
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > emitted {
            on_text(&text[emitted..safe]);
            emitted = safe;
        }
        if cache.len() >= max_seq_len {
            break FinishReason::ContextFull;
        }
        let input = Tensor::from_slice(&[next], (1, 1), &device)?;
        logits = model.forward_decode(&input, &mut cache)?;
    };
    if finish_reason != FinishReason::StopString {
        text.push_str(&decoder.finish(tokenizer)?);
        if text.len() > emitted {
            on_text(&text[emitted..]);
        }
    }
    Ok(Generation {
        token_ids: generated,
        text,
        finish_reason,
        prompt_tokens: prompt.len(),
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
    })
}
