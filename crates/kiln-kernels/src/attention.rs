//! Fused scaled-dot-product attention (FlashAttention-2 style), forward and backward.
//!
//! Shapes: q (b, h, tq, hd); k, v (b, hkv, tk, hd) with `h % hkv == 0`; query head `i` reads kv
//! head `i / (h / hkv)` (GQA). Query row `i` sits at absolute position `p_i = tk - tq + i`, and
//! key `j` is visible to it iff `(!causal || j <= p_i) && seg[j] == seg[p_i]` (the segment test
//! only with segment ids) and, with a sliding window `w`, `|p_i - j| < w` (Mistral's and Gemma's
//! local layers; both sides for bidirectional encoders such as EmbeddingGemma). With `s_ij = scale * q_i . k_j` over visible pairs
//! (soft-capped to `c tanh(s_ij / c)` when a cap `c` is set, Gemma 2; the backward then scales
//! `g_ij` by `1 - tanh^2(s_ij / c)`, the derivative of the cap):
//!
//! ```text
//! forward, key tiles T_1, T_2, ... in order (online softmax), per query row i:
//!   m_i <- max(m_i, max_{j in T} s_ij)                    (m_i starts at -inf, l_i and o_i at 0)
//!   a    = exp(m_i_old - m_i)
//!   l_i <- a * l_i + sum_{j in T} exp(s_ij - m_i)
//!   o_i <- a * o_i + sum_{j in T} exp(s_ij - m_i) v_j
//! out_i = o_i / l_i,   lse_i = m_i + ln l_i               (so p_ij = exp(s_ij - lse_i))
//!
//! backward, from dout = dO, with D_i = sum_d dO_id * out_id:
//!   p_ij  = exp(s_ij - lse_i)                   (recomputed per tile, never stored whole)
//!   dv_j  = sum_i p_ij dO_i
//!   g_ij  = p_ij * (dO_i . v_j - D_i)           (= dL/ds_ij)
//!   dq_i  = scale * sum_j g_ij k_j
//!   dk_j  = scale * sum_i g_ij q_i
//! ```
//!
//! Neither pass materialises a (tq, tk) tensor: the forward works on a (BQ x BK) score tile per
//! query block, the backward on one per (query block, key tile) pair, so extra memory is
//! O(t * hd). Tiles with no visible pair (above the causal diagonal, or in another document) are
//! skipped using each row's visible key range. Parallelism: forward over (batch, head, query
//! block); backward over (batch, kv head, key-tile chunk), where each task owns its dk/dv rows
//! and accumulates dq of its kv group in a private buffer; chunk partials are summed in a fixed
//! order, so results do not depend on the thread count.
//!
//! The tile products run in a register-blocked micro-kernel (`MR` rows x `NB` columns of
//! accumulators, two such blocks where AVX-512 has the registers), compiled for AVX-512,
//! AVX2+FMA (picked at runtime) and the baseline target. f32 uses a vectorisable polynomial
//! `exp`; lse is returned in f32, so the f64 backward recomputes it in f64 to stay exact.

use crate::util::{autograd_vjp, contiguous, dot, fused_ok, max, sum, Float};
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType, D,
};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which keys each query sees.
#[derive(Clone, Copy)]
pub struct AttentionMask<'a> {
    pub causal: bool,
    /// (b, tk) u32 segment ids; None = one segment per row.
    pub segment_ids: Option<&'a Tensor>,
    /// Sliding window: query `p` sees only keys with `|p - j| < window` (None = unlimited;
    /// causal attention has no keys after `p` anyway).
    pub window: Option<usize>,
    /// Score soft-capping `s -> c tanh(s / c)` before the softmax (Gemma 2's
    /// `attn_logit_softcapping`); None = plain scores. Not a mask, but it travels with one:
    /// every caller that builds a mask for a layer knows its cap.
    pub softcap: Option<f64>,
}

/// Query rows per block.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;
/// Micro-kernel columns; head and key dims are padded to a multiple of it.
const NB: usize = 16;
/// Micro-kernel rows.
const MR: usize = 4;
/// Backward tasks wanted per call; fewer (batch, kv head) pairs split their key tiles.
const BWD_TARGET_TASKS: usize = 16;
/// At most this many dq partial buffers per kv group (bounds the backward's extra memory).
const BWD_MAX_CHUNKS: usize = 4;

/// q (b, h, tq, hd); k, v (b, hkv, tk, hd) with h % hkv == 0: query head i uses kv head
/// i / (h / hkv) (GQA). Query row i sits at absolute position p_i = tk - tq + i (tq == tk in
/// training/prefill, tq < tk when decoding after a cache). Key j is visible to query i iff
/// (!causal || j <= p_i) && (segment_ids is None || seg[b, j] == seg[b, p_i]) &&
/// (window is None || |p_i - j| < window).
/// Every query sees at least its own position, so no row is empty.
/// Returns (out (b, h, tq, hd), lse (b, h, tq) f32: log-sum-exp of the scaled visible scores),
/// in q's dtype for out.
///
/// On the CPU in f32/f64 the output is differentiable through candle autograd (its backward is
/// [`attention_backward`]); elsewhere both come from [`reference_attention`]'s composition.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask,
) -> Result<(Tensor, Tensor)> {
    check(q, k, v, scale, &mask)?;
    if fused_ok(&[q, k, v]) {
        let slot = Arc::new(Mutex::new(None));
        let op = FusedAttention {
            scale,
            causal: mask.causal,
            segment_ids: mask.segment_ids.cloned(),
            window: mask.window,
            softcap: mask.softcap,
            lse: slot.clone(),
        };
        let out = q.contiguous()?.apply_op3_arc(
            &k.contiguous()?,
            &v.contiguous()?,
            Arc::new(Box::new(op)),
        )?;
        let lse = slot
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: lse slot poisoned".into()))?
            .clone();
        match lse {
            Some(lse) => Ok((out, lse)),
            None => bail!("attention: the fused kernel did not produce lse"),
        }
    } else {
        let (out, lse) = reference_parts(q, k, v, scale, &mask)?;
        Ok((out, lse.to_dtype(DType::F32)?))
    }
}

