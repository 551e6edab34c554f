//! The training pass with a hand-written backward (llm.c style): the forward saves exactly the
//! activations the backward needs, and the backward is the chain rule written out layer by
//! layer with the fused kernels' explicit `*_backward` functions.
//!
//! Why not candle's autograd: it allocates a zeroed gradient buffer and runs an extra add for
//! every node of the graph (reshapes and transposes included), which made the backward 3x the
//! forward on the reference config instead of about 2x (docs/benchmarks.md). The autograd
//! path (`Llama::forward_train` + `backward()`) stays as the reference: a test requires both
//! to give the same gradients.
//!
//! Weights are `(out, in)`, so a projection is `y = x W^T` and its backward is
//! `dx = dy W`, `dW = dy^T x`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use kiln_kernels as k;

use crate::model::{Block, Pass};
use crate::{AttentionMode, Llama, ModelError, SplitMix64};

/// What one block's forward keeps for its backward.
struct BlockActs {
    x: Tensor,                 // (n, d) block input
    xn: Tensor,                // (n, d) attention_norm(x)
    q: Tensor,                 // (b, h, t, hd) after RoPE
    k: Tensor,                 // (b, hkv, t, hd) after RoPE
    v: Tensor,                 // (b, hkv, t, hd)
    probs: Tensor,             // (b, h, t, t)
    attn: Tensor,              // (n, h*hd) attention output before wo
    attn_mask: Option<Tensor>, // dropout mask (scaled), (n, d)
    h: Tensor,                 // (n, d) x + attention
    hn: Tensor,                // (n, d) ffn_norm(h)
    gate: Tensor,              // (n, f)
    up: Tensor,                // (n, f)
    act: Tensor,               // (n, f) swiglu(gate, up)
    ffn_mask: Option<Tensor>,
}

/// `x W^T` for `x (n, in)` and `W (out, in)`.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

/// Adds `g` into `grads[name]`.
fn accumulate(
    grads: &mut BTreeMap<String, Tensor>,
    name: String,
    g: Tensor,
) -> candle_core::Result<()> {
    let g = match grads.remove(&name) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    grads.insert(name, g);
    Ok(())
}

