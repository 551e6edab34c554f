//! The LLaMA-style decoder (Touvron et al. 2023), written to read next to the paper.
//!
//! ```text
//! h_0     = E[tokens]
//! h_{l+1} = Block_l(h_l)                                   (see block.rs)
//! hidden  = RMSNorm(h_L)                                   (the trunk's output)
//! logits  = hidden · W_out^T      (W_out = E when embeddings are tied; the LM head)
//! ```
//! RoPE uses the half-split ("rotate_half") layout of HF checkpoints. Activations stay 2-D,
//! `(b*t, d)`, between the matmuls so every projection is one GEMM.
//!
//! The model is a trunk plus heads: [`Llama::forward_hidden`] returns the final hidden states
//! and what [`Llama::backward_hidden`] needs; heads (LM + cross-entropy, per-token
//! log-probabilities, a scalar reward/value head: heads.rs) each have their own backward that
//! ends in `d_hidden`. The same struct holds dense weights (training) or GGUF blocks
//! (quantised inference, quantized.rs); every projection is a [`Linear`].

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use kiln_kernels as k;

use crate::block::{Block, BlockActs, DecodeStep, Heads, Pass, PassRope, RopeAt};
use crate::linear::{Linear, LinearWeight, Lora, Precision};
use crate::rope::ModelRope;
use crate::{
    AttentionMode, FlatLayout, Grads, KvCache, ModelConfig, ModelError, Params, SplitMix64,
};
use kiln_kernels::qkernels::RawQ;

/// The embedding table: dense, or GGML rows dequantised on lookup.
#[derive(Clone)]
pub(crate) enum Embedding {
    Dense(Tensor),
    Raw(Arc<RawQ>),
    Quant(Arc<QTensor>),
}

pub struct Llama {
    pub(crate) cfg: ModelConfig,
    pub(crate) embedding: Embedding,
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: Tensor, // (d)
    /// The LM head `(v, d)`: the embedding itself when tied.
    pub(crate) output: Linear,
    /// RoPE tables `(max_seq_len, rotary_dim/2)`: global, and local for Gemma 3's sliding layers.
    pub(crate) rope: ModelRope,
    pub(crate) device: Device,
    /// Whether the base weights (norms, embedding, projections) train; false under LoRA.
    pub(crate) train_base: bool,
    /// Adapters served side by side (ids 1..=this; see [`Llama::add_served_adapter`]).
    pub(crate) served_adapters: u16,
    /// Activation checkpointing: the trunk's forward keeps only each block's input and the
    /// backward runs the block's forward again (see [`Llama::set_activation_checkpointing`]).
    pub(crate) checkpoint_blocks: bool,
}

/// Token ids of a batch, with optional per-token positions and segment ids. Packed rows hold
/// several documents: tokens attend only within their segment, and positions restart at each
/// segment start ([`TokenBatch::packed`]).
#[derive(Clone)]
pub struct TokenBatch {
    /// `(b, t)` u32.
    pub tokens: Tensor,
    /// `(b, t)` u32 RoPE positions; `0..t` for every row when absent.
    pub positions: Option<Tensor>,
    /// `(b, t)` u32 segment ids; one segment per row when absent.
    pub segment_ids: Option<Tensor>,
}

impl TokenBatch {
    pub fn new(tokens: Tensor) -> Self {
        Self {
            tokens,
            positions: None,
            segment_ids: None,
        }
    }

    /// Packed rows: `segment_ids (b, t)` u32, one id per document (ids need only differ
    /// between neighbouring documents); positions restart at 0 at each segment start.
    pub fn packed(tokens: Tensor, segment_ids: &[Vec<u32>]) -> Result<Self, ModelError> {
        let (b, t) = tokens.dims2()?;
        if segment_ids.len() != b || segment_ids.iter().any(|r| r.len() != t) {
            return Err(ModelError::Input(format!(
                "segment ids must be {b} rows of {t}, like the tokens"
            )));
        }
        let mut positions = Vec::with_capacity(b * t);
        for row in segment_ids {
            let mut p = 0u32;
            for (i, s) in row.iter().enumerate() {
                if i > 0 && *s != row[i - 1] {
                    p = 0;
                }
                positions.push(p);
                p += 1;
            }
        }
        let device = tokens.device().clone();
        let segs: Vec<u32> = segment_ids.concat();
        Ok(Self {
            tokens,
            positions: Some(Tensor::from_vec(positions, (b, t), &device)?),
            segment_ids: Some(Tensor::from_vec(segs, (b, t), &device)?),
        })
    }
}

/// Per-layer callbacks of the trunk's forward and backward
/// ([`Llama::forward_hidden_hooked`], [`Llama::backward_hidden_hooked`]): fully sharded data
/// parallelism materialises one layer's parameters at a time and reduces its gradients as soon
/// as they are complete.
pub trait LayerHooks {
    /// Called before block `layer` reads its weights, in the forward and again in the backward.
    fn before_layer(&mut self, layer: usize, backward: bool) -> Result<(), ModelError>;
    /// The buffer block `layer`'s backward adds its gradients into.
    fn layer_grads(&mut self, layer: usize) -> &mut Grads;
    /// Called when block `layer`'s gradients are complete.
    fn after_layer_backward(&mut self, layer: usize) -> Result<(), ModelError>;
    /// Called after the last block's forward, before the final norm reads its weight.
    fn before_head(&mut self) -> Result<(), ModelError> {
        Ok(())
    }
    /// Called in the backward once the final norm's gradient is in `grads` and before the
    /// first block's backward: every gradient of the head is complete (FSDP reduces them here,
    /// freeing the buffer for the blocks).
    fn before_blocks_backward(&mut self, _grads: &mut Grads) -> Result<(), ModelError> {
        Ok(())
    }
    /// The buffer the embedding's gradient goes into, when not the backward's `grads` (FSDP
    /// keeps an untied embedding and the head in separate units, with separate buffers).
    fn embedding_grads(&mut self) -> Option<&mut Grads> {
        None
    }
}

