//! The 8-bit-activation option (`kiln --activations q8`): activations rounded to signed 8-bit
//! codes with one f32 scale per 32 values (GGML's Q8_0 for activations), then multiplied by the
//! weights' byte codes with integer dot products, as llama.cpp does.
//!
//! Every quantised weight type is written, per 16 weights, as `scale * code + offset` with an
//! unsigned byte code ([`super::coded_affine`], plus Q4_0, Q4_1 and Q8_0 here), and each
//! activation as `d * q`. A weight group's dot product is then
//!
//! `sum(w x) = scale * d * sum(code * q) + offset * d * sum(q)`
//!
//! where `sum(code * q)` is exact integer arithmetic (AVX2's `vpmaddubsw` then `vpmaddwd`) and
//! `d * sum(q)` is computed once per activation row. The result equals the exact product of the
//! dequantised weights with the *dequantised activations* up to f32 rounding; what moves the
//! logits is only the activations' rounding, measured by `kiln bench quant-accuracy`.
//!
//! Decode and batched decode (fewer than [`super::PANEL_MIN_ROWS`] rows) use the integer
//! kernels; prefill multiplies the dequantised activations with the f32 panel kernels, which is
//! the same arithmetic. F16 and BF16 weights have no byte codes and stay exact.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::SyncPtr;
use super::{Level, RawKind, RawQ, BLOCK, PANEL_MIN_ROWS};

/// Adding and removing 1.5 * 2^23 rounds an f32 to the nearest integer, ties to even (exact
/// for |v| <= 2^22; vectorises where `round` is a libm call).
const ROUNDING: f32 = 12_582_912.0;

/// Activation rows rounded to 8 bits: `x[t] ~ scale[t / 32] * q[t]`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct Q8Rows {
    k: usize,
    q: Vec<i8>,
    /// One per 32 values.
    scale: Vec<f32>,
    /// `scale * sum(q)` over each 16 values: the activations' side of the offset terms.
    group_sum: Vec<f32>,
    /// The same over each 32 values (the 32-weight types' offsets).
    block_sum: Vec<f32>,
}

impl Q8Rows {
    /// Rounds `m` rows of `k` (a multiple of 32) to 8 bits: each 32 values share the scale
    /// `max|x| / 127`, and each is rounded to the nearest multiple of it.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Q8Rows {
        assert!(
            k.is_multiple_of(BLOCK) && x.len() == m * k,
            "Q8Rows: {m} x {k}"
        );
        let mut q = vec![0i8; m * k];
        let mut scale = vec![0f32; m * k / BLOCK];
        let mut group_sum = vec![0f32; m * k / 16];
        for (c, ((xs, qs), d)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(scale.iter_mut())
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            *d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (o, v) in qs.iter_mut().zip(xs) {
                *o = ((v * inv + ROUNDING) - ROUNDING) as i8;
            }
            for h in 0..2 {
                let sum: i32 = qs[16 * h..16 * (h + 1)].iter().map(|&v| v as i32).sum();
                group_sum[2 * c + h] = *d * sum as f32;
            }
        }
        let block_sum = group_sum.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        Q8Rows {
            k,
            q,
            scale,
            group_sum,
            block_sum,
        }
    }

    /// `x` on the grid [`Q8Rows::quantize`] rounds to, as f32: `quantize(x).dequantize()`
    /// without the codes, in parallel (the prefill path's input).
    pub fn round_trip(x: &[f32]) -> Vec<f32> {
        assert!(x.len().is_multiple_of(BLOCK), "Q8Rows: {} values", x.len());
        let mut out = vec![0f32; x.len()];
        let per_task = BLOCK * 256;
        out.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .for_each(|(out, x)| {
                for (o, xs) in out.chunks_exact_mut(BLOCK).zip(x.chunks_exact(BLOCK)) {
                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = amax / 127.0;
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    for (o, v) in o.iter_mut().zip(xs) {
                        *o = d * ((v * inv + ROUNDING) - ROUNDING);
                    }
                }
            });
        out
    }

    /// The values the codes stand for, `scale * q`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(BLOCK)
            .zip(&self.scale)
            .flat_map(|(qs, d)| qs.iter().map(move |&v| d * v as f32))
            .collect()
    }
}

impl RawKind {
    /// Has byte codes for the integer-dot kernels (every type but F16 and BF16).
    pub fn has_q8_kernel(self) -> bool {
        !matches!(self, RawKind::F16 | RawKind::BF16)
    }
}

