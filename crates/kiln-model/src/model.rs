//! The LLaMA-style decoder (Touvron et al. 2023), written to read next to the paper.
//!
//! ```text
//! h_0     = E[tokens]
//! h'_l    = h_l  + Wo · Attn(RoPE(Wq · RMSNorm(h_l)), RoPE(Wk · …), Wv · …)
//! h_{l+1} = h'_l + W2 · (SiLU(W1 · RMSNorm(h'_l)) ⊙ W3 · RMSNorm(h'_l))      (SwiGLU)
//! logits  = W_out · RMSNorm(h_L)          (W_out = E when embeddings are tied)
//! ```
//! RoPE uses the half-split ("rotate_half") layout of HF checkpoints. Activations stay 2-D,
//! `(b*t, d)`, between the matmuls so every projection is one GEMM.

use candle_core::{DType, Device, Tensor, D};
use kiln_kernels as k;

use crate::{AttentionMode, KvCache, ModelConfig, ModelError, Params, SplitMix64};

pub(crate) struct Attention {
    pub(crate) wq: Tensor, // (h*hd, d)
    pub(crate) wk: Tensor, // (hkv*hd, d)
    pub(crate) wv: Tensor, // (hkv*hd, d)
    pub(crate) wo: Tensor, // (d, h*hd)
}

pub(crate) struct FeedForward {
    pub(crate) w1: Tensor, // (f, d) gate
    pub(crate) w3: Tensor, // (f, d) up
    pub(crate) w2: Tensor, // (d, f) down
}

pub(crate) struct Block {
    pub(crate) attention_norm: Tensor, // (d)
    pub(crate) attention: Attention,
    pub(crate) ffn_norm: Tensor, // (d)
    pub(crate) feed_forward: FeedForward,
}

/// Everything one forward needs that is not a weight.
pub(crate) struct Pass<'a> {
    pub(crate) b: usize,
    pub(crate) t: usize,
    /// Position of the first token in this pass (non-zero when decoding with a cache).
    pub(crate) pos: usize,
    pub(crate) dropout: Option<&'a mut SplitMix64>,
}

pub struct Llama {
    pub(crate) cfg: ModelConfig,
    tok_embeddings: Tensor, // (v, d)
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: Tensor,     // (d)
    pub(crate) output: Tensor,   // (v, d): the embedding itself when tied
    pub(crate) rope_cos: Tensor, // (max_seq_len, hd/2)
    pub(crate) rope_sin: Tensor, // (max_seq_len, hd/2)
}

/// `x W^T` for a 2-D activation and a PyTorch-layout `(out, in)` weight.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

