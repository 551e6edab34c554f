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

/// Where a `--model PATH` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A kiln run, checkpoint or `model.safetensors` next to a `config.toml`.
    Kiln,
    /// A Hugging Face directory (`config.json` + safetensors).
    HfDir,
    /// A GGUF file.
    Gguf,
}

impl ModelFormat {
    pub fn detect(path: &Path) -> Self {
        if kiln_model::gguf::is_gguf(path) {
            ModelFormat::Gguf
        } else if kiln_model::hf::is_hf_dir(path) {
            ModelFormat::HfDir
        } else {
            ModelFormat::Kiln
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelFormat::Kiln => "kiln",
            ModelFormat::HfDir => "hf",
            ModelFormat::Gguf => "gguf",
        }
    }
}

/// Dense (f32, dequantised) weights of any supported model.
pub struct LoadedWeights {
    pub format: ModelFormat,
    pub config: ModelConfig,
    pub params: kiln_model::Params,
    /// The run's full config, when the model comes from a kiln run.
    pub run_config: Option<RunConfig>,
    /// The weights file or directory actually read.
    pub weights: PathBuf,
}

/// Loads the weights behind `path` (kiln run/checkpoint, HF directory or GGUF file),
/// dequantised to f32: what training and evaluation use.
pub fn load_weights(
    path: &Path,
    device: &candle_core::Device,
) -> Result<LoadedWeights, TrainError> {
    match ModelFormat::detect(path) {
        ModelFormat::Gguf => {
            let file = kiln_model::gguf::GgufFile::open(path)?;
            let config = file.config()?;
            let params = file.load_params(&config, device)?;
            Ok(LoadedWeights {
                format: ModelFormat::Gguf,
                config,
                params,
                run_config: None,
                weights: path.to_path_buf(),
            })
        }
        ModelFormat::HfDir => {
            let (config, params) = kiln_model::hf::load_hf_dir(path, device)?;
            Ok(LoadedWeights {
                format: ModelFormat::HfDir,
                config,
                params,
                run_config: None,
                weights: path.to_path_buf(),
            })
        }
        ModelFormat::Kiln => {
            let r = resolve_model(path)?;
            let params = kiln_model::Params::load(&r.weights, &r.config, device)?;
            Ok(LoadedWeights {
                format: ModelFormat::Kiln,
                config: r.config,
                params,
                run_config: r.run_config,
                weights: r.weights,
            })
        }
    }
}

/// The tokenizer (with BOS/EOS, chat template and stop tokens) of any supported model. Reads
/// only tokenizer files: a GGUF's header, an HF directory's tokenizer files, a run's
/// `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<kiln_data::ModelTokenizer, TrainError> {
    match ModelFormat::detect(path) {
        ModelFormat::Gguf | ModelFormat::HfDir => Ok(kiln_data::ModelTokenizer::load(path)?),
        ModelFormat::Kiln => {
            // A tokenizer file (tokenizer.json, or any *.json that is not a weights file).
            if path.is_file() && path.extension().is_some_and(|e| e == "json") {
                return Ok(kiln_data::ModelTokenizer::from_tokenizer_json(path)?);
            }
            if path.is_dir() && path.join("tokenizer.json").is_file() {
                return Ok(kiln_data::ModelTokenizer::load(path)?);
            }
            let r = resolve_model(path)?;
            let tok = r.tokenizer.ok_or_else(|| {
                TrainError::Config(format!("no tokenizer.json found for {}", path.display()))
            })?;
            Ok(kiln_data::ModelTokenizer::from_tokenizer_json(&tok)?)
        }
    }
}

/// Checks that weights with config `from` can start a run whose `[model]` is `to`: every field
/// that shapes the weights or the math must agree; the context may be shorter and dropout and
/// init may differ. The error lists the fields that do not agree.
pub fn check_init_compatible(
    from: &ModelConfig,
    to: &ModelConfig,
    src: &Path,
) -> Result<(), TrainError> {
    let (a, b) = (from.resolved(), to.resolved());
    let mut diffs = Vec::new();
    macro_rules! cmp {
        ($($f:ident),*) => {$(
            if a.$f != b.$f {
                diffs.push(format!("{} = {:?} (weights) vs {:?} (run)", stringify!($f), a.$f, b.$f));
            }
        )*};
    }
    cmp!(
        vocab_size,
        dim,
        n_layers,
        n_heads,
        n_kv_heads,
        ffn_dim,
        rope_theta,
        norm_eps,
        tie_embeddings,
        attention,
        rope_scaling
    );
    if a.head_dim() != b.head_dim() {
        diffs.push(format!(
            "head_dim = {} (weights) vs {} (run)",
            a.head_dim(),
            b.head_dim()
        ));
    }
    if b.max_seq_len > a.max_seq_len {
        diffs.push(format!(
            "max_seq_len = {} (weights) is shorter than {} (run)",
            a.max_seq_len, b.max_seq_len
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Config(format!(
            "train.init_from {}: its model config differs from [model] of this run: {}",
            src.display(),
            diffs.join("; ")
        )))
    }
}