/// What the trunk's forward keeps of one block for the backward.
enum SavedBlock {
    /// Every activation the block's backward reads.
    Acts(Box<BlockActs>),
    /// Activation checkpointing: the block's input and the dropout RNG's state before it, so
    /// the backward can run the same forward again (same masks) and then its backward.
    Input { x: Tensor, rng: Option<SplitMix64> },
}

/// What the trunk's forward keeps for [`Llama::backward_hidden`].
pub struct Trunk {
    blocks: Vec<SavedBlock>,
    /// The forward's residual dropout probability (a checkpointed block's forward reruns).
    dropout_p: f64,
    ids: Tensor,
    /// The last block's output, before the final norm.
    last: Tensor,
    b: usize,
    t: usize,
    rope: PassRope,
    segment_ids: Option<Tensor>,
}

pub(crate) fn vec_of(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// [`Llama::norm_fingerprint`] from the norm weights themselves (final norm, then layer 0's
/// attention norm), for callers holding a model's parameters rather than the model.
pub fn norm_fingerprint<'a>(
    norms: impl IntoIterator<Item = &'a Tensor>,
) -> Result<Vec<f32>, ModelError> {
    let mut out = Vec::with_capacity(32);
    for norm in norms {
        let v = norm.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let step = v.len().div_ceil(16).max(1);
        out.extend(v.iter().step_by(step).take(16));
    }
    Ok(out)
}

impl Llama {
    /// Builds the model over the parameter tensors: views into the params' flat buffer, so the
    /// model sees every in-place update and candle's autograd reaches the flat `Var`.
    pub fn new(cfg: &ModelConfig, params: &Params) -> Result<Self, ModelError> {
        cfg.validate()?;
        params.check_against(cfg)?;
        Self::over_tensors(cfg, |name| params.tensor(name))
    }

    /// The dense model over base tensors given by name (kiln names), e.g. one `Var` per tensor
    /// for a candle-autograd reference whose gradients need no slicing of a flat buffer. Shapes
    /// are checked against `cfg`.
    pub fn over_tensors(
        cfg: &ModelConfig,
        tensor: impl Fn(&str) -> Result<Tensor, ModelError>,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        for (name, shape, _) in crate::params::layout(cfg) {
            let dims = tensor(&name)?.dims().to_vec();
            if dims != shape {
                return Err(ModelError::Weights {
                    path: "weights".into(),
                    msg: format!(
                        "tensor {name:?} has shape {dims:?} but the config needs {shape:?}"
                    ),
                });
            }
        }
        let p = |name: &str| tensor(name);
        let tok_embeddings = p("tok_embeddings.weight")?;
        let output = if cfg.tie_embeddings {
            Linear::dense("output", tok_embeddings.clone())
                .with_weight_grad_name("tok_embeddings.weight")
        } else {
            Linear::dense("output", p("output.weight")?)
        };
        let device = tok_embeddings.device().clone();
        let dtype = tok_embeddings.dtype();
        Self::assemble(
            cfg,
            Embedding::Dense(tok_embeddings),
            p("norm.weight")?,
            output,
            |name| Ok(LinearWeight::Dense(p(&format!("{name}.weight"))?)),
            |name| p(name),
            device,
            dtype,
        )
    }

    /// The base model with LoRA adapters on the projections `spec.targets`, read from
    /// `params` (see [`Params::add_lora`]). Only the adapters train: the base weights get no
    /// gradients.
    pub fn new_with_lora(
        cfg: &ModelConfig,
        params: &Params,
        spec: &LoraSpec,
    ) -> Result<Self, ModelError> {
        let mut m = Self::new(cfg, params)?;
        m.attach_lora(params, spec)?;
        Ok(m)
    }

    /// Puts LoRA adapters read from `adapters` (tensors named `<projection>.lora_A.weight` /
    /// `lora_B.weight`, e.g. [`Params::lora_adapters`]) on the projections `spec.targets` of any
    /// model (dense, or a quantised base kept in its GGUF blocks: QLoRA) and freezes the base:
    /// from now on only the adapters get gradients. Shapes are checked against the base.
    pub fn attach_lora(&mut self, adapters: &Params, spec: &LoraSpec) -> Result<(), ModelError> {
        spec.validate()?;
        self.train_base = false;
        self.output.trainable = false;
        let scale = spec.scale();
        for block in &mut self.layers {
            for l in block.projections_mut() {
                l.trainable = false;
                if !spec.applies_to(&l.name) {
                    continue;
                }
                let (a, b) = adapter_factors(l, adapters, spec)?;
                l.lora = Some(Lora {
                    a,
                    b,
                    scale,
                    dropout: spec.dropout,
                });
            }
            block.fuse();
        }
        Ok(())
    }

    /// Stacks Q|K|V and gate|up of the base weights even where an adapter is attached, for
    /// decoding with an unmerged adapter at the base's speed. Costs a copy of those weights,
    /// so training (which runs the projections apart) does not call it.
    pub fn fuse_for_decoding(&mut self) {
        for b in &mut self.layers {
            b.fuse_base();
        }
    }