/// Backward from the saved forward outputs; recomputes probabilities tile by tile from q, k and
/// lse. Returns (dq, dk, dv) shaped like q, k, v. In f64 the row log-sum-exp is recomputed in
/// f64 (one extra q.k pass), because the f32 `lse` would cap the gradients at f32 accuracy.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f64,
    mask: AttentionMask,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = check(q, k, v, scale, &mask)?;
    for (name, t) in [("out", out), ("dout", dout)] {
        if t.dims() != q.dims() {
            bail!(
                "attention_backward: {name} must be shaped like q {:?}, got {:?}",
                q.dims(),
                t.dims()
            )
        }
    }
    if lse.dims() != [d.b, d.h, d.tq] || lse.dtype() != DType::F32 {
        bail!(
            "attention_backward: lse must be ({}, {}, {}) f32, got {:?} {:?}",
            d.b,
            d.h,
            d.tq,
            lse.dims(),
            lse.dtype()
        )
    }
    if fused_ok(&[q, k, v, out, dout]) {
        let vis = Visibility::new(&d, mask.causal, mask.window, segment_vec(&mask)?.as_deref());
        let lse = lse.flatten_all()?.to_vec1::<f32>()?;
        let ts: Vec<Tensor> = [q, k, v, out, dout]
            .iter()
            .map(|t| t.contiguous())
            .collect::<Result<_>>()?;
        let shapes = (q.shape().clone(), k.shape().clone());
        match q.dtype() {
            DType::F32 => backward_tensors::<f32>(&ts, &lse, &d, scale, mask.softcap, &vis, shapes),
            _ => backward_tensors::<f64>(&ts, &lse, &d, scale, mask.softcap, &vis, shapes),
        }
    } else {
        let g = autograd_vjp(
            |xs| reference_attention(&xs[0], &xs[1], &xs[2], scale, mask),
            &[q, k, v],
            dout,
        )?;
        let mut g = g.into_iter();
        match (g.next(), g.next(), g.next()) {
            (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
            _ => bail!("attention_backward: missing gradients"),
        }
    }
}

/// The same math as a composition of plain differentiable candle ops (fallback for non-CPU
/// devices/dtypes and test oracle). Materialises the (b, h, tq, tk) scores.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask,
) -> Result<Tensor> {
    Ok(reference_parts(q, k, v, scale, &mask)?.0)
}

/// Shapes and padded sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    /// Query heads per kv head.
    g: usize,
    tq: usize,
    tk: usize,
    hd: usize,
    /// hd rounded up to NB (micro-kernel column width).
    hd_pad: usize,
    /// tk rounded up to NB (columns of the transposed K and V).
    tk_pad: usize,
    /// tq rounded up to MR (rows of the backward's dq partials).
    tq_pad: usize,
}

impl Dims {
    fn new(b: usize, h: usize, hkv: usize, tq: usize, tk: usize, hd: usize) -> Dims {
        let up = |x: usize, m: usize| x.div_ceil(m) * m;
        Dims {
            b,
            h,
            hkv,
            g: h / hkv,
            tq,
            tk,
            hd,
            hd_pad: up(hd, NB),
            tk_pad: up(tk, NB),
            tq_pad: up(tq, MR),
        }
    }

