//! One decoder block, written once: the training forward (saving what the backward needs, or
//! not), the hand-written backward, the prefill path over a KV cache, and the single-token decode
//! fast path on plain rows ([`Block::decode_rows`]), for dense and quantised weights alike (every
//! projection is a [`Linear`]). The architecture switches of [`crate::ModelConfig`] all act here.
//!
//! ```text
//! q, k, v = Wq·x̂ (+bq), Wk·x̂ (+bk), Wv·x̂ (+bv)        x̂ = RMSNorm(x)     (biases: Qwen2)
//! q, k    = RMSNorm_head(q), RMSNorm_head(k)                            (QK-norm: Qwen3, Gemma 3)
//! q, k    = RoPE(q), RoPE(k)          (leading rotary_dim of each head; global or local base;
//!                                      none on NoPE layers)
//! a       = softmax(s·q·kᵀ + causal/segment/sliding-window mask)·v     (s: 1/√hd or 1/√qpas)
//! h       = x + drop(Post(Wo·a))                                       (Post: RMSNorm on Gemma,
//! out     = h + drop(Post(W2·(act(W1·ĥ) ⊙ W3·ĥ)))  ĥ = RMSNorm(h)       identity elsewhere)
//! ```
//! act is SiLU (SwiGLU) or tanh-GELU (Gemma's GeGLU). The backward is the chain rule written
//! out with the kernels' explicit `*_backward` functions (llm.c style); weights are `(out, in)`,
//! so `y = x W^T`, `dx = dy W`, `dW = dy^T x`.

use candle_core::Tensor;
use kiln_kernels as k;
use kiln_kernels::rows;

use crate::config::{Activation, LayerAttention};
use crate::linear::{dropout_mask, Linear, LinearCtx};
use crate::rope::RopeTables;
use crate::{Grads, KvCache, ModelError, SplitMix64};
use kiln_kernels::{attention, attention_backward, AttentionMask};

pub(crate) struct Block {
    pub(crate) index: usize,
    /// Window and positional encoding of this layer.
    pub(crate) attn: LayerAttention,
    pub(crate) attention_norm: Tensor, // (d)
    pub(crate) wq: Linear,             // (h*hd, d)
    pub(crate) wk: Linear,             // (hkv*hd, d)
    pub(crate) wv: Linear,             // (hkv*hd, d)
    /// Per-head RMSNorm weights of queries and keys `(hd)` (QK-norm).
    pub(crate) q_norm: Option<Tensor>,
    pub(crate) k_norm: Option<Tensor>,
    pub(crate) wo: Linear, // (d, h*hd)
    /// RMSNorm on the attention output before the residual add (Gemma).
    pub(crate) post_attention_norm: Option<Tensor>,
    pub(crate) ffn_norm: Tensor, // (d)
    pub(crate) w1: Linear,       // (f, d) gate
    pub(crate) w3: Linear,       // (f, d) up
    pub(crate) w2: Linear,       // (d, f) down
    /// RMSNorm on the MLP output before the residual add (Gemma).
    pub(crate) post_ffn_norm: Option<Tensor>,
    /// Q|K|V and gate|up stacked into one matrix each, for inference with kiln's block
    /// kernels (one pass over the activations instead of three or two).
    pub(crate) fused: Option<(Linear, Linear)>,
}

/// Sizes of the attention heads.
#[derive(Clone, Copy)]
pub(crate) struct Heads {
    pub(crate) h: usize,
    pub(crate) hkv: usize,
    pub(crate) hd: usize,
}

/// RoPE tables for the positions of one pass.
pub(crate) enum RopeAt {
    /// Every row at the same positions: `(t, rot/2)` tables.
    Shared(Tensor, Tensor),
    /// Per-row positions (packed rows restart at each segment): one table pair per row.
    PerRow(Vec<(Tensor, Tensor)>),
}

