//! Machine measurements for MFU: the fp32 GEMM peak and peak resident memory.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::TrainError;

/// Measured fp32 GEMM throughput (FLOP/s) of candle's matmul on `device` with the current
/// thread count: the best of several 1024^3 products after a warm-up. This is the denominator
/// of MFU ("model FLOPs utilisation against the machine's measured peak").
pub fn measure_gemm_peak(device: &Device) -> Result<f64, TrainError> {
    let n = 1024;
    let a = Tensor::ones((n, n), DType::F32, device)?;
    let b = Tensor::ones((n, n), DType::F32, device)?;
    let _ = a.matmul(&b)?; // warm-up: thread pool, page faults
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
