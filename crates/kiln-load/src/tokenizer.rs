//! The tokenizer of any supported model, read from tokenizer files only (a GGUF's header, an
//! HF directory's tokenizer files, a run's `tokenizer.json`), so it never loads weights.

use std::path::Path;

use kiln_data::ModelTokenizer;
use kiln_model::ModelConfig;

use crate::{resolve_kiln, LoadError, ModelFormat, TOKENIZER_FILE};

/// The tokenizer (with BOS/EOS, chat template and stop tokens) behind `path`: a GGUF file, an
/// HF directory, a `*.json` tokenizer file, a directory holding a `tokenizer.json` (a run, a
/// checkpoint, a prepared dataset; with a `tokenizer_config.json` next to it, read as an HF
/// tokenizer directory), or a kiln checkpoint/weights file whose run or dataset has one.
pub fn load_tokenizer(path: &Path) -> Result<ModelTokenizer, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        return Ok(ModelTokenizer::from_tokenizer_json(path)?);
    }
    if path.is_dir() && !kiln_model::hf::is_hf_dir(path) && path.join(TOKENIZER_FILE).is_file() {
        return Ok(if path.join("tokenizer_config.json").is_file() {
            ModelTokenizer::from_hf_dir(path)?
        } else {
            ModelTokenizer::from_tokenizer_json(&path.join(TOKENIZER_FILE))?
        });
    }
    match ModelFormat::detect(path)? {
        ModelFormat::Gguf => Ok(ModelTokenizer::from_gguf(path)?),
        ModelFormat::HfDir => Ok(ModelTokenizer::from_hf_dir(path)?),
        ModelFormat::KilnRun | ModelFormat::KilnCheckpoint | ModelFormat::KilnWeights => {
            let r = resolve_kiln(path)?;
            let tok = r.tokenizer.ok_or_else(|| LoadError::NoTokenizer {
                model: path.to_path_buf(),
                searched: r.tokenizer_candidates.clone(),
            })?;
            Ok(ModelTokenizer::from_tokenizer_json(&tok)?)
        }
    }
}

/// Fails when the tokenizer has ids the model has no embedding for.
pub fn check_vocab(tok: &ModelTokenizer, cfg: &ModelConfig) -> Result<(), LoadError> {
    let n = tok.tokenizer.vocab_size();
    if n > cfg.vocab_size {
        return Err(LoadError::VocabMismatch {
            source_path: tok.source.clone(),
            tokenizer: n,
            model: cfg.vocab_size,
        });
    }
    Ok(())
}