impl RopeAt {
    /// The tables of `t` positions from `pos`, or at the per-row `positions (b, t)`.
    pub(crate) fn new(
        tables: &RopeTables,
        pos: usize,
        t: usize,
        positions: Option<&Tensor>,
    ) -> Result<Self, ModelError> {
        Ok(match positions {
            None => RopeAt::Shared(tables.cos.narrow(0, pos, t)?, tables.sin.narrow(0, pos, t)?),
            Some(p) => {
                let mut rows = Vec::with_capacity(p.dim(0)?);
                for r in 0..p.dim(0)? {
                    let row = p.get(r)?;
                    rows.push((
                        tables.cos.index_select(&row, 0)?,
                        tables.sin.index_select(&row, 0)?,
                    ));
                }
                RopeAt::PerRow(rows)
            }
        })
    }

    /// `x (b, n, t, hd)` → rotated (its leading `rot` dims of each head), contiguous.
    fn apply(&self, x: &Tensor, inverse: bool) -> candle_core::Result<Tensor> {
        let f = if inverse { k::rope_backward } else { k::rope };
        let rotate = |x: &Tensor, cos: &Tensor, sin: &Tensor| -> candle_core::Result<Tensor> {
            let (hd, rot) = (x.dim(3)?, 2 * cos.dim(1)?);
            if rot == hd {
                return f(x, cos, sin);
            }
            // Partial rotary: the rest of each head passes through.
            let turned = f(&x.narrow(3, 0, rot)?, cos, sin)?;
            Tensor::cat(&[&turned, &x.narrow(3, rot, hd - rot)?.contiguous()?], 3)
        };
        match self {
            RopeAt::Shared(cos, sin) => rotate(x, cos, sin),
            RopeAt::PerRow(tables) => {
                let rows = tables
                    .iter()
                    .enumerate()
                    .map(|(r, (cos, sin))| rotate(&x.narrow(0, r, 1)?, cos, sin))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
        }
    }
}

/// The RoPE tables of one pass: global, and local when the model has a local base.
pub(crate) struct PassRope {
    pub(crate) global: RopeAt,
    pub(crate) local: Option<RopeAt>,
}

impl PassRope {
    fn for_layer(&self, attn: &LayerAttention) -> Option<&RopeAt> {
        match attn.rope {
            crate::LayerRope::Global => Some(&self.global),
            crate::LayerRope::Local => self.local.as_ref(),
            crate::LayerRope::None => None,
        }
    }
}

/// Everything one pass needs that is not a weight.
pub(crate) struct Pass<'a> {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) heads: Heads,
    pub(crate) eps: f64,
    pub(crate) causal: bool,
    /// The attention scale (`1/sqrt(hd)` or Gemma's `1/sqrt(query_pre_attn_scalar)`).
    pub(crate) scale: f64,
    /// Gemma 2's attention score soft cap.
    pub(crate) softcap: Option<f64>,
    pub(crate) activation: Activation,
    pub(crate) rope: PassRope,
    /// `(b, t)` u32 segment ids of packed rows.
    pub(crate) segment_ids: Option<Tensor>,
    /// Residual-branch dropout probability (the config's) and the RNG that draws its masks
    /// (and LoRA dropout masks); None when dropout is off.
    pub(crate) dropout_p: f64,
    pub(crate) dropout: Option<&'a mut SplitMix64>,
    /// Whether norms get gradients (false when only adapters train).
    pub(crate) train_base: bool,
    /// The served adapter (by id, 0 for none) every projection of this pass adds.
    pub(crate) adapter: u16,
}

impl Pass<'_> {
    fn mask(&self, attn: &LayerAttention) -> AttentionMask<'_> {
        AttentionMask {
            causal: self.causal,
            segment_ids: self.segment_ids.as_ref(),
            window: attn.window,
            softcap: self.softcap,
        }
    }

    fn residual_dropout(&mut self, x: Tensor) -> Result<(Tensor, Option<Tensor>), ModelError> {
        match self.dropout.as_deref_mut() {
            Some(rng) if self.dropout_p > 0.0 => {
                let m = dropout_mask(&x, self.dropout_p, rng)?;
                Ok(((x * &m)?, Some(m)))
            }
            _ => Ok((x, None)),
        }
    }

    /// `(n, heads*hd)` → `(b, heads, t, hd)`.
    fn split_heads(&self, y: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
        y.reshape((self.b, self.t, n_heads, self.heads.hd))?
            .transpose(1, 2)
    }

    /// `(b, heads, t, hd)` → `(n, heads*hd)`.
    fn merge_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, n, _, hd) = x.dims4()?;
        x.transpose(1, 2)?
            .contiguous()?
            .reshape((self.b * self.t, n * hd))
    }

    /// `(b, heads, t, hd)` → RoPE'd on this layer (unchanged on a NoPE layer), contiguous.
    fn rope(
        &self,
        x: &Tensor,
        attn: &LayerAttention,
        inverse: bool,
    ) -> candle_core::Result<Tensor> {
        match self.rope.for_layer(attn) {
            Some(r) => r.apply(x, inverse),
            None => x.contiguous(),
        }
    }

    fn gate(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        match self.activation {
            Activation::Silu => k::swiglu(gate, up),
            Activation::GeluTanh => k::gelu_tanh_gate(gate, up),
        }
    }

    fn gate_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        d: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match self.activation {
            Activation::Silu => k::swiglu_backward(gate, up, d),
            Activation::GeluTanh => k::gelu_tanh_gate_backward(gate, up, d),
        }
    }
}

