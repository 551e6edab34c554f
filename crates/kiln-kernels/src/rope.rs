//! Rotary position embedding, half-split layout (the HF `rotate_half` convention).
//!
//! Shapes: x (b, h, t, hd), cos and sin (t, hd/2) -> out (b, h, t, hd), contiguous.
//! With x1 = x[..., :hd/2] and x2 = x[..., hd/2:], at position p:
//!
//! ```text
//! out1 = x1 * cos[p] - x2 * sin[p]
//! out2 = x2 * cos[p] + x1 * sin[p]
//! ```
//!
//! This is a rotation of each (x1[i], x2[i]) pair by angle[p, i], so the backward is the inverse
//! rotation: the same op with sin negated. cos and sin are constants (no gradient).
//!
//! Tables: inv_freq[i] = theta^(-2i/hd), angle[p, i] = p * inv_freq[i] (see [`rope_tables`]).

use crate::util::{contiguous, fused_ok, Float};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Applies rotary embeddings to x (b, h, t, hd) with cos/sin tables (t, hd/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_shapes(x, cos, sin)?;
    if fused_ok(&[x, cos, sin]) {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { inverse: false },
        )
    } else {
        reference_rope(x, cos, sin)
    }
}

/// Explicit backward of [`rope`]: the rotation by the opposite angle.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_shapes(dy, cos, sin)?;
    if fused_ok(&[dy, cos, sin]) {
        dy.contiguous()?.apply_op3_no_bwd(
            &cos.contiguous()?,
            &sin.contiguous()?,
            &Rope { inverse: true },
        )
    } else {
        reference_rope(dy, cos, &sin.neg()?)
    }
}

fn check_shapes(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (_b, _h, t, hd) = x.dims4()?;
    if !hd.is_multiple_of(2) || hd == 0 {
        bail!("rope: head dim must be even and non-zero, got {hd}")
    }
    let want = [t, hd / 2];
    if cos.dims() != want || sin.dims() != want {
        bail!(
            "rope: cos {:?} / sin {:?} must have shape (t, hd/2) = {want:?} for x {:?}",
            cos.dims(),
            sin.dims(),
            x.dims()
        )
    }
    if cos.dtype() != x.dtype() || sin.dtype() != x.dtype() {
        bail!(
            "rope: dtype mismatch x {:?}, cos {:?}, sin {:?}",
            x.dtype(),
            cos.dtype(),
            sin.dtype()
        )
    }
    Ok(())
}

/// RoPE as a composition of plain candle ops (device-generic fallback and test oracle).
pub fn reference_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_shapes(x, cos, sin)?;
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let out1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let out2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[&out1, &out2], D::Minus1)
}

/// cos/sin tables of shape (max_positions, head_dim/2): inv_freq[i] = theta^(-2i/head_dim),
/// angle[p, i] = p * inv_freq[i]. Angles are computed in f64 and the results cast to `dtype`.
pub fn rope_tables(
    head_dim: usize,
    max_positions: usize,
    theta: f64,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("rope_tables: head_dim must be even and non-zero, got {head_dim}")
    }
    if !(theta.is_finite() && theta > 0.0) {
        bail!("rope_tables: theta must be positive and finite, got {theta}")
    }
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for p in 0..max_positions {
        for &f in &inv_freq {
            let a = p as f64 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let mk = |v: Vec<f64>| {
        Tensor::from_vec(v, (max_positions, half), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    };
    Ok((mk(cos)?, mk(sin)?))
}

struct Rope {
    /// Rotate by -angle (sin negated): the backward pass.
    inverse: bool,
}

fn kernel<T: Float>(x: &[T], cos: &[T], sin: &[T], t: usize, hd: usize, inverse: bool) -> Vec<T> {
    let half = hd / 2;
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(hd)
        .zip(x.par_chunks(hd))
        .enumerate()
        .for_each(|(row, (o, x))| {
            // Rows are ordered (b, h, t), so the position is the row index modulo t.
            let p = row % t;
            let c = &cos[p * half..(p + 1) * half];
            let s = &sin[p * half..(p + 1) * half];
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            if inverse {
                for ((((o1, o2), (&a, &b)), &c), &s) in
                    o1.iter_mut().zip(o2).zip(x1.iter().zip(x2)).zip(c).zip(s)
                {
                    *o1 = a * c + b * s;
                    *o2 = b * c - a * s;
                }
            } else {
                for ((((o1, o2), (&a, &b)), &c), &s) in
                    o1.iter_mut().zip(o2).zip(x1.iter().zip(x2)).zip(c).zip(s)
                {
                    *o1 = a * c - b * s;
                    *o2 = b * c + a * s;
                }
            }
        });
    out
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "kiln-rope"
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
        let (_b, _h, t, hd) = l1.shape().dims4()?;
        let want = [t, hd / 2];
        if !hd.is_multiple_of(2) || hd == 0 || l2.dims() != want || l3.dims() != want {
            bail!(
                "{name}: bad shapes x {:?} cos {:?} sin {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(kernel(
                    contiguous(x, l1, name)?,
                    contiguous(c, l2, name)?,
                    contiguous(s, l3, name)?,
                    t,
                    hd,
                    self.inverse,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(s)) => {
                CpuStorage::F64(kernel(
                    contiguous(x, l1, name)?,
                    contiguous(c, l2, name)?,
                    contiguous(s, l3, name)?,
                    t,
                    hd,
                    self.inverse,
                ))
            }
            _ => bail!("{name}: expected f32 or f64 inputs of the same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The transpose of a rotation is the opposite rotation.
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}