    /// Adds a LoRA adapter to the ones served side by side and returns its id (1, 2, ...):
    /// rows of a decode step and prefills then pick it by id, while the base weights and any
    /// attached adapter are shared. Shapes are checked as for [`Llama::attach_lora`].
    pub fn add_served_adapter(
        &mut self,
        adapters: &Params,
        spec: &LoraSpec,
    ) -> Result<u16, ModelError> {
        spec.validate()?;
        let id = self
            .served_adapters
            .checked_add(1)
            .ok_or_else(|| ModelError::Config("too many served adapters (at most 65535)".into()))?;
        let scale = spec.scale();
        let mut added = Vec::new();
        for block in &self.layers {
            for l in block.projections() {
                if !spec.applies_to(&l.name) {
                    added.push(None);
                    continue;
                }
                let (a, b) = adapter_factors(l, adapters, spec)?;
                added.push(Some(crate::linear::ServedLora::new(&a, &b, scale)?));
            }
        }
        // Every shape is checked before any projection changes.
        let mut added = added.into_iter();
        for block in &mut self.layers {
            for l in block.projections_mut() {
                l.served
                    .push(added.next().expect("one entry per projection"));
            }
        }
        self.served_adapters = id;
        Ok(id)
    }

    /// The same model with every adapter merged into its weight (`W + s B A`, dense).
    pub fn merge_lora(&self) -> Result<Self, ModelError> {
        let mut m = self.detached();
        for b in &mut m.layers {
            for l in b.projections_mut() {
                *l = l.merged()?;
            }
            b.fuse();
        }
        Ok(m)
    }

    /// The same base without its adapters, sharing every weight (no copy): the frozen
    /// reference of preference tuning when the policy trains LoRA.
    pub fn without_lora(&self) -> Self {
        let mut m = self.detached();
        for b in &mut m.layers {
            for l in b.projections_mut() {
                l.lora = None;
            }
            b.fuse();
        }
        m.train_base = false;
        m
    }

