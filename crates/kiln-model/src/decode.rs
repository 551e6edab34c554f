//! The decode fast path: one new token for each of B rows, on plain vectors.
//!
//! Decoding is memory-bound on the weights, and at ~1,000 small ops per token the per-op
//! overhead of the tensor path would be a third of the time. This is the same math as
//! block.rs (tested against it), with every projection still a [`Linear`] (adapters
//! included) run once over all B rows, so the weights are read once per step, not B times.
//! Each row sits at its own position and attends to its own cached keys.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::model::{vec_of, Embedding};
use crate::{KvCache, Llama, ModelError};

/// `sum(a * b)` with independent partial sums, so it vectorises.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// RMSNorm of each `w.len()`-long row, as kiln's fused kernel computes it.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let rinv = 1.0 / (dot(row, row) / d as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(x, w)| x * rinv * w));
    }
    out
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

impl Llama {
    fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let d = self.cfg.dim;
        let mut x = vec![0f32; ids.len() * d];
        for (o, &id) in x.chunks_exact_mut(d).zip(ids) {
            match &self.embedding {
                Embedding::Raw(r) => r.dequantize_row(id as usize, o),
                Embedding::Dense(t) => o.copy_from_slice(&vec_of(&t.get(id as usize)?)?),
                Embedding::Quant(q) => o.copy_from_slice(&vec_of(
                    &q.embedding(&Tensor::new(&[id], &candle_core::Device::Cpu)?)?,
                )?),
            }
        }
        Ok(x)
    }

    /// See [`crate::CausalLm::decode_step`].
    pub(crate) fn decode_rows(
        &self,
        rows: &[usize],
        tokens: &[u32],
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
        let (h, hkv, hd) = (cfg.n_heads, cfg.n_kv_heads(), cfg.head_dim());
        let (half, group) = (hd / 2, h / hkv);
        let n_rows = seen[m - 1] + 1;
        cache.ensure(n_rows, cfg.n_layers, hkv);
        let positions: Vec<usize> = rows.iter().map(|&r| cache.row_len(r)).collect();
        for &p in &positions {
            self.check_len(p, 1)?;
        }
        let eps = cfg.norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut x = self.embed_rows(tokens)?; // (m, d)
        for block in &self.layers {
            let xn = rms_norm_rows(&x, &block.attention_norm_v, eps);
            let (q, k, v) = match &block.fused {
                Some((qkv, _)) => {
                    let y = qkv.forward_rows(&xn, m)?;
                    let w = (h + 2 * hkv) * hd;
                    let mut q = Vec::with_capacity(m * h * hd);
                    let mut k = Vec::with_capacity(m * hkv * hd);
                    let mut v = Vec::with_capacity(m * hkv * hd);
                    for row in y.chunks_exact(w) {
                        q.extend_from_slice(&row[..h * hd]);
                        k.extend_from_slice(&row[h * hd..(h + hkv) * hd]);
                        v.extend_from_slice(&row[(h + hkv) * hd..]);
                    }
                    (q, k, v)
                }
                None => (
                    block.wq.forward_rows(&xn, m)?,
                    block.wk.forward_rows(&xn, m)?,
                    block.wv.forward_rows(&xn, m)?,
                ),
            };
            let mut q = q;
            let mut k = k;
            for (i, &pos) in positions.iter().enumerate() {
                let cos = &self.rope_cos_v[pos * half..(pos + 1) * half];
                let sin = &self.rope_sin_v[pos * half..(pos + 1) * half];
                rope_row(&mut q[i * h * hd..(i + 1) * h * hd], h, hd, cos, sin);
                rope_row(&mut k[i * hkv * hd..(i + 1) * hkv * hd], hkv, hd, cos, sin);
                let layer = cache.layer_mut(rows[i], block.index);
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
                let layer = &cache_ro.row(rows[i]).layers[block.index];
                let (kc, vc) = (&layer.k[hh / group], &layer.v[hh / group]);
                let t_all = kc.len() / hd;
                let qh = &q[(i * h + hh) * hd..(i * h + hh + 1) * hd];
                let mut p: Vec<f32> = (0..t_all)
                    .map(|t| dot(qh, &kc[t * hd..(t + 1) * hd]) * scale)
                    .collect();
                let mx = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0f32;
                for s in p.iter_mut() {
                    *s = (*s - mx).exp();
                    z += *s;
                }
                for (t, s) in p.iter().enumerate() {
                    let w = s / z;
                    for (o, v) in out.iter_mut().zip(&vc[t * hd..(t + 1) * hd]) {
                        *o += w * v;
                    }
                }
            };
            let work: usize = positions.iter().map(|p| p + 1).sum::<usize>() * h * hd;
            if work >= 1 << 16 {
                att.par_chunks_mut(hd)
                    .enumerate()
                    .for_each(|(idx, out)| head(idx, out));
            } else {
                for (idx, out) in att.chunks_mut(hd).enumerate() {
                    head(idx, out);
                }
            }
            for (x, o) in x.iter_mut().zip(block.wo.forward_rows(&att, m)?) {
                *x += o;
            }
            let xn = rms_norm_rows(&x, &block.ffn_norm_v, eps);
            let (gate, up) = match &block.fused {
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
                None => (
                    block.w1.forward_rows(&xn, m)?,
                    block.w3.forward_rows(&xn, m)?,
                ),
            };
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (x, o) in x.iter_mut().zip(block.w2.forward_rows(&act, m)?) {
                *x += o;
            }
        }
        for &r in rows {
            cache.advance(r, 1);
        }
        let xn = rms_norm_rows(&x, &self.norm_v, eps);
        let logits = self.output.forward_rows(&xn, m)?;
        Ok(Tensor::from_vec(logits, (m, cfg.vocab_size), &self.device)?)
    }
}
