//! Summed token cross-entropy with ignored targets.
//!
//! Shapes: logits (n, v) float, targets (n) i64 -> loss () (same dtype as logits).
//!
//! ```text
//! lse_r = m_r + ln(sum_j exp(logits[r, j] - m_r)),   m_r = max_j logits[r, j]
//! loss  = sum_{r : targets[r] != -100} (lse_r - logits[r, targets[r]])
//! d logits[r, j] = g * (softmax(logits[r])[j] - [j == targets[r]])   for kept rows, 0 otherwise
//! ```
//!
//! where g is the incoming scalar gradient. The backward recomputes the softmax in a single fused
//! pass that writes the (n, v) gradient, so no (n, v) probabilities are kept from the forward.
//! Row sums are accumulated in f64 and the final sum is taken in row order (deterministic).

use crate::util::{autograd_vjp, contiguous, fused_ok, max, Float};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Target value that marks a row as ignored (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// Sum over non-ignored rows of `-log softmax(logits)[target]`; a scalar (shape `()`).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_shapes(logits, targets)?;
    if fused_ok(&[logits]) && targets.device().is_cpu() {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropySum)
    } else {
        reference_cross_entropy_sum(logits, targets)
    }
}

/// Explicit backward of [`cross_entropy_sum`] scaled by `grad` (the upstream scalar, e.g.
/// `1 / n_valid_tokens`): `grad * (softmax(logits) - onehot(target))`, zero rows for ignored
/// targets.
pub fn cross_entropy_backward(logits: &Tensor, targets: &Tensor, grad: f64) -> Result<Tensor> {
    check_shapes(logits, targets)?;
    if fused_ok(&[logits]) && targets.device().is_cpu() {
        logits
            .contiguous()?
            .apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropyBwd { grad })
    } else {
        let dy = Tensor::new(grad, logits.device())?.to_dtype(logits.dtype())?;
        let g = autograd_vjp(
            |v| reference_cross_entropy_sum(&v[0], targets),
            &[logits],
            &dy,
        )?;
        Ok(g[0].clone())
    }
}

/// Number of targets that are not [`IGNORE_INDEX`] (the usual normaliser for the summed loss).
pub fn count_valid_targets(targets: &Tensor) -> Result<usize> {
    if targets.dtype() != DType::I64 {
        bail!(
            "count_valid_targets: targets must be i64, got {:?}",
            targets.dtype()
        )
    }
    let t = targets.flatten_all()?.to_vec1::<i64>()?;
    Ok(t.iter().filter(|&&t| t != IGNORE_INDEX).count())
}

fn check_shapes(logits: &Tensor, targets: &Tensor) -> Result<()> {
    let (n, v) = logits.dims2()?;
    if targets.dtype() != DType::I64 {
        bail!(
            "cross_entropy_sum: targets must be i64, got {:?}",
            targets.dtype()
        )
    }
    if targets.dims() != [n] {
        bail!(
            "cross_entropy_sum: targets {:?} must have shape ({n},) to match logits {:?}",
            targets.dims(),
            logits.dims()
        )
    }
    if v == 0 {
        bail!("cross_entropy_sum: logits have an empty vocabulary dimension")
    }
    Ok(())
}

/// The first target outside `[0, v)` that is not [`IGNORE_INDEX`] is an error naming its row.
fn validate_targets(targets: &[i64], v: usize) -> Result<()> {
    for (row, &t) in targets.iter().enumerate() {
        if t != IGNORE_INDEX && (t < 0 || t as u64 >= v as u64) {
            bail!(
                "cross_entropy_sum: target {t} at row {row} is outside [0, {v}) \
                 (use {IGNORE_INDEX} to ignore a row)"
            )
        }
    }
    Ok(())
}

/// Cross-entropy as a composition of plain candle ops (fallback and test oracle).
pub fn reference_cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_shapes(logits, targets)?;
    let (_n, v) = logits.dims2()?;
    validate_targets(&targets.to_vec1::<i64>()?, v)?;
    // The shift is only for stability; lse does not depend on it, so it needs no gradient.
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let lse = logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&m)?;
    let valid = targets.ne(IGNORE_INDEX)?;
    let safe_targets = valid.where_cond(targets, &targets.zeros_like()?)?;
    let picked = logits.gather(&safe_targets.unsqueeze(1)?, 1)?;
    let nll = (lse - picked)?.squeeze(1)?;
    (nll * valid.to_dtype(logits.dtype())?)?.sum_all()
}

/// `m + ln(sum exp(x - m))` with the sum accumulated in f64.
#[inline]
fn log_sum_exp<T: Float>(x: &[T]) -> f64 {
    let m = max(x);
    let mut s = 0f64;
    for &x in x {
        s += (x - m).exp().to_f64();
    }
    m.to_f64() + s.ln()
}

struct CrossEntropySum;

fn fwd_kernel<T: Float>(logits: &[T], targets: &[i64], v: usize) -> Result<T> {
    validate_targets(targets, v)?;
    let losses: Vec<f64> = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t == IGNORE_INDEX {
                0.0
            } else {
                // validate_targets guarantees 0 <= t < v.
                log_sum_exp(row) - row[t as usize].to_f64()
            }
        })
        .collect();
    Ok(T::from_f64(losses.iter().sum::<f64>()))
}

impl CustomOp2 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (n, v) = l1.shape().dims2()?;
        if l2.dims() != [n] || v == 0 {
            bail!(
                "{name}: bad shapes logits {:?} targets {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        let CpuStorage::I64(t) = s2 else {
            bail!("{name}: targets must be i64")
        };
        let t = contiguous(t, l2, name)?;
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(vec![fwd_kernel(contiguous(x, l1, name)?, t, v)?])
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(vec![fwd_kernel(contiguous(x, l1, name)?, t, v)?])
            }
            _ => bail!("{name}: expected f32 or f64 logits"),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F64)?.reshape(())?.to_scalar::<f64>()?;
        let dlogits = logits.apply_op2_no_bwd(targets, &CrossEntropyBwd { grad: g })?;
        Ok((Some(dlogits), None))
    }
}

/// `g * (softmax(logits) - onehot(target))` for kept rows, 0 for ignored rows.
struct CrossEntropyBwd {
    grad: f64,
}

fn bwd_kernel<T: Float>(logits: &[T], targets: &[i64], v: usize, grad: f64) -> Result<Vec<T>> {
    validate_targets(targets, v)?;
    let g = T::from_f64(grad);
    let mut out = vec![T::ZERO; logits.len()];
    out.par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .for_each(|((d, row), &t)| {
            if t == IGNORE_INDEX {
                return; // stays 0
            }
            let lse = T::from_f64(log_sum_exp(row));
            for (d, &x) in d.iter_mut().zip(row) {
                *d = g * (x - lse).exp();
            }
            let t = t as usize; // validated above
            d[t] = d[t] - g;
        });
    Ok(out)
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy-sum-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (n, v) = l1.shape().dims2()?;
        if l2.dims() != [n] || v == 0 {
            bail!(
                "{name}: bad shapes logits {:?} targets {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        let CpuStorage::I64(t) = s2 else {
            bail!("{name}: targets must be i64")
        };
        let t = contiguous(t, l2, name)?;
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(bwd_kernel(contiguous(x, l1, name)?, t, v, self.grad)?)
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(bwd_kernel(contiguous(x, l1, name)?, t, v, self.grad)?)
            }
            _ => bail!("{name}: expected f32 or f64 logits"),
        };
        Ok((out, l1.shape().clone()))
    }
}