    fn n_qblocks(&self) -> usize {
        self.tq.div_ceil(BQ)
    }
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &AttentionMask) -> Result<Dims> {
    let dims4 = |name: &str, t: &Tensor| -> Result<(usize, usize, usize, usize)> {
        match t.dims() {
            &[a, b, c, d] => Ok((a, b, c, d)),
            other => bail!("attention: {name} must be 4-d (b, heads, t, hd), got {other:?}"),
        }
    };
    let (b, h, tq, hd) = dims4("q", q)?;
    let (bk, hkv, tk, hdk) = dims4("k", k)?;
    if v.dims() != k.dims() {
        bail!(
            "attention: v must be shaped like k {:?}, got {:?}",
            k.dims(),
            v.dims()
        )
    }
    if bk != b || hdk != hd {
        bail!(
            "attention: q {:?} and k {:?} disagree on batch or head dim",
            q.dims(),
            k.dims()
        )
    }
    if b == 0 || h == 0 || hkv == 0 || tq == 0 || hd == 0 {
        bail!(
            "attention: empty dimension in q {:?} / k {:?}",
            q.dims(),
            k.dims()
        )
    }
    if h % hkv != 0 {
        bail!("attention: query heads ({h}) must be a multiple of kv heads ({hkv})")
    }
    if tq > tk {
        bail!(
            "attention: queries are the last tq of tk positions, so tq <= tk; got tq={tq} tk={tk}"
        )
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!(
            "attention: q, k, v dtypes differ ({:?}, {:?}, {:?})",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    if !scale.is_finite() {
        bail!("attention: scale must be finite, got {scale}")
    }
    if mask.window == Some(0) {
        bail!("attention: a sliding window must hold at least one key")
    }
    if mask.softcap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        bail!(
            "attention: a soft cap must be positive and finite, got {:?}",
            mask.softcap
        )
    }
    if let Some(seg) = mask.segment_ids {
        if seg.dims() != [b, tk] {
            bail!(
                "attention: segment_ids must be (b, tk) = ({b}, {tk}), got {:?}",
                seg.dims()
            )
        }
        if seg.dtype() != DType::U32 {
            bail!("attention: segment_ids must be u32, got {:?}", seg.dtype())
        }
    }
    Ok(Dims::new(b, h, hkv, tq, tk, hd))
}

fn segment_vec(mask: &AttentionMask) -> Result<Option<Vec<u32>>> {
    mask.segment_ids
        .map(|s| s.flatten_all()?.to_vec1::<u32>())
        .transpose()
}

/// Composition of candle ops; also returns lse (in the input dtype).
fn reference_parts(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask,
) -> Result<(Tensor, Tensor)> {
    let d = check(q, k, v, scale, mask)?;
    // GQA: repeat each kv head for its g query heads.
    let expand = |t: &Tensor| -> Result<Tensor> {
        if d.g == 1 {
            t.contiguous()
        } else {
            t.unsqueeze(2)?
                .broadcast_as((d.b, d.hkv, d.g, d.tk, d.hd))?
                .contiguous()?
                .reshape((d.b, d.h, d.tk, d.hd))
        }
    };
    let (kx, vx) = (expand(k)?, expand(v)?);
    let mut s = (q.contiguous()?.matmul(&kx.t()?)? * scale)?; // (b, h, tq, tk)
    if let Some(cap) = mask.softcap {
        s = ((s / cap)?.tanh()? * cap)?;
    }
    if mask.causal || mask.segment_ids.is_some() || mask.window.is_some() {
        let seg = segment_vec(mask)?;
        let mut bias = vec![0f32; d.b * d.tq * d.tk];
        for (bi, rows) in bias.chunks_mut(d.tq * d.tk).enumerate() {
            for (i, row) in rows.chunks_mut(d.tk).enumerate() {
                let p = d.tk - d.tq + i;
                for (j, x) in row.iter_mut().enumerate() {
                    let same = seg
                        .as_ref()
                        .is_none_or(|s| s[bi * d.tk + j] == s[bi * d.tk + p]);
                    let outside_window = mask
                        .window
                        .is_some_and(|w| p >= j + w || (!mask.causal && j >= p + w));
                    if !same || (mask.causal && j > p) || outside_window {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (d.b, 1, d.tq, d.tk), q.device())?.to_dtype(s.dtype())?;
        s = s.broadcast_add(&bias)?;
    }
    // Softmax is invariant to the shift, so the max needs no gradient.
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    let z = e.sum_keepdim(D::Minus1)?;
    let out = e.broadcast_div(&z)?.matmul(&vx)?;
    let lse = (m + z.log()?)?.squeeze(D::Minus1)?;
    Ok((out, lse))
}

// ------------------------------------------------------------------ candle glue

/// The fused forward as a candle op on (q, k, v), so candle autograd reaches
/// [`attention_backward`]. The lse it computes is handed back through `lse`.
struct FusedAttention {
    scale: f64,
    causal: bool,
    segment_ids: Option<Tensor>,
    window: Option<usize>,
    softcap: Option<f64>,
    lse: Arc<Mutex<Option<Tensor>>>,
}

impl FusedAttention {
    /// The fused forward of one dtype, with `out`, on the process-wide kernel level.
    fn forward<T: Elem>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        d: &Dims,
        vis: &Visibility,
    ) -> (Vec<T>, Vec<T>) {
        forward_cpu(
            q,
            k,
            v,
            d,
            self.scale,
            self.softcap,
            vis,
            true,
            Isa::current(),
        )
    }

    fn mask(&self) -> AttentionMask<'_> {
        AttentionMask {
            causal: self.causal,
            segment_ids: self.segment_ids.as_ref(),
            window: self.window,
            softcap: self.softcap,
        }
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "kiln-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (q_dims, k_dims) = (l1.dims(), l2.dims());
        if q_dims.len() != 4 || k_dims.len() != 4 || l3.dims() != k_dims {
            bail!(
                "{name}: bad shapes q {q_dims:?} k {k_dims:?} v {:?}",
                l3.dims()
            )
        }
        let (b, h, tq, hd) = (q_dims[0], q_dims[1], q_dims[2], q_dims[3]);
        let (hkv, tk) = (k_dims[1], k_dims[2]);
        if hkv == 0 || h % hkv != 0 || tq > tk || k_dims[0] != b || k_dims[3] != hd {
            bail!("{name}: bad shapes q {q_dims:?} k {k_dims:?}")
        }
        let d = Dims::new(b, h, hkv, tq, tk, hd);
        let vis = Visibility::new(
            &d,
            self.causal,
            self.window,
            segment_vec(&self.mask())?.as_deref(),
        );
        let (out, lse) = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (q, k, v) = (
                    contiguous(q, l1, name)?,
                    contiguous(k, l2, name)?,
                    contiguous(v, l3, name)?,
                );
                let (out, lse) = self.forward(q, k, v, &d, &vis);
                (CpuStorage::F32(out), lse)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (q, k, v) = (
                    contiguous(q, l1, name)?,
                    contiguous(k, l2, name)?,
                    contiguous(v, l3, name)?,
                );
                let (out, lse) = self.forward(q, k, v, &d, &vis);
                (
                    CpuStorage::F64(out),
                    lse.into_iter().map(|x| x as f32).collect(),
                )
            }
            _ => bail!("{name}: expected f32 or f64 inputs of one dtype"),
        };
        let lse = Tensor::from_vec(lse, (b, h, tq), &candle_core::Device::Cpu)?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{name}: lse slot poisoned")))? =
            Some(lse);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().ok().and_then(|l| l.clone());
        let Some(lse) = lse else {
            bail!("{}: backward before forward", self.name())
        };
        let (dq, dk, dv) = attention_backward(q, k, v, out, &lse, dout, self.scale, self.mask())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn cpu_slice<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    match storage {
        Storage::Cpu(s) => contiguous(s.as_slice::<T>()?, layout, "kiln-attention"),
        _ => bail!("kiln-attention: expected a CPU tensor"),
    }
}

fn backward_tensors<T: Elem + WithDType>(
    ts: &[Tensor],
    lse: &[f32],
    d: &Dims,
    scale: f64,
    softcap: Option<f64>,
    vis: &Visibility,
    (q_shape, k_shape): (Shape, Shape),
) -> Result<(Tensor, Tensor, Tensor)> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let s: Vec<&[T]> = guards
        .iter()
        .map(|(st, l)| cpu_slice::<T>(st, l))
        .collect::<Result<_>>()?;
    let (dq, dk, dv) = backward_cpu(
        s[0],
        s[1],
        s[2],
        s[3],
        lse,
        s[4],
        d,
        scale,
        softcap,
        vis,
        Isa::current(),
    );
    let dev = ts[0].device();
    Ok((
        Tensor::from_vec(dq, q_shape, dev)?,
        Tensor::from_vec(dk, k_shape.clone(), dev)?,
        Tensor::from_vec(dv, k_shape, dev)?,
    ))
}

// ------------------------------------------------------------------ element type