impl Llama {
    /// Builds the model over the parameter tensors (sharing storage, so gradients flow to
    /// the `Var`s in `params`).
    pub fn new(cfg: &ModelConfig, params: &Params) -> Result<Self, ModelError> {
        cfg.validate()?;
        params.check_against(cfg)?;
        let p = |name: &str| params.tensor(name);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let l = |s: &str| p(&format!("layers.{i}.{s}"));
            layers.push(Block {
                attention_norm: l("attention_norm.weight")?,
                attention: Attention {
                    wq: l("attention.wq.weight")?,
                    wk: l("attention.wk.weight")?,
                    wv: l("attention.wv.weight")?,
                    wo: l("attention.wo.weight")?,
                },
                ffn_norm: l("ffn_norm.weight")?,
                feed_forward: FeedForward {
                    w1: l("feed_forward.w1.weight")?,
                    w3: l("feed_forward.w3.weight")?,
                    w2: l("feed_forward.w2.weight")?,
                },
            });
        }
        let tok_embeddings = p("tok_embeddings.weight")?;
        let output = if cfg.tie_embeddings {
            tok_embeddings.clone()
        } else {
            p("output.weight")?
        };
        let (rope_cos, rope_sin) =
            crate::rope::tables(cfg, tok_embeddings.device(), tok_embeddings.dtype())?;
        Ok(Self {
            cfg: cfg.clone(),
            tok_embeddings,
            layers,
            norm: p("norm.weight")?,
            output,
            rope_cos,
            rope_sin,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.tok_embeddings.device()
    }

    /// Training/eval forward over whole sequences: `tokens (b, t)` u32 → logits `(b*t, v)`.
    /// `dropout_rng` enables dropout (when the config has it) with a reproducible mask.
    pub fn forward_train(
        &self,
        tokens: &Tensor,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        self.check_len(0, t)?;
        let mut pass = Pass {
            b,
            t,
            pos: 0,
            dropout: dropout_rng.filter(|_| self.cfg.dropout > 0.0),
        };
        let mut h = self.embed(tokens)?; // (b*t, d)
        for block in &self.layers {
            h = self.block_forward(block, &h, &mut pass, None)?;
        }
        let h = k::rms_norm(&h, &self.norm, self.cfg.norm_eps)?;
        Ok(linear(&h, &self.output)?) // (b*t, v)
    }

    /// Incremental decoding: feeds `tokens (b, t_new)` after the `cache.len()` tokens already
    /// in `cache`, appends their keys/values, and returns the logits of the last position `(b, v)`.
    pub fn forward_decode(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        let pos = cache.len();
        self.check_len(pos, t)?;
        cache.ensure_layers(self.cfg.n_layers);
        let mut pass = Pass {
            b,
            t,
            pos,
            dropout: None,
        };
        let mut h = self.embed(tokens)?;
        for (i, block) in self.layers.iter().enumerate() {
            h = self.block_forward(block, &h, &mut pass, Some((cache, i)))?;
        }
        cache.advance(t);
        let last = h
            .reshape((b, t, self.cfg.dim))?
            .narrow(1, t - 1, 1)?
            .squeeze(1)?; // (b, d)
        let last = k::rms_norm(&last, &self.norm, self.cfg.norm_eps)?;
        Ok(linear(&last, &self.output)?) // (b, v)
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

    pub(crate) fn embed(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let ids = tokens.flatten_all()?; // (b*t)
        let max = ids.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max} is out of range for vocab_size {} (tokenizer/model mismatch?)",
                self.cfg.vocab_size
            )));
        }
        Ok(self.tok_embeddings.index_select(&ids, 0)?) // (b*t, d)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        pass: &mut Pass,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor, ModelError> {
        let eps = self.cfg.norm_eps;
        let attn = self.attention(
            &block.attention,
            &k::rms_norm(x, &block.attention_norm, eps)?,
            pass,
            cache,
        )?;
        let h = (x + self.dropout(attn, pass)?)?;
        let ffn = feed_forward(&block.feed_forward, &k::rms_norm(&h, &block.ffn_norm, eps)?)?;
        Ok((&h + self.dropout(ffn, pass)?)?)
    }

    fn dropout(&self, x: Tensor, pass: &mut Pass) -> Result<Tensor, ModelError> {
        match self.dropout_mask(&x, pass)? {
            Some(mask) => Ok((x * mask)?),
            None => Ok(x),
        }
    }

    /// Inverted dropout: a mask of 0 (probability p) and 1/(1-p), drawn from the pass's
    /// seeded RNG so a resumed run draws the same masks. `None` when dropout is off.
    pub(crate) fn dropout_mask(
        &self,
        x: &Tensor,
        pass: &mut Pass,
    ) -> Result<Option<Tensor>, ModelError> {
        let Some(rng) = pass.dropout.as_deref_mut() else {
            return Ok(None);
        };
        let p = self.cfg.dropout;
        let keep_scale = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.next_f64() < p { 0.0 } else { keep_scale })
            .collect();
        Ok(Some(
            Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?,
        ))
    }

    /// Grouped-query attention on `x (b*t, d)`. Query heads of one group are adjacent, so a
    /// group's queries are stacked to `(b, hkv, g*t, hd)` and share one K/V without copying.
    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        pass: &Pass,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = (pass.b, pass.t);
        let (h, hkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads(), self.cfg.head_dim());
        let g = h / hkv;
        let cos = self.rope_cos.narrow(0, pass.pos, t)?; // (t, hd/2)
        let sin = self.rope_sin.narrow(0, pass.pos, t)?;
        let heads = |w: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            linear(x, w)?.reshape((b, t, n, hd))?.transpose(1, 2) // (b, n, t, hd)
        };
        let q = k::rope(&heads(&a.wq, h)?, &cos, &sin)?; // (b, h, t, hd)
        let mut key = k::rope(&heads(&a.wk, hkv)?, &cos, &sin)?; // (b, hkv, t, hd)
        let mut value = heads(&a.wv, hkv)?.contiguous()?; // (b, hkv, t, hd)
        if let Some((cache, layer)) = cache {
            (key, value) = cache.append(layer, &key, &value)?; // (b, hkv, t_all, hd)
        }
        let t_all = key.dim(2)?;
        let q = q.reshape((b, hkv, g * t, hd))?;
        let scores = q.matmul(&key.t()?)?.reshape((b, h, t, t_all))?; // (b, h, t, t_all)
        let causal = self.cfg.attention == AttentionMode::Causal;
        let probs = k::masked_softmax(&scores, 1.0 / (hd as f64).sqrt(), causal)?;
        let out = probs
            .reshape((b, hkv, g * t, t_all))?
            .matmul(&value)? // (b, hkv, g*t, hd)
            .reshape((b, h, t, hd))?
            .transpose(1, 2)? // (b, t, h, hd)
            .contiguous()?
            .reshape((b * t, h * hd))?;
        Ok(linear(&out, &a.wo)?) // (b*t, d)
    }

    /// Logits for the whole sequence in one pass, without a cache (what `forward_train`
    /// returns, reshaped): `(b, t, v)`.
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        Ok(self
            .forward_train(tokens, None)?
            .reshape((b, t, self.cfg.vocab_size))?)
    }
}

/// SwiGLU FFN (Shazeer 2020, eq. 6): `W2 (SiLU(x W1) ⊙ x W3)`.
fn feed_forward(f: &FeedForward, x: &Tensor) -> Result<Tensor, ModelError> {
    let gate = linear(x, &f.w1)?; // (b*t, f)
    let up = linear(x, &f.w3)?; // (b*t, f)
    Ok(linear(&k::swiglu(&gate, &up)?, &f.w2)?) // (b*t, d)
}

/// Mean cross-entropy helper for callers that want one number: `(sum, n_valid)` of
/// `-log p(target)` over targets != -100.
pub fn loss_sum(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize), ModelError> {
    let targets = targets.flatten_all()?;
    let logits = logits.reshape(((), logits.dim(D::Minus1)?))?;
    let n = k::count_valid_targets(&targets)?;
    Ok((k::cross_entropy_sum(&logits, &targets)?, n))
}
