//! Opens the run's prepared dataset, preparing it first (tokenizer + shards) when the
//! directory does not exist yet and the config names sources.

use kiln_data::{prepare_dataset, train_bpe, BpeTrainOptions, Dataset, MlmMasker, PrepareOptions};

use crate::{Objective, Observer, RunConfig, TrainError};

pub fn ensure_dataset(cfg: &RunConfig, obs: &mut dyn Observer) -> Result<Dataset, TrainError> {
    let d = &cfg.data;
    if d.dataset.join("meta.json").exists() || d.sources.is_empty() {
        return Ok(Dataset::open(&d.dataset)?);
    }
    let mlm = cfg.train.objective == Objective::Mlm;
    let tokenizer = match &d.tokenizer {
        Some(path) => {
            // A tokenizer.json, or the tokenizer of a model (HF directory, GGUF file, run).
            let tok = kiln_load::load_tokenizer(path)?.tokenizer;
            if mlm {
                // Refuse before preparing a dataset that could not be trained on.
                MlmMasker::new(&tok, cfg.mlm_options())
                    .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
            }
            tok
        }
        None => {
            obs.on_message(&format!(
                "training a {}-token byte-level BPE tokenizer on {} source(s)",
                cfg.model.vocab_size,
                d.sources.len()
            ));
            let files = kiln_data::expand_sources(&d.sources)?;
            let mut opts = BpeTrainOptions {
                vocab_size: cfg.model.vocab_size,
                ..Default::default()
            };
            if mlm {
                kiln_data::add_mlm_special_tokens(&mut opts.special_tokens);
            }
            train_bpe(&files, &opts)?
        }
    };
    obs.on_message(&format!("preparing dataset {}", d.dataset.display()));
    let opts = PrepareOptions {
        val_fraction: d.val_fraction,
        ..Default::default()
    };
    let meta = prepare_dataset(&d.sources, &tokenizer, &d.dataset, &opts)?;
    obs.on_message(&format!(
        "dataset ready: {} train tokens, {} val tokens, {} documents",
        meta.n_train_tokens, meta.n_val_tokens, meta.n_documents
    ));
    Ok(Dataset::open(&d.dataset)?)
}
