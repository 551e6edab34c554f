//! SwiGLU activation (the LLaMA MLP gate), elementwise over two same-shaped tensors.
//!
//! ```text
//! sigma(g) = 1 / (1 + exp(-g)),   silu(g) = g * sigma(g)
//! out      = silu(gate) * up
//! d gate   = dy * up * sigma(gate) * (1 + gate * (1 - sigma(gate)))
//! d up     = dy * silu(gate)
//! ```
//!
//! `d up` reuses the forward kernel (silu(gate) * dy); `d gate` has its own fused kernel.

use crate::util::{autograd_vjp, contiguous, fused_ok, Float, ELEMWISE_CHUNK};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `silu(gate) * up` elementwise; gate and up must have the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check(gate, up)?;
    if fused_ok(&[gate, up]) {
        gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
    } else {
        reference_swiglu(gate, up)
    }
}

/// Explicit backward of [`swiglu`]: `(dgate, dup)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    check(gate, up)?;
    if fused_ok(&[gate, up, dy]) {
        let (gate, up) = (gate.contiguous()?, up.contiguous()?);
        let (dg, du) = Swiglu.bwd(&gate, &up, &gate, dy)?;
        return Ok((
            dg.expect("swiglu bwd gives dgate"),
            du.expect("swiglu bwd gives dup"),
        ));
    }
    let g = autograd_vjp(|v| reference_swiglu(&v[0], &v[1]), &[gate, up], dy)?;
    Ok((g[0].clone(), g[1].clone()))
}

fn check(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.shape() != up.shape() {
        bail!(
            "swiglu: shape mismatch gate {:?} vs up {:?}",
            gate.dims(),
            up.dims()
        )
    }
    if gate.dtype() != up.dtype() {
        bail!(
            "swiglu: dtype mismatch gate {:?} vs up {:?}",
            gate.dtype(),
            up.dtype()
        )
    }
    Ok(())
}

/// SwiGLU as a composition of plain candle ops (fallback and test oracle).
pub fn reference_swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check(gate, up)?;
    let sigma = (gate.neg()?.exp()? + 1.0)?.recip()?;
    (gate * sigma)? * up
}

#[inline(always)]
fn sigmoid<T: Float>(g: T) -> T {
    T::ONE / (T::ONE + (-g).exp())
}

struct Swiglu;

fn fwd_kernel<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; g.len()];
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(g.par_chunks(ELEMWISE_CHUNK))
        .zip(u.par_chunks(ELEMWISE_CHUNK))
        .for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
    out
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "kiln-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        if l1.shape() != l2.shape() {
            bail!("{name}: shape mismatch {:?} vs {:?}", l1.dims(), l2.dims())
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(fwd_kernel(
                contiguous(g, l1, name)?,
                contiguous(u, l2, name)?,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => CpuStorage::F64(fwd_kernel(
                contiguous(g, l1, name)?,
                contiguous(u, l2, name)?,
            )),
            _ => bail!("{name}: expected f32 or f64 inputs of the same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dgate = gate.apply_op3_no_bwd(up, &dy, &SwigluBwdGate)?;
        let dup = gate.apply_op2_no_bwd(&dy, &Swiglu)?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// `dy * up * sigma(gate) * (1 + gate * (1 - sigma(gate)))`.
struct SwigluBwdGate;

fn bwd_gate_kernel<T: Float>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; g.len()];
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(g.par_chunks(ELEMWISE_CHUNK))
        .zip(u.par_chunks(ELEMWISE_CHUNK))
        .zip(dy.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(((o, g), u), dy)| {
            for (((o, &g), &u), &dy) in o.iter_mut().zip(g).zip(u).zip(dy) {
                let s = sigmoid(g);
                *o = dy * u * s * (T::ONE + g * (T::ONE - s));
            }
        });
    out
}

impl CustomOp3 for SwigluBwdGate {
    fn name(&self) -> &'static str {
        "kiln-swiglu-bwd-gate"
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
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            bail!(
                "{name}: shape mismatch {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(dy)) => {
                CpuStorage::F32(bwd_gate_kernel(
                    contiguous(g, l1, name)?,
                    contiguous(u, l2, name)?,
                    contiguous(dy, l3, name)?,
                ))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u), CpuStorage::F64(dy)) => {
                CpuStorage::F64(bwd_gate_kernel(
                    contiguous(g, l1, name)?,
                    contiguous(u, l2, name)?,
                    contiguous(dy, l3, name)?,
                ))
            }
            _ => bail!("{name}: expected f32 or f64 inputs of the same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}
