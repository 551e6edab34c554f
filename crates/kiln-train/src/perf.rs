//! Machine measurements for MFU: the GEMM peak (fp32, or bf16 products) and peak resident
//! memory.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_model::Precision;

use crate::TrainError;

/// Measured fp32 GEMM throughput (FLOP/s) of candle's matmul on `device` with the current
/// thread count: the best rate of square products of two sizes, each repeated for at least
/// 0.15 s after a warm-up. This is the denominator of MFU ("model FLOPs utilisation against
/// the machine's measured peak"). (Five 1024^3 products, about 0.1 s in all, were too short:
/// a moment of load on a shared machine measured the peak low and MFU above 100%.)
pub fn measure_gemm_peak(device: &Device) -> Result<f64, TrainError> {
    best_square_rate(|n| {
        let a = Tensor::ones((n, n), DType::F32, device)?;
        let b = Tensor::ones((n, n), DType::F32, device)?;
        Ok(move || -> Result<(), TrainError> {
            let _c = a.matmul(&b)?;
            device.synchronize()?;
            Ok(())
        })
    })
}

/// The GEMM peak of the products a run computes: [`measure_gemm_peak`] for f32, and for
/// bf16 the best rate of kiln's bf16-product GEMM on the same square sizes (the CPU must have
/// AVX512-BF16: pass [`Precision::effective`]).
pub fn measure_peak(device: &Device, precision: Precision) -> Result<f64, TrainError> {
    if precision != Precision::Bf16 || !device.is_cpu() {
        return measure_gemm_peak(device);
    }
    use kiln_kernels::bf16_gemm::{gemm_bf16, MatView};
    best_square_rate(|n| {
        let a = vec![1f32; n * n];
        Ok(move || -> Result<(), TrainError> {
            let _c = gemm_bf16(
                &MatView::row_major(&a, n, n),
                &MatView::transposed(&a, n, n),
            );
            Ok(())
        })
    })
}

/// The best FLOP/s of an `n^3` product for n = 1024 and 1536: `setup(n)` builds the operands
/// and returns one product; it runs once to warm up (thread pool, page faults), then at least
/// three times and for at least 0.15 s.
fn best_square_rate<P: FnMut() -> Result<(), TrainError>>(
    mut setup: impl FnMut(usize) -> Result<P, TrainError>,
) -> Result<f64, TrainError> {
    let mut best_rate = 0f64;
    for n in [1024usize, 1536] {
        let mut product = setup(n)?;
        product()?;
        let start = Instant::now();
        let mut reps = 0;
        while reps < 3 || start.elapsed().as_secs_f64() < 0.15 {
            let t0 = Instant::now();
            product()?;
            best_rate = best_rate.max(2.0 * (n * n * n) as f64 / t0.elapsed().as_secs_f64());
            reps += 1;
        }
    }
    Ok(best_rate)
}

/// MFU of a step that ran at `flops_per_s` against `peak_flops`, at most 1: a step faster
/// than the measured peak means the peak was measured low, not that the step beat the
/// machine.
pub fn mfu(flops_per_s: f64, peak_flops: f64) -> f64 {
    (flops_per_s / peak_flops).min(1.0)
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mfu_is_a_fraction_of_the_peak_and_never_above_one() {
        assert_eq!(mfu(25.0, 100.0), 0.25);
        assert_eq!(mfu(130.0, 100.0), 1.0);
    }

    #[test]
    fn the_gemm_peak_is_a_positive_rate() {
        let p = measure_gemm_peak(&Device::Cpu).unwrap();
        assert!(p.is_finite() && p > 1e8, "{p}");
    }
}
