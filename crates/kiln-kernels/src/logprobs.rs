//! Per-token log-probabilities and entropies of tempered logits, in one pass per row, and
//! their backward (the heads of DPO, PPO and GRPO).
//!
//! Shapes: logits (n, v) float, targets (n) i64 in `[0, v)`, d_logp (n) -> as below.
//!
//! ```text
//! z_r = x_r / T,   m_r = max_j z_rj,   s_r = sum_j e^(z_rj - m_r),   s1_r = sum_j e^(z_rj - m_r) (z_rj - m_r)
//! logp_r = z_r,y_r - m_r - ln s_r
//! H_r    = -sum_j p_rj ln p_rj = ln s_r - s1_r / s_r
//! d x_rj = (g_r / T) ([j == y_r] - p_rj)
//! ```
//!
//! The composition of candle ops this replaces (`log_softmax`, `exp`, `gather`, entropy)
//! kept five `(n, v)` intermediates alive at once; these kernels read the logits and write
//! `(n)` values (forward) or the one `(n, v)` gradient (backward). Row sums are accumulated in
//! f64.

use crate::util::{autograd_vjp, contiguous, fused_ok, max, Float};
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, IndexOp, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// `(log p(y_r), H_r)` of every row of `logits / temperature`, both `(n)`.
pub fn token_logprobs_entropy(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let targets = check(logits, targets, temperature)?;
    let both = if fused_ok(&[logits]) {
        logits
            .contiguous()?
            .apply_op2_no_bwd(&targets.contiguous()?, &LogprobEntropy { temperature })?
    } else {
        reference_token_logprobs_entropy(logits, &targets, temperature)?
    };
    Ok((both.i((.., 0))?, both.i((.., 1))?))
}

/// The gradient of `sum_r g_r logp_r` (the log-probabilities of [`token_logprobs_entropy`])
/// with respect to the logits: `(g_r / T) (onehot(y_r) - softmax(x_r / T))`, `(n, v)`.
pub fn token_logprobs_backward(
    logits: &Tensor,
    targets: &Tensor,
    d_logp: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let targets = check(logits, targets, temperature)?;
    let n = logits.dim(0)?;
    if d_logp.dims() != [n] {
        bail!(
            "token_logprobs_backward: d_logp {:?} must have shape ({n},)",
            d_logp.dims()
        )
    }
    let d_logp = d_logp.to_dtype(logits.dtype())?;
    if fused_ok(&[logits]) {
        logits.contiguous()?.apply_op3_no_bwd(
            &targets.contiguous()?,
            &d_logp.contiguous()?,
            &LogprobBwd { temperature },
        )
    } else {
        let g = autograd_vjp(
            |x| reference_token_logprobs_entropy(&x[0], &targets, temperature)?.i((.., 0)),
            &[logits],
            &d_logp,
        )?;
        Ok(g[0].clone())
    }
}

/// The same `(n, 2)` `[logp, entropy]` as plain candle ops (fallback on other devices and
/// dtypes, and the tests' oracle).
pub fn reference_token_logprobs_entropy(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let z = (logits / temperature)?;
    let m = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp_all = shifted.broadcast_sub(&lse)?;
    let idx = targets.to_dtype(DType::U32)?.reshape((n, 1))?;
    let logp = logp_all.gather(&idx, 1)?;
    let entropy = (logp_all.exp()? * &logp_all)?
        .sum_keepdim(D::Minus1)?
        .neg()?;
    Tensor::cat(&[logp, entropy], 1)
}

/// Validates shapes, the temperature and the targets' range; returns the targets as i64.
fn check(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        bail!(
            "token log-probs: targets {:?} must have shape ({n},) to match logits {:?}",
            targets.dims(),
            logits.dims()
        )
    }
    if v == 0 {
        bail!("token log-probs: logits have an empty vocabulary dimension")
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("token log-probs: temperature must be positive, got {temperature}")
    }
    let targets = targets.to_dtype(DType::I64)?;
    for (row, t) in targets.to_vec1::<i64>()?.into_iter().enumerate() {
        if t < 0 || t as u64 >= v as u64 {
            bail!("token log-probs: target {t} at row {row} is outside [0, {v})")
        }
    }
    Ok(targets)
}

/// `(m, ln s, s1 / s)` of a row at temperature `T` (see the module docs).
#[inline]
fn row_sums<T: Float>(row: &[T], inv_t: T) -> (T, f64, f64) {
    let m = max(row) * inv_t;
    let (mut s, mut s1) = (0f64, 0f64);
    for &x in row {
        let d = x * inv_t - m;
        let e = d.exp().to_f64();
        s += e;
        s1 += e * d.to_f64();
    }
    (m, s.ln(), s1 / s)
}

struct LogprobEntropy {
    temperature: f64,
}

fn fwd_kernel<T: Float>(logits: &[T], targets: &[i64], v: usize, temperature: f64) -> Vec<T> {
    let inv_t = T::from_f64(1.0 / temperature);
    let mut out = vec![T::ZERO; 2 * targets.len()];
    out.par_chunks_mut(2)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .for_each(|((o, row), &t)| {
            let (m, ln_s, mean_shifted) = row_sums(row, inv_t);
            // `check` keeps every target in [0, v).
            let z_t = row[t as usize] * inv_t;
            o[0] = T::from_f64((z_t - m).to_f64() - ln_s);
            o[1] = T::from_f64(ln_s - mean_shifted);
        });
    out
}