impl Llama {
    /// Forward and hand-written backward of `loss_scale * sum(cross-entropy)` over the
    /// targets != -100 of one micro-batch: `tokens (b, t)` u32, `targets (b*t)` i64. Adds every
    /// parameter's gradient into `grads` (keyed by parameter name) and returns the loss sum.
    pub fn forward_backward(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        loss_scale: f64,
        grads: &mut BTreeMap<String, Tensor>,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<f64, ModelError> {
        let (b, t) = tokens.dims2()?;
        self.check_len(0, t)?;
        let targets = targets.flatten_all()?;
        let mut pass = Pass {
            b,
            t,
            pos: 0,
            dropout: dropout_rng.filter(|_| self.cfg.dropout > 0.0),
        };
        let eps = self.cfg.norm_eps;
        let ids = tokens.flatten_all()?;
        let mut x = self.embed(tokens)?.detach(); // (n, d)
        let mut acts = Vec::with_capacity(self.layers.len());
        for block in &self.layers {
            let (out, a) = self.block_forward_saving(block, &x, &mut pass)?;
            acts.push(a);
            x = out;
        }
        let final_norm = self.norm.detach();
        let xf = k::rms_norm(&x, &final_norm, eps)?; // (n, d)
        let output = self.output.detach();
        let logits = linear(&xf, &output)?; // (n, v)
        let loss_sum = k::cross_entropy_sum(&logits, &targets)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;

        // Backward, from the loss down.
        let dlogits = k::cross_entropy_backward(&logits, &targets, loss_scale)?; // (n, v)
        drop(logits);
        let d_output = dlogits.t()?.matmul(&xf)?; // (v, d)
        let dxf = dlogits.matmul(&output)?; // (n, d)
        drop(dlogits);
        let (mut dx, d_norm) = k::rms_norm_backward(&x, &final_norm, &dxf, eps)?;
        accumulate(grads, "norm.weight".into(), d_norm)?;
        let mut d_embedding = None;
        if self.cfg.tie_embeddings {
            d_embedding = Some(d_output);
        } else {
            accumulate(grads, "output.weight".into(), d_output)?;
        }
        for (i, (block, a)) in self.layers.iter().zip(acts).enumerate().rev() {
            dx = self.block_backward(i, block, a, dx, &pass, grads)?;
        }
        // Embedding lookup: scatter-add the rows of dx into the table's gradient.
        let zeros = Tensor::zeros((self.cfg.vocab_size, self.cfg.dim), dx.dtype(), dx.device())?;
        let mut d_table = zeros.index_add(&ids, &dx, 0)?;
        if let Some(tied) = d_embedding {
            d_table = (d_table + tied)?;
        }
        accumulate(grads, "tok_embeddings.weight".into(), d_table)?;
        Ok(loss_sum)
    }

    fn block_forward_saving(
        &self,
        block: &Block,
        x: &Tensor,
        pass: &mut Pass,
    ) -> Result<(Tensor, BlockActs), ModelError> {
        let (b, t) = (pass.b, pass.t);
        let (h, hkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads(), self.cfg.head_dim());
        let g = h / hkv;
        let eps = self.cfg.norm_eps;
        let a = &block.attention;
        let xn = k::rms_norm(x, &block.attention_norm.detach(), eps)?;
        let cos = self.rope_cos.narrow(0, 0, t)?;
        let sin = self.rope_sin.narrow(0, 0, t)?;
        let heads = |w: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            linear(&xn, &w.detach())?
                .reshape((b, t, n, hd))?
                .transpose(1, 2) // (b, n, t, hd)
        };
        let q = k::rope(&heads(&a.wq, h)?, &cos, &sin)?;
        let key = k::rope(&heads(&a.wk, hkv)?, &cos, &sin)?;
        let value = heads(&a.wv, hkv)?.contiguous()?;
        let scores = q
            .reshape((b, hkv, g * t, hd))?
            .matmul(&key.t()?)?
            .reshape((b, h, t, t))?;
        let causal = self.cfg.attention == AttentionMode::Causal;
        let probs = k::masked_softmax(&scores, 1.0 / (hd as f64).sqrt(), causal)?;
        drop(scores);
        let attn = probs
            .reshape((b, hkv, g * t, t))?
            .matmul(&value)? // (b, hkv, g*t, hd)
            .reshape((b, h, t, hd))?
            .transpose(1, 2)? // (b, t, h, hd)
            .contiguous()?
            .reshape((b * t, h * hd))?;
        let attn_out = linear(&attn, &a.wo.detach())?;
        let attn_mask = self.dropout_mask(&attn_out, pass)?;
        let attn_out = match &attn_mask {
            Some(m) => (attn_out * m)?,
            None => attn_out,
        };
        let hres = (x + attn_out)?;
        let f = &block.feed_forward;
        let hn = k::rms_norm(&hres, &block.ffn_norm.detach(), eps)?;
        let gate = linear(&hn, &f.w1.detach())?;
        let up = linear(&hn, &f.w3.detach())?;
        let act = k::swiglu(&gate, &up)?;
        let ffn_out = linear(&act, &f.w2.detach())?;
        let ffn_mask = self.dropout_mask(&ffn_out, pass)?;
        let ffn_out = match &ffn_mask {
            Some(m) => (ffn_out * m)?,
            None => ffn_out,
        };
        let out = (&hres + ffn_out)?;
        let acts = BlockActs {
            x: x.clone(),
            xn,
            q,
            k: key,
            v: value,
            probs,
            attn,
            attn_mask,
            h: hres,
            hn,
            gate,
            up,
            act,
            ffn_mask,
        };
        Ok((out, acts))
    }

