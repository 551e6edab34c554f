//! Scaled, optionally causal softmax over attention scores.
//!
//! Shapes: scores (b, h, tq, tk) -> y (b, h, tq, tk). For query row i and key j:
//!
//! ```text
//! visible(i, j) = !causal || j <= i + (tk - tq)          (queries are the last tq positions)
//! y[i, j]       = exp(scale * s[i, j] - m_i) / sum_{visible k} exp(scale * s[i, k] - m_i)
//!                 for visible j, and exactly 0 otherwise;  m_i = max_{visible k} scale * s[i, k]
//! ```
//!
//! The offset `tk - tq` makes the same op serve training (tq = tk) and KV-cache decoding (tq < tk).
//! Backward: `dx = scale * y * (dy - sum_j(dy_j * y_j))` per row (masked y are 0, so are their dx).

use crate::util::{contiguous, dot, fused_ok, max, sum, Float};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `softmax(scale * scores + causal_mask)` along the last dim of scores (b, h, tq, tk).
pub fn masked_softmax(scores: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    check(scores, scale, causal)?;
    if fused_ok(&[scores]) {
        scores
            .contiguous()?
            .apply_op1(MaskedSoftmax { scale, causal })
    } else {
        reference_masked_softmax(scores, scale, causal)
    }
}

/// Explicit backward of [`masked_softmax`] from its output `y`:
/// `dx = scale * y * (dy - sum(dy * y))` (masked entries have y = 0, so they get 0).
pub fn masked_softmax_backward(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_ok(&[y, dy]) {
        y.contiguous()?
            .apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwd { scale })
    } else {
        let inner = (dy * y)?.sum_keepdim(D::Minus1)?;
        (y * dy.broadcast_sub(&inner)?)? * scale
    }
}

fn check(scores: &Tensor, scale: f64, causal: bool) -> Result<()> {
    let (_b, _h, tq, tk) = scores.dims4()?;
    if causal && tq > tk {
        bail!("masked_softmax: causal attention needs tq <= tk, got tq={tq} tk={tk}")
    }
    if tk == 0 {
        bail!("masked_softmax: no keys (tk = 0)")
    }
    if !scale.is_finite() {
        bail!("masked_softmax: scale must be finite, got {scale}")
    }
    Ok(())
}

/// The masked softmax as a composition of plain candle ops (fallback and test oracle).
pub fn reference_masked_softmax(scores: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    check(scores, scale, causal)?;
    let (_b, _h, tq, tk) = scores.dims4()?;
    let mut s = (scores * scale)?;
    if causal {
        let mask: Vec<f32> = (0..tq)
            .flat_map(|i| {
                (0..tk).map(move |j| {
                    if j <= i + (tk - tq) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (tq, tk), scores.device())?.to_dtype(s.dtype())?;
        s = s.broadcast_add(&mask)?;
    }
    // Softmax is invariant to the shift, so the max needs no gradient.
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct MaskedSoftmax {
    scale: f64,
    causal: bool,
}

fn fwd_kernel<T: Float>(x: &[T], tq: usize, tk: usize, scale: f64, causal: bool) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(tk)
        .zip(x.par_chunks(tk))
        .enumerate()
        .for_each(|(row, (y, x))| {
            let i = row % tq;
            // Number of visible keys: a prefix of the row (>= 1 because tq <= tk).
            let n_vis = if causal {
                (i + (tk - tq) + 1).min(tk)
            } else {
                tk
            };
            let (y, x) = (&mut y[..n_vis], &x[..n_vis]);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * scale;
            }
            let m = max(y);
            for y in y.iter_mut() {
                *y = (*y - m).exp();
            }
            let inv = T::ONE / sum(y);
            for y in y.iter_mut() {
                *y = *y * inv;
            }
            // The masked tail stays exactly 0 from the allocation.
        });
    out
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "kiln-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_b, _h, tq, tk) = l.shape().dims4()?;
        if tk == 0 || (self.causal && tq > tk) {
            bail!("{name}: bad shape {:?}", l.dims())
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(fwd_kernel(
                contiguous(x, l, name)?,
                tq,
                tk,
                self.scale,
                self.causal,
            )),
            CpuStorage::F64(x) => CpuStorage::F64(fwd_kernel(
                contiguous(x, l, name)?,
                tq,
                tk,
                self.scale,
                self.causal,
            )),
            _ => bail!("{name}: expected an f32 or f64 input"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok(Some(dx))
    }
}

/// `dx = scale * y * (dy - sum(dy * y))` row-wise over the last dim.
struct SoftmaxBwd {
    scale: f64,
}

fn bwd_kernel<T: Float>(y: &[T], dy: &[T], tk: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut out = vec![T::ZERO; y.len()];
    out.par_chunks_mut(tk)
        .zip(y.par_chunks(tk))
        .zip(dy.par_chunks(tk))
        .for_each(|((dx, y), dy)| {
            let c = dot(dy, y);
            for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx = scale * y * (dy - c);
            }
        });
    out
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "kiln-masked-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let tk = l1.dims().last().copied().unwrap_or(0);
        if l1.shape() != l2.shape() || tk == 0 {
            bail!(
                "{name}: shape mismatch y {:?} dy {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(dy)) => CpuStorage::F32(bwd_kernel(
                contiguous(y, l1, name)?,
                contiguous(dy, l2, name)?,
                tk,
                self.scale,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(dy)) => CpuStorage::F64(bwd_kernel(
                contiguous(y, l1, name)?,
                contiguous(dy, l2, name)?,
                tk,
                self.scale,
            )),
            _ => bail!("{name}: expected f32 or f64 inputs of the same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}
