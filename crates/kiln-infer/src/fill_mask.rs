//! Fill-mask: the top-k candidates, with probabilities, for every `[MASK]` in a text, from an
//! encoder trained with `train.objective = "mlm"`.
//!
//! One forward pass over the whole text; each mask is predicted independently (as BERT's
//! fill-mask does), so `filled` shows every mask replaced by its own top candidate.

use candle_core::{DType, Tensor};
use kiln_data::{KilnTokenizer, MASK_TOKEN};
use kiln_model::{AttentionMode, Llama};
use serde::Serialize;

use crate::InferError;

type Result<T> = std::result::Result<T, InferError>;

/// A fill-mask input the model or text cannot serve (the message says what to do).
fn refuse<T>(msg: String) -> Result<T> {
    Err(InferError::FillMask(msg))
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub token_id: u32,
    /// The token decoded on its own (byte-level BPE: a leading space is part of the token).
    pub text: String,
    pub prob: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaskPrediction {
    /// Index of the mask among the text's tokens.
    pub position: usize,
    /// Most likely first.
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FillMaskOutput {
    pub text: String,
    pub masks: Vec<MaskPrediction>,
    /// The text with every mask replaced by its top candidate.
    pub filled: String,
}

/// Predicts every `[MASK]` of `text`. Errors: a causal model, a tokenizer without `[MASK]`,
/// a text without `[MASK]`, a text longer than the model's context.
pub fn fill_mask(
    model: &Llama,
    tokenizer: &KilnTokenizer,
    text: &str,
    top_k: usize,
) -> Result<FillMaskOutput> {
    if top_k == 0 {
        return refuse("--top-k must be at least 1".into());
    }
    if model.config().attention != AttentionMode::Bidirectional {
        return refuse(
            "fill-mask needs an encoder trained with train.objective = \"mlm\" \
             (model.attention = \"bidirectional\"); this model is a causal decoder, \
             sample from it with `kiln generate` instead"
                .into(),
        );
    }
    let Some(mask_id) = tokenizer.token_id(MASK_TOKEN) else {
        return refuse(format!(
            "the model's tokenizer has no {MASK_TOKEN} token; train an MLM model (its tokenizer \
             comes from `kiln tokenizer train --mlm` or from an MLM run that trains its own)"
        ));
    };
    let ids = tokenizer.encode(text)?;
    let positions: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask_id).collect();
    if positions.is_empty() {
        return refuse(format!(
            "--text has no {MASK_TOKEN}: write {MASK_TOKEN} where the model should fill in a \
             token, e.g. --text \"To be, or not to {MASK_TOKEN}\""
        ));
    }
    let max = model.config().max_seq_len;
    if ids.len() > max {
        return refuse(format!(
            "--text is {} tokens, longer than the model's context of {max}",
            ids.len()
        ));
    }
    let input = Tensor::from_slice(&ids, (1, ids.len()), model.device())?;
    let logits = model.logits(&input)?.squeeze(0)?.to_dtype(DType::F32)?; // (t, v)
                                                                          // Only ids the tokenizer can decode are candidates (a model vocabulary may be padded).
    let vocab = tokenizer.vocab_size().min(model.config().vocab_size);
    let mut masks = Vec::with_capacity(positions.len());
    let mut filled_ids = ids.clone();
    for &pos in &positions {
        let row = logits.get(pos)?.narrow(0, 0, vocab)?.to_vec1::<f32>()?;
        let probs = softmax(&row);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let candidates = order
            .iter()
            .take(top_k)
            .map(|&id| {
                Ok(Candidate {
                    token_id: id as u32,
                    text: tokenizer.decode(&[id as u32])?,
                    prob: probs[id],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        filled_ids[pos] = candidates[0].token_id;
        masks.push(MaskPrediction {
            position: pos,
            candidates,
        });
    }
    Ok(FillMaskOutput {
        text: text.to_string(),
        masks,
        filled: tokenizer.decode(&filled_ids)?,
    })
}

/// Softmax in f64 (stable: max subtracted).
fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let exp: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use kiln_data::{add_mlm_special_tokens, train_bpe, BpeTrainOptions, EOS_TOKEN};
    use kiln_model::{ModelConfig, Params};

    fn tokenizer(mlm: bool) -> (tempfile::TempDir, KilnTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(
            &path,
            "To be, or not to be, that is the question.\n".repeat(30),
        )
        .unwrap();
        let mut special_tokens = vec![EOS_TOKEN.to_string()];
        if mlm {
            add_mlm_special_tokens(&mut special_tokens);
        }
        let opts = BpeTrainOptions {
            vocab_size: 300,
            special_tokens,
            ..Default::default()
        };
        let tok = train_bpe(&[path], &opts).unwrap();
        (dir, tok)
    }

    fn model(attention: AttentionMode) -> Llama {
        let cfg = ModelConfig {
            vocab_size: 320,
            dim: 32,
            n_layers: 1,
            n_heads: 4,
            n_kv_heads: Some(2),
            max_seq_len: 32,
            attention,
            ..ModelConfig::tiny()
        };
        let params = Params::init(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
        Llama::new(&cfg, &params).unwrap()
    }

    #[test]
    fn predicts_every_mask_with_probabilities() {
        let (_d, tok) = tokenizer(true);
        let m = model(AttentionMode::Bidirectional);
        let out = fill_mask(&m, &tok, "To be, or [MASK] to [MASK], that", 3).unwrap();
        assert_eq!(out.masks.len(), 2);
        for p in &out.masks {
            assert_eq!(p.candidates.len(), 3);
            assert!(p.candidates.windows(2).all(|w| w[0].prob >= w[1].prob));
            assert!(p.candidates.iter().all(|c| c.prob > 0.0 && c.prob < 1.0));
            assert!(p
                .candidates
                .iter()
                .all(|c| (c.token_id as usize) < tok.vocab_size()));
        }
        assert!(!out.filled.contains("[MASK]"), "{}", out.filled);
        assert!(out.filled.starts_with("To be, or"), "{}", out.filled);
        let json = serde_json::to_value(&out).unwrap();
        assert!(json["masks"][1]["candidates"][0]["prob"].is_f64());
    }

    #[test]
    fn bad_input_gets_a_clear_error() {
        let (_d, tok) = tokenizer(true);
        let enc = model(AttentionMode::Bidirectional);
        let err = fill_mask(&enc, &tok, "no mask here", 5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has no [MASK]") && err.contains("--text"),
            "{err}"
        );

        let dec = model(AttentionMode::Causal);
        let err = fill_mask(&dec, &tok, "to [MASK]", 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("causal") && err.contains("mlm"), "{err}");

        let (_d2, plain) = tokenizer(false);
        let err = fill_mask(&enc, &plain, "to [MASK]", 5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no [MASK] token") && err.contains("--mlm"),
            "{err}"
        );

        let long = format!("{} [MASK]", "To be, or not to be. ".repeat(20));
        let err = fill_mask(&enc, &tok, &long, 5).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
    }
}
