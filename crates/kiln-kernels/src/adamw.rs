//! Fused AdamW update (exactly `torch.optim.AdamW`, plus a gradient pre-scale) and the fused
//! sum of squares used for the global gradient norm.
//!
//! With `s = grad_scale`, `t = step` (1-based):
//!
//! ```text
//! g     = grad * s
//! param = param * (1 - lr * wd)
//! m     = b1 * m + (1 - b1) * g
//! v     = b2 * v + (1 - b2) * g^2
//! param = param - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! ```
//!
//! On the CPU this runs as three in-place passes with no allocation: m (reads grad), v (reads
//! grad), then param (reads the new m and v). candle's in-place ops write a single destination,
//! so one pass per written tensor is the minimum. Elsewhere it falls back to tensor ops and a
//! copy back into place.
//!
//! param, m and v may be any contiguous views (a `narrow` of a flat buffer, with a non-zero start
//! offset): the optimizer runs one step over a whole contiguous range of parameters at once.

use crate::util::{contiguous, contiguous_mut, sum_sq_f64, Float, ELEMWISE_CHUNK};
use candle_core::{
    bail, CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Hyper-parameters of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// The gradient is multiplied by this first (e.g. a gradient-clipping coefficient).
    pub grad_scale: f64,
}

impl AdamWParams {
    fn validate(&self) -> Result<()> {
        if self.step == 0 {
            bail!("adamw_step: step is 1-based, got 0")
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("adamw_step: {name} must be in [0, 1), got {b}")
            }
        }
        Ok(())
    }

    /// `(1 - b1^t, 1 - b2^t)`.
    fn bias_corrections(&self) -> (f64, f64) {
        // powi takes i32; beyond that the correction is 1 to f64 precision anyway.
        let t = self.step.min(i32::MAX as u64) as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }
}

/// One in-place AdamW step for a parameter tensor (or a contiguous range of a flat parameter
/// buffer) with its moment buffers. `param`, `m` and `v` are written in place: `Var`s or views.
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    p: &AdamWParams,
) -> Result<()> {
    p.validate()?;
    let shape = param.shape();
    if grad.shape() != shape || m.shape() != shape || v.shape() != shape {
        bail!(
            "adamw_step: shape mismatch param {:?} grad {:?} m {:?} v {:?}",
            param.dims(),
            grad.dims(),
            m.dims(),
            v.dims()
        )
    }
    let dtype = param.dtype();
    let fused = matches!(dtype, DType::F32 | DType::F64)
        && [param, grad, m, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype)
        && [param, m, v].iter().all(|t| t.is_contiguous());
    if !fused {
        return reference_adamw_step(param, grad, m, v, p);
    }
    // `contiguous` is a no-op (no copy) for the usual contiguous gradient.
    let grad = grad.contiguous()?;
    m.inplace_op2(
        &grad,
        &MomentUpdate {
            beta: p.beta1,
            grad_scale: p.grad_scale,
            square: false,
        },
    )?;
    v.inplace_op2(
        &grad,
        &MomentUpdate {
            beta: p.beta2,
            grad_scale: p.grad_scale,
            square: true,
        },
    )?;
    let (bc1, bc2) = p.bias_corrections();
    param.inplace_op3(
        m,
        v,
        &ParamUpdate {
            decay: 1.0 - p.lr * p.weight_decay,
            step_size: p.lr / bc1,
            inv_sqrt_bc2: 1.0 / bc2.sqrt(),
            eps: p.eps,
        },
    )
}