/// What the attention kernels need beyond [`Float`].
trait Elem: Float {
    /// Recompute lse in this type in the backward (the saved lse is f32).
    const REFINE_LSE: bool;
    /// `a * b + c`, fused when `F` (only instantiated with `F` where the CPU has FMA).
    fn fma<const F: bool>(a: Self, b: Self, c: Self) -> Self;
    /// `exp`, written to vectorise where that is accurate enough.
    fn exp_fast<const F: bool>(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
}

impl Elem for f32 {
    const REFINE_LSE: bool = false;
    #[inline(always)]
    fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
        if F {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    /// `2^n * e^r` with `n = round(x log2 e)`, `|r| <= ln2 / 2`, and the Cephes degree-5 minimax
    /// polynomial for `e^r` (~1 ulp). Branch-free so a slice loop vectorises; results below
    /// e^-87 flush to 0 (they are weights next to a row maximum of weight 1).
    #[inline(always)]
    fn exp_fast<const F: bool>(self) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        let x = if self < -87.0 { -87.0 } else { self };
        let x = if x > 88.0 { 88.0 } else { x };
        let t = Self::fma::<F>(x, std::f32::consts::LOG2_E, MAGIC);
        let n = t - MAGIC;
        let r = Self::fma::<F>(n, -0.693_359_4, x);
        let r = Self::fma::<F>(n, 2.121_944_4e-4, r);
        let mut p = 1.987_569_1e-4f32;
        p = Self::fma::<F>(p, r, 1.398_199_9e-3);
        p = Self::fma::<F>(p, r, 8.333_452e-3);
        p = Self::fma::<F>(p, r, 4.166_579_6e-2);
        p = Self::fma::<F>(p, r, 1.666_666_5e-1);
        p = Self::fma::<F>(p, r, 0.5);
        let y = Self::fma::<F>(p, r * r, r) + 1.0;
        let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
        let pow2 = f32::from_bits(((n + 127) as u32) << 23);
        if self < -87.0 {
            0.0
        } else {
            y * pow2
        }
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
}

impl Elem for f64 {
    const REFINE_LSE: bool = true;
    #[inline(always)]
    fn fma<const F: bool>(a: f64, b: f64, c: f64) -> f64 {
        if F {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn exp_fast<const F: bool>(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
}

// ------------------------------------------------------------------ visibility

/// Keys visible to one query row lie in `[lo, hi)`; all of them when `exact`, else only those
/// with segment id `seg` (a document split into several runs).
#[derive(Clone, Copy)]
struct RowVis {
    lo: usize,
    hi: usize,
    seg: u32,
    exact: bool,
}

struct Visibility {
    /// (b, tq)
    rows: Vec<RowVis>,
    /// (b, tk) key segment ids, when some row is not `exact`.
    key_seg: Option<Vec<u32>>,
    /// (b, query block): union of the block's row ranges.
    blocks: Vec<(usize, usize)>,
}

impl Visibility {
    fn new(d: &Dims, causal: bool, window: Option<usize>, seg: Option<&[u32]>) -> Visibility {
        let mut rows = Vec::with_capacity(d.b * d.tq);
        let mut any_inexact = false;
        for bi in 0..d.b {
            let sg = seg.map(|s| &s[bi * d.tk..(bi + 1) * d.tk]);
            // Per segment id: first index, last index + 1, count.
            let mut spans: HashMap<u32, (usize, usize, usize)> = HashMap::new();
            for (j, &id) in sg.unwrap_or(&[]).iter().enumerate() {
                let e = spans.entry(id).or_insert((j, j + 1, 0));
                e.1 = j + 1;
                e.2 += 1;
            }
            for i in 0..d.tq {
                let p = d.tk - d.tq + i;
                let (mut lo, mut hi, mut id, mut exact) = (0, d.tk, 0, true);
                if let Some(sg) = sg {
                    id = sg[p];
                    let (first, last, count) = spans[&id];
                    (lo, hi, exact) = (first, last, count == last - first);
                }
                if causal {
                    hi = hi.min(p + 1);
                }
                if let Some(w) = window {
                    // A narrower range within one segment's span stays exact.
                    lo = lo.max((p + 1).saturating_sub(w));
                    if !causal {
                        hi = hi.min(p + w);
                    }
                }
                any_inexact |= !exact;
                rows.push(RowVis {
                    lo,
                    hi,
                    seg: id,
                    exact,
                });
            }
        }
        let nqb = d.n_qblocks();
        let mut blocks = Vec::with_capacity(d.b * nqb);
        for bi in 0..d.b {
            for qb in 0..nqb {
                let r = &rows[bi * d.tq + qb * BQ..bi * d.tq + (d.tq).min((qb + 1) * BQ)];
                let lo = r.iter().map(|r| r.lo).min().unwrap_or(0);
                let hi = r.iter().map(|r| r.hi).max().unwrap_or(0);
                blocks.push((lo, hi));
            }
        }
        let key_seg = if any_inexact {
            seg.map(<[u32]>::to_vec)
        } else {
            None
        };
        Visibility {
            rows,
            key_seg,
            blocks,
        }
    }
}

/// Clips each row's visible range to the key tile `[j0, j1)`, tile-relative; empty as `a >= b`.
#[inline(always)]
fn clip_rows(rows: &[RowVis], j0: usize, j1: usize, ra: &mut [usize; BQ], rb: &mut [usize; BQ]) {
    for (r, v) in rows.iter().enumerate() {
        ra[r] = v.lo.clamp(j0, j1) - j0;
        rb[r] = v.hi.clamp(j0, j1) - j0;
    }
}

/// Union of the tile-relative ranges of rows `r0..min(r0 + MR, m)`, if any is non-empty.
#[inline(always)]
fn group_range(ra: &[usize; BQ], rb: &[usize; BQ], r0: usize, m: usize) -> Option<(usize, usize)> {
    let (mut a, mut b) = (usize::MAX, 0);
    for r in r0..(r0 + MR).min(m) {
        if ra[r] < rb[r] {
            a = a.min(ra[r]);
            b = b.max(rb[r]);
        }
    }
    (a < b).then_some((a, b))
}

// ------------------------------------------------------------------ micro-kernel

/// A operand of one micro-kernel call: `A[r][kk] = data[rows[r] + kk * cs]`.
struct ARows<'a, T> {
    data: &'a [T],
    rows: [usize; MR],
    cs: usize,
}

/// B operand: `B[kk][c] = data[off + kk * ld + c]` for `c < NB`.
struct BCols<'a, T> {
    data: &'a [T],
    off: usize,
    ld: usize,
}

/// `C[r][c] (+)= sum_{kk < k} A[r][kk] * B[kk][c]` for `r < MR`, `c < NB * CH`, with
/// `C[r][c] = c[c_off + r * ldc + c]`: CH separate MR x NB accumulator blocks, kept in
/// registers (one block of 4 x 16 is what LLVM reliably keeps as vectors; a second gives the
/// FMA units independent chains where there are registers for it).
#[inline(always)]
fn micro<T: Elem, const F: bool, const CH: usize>(
    k: usize,
    a: &ARows<T>,
    b: &BCols<T>,
    c: &mut [T],
    c_off: usize,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[[T::ZERO; NB]; MR]; CH];
    if k > 0 {
        let a_max = a.rows.iter().copied().max().unwrap_or(0) + (k - 1) * a.cs;
        assert!(a_max < a.data.len(), "attention: A operand out of bounds");
        assert!(
            b.off + (k - 1) * b.ld + CH * NB <= b.data.len(),
            "attention: B operand out of bounds"
        );
        let (ap, bp) = (a.data.as_ptr(), b.data.as_ptr());
        for kk in 0..k {
            // SAFETY: every index is at most the maximum checked above (strides are >= 0).
            let bv: [&[T; NB]; CH] = std::array::from_fn(|h| unsafe {
                &*(bp.add(b.off + kk * b.ld + h * NB) as *const [T; NB])
            });
            for r in 0..MR {
                // SAFETY: as above.
                let av = unsafe { *ap.add(a.rows[r] + kk * a.cs) };
                for (acc, bv) in acc.iter_mut().zip(&bv) {
                    for (x, &bj) in acc[r].iter_mut().zip(bv.iter()) {
                        *x = T::fma::<F>(av, bj, *x);
                    }
                }
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        for (r, acc) in acc.iter().enumerate() {
            let dst = &mut c[c_off + r * ldc + h * NB..][..NB];
            if accumulate {
                for (d, &x) in dst.iter_mut().zip(acc) {
                    *d += x;
                }
            } else {
                dst.copy_from_slice(acc);
            }
        }
    }
}

/// [`micro`] over `ncols` (a multiple of NB) columns: pairs of blocks when `W` (wide register
/// file), single blocks otherwise and for the tail.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn micro_cols<T: Elem, const F: bool, const W: bool>(
    k: usize,
    a: &ARows<T>,
    b: &BCols<T>,
    ncols: usize,
    c: &mut [T],
    c_off: usize,
    ldc: usize,
    accumulate: bool,
) {
    let mut cc = 0;
    let at = |cc: usize| BCols {
        data: b.data,
        off: b.off + cc,
        ld: b.ld,
    };
    if W {
        while cc + 2 * NB <= ncols {
            micro::<T, F, 2>(k, a, &at(cc), c, c_off + cc, ldc, accumulate);
            cc += 2 * NB;
        }
    }
    while cc < ncols {
        micro::<T, F, 1>(k, a, &at(cc), c, c_off + cc, ldc, accumulate);
        cc += NB;
    }
}

/// Rows `r0 .. r0 + MR` of a row-major matrix at `base` with row stride `ld`, rows past `m`
/// clamped to the last one (their results land in padding rows and are ignored).
#[inline(always)]
fn rows_at(base: usize, r0: usize, m: usize, ld: usize) -> [usize; MR] {
    std::array::from_fn(|x| base + (r0 + x).min(m - 1) * ld)
}

/// `dst[r][ca..cb) = A[r] . Bt[:, ca..cb)` for each row group, where `[ca, cb)` covers the
/// group's visible keys rounded out to NB. `A` rows are `hd` long at `a_off + r * hd`; `Bt` is
/// (hd x ...) with row stride `ldb`, tile column 0 at `bt_off`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn score_tile<T: Elem, const F: bool, const W: bool>(
    m: usize,
    hd: usize,
    (ra, rb): (&[usize; BQ], &[usize; BQ]),
    a: &[T],
    a_off: usize,
    bt: &[T],
    bt_off: usize,
    ldb: usize,
    dst: &mut [T],
) {
    for r0 in (0..m).step_by(MR) {
        let Some((ga, gb)) = group_range(ra, rb, r0, m) else {
            continue;
        };
        let ar = ARows {
            data: a,
            rows: rows_at(a_off, r0, m, hd),
            cs: 1,
        };
        let c0 = ga / NB * NB;
        let b = BCols {
            data: bt,
            off: bt_off + c0,
            ld: ldb,
        };
        let ncols = gb.div_ceil(NB) * NB - c0;
        micro_cols::<T, F, W>(hd, &ar, &b, ncols, dst, r0 * BK + c0, BK, false);
    }
}

/// `C[r] += sum_{j in group range} P[r][j] * B[j]` for each row group: P (BQ x BK, row-major),
/// B rows of `hd_pad` at `b_off + j * hd_pad` (tile-relative j), C rows of `hd_pad`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn p_times_rows<T: Elem, const F: bool, const W: bool>(
    m: usize,
    hd_pad: usize,
    (ra, rb): (&[usize; BQ], &[usize; BQ]),
    p: &[T],
    b: &[T],
    b_off: usize,
    c: &mut [T],
    c_off: usize,
) {
    for r0 in (0..m).step_by(MR) {
        let Some((ga, gb)) = group_range(ra, rb, r0, m) else {
            continue;
        };
        let ar = ARows {
            data: p,
            rows: rows_at(ga, r0, m, BK),
            cs: 1,
        };
        let bc = BCols {
            data: b,
            off: b_off + ga * hd_pad,
            ld: hd_pad,
        };
        micro_cols::<T, F, W>(
            gb - ga,
            &ar,
            &bc,
            hd_pad,
            c,
            c_off + r0 * hd_pad,
            hd_pad,
            true,
        );
    }
}

/// `C[j] += sum_r P[r][j] * B[r]` for the tile's `nk` keys (P transposed): C (BK x hd_pad),
/// B rows of `hd_pad` at `b_off + r * hd_pad`; only query rows that see a key of the group.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pt_times_rows<T: Elem, const F: bool, const W: bool>(
    m: usize,
    nk: usize,
    hd_pad: usize,
    (ra, rb): (&[usize; BQ], &[usize; BQ]),
    p: &[T],
    b: &[T],
    b_off: usize,
    c: &mut [T],
) {
    for j0 in (0..nk).step_by(MR) {
        let j1 = (j0 + MR).min(nk);
        let (mut lo, mut hi) = (usize::MAX, 0);
        for r in 0..m {
            if ra[r] < j1 && rb[r] > j0 && ra[r] < rb[r] {
                lo = lo.min(r);
                hi = r + 1;
            }
        }
        if lo >= hi {
            continue;
        }
        let ar = ARows {
            data: p,
            rows: std::array::from_fn(|x| lo * BK + (j0 + x).min(nk - 1)),
            cs: BK,
        };
        let bc = BCols {
            data: b,
            off: b_off + lo * hd_pad,
            ld: hd_pad,
        };
        micro_cols::<T, F, W>(hi - lo, &ar, &bc, hd_pad, c, j0 * hd_pad, hd_pad, true);
    }
}