    /// Backward of one block: takes `dout` (gradient of the block output), adds the weight
    /// gradients into `grads`, returns the gradient of the block input.
    fn block_backward(
        &self,
        layer: usize,
        block: &Block,
        a: BlockActs,
        dout: Tensor,
        pass: &Pass,
        grads: &mut BTreeMap<String, Tensor>,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = (pass.b, pass.t);
        let (h, hkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads(), self.cfg.head_dim());
        let g = h / hkv;
        let eps = self.cfg.norm_eps;
        let name = |s: &str| format!("layers.{layer}.{s}");
        let f = &block.feed_forward;

        // out = h + dropout(w2(swiglu(w1 hn, w3 hn))),  hn = ffn_norm(h)
        let dffn = match &a.ffn_mask {
            Some(m) => (&dout * m)?,
            None => dout.clone(),
        };
        accumulate(
            grads,
            name("feed_forward.w2.weight"),
            dffn.t()?.matmul(&a.act)?,
        )?;
        let dact = dffn.matmul(&f.w2.detach())?; // (n, f)
        let (dgate, dup) = k::swiglu_backward(&a.gate, &a.up, &dact)?;
        accumulate(
            grads,
            name("feed_forward.w1.weight"),
            dgate.t()?.matmul(&a.hn)?,
        )?;
        accumulate(
            grads,
            name("feed_forward.w3.weight"),
            dup.t()?.matmul(&a.hn)?,
        )?;
        let dhn = (dgate.matmul(&f.w1.detach())? + dup.matmul(&f.w3.detach())?)?;
        let (dh_norm, d_ffn_norm) =
            k::rms_norm_backward(&a.h, &block.ffn_norm.detach(), &dhn, eps)?;
        accumulate(grads, name("ffn_norm.weight"), d_ffn_norm)?;
        let dh = (dout + dh_norm)?;

        // h = x + dropout(wo(attention(attention_norm(x))))
        let at = &block.attention;
        let dattn_out = match &a.attn_mask {
            Some(m) => (&dh * m)?,
            None => dh.clone(),
        };
        accumulate(
            grads,
            name("attention.wo.weight"),
            dattn_out.t()?.matmul(&a.attn)?,
        )?;
        let dattn = dattn_out
            .matmul(&at.wo.detach())? // (n, h*hd)
            .reshape((b, t, h, hd))?
            .transpose(1, 2)? // (b, h, t, hd)
            .contiguous()?
            .reshape((b, hkv, g * t, hd))?;
        let probs = a.probs.reshape((b, hkv, g * t, t))?;
        let dprobs = dattn.matmul(&a.v.t()?)?.reshape((b, h, t, t))?; // (b, h, t, t)
        let dv = probs.t()?.matmul(&dattn)?; // (b, hkv, t, hd)
        drop(dattn);
        let dscores = k::masked_softmax_backward(&a.probs, &dprobs, 1.0 / (hd as f64).sqrt())?
            .reshape((b, hkv, g * t, t))?;
        drop(dprobs);
        let dq = dscores.matmul(&a.k)?.reshape((b, h, t, hd))?; // (b, h, t, hd)
        let dk = dscores.t()?.matmul(&a.q.reshape((b, hkv, g * t, hd))?)?; // (b, hkv, t, hd)
        drop(dscores);
        let cos = self.rope_cos.narrow(0, 0, t)?;
        let sin = self.rope_sin.narrow(0, 0, t)?;
        // (b, heads, t, hd) -> (n, heads*hd), the layout of the projection output.
        let flat = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.transpose(1, 2)?.contiguous()?.reshape((b * t, n * hd))
        };
        let dq = flat(k::rope_backward(&dq, &cos, &sin)?, h)?;
        let dk = flat(k::rope_backward(&dk, &cos, &sin)?, hkv)?;
        let dv = flat(dv, hkv)?;
        accumulate(grads, name("attention.wq.weight"), dq.t()?.matmul(&a.xn)?)?;
        accumulate(grads, name("attention.wk.weight"), dk.t()?.matmul(&a.xn)?)?;
        accumulate(grads, name("attention.wv.weight"), dv.t()?.matmul(&a.xn)?)?;
        let dxn = ((dq.matmul(&at.wq.detach())? + dk.matmul(&at.wk.detach())?)?
            + dv.matmul(&at.wv.detach())?)?;
        let (dx_norm, d_attn_norm) =
            k::rms_norm_backward(&a.x, &block.attention_norm.detach(), &dxn, eps)?;
        accumulate(grads, name("attention_norm.weight"), d_attn_norm)?;
        Ok((dh + dx_norm)?)
    }
}
