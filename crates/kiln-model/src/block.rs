//! One decoder block, written once: the training forward (saving what the backward needs, or
//! not), the hand-written backward, and the prefill path over a KV cache, for dense and
//! quantised weights alike (every projection is a [`Linear`]).
//!
//! ```text
//! h   = x + drop(Wo · Attn(RoPE(Wq · RMSNorm(x)), RoPE(Wk · …), Wv · …))
//! out = h + drop(W2 · (SiLU(W1 · RMSNorm(h)) ⊙ W3 · RMSNorm(h)))          (SwiGLU)
//! ```
//! The backward is the chain rule written out with the fused kernels' explicit `*_backward`
//! functions (llm.c style); weights are `(out, in)`, so `y = x W^T`, `dx = dy W`, `dW = dy^T x`.

use candle_core::Tensor;
use kiln_kernels as k;

use crate::linear::{dropout_mask, Linear, LinearCtx};
use crate::{Grads, KvCache, ModelError, SplitMix64};
use kiln_kernels::{attention, attention_backward, AttentionMask};

pub(crate) struct Block {
    pub(crate) index: usize,
    pub(crate) attention_norm: Tensor, // (d)
    pub(crate) wq: Linear,             // (h*hd, d)
    pub(crate) wk: Linear,             // (hkv*hd, d)
    pub(crate) wv: Linear,             // (hkv*hd, d)
    pub(crate) wo: Linear,             // (d, h*hd)
    pub(crate) ffn_norm: Tensor,       // (d)
    pub(crate) w1: Linear,             // (f, d) gate
    pub(crate) w3: Linear,             // (f, d) up
    pub(crate) w2: Linear,             // (d, f) down
    /// Q|K|V and gate|up stacked into one matrix each, for inference with kiln's block
    /// kernels (one pass over the activations instead of three or two).
    pub(crate) fused: Option<(Linear, Linear)>,
    /// Plain copies of the norm weights for the decode fast path.
    pub(crate) attention_norm_v: Vec<f32>,
    pub(crate) ffn_norm_v: Vec<f32>,
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
    /// Every row at the same positions: `(t, hd/2)` tables.
    Shared(Tensor, Tensor),
    /// Per-row positions (packed rows restart at each segment): one table pair per row.
    PerRow(Vec<(Tensor, Tensor)>),
}

