//! Building a model to train: the weights loaded as the objective needs them, with fresh LoRA
//! adapters when it trains adapters only.

use std::path::Path;

use candle_core::{DType, Device};
use kiln_model::gguf::GgufFile;
use kiln_model::{Llama, LoraSpec, ModelConfig, Params};

use crate::{AdapterBase, LoadError, ModelFormat};

/// A model set up to train: the model, the parameters that train, how it trains (for the log),
/// its total parameter count (the base's and the adapters') and the base it starts from (what
/// every adapter it writes records).
pub struct Trainable {
    pub model: Llama,
    pub params: Params,
    pub mode: String,
    pub total_params: usize,
    pub base: AdapterBase,
}

/// The model to fine-tune and the parameters that train (SFT, reward models, preference
/// tuning): without `lora` every weight trains (dense f32); with it, fresh PEFT-initialised
/// adapters train on a frozen base: an HF checkpoint as stored (bf16/f16 memory-mapped), a GGUF
/// kept in its quantised blocks (`base_quantized`), else dense f32.
pub fn build_trainable(
    path: &Path,
    cfg: &ModelConfig,
    lora: Option<&LoraSpec>,
    base_quantized: bool,
    seed: u64,
    device: &Device,
) -> Result<Trainable, LoadError> {
    let total = cfg.param_counts().0;
    match lora {
        None => {
            let w = crate::load_weights(path, device)?;
            let model = Llama::new(&w.config, &w.params)?;
            Ok(Trainable {
                base: base_of(path, &model)?,
                model,
                params: w.params,
                mode: "full fine-tuning (f32)".into(),
                total_params: total,
            })
        }
        Some(spec) => {
            let adapters = Params::lora_adapters(cfg, spec, seed, device, DType::F32)?;
            let (mut model, base) = if base_quantized {
                let file = GgufFile::open(path)?;
                let m = Llama::from_gguf(&file, cfg)?;
                let desc = format!("{:?}", m.weight_types());
                (m, format!("quantised base kept in its GGUF blocks {desc}"))
            } else if ModelFormat::detect(path)? == ModelFormat::HfDir {
                // A frozen HF base stays as stored: bf16/f16 matrices are read from the mapped
                // shards, forward and backward (which needs only the input gradient here).
                let hf = kiln_model::hf::HfWeights::open(path, cfg)?;
                let m = Llama::from_hf_mapped(cfg, &hf)?;
                let desc = format!("{:?}", m.weight_types());
                (m, format!("frozen base as stored, memory-mapped {desc}"))
            } else {
                let w = crate::load_weights(path, device)?;
                (Llama::new(&w.config, &w.params)?, "dense f32 base".into())
            };
            model.attach_lora(&adapters, spec)?;
            let mode = format!(
                "LoRA r={} alpha={} ({}) on {}, {}",
                spec.rank,
                spec.alpha,
                if spec.rslora {
                    "rsLoRA scale"
                } else {
                    "scale alpha/r"
                },
                spec.targets.join(","),
                base
            );
            let n = adapters.num_elements();
            Ok(Trainable {
                base: base_of(path, &model)?,
                model,
                params: adapters,
                mode,
                total_params: total + n,
            })
        }
    }
}

fn base_of(path: &Path, model: &Llama) -> Result<AdapterBase, LoadError> {
    Ok(AdapterBase {
        base_model: path.display().to_string(),
        norm_fingerprint: model.norm_fingerprint()?,
    })
}
