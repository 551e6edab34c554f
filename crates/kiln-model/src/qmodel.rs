//! Inference with quantised weights: the same decoder as [`Llama::forward_decode`] (same
//! kernels, same KV cache), with each projection a [`QLinear`] that keeps GGUF blocks as they
//! are and multiplies against them directly (Q4_0, Q4_1, Q8_0 and F16 with kiln's kernels,
//! which compute exactly what the dequantised model computes; other types through candle).
//! Q, K and V, and gate and up, are fused into one matmul each. Norms stay f32. Training
//! never sees this model: the training paths load dequantised [`Params`].
//!
//! [`CausalLm`] is what the generate loop needs, implemented by both models.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use kiln_kernels as k;

use crate::gguf::GgufFile;
use crate::qkernels::{RawKind, RawQ};
use crate::{KvCache, Llama, ModelConfig, ModelError, Params};

/// A model that can decode with a KV cache.
pub trait CausalLm {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// Feeds `tokens (b, t)` after the cached ones and returns the last position's logits
    /// `(b, v)`.
    fn forward_decode(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError>;
}

impl CausalLm for Llama {
    fn config(&self) -> &ModelConfig {
        Llama::config(self)
    }
    fn device(&self) -> &Device {
        Llama::device(self)
    }
    fn forward_decode(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        Llama::forward_decode(self, tokens, cache)
    }
}

/// A projection `x W^T` with `W (out, in)` dense, as GGML blocks with a kernel of kiln's
/// ([`crate::qkernels`]: Q4_0, Q4_1, Q8_0, F16), or as another GGML type through candle's
/// quantised matmul (which rounds the activations to 8 bits).
#[derive(Clone)]
pub enum QLinear {
    Dense(Tensor),
    Raw(Arc<RawQ>),
    Quant(Arc<QTensor>),
}

/// `KILN_QMATMUL=candle` sends every quantised matmul through candle (llama.cpp-style 8-bit
/// activations), for comparisons.
fn use_candle_qmatmul() -> bool {
    static C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *C.get_or_init(|| std::env::var("KILN_QMATMUL").as_deref() == Ok("candle"))
}

fn raw_kind(d: GgmlDType) -> Option<RawKind> {
    match d {
        GgmlDType::Q4_0 => Some(RawKind::Q4_0),
        GgmlDType::Q4_1 => Some(RawKind::Q4_1),
        GgmlDType::Q8_0 => Some(RawKind::Q8_0),
        GgmlDType::F16 => Some(RawKind::F16),
        _ => None,
    }
}

impl QLinear {
    /// Wraps a GGML tensor `(out, in)`: F32/BF16 become dense f32; types with a kiln kernel
    /// keep their blocks; the rest go through candle.
    pub fn new(q: QTensor) -> Result<Self, ModelError> {
        let (n, k) = q.shape().dims2()?;
        if let (Some(kind), false) = (raw_kind(q.dtype()), use_candle_qmatmul()) {
            if let Some(r) = RawQ::new(kind, n, k, q.data()?.into_owned()) {
                return Ok(QLinear::Raw(Arc::new(r)));
            }
        }
        Ok(match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                QLinear::Dense(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
            }
            _ => QLinear::Quant(Arc::new(q)),
        })
    }

    /// The GGML type of the weights (F32 for dense ones).
    pub fn dtype(&self) -> GgmlDType {
        match self {
            QLinear::Dense(_) => GgmlDType::F32,
            QLinear::Raw(r) => match r.kind {
                RawKind::Q4_0 => GgmlDType::Q4_0,
                RawKind::Q4_1 => GgmlDType::Q4_1,
                RawKind::Q8_0 => GgmlDType::Q8_0,
                RawKind::F16 => GgmlDType::F16,
            },
            QLinear::Quant(q) => q.dtype(),
        }
    }

    /// Several projections of the same input as one matrix (rows stacked), when they are
    /// all kiln-kernel blocks of one type.
    fn fuse(parts: &[&QLinear]) -> Option<QLinear> {
        let raws: Option<Vec<&RawQ>> = parts
            .iter()
            .map(|p| match p {
                QLinear::Raw(r) => Some(r.as_ref()),
                _ => None,
            })
            .collect();
        RawQ::concat_rows(&raws?).map(|r| QLinear::Raw(Arc::new(r)))
    }

