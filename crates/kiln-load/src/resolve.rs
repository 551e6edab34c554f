//! Finds the weights, config and tokenizer behind a kiln `--model PATH`: a run directory (its
//! newest complete checkpoint), a checkpoint directory, or a weights file next to a
//! `config.toml`.

use std::path::{Path, PathBuf};

use kiln_model::ModelConfig;

use crate::{
    checkpoint, read_run_model, LoadError, ModelFormat, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE,
};

/// Where a kiln model's shape and tokenizer come from.
#[derive(Debug, Clone, PartialEq)]
pub struct KilnRun {
    /// The run config whose `[model]` gives the shape (the checkpoint's own copy).
    pub config_file: PathBuf,
    /// `[data] dataset` of that config, as written.
    pub dataset: Option<PathBuf>,
    /// The checkpoint directory and its step, when the weights are a checkpoint's.
    pub checkpoint: Option<(u64, PathBuf)>,
}

/// A kiln model found on disk (nothing loaded yet).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    pub format: ModelFormat,
    pub config: ModelConfig,
    /// The weights file.
    pub weights: PathBuf,
    /// The tokenizer: next to the weights, in the run directory, or in the run's dataset.
    pub tokenizer: Option<PathBuf>,
    /// Every place looked for the tokenizer, in order (for the error when there is none).
    pub tokenizer_candidates: Vec<PathBuf>,
    pub run: KilnRun,
}

/// Resolves a kiln run directory, checkpoint directory or weights file. A run resolves to its
/// newest complete checkpoint, which is verified (sizes and CRC32s); a corrupt one is an error
/// naming the file, never silently replaced by an older one.
pub fn resolve_kiln(path: &Path) -> Result<ResolvedModel, LoadError> {
    let format = ModelFormat::detect(path)?;
    let (dir, weights, ckpt) = match format {
        ModelFormat::KilnRun => {
            let Some((step, latest)) = checkpoint::latest_checkpoint(path)? else {
                return Err(LoadError::NoCheckpoint {
                    run: path.to_path_buf(),
                });
            };
            checkpoint::verify_checkpoint(&latest)?;
            (latest.clone(), weights_of(&latest), Some((step, latest)))
        }
        ModelFormat::KilnCheckpoint => {
            let manifest = checkpoint::verify_checkpoint(path)?;
            (
                path.to_path_buf(),
                weights_of(path),
                Some((manifest.step, path.to_path_buf())),
            )
        }
        ModelFormat::KilnWeights => {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (dir, path.to_path_buf(), None)
        }
        ModelFormat::HfDir | ModelFormat::Gguf => {
            return Err(LoadError::Unrecognised {
                path: path.to_path_buf(),
                why: format!(
                    "a {} model, not a kiln run, checkpoint or weights file",
                    format.name()
                ),
            })
        }
    };
    if !weights.is_file() {
        return Err(LoadError::Checkpoint {
            path: weights,
            msg: "file is missing".into(),
        });
    }
    let config_file = dir.join(CONFIG_FILE);
    if !config_file.is_file() {
        return Err(LoadError::MissingConfig {
            weights,
            config: config_file,
        });
    }
    let run = read_run_model(&config_file)?;
    refuse_lora_run(&config_file, path)?;
    // Checkpoints live in RUN/checkpoints/step-N; the run keeps the tokenizer, and the run's
    // dataset has the one it was prepared with.
    let mut candidates = vec![dir.join(TOKENIZER_FILE)];
    if ckpt.is_some() {
        if let Some(run_dir) = dir.parent().and_then(|p| p.parent()) {
            candidates.push(run_dir.join(TOKENIZER_FILE));
        }
    }
    if let Some(d) = &run.dataset {
        candidates.push(d.join(TOKENIZER_FILE));
    }
    Ok(ResolvedModel {
        format,
        config: run.model,
        weights,
        tokenizer: candidates.iter().find(|p| p.is_file()).cloned(),
        tokenizer_candidates: candidates,
        run: KilnRun {
            config_file,
            dataset: run.dataset,
            checkpoint: ckpt,
        },
    })
}

/// A checkpoint's weights: `model.safetensors`, or the manifest of a distributed run's
/// per-rank shards (which `Params::load` assembles).
fn weights_of(checkpoint: &Path) -> PathBuf {
    let sharded = checkpoint.join(kiln_model::sharded::SHARD_MANIFEST);
    if !checkpoint.join(MODEL_FILE).exists() && sharded.exists() {
        sharded
    } else {
        checkpoint.join(MODEL_FILE)
    }
}

/// A LoRA run (`kiln sft --lora-rank`) saves adapters, not a model: say how to load it.
fn refuse_lora_run(config_file: &Path, path: &Path) -> Result<(), LoadError> {
    let text = std::fs::read_to_string(config_file).map_err(|e| LoadError::io(config_file, e))?;
    let Ok(root) = text.parse::<toml::Table>() else {
        return Ok(()); // read_run_model has already accepted it
    };
    if !root.contains_key("lora") {
        return Ok(());
    }
    let base = root
        .get("source")
        .and_then(|s| s.get("model"))
        .and_then(|m| m.as_str())
        .unwrap_or("BASE");
    let run_dir = if path.is_dir() && path.join("adapter").is_dir() {
        path.to_path_buf()
    } else {
        PathBuf::from("RUN")
    };
    Err(LoadError::Unrecognised {
        path: path.to_path_buf(),
        why: format!(
            "a LoRA run holds adapters, not a whole model; load the base with the adapter: --model {base} --adapter {} (or merge them: kiln lora merge)",
            run_dir.join("adapter").display()
        ),
    })
}