// ------------------------------------------------------------------ forward

struct Fwd<'a, T> {
    d: Dims,
    scale: T,
    /// Soft cap of the scaled scores (see [`AttentionMask::softcap`]).
    softcap: Option<T>,
    q: &'a [T],
    /// (b, hkv, hd, tk_pad)
    kt: &'a [T],
    /// (b, hkv, tk, hd_pad)
    v: &'a [T],
    vis: &'a Visibility,
}

/// One (batch, head, query block): online softmax over the visible key tiles. Writes `out`
/// rows (m x hd) when given (else only the row statistics) and `lse` (m).
#[inline(always)]
fn fwd_block<T: Elem, const F: bool, const W: bool>(
    c: &Fwd<T>,
    bh: usize,
    qb: usize,
    mut out: Option<&mut [T]>,
    lse: &mut [T],
) {
    let d = &c.d;
    let (bi, hq) = (bh / d.h, bh % d.h);
    let kvh = hq / d.g;
    let i0 = qb * BQ;
    let m = (d.tq - i0).min(BQ);
    let rows = &c.vis.rows[bi * d.tq + i0..][..m];
    let key_seg = c.vis.key_seg.as_deref().map(|s| &s[bi * d.tk..][..d.tk]);
    let q_off = (bh * d.tq + i0) * d.hd;
    let kt_off = (bi * d.hkv + kvh) * d.hd * d.tk_pad;
    let v_off = (bi * d.hkv + kvh) * d.tk * d.hd_pad;
    let with_out = out.is_some();

    let mut s = vec![T::ZERO; BQ * BK];
    let mut o = vec![T::ZERO; if with_out { BQ * d.hd_pad } else { 0 }];
    let mut mx = [T::NEG_INFINITY; BQ];
    let mut l = [T::ZERO; BQ];
    let (mut ra, mut rb) = ([0usize; BQ], [0usize; BQ]);

    let (lo, hi) = c.vis.blocks[bi * d.n_qblocks() + qb];
    for j0 in (lo / BK * BK..hi).step_by(BK) {
        let j1 = (j0 + BK).min(d.tk);
        clip_rows(rows, j0, j1, &mut ra, &mut rb);
        score_tile::<T, F, W>(
            m,
            d.hd,
            (&ra, &rb),
            c.q,
            q_off,
            c.kt,
            kt_off + j0,
            d.tk_pad,
            &mut s,
        );
        for r in 0..m {
            let row = &mut s[r * BK..(r + 1) * BK];
            let (a, b) = (ra[r], rb[r]);
            if a >= b {
                row.fill(T::ZERO);
                continue;
            }
            let vis = &mut row[a..b];
            for x in vis.iter_mut() {
                *x = *x * c.scale;
            }
            if let Some(cap) = c.softcap {
                for x in vis.iter_mut() {
                    *x = cap * (*x / cap).tanh();
                }
            }
            if !rows[r].exact {
                if let Some(ks) = key_seg {
                    for (x, &sg) in vis.iter_mut().zip(&ks[j0 + a..j0 + b]) {
                        if sg != rows[r].seg {
                            *x = T::NEG_INFINITY;
                        }
                    }
                }
            }
            let tile_max = max(vis);
            if tile_max == T::NEG_INFINITY {
                ra[r] = b; // nothing visible here after all
                row.fill(T::ZERO);
                continue;
            }
            let m_new = mx[r].max(tile_max);
            let alpha = (mx[r] - m_new).exp();
            for x in vis.iter_mut() {
                *x = (*x - m_new).exp_fast::<F>();
            }
            l[r] = l[r] * alpha + sum(vis);
            mx[r] = m_new;
            row[..a].fill(T::ZERO);
            row[b..].fill(T::ZERO);
            if with_out && alpha != T::ONE {
                for x in &mut o[r * d.hd_pad..(r + 1) * d.hd_pad] {
                    *x = *x * alpha;
                }
            }
        }
        if with_out {
            p_times_rows::<T, F, W>(
                m,
                d.hd_pad,
                (&ra, &rb),
                &s,
                c.v,
                v_off + j0 * d.hd_pad,
                &mut o,
                0,
            );
        }
    }
    for r in 0..m {
        lse[r] = mx[r] + l[r].ln();
        if let Some(out) = out.as_deref_mut() {
            let inv = T::ONE / l[r];
            let src = &o[r * d.hd_pad..][..d.hd];
            for (y, &x) in out[r * d.hd..(r + 1) * d.hd].iter_mut().zip(src) {
                *y = x * inv;
            }
        }
    }
}

