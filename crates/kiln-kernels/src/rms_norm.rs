//! RMSNorm.
//!
//! Shapes: x (..., d), weight (d) -> y (..., d). For every row r of x:
//!
//! ```text
//! rinv_r  = 1 / sqrt(mean_j x[r, j]^2 + eps)
//! y[r, i] = x[r, i] * rinv_r * w[i]
//! ```
//!
//! Backward, with xhat = x * rinv and gh = dy * w (both per row):
//!
//! ```text
//! dx[r, i] = rinv_r * (gh[r, i] - xhat[r, i] * mean_j(gh[r, j] * xhat[r, j]))
//! dw[i]    = sum_r dy[r, i] * xhat[r, i]
//! ```
//!
//! The fused backward computes dx and dw in one pass over the rows; dw is reduced from per-block
//! partial sums (one block per rayon task), never with atomics.

use crate::util::{autograd_vjp, contiguous, dot, dot3, fused_ok, Float};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `y = x * rsqrt(mean(x^2, last dim) + eps) * weight`; x (..., d), weight (d).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        bail!(
            "rms_norm: weight has shape {:?}, expected ({d},) to match x {:?}",
            weight.dims(),
            x.dims()
        )
    }
    if x.dtype() != weight.dtype() {
        bail!(
            "rms_norm: dtype mismatch x {:?} vs weight {:?}",
            x.dtype(),
            weight.dtype()
        )
    }
    if d == 0 {
        bail!("rms_norm: last dimension of x must be non-zero")
    }
    if fused_ok(&[x, weight]) {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, RmsNorm { eps })
    } else {
        reference_rms_norm(x, weight, eps)
    }
}

/// Explicit backward of [`rms_norm`]: `(dx, dweight)` for upstream gradient `dy`, for callers
/// that run their own backward pass instead of candle's autograd.
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if fused_ok(&[x, weight, dy]) {
        let x = x.contiguous()?;
        let (dx, dw) = RmsNorm { eps }.bwd(&x, weight, &x, dy)?;
        return Ok((
            dx.expect("rms_norm bwd gives dx"),
            dw.expect("rms_norm bwd gives dw"),
        ));
    }
    let g = autograd_vjp(|v| reference_rms_norm(&v[0], &v[1], eps), &[x, weight], dy)?;
    Ok((g[0].clone(), g[1].clone()))
}

/// RMSNorm as a composition of plain candle ops (device-generic fallback and test oracle).
pub fn reference_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let rinv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&rinv)?.broadcast_mul(weight)
}

#[inline(always)]
fn row_rinv<T: Float>(x: &[T], eps: T) -> T {
    let d = T::from_f64(x.len() as f64);
    T::ONE / (dot(x, x) / d + eps).sqrt()
}

struct RmsNorm {
    eps: f64,
}

fn fwd_kernel<T: Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let eps = T::from_f64(eps);
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(y, x)| {
            let rinv = row_rinv(x, eps);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * rinv * w;
            }
        });
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "kiln-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let d = l2.shape().elem_count();
        if l1.dims().last() != Some(&d) || d == 0 {
            bail!("{name}: weight length {d} does not match x {:?}", l1.dims())
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(fwd_kernel(
                contiguous(x, l1, name)?,
                contiguous(w, l2, name)?,
                self.eps,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(fwd_kernel(
                contiguous(x, l1, name)?,
                contiguous(w, l2, name)?,
                self.eps,
            )),
            _ => bail!("{name}: expected f32 or f64 inputs of the same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let n = x.elem_count() / d;
        // One fused pass produces a packed (n + 1, d) buffer: rows 0..n are dx, row n is dw.
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        // Copy dw out so the weight grad does not keep the whole packed buffer alive.
        let dw = packed.narrow(0, n, 1)?.reshape(d)?.copy()?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwd {
    eps: f64,
}

fn bwd_kernel<T: Float>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let n = x.len() / d;
    let eps = T::from_f64(eps);
    let inv_d = T::ONE / T::from_f64(d as f64);
    let mut out = vec![T::ZERO; (n + 1) * d];
    let (dx, dw) = out.split_at_mut(n * d);
    // A few blocks per thread for load balance; each block keeps its own dw partial sum.
    let blocks = (rayon::current_num_threads() * 4).clamp(1, n.max(1));
    let rows_per_block = n.div_ceil(blocks).max(1);
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(rows_per_block * d)
        .zip(x.par_chunks(rows_per_block * d))
        .zip(dy.par_chunks(rows_per_block * d))
        .map(|((dx, x), dy)| {
            let mut dw = vec![T::ZERO; d];
            for ((dx, x), dy) in dx
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(dy.chunks_exact(d))
            {
                let rinv = row_rinv(x, eps);
                // mean_j(gh_j * xhat_j) = rinv * sum_j(dy_j w_j x_j) / d
                let c = rinv * dot3(dy, w, x) * inv_d;
                for ((((dx, &x), &dy), &w), dw) in
                    dx.iter_mut().zip(x).zip(dy).zip(w).zip(dw.iter_mut())
                {
                    let xhat = x * rinv;
                    *dx = rinv * (dy * w - xhat * c);
                    *dw += dy * xhat;
                }
            }
            dw
        })
        .collect();
    // Reduce the partials in a fixed order so results are deterministic.
    for p in partials {
        for (o, v) in dw.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "kiln-rms-norm-bwd"
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
        let d = l2.shape().elem_count();
        if l1.shape() != l3.shape() || l1.dims().last() != Some(&d) || d == 0 {
            bail!(
                "{name}: shape mismatch x {:?} w {:?} dy {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => {
                CpuStorage::F32(bwd_kernel(
                    contiguous(x, l1, name)?,
                    contiguous(w, l2, name)?,
                    contiguous(dy, l3, name)?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(dy)) => {
                CpuStorage::F64(bwd_kernel(
                    contiguous(x, l1, name)?,
                    contiguous(w, l2, name)?,
                    contiguous(dy, l3, name)?,
                    self.eps,
                ))
            }
            _ => bail!("{name}: expected f32 or f64 inputs of the same dtype"),
        };
        let n = l1.shape().elem_count() / d;
        Ok((out, Shape::from((n + 1, d))))
    }
}
