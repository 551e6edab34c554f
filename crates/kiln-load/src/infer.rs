//! Inference models: the one place that chooses between the dense model (`Llama`) and the
//! quantised one (`QLlama`).

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use kiln_data::ModelTokenizer;
use kiln_model::gguf::GgufFile;
use kiln_model::{CausalLm, Llama, ModelConfig, QLlama};

use crate::{check_vocab, load_tokenizer, load_weights, LoadError, ModelFormat};

/// Which weights an inference model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weights {
    /// As stored: a GGUF's quantised weights through quantised matmuls (`QLlama`); dense f32
    /// (`Llama`) for every other format.
    #[default]
    Native,
    /// Dense f32 (`Llama`, the training model); a GGUF is dequantised.
    Dense,
    /// The dense weights requantised to this GGML type (`QLlama`); matrices whose rows are not
    /// whole blocks stay f32.
    Quantized(GgmlDType),
}

impl Weights {
    /// `native`, `f32` (or `dense`), or a GGML type name (`q8_0`, `q4_0`, `f16`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "native" => Some(Weights::Native),
            "f32" | "dense" => Some(Weights::Dense),
            other => kiln_model::gguf::parse_dtype(other).map(Weights::Quantized),
        }
    }

    /// `Native` for a GGUF kept quantised, `Dense` when dequantising is asked for.
    pub fn native_or_dense(dequantize: bool) -> Self {
        if dequantize {
            Weights::Dense
        } else {
            Weights::Native
        }
    }
}

/// A model ready to decode, with what it was built from.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm + Send + Sync>,
    pub config: ModelConfig,
    pub format: ModelFormat,
    /// The weights it runs on, for logs: `f32`, or the GGML types of the projections with
    /// their counts and whether they are the file's own (`quantised`) or `requantised`.
    pub weights: String,
}

/// Builds the inference model behind `path` with the weights asked for.
pub fn load_model(
    path: &Path,
    weights: Weights,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    load_model_with_adapter(path, weights, None, device)
}

/// [`load_model`] with a PEFT LoRA adapter directory applied without merging: the adapter's
/// low-rank update runs next to the base weights (quantised ones included).
pub fn load_model_with_adapter(
    path: &Path,
    weights: Weights,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let (mut model, config, format, mut desc) = build_llama(path, weights, device)?;
    if let Some(dir) = adapter {
        let a = crate::load_adapter(dir, &config, device)?;
        model.attach_lora(&a.params, &a.spec)?;
        desc.push_str(&format!(
            " + LoRA r={} on {} from {}",
            a.spec.rank,
            a.spec.targets.join(","),
            dir.display()
        ));
    }
    Ok(LoadedModel {
        model: Box::new(model),
        config,
        format,
        weights: desc,
    })
}

/// The decoder itself (rather than [`LoadedModel`]'s `dyn CausalLm`), for whole-sequence
/// logits: the model, its config and the description of its weights.
pub fn load_llama(
    path: &Path,
    weights: Weights,
    device: &Device,
) -> Result<(Llama, ModelConfig, String), LoadError> {
    let (model, config, _, desc) = build_llama(path, weights, device)?;
    Ok((model, config, desc))
}

fn build_llama(
    path: &Path,
    weights: Weights,
    device: &Device,
) -> Result<(Llama, ModelConfig, ModelFormat, String), LoadError> {
    let format = ModelFormat::detect(path)?;
    match (weights, format) {
        (Weights::Native, ModelFormat::Gguf) => {
            let file = GgufFile::open(path)?;
            let config = file.config()?;
            let q = QLlama::from_gguf(&file, &config)?;
            let desc = format!("{:?} (quantised)", q.weight_types());
            Ok((q, config, format, desc))
        }
        (Weights::Native | Weights::Dense, _) => {
            let w = load_weights(path, device)?;
            let m = Llama::new(&w.config, &w.params)?;
            Ok((m, w.config, format, "f32".into()))
        }
        // Quantise on load: HF and GGUF weights are read and quantised one tensor at a time,
        // so peak memory is the quantised model plus one f32 tensor.
        (Weights::Quantized(dtype), ModelFormat::HfDir) => {
            let config = kiln_model::hf::HfConfig::load(path)?.to_model_config(path)?;
            let hf = kiln_model::hf::HfWeights::open(path, &config)?;
            let q = QLlama::quantize_on_load(&config, dtype, |name| hf.tensor(name, device))?;
            let desc = format!("{:?} (quantised on load)", q.weight_types());
            Ok((q, config, format, desc))
        }
        (Weights::Quantized(dtype), ModelFormat::Gguf) => {
            let file = GgufFile::open(path)?;
            let config = file.config()?;
            file.check_tensors(&config)?;
            let q = QLlama::quantize_on_load(&config, dtype, |name| {
                Ok(file
                    .qtensor(&config, name)?
                    .dequantize(&Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?)
            })?;
            let desc = format!("{:?} (requantised on load)", q.weight_types());
            Ok((q, config, format, desc))
        }
        (Weights::Quantized(dtype), _) => {
            let w = load_weights(path, device)?;
            let q = QLlama::from_params(&w.config, &w.params, dtype)?;
            let desc = format!("{:?} (requantised)", q.weight_types());
            Ok((q, w.config, format, desc))
        }
    }
}

/// A model and its tokenizer, for generation and chat.
pub struct InferenceModel {
    pub model: Box<dyn CausalLm + Send + Sync>,
    pub tokenizer: ModelTokenizer,
    pub config: ModelConfig,
    pub format: ModelFormat,
    /// See [`LoadedModel::weights`].
    pub weights: String,
}

/// [`load_model`] plus [`load_tokenizer`], checking that every token id has an embedding.
/// The tokenizer is read first, so a model without one fails before its weights are read.
pub fn load_inference(
    path: &Path,
    weights: Weights,
    device: &Device,
) -> Result<InferenceModel, LoadError> {
    load_inference_with_adapter(path, weights, None, device)
}

/// [`load_inference`] with an optional PEFT LoRA adapter applied without merging.
pub fn load_inference_with_adapter(
    path: &Path,
    weights: Weights,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<InferenceModel, LoadError> {
    let tokenizer = load_tokenizer(path)?;
    let m = load_model_with_adapter(path, weights, adapter, device)?;
    check_vocab(&tokenizer, &m.config)?;
    Ok(InferenceModel {
        model: m.model,
        tokenizer,
        config: m.config,
        format: m.format,
        weights: m.weights,
    })
}
