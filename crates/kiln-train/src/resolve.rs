//! Finds the weights, config and tokenizer behind a `--model PATH`: a run directory (its latest
//! checkpoint), a checkpoint directory, or a `model.safetensors` next to a `config.toml`.

use std::path::{Path, PathBuf};

use kiln_model::ModelConfig;

use crate::checkpoint::{self, CONFIG_FILE, MODEL_FILE, STATE_FILE};
use crate::{RunConfig, TrainError};

#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub config: ModelConfig,
    pub weights: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// The run's full config, when the model comes from a kiln run.
    pub run_config: Option<RunConfig>,
}

fn read_run_config(path: &Path) -> Result<RunConfig, TrainError> {
    RunConfig::load(path, &[])
}

fn first_existing(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.is_file()).cloned()
}

pub fn resolve_model(path: &Path) -> Result<ResolvedModel, TrainError> {
    if !path.exists() {
        return Err(TrainError::Config(format!(
            "model path {} does not exist",
            path.display()
        )));
    }
    // A run directory: its newest completed checkpoint.
    if path.is_dir() && !path.join(STATE_FILE).exists() {
        let Some((_, latest)) = checkpoint::list(path)?.pop() else {
            return Err(TrainError::Config(format!(
                "{} is neither a checkpoint nor a run directory with checkpoints",
                path.display()
            )));
        };
        return resolve_model(&latest);
    }
    // A checkpoint directory (verified: sizes and CRCs), or a weights file.
    let (dir, weights) = if path.is_dir() {
        checkpoint::load_state(path)?;
        (path.to_path_buf(), path.join(MODEL_FILE))
    } else {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        )
    };
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(TrainError::Config(format!(
            "{}: no {CONFIG_FILE} next to the weights, so the model shape is unknown",
            weights.display()
        )));
    }
    let run = read_run_config(&config_path)?;
    // Checkpoints live in RUN/checkpoints/step-N; the run keeps the tokenizer.
    let mut candidates = vec![dir.join("tokenizer.json")];
    if let Some(run_dir) = dir.parent().and_then(|p| p.parent()) {
        candidates.push(run_dir.join("tokenizer.json"));
    }
    candidates.push(run.data.dataset.join("tokenizer.json"));
    Ok(ResolvedModel {
        config: run.model.clone(),
        weights,
        tokenizer: first_existing(&candidates),
        run_config: Some(run),
    })
}
