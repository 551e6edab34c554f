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
    /// As stored: a GGUF's quantised weights through quantised matmuls (`QLlama`); an HF
    /// checkpoint's bf16/f16 matrices read from the memory-mapped files; dense f32 (`Llama`)
    /// for kiln's own checkpoints.
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
    /// Things the caller should tell the user (an adapter forced onto another base).
    pub warnings: Vec<String>,
}

/// A PEFT LoRA adapter directory to apply, and whether to apply it even to a base other than
/// the one it was trained on (`--force`).
#[derive(Debug, Clone, Copy)]
pub struct AdapterChoice<'a> {
    pub dir: &'a Path,
    pub force: bool,
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
/// low-rank update runs next to the base weights (quantised ones included). An adapter kiln
/// trained on another base with the same shapes is refused unless forced.
pub fn load_model_with_adapter(
    path: &Path,
    weights: Weights,
    adapter: Option<AdapterChoice>,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let (mut model, config, format, mut desc) = build_llama(path, weights, device)?;
    let mut warnings = Vec::new();
    if let Some(AdapterChoice { dir, force }) = adapter {
        let a = crate::load_adapter(dir, &config, device)?;
        warnings.extend(a.check_base(path, &model.norm_fingerprint()?, force)?);
        model.attach_lora(&a.params, &a.spec)?;
        // Inference only: the base's stacked projections stay, the adapter adds to them.
        model.fuse_for_decoding();
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
        warnings,
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
        // An HF checkpoint as stored: bf16/f16 matrices stay in the mapped shards.
        (Weights::Native, ModelFormat::HfDir) => {
            let config = kiln_model::hf::HfConfig::load(path)?.to_model_config(path)?;
            let hf = kiln_model::hf::HfWeights::open(path, &config)?;
            let m = Llama::from_hf_mapped(&config, &hf)?;
            let desc = format!("{:?} (memory-mapped)", m.weight_types());
            Ok((m, config, format, desc))
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

/// Sampling settings a model ships with (an HF directory's `generation_config.json`: its
/// `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, and `do_sample: false` as
/// greedy), for whatever the user leaves unset. Empty for GGUF files and kiln runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

/// The [`GenerationDefaults`] of the model at `path` (none when it has no
/// `generation_config.json`, or one that is not JSON).
pub fn generation_defaults(path: &Path) -> GenerationDefaults {
    let file = path.join("generation_config.json");
    let Some(v) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    else {
        return GenerationDefaults::default();
    };
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let greedy = v.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false);
    GenerationDefaults {
        temperature: if greedy {
            Some(0.0)
        } else {
            num("temperature")
        },
        top_p: num("top_p").filter(|p| *p > 0.0 && *p <= 1.0),
        top_k: v
            .get("top_k")
            .and_then(serde_json::Value::as_u64)
            .map(|k| k as usize),
        min_p: num("min_p").filter(|p| (0.0..=1.0).contains(p)),
        repetition_penalty: num("repetition_penalty").filter(|r| *r > 0.0),
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
    /// The sampling settings the model ships with.
    pub generation: GenerationDefaults,
    /// See [`LoadedModel::warnings`].
    pub warnings: Vec<String>,
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
    adapter: Option<AdapterChoice>,
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
        generation: generation_defaults(path),
        warnings: m.warnings,
    })
}

#[cfg(test)]
mod generation_tests {
    use super::*;

    #[test]
    fn generation_config_gives_the_sampling_defaults() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(generation_defaults(d.path()), GenerationDefaults::default());
        // Qwen2.5-Instruct's generation_config.json.
        std::fs::write(
            d.path().join("generation_config.json"),
            r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [151645, 151643]}"#,
        )
        .unwrap();
        assert_eq!(
            generation_defaults(d.path()),
            GenerationDefaults {
                temperature: Some(0.7),
                top_p: Some(0.8),
                top_k: Some(20),
                min_p: None,
                repetition_penalty: Some(1.05),
            }
        );
        // do_sample false is greedy, whatever the temperature says.
        std::fs::write(
            d.path().join("generation_config.json"),
            r#"{"do_sample": false, "temperature": 0.6}"#,
        )
        .unwrap();
        assert_eq!(generation_defaults(d.path()).temperature, Some(0.0));
    }
}