/// `x` (n_mat, rows, cols) -> (n_mat, cols, ld) with zero columns past `rows`.
fn transpose_pad<T: Elem>(x: &[T], n_mat: usize, rows: usize, cols: usize, ld: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; n_mat * cols * ld];
    out.par_chunks_mut(cols * ld)
        .zip(x.par_chunks(rows * cols))
        .for_each(|(dst, src)| {
            // Blocks of 8 rows keep the strided writes within a few cache lines.
            for r0 in (0..rows).step_by(8) {
                for c in 0..cols {
                    let drow = &mut dst[c * ld..];
                    for r in r0..(r0 + 8).min(rows) {
                        drow[r] = src[r * cols + c];
                    }
                }
            }
        });
    out
}

/// Rows of `width` padded with zeros to `ld` (borrowed when no padding is needed).
fn pad_cols<T: Elem>(x: &[T], width: usize, ld: usize) -> Cow<'_, [T]> {
    if width == ld {
        return Cow::Borrowed(x);
    }
    let n = x.len() / width;
    let mut out = vec![T::ZERO; n * ld];
    out.par_chunks_mut(ld)
        .zip(x.par_chunks(width))
        .for_each(|(d, s)| d[..width].copy_from_slice(s));
    Cow::Owned(out)
}

/// The fused forward on contiguous slices: `(out, lse)`, with `out` empty when `!with_out` (then
/// `v` is not read).
#[allow(clippy::too_many_arguments)]
fn forward_cpu<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    d: &Dims,
    scale: f64,
    softcap: Option<f64>,
    vis: &Visibility,
    with_out: bool,
    isa: Isa,
) -> (Vec<T>, Vec<T>) {
    let kt = transpose_pad(k, d.b * d.hkv, d.tk, d.hd, d.tk_pad);
    let vp = if with_out {
        pad_cols(v, d.hd, d.hd_pad)
    } else {
        Cow::Borrowed(v)
    };
    let c = Fwd {
        d: *d,
        scale: T::from_f64(scale),
        softcap: softcap.map(T::from_f64),
        q,
        kt: &kt,
        v: &vp,
        vis,
    };
    let mut lse = vec![T::ZERO; d.b * d.h * d.tq];
    if with_out {
        let mut out = vec![T::ZERO; d.b * d.h * d.tq * d.hd];
        out.par_chunks_mut(d.tq * d.hd)
            .zip(lse.par_chunks_mut(d.tq))
            .enumerate()
            .for_each(|(bh, (o, l))| {
                o.par_chunks_mut(BQ * d.hd)
                    .zip(l.par_chunks_mut(BQ))
                    .enumerate()
                    .for_each(|(qb, (o, l))| fwd_dispatch(isa, &c, bh, qb, Some(o), l));
            });
        (out, lse)
    } else {
        lse.par_chunks_mut(d.tq).enumerate().for_each(|(bh, l)| {
            l.par_chunks_mut(BQ)
                .enumerate()
                .for_each(|(qb, l)| fwd_dispatch(isa, &c, bh, qb, None, l));
        });
        (Vec::new(), lse)
    }
}

// ------------------------------------------------------------------ backward

struct Bwd<'a, T> {
    d: Dims,
    scale: T,
    softcap: Option<T>,
    /// (b, h, tq, hd): A operand of the scores.
    q: &'a [T],
    /// (b, h, tq, hd_pad): B operand of dk.
    qp: &'a [T],
    /// (b, hkv, hd, tk_pad)
    kt: &'a [T],
    /// (b, hkv, tk, hd_pad): B operand of dq.
    kp: &'a [T],
    /// (b, hkv, hd, tk_pad)
    vt: &'a [T],
    /// (b, h, tq, hd): A operand of dP.
    dout: &'a [T],
    /// (b, h, tq, hd_pad): B operand of dv.
    doutp: &'a [T],
    /// (b, h, tq)
    lse: &'a [T],
    /// (b, h, tq): D_i = dO_i . out_i
    dd: &'a [T],
    vis: &'a Visibility,
}

/// One key tile of a backward task and the dk/dv rows (tile keys x hd) it owns.
struct KeyTile<'a, T> {
    kb: usize,
    dk: &'a mut [T],
    dv: &'a mut [T],
}