impl CustomOp2 for LogprobEntropy {
    fn name(&self) -> &'static str {
        "kiln-token-logprobs-entropy"
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
            bail!("{name}: bad shapes {:?} {:?}", l1.dims(), l2.dims())
        }
        let CpuStorage::I64(t) = s2 else {
            bail!("{name}: targets must be i64")
        };
        let t = contiguous(t, l2, name)?;
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(fwd_kernel(contiguous(x, l1, name)?, t, v, self.temperature))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(fwd_kernel(contiguous(x, l1, name)?, t, v, self.temperature))
            }
            _ => bail!("{name}: expected f32 or f64 logits"),
        };
        Ok((out, Shape::from((n, 2))))
    }
}

struct LogprobBwd {
    temperature: f64,
}

fn bwd_kernel<T: Float>(
    logits: &[T],
    targets: &[i64],
    d_logp: &[T],
    v: usize,
    temperature: f64,
) -> Vec<T> {
    let inv_t = T::from_f64(1.0 / temperature);
    let mut out = vec![T::ZERO; logits.len()];
    out.par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter().zip(d_logp.par_iter()))
        .for_each(|((d, row), (&t, &g))| {
            let (m, ln_s, _) = row_sums(row, inv_t);
            let lse = m + T::from_f64(ln_s);
            let g_t = g * inv_t;
            for (d, &x) in d.iter_mut().zip(row) {
                *d = -(g_t * (x * inv_t - lse).exp());
            }
            let t = t as usize; // `check` keeps it in [0, v)
            d[t] += g_t;
        });
    out
}

impl CustomOp3 for LogprobBwd {
    fn name(&self) -> &'static str {
        "kiln-token-logprobs-bwd"
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
        let (n, v) = l1.shape().dims2()?;
        if l2.dims() != [n] || l3.dims() != [n] || v == 0 {
            bail!(
                "{name}: bad shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let CpuStorage::I64(t) = s2 else {
            bail!("{name}: targets must be i64")
        };
        let t = contiguous(t, l2, name)?;
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(bwd_kernel(
                contiguous(x, l1, name)?,
                t,
                contiguous(g, l3, name)?,
                v,
                self.temperature,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(bwd_kernel(
                contiguous(x, l1, name)?,
                t,
                contiguous(g, l3, name)?,
                v,
                self.temperature,
            )),
            _ => bail!("{name}: expected f32 or f64 logits and gradients of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(n: usize, v: usize, dtype: DType) -> Tensor {
        let vals: Vec<f64> = (0..n * v)
            .map(|i| ((i * 7919 % 1013) as f64 / 1013.0 - 0.5) * 9.0)
            .collect();
        Tensor::from_vec(vals, (n, v), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn targets(n: usize, v: usize) -> Tensor {
        let t: Vec<i64> = (0..n).map(|r| ((r * 31 + 5) % v) as i64).collect();
        Tensor::from_vec(t, n, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn fused_values_equal_the_composition() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            for temperature in [1.0, 0.7] {
                let (x, t) = (logits(13, 301, dtype), targets(13, 301));
                let (lp, ent) = token_logprobs_entropy(&x, &t, temperature).unwrap();
                let want = reference_token_logprobs_entropy(&x, &t, temperature).unwrap();
                assert!(
                    max_diff(&lp, &want.i((.., 0)).unwrap()) < tol,
                    "{dtype:?} logp"
                );
                assert!(
                    max_diff(&ent, &want.i((.., 1)).unwrap()) < tol,
                    "{dtype:?} H"
                );
            }
        }
    }

    /// Central differences of `sum_r g_r logp_r` in f64 against the fused backward.
    #[test]
    fn backward_matches_finite_differences() {
        let (n, v, temperature) = (5, 37, 0.7);
        let x = logits(n, v, DType::F64);
        let t = targets(n, v);
        let g = Tensor::from_vec(vec![0.3, -1.2, 0.8, 2.0, -0.5], n, &Device::Cpu).unwrap();
        let objective = |x: &Tensor| -> f64 {
            let (lp, _) = token_logprobs_entropy(x, &t, temperature).unwrap();
            (lp * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let dx = token_logprobs_backward(&x, &t, &g, temperature).unwrap();
        let dx: Vec<f64> = dx.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for i in (0..n * v).step_by(3).chain([t_index(&t, 2, v)]) {
            let shifted = |delta: f64| {
                let mut vals = base.clone();
                vals[i] += delta;
                objective(&Tensor::from_vec(vals, (n, v), &Device::Cpu).unwrap())
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            assert!(
                (fd - dx[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                "element {i}: finite difference {fd} vs backward {}",
                dx[i]
            );
        }
        // The f32 kernel equals the f64 one to f32 precision.
        let dx32 = token_logprobs_backward(
            &x.to_dtype(DType::F32).unwrap(),
            &t,
            &g.to_dtype(DType::F32).unwrap(),
            temperature,
        )
        .unwrap();
        let dx64 = Tensor::from_vec(dx, (n, v), &Device::Cpu).unwrap();
        assert!(max_diff(&dx32, &dx64) < 1e-6);
    }

    fn t_index(t: &Tensor, row: usize, v: usize) -> usize {
        row * v + t.to_vec1::<i64>().unwrap()[row] as usize
    }

    #[test]
    fn bad_targets_and_temperatures_are_named() {
        let x = logits(3, 10, DType::F32);
        let t = Tensor::from_vec(vec![1i64, 10, 2], 3, &Device::Cpu).unwrap();
        let e = token_logprobs_entropy(&x, &t, 1.0).unwrap_err().to_string();
        assert!(e.contains("target 10 at row 1"), "{e}");
        let e = token_logprobs_entropy(&x, &targets(3, 10), 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("temperature must be positive"), "{e}");
    }
}
