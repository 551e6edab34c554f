//! Inference weights as stored: the same decoder ([`Llama`]), with each projection's weight
//! kept as GGUF blocks or as an HF checkpoint's bf16/f16 matrix in its memory-mapped file.
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16 and Q2_K ... Q6_K run through kiln's kernels
//! (`kiln_kernels::qkernels`), which compute exactly what the dequantised model computes; the
//! rest (Q8_K, IQ types, ...) go through candle's quantised matmul. Norms stay f32. Training
//! loads dense [`Params`] instead (or keeps a quantised or 16-bit base frozen under LoRA).

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::gguf::GgufFile;
use crate::hf::HfWeights;
use crate::linear::{Linear, LinearWeight};
use crate::model::Embedding;
use crate::{Llama, ModelConfig, ModelError, Params};

/// The quantised model is the same type; the name stays for readability at call sites.
pub type QLlama = Llama;

impl Llama {
    /// Builds the model over a GGUF's tensors as stored (Q/K rows un-permuted), quantised.
    pub fn from_gguf(file: &GgufFile, cfg: &ModelConfig) -> Result<Self, ModelError> {
        file.check_tensors(cfg)?;
        Self::build_from(
            cfg,
            |name| file.weight(cfg, name),
            |name| {
                Ok(file
                    .qtensor(cfg, name)?
                    .dequantize(&Device::Cpu)?
                    .to_dtype(DType::F32)?)
            },
        )
    }

    /// Builds the model over an HF checkpoint's weights where they lie: bf16/f16 matrices and
    /// the embedding are read by kiln's kernels from the memory-mapped shards, never copied to
    /// f32 (embedding rows are converted as they are gathered); norms, and f32 checkpoints,
    /// are converted to f32. Inference only: every weight is frozen.
    pub fn from_hf_mapped(cfg: &ModelConfig, hf: &HfWeights) -> Result<Self, ModelError> {
        Self::build_from(
            cfg,
            |name| hf.weight(name),
            |name| hf.tensor(name, &Device::Cpu),
        )
    }

    /// Quantises dense weights to `dtype` (matrices whose rows are not whole blocks stay
    /// f32). `F32` gives a dense model running through the same code.
    pub fn from_params(
        cfg: &ModelConfig,
        params: &Params,
        dtype: GgmlDType,
    ) -> Result<Self, ModelError> {
        Self::quantize_on_load(cfg, dtype, |name| {
            Ok(params.tensor(name)?.to_dtype(DType::F32)?)
        })
    }

    /// Quantise on load: asks `get` for each weight in f32, one at a time, and quantises it to
    /// `dtype` before asking for the next (matrices whose rows are not whole blocks stay f32),
    /// so peak memory is the quantised model plus one f32 tensor. Equal, byte for byte, to
    /// [`Llama::from_params`] on the same weights.
    pub fn quantize_on_load(
        cfg: &ModelConfig,
        dtype: GgmlDType,
        get: impl Fn(&str) -> Result<Tensor, ModelError>,
    ) -> Result<Self, ModelError> {
        Self::build_from(
            cfg,
            |name| LinearWeight::quantize(&get(name)?, dtype),
            |name| Ok(get(name)?.force_contiguous()?),
        )
    }

    /// The inference model from `weight` (matrices, as stored) and `dense` (norms, in f32).
    fn build_from(
        cfg: &ModelConfig,
        weight: impl Fn(&str) -> Result<LinearWeight, ModelError>,
        dense: impl Fn(&str) -> Result<Tensor, ModelError>,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let embedding = match weight("tok_embeddings.weight")? {
            LinearWeight::Dense(t) => Embedding::Dense(t),
            LinearWeight::Raw(r) => Embedding::Raw(r),
            LinearWeight::Quant(q) => Embedding::Quant(q),
        };
        let output = if cfg.tie_embeddings {
            let w = match &embedding {
                Embedding::Dense(t) => LinearWeight::Dense(t.clone()),
                Embedding::Raw(r) => LinearWeight::Raw(r.clone()),
                Embedding::Quant(q) => LinearWeight::Quant(q.clone()),
            };
            Linear::new("output", w, false).with_weight_grad_name("tok_embeddings.weight")
        } else {
            Linear::new("output", weight("output.weight")?, false)
        };
        let mut m = Self::assemble(
            cfg,
            embedding,
            dense("norm.weight")?,
            output,
            |name| weight(&format!("{name}.weight")),
            dense,
            Device::Cpu,
            DType::F32,
        )?;
        // Quantised weights are frozen: only adapters could train on top of them.
        m.train_base = false;
        for b in &mut m.layers {
            for l in b.projections_mut() {
                l.trainable = !matches!(l.weight, LinearWeight::Raw(_) | LinearWeight::Quant(_));
            }
        }
        Ok(m)
    }

    /// GGML types of the projections, for logs: e.g. `{"Q4_1": 210, "Q8_0": 1}`.
    pub fn weight_types(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut m = std::collections::BTreeMap::new();
        let mut add = |l: &Linear| {
            *m.entry(crate::gguf::dtype_name(l.weight.ggml_dtype()))
                .or_insert(0) += 1
        };
        for b in &self.layers {
            for l in b.projections() {
                add(l);
            }
        }
        add(&self.output);
        m
    }
}