/// One (batch, kv head) and a set of its key tiles: dk/dv of those keys, and their contribution
/// to dq of the group's query heads, added to `dq` ((g, tq_pad, hd_pad), unscaled).
#[inline(always)]
fn bwd_tiles<T: Elem, const F: bool, const W: bool>(
    c: &Bwd<T>,
    bk: usize,
    tiles: &mut [KeyTile<T>],
    dq: &mut [T],
) {
    let d = &c.d;
    let (bi, kvh) = (bk / d.hkv, bk % d.hkv);
    let nqb = d.n_qblocks();
    let key_seg = c.vis.key_seg.as_deref().map(|s| &s[bi * d.tk..][..d.tk]);
    let kt_off = bk * d.hd * d.tk_pad;
    let kp_off = bk * d.tk * d.hd_pad;

    let mut p = vec![T::ZERO; BQ * BK];
    let mut gd = vec![T::ZERO; BQ * BK];
    // d(capped score)/d(score) = 1 - tanh^2 of one row's visible keys (soft cap only).
    let mut dcap = [T::ONE; BK];
    let mut dk = vec![T::ZERO; BK * d.hd_pad];
    let mut dv = vec![T::ZERO; BK * d.hd_pad];
    let (mut ra, mut rb) = ([0usize; BQ], [0usize; BQ]);

    for tile in tiles.iter_mut() {
        let j0 = tile.kb * BK;
        let j1 = (j0 + BK).min(d.tk);
        let nk = j1 - j0;
        dk.fill(T::ZERO);
        dv.fill(T::ZERO);
        for hh in 0..d.g {
            let bh = bi * d.h + kvh * d.g + hh;
            for qb in 0..nqb {
                let (lo, hi) = c.vis.blocks[bi * nqb + qb];
                if hi <= j0 || lo >= j1 {
                    continue;
                }
                let i0 = qb * BQ;
                let m = (d.tq - i0).min(BQ);
                let rows = &c.vis.rows[bi * d.tq + i0..][..m];
                clip_rows(rows, j0, j1, &mut ra, &mut rb);
                let q_off = (bh * d.tq + i0) * d.hd;
                let ranges = (&ra, &rb);
                score_tile::<T, F, W>(
                    m,
                    d.hd,
                    ranges,
                    c.q,
                    q_off,
                    c.kt,
                    kt_off + j0,
                    d.tk_pad,
                    &mut p,
                );
                score_tile::<T, F, W>(
                    m,
                    d.hd,
                    ranges,
                    c.dout,
                    q_off,
                    c.vt,
                    kt_off + j0,
                    d.tk_pad,
                    &mut gd,
                );
                // P = exp(s - lse) and G = P * (dP - D), exactly 0 off the visible range.
                for r in 0..m {
                    let prow = &mut p[r * BK..(r + 1) * BK];
                    let grow = &mut gd[r * BK..(r + 1) * BK];
                    let (a, b) = (ra[r], rb[r]);
                    if a >= b {
                        prow.fill(T::ZERO);
                        grow.fill(T::ZERO);
                        continue;
                    }
                    let (lse, dd) = (c.lse[bh * d.tq + i0 + r], c.dd[bh * d.tq + i0 + r]);
                    match c.softcap {
                        None => {
                            for x in &mut prow[a..b] {
                                *x = T::fma::<F>(*x, c.scale, -lse).exp_fast::<F>();
                            }
                        }
                        Some(cap) => {
                            for (x, dc) in prow[a..b].iter_mut().zip(&mut dcap[a..b]) {
                                let t = (*x * c.scale / cap).tanh();
                                *dc = T::ONE - t * t;
                                *x = T::fma::<F>(cap, t, -lse).exp_fast::<F>();
                            }
                        }
                    }
                    if !rows[r].exact {
                        if let Some(ks) = key_seg {
                            for (x, &sg) in prow[a..b].iter_mut().zip(&ks[j0 + a..j0 + b]) {
                                if sg != rows[r].seg {
                                    *x = T::ZERO;
                                }
                            }
                        }
                    }
                    for (g, &pv) in grow[a..b].iter_mut().zip(&prow[a..b]) {
                        *g = pv * (*g - dd);
                    }
                    if c.softcap.is_some() {
                        for (g, &dc) in grow[a..b].iter_mut().zip(&dcap[a..b]) {
                            *g = *g * dc;
                        }
                    }
                    prow[..a].fill(T::ZERO);
                    prow[b..].fill(T::ZERO);
                    grow[..a].fill(T::ZERO);
                    grow[b..].fill(T::ZERO);
                }
                let qp_off = (bh * d.tq + i0) * d.hd_pad;
                pt_times_rows::<T, F, W>(m, nk, d.hd_pad, ranges, &p, c.doutp, qp_off, &mut dv);
                pt_times_rows::<T, F, W>(m, nk, d.hd_pad, ranges, &gd, c.qp, qp_off, &mut dk);
                p_times_rows::<T, F, W>(
                    m,
                    d.hd_pad,
                    ranges,
                    &gd,
                    c.kp,
                    kp_off + j0 * d.hd_pad,
                    dq,
                    (hh * d.tq_pad + i0) * d.hd_pad,
                );
            }
        }
        for j in 0..nk {
            let (src_k, src_v) = (&dk[j * d.hd_pad..], &dv[j * d.hd_pad..]);
            let dst_k = &mut tile.dk[j * d.hd..(j + 1) * d.hd];
            for (y, &x) in dst_k.iter_mut().zip(src_k) {
                *y = x * c.scale;
            }
            tile.dv[j * d.hd..(j + 1) * d.hd].copy_from_slice(&src_v[..d.hd]);
        }
    }
}