    /// `x (n, in)` f32 → `(n, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            QLinear::Dense(w) => Ok(x.matmul(&w.t()?)?),
            QLinear::Raw(r) => {
                let (m, k) = x.dims2()?;
                let xs = x
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                debug_assert_eq!(k, r.k);
                Ok(Tensor::from_vec(r.matmul(&xs, m), (m, r.n), x.device())?)
            }
            QLinear::Quant(q) => Ok(QMatMul::QTensor(q.clone()).forward(x)?),
        }
    }

    /// Dequantised weights `(out, in)` f32.
    pub fn dequantize(&self) -> Result<Tensor, ModelError> {
        Ok(match self {
            QLinear::Dense(w) => w.clone(),
            QLinear::Raw(r) => Tensor::from_vec(r.dequantize(), (r.n, r.k), &Device::Cpu)?,
            QLinear::Quant(q) => q.dequantize(&Device::Cpu)?,
        })
    }
}

struct QBlock {
    attention_norm: Tensor,
    wq: QLinear,
    wk: QLinear,
    wv: QLinear,
    /// Q, K and V stacked, when they fuse.
    wqkv: Option<QLinear>,
    wo: QLinear,
    ffn_norm: Tensor,
    w1: QLinear,
    w3: QLinear,
    /// Gate and up stacked, when they fuse.
    w13: Option<QLinear>,
    w2: QLinear,
}

/// The embedding table: quantised rows are dequantised on lookup.
enum Embedding {
    Dense(Tensor),
    Raw(Arc<RawQ>),
    Quant(Arc<QTensor>),
}

/// A decoder over quantised weights (inference only).
pub struct QLlama {
    cfg: ModelConfig,
    embedding: Embedding,
    layers: Vec<QBlock>,
    norm: Tensor,
    output: QLinear,
    rope_cos: Tensor,
    rope_sin: Tensor,
    device: Device,
    /// The single-token path's weights, when every projection has a kiln kernel.
    fast: Option<FastWeights>,
}

/// Plain-vector views for [`QLlama::decode_one`]: norms, fused projections, RoPE tables.
struct FastWeights {
    layers: Vec<FastLayer>,
    norm: Vec<f32>,
    output: Arc<RawQ>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

struct FastLayer {
    attention_norm: Vec<f32>,
    wqkv: Arc<RawQ>,
    wo: Arc<RawQ>,
    ffn_norm: Vec<f32>,
    w13: Arc<RawQ>,
    w2: Arc<RawQ>,
}

fn raw_of(l: &QLinear) -> Option<Arc<RawQ>> {
    match l {
        QLinear::Raw(r) => Some(r.clone()),
        _ => None,
    }
}

/// `sum(a * b)` with independent partial sums, so it vectorises.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// RMSNorm of one row, as kiln's fused kernel computes it.
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let rinv = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    x.iter().zip(w).map(|(x, w)| x * rinv * w).collect()
}

