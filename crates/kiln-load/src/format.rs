use std::path::Path;

use crate::{LoadError, CHECKPOINTS_DIR, CONFIG_FILE, STATE_FILE};

/// What a `--model PATH` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A kiln run directory (`config.toml`, `checkpoints/step-*/`): its newest checkpoint.
    KilnRun,
    /// A kiln checkpoint directory (`state.json`, `model.safetensors`, `config.toml`).
    KilnCheckpoint,
    /// A kiln weights file (e.g. `model.safetensors`, `init.safetensors`) next to a run's
    /// `config.toml`.
    KilnWeights,
    /// A Hugging Face directory (`config.json` + single or sharded safetensors).
    HfDir,
    /// A GGUF file.
    Gguf,
}

impl ModelFormat {
    /// Detects the format from the file system (a GGUF is recognised by its magic bytes).
    /// Errors when `path` does not exist or is a directory that is none of the above.
    pub fn detect(path: &Path) -> Result<Self, LoadError> {
        if !path.exists() {
            return Err(LoadError::NotFound(path.to_path_buf()));
        }
        // A `.gguf` file is GGUF even when it is empty or cut short: opening it then says so.
        let gguf_name = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if kiln_model::gguf::is_gguf(path) || (path.is_file() && gguf_name) {
            return Ok(ModelFormat::Gguf);
        }
        let hf_config = path.join(kiln_model::hf::CONFIG_JSON);
        if path.is_dir() && hf_config.is_file() {
            // The architecture first: an unsupported one is the thing to fix, not a missing file.
            // (A config that does not parse is reported when the model loads.)
            if let Ok(config) = kiln_model::hf::HfConfig::load(path) {
                config.family(path)?;
            }
            if !kiln_model::hf::is_hf_dir(path) {
                return Err(LoadError::Unrecognised {
                    path: path.to_path_buf(),
                    why: format!(
                        "an HF model directory (it has {}) without its weights: no {} or {}",
                        kiln_model::hf::CONFIG_JSON,
                        kiln_model::hf::SINGLE_WEIGHTS,
                        kiln_model::hf::WEIGHTS_INDEX
                    ),
                });
            }
            return Ok(ModelFormat::HfDir);
        }
        if !path.is_dir() {
            return Ok(ModelFormat::KilnWeights);
        }
        if path.join(STATE_FILE).is_file() {
            return Ok(ModelFormat::KilnCheckpoint);
        }
        if path.join(CONFIG_FILE).is_file() || path.join(CHECKPOINTS_DIR).is_dir() {
            return Ok(ModelFormat::KilnRun);
        }
        Err(LoadError::Unrecognised {
            path: path.to_path_buf(),
            why: format!(
                "a directory with neither config.json and safetensors weights (an HF model), \
                 {STATE_FILE} (a kiln checkpoint) nor {CONFIG_FILE} or {CHECKPOINTS_DIR}/ (a kiln run)"
            ),
        })
    }

    /// A short name for logs: `kiln-run`, `kiln-checkpoint`, `kiln-weights`, `hf`, `gguf`.
    pub fn name(self) -> &'static str {
        match self {
            ModelFormat::KilnRun => "kiln-run",
            ModelFormat::KilnCheckpoint => "kiln-checkpoint",
            ModelFormat::KilnWeights => "kiln-weights",
            ModelFormat::HfDir => "hf",
            ModelFormat::Gguf => "gguf",
        }
    }

    /// A kiln run, checkpoint or weights file (shape from a run's `config.toml`).
    pub fn is_kiln(self) -> bool {
        matches!(
            self,
            ModelFormat::KilnRun | ModelFormat::KilnCheckpoint | ModelFormat::KilnWeights
        )
    }
}