/// The fused backward on contiguous slices: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
fn backward_cpu<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[f32],
    dout: &[T],
    d: &Dims,
    scale: f64,
    softcap: Option<f64>,
    vis: &Visibility,
    isa: Isa,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let lse: Vec<T> = if T::REFINE_LSE {
        forward_cpu(q, k, v, d, scale, softcap, vis, false, isa).1
    } else {
        lse.iter().map(|&x| T::from_f64(x as f64)).collect()
    };
    let mut dd = vec![T::ZERO; d.b * d.h * d.tq];
    dd.par_chunks_mut(BQ)
        .zip(dout.par_chunks(BQ * d.hd).zip(out.par_chunks(BQ * d.hd)))
        .for_each(|(dd, (dout, out))| {
            for ((x, dout), out) in dd.iter_mut().zip(dout.chunks(d.hd)).zip(out.chunks(d.hd)) {
                *x = dot(dout, out);
            }
        });
    let kt = transpose_pad(k, d.b * d.hkv, d.tk, d.hd, d.tk_pad);
    let vt = transpose_pad(v, d.b * d.hkv, d.tk, d.hd, d.tk_pad);
    let (qp, kp, doutp) = (
        pad_cols(q, d.hd, d.hd_pad),
        pad_cols(k, d.hd, d.hd_pad),
        pad_cols(dout, d.hd, d.hd_pad),
    );
    let c = Bwd {
        d: *d,
        scale: T::from_f64(scale),
        softcap: softcap.map(T::from_f64),
        q,
        qp: &qp,
        kt: &kt,
        kp: &kp,
        vt: &vt,
        dout,
        doutp: &doutp,
        lse: &lse,
        dd: &dd,
        vis,
    };
    // Chunks per kv group depend on the shape only, so the dq summation order (and hence the
    // result) is the same for any thread count.
    let nkb = d.tk.div_ceil(BK);
    let chunks = BWD_TARGET_TASKS
        .div_ceil(d.b * d.hkv)
        .clamp(1, BWD_MAX_CHUNKS)
        .min(nkb);
    let group = d.g * d.tq * d.hd;
    let mut dq = vec![T::ZERO; d.b * d.h * d.tq * d.hd];
    let mut dk = vec![T::ZERO; d.b * d.hkv * d.tk * d.hd];
    let mut dv = vec![T::ZERO; d.b * d.hkv * d.tk * d.hd];
    dq.par_chunks_mut(group)
        .zip(dk.par_chunks_mut(d.tk * d.hd))
        .zip(dv.par_chunks_mut(d.tk * d.hd))
        .enumerate()
        .for_each(|(bk, ((dq, dk), dv))| {
            // Key tiles dealt round-robin, which balances the causal triangle.
            let mut sets: Vec<Vec<KeyTile<T>>> = (0..chunks).map(|_| Vec::new()).collect();
            let tiles = dk.chunks_mut(BK * d.hd).zip(dv.chunks_mut(BK * d.hd));
            for (kb, (dk, dv)) in tiles.enumerate() {
                sets[kb % chunks].push(KeyTile { kb, dk, dv });
            }
            let partials: Vec<Vec<T>> = sets
                .into_par_iter()
                .map(|mut set| {
                    let mut part = vec![T::ZERO; d.g * d.tq_pad * d.hd_pad];
                    bwd_dispatch(isa, &c, bk, &mut set, &mut part);
                    part
                })
                .collect();
            for (hh, dq) in dq.chunks_mut(d.tq * d.hd).enumerate() {
                for (i, dq) in dq.chunks_mut(d.hd).enumerate() {
                    let at = (hh * d.tq_pad + i) * d.hd_pad;
                    for (x, y) in dq.iter_mut().enumerate() {
                        let mut acc = T::ZERO;
                        for part in &partials {
                            acc += part[at + x];
                        }
                        *y = acc * c.scale;
                    }
                }
            }
        });
    (dq, dk, dv)
}

// ------------------------------------------------------------------ ISA dispatch

/// Instruction sets the tile loops are compiled for; chosen once per call at runtime.
#[derive(Clone, Copy, Debug)]
enum Isa {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// aarch64 always has FMA; elsewhere the baseline build must not call the soft-float `fma`.
const BASELINE_FMA: bool = cfg!(target_arch = "aarch64");

impl Isa {
    /// The tile loops of the process-wide level ([`crate::active_isa`]).
    fn current() -> Isa {
        Isa::of(crate::active_isa())
    }

    fn of(level: crate::Isa) -> Isa {
        match level {
            _ if !level.available() => Isa::Baseline,
            #[cfg(target_arch = "x86_64")]
            crate::Isa::Avx512 => Isa::Avx512,
            #[cfg(target_arch = "x86_64")]
            crate::Isa::Avx2 => Isa::Avx2,
            _ => Isa::Baseline,
        }
    }
}

fn fwd_dispatch<T: Elem>(
    isa: Isa,
    c: &Fwd<T>,
    bh: usize,
    qb: usize,
    out: Option<&mut [T]>,
    lse: &mut [T],
) {
    match isa {
        // SAFETY: `Isa::detect` saw these features on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { fwd_avx512(c, bh, qb, out, lse) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { fwd_avx2(c, bh, qb, out, lse) },
        Isa::Baseline => fwd_block::<T, BASELINE_FMA, false>(c, bh, qb, out, lse),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn fwd_avx512<T: Elem>(c: &Fwd<T>, bh: usize, qb: usize, out: Option<&mut [T]>, lse: &mut [T]) {
    fwd_block::<T, true, true>(c, bh, qb, out, lse)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fwd_avx2<T: Elem>(c: &Fwd<T>, bh: usize, qb: usize, out: Option<&mut [T]>, lse: &mut [T]) {
    fwd_block::<T, true, false>(c, bh, qb, out, lse)
}

fn bwd_dispatch<T: Elem>(isa: Isa, c: &Bwd<T>, bk: usize, tiles: &mut [KeyTile<T>], dq: &mut [T]) {
    match isa {
        // SAFETY: `Isa::detect` saw these features on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { bwd_avx512(c, bk, tiles, dq) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { bwd_avx2(c, bk, tiles, dq) },
        Isa::Baseline => bwd_tiles::<T, BASELINE_FMA, false>(c, bk, tiles, dq),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn bwd_avx512<T: Elem>(c: &Bwd<T>, bk: usize, tiles: &mut [KeyTile<T>], dq: &mut [T]) {
    bwd_tiles::<T, true, true>(c, bk, tiles, dq)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn bwd_avx2<T: Elem>(c: &Bwd<T>, bk: usize, tiles: &mut [KeyTile<T>], dq: &mut [T]) {
    bwd_tiles::<T, true, false>(c, bk, tiles, dq)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward and backward on every level this CPU runs agree with the portable loops (same
    /// math; only FMA rounding and the vector `exp` differ), with a window and a soft cap.
    #[test]
    fn every_level_matches_the_portable_loops() {
        let d = Dims::new(1, 4, 2, 70, 70, 24);
        let val = |seed: usize, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 300.0)
                .collect()
        };
        let q = val(1, d.b * d.h * d.tq * d.hd);
        let k = val(2, d.b * d.hkv * d.tk * d.hd);
        let v = val(3, d.b * d.hkv * d.tk * d.hd);
        let dout = val(4, q.len());
        let vis = Visibility::new(&d, true, Some(40), None);
        let run = |isa: Isa| {
            let (out, lse) = forward_cpu(&q, &k, &v, &d, 0.2, Some(2.5), &vis, true, isa);
            let lse32: Vec<f32> = lse.clone();
            let grads = backward_cpu(
                &q,
                &k,
                &v,
                &out,
                &lse32,
                &dout,
                &d,
                0.2,
                Some(2.5),
                &vis,
                isa,
            );
            (out, lse, grads.0, grads.1, grads.2)
        };
        let want = run(Isa::Baseline);
        for level in crate::Isa::all_available() {
            let got = run(Isa::of(level));
            for (name, a, b) in [
                ("out", &got.0, &want.0),
                ("lse", &got.1, &want.1),
                ("dq", &got.2, &want.2),
                ("dk", &got.3, &want.3),
                ("dv", &got.4, &want.4),
            ] {
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{level:?} {name}: off by {worst}");
            }
        }
    }
}