impl RopeAt {
    /// `x (b, n, t, hd)` → rotated, contiguous.
    fn apply(&self, x: &Tensor, inverse: bool) -> candle_core::Result<Tensor> {
        let f = if inverse { k::rope_backward } else { k::rope };
        match self {
            RopeAt::Shared(cos, sin) => f(x, cos, sin),
            RopeAt::PerRow(tables) => {
                let rows = tables
                    .iter()
                    .enumerate()
                    .map(|(r, (cos, sin))| f(&x.narrow(0, r, 1)?, cos, sin))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
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
    pub(crate) rope: RopeAt,
    /// `(b, t)` u32 segment ids of packed rows.
    pub(crate) segment_ids: Option<Tensor>,
    /// Residual-branch dropout probability (the config's) and the RNG that draws its masks
    /// (and LoRA dropout masks); None when dropout is off.
    pub(crate) dropout_p: f64,
    pub(crate) dropout: Option<&'a mut SplitMix64>,
    /// Whether norms get gradients (false when only adapters train).
    pub(crate) train_base: bool,
}

impl Pass<'_> {
    fn mask(&self) -> AttentionMask<'_> {
        AttentionMask {
            causal: self.causal,
            segment_ids: self.segment_ids.as_ref(),
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
}

/// What one block's forward keeps for its backward.
pub(crate) struct BlockActs {
    x: Tensor, // (n, d) block input
    q_ctx: LinearCtx,
    k_ctx: LinearCtx,
    v_ctx: LinearCtx,
    q: Tensor, // (b, h, t, hd) after RoPE
    k: Tensor, // (b, hkv, t, hd) after RoPE
    v: Tensor, // (b, hkv, t, hd)
    attn: Tensor,
    lse: Tensor,
    o_ctx: LinearCtx,
    attn_mask: Option<Tensor>,
    h: Tensor, // (n, d) x + attention
    gate_ctx: LinearCtx,
    up_ctx: LinearCtx,
    gate: Tensor,
    up: Tensor,
    down_ctx: LinearCtx,
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
        Ok((l.forward(x)?, None))
    }
}

impl Block {
    pub(crate) fn name(&self, s: &str) -> String {
        format!("layers.{}.{s}", self.index)
    }

    /// `x (n, d)` → block output `(n, d)`, with the saved activations when `save`. With a
    /// cache, the pass's keys and values are appended to it and the queries attend to every
    /// cached position of their row.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pass: &mut Pass,
        cache: Option<&mut KvCache>,
        save: bool,
    ) -> Result<(Tensor, Option<BlockActs>), ModelError> {
        let Heads { h, hkv, hd } = pass.heads;
        let xn = k::rms_norm(x, &self.attention_norm, pass.eps)?;
        let (q, k_lin, v_lin, q_ctx, k_ctx, v_ctx) = match (&self.fused, save) {
            (Some((qkv, _)), false) => {
                let y = qkv.forward(&xn)?;
                (
                    y.narrow(1, 0, h * hd)?.contiguous()?,
                    y.narrow(1, h * hd, hkv * hd)?.contiguous()?,
                    y.narrow(1, (h + hkv) * hd, hkv * hd)?.contiguous()?,
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
        let q = pass.rope.apply(&pass.split_heads(&q, h)?, false)?;
        let key = pass.rope.apply(&pass.split_heads(&k_lin, hkv)?, false)?;
        let value = pass.split_heads(&v_lin, hkv)?.contiguous()?;
        let (key_all, value_all) = match cache {
            Some(c) => c.append_tensors(self.index, &key, &value)?,
            None => (key.clone(), value.clone()),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let (attn, lse) = attention(&q, &key_all, &value_all, scale, pass.mask())?;
        let attn_flat = pass.merge_heads(&attn)?;
        let (o, o_ctx) = project(&self.wo, &attn_flat, save, pass)?;
        let (o, attn_mask) = pass.residual_dropout(o)?;
        let hres = (x + o)?;
        let hn = k::rms_norm(&hres, &self.ffn_norm, pass.eps)?;
        let (gate, up, gate_ctx, up_ctx) = match (&self.fused, save) {
            (Some((_, w13)), false) => {
                let y = w13.forward(&hn)?;
                let f = y.dim(1)? / 2;
                (
                    y.narrow(1, 0, f)?.contiguous()?,
                    y.narrow(1, f, f)?.contiguous()?,
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
        let act = k::swiglu(&gate, &up)?;
        let (down, down_ctx) = project(&self.w2, &act, save, pass)?;
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
                q,
                k: key,
                v: value,
                attn,
                lse,
                o_ctx: ctx(o_ctx),
                attn_mask,
                h: hres,
                gate_ctx: ctx(gate_ctx),
                up_ctx: ctx(up_ctx),
                gate,
                up,
                down_ctx: ctx(down_ctx),
                ffn_mask,
            }),
        ))
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
        let Heads { h, hd, .. } = pass.heads;
        let eps = pass.eps;

        // out = h + drop(w2(swiglu(w1 hn, w3 hn))),  hn = ffn_norm(h)
        let dffn = match &a.ffn_mask {
            Some(m) => (&dout * m)?,
            None => dout.clone(),
        };
        let dact = self.w2.backward(a.down_ctx, &dffn, grads)?; // (n, f)
        let (dgate, dup) = k::swiglu_backward(&a.gate, &a.up, &dact)?;
        let dhn = (self.w1.backward(a.gate_ctx, &dgate, grads)?
            + self.w3.backward(a.up_ctx, &dup, grads)?)?;
        let (dh_norm, d_ffn_norm) = k::rms_norm_backward(&a.h, &self.ffn_norm, &dhn, eps)?;
        if pass.train_base {
            grads.accumulate(&self.name("ffn_norm.weight"), &d_ffn_norm)?;
        }
        let dh = (dout + dh_norm)?;

        // h = x + drop(wo(attention(attention_norm(x))))
        let dattn_out = match &a.attn_mask {
            Some(m) => (&dh * m)?,
            None => dh.clone(),
        };
        let dattn = self.wo.backward(a.o_ctx, &dattn_out, grads)?; // (n, h*hd)
        let dattn = pass.split_heads(&dattn, h)?.contiguous()?; // (b, h, t, hd)
        let scale = 1.0 / (hd as f64).sqrt();
        let (dq, dk, dv) = attention_backward(
            &a.q,
            &a.k,
            &a.v,
            &a.attn,
            &a.lse,
            &dattn,
            scale,
            pass.mask(),
        )?;
        let dq = pass.merge_heads(&pass.rope.apply(&dq, true)?)?;
        let dk = pass.merge_heads(&pass.rope.apply(&dk, true)?)?;
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
}