/// RMSNorm over each `hd`-long head of `y (n, heads*hd)`.
fn head_norm(y: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let (n, width) = y.dims2()?;
    let hd = w.dim(0)?;
    k::rms_norm(&y.reshape((n * width / hd, hd))?, w, eps)?.reshape((n, width))
}

/// Backward of [`head_norm`]: `(dy_in, dw)`.
fn head_norm_backward(
    y: &Tensor,
    w: &Tensor,
    d: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, width) = y.dims2()?;
    let hd = w.dim(0)?;
    let rows = (n * width / hd, hd);
    let (dy, dw) =
        k::rms_norm_backward(&y.reshape(rows)?, w, &d.contiguous()?.reshape(rows)?, eps)?;
    Ok((dy.reshape((n, width))?, dw))
}

/// An optional norm of the block in the backward: its name, weight, saved input, and whether
/// it normalises each head separately (QK-norm).
struct SavedNorm<'a> {
    name: &'static str,
    weight: Option<&'a Tensor>,
    input: Option<Tensor>,
    per_head: bool,
}

/// What one block's forward keeps for its backward.
pub(crate) struct BlockActs {
    x: Tensor, // (n, d) block input
    q_ctx: LinearCtx,
    k_ctx: LinearCtx,
    v_ctx: LinearCtx,
    /// Q and K projections before QK-norm `(n, heads*hd)`, with QK-norm.
    q_pre_norm: Option<Tensor>,
    k_pre_norm: Option<Tensor>,
    q: Tensor, // (b, h, t, hd) after RoPE
    k: Tensor, // (b, hkv, t, hd) after RoPE
    v: Tensor, // (b, hkv, t, hd)
    attn: Tensor,
    lse: Tensor,
    o_ctx: LinearCtx,
    /// The attention output before its post-norm, with post-norms.
    o_pre_norm: Option<Tensor>,
    attn_mask: Option<Tensor>,
    h: Tensor, // (n, d) x + attention
    gate_ctx: LinearCtx,
    up_ctx: LinearCtx,
    gate: Tensor,
    up: Tensor,
    down_ctx: LinearCtx,
    down_pre_norm: Option<Tensor>,
    ffn_mask: Option<Tensor>,
}

/// A projection's forward, saving its context only when asked.
fn project(
    l: &Linear,
    x: &Tensor,
    save: bool,
    pass: &mut Pass,
) -> Result<(Tensor, Option<LinearCtx>), ModelError> {
    if save {
        let (y, ctx) = l.forward_saving(x, pass.dropout.as_deref_mut())?;
        Ok((y, Some(ctx)))
    } else {
        Ok((l.forward_served(x, pass.adapter)?, None))
    }
}

/// `norm(y)` when the block has that norm, and the input kept for the backward when saving.
fn optional_norm(
    y: Tensor,
    w: Option<&Tensor>,
    eps: f64,
    per_head: bool,
    save: bool,
) -> Result<(Tensor, Option<Tensor>), ModelError> {
    let Some(w) = w else {
        return Ok((y, None));
    };
    let out = if per_head {
        head_norm(&y, w, eps)?
    } else {
        k::rms_norm(&y, w, eps)?
    };
    Ok((out, save.then_some(y)))
}