    /// Shared by every constructor: the blocks over projections from `weight(name)` and norm
    /// vectors from `dense(name)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        cfg: &ModelConfig,
        embedding: Embedding,
        norm: Tensor,
        output: Linear,
        mut weight: impl FnMut(&str) -> Result<LinearWeight, ModelError>,
        mut dense: impl FnMut(&str) -> Result<Tensor, ModelError>,
        device: Device,
        rope_dtype: DType,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let name = |s: &str| format!("layers.{i}.{s}");
            let mut lin = |s: &str| -> Result<Linear, ModelError> {
                let n = name(s);
                Ok(Linear::new(&n, weight(&n)?, true))
            };
            let (wq, wk, wv, wo) = (
                lin("attention.wq")?,
                lin("attention.wk")?,
                lin("attention.wv")?,
                lin("attention.wo")?,
            );
            let (w1, w3, w2) = (
                lin("feed_forward.w1")?,
                lin("feed_forward.w3")?,
                lin("feed_forward.w2")?,
            );
            let (wq, wk, wv) = if cfg.qkv_bias {
                let mut bias = |l: Linear| -> Result<Linear, ModelError> {
                    let b = dense(&l.bias_name())?;
                    Ok(l.with_bias(Some(b)))
                };
                (bias(wq)?, bias(wk)?, bias(wv)?)
            } else {
                (wq, wk, wv)
            };
            let mut optional = |on: bool, s: &str| -> Result<Option<Tensor>, ModelError> {
                on.then(|| dense(&name(s))).transpose()
            };
            let q_norm = optional(cfg.qk_norm, "attention.q_norm.weight")?;
            let k_norm = optional(cfg.qk_norm, "attention.k_norm.weight")?;
            let post_attention_norm = optional(cfg.post_norms, "post_attention_norm.weight")?;
            let post_ffn_norm = optional(cfg.post_norms, "post_ffn_norm.weight")?;
            let mut block = Block {
                index: i,
                attn: cfg.layer_attention(i),
                attention_norm: dense(&name("attention_norm.weight"))?,
                wq,
                wk,
                wv,
                q_norm,
                k_norm,
                wo,
                post_attention_norm,
                ffn_norm: dense(&name("ffn_norm.weight"))?,
                w1,
                w3,
                w2,
                post_ffn_norm,
                fused: None,
            };
            block.fuse();
            layers.push(block);
        }
        Ok(Self {
            cfg: cfg.clone(),
            embedding,
            layers,
            norm,
            output,
            rope: ModelRope::new(cfg, &device, rope_dtype)?,
            device,
            train_base: true,
            served_adapters: 0,
            checkpoint_blocks: false,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// What an adapter records of the base it was trained on: 16 evenly spaced values of the
    /// final norm's weight, then 16 of layer 0's attention norm. Norm weights are kept in
    /// f32/bf16 by every format kiln reads (a GGUF stores them F32 whatever its type), so a
    /// quantised copy of a base gives the same values, while another model with the same
    /// shapes (a base and its instruction-tuned variant) does not.
    pub fn norm_fingerprint(&self) -> Result<Vec<f32>, ModelError> {
        let first = self.layers.first().map(|b| &b.attention_norm);
        norm_fingerprint(std::iter::once(&self.norm).chain(first))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters this model's hand-written backward writes gradients for: the base
    /// weights when they train (not under LoRA), and every adapter.
    pub fn trainable_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if self.train_base {
            if let Embedding::Dense(_) = &self.embedding {
                out.insert("tok_embeddings.weight".to_string());
            }
            out.insert("norm.weight".to_string());
        }
        let linears = self
            .layers
            .iter()
            .flat_map(|b| b.projections())
            .chain([&self.output]);
        for l in linears {
            if l.trainable {
                out.insert(l.weight_grad_name().to_string());
                if l.bias.is_some() {
                    out.insert(l.bias_name());
                }
            }
            if l.lora.is_some() {
                out.insert(l.lora_a_name());
                out.insert(l.lora_b_name());
            }
        }
        if self.train_base {
            for b in &self.layers {
                out.extend(b.norms().into_iter().map(|(name, _)| b.name(name)));
            }
        }
        out
    }

    /// The gradient layout of this model over `params` (the params it was built from): their
    /// trainable entries, in the params' buffer order (so a contiguous range of the gradient
    /// buffer is a contiguous range of the parameter buffer). Frozen tensors get no entry.
    pub fn grad_layout(&self, params: &Params) -> Result<FlatLayout, ModelError> {
        let names = self.trainable_names();
        if let Some(missing) = names.iter().find(|n| !params.layout().contains(n)) {
            return Err(ModelError::Input(format!(
                "the model trains {missing:?}, which these params do not hold"
            )));
        }
        Ok(params.layout().subset(|e| names.contains(&e.name)))
    }

    /// A gradient buffer for this model over `params` ([`Llama::grad_layout`]), in the params'
    /// dtype and on their device, with no gradient yet.
    pub fn grads(&self, params: &Params) -> Result<Grads, ModelError> {
        let flat = params.flat();
        Grads::new(
            Arc::new(self.grad_layout(params)?),
            flat.dtype(),
            flat.device(),
        )
    }

    /// The model over detached weight tensors: the hand-written paths must not record
    /// candle's autograd graph.
    fn detached(&self) -> Self {
        let lin = |l: &Linear| {
            let mut l = l.clone();
            if let LinearWeight::Dense(w) = &l.weight {
                l.weight = LinearWeight::Dense(w.detach());
            }
            if let Some(a) = &mut l.lora {
                a.a = a.a.detach();
                a.b = a.b.detach();
            }
            l.bias = l.bias.as_ref().map(Tensor::detach);
            l
        };
        let norm = |w: &Option<Tensor>| w.as_ref().map(Tensor::detach);
        Self {
            cfg: self.cfg.clone(),
            embedding: match &self.embedding {
                Embedding::Dense(t) => Embedding::Dense(t.detach()),
                other => other.clone(),
            },
            layers: self
                .layers
                .iter()
                .map(|b| Block {
                    index: b.index,
                    attn: b.attn,
                    attention_norm: b.attention_norm.detach(),
                    wq: lin(&b.wq),
                    wk: lin(&b.wk),
                    wv: lin(&b.wv),
                    q_norm: norm(&b.q_norm),
                    k_norm: norm(&b.k_norm),
                    wo: lin(&b.wo),
                    post_attention_norm: norm(&b.post_attention_norm),
                    ffn_norm: b.ffn_norm.detach(),
                    w1: lin(&b.w1),
                    w3: lin(&b.w3),
                    w2: lin(&b.w2),
                    post_ffn_norm: norm(&b.post_ffn_norm),
                    fused: b.fused.clone(),
                })
                .collect(),
            norm: self.norm.detach(),
            output: lin(&self.output),
            rope: self.rope.clone(),
            device: self.device.clone(),
            train_base: self.train_base,
            served_adapters: self.served_adapters,
            checkpoint_blocks: self.checkpoint_blocks,
        }
    }

    /// Activation checkpointing per block (`train.activation_checkpointing`): the trunk's
    /// forward keeps only each block's input, and the backward recomputes the block's
    /// activations just before its backward. Gradients are the same; the peak holds one
    /// block's activations instead of all of them, for about one more forward of compute.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpoint_blocks = on;
    }

    /// The arithmetic of every projection's matrix products, the LM head's included
    /// (`train.precision`; see [`Precision`]). Returns what this machine computes: f32 where
    /// the CPU has no AVX512-BF16, whatever was asked.
    pub fn set_precision(&mut self, precision: Precision) -> Precision {
        let effective = precision.effective();
        for block in &mut self.layers {
            block.for_each_linear(|l| l.set_precision(effective));
        }
        self.output.set_precision(effective);
        effective
    }

    pub(crate) fn heads(&self) -> Heads {
        Heads {
            h: self.cfg.n_heads,
            hkv: self.cfg.n_kv_heads(),
            hd: self.cfg.head_dim(),
        }
    }

    pub(crate) fn check_len(&self, pos: usize, t: usize) -> Result<(), ModelError> {
        if t == 0 {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        if pos + t > self.cfg.max_seq_len {
            return Err(ModelError::ContextOverflow {
                needed: pos + t,
                max_seq_len: self.cfg.max_seq_len,
            });
        }
        Ok(())
    }

    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<(), ModelError> {
        if let Some(&max) = ids.iter().max() {
            if max as usize >= self.cfg.vocab_size {
                return Err(ModelError::Input(format!(
                    "token id {max} is out of range for vocab_size {} (tokenizer/model mismatch?)",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// `tokens (b, t)` → `(b*t, d)`.
    pub(crate) fn embed(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let ids = tokens.flatten_all()?.to_dtype(DType::U32)?;
        let ids_v = ids.to_vec1::<u32>()?;
        self.check_ids(&ids_v)?;
        let x = match &self.embedding {
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
            Embedding::Raw(r) => {
                let mut out = vec![0f32; ids_v.len() * r.k];
                for (o, &id) in out.chunks_exact_mut(r.k).zip(&ids_v) {
                    r.dequantize_row(id as usize, o);
                }
                Tensor::from_vec(out, (ids_v.len(), r.k), &self.device)?
            }
            Embedding::Quant(q) => q.embedding(&ids)?,
        };
        match self.embedding_scale() {
            Some(s) => Ok((x * s)?),
            None => Ok(x),
        }
    }

    /// Gemma's `sqrt(dim)` on the embeddings (rounded to f32, as transformers does).
    fn embedding_scale(&self) -> Option<f64> {
        self.cfg
            .scale_embeddings
            .then(|| (self.cfg.dim as f32).sqrt() as f64)
    }

    /// Embedding rows of `ids` as plain values `(n, d)`, for the decode fast path.
    fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let d = self.cfg.dim;
        let mut x = vec![0f32; ids.len() * d];
        for (o, &id) in x.chunks_exact_mut(d).zip(ids) {
            match &self.embedding {
                Embedding::Raw(r) => r.dequantize_row(id as usize, o),
                Embedding::Dense(t) => o.copy_from_slice(&vec_of(&t.get(id as usize)?)?),
                Embedding::Quant(q) => {
                    o.copy_from_slice(&vec_of(&q.embedding(&Tensor::new(&[id], &Device::Cpu)?)?)?)
                }
            }
        }
        if let Some(s) = self.embedding_scale() {
            x.iter_mut().for_each(|v| *v *= s as f32);
        }
        Ok(x)
    }

    /// See [`crate::CausalLm::decode_step`]: one token for each of `rows`, each at its own
    /// position, through [`Block::decode_rows`]; the last position's logits `(m, v)`.
    pub(crate) fn decode_rows(
        &self,
        rows: &[usize],
        tokens: &[u32],
        adapters: Option<&[u16]>,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let m = rows.len();
        if m == 0 || tokens.len() != m {
            return Err(ModelError::Input(format!(
                "decode step: {} tokens for {m} rows (need one token per row, at least one row)",
                tokens.len()
            )));
        }
        let mut seen = rows.to_vec();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(ModelError::Input("decode step: a row appears twice".into()));
        }
        self.check_ids(tokens)?;
        cache.ensure(seen[m - 1] + 1, cfg.n_layers, cfg.n_kv_heads());
        let positions: Vec<usize> = rows.iter().map(|&r| cache.row_len(r)).collect();
        for &p in &positions {
            self.check_len(p, 1)?;
        }
        if let Some(ids) = adapters {
            if ids.len() != m {
                return Err(ModelError::Input(format!(
                    "decode step: {} adapter ids for {m} rows",
                    ids.len()
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id > self.served_adapters) {
                return Err(ModelError::Input(format!(
                    "decode step: adapter {bad} is not served (the model serves {})",
                    self.served_adapters
                )));
            }
        }
        let step = DecodeStep {
            rows,
            adapters: adapters.filter(|ids| ids.iter().any(|&id| id != 0)),
            positions: &positions,
            heads: self.heads(),
            eps: cfg.norm_eps as f32,
            scale: cfg.attention_scale() as f32,
            softcap: cfg.attn_logit_softcapping.map(|c| c as f32),
            activation: cfg.activation,
            rope: &self.rope,
        };
        let mut x = self.embed_rows(tokens)?; // (m, d)
        for block in &self.layers {
            block.decode_rows(&mut x, &step, cache)?;
        }
        for &r in rows {
            cache.advance(r, 1);
        }
        kiln_kernels::rows::with_values(&self.norm, |w| {
            kiln_kernels::rows::rms_norm_rows(&mut x, w, step.eps)
        })?;
        let mut logits = self.output.forward_rows(&x, m)?;
        self.cap_logit_values(&mut logits);
        Ok(Tensor::from_vec(logits, (m, cfg.vocab_size), &self.device)?)
    }

    /// The pass for `b` rows of `t` tokens starting at position `pos` (or at per-row
    /// positions).
    fn pass<'a>(
        &self,
        b: usize,
        t: usize,
        pos: usize,
        batch: Option<&TokenBatch>,
        dropout_rng: Option<&'a mut SplitMix64>,
    ) -> Result<Pass<'a>, ModelError> {
        let positions = match batch.and_then(|x| x.positions.as_ref()) {
            None => None,
            Some(p) => {
                let p = p.to_dtype(DType::U32)?;
                let max = p.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
                self.check_len(max, 1)?;
                Some(p)
            }
        };
        let at = |tables| RopeAt::new(tables, pos, t, positions.as_ref());
        let rope = PassRope {
            global: at(&self.rope.global)?,
            local: self.rope.local.as_ref().map(at).transpose()?,
        };
        Ok(Pass {
            b,
            t,
            heads: self.heads(),
            eps: self.cfg.norm_eps,
            causal: self.cfg.attention == AttentionMode::Causal,
            scale: self.cfg.attention_scale(),
            softcap: self.cfg.attn_logit_softcapping,
            activation: self.cfg.activation,
            rope,
            segment_ids: batch.and_then(|x| x.segment_ids.clone()),
            dropout_p: self.cfg.dropout,
            dropout: dropout_rng,
            train_base: self.train_base,
            adapter: 0,
        })
    }

    /// The trunk: `tokens (b, t)` → final hidden states `RMSNorm(h_L)` `(b*t, d)`, and what
    /// the backward needs. `dropout_rng` enables dropout (config and LoRA dropout) with a
    /// reproducible mask.
    pub fn forward_hidden(
        &self,
        batch: &TokenBatch,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<(Tensor, Trunk), ModelError> {
        self.forward_hidden_hooked(batch, dropout_rng, None)
    }

    /// [`Llama::forward_hidden`] calling `hooks.before_layer(i, false)` before block `i` reads
    /// its weights (FSDP gathers the layer's parameters there).
    pub fn forward_hidden_hooked(
        &self,
        batch: &TokenBatch,
        dropout_rng: Option<&mut SplitMix64>,
        mut hooks: Option<&mut dyn LayerHooks>,
    ) -> Result<(Tensor, Trunk), ModelError> {
        let m = self.detached();
        let (b, t) = batch.tokens.dims2()?;
        m.check_len(0, t)?;
        let mut pass = m.pass(b, t, 0, Some(batch), dropout_rng)?;
        let ids = batch.tokens.flatten_all()?;
        let mut x = m.embed(&batch.tokens)?.detach(); // (n, d)
        let mut blocks = Vec::with_capacity(m.layers.len());
        for (i, block) in m.layers.iter().enumerate() {
            if let Some(h) = hooks.as_deref_mut() {
                h.before_layer(i, false)?;
            }
            // Under checkpointing the block runs exactly as without (same masks drawn), and
            // its activations are dropped at once.
            let rng = pass.dropout.as_deref().cloned();
            let (out, a) = block.forward(&x, &mut pass, None, true)?;
            blocks.push(match m.checkpoint_blocks {
                true => SavedBlock::Input { x, rng },
                false => SavedBlock::Acts(Box::new(a.expect("saved"))),
            });
            x = out;
        }
        if let Some(h) = hooks {
            h.before_head()?;
        }
        let hidden = k::rms_norm(&x, &m.norm, m.cfg.norm_eps)?;
        Ok((
            hidden,
            Trunk {
                blocks,
                dropout_p: pass.dropout_p,
                ids,
                last: x,
                b,
                t,
                rope: pass.rope,
                segment_ids: pass.segment_ids,
            },
        ))
    }

    /// Backward of [`Llama::forward_hidden`] from `d_hidden (b*t, d)`: adds every trainable
    /// parameter's gradient into `grads`.
    pub fn backward_hidden(
        &self,
        trunk: Trunk,
        d_hidden: &Tensor,
        grads: &mut Grads,
    ) -> Result<(), ModelError> {
        self.backward_hidden_hooked(trunk, d_hidden, grads, None)
    }

    /// [`Llama::backward_hidden`] with per-layer hooks: block `i`'s backward runs after
    /// `hooks.before_layer(i, true)`, writes into `hooks.layer_grads(i)` instead of `grads`,
    /// and is followed by `hooks.after_layer_backward(i)` (FSDP re-gathers the layer, then
    /// reduce-scatters its gradients). `grads` receives the rest (final norm, embedding), the
    /// embedding's into `hooks.embedding_grads()` when that is given.
    pub fn backward_hidden_hooked(
        &self,
        trunk: Trunk,
        d_hidden: &Tensor,
        grads: &mut Grads,
        mut hooks: Option<&mut dyn LayerHooks>,
    ) -> Result<(), ModelError> {
        let m = self.detached();
        // The dropout RNG states of checkpointed blocks, for their recomputed forwards.
        let (mut saved, mut rngs) = (Vec::new(), Vec::new());
        for s in trunk.blocks {
            match s {
                SavedBlock::Input { x, rng } => {
                    saved.push(SavedBlock::Input { x, rng: None });
                    rngs.push(rng);
                }
                acts => {
                    saved.push(acts);
                    rngs.push(None);
                }
            }
        }
        let mut pass = Pass {
            b: trunk.b,
            t: trunk.t,
            heads: m.heads(),
            eps: m.cfg.norm_eps,
            causal: m.cfg.attention == AttentionMode::Causal,
            scale: m.cfg.attention_scale(),
            softcap: m.cfg.attn_logit_softcapping,
            activation: m.cfg.activation,
            rope: trunk.rope,
            segment_ids: trunk.segment_ids,
            dropout_p: 0.0,
            dropout: None,
            train_base: m.train_base,
            adapter: 0,
        };
        let (mut dx, d_norm) =
            k::rms_norm_backward(&trunk.last, &m.norm, d_hidden, m.cfg.norm_eps)?;
        if m.train_base {
            grads.accumulate("norm.weight", &d_norm)?;
        }
        if let Some(h) = hooks.as_deref_mut() {
            h.before_blocks_backward(grads)?;
        }
        let layers = m.layers.iter().zip(saved).zip(rngs.iter_mut()).enumerate();
        for (i, ((block, s), rng)) in layers.rev() {
            if let Some(h) = hooks.as_deref_mut() {
                h.before_layer(i, true)?;
            }
            let a = match s {
                SavedBlock::Acts(a) => *a,
                SavedBlock::Input { x, .. } => {
                    // The same forward again (same input, masks and weights), keeping all.
                    pass.dropout_p = trunk.dropout_p;
                    pass.dropout = rng.as_mut();
                    let (_, a) = block.forward(&x, &mut pass, None, true)?;
                    pass.dropout_p = 0.0;
                    pass.dropout = None;
                    a.expect("saved")
                }
            };
            dx = match hooks.as_deref_mut() {
                None => block.backward(a, dx, &pass, grads)?,
                Some(h) => {
                    let dx = block.backward(a, dx, &pass, h.layer_grads(i))?;
                    h.after_layer_backward(i)?;
                    dx
                }
            };
        }
        if m.train_base {
            if let Embedding::Dense(_) = &m.embedding {
                // Embedding lookup: scatter-add the rows of dx into the table's gradient, in
                // place (no (vocab, d) temporary).
                let into = match hooks.and_then(|h| h.embedding_grads()) {
                    Some(g) => g,
                    None => grads,
                };
                let dx = match m.embedding_scale() {
                    Some(s) => (dx * s)?,
                    None => dx,
                };
                into.index_add_rows("tok_embeddings.weight", &trunk.ids, &dx)?;
            }
        }
        Ok(())
    }

    /// Forward and hand-written backward of `loss_scale * sum(cross-entropy)` over the
    /// targets != -100 of one micro-batch: `tokens (b, t)` u32, `targets (b*t)` i64. Adds every
    /// trainable parameter's gradient into `grads` and returns the loss sum.
    pub fn forward_backward(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        loss_scale: f64,
        grads: &mut Grads,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<f64, ModelError> {
        self.forward_backward_batch(
            &TokenBatch::new(tokens.clone()),
            targets,
            loss_scale,
            grads,
            dropout_rng,
        )
    }

    /// [`Llama::forward_backward`] for a batch with positions and segment ids (packed rows).
    pub fn forward_backward_batch(
        &self,
        batch: &TokenBatch,
        targets: &Tensor,
        loss_scale: f64,
        grads: &mut Grads,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<f64, ModelError> {
        let (hidden, trunk) = self.forward_hidden(batch, dropout_rng)?;
        let (loss_sum, d_hidden) = self.lm_loss_backward(&hidden, targets, loss_scale, grads)?;
        drop(hidden);
        self.backward_hidden(trunk, &d_hidden, grads)?;
        Ok(loss_sum)
    }

    /// Training/eval forward over whole sequences: `tokens (b, t)` u32 → logits `(b*t, v)`.
    /// Differentiable with candle's autograd (the reference the hand-written backward is
    /// tested against). `dropout_rng` enables dropout with a reproducible mask.
    pub fn forward_train(
        &self,
        tokens: &Tensor,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor, ModelError> {
        self.forward_batch(&TokenBatch::new(tokens.clone()), dropout_rng)
    }

    /// [`Llama::forward_train`] for a batch with positions and segment ids.
    pub fn forward_batch(
        &self,
        batch: &TokenBatch,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor, ModelError> {
        let h = self.trunk_forward(batch, dropout_rng)?;
        self.lm_logits(&h) // (b*t, v)
    }

    /// The trunk's final hidden states `(b*t, d)` without keeping anything for a backward and
    /// off candle's autograd graph (evaluation; heads such as [`Llama::lm_loss_sum`] take it
    /// from here).
    pub fn hidden_states(
        &self,
        batch: &TokenBatch,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor, ModelError> {
        self.detached().trunk_forward(batch, dropout_rng)
    }

    fn trunk_forward(
        &self,
        batch: &TokenBatch,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = batch.tokens.dims2()?;
        self.check_len(0, t)?;
        let mut pass = self.pass(b, t, 0, Some(batch), dropout_rng)?;
        let mut h = self.embed(&batch.tokens)?;
        for block in &self.layers {
            h = block.forward(&h, &mut pass, None, false)?.0;
        }
        Ok(k::rms_norm(&h, &self.norm, self.cfg.norm_eps)?)
    }

    /// Logits for the whole sequence in one pass, without a cache: `(b, t, v)`.
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        Ok(self
            .forward_train(tokens, None)?
            .reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Incremental decoding (see [`crate::CausalLm::forward_decode`]): feeds `tokens (b, t)`
    /// after the cached ones and returns the last position's logits `(b, v)`.
    pub fn forward_decode(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        crate::CausalLm::forward_decode(self, tokens, cache)
    }

    /// Prefill on the tensor path: feeds `tokens (b, t)` after the positions already cached
    /// in rows `0..b` (all rows must hold the same number), appends their keys/values, and
    /// returns the logits of the last position `(b, v)`.
    pub(crate) fn prefill(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        adapter: u16,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        if adapter > self.served_adapters {
            return Err(ModelError::Input(format!(
                "prefill: adapter {adapter} is not served (the model serves {})",
                self.served_adapters
            )));
        }
        let h = self.cached_forward(tokens, cache, adapter)?;
        let last = h
            .reshape((b, t, self.cfg.dim))?
            .narrow(1, t - 1, 1)?
            .squeeze(1)?; // (b, d)
        let last = k::rms_norm(&last, &self.norm, self.cfg.norm_eps)?;
        self.lm_logits(&last) // (b, v)
    }

    /// Scoring after a shared prefix: feeds `tokens (b, t)` after the positions already
    /// cached in rows `0..b` (all rows must hold the same number; right padding is harmless,
    /// attention being causal), appends their keys/values, and returns the final hidden states
    /// `RMSNorm(h_L)` of every new position `(b*t, d)`, for heads such as
    /// [`Llama::token_logprobs`].
    pub fn forward_cached_hidden(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let h = self.detached().cached_forward(tokens, cache, 0)?;
        Ok(k::rms_norm(&h, &self.norm, self.cfg.norm_eps)?)
    }

    /// The blocks over `tokens (b, t)` after the cached positions: `h_L (b*t, d)`.
    fn cached_forward(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        adapter: u16,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        let pos = cache.row_len(0);
        if (0..b).any(|r| cache.row_len(r) != pos) {
            return Err(ModelError::Input(
                "a multi-token forward needs every row of the cache at the same length; \
                 prefill ragged rows one at a time"
                    .into(),
            ));
        }
        self.check_len(pos, t)?;
        cache.ensure(b, self.cfg.n_layers, self.cfg.n_kv_heads());
        let mut pass = self.pass(b, t, pos, None, None)?;
        pass.adapter = adapter;
        let mut h = self.embed(tokens)?;
        for block in &self.layers {
            h = block.forward(&h, &mut pass, Some(cache), false)?.0;
        }
        for r in 0..b {
            cache.advance(r, t);
        }
        Ok(h)
    }
}

/// Projection `l`'s adapter factors `A (r, in)` and `B (out, r)` from `adapters`, checked
/// against the base projection's shape and the spec's rank.
fn adapter_factors(
    l: &Linear,
    adapters: &Params,
    spec: &LoraSpec,
) -> Result<(Tensor, Tensor), ModelError> {
    let (a, b) = (
        adapters.tensor(&l.lora_a_name())?,
        adapters.tensor(&l.lora_b_name())?,
    );
    let (out_dim, in_dim) = l.weight.dims()?;
    let want_a = [spec.rank, in_dim];
    let want_b = [out_dim, spec.rank];
    if a.dims() != want_a || b.dims() != want_b {
        return Err(ModelError::Weights {
            path: "adapter".into(),
            msg: format!(
                "{} is {:?} and {} is {:?}, but the base projection {} is ({out_dim}, {in_dim}) and the rank {}: expected {want_a:?} and {want_b:?} (an adapter made for another base model?)",
                l.lora_a_name(),
                a.dims(),
                l.lora_b_name(),
                b.dims(),
                l.name,
                spec.rank
            ),
        });
    }
    Ok((a, b))
}

impl Block {
    pub(crate) fn projections_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.w1,
            &mut self.w3,
            &mut self.w2,
        ]
    }

    /// The block's norm weights with their names under `layers.{i}.`.
    pub(crate) fn norms(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![
            ("attention_norm.weight", &self.attention_norm),
            ("ffn_norm.weight", &self.ffn_norm),
        ];
        let optional = [
            ("attention.q_norm.weight", &self.q_norm),
            ("attention.k_norm.weight", &self.k_norm),
            ("post_attention_norm.weight", &self.post_attention_norm),
            ("post_ffn_norm.weight", &self.post_ffn_norm),
        ];
        out.extend(
            optional
                .into_iter()
                .filter_map(|(n, w)| w.as_ref().map(|w| (n, w))),
        );
        out
    }

    pub(crate) fn projections(&self) -> [&Linear; 7] {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.w1, &self.w3, &self.w2,
        ]
    }

    /// Stacks Q|K|V and gate|up when they are all kiln block-kernel weights of one type and
    /// carry no adapter (inference only; training runs the separate projections).
    pub(crate) fn fuse(&mut self) {
        if self.projections().iter().any(|l| l.lora.is_some()) {
            self.fused = None;
            return;
        }
        self.fuse_base();
    }

    /// Whether an attached adapter sits on a stacked projection (the tensor path then runs
    /// them apart; the decode rows add the adapters to the stacked product).
    pub(crate) fn stacked_parts_have_lora(&self) -> bool {
        [&self.wq, &self.wk, &self.wv, &self.w1, &self.w3]
            .iter()
            .any(|l| l.lora.is_some())
    }

    /// Every projection of the block, the decode-time stacked ones included.
    pub(crate) fn for_each_linear(&mut self, mut f: impl FnMut(&mut Linear)) {
        for l in self.projections_mut() {
            f(l);
        }
        if let Some((qkv, gate_up)) = &mut self.fused {
            f(qkv);
            f(gate_up);
        }
    }

    /// Stacks the base weights of Q|K|V and gate|up even under an attached adapter: the
    /// decode rows add each part's adapter to its slice of the stacked product.
    pub(crate) fn fuse_base(&mut self) {
        let raw = |ls: &[&Linear]| -> Option<Linear> {
            let parts: Option<Vec<&RawQ>> = ls
                .iter()
                .map(|l| match &l.weight {
                    LinearWeight::Raw(r) => Some(r.as_ref()),
                    _ => None,
                })
                .collect();
            // Biases (Qwen2's Q/K/V) stack with their rows; all or none of the parts have one.
            let bias = match ls.iter().filter(|l| l.bias.is_some()).count() {
                0 => None,
                n if n == ls.len() => {
                    let parts: Vec<&Tensor> = ls.iter().filter_map(|l| l.bias.as_ref()).collect();
                    Some(Tensor::cat(&parts, 0).ok()?)
                }
                _ => return None,
            };
            RawQ::concat_rows(&parts?).map(|r| {
                Linear::new("fused", LinearWeight::Raw(Arc::new(r)), false).with_bias(bias)
            })
        };
        self.fused = match (
            raw(&[&self.wq, &self.wk, &self.wv]),
            raw(&[&self.w1, &self.w3]),
        ) {
            (Some(qkv), Some(w13)) => Some((qkv, w13)),
            _ => None,
        };
    }
}

/// Which projections carry LoRA adapters, with what rank, alpha and dropout.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Short projection names: `wq`, `wk`, `wv`, `wo`, `w1`, `w3`, `w2` (PEFT's q_proj,
    /// k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    pub targets: Vec<String>,
    /// rsLoRA (Kalajdzievski 2023): scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
}

/// The seven projections of a block, in kiln's short names.
pub const LORA_TARGETS: [&str; 7] = ["wq", "wk", "wv", "wo", "w1", "w3", "w2"];

impl LoraSpec {
    /// Rank `rank` and `alpha` on all seven projections, no dropout, the plain `alpha / r` scale.
    pub fn all_projections(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            dropout: 0.0,
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
            rslora: false,
        }
    }

    pub(crate) fn applies_to(&self, linear_name: &str) -> bool {
        let short = linear_name.rsplit('.').next().unwrap_or("");
        self.targets.iter().any(|t| t == short)
    }

    /// The factor on `B A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (PEFT's `scaling`).
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.rank == 0 {
            return Err(ModelError::Config("LoRA rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Config(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(ModelError::Config("LoRA needs at least one target".into()));
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| !LORA_TARGETS.contains(&t.as_str()))
        {
            return Err(ModelError::Config(format!(
                "unknown LoRA target {t:?} (expected some of {})",
                LORA_TARGETS.join(", ")
            )));
        }
        Ok(())
    }
}
