//! Shared helpers: the float abstraction the kernels are generic over, access to contiguous
//! storage slices, and reductions written with independent lanes so LLVM can vectorise them
//! (a plain `iter().sum()` over floats is a serial dependency chain and never vectorises).

use candle_core::{bail, DType, Layout, Result, Tensor};
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Elements per rayon task for elementwise kernels: large enough to amortise scheduling.
pub(crate) const ELEMWISE_CHUNK: usize = 1 << 14;

/// The float types the fused kernels support (f32 and f64).
pub(crate) trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn max(self, other: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                // Not `f32::max`: a plain compare-select vectorises to maxps.
                if self > other {
                    self
                } else {
                    other
                }
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

/// The contiguous part of `data` described by `layout`, or an error for strided layouts (the
/// public wrappers call `.contiguous()` first, so this only fires on misuse).
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) if end <= data.len() => Ok(&data[start..end]),
        _ => bail!("{op}: expected a contiguous input"),
    }
}

/// Mutable variant of [`contiguous`], for in-place ops.
pub(crate) fn contiguous_mut<'a, T>(
    data: &'a mut [T],
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) if end <= data.len() => Ok(&mut data[start..end]),
        _ => bail!("{op}: expected a contiguous destination"),
    }
}

/// True when every tensor is on the CPU with the same f32/f64 dtype, i.e. the fused kernels apply.
pub(crate) fn fused_ok(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    let dtype = first.dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// Vector-Jacobian product by candle autograd over a reference composition: the backward of
/// the non-fused (GPU, other dtype) path of the explicit `*_backward` functions.
pub(crate) fn autograd_vjp(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[&Tensor],
    dy: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars: Vec<candle_core::Var> = inputs
        .iter()
        .map(|t| candle_core::Var::from_tensor(&t.detach()))
        .collect::<Result<_>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs)?;
    let grads = (out * dy.detach())?.sum_all()?.backward()?;
    vars.iter()
        .map(|v| match grads.get(v) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect()
}

const LANES: usize = 8;

#[inline(always)]
fn lanes<T: Float>(acc: [T; LANES]) -> T {
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
}

/// `sum_i a[i] * b[i]` (lengths must match; extra elements of the longer slice are ignored).
#[inline]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = lanes(acc);
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `sum_i a[i] * b[i] * c[i]`.
#[inline]
pub(crate) fn dot3<T: Float>(a: &[T], b: &[T], c: &[T]) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    let mut s = lanes(acc);
    for ((&x, &y), &z) in ra.iter().zip(rb).zip(rc) {
        s += x * y * z;
    }
    s
}

/// `sum_i a[i]`.
#[inline]
pub(crate) fn sum<T: Float>(a: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    let mut s = lanes(acc);
    for &x in ra {
        s += x;
    }
    s
}

/// `max_i a[i]` (`-inf` for an empty slice).
#[inline]
pub(crate) fn max<T: Float>(a: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            acc[l] = acc[l].max(x[l]);
        }
    }
    let mut m = acc.iter().fold(T::NEG_INFINITY, |m, &x| m.max(x));
    for &x in ra {
        m = m.max(x);
    }
    m
}

/// `sum_i a[i]^2` accumulated in f64 (for the grad norm, where f32 accumulation over ~1e8
/// elements would lose digits).
#[inline]
pub(crate) fn sum_sq_f64<T: Float>(a: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            let v = x[l].to_f64();
            acc[l] += v * v;
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for &x in ra {
        let v = x.to_f64();
        s += v * v;
    }
    s
}