/// Half-split RoPE on `n` heads of `hd` values at one position.
fn rope_row(x: &mut [f32], n: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for h in 0..n {
        let v = &mut x[h * hd..(h + 1) * hd];
        for i in 0..half {
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

impl QLlama {
    /// Builds the model over a GGUF's tensors as stored (Q/K rows un-permuted).
    pub fn from_gguf(file: &GgufFile, cfg: &ModelConfig) -> Result<Self, ModelError> {
        file.check_tensors(cfg)?;
        Self::build(cfg, |name| file.qtensor(cfg, name))
    }

    /// Quantises dense weights to `dtype` (matrices whose rows are not whole blocks stay
    /// f32). `F32` gives a dense model running through the same code.
    pub fn from_params(
        cfg: &ModelConfig,
        params: &Params,
        dtype: GgmlDType,
    ) -> Result<Self, ModelError> {
        Self::build(cfg, |name| {
            let t = params.tensor(name)?.to_dtype(DType::F32)?;
            let d = if t.rank() == 2 && t.dim(1)? % dtype.block_size() == 0 {
                dtype
            } else {
                GgmlDType::F32
            };
            Ok(QTensor::quantize(&t, d)?)
        })
    }

    fn build(
        cfg: &ModelConfig,
        mut get: impl FnMut(&str) -> Result<QTensor, ModelError>,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let device = Device::Cpu;
        let mut dense = |name: &str| -> Result<Tensor, ModelError> {
            Ok(get(name)?.dequantize(&device)?.to_dtype(DType::F32)?)
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let mut norms = Vec::new();
        for i in 0..cfg.n_layers {
            norms.push((
                dense(&format!("layers.{i}.attention_norm.weight"))?,
                dense(&format!("layers.{i}.ffn_norm.weight"))?,
            ));
        }
        let norm = dense("norm.weight")?;
        for (i, (attention_norm, ffn_norm)) in norms.into_iter().enumerate() {
            let mut l = |s: &str| QLinear::new(get(&format!("layers.{i}.{s}"))?);
            let (wq, wk, wv) = (
                l("attention.wq.weight")?,
                l("attention.wk.weight")?,
                l("attention.wv.weight")?,
            );
            let wo = l("attention.wo.weight")?;
            let (w1, w3) = (l("feed_forward.w1.weight")?, l("feed_forward.w3.weight")?);
            layers.push(QBlock {
                attention_norm,
                wqkv: QLinear::fuse(&[&wq, &wk, &wv]),
                wq,
                wk,
                wv,
                wo,
                ffn_norm,
                w13: QLinear::fuse(&[&w1, &w3]),
                w1,
                w3,
                w2: l("feed_forward.w2.weight")?,
            });
        }
        let embedding = match QLinear::new(get("tok_embeddings.weight")?)? {
            QLinear::Dense(t) => Embedding::Dense(t),
            QLinear::Raw(r) => Embedding::Raw(r),
            QLinear::Quant(q) => Embedding::Quant(q),
        };
        let output = if cfg.tie_embeddings {
            match &embedding {
                Embedding::Dense(t) => QLinear::Dense(t.clone()),
                Embedding::Raw(r) => QLinear::Raw(r.clone()),
                Embedding::Quant(q) => QLinear::Quant(q.clone()),
            }
        } else {
            QLinear::new(get("output.weight")?)?
        };
        let (rope_cos, rope_sin) = crate::rope::tables(cfg, &device, DType::F32)?;
        let vec =
            |t: &Tensor| -> Result<Vec<f32>, ModelError> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let fast = (|| -> Result<Option<FastWeights>, ModelError> {
            let mut fl = Vec::new();
            for b in &layers {
                let (Some(wqkv), Some(wo), Some(w13), Some(w2)) = (
                    b.wqkv.as_ref().and_then(raw_of),
                    raw_of(&b.wo),
                    b.w13.as_ref().and_then(raw_of),
                    raw_of(&b.w2),
                ) else {
                    return Ok(None);
                };
                fl.push(FastLayer {
                    attention_norm: vec(&b.attention_norm)?,
                    wqkv,
                    wo,
                    ffn_norm: vec(&b.ffn_norm)?,
                    w13,
                    w2,
                });
            }
            let Some(output) = raw_of(&output) else {
                return Ok(None);
            };
            Ok(Some(FastWeights {
                layers: fl,
                norm: vec(&norm)?,
                output,
                cos: vec(&rope_cos)?,
                sin: vec(&rope_sin)?,
            }))
        })()?;
        Ok(Self {
            cfg: cfg.clone(),
            embedding,
            layers,
            norm,
            output,
            rope_cos,
            rope_sin,
            device,
            fast,
        })
    }

    /// GGML types of the projections, for logs: e.g. `{"Q4_1": 210, "Q8_0": 1}`.
    pub fn weight_types(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut m = std::collections::BTreeMap::new();
        let mut add = |l: &QLinear| *m.entry(crate::gguf::dtype_name(l.dtype())).or_insert(0) += 1;
        for b in &self.layers {
            for l in [&b.wq, &b.wk, &b.wv, &b.wo, &b.w1, &b.w3, &b.w2] {
                add(l);
            }
        }
        add(&self.output);
        m
    }

    /// One token of one sequence on plain vectors: the same math as the tensor path
    /// (kiln's kernels for every projection), without a tensor op per step. Decoding is
    /// memory-bound on the weights, and at ~1,000 small ops per token the per-op overhead
    /// would otherwise be a third of the time.
    fn decode_one(
        &self,
        fw: &FastWeights,
        id: u32,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let (d, h, hkv, hd) = (cfg.dim, cfg.n_heads, cfg.n_kv_heads(), cfg.head_dim());
        if id as usize >= cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {id} is out of range for vocab_size {} (tokenizer/model mismatch?)",
                cfg.vocab_size
            )));
        }
        let (pos, half, group) = (cache.len(), hd / 2, h / hkv);
        let eps = cfg.norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut x = match &self.embedding {
            Embedding::Raw(r) => {
                let mut x = vec![0f32; d];
                r.dequantize_row(id as usize, &mut x);
                x
            }
            Embedding::Dense(t) => t.get(id as usize)?.to_vec1::<f32>()?,
            Embedding::Quant(q) => q
                .embedding(&Tensor::new(&[id], &self.device)?)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        };
        let cos = &fw.cos[pos * half..(pos + 1) * half];
        let sin = &fw.sin[pos * half..(pos + 1) * half];
        let n_layers = cfg.n_layers;
        for (l, b) in fw.layers.iter().enumerate() {
            let xn = rms_norm_row(&x, &b.attention_norm, eps);
            let mut qkv = b.wqkv.matmul(&xn, 1);
            let (q, kv) = qkv.split_at_mut(h * hd);
            let (k, v) = kv.split_at_mut(hkv * hd);
            rope_row(q, h, hd, cos, sin);
            rope_row(k, hkv, hd, cos, sin);
            let raw = cache.raw_layer(n_layers, l, hkv);
            for g in 0..hkv {
                raw.k[g].extend_from_slice(&k[g * hd..(g + 1) * hd]);
                raw.v[g].extend_from_slice(&v[g * hd..(g + 1) * hd]);
            }
            let raw = &*raw;
            let t_all = raw.k[0].len() / hd;
            let mut att = vec![0f32; h * hd];
            let head = |hh: usize, out: &mut [f32]| {
                let (kc, vc) = (&raw.k[hh / group], &raw.v[hh / group]);
                let qh = &q[hh * hd..(hh + 1) * hd];
                let mut p: Vec<f32> = (0..t_all)
                    .map(|t| dot(qh, &kc[t * hd..(t + 1) * hd]) * scale)
                    .collect();
                let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0f32;
                for s in p.iter_mut() {
                    *s = (*s - m).exp();
                    z += *s;
                }
                for (t, s) in p.iter().enumerate() {
                    let w = s / z;
                    for (o, v) in out.iter_mut().zip(&vc[t * hd..(t + 1) * hd]) {
                        *o += w * v;
                    }
                }
            };
            if t_all * h * hd >= 1 << 16 {
                use rayon::prelude::*;
                att.par_chunks_mut(hd)
                    .enumerate()
                    .for_each(|(hh, out)| head(hh, out));
            } else {
                for (hh, out) in att.chunks_mut(hd).enumerate() {
                    head(hh, out);
                }
            }
            for (x, o) in x.iter_mut().zip(b.wo.matmul(&att, 1)) {
                *x += o;
            }
            let xn = rms_norm_row(&x, &b.ffn_norm, eps);
            let gu = b.w13.matmul(&xn, 1);
            let f = gu.len() / 2;
            let act: Vec<f32> = gu[..f]
                .iter()
                .zip(&gu[f..])
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (x, o) in x.iter_mut().zip(b.w2.matmul(&act, 1)) {
                *x += o;
            }
        }
        cache.advance(1);
        let xn = rms_norm_row(&x, &fw.norm, eps);
        let logits = fw.output.matmul(&xn, 1);
        Ok(Tensor::from_vec(logits, (1, cfg.vocab_size), &self.device)?)
    }

    fn embed(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let ids = tokens.flatten_all()?;
        let max = ids.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max} is out of range for vocab_size {} (tokenizer/model mismatch?)",
                self.cfg.vocab_size
            )));
        }
        Ok(match &self.embedding {
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
            Embedding::Raw(r) => {
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * r.k];
                for (o, &id) in out.chunks_exact_mut(r.k).zip(&ids) {
                    r.dequantize_row(id as usize, o);
                }
                Tensor::from_vec(out, (ids.len(), r.k), &self.device)?
            }
            Embedding::Quant(q) => q.embedding(&ids)?,
        })
    }

    fn attention(
        &self,
        b: &QBlock,
        x: &Tensor,
        (bsz, t, pos): (usize, usize, usize),
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor, ModelError> {
        let (h, hkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads(), self.cfg.head_dim());
        let g = h / hkv;
        let cos = self.rope_cos.narrow(0, pos, t)?;
        let sin = self.rope_sin.narrow(0, pos, t)?;
        let (q, key, value) = match &b.wqkv {
            Some(w) => {
                let y = w.forward(x)?; // (b*t, (h + 2 hkv) hd)
                (
                    y.narrow(1, 0, h * hd)?,
                    y.narrow(1, h * hd, hkv * hd)?,
                    y.narrow(1, (h + hkv) * hd, hkv * hd)?,
                )
            }
            None => (b.wq.forward(x)?, b.wk.forward(x)?, b.wv.forward(x)?),
        };
        let heads = |y: Tensor, n: usize| -> Result<Tensor, ModelError> {
            Ok(y.contiguous()?.reshape((bsz, t, n, hd))?.transpose(1, 2)?)
        };
        let q = k::rope(&heads(q, h)?, &cos, &sin)?;
        let key = k::rope(&heads(key, hkv)?, &cos, &sin)?;
        let value = heads(value, hkv)?.contiguous()?;
        let (key, value) = if bsz == 1 {
            // The same per-head vectors the single-token path appends to.
            let n_layers = self.cfg.n_layers;
            let raw = cache.raw_layer(n_layers, layer, hkv);
            let (kv, vv) = (
                key.squeeze(0)?.contiguous()?.to_vec3::<f32>()?,
                value.squeeze(0)?.to_vec3::<f32>()?,
            );
            for g in 0..hkv {
                for i in 0..t {
                    raw.k[g].extend_from_slice(&kv[g][i]);
                    raw.v[g].extend_from_slice(&vv[g][i]);
                }
            }
            let t_all = raw.k[0].len() / hd;
            let flat = |x: &[Vec<f32>]| x.concat();
            (
                Tensor::from_vec(flat(&raw.k), (1, hkv, t_all, hd), &self.device)?,
                Tensor::from_vec(flat(&raw.v), (1, hkv, t_all, hd), &self.device)?,
            )
        } else {
            cache.append(layer, &key, &value)?
        };
        let t_all = key.dim(2)?;
        let q = q.reshape((bsz, hkv, g * t, hd))?;
        let scores = q.matmul(&key.t()?)?.reshape((bsz, h, t, t_all))?;
        let causal = self.cfg.attention == crate::AttentionMode::Causal;
        let probs = k::masked_softmax(&scores, 1.0 / (hd as f64).sqrt(), causal)?;
        let out = probs
            .reshape((bsz, hkv, g * t, t_all))?
            .matmul(&value)?
            .reshape((bsz, h, t, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((bsz * t, h * hd))?;
        b.wo.forward(&out)
    }
}

impl CausalLm for QLlama {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward_decode(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        // Run the whole pass on a rayon worker: each matmul's parallel loop then splits work
        // with the other workers directly, instead of the calling thread handing every one of
        // them to the pool and sleeping until it is done (about 120 round trips per token).
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_decode(tokens, cache));
        }
        let (bsz, t) = tokens.dims2()?;
        let pos = cache.len();
        if t == 0 {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        if let (Some(fast), 1, 1, true) = (&self.fast, bsz, t, pos < self.cfg.max_seq_len) {
            let id = tokens
                .flatten_all()?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?[0];
            return self.decode_one(fast, id, cache);
        }
        if pos + t > self.cfg.max_seq_len {
            return Err(ModelError::ContextOverflow {
                needed: pos + t,
                max_seq_len: self.cfg.max_seq_len,
            });
        }
        cache.ensure_layers(self.cfg.n_layers);
        let eps = self.cfg.norm_eps;
        let mut h = self.embed(tokens)?;
        for (i, b) in self.layers.iter().enumerate() {
            let xn = k::rms_norm(&h, &b.attention_norm, eps)?;
            let attn = self.attention(b, &xn, (bsz, t, pos), cache, i)?;
            h = (h + attn)?;
            let hn = k::rms_norm(&h, &b.ffn_norm, eps)?;
            let (gate, up) = match &b.w13 {
                Some(w) => {
                    let y = w.forward(&hn)?;
                    let f = self.cfg.ffn_dim();
                    (
                        y.narrow(1, 0, f)?.contiguous()?,
                        y.narrow(1, f, f)?.contiguous()?,
                    )
                }
                None => (b.w1.forward(&hn)?, b.w3.forward(&hn)?),
            };
            let ffn = b.w2.forward(&k::swiglu(&gate, &up)?)?;
            h = (h + ffn)?;
        }
        cache.advance(t);
        let last = h
            .reshape((bsz, t, self.cfg.dim))?
            .narrow(1, t - 1, 1)?
            .squeeze(1)?;
        let last = k::rms_norm(&last, &self.norm, eps)?;
        self.output.forward(&last)
    }
}