impl RawQ {
    /// `x W^T` with `x` rounded to 8 bits first ([`Q8Rows`]), on the kernels of one level.
    /// F16/BF16 weights, and levels without integer kernels (scalar, NEON), multiply the
    /// dequantised activations exactly, which is the same arithmetic.
    pub fn matmul_q8_isa(&self, x: &[f32], m: usize, isa: crate::Isa) -> Vec<f32> {
        let level = Level::of(isa);
        if !self.kind.has_q8_kernel() || level == Level::Scalar || m >= PANEL_MIN_ROWS {
            return self.matmul_exact(&Q8Rows::round_trip(x), m, level);
        }
        #[cfg(target_arch = "x86_64")]
        return self.integer_matmul(x, m);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{level:?}: only the x86 levels have integer kernels")
    }

    /// The integer-dot kernels over every output row (AVX2; AVX-512 machines run them too).
    #[cfg(target_arch = "x86_64")]
    fn integer_matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let acts = Q8Rows::quantize(x, m, self.k);
        let n = self.n;
        let threads = rayon::current_num_threads().max(1);
        let chunk = n.div_ceil(threads * 4).clamp(16, 256);
        let mut out = vec![0f32; m * n];
        let dst = SyncPtr(out.as_mut_ptr());
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let dst = &dst;
            let mut tile = [0f32; 8];
            for r in c * chunk..((c + 1) * chunk).min(n) {
                let row = self.row(r);
                let mut i = 0;
                while i < m {
                    let take = (m - i).min(8);
                    // SAFETY: only called for the AVX2 or AVX-512 level (both have AVX2),
                    // detected at run time.
                    unsafe { x86::dots(self.kind, row, &acts, i, &mut tile[..take]) };
                    for (j, v) in tile.iter().enumerate().take(take) {
                        // SAFETY: (i + j, r) is in bounds and column r belongs to this task.
                        unsafe { *dst.0.add((i + j) * n + r) = *v };
                    }
                    i += take;
                }
            }
        });
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::x86::{codes, hsum256 as hsum};
    use super::super::{coded_affine, RawKind};
    use super::{Q8Rows, BLOCK};
    use std::arch::x86_64::*;

    /// Chunk `s` of the block at `p` as 32 byte codes (signed for Q8_0, unsigned otherwise),
    /// weight = scale * code + offset: Q4_0 and Q4_1's nibbles and Q8_0's bytes here, the
    /// other types' from [`codes`] with [`coded_affine`]'s pairs.
    #[inline(always)]
    unsafe fn weight_codes(kind: RawKind, p: *const u8, s: usize) -> __m256i {
        match kind {
            RawKind::Q4_0 | RawKind::Q4_1 => {
                // Weight j in the low nibble of byte j, weight j + 16 in its high nibble.
                let at = if kind == RawKind::Q4_0 { 2 } else { 4 };
                let q = _mm_loadu_si128(p.add(at) as *const __m128i);
                let low4 = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(q, low4);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
                _mm256_set_m128i(hi, lo)
            }
            RawKind::Q8_0 => _mm256_loadu_si256(p.add(2) as *const __m256i),
            _ => codes(kind, p, s),
        }
    }

    /// `out[j] = dot(row, activation row i0 + j)` for up to 8 rows.
    pub(super) unsafe fn dots(
        kind: RawKind,
        row: &[u8],
        acts: &Q8Rows,
        i0: usize,
        out: &mut [f32],
    ) {
        macro_rules! by_kind {
            ($r:literal) => {
                match kind {
                    RawKind::Q4_0 => dots32::<$r, 0>(row, acts, i0, out),
                    RawKind::Q4_1 => dots32::<$r, 1>(row, acts, i0, out),
                    RawKind::Q8_0 => dots32::<$r, 2>(row, acts, i0, out),
                    RawKind::Q5_0 => dots32::<$r, 4>(row, acts, i0, out),
                    RawKind::Q5_1 => dots32::<$r, 5>(row, acts, i0, out),
                    RawKind::Q4K => dots_r::<$r, 6>(row, acts, i0, out),
                    RawKind::Q5K => dots_r::<$r, 7>(row, acts, i0, out),
                    RawKind::Q6K => dots_r::<$r, 8>(row, acts, i0, out),
                    RawKind::Q2K => dots_r::<$r, 9>(row, acts, i0, out),
                    RawKind::Q3K => dots_r::<$r, 10>(row, acts, i0, out),
                    RawKind::F16 | RawKind::BF16 => unreachable!("{kind:?} has no byte codes"),
                }
            };
        }
        match out.len() {
            1 => by_kind!(1),
            2 => by_kind!(2),
            3 => by_kind!(3),
            4 => by_kind!(4),
            5 => by_kind!(5),
            6 => by_kind!(6),
            7 => by_kind!(7),
            8 => by_kind!(8),
            n => unreachable!("{n} rows per tile"),
        }
    }

    /// [`dots_r`] for the 32-weight types (one scale and offset per block): the weight and
    /// activation scales multiply as scalars, and the offsets use the activations' sums per
    /// 32. Two accumulators per row (even and odd blocks) keep the FMA latency off the
    /// critical path.
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn dots32<const R: usize, const K: u8>(
        row: &[u8],
        acts: &Q8Rows,
        i0: usize,
        out: &mut [f32],
    ) {
        let kind = RawKind::from_id(K);
        let (bb, k) = (kind.block_bytes(), acts.k);
        let blocks = k / BLOCK;
        assert!(row.len() >= blocks * bb && acts.q.len() >= (i0 + R) * k);
        let q = acts.q.as_ptr().add(i0 * k);
        let d = acts.scale.as_ptr().add(i0 * blocks);
        let sums = acts.block_sum.as_ptr().add(i0 * blocks);
        let ones = _mm256_set1_epi16(1);
        let half = |at: *const u8| {
            let bits = std::ptr::read_unaligned(at as *const u16);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        };
        // Block b into the accumulators `acc` and offset sums `off`. Even and odd blocks go to
        // separate ones (two independent FMA chains), named rather than indexed by `b % 2`,
        // which kept them in memory.
        macro_rules! block {
            ($b:expr, $acc:ident, $off:ident) => {{
                let b = $b;
                let p = row.as_ptr().add(b * bb);
                let dw = half(p);
                let offset = match kind {
                    RawKind::Q4_0 => -8.0 * dw,
                    RawKind::Q5_0 => -16.0 * dw,
                    RawKind::Q4_1 | RawKind::Q5_1 => half(p.add(2)),
                    _ => 0.0,
                };
                let c = weight_codes(kind, p, 0);
                // vpmaddubsw multiplies unsigned by signed bytes: Q8_0's signed weights go in
                // as |w| with their sign moved onto the activation (|w| <= 128, so a pair sums
                // to at most 2 * 128 * 127 and cannot saturate 16 bits).
                let cu = if K == 2 { _mm256_sign_epi8(c, c) } else { c };
                for i in 0..R {
                    let xq = _mm256_loadu_si256(q.add(i * k + b * BLOCK) as *const __m256i);
                    let xq = if K == 2 { _mm256_sign_epi8(xq, c) } else { xq };
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(cu, xq), ones);
                    let scale = _mm256_set1_ps(dw * *d.add(i * blocks + b));
                    $acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, $acc[i]);
                    if K != 2 {
                        $off[i] += offset * *sums.add(i * blocks + b);
                    }
                }
            }};
        }
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        let (mut off0, mut off1) = ([0f32; R], [0f32; R]);
        let mut b = 0;
        while b + 1 < blocks {
            block!(b, acc0, off0);
            block!(b + 1, acc1, off1);
            b += 2;
        }
        if b < blocks {
            block!(b, acc0, off0);
        }
        for i in 0..R {
            out[i] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + off0[i] + off1[i];
        }
    }

    /// `out[j] = dot(row, activation row i0 + j)` for the K-quants: per super-block the 16
    /// (scale, offset) pairs once, the offsets against the activations' sums per 16, then each
    /// 32-weight chunk's codes against the 8-bit activations, scaled per 16 weights.
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn dots_r<const R: usize, const K: u8>(
        row: &[u8],
        acts: &Q8Rows,
        i0: usize,
        out: &mut [f32],
    ) {
        let kind = RawKind::from_id(K);
        let (bb, elems, k) = (kind.block_bytes(), kind.block_elems(), acts.k);
        let groups = elems / 16;
        let q = acts.q.as_ptr().add(i0 * k);
        let d = acts.scale.as_ptr().add(i0 * k / BLOCK);
        let sums = acts.group_sum.as_ptr().add(i0 * k / 16);
        let ones = _mm256_set1_epi16(1);
        // Two accumulators per row (even and odd chunks: the chunk loop unrolls, so they stay
        // in registers), so the FMA latency is not the bound of a single row's loop; the
        // offset terms are summed apart, 8 groups per FMA.
        assert_eq!(groups, 16, "{kind:?} is a K-quant");
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut offsets = [_mm256_setzero_ps(); R];
        let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
        for b in 0..k / elems {
            let blk = &row[b * bb..(b + 1) * bb];
            coded_affine(kind, blk, &mut scale, &mut offset);
            let (o0, o1) = (
                _mm256_loadu_ps(offset.as_ptr()),
                _mm256_loadu_ps(offset.as_ptr().add(8)),
            );
            for (i, o) in offsets.iter_mut().enumerate() {
                let s = sums.add(i * k / 16 + b * groups);
                *o = _mm256_fmadd_ps(o0, _mm256_loadu_ps(s), *o);
                *o = _mm256_fmadd_ps(o1, _mm256_loadu_ps(s.add(8)), *o);
            }
            for s in 0..elems / BLOCK {
                let c = weight_codes(kind, blk.as_ptr(), s);
                // Lanes 0-3 sum weights 0-15 of the chunk (group 2s), lanes 4-7 weights 16-31.
                let sv = _mm256_set_m128(_mm_set1_ps(scale[2 * s + 1]), _mm_set1_ps(scale[2 * s]));
                let chunk = (b * elems) / BLOCK + s;
                for (i, a) in acc.iter_mut().enumerate() {
                    let xq = _mm256_loadu_si256(q.add(i * k + chunk * BLOCK) as *const __m256i);
                    // Codes up to 63 (Q6_K) times |q| <= 127, twice, fit vpmaddubsw's 16 bits.
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(c, xq), ones);
                    let dx = _mm256_set1_ps(*d.add(i * k / BLOCK + chunk));
                    a[s % 2] =
                        _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), dx), sv, a[s % 2]);
                }
            }
        }
        for i in 0..R {
            out[i] = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[i][0], acc[i][1]),
                offsets[i],
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn rounding_keeps_each_value_within_half_a_step() {
        let k = 64;
        let mut x: Vec<f32> = (0..k)
            .map(|i| ((i * 29 % 61) as f32 - 30.0) / 9.0)
            .collect();
        x[32..].fill(0.0); // an all-zero block
        x[32] = 1e-30;
        let r = Q8Rows::quantize(&x, 1, k);
        let back = r.dequantize();
        let amax = x[..32].iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(r.q[..32].iter().map(|v| v.abs()).max(), Some(127));
        for (t, (a, b)) in x.iter().zip(&back).enumerate() {
            let step = if t < 32 { amax / 127.0 } else { 1e-30 / 127.0 };
            assert!(
                (a - b).abs() <= 0.5 * step * 1.0001,
                "value {t}: {a} vs {b}"
            );
        }
        assert_eq!(Q8Rows::round_trip(&x), back);
        let sum0: f32 = back[..16].iter().sum();
        assert!((r.group_sum[0] - sum0).abs() <= 1e-5 * (1.0 + sum0.abs()));
    }

    /// The integer kernels equal the f64 product of the dequantised weights (candle's
    /// dequantisation) with the dequantised 8-bit activations, on every level this CPU runs,
    /// for 1-8 rows (integer kernels) and 17 (prefill).
    #[test]
    fn q8_kernels_equal_the_dequantised_product() {
        let (n, k) = (37, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        // Every type (BF16 and F16 have no codes: they check the exact fallback).
        for (kind, dt) in super::super::tests::ALL {
            let (raw, deq) = super::super::tests::raw(kind, dt, &w);
            for m in [1, 3, 8, 11, 17] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0 + (i % 7) as f32 * 0.013)
                    .collect();
                let xq = Q8Rows::quantize(&x, m, k).dequantize();
                let mut moved = 0f64;
                for isa in crate::Isa::all_available() {
                    let y = raw.matmul_q8_isa(&x, m, isa);
                    for i in 0..m {
                        for j in 0..n {
                            let dot = |x: &[f32]| -> f64 {
                                (0..k)
                                    .map(|t| x[i * k + t] as f64 * deq[j * k + t] as f64)
                                    .sum()
                            };
                            let (want, exact) = (dot(&xq), dot(&x));
                            let size: f64 = (0..k)
                                .map(|t| (xq[i * k + t] * deq[j * k + t]).abs() as f64)
                                .sum();
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + size),
                                "{kind:?} {isa:?} m={m} ({i},{j}): {got} vs {want}"
                            );
                            moved = moved.max((want - exact).abs() / (1.0 + size));
                        }
                    }
                }
                // The rounding does move the products (so the check above tells the two
                // arithmetics apart).
                assert!(
                    moved > 1e-4,
                    "{kind:?} m={m}: 8-bit activations moved nothing"
                );
            }
        }
    }
}