impl Block {
    pub(crate) fn name(&self, s: &str) -> String {
        format!("layers.{}.{s}", self.index)
    }

    /// `x (n, d)` → block output `(n, d)`, with the saved activations when `save`. With a
    /// cache, the pass's keys and values are appended to it and the queries attend to every
    /// cached position of their row (the last `window` of them on a sliding layer).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pass: &mut Pass,
        cache: Option<&mut KvCache>,
        save: bool,
    ) -> Result<(Tensor, Option<BlockActs>), ModelError> {
        let Heads { h, hkv, hd } = pass.heads;
        let eps = pass.eps;
        let xn = k::rms_norm(x, &self.attention_norm, eps)?;
        // The stacked projections carry no served adapter: a pass with one runs them apart.
        let fused = self
            .fused
            .as_ref()
            .filter(|_| !self.stacked_parts_have_lora());
        let (q, k_lin, v_lin, q_ctx, k_ctx, v_ctx) = match (fused, save) {
            (Some((qkv, _)), false) => {
                // The stacked product is the base's; a served adapter adds to each part.
                let y = qkv.forward(&xn)?;
                let id = pass.adapter;
                (
                    self.wq
                        .add_served(&xn, id, y.narrow(1, 0, h * hd)?.contiguous()?)?,
                    self.wk
                        .add_served(&xn, id, y.narrow(1, h * hd, hkv * hd)?.contiguous()?)?,
                    self.wv.add_served(
                        &xn,
                        id,
                        y.narrow(1, (h + hkv) * hd, hkv * hd)?.contiguous()?,
                    )?,
                    None,
                    None,
                    None,
                )
            }
            _ => {
                let (q, qc) = project(&self.wq, &xn, save, pass)?;
                let (k, kc) = project(&self.wk, &xn, save, pass)?;
                let (v, vc) = project(&self.wv, &xn, save, pass)?;
                (q, k, v, qc, kc, vc)
            }
        };
        let (q, q_pre_norm) = optional_norm(q, self.q_norm.as_ref(), eps, true, save)?;
        let (k_lin, k_pre_norm) = optional_norm(k_lin, self.k_norm.as_ref(), eps, true, save)?;
        let q = pass.rope(&pass.split_heads(&q, h)?, &self.attn, false)?;
        let key = pass.rope(&pass.split_heads(&k_lin, hkv)?, &self.attn, false)?;
        let value = pass.split_heads(&v_lin, hkv)?.contiguous()?;
        let (key_all, value_all) = match cache {
            Some(c) => c.append_tensors(self.index, &key, &value)?,
            None => (key.clone(), value.clone()),
        };
        let (attn, lse) = attention(&q, &key_all, &value_all, pass.scale, pass.mask(&self.attn))?;
        let attn_flat = pass.merge_heads(&attn)?;
        let (o, o_ctx) = project(&self.wo, &attn_flat, save, pass)?;
        let (o, o_pre_norm) =
            optional_norm(o, self.post_attention_norm.as_ref(), eps, false, save)?;
        let (o, attn_mask) = pass.residual_dropout(o)?;
        let hres = (x + o)?;
        let hn = k::rms_norm(&hres, &self.ffn_norm, eps)?;
        let (gate, up, gate_ctx, up_ctx) = match (fused, save) {
            (Some((_, w13)), false) => {
                let y = w13.forward(&hn)?;
                let f = y.dim(1)? / 2;
                let id = pass.adapter;
                (
                    self.w1
                        .add_served(&hn, id, y.narrow(1, 0, f)?.contiguous()?)?,
                    self.w3
                        .add_served(&hn, id, y.narrow(1, f, f)?.contiguous()?)?,
                    None,
                    None,
                )
            }
            _ => {
                let (g, gc) = project(&self.w1, &hn, save, pass)?;
                let (u, uc) = project(&self.w3, &hn, save, pass)?;
                (g, u, gc, uc)
            }
        };
        let act = pass.gate(&gate, &up)?;
        let (down, down_ctx) = project(&self.w2, &act, save, pass)?;
        let (down, down_pre_norm) =
            optional_norm(down, self.post_ffn_norm.as_ref(), eps, false, save)?;
        let (down, ffn_mask) = pass.residual_dropout(down)?;
        let out = (&hres + down)?;
        if !save {
            return Ok((out, None));
        }
        let ctx = |c: Option<LinearCtx>| c.expect("saved");
        Ok((
            out,
            Some(BlockActs {
                x: x.clone(),
                q_ctx: ctx(q_ctx),
                k_ctx: ctx(k_ctx),
                v_ctx: ctx(v_ctx),
                q_pre_norm,
                k_pre_norm,
                q,
                k: key,
                v: value,
                attn,
                lse,
                o_ctx: ctx(o_ctx),
                o_pre_norm,
                attn_mask,
                h: hres,
                gate_ctx: ctx(gate_ctx),
                up_ctx: ctx(up_ctx),
                gate,
                up,
                down_ctx: ctx(down_ctx),
                down_pre_norm,
                ffn_mask,
            }),
        ))
    }

    /// Backward of an optional norm: the gradient of its input, its weight's gradient added.
    fn norm_backward(
        &self,
        norm: SavedNorm,
        d: Tensor,
        pass: &Pass,
        grads: &mut Grads,
    ) -> Result<Tensor, ModelError> {
        let (Some(w), Some(input)) = (norm.weight, norm.input) else {
            return Ok(d);
        };
        let (dx, dw) = if norm.per_head {
            head_norm_backward(&input, w, &d, pass.eps)?
        } else {
            k::rms_norm_backward(&input, w, &d, pass.eps)?
        };
        if pass.train_base {
            grads.accumulate(&self.name(norm.name), &dw)?;
        }
        Ok(dx)
    }

    /// Backward of one block: takes `dout` (gradient of the block output), adds the trainable
    /// gradients into `grads`, returns the gradient of the block input.
    pub(crate) fn backward(
        &self,
        a: BlockActs,
        dout: Tensor,
        pass: &Pass,
        grads: &mut Grads,
    ) -> Result<Tensor, ModelError> {
        let Heads { h, hkv, .. } = pass.heads;
        let eps = pass.eps;

        // out = h + drop(post(w2(act(w1 hn, w3 hn)))),  hn = ffn_norm(h)
        let dffn = match &a.ffn_mask {
            Some(m) => (&dout * m)?,
            None => dout.clone(),
        };
        let dffn = self.norm_backward(
            SavedNorm {
                name: "post_ffn_norm.weight",
                weight: self.post_ffn_norm.as_ref(),
                input: a.down_pre_norm,
                per_head: false,
            },
            dffn,
            pass,
            grads,
        )?;
        let dact = self.w2.backward(a.down_ctx, &dffn, grads)?; // (n, f)
        let (dgate, dup) = pass.gate_backward(&a.gate, &a.up, &dact)?;
        let dhn = (self.w1.backward(a.gate_ctx, &dgate, grads)?
            + self.w3.backward(a.up_ctx, &dup, grads)?)?;
        let (dh_norm, d_ffn_norm) = k::rms_norm_backward(&a.h, &self.ffn_norm, &dhn, eps)?;
        if pass.train_base {
            grads.accumulate(&self.name("ffn_norm.weight"), &d_ffn_norm)?;
        }
        let dh = (dout + dh_norm)?;

        // h = x + drop(post(wo(attention(attention_norm(x)))))
        let dattn_out = match &a.attn_mask {
            Some(m) => (&dh * m)?,
            None => dh.clone(),
        };
        let dattn_out = self.norm_backward(
            SavedNorm {
                name: "post_attention_norm.weight",
                weight: self.post_attention_norm.as_ref(),
                input: a.o_pre_norm,
                per_head: false,
            },
            dattn_out,
            pass,
            grads,
        )?;
        let dattn = self.wo.backward(a.o_ctx, &dattn_out, grads)?; // (n, h*hd)
        let dattn = pass.split_heads(&dattn, h)?.contiguous()?; // (b, h, t, hd)
        let (dq, dk, dv) = attention_backward(
            &a.q,
            &a.k,
            &a.v,
            &a.attn,
            &a.lse,
            &dattn,
            pass.scale,
            pass.mask(&self.attn),
        )?;
        let dq = pass.merge_heads(&pass.rope(&dq, &self.attn, true)?)?;
        let dk = pass.merge_heads(&pass.rope(&dk, &self.attn, true)?)?;
        debug_assert_eq!(dk.dim(1)?, hkv * pass.heads.hd);
        let dq = self.norm_backward(
            SavedNorm {
                name: "attention.q_norm.weight",
                weight: self.q_norm.as_ref(),
                input: a.q_pre_norm,
                per_head: true,
            },
            dq,
            pass,
            grads,
        )?;
        let dk = self.norm_backward(
            SavedNorm {
                name: "attention.k_norm.weight",
                weight: self.k_norm.as_ref(),
                input: a.k_pre_norm,
                per_head: true,
            },
            dk,
            pass,
            grads,
        )?;
        let dv = pass.merge_heads(&dv)?;
        let dxn = ((self.wq.backward(a.q_ctx, &dq, grads)?
            + self.wk.backward(a.k_ctx, &dk, grads)?)?
            + self.wv.backward(a.v_ctx, &dv, grads)?)?;
        let (dx_norm, d_attn_norm) = k::rms_norm_backward(&a.x, &self.attention_norm, &dxn, eps)?;
        if pass.train_base {
            grads.accumulate(&self.name("attention_norm.weight"), &d_attn_norm)?;
        }
        Ok((dh + dx_norm)?)
    }

    /// The decode fast path: one new token for each of `m` rows, `x (m, d)` updated in place.
    /// The same math as [`Block::forward`] on plain rows ([`kiln_kernels::rows`]); every
    /// projection runs once over all `m` rows, so the weights are read once per step. Row `i`
    /// sits at `positions[i]` and attends to its own cached keys (`rows[i]` of the cache).
    pub(crate) fn decode_rows(
        &self,
        x: &mut [f32],
        step: &DecodeStep,
        cache: &mut KvCache,
    ) -> Result<(), ModelError> {
        let m = step.rows.len();
        let Heads { h, hkv, hd } = step.heads;
        let group = h / hkv;
        let mut xn = x.to_vec();
        rows::with_values(&self.attention_norm, |w| {
            rows::rms_norm_rows(&mut xn, w, step.eps)
        })?;
        let (mut q, mut k, mut v) = match &self.fused {
            Some((qkv, _)) => {
                let y = qkv.forward_rows(&xn, m)?;
                let mut q = Vec::with_capacity(m * h * hd);
                let mut k = Vec::with_capacity(m * hkv * hd);
                let mut v = Vec::with_capacity(m * hkv * hd);
                for row in y.chunks_exact((h + 2 * hkv) * hd) {
                    q.extend_from_slice(&row[..h * hd]);
                    k.extend_from_slice(&row[h * hd..(h + hkv) * hd]);
                    v.extend_from_slice(&row[(h + hkv) * hd..]);
                }
                (q, k, v)
            }
            None => (
                self.wq.forward_rows(&xn, m)?,
                self.wk.forward_rows(&xn, m)?,
                self.wv.forward_rows(&xn, m)?,
            ),
        };
        if self.fused.is_some() {
            // The stacked product is the base's: add each part's attached adapter.
            self.wq.add_lora_rows(&xn, m, &mut q)?;
            self.wk.add_lora_rows(&xn, m, &mut k)?;
            self.wv.add_lora_rows(&xn, m, &mut v)?;
        }
        if let Some(ids) = step.adapters {
            self.wq.add_served_rows(&xn, m, ids, &mut q);
            self.wk.add_served_rows(&xn, m, ids, &mut k);
            self.wv.add_served_rows(&xn, m, ids, &mut v);
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            rows::with_values(qn, |w| rows::rms_norm_rows(&mut q, w, step.eps))?;
            rows::with_values(kn, |w| rows::rms_norm_rows(&mut k, w, step.eps))?;
        }
        let tables = step.rope.for_layer(self.attn.rope);
        for (i, &pos) in step.positions.iter().enumerate() {
            if let Some(t) = tables {
                let (q_row, k_row) = (
                    &mut q[i * h * hd..(i + 1) * h * hd],
                    &mut k[i * hkv * hd..(i + 1) * hkv * hd],
                );
                rows::with_values(&t.cos.get(pos)?, |cos| {
                    rows::with_values(&t.sin.get(pos)?, |sin| {
                        rows::rope_row(q_row, h, hd, cos, sin);
                        rows::rope_row(k_row, hkv, hd, cos, sin);
                    })
                })??;
            }
            let layer = cache.layer_mut(step.rows[i], self.index);
            for g in 0..hkv {
                let o = (i * hkv + g) * hd;
                layer.k[g].extend_from_slice(&k[o..o + hd]);
                layer.v[g].extend_from_slice(&v[o..o + hd]);
            }
        }
        // Attention: each (row, head) over that row's cached keys.
        let cache_ro = &*cache;
        let mut att = vec![0f32; m * h * hd];
        let head = |idx: usize, out: &mut [f32]| {
            let (i, hh) = (idx / h, idx % h);
            let layer = &cache_ro.row(step.rows[i]).layers[self.index];
            let qh = &q[(i * h + hh) * hd..(i * h + hh + 1) * hd];
            let (keys, values) = (&layer.k[hh / group], &layer.v[hh / group]);
            let mask = rows::CachedMask {
                window: self.attn.window,
                softcap: step.softcap,
            };
            rows::attend_cached(qh, keys, values, step.scale, mask, out);
        };
        let work: usize = step.positions.iter().map(|p| p + 1).sum::<usize>() * h * hd;
        if work >= 1 << 16 {
            use rayon::prelude::*;
            att.par_chunks_mut(hd)
                .enumerate()
                .for_each(|(idx, out)| head(idx, out));
        } else {
            for (idx, out) in att.chunks_mut(hd).enumerate() {
                head(idx, out);
            }
        }
        let mut o = self.wo.forward_rows(&att, m)?;
        if let Some(ids) = step.adapters {
            self.wo.add_served_rows(&att, m, ids, &mut o);
        }
        if let Some(w) = &self.post_attention_norm {
            rows::with_values(w, |w| rows::rms_norm_rows(&mut o, w, step.eps))?;
        }
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let mut xn = x.to_vec();
        rows::with_values(&self.ffn_norm, |w| {
            rows::rms_norm_rows(&mut xn, w, step.eps)
        })?;
        let (mut gate, mut up) = match &self.fused {
            Some((_, w13)) => {
                let y = w13.forward_rows(&xn, m)?;
                let f = y.len() / m / 2;
                let mut g = Vec::with_capacity(m * f);
                let mut u = Vec::with_capacity(m * f);
                for row in y.chunks_exact(2 * f) {
                    g.extend_from_slice(&row[..f]);
                    u.extend_from_slice(&row[f..]);
                }
                (g, u)
            }
            None => (self.w1.forward_rows(&xn, m)?, self.w3.forward_rows(&xn, m)?),
        };
        if self.fused.is_some() {
            self.w1.add_lora_rows(&xn, m, &mut gate)?;
            self.w3.add_lora_rows(&xn, m, &mut up)?;
        }
        if let Some(ids) = step.adapters {
            self.w1.add_served_rows(&xn, m, ids, &mut gate);
            self.w3.add_served_rows(&xn, m, ids, &mut up);
        }
        let act = match step.activation {
            Activation::Silu => rows::swiglu_rows(&gate, &up),
            Activation::GeluTanh => rows::gelu_tanh_gate_rows(&gate, &up),
        };
        let mut down = self.w2.forward_rows(&act, m)?;
        if let Some(ids) = step.adapters {
            self.w2.add_served_rows(&act, m, ids, &mut down);
        }
        if let Some(w) = &self.post_ffn_norm {
            rows::with_values(w, |w| rows::rms_norm_rows(&mut down, w, step.eps))?;
        }
        x.iter_mut().zip(&down).for_each(|(x, o)| *x += o);
        Ok(())
    }
}

/// What every block of one decode step shares.
pub(crate) struct DecodeStep<'a> {
    /// The cache row of each of the step's rows, and its position.
    pub(crate) rows: &'a [usize],
    /// Each row's served adapter (0 for none), when any row has one.
    pub(crate) adapters: Option<&'a [u16]>,
    pub(crate) positions: &'a [usize],
    pub(crate) heads: Heads,
    pub(crate) eps: f32,
    pub(crate) scale: f32,
    pub(crate) softcap: Option<f32>,
    pub(crate) activation: Activation,
    pub(crate) rope: &'a crate::rope::ModelRope,
}
