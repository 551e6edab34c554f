//! Quantised inference: the same decoder ([`Llama`]), with each projection's weight kept as
//! GGUF blocks. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16 and Q4_K/Q5_K/Q6_K run through kiln's
//! kernels, which compute exactly what the dequantised model computes; the rest (Q2_K, Q3_K,
//! ...) go through candle's quantised matmul.
//! Norms stay f32. Training loads dense [`Params`] instead (or keeps a quantised base frozen
//! under LoRA).
//!
//! [`CausalLm`] is what the generate loop needs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::gguf::GgufFile;
use crate::linear::{Linear, LinearWeight};
use crate::model::Embedding;
use crate::qkernels::{RawKind, RawQ};
use crate::{KvCache, Llama, ModelConfig, ModelError, Params};

/// The quantised model is the same type; the name stays for readability at call sites.
pub type QLlama = Llama;

/// A model that can decode with a KV cache.
pub trait CausalLm {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// Feeds `tokens (b, t)` after the cached ones of rows `0..b` and returns the last
    /// position's logits `(b, v)`.
    fn forward_decode(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError>;
    /// One token for each of `rows` (`tokens[i]` goes to row `rows[i]`, at that row's own
    /// position): logits `(rows.len(), v)`. Every projection runs once over all rows.
    fn decode_step(
        &self,
        rows: &[usize],
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError>;
    /// Feeds `tokens` to row `row` alone (a ragged batch is prefilled row by row): the last
    /// position's logits `(1, v)`.
    fn prefill_row(
        &self,
        row: usize,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError>;
}

impl CausalLm for Llama {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward_decode(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        if t == 1 {
            let ids = tokens
                .flatten_all()?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?;
            let rows: Vec<usize> = (0..b).collect();
            return self.decode_step(&rows, &ids, cache);
        }
        in_pool(|| self.prefill(tokens, cache))
    }

    fn decode_step(
        &self,
        rows: &[usize],
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        in_pool(|| self.decode_rows(rows, tokens, cache))
    }

    fn prefill_row(
        &self,
        row: usize,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        // Prefill a single row through a one-row cache view: move the row out and back.
        let mut single = cache.take_row(row, self.cfg.n_layers, self.cfg.n_kv_heads());
        let x = Tensor::from_slice(tokens, (1, tokens.len()), &self.device)?;
        let out = self.forward_decode(&x, &mut single);
        cache.put_row(row, single);
        out
    }
}

/// Runs `f` on a rayon worker: each matmul's parallel loop then splits work with the other
/// workers directly, instead of the calling thread handing every one of them to the pool and
/// sleeping until it is done (about 120 round trips per token).
fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

static CANDLE_QMATMUL: AtomicBool = AtomicBool::new(false);

/// Process-wide choice for quantised matmuls: `true` sends every quantised weight through
/// candle's matmul (llama.cpp-style 8-bit activations) instead of kiln's exact kernels, for
/// comparisons. Takes effect for models built afterwards.
pub fn set_candle_qmatmul(on: bool) {
    CANDLE_QMATMUL.store(on, Ordering::Relaxed);
}

fn raw_kind(d: GgmlDType) -> Option<RawKind> {
    match d {
        GgmlDType::Q4_0 => Some(RawKind::Q4_0),
        GgmlDType::Q4_1 => Some(RawKind::Q4_1),
        GgmlDType::Q8_0 => Some(RawKind::Q8_0),
        GgmlDType::F16 => Some(RawKind::F16),
        GgmlDType::Q5_0 => Some(RawKind::Q5_0),
        GgmlDType::Q5_1 => Some(RawKind::Q5_1),
        GgmlDType::Q4K => Some(RawKind::Q4K),
        GgmlDType::Q5K => Some(RawKind::Q5K),
        GgmlDType::Q6K => Some(RawKind::Q6K),
        _ => None,
    }
}

impl LinearWeight {
    /// Wraps a GGML tensor `(out, in)`: F32/BF16 become dense f32; types with a kiln kernel
    /// keep their blocks; the rest go through candle.
    pub fn from_qtensor(q: QTensor) -> Result<Self, ModelError> {
        let (n, k) = q.shape().dims2()?;
        if let (Some(kind), false) = (raw_kind(q.dtype()), CANDLE_QMATMUL.load(Ordering::Relaxed)) {
            if let Some(r) = RawQ::new(kind, n, k, q.data()?.into_owned()) {
                return Ok(LinearWeight::Raw(Arc::new(r)));
            }
        }
        Ok(match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                LinearWeight::Dense(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
            }
            _ => LinearWeight::Quant(Arc::new(q)),
        })
    }
}

impl Llama {
    /// Builds the model over a GGUF's tensors as stored (Q/K rows un-permuted), quantised.
    pub fn from_gguf(file: &GgufFile, cfg: &ModelConfig) -> Result<Self, ModelError> {
        file.check_tensors(cfg)?;
        Self::build_quantised(cfg, |name| file.qtensor(cfg, name))
    }

    /// Quantises dense weights to `dtype` (matrices whose rows are not whole blocks stay
    /// f32). `F32` gives a dense model running through the same code.
    pub fn from_params(
        cfg: &ModelConfig,
        params: &Params,
        dtype: GgmlDType,
    ) -> Result<Self, ModelError> {
        Self::build_quantised(cfg, |name| {
            // A compact copy: candle's quantize reads the whole storage, not the view into
            // the flat parameter buffer.
            let t = params
                .tensor(name)?
                .to_dtype(DType::F32)?
                .force_contiguous()?;
            let d = if t.rank() == 2 && t.dim(1)? % dtype.block_size() == 0 {
                dtype
            } else {
                GgmlDType::F32
            };
            Ok(QTensor::quantize(&t, d)?)
        })
    }

    fn build_quantised(
        cfg: &ModelConfig,
        get: impl Fn(&str) -> Result<QTensor, ModelError>,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let device = Device::Cpu;
        let dense = |name: &str| -> Result<Tensor, ModelError> {
            Ok(get(name)?.dequantize(&device)?.to_dtype(DType::F32)?)
        };
        let embedding = match LinearWeight::from_qtensor(get("tok_embeddings.weight")?)? {
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
            Linear::new(
                "output",
                LinearWeight::from_qtensor(get("output.weight")?)?,
                false,
            )
        };
        let mut m = Self::assemble(
            cfg,
            embedding,
            dense("norm.weight")?,
            output,
            |name| LinearWeight::from_qtensor(get(&format!("{name}.weight"))?),
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
