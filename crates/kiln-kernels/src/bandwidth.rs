//! The machine's memory read bandwidth, for reading decode speed as a fraction of it (decoding
//! one token reads every weight once, so bandwidth / weight bytes bounds tokens/s).

use std::time::Instant;

use rayon::prelude::*;

/// Best-of-`runs` read bandwidth in bytes/s over a buffer of `bytes` (much larger than the
/// caches), every rayon thread summing its own contiguous part with wide integer adds (the
/// loop vectorises, so the reading is limited by memory, not by the adds).
pub fn read_bandwidth(bytes: usize, runs: usize) -> f64 {
    let words = (bytes / 8).max(1);
    // Written first so every page is backed (an untouched page reads as the shared zero page).
    let buf: Vec<u64> = (0..words as u64).into_par_iter().collect();
    let part = words.div_ceil(rayon::current_num_threads().max(1) * 4);
    let mut best = 0f64;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let sum: u64 = buf
            .par_chunks(part)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        let s = t0.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / s);
    }
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_small_buffer_reads_at_a_finite_positive_rate() {
        let bw = super::read_bandwidth(1 << 20, 2);
        assert!(bw.is_finite() && bw > 0.0, "{bw}");
    }
}
