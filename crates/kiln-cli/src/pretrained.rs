//! Loading a model for inference from any `--model PATH`: a kiln run or checkpoint, an HF
//! directory or a GGUF file. GGUF weights stay quantised (quantised matmuls) unless
//! `--dequantize` is given; everything else runs dense f32.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use kiln_data::ModelTokenizer;
use kiln_model::gguf::GgufFile;
use kiln_model::{CausalLm, Llama, ModelConfig, QLlama};
use kiln_train::resolve::{load_tokenizer, load_weights, ModelFormat};
use tracing::info;

use crate::commands::device;

pub struct InferenceModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: ModelTokenizer,
    pub config: ModelConfig,
}

/// Fails when the tokenizer has ids the model has no embedding for.
pub fn check_vocab(tok: &ModelTokenizer, cfg: &ModelConfig) -> Result<()> {
    if tok.tokenizer.vocab_size() > cfg.vocab_size {
        bail!(
            "tokenizer/model vocab mismatch: {} has {} tokens but the model's vocab_size is {}",
            tok.source.display(),
            tok.tokenizer.vocab_size(),
            cfg.vocab_size
        );
    }
    Ok(())
}

pub fn load_for_inference(path: &Path, dequantize: bool) -> Result<InferenceModel> {
    let t0 = Instant::now();
    let format = ModelFormat::detect(path);
    let tokenizer = load_tokenizer(path)?;
    let (model, config, weights): (Box<dyn CausalLm>, ModelConfig, String) =
        if format == ModelFormat::Gguf && !dequantize {
            let file = GgufFile::open(path)?;
            let cfg = file.config()?;
            let q = QLlama::from_gguf(&file, &cfg)?;
            let types = format!("{:?} (quantised)", q.weight_types());
            (Box::new(q), cfg, types)
        } else {
            let w = load_weights(path, &device())?;
            let m = Llama::new(&w.config, &w.params)?;
            (Box::new(m), w.config, "f32".into())
        };
    check_vocab(&tokenizer, &config)?;
    info!(
        format = format.name(),
        params = config.param_counts().0,
        weights,
        context = config.max_seq_len,
        secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
        "loaded {}",
        path.display()
    );
    Ok(InferenceModel {
        model,
        tokenizer,
        config,
    })
}