/// AdamW with plain tensor ops, copying the results back into place (device/dtype-generic
/// fallback and test oracle). The update is computed in the dtype of `m`.
pub fn reference_adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    p: &AdamWParams,
) -> Result<()> {
    p.validate()?;
    for t in [param, m, v] {
        if !t.is_contiguous() || t.shape() != grad.shape() {
            bail!(
                "adamw_step: param, m and v must be contiguous and shaped like the gradient {:?}",
                grad.dims()
            )
        }
    }
    let (bc1, bc2) = p.bias_corrections();
    let dt = m.dtype();
    let g = (grad.detach().to_dtype(dt)? * p.grad_scale)?;
    let m_new = ((m.detach() * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
    let v_new = ((v.detach().to_dtype(dt)? * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
    let denom = ((v_new.sqrt()? * (1.0 / bc2.sqrt()))? + p.eps)?;
    let update = ((&m_new / denom)? * (p.lr / bc1))?;
    let p_new = ((param.detach().to_dtype(dt)? * (1.0 - p.lr * p.weight_decay))? - update)?;
    copy_into(m, &m_new)?;
    copy_into(v, &v_new.to_dtype(v.dtype())?)?;
    copy_into(param, &p_new.to_dtype(param.dtype())?)
}

/// Writes `value` into the contiguous tensor or view `dst` (same shape).
fn copy_into(dst: &Tensor, value: &Tensor) -> Result<()> {
    let (dst, value) = (dst.flatten_all()?, value.flatten_all()?);
    dst.slice_set(&value.contiguous()?, 0, 0)
}

/// `m = beta * m + (1 - beta) * h(grad * grad_scale)` with h = identity or square.
struct MomentUpdate {
    beta: f64,
    grad_scale: f64,
    square: bool,
}

fn moment_kernel<T: Float>(m: &mut [T], g: &[T], op: &MomentUpdate) {
    let b = T::from_f64(op.beta);
    let one_minus_b = T::from_f64(1.0 - op.beta);
    let s = T::from_f64(op.grad_scale);
    let square = op.square;
    m.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(g.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(m, g)| {
            if square {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * s;
                    *m = b * *m + one_minus_b * (g * g);
                }
            } else {
                for (m, &g) in m.iter_mut().zip(g) {
                    *m = b * *m + one_minus_b * (g * s);
                }
            }
        });
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        if self.square {
            "kiln-adamw-v"
        } else {
            "kiln-adamw-m"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = InplaceOp2::name(self);
        if l1.shape() != l2.shape() {
            bail!("{name}: shape mismatch {:?} vs {:?}", l1.dims(), l2.dims())
        }
        match (s1, s2) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => {
                moment_kernel(contiguous_mut(m, l1, name)?, contiguous(g, l2, name)?, self)
            }
            (CpuStorage::F64(m), CpuStorage::F64(g)) => {
                moment_kernel(contiguous_mut(m, l1, name)?, contiguous(g, l2, name)?, self)
            }
            _ => bail!("{name}: expected f32 or f64 tensors of the same dtype"),
        }
        Ok(())
    }
}

/// `param = param * decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)`.
struct ParamUpdate {
    decay: f64,
    step_size: f64,
    inv_sqrt_bc2: f64,
    eps: f64,
}

fn param_kernel<T: Float>(p: &mut [T], m: &[T], v: &[T], op: &ParamUpdate) {
    let decay = T::from_f64(op.decay);
    let step = T::from_f64(op.step_size);
    let ibc2 = T::from_f64(op.inv_sqrt_bc2);
    let eps = T::from_f64(op.eps);
    p.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(m.par_chunks(ELEMWISE_CHUNK))
        .zip(v.par_chunks(ELEMWISE_CHUNK))
        .for_each(|((p, m), v)| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = *p * decay - step * m / (v.sqrt() * ibc2 + eps);
            }
        });
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "kiln-adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = InplaceOp3::name(self);
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            bail!(
                "{name}: shape mismatch {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => param_kernel(
                contiguous_mut(p, l1, name)?,
                contiguous(m, l2, name)?,
                contiguous(v, l3, name)?,
                self,
            ),
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => param_kernel(
                contiguous_mut(p, l1, name)?,
                contiguous(m, l2, name)?,
                contiguous(v, l3, name)?,
                self,
            ),
            _ => bail!("{name}: expected f32 or f64 tensors of the same dtype"),
        }
        Ok(())
    }
}

/// `sum(t^2)` as an f64, accumulated in f64. On the CPU (f32/f64) it is one fused pass with no
/// tensor-sized temporary; elsewhere it uses tensor ops.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    if t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) {
        t.contiguous()?
            .apply_op1_no_bwd(&SumOfSquares)?
            .to_scalar::<f64>()
    } else {
        reference_sum_of_squares(t)
    }
}

/// `sum(t^2)` with plain tensor ops (fallback and test oracle). Non-f64 inputs are reduced in f32.
pub fn reference_sum_of_squares(t: &Tensor) -> Result<f64> {
    let t = t.detach();
    if t.dtype() == DType::F64 {
        t.sqr()?.sum_all()?.to_scalar::<f64>()
    } else {
        Ok(t.to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64)
    }
}

/// Produces a single f64 element; partial sums per chunk are combined in order (deterministic).
struct SumOfSquares;

fn sum_sq_kernel<T: Float>(x: &[T]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(ELEMWISE_CHUNK).map(sum_sq_f64).collect();
    partials.iter().sum()
}

impl CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "kiln-sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp1::name(self);
        let total = match s {
            CpuStorage::F32(x) => sum_sq_kernel(contiguous(x, l, name)?),
            CpuStorage::F64(x) => sum_sq_kernel(contiguous(x, l, name)?),
            _ => bail!("{name}: expected an f32 or f64 input"),
        };
        Ok((CpuStorage::F64(vec![total]), Shape::from(())))
    }
}
