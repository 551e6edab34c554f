//! Dense f32 weights of any supported model: what training, evaluation and export use.

use std::path::{Path, PathBuf};

use candle_core::Device;
use kiln_model::gguf::GgufFile;
use kiln_model::{ModelConfig, Params};

use crate::{resolve_kiln, KilnRun, LoadError, ModelFormat};

/// Dense (f32; a GGUF dequantised) weights with their config.
pub struct LoadedWeights {
    pub format: ModelFormat,
    pub config: ModelConfig,
    pub params: Params,
    /// The weights file or directory actually read.
    pub weights: PathBuf,
    /// The run the weights come from (kiln formats only).
    pub run: Option<KilnRun>,
}

/// The format and model config behind `path`, read from headers and config files only (no
/// weights): a GGUF's metadata, an HF `config.json`, a kiln run's `[model]`.
pub fn load_model_config(path: &Path) -> Result<(ModelFormat, ModelConfig), LoadError> {
    let format = ModelFormat::detect(path)?;
    let config = match format {
        ModelFormat::Gguf => GgufFile::open(path)?.config()?,
        ModelFormat::HfDir => kiln_model::hf::HfConfig::load(path)?.to_model_config(path)?,
        _ => resolve_kiln(path)?.config,
    };
    Ok((format, config))
}

/// Loads the weights behind `path` (kiln run/checkpoint/weights file, HF directory or GGUF
/// file), dequantised to f32.
pub fn load_weights(path: &Path, device: &Device) -> Result<LoadedWeights, LoadError> {
    let format = ModelFormat::detect(path)?;
    match format {
        ModelFormat::Gguf => {
            let file = GgufFile::open(path)?;
            let config = file.config()?;
            let params = file.load_params(&config, device)?;
            Ok(LoadedWeights {
                format,
                config,
                params,
                weights: path.to_path_buf(),
                run: None,
            })
        }
        ModelFormat::HfDir => {
            let (config, params) = kiln_model::hf::load_hf_dir(path, device)?;
            Ok(LoadedWeights {
                format,
                config,
                params,
                weights: path.to_path_buf(),
                run: None,
            })
        }
        ModelFormat::KilnRun | ModelFormat::KilnCheckpoint | ModelFormat::KilnWeights => {
            let r = resolve_kiln(path)?;
            let params = Params::load(&r.weights, &r.config, device)?;
            Ok(LoadedWeights {
                format,
                config: r.config,
                params,
                weights: r.weights,
                run: Some(r.run),
            })
        }
    }
}

/// Checks that weights with config `from` (read from `src`) can start a run whose `[model]` is
/// `to`: every field that shapes the weights or the math must agree; the context may be shorter
/// and dropout and init may differ. The error lists the fields that do not agree.
pub fn check_init_compatible(
    from: &ModelConfig,
    to: &ModelConfig,
    src: &Path,
) -> Result<(), LoadError> {
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
        Err(LoadError::Incompatible {
            path: src.to_path_buf(),
            diffs,
        })
    }
}
