//! Mixed-precision matrix products for `train.precision = "bf16"`: `C = A · B` where every
//! input is rounded to bf16 (round to nearest even) and the products are summed in f32.
//!
//! This is what `torch.autocast("cpu", dtype=torch.bfloat16)` does to a matmul, minus the bf16
//! output: C stays f32, so what follows a product (norms, softmax, the residual stream, the
//! gradients) keeps f32. Products of two bf16 values are exact in f32 (8 × 8 significant bits),
//! so the only rounding beyond the inputs' is the f32 summation's.
//!
//! The fast path uses AVX512-BF16's `vdpbf16ps`, which multiplies pairs of bf16 values and adds
//! both products into an f32 lane: twice the multiply-adds of an f32 FMA per instruction. Both
//! operands are packed once per call (rounded to bf16, pairs along k side by side in one 32-bit
//! lane): A as micro-panels of [`MR`] rows, B as panels of [`NR`] columns, so the inner kernel
//! reads both sequentially. A CPU without AVX512-BF16 has no fast bf16 arithmetic; callers
//! ask [`bf16_products_available`] and use their f32 product there. [`reference_gemm_bf16`]
//! is the portable oracle with the same rounding of the inputs.

// The packed kernel is x86's (AVX512-BF16); elsewhere only the portable product runs.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use rayon::prelude::*;

/// Rows of A per micro-kernel tile.
const MR: usize = 8;
/// Columns of B per micro-kernel tile: two 16-lane f32 vectors.
const NR: usize = 32;
/// k-pairs per cache block: a B micro-panel of NR × KC pairs is 32 KiB.
const KC: usize = 256;
/// Micro-panels of A per parallel task (64 rows).
const TASK_ROW_PANELS: usize = 8;
/// Panels of B per parallel task (512 columns): the task's B block (KC pairs × 512 columns,
/// 512 KiB) stays in L2 while every row panel of the task streams past it, so a packed A
/// panel is read from memory once per 512 columns of C.
const TASK_COL_PANELS: usize = 16;

/// A read-only view of an f32 matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`,
/// so a row-major matrix and its transpose are both views of the same values.
#[derive(Clone, Copy)]
pub struct MatView<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatView<'a> {
    /// `data` as a row-major `(rows, cols)` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "a ({rows}, {cols}) matrix");
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `(rows, cols)` matrix: a `(cols, rows)` view.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "a ({rows}, {cols}) matrix");
        Self {
            data,
            rows: cols,
            cols: rows,
            row_stride: 1,
            col_stride: cols,
        }
    }

    #[inline]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits. NaN stays NaN.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    // Branch-free, so packing loops vectorise.
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

#[inline]
fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to bf16 and widened back: the value the products use.
#[inline]
pub fn round_to_bf16(x: f32) -> f32 {
    widen(bf16_bits(x))
}

/// Whether this CPU (at the active ISA level) multiplies bf16 pairs natively.
pub fn bf16_products_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::active_isa() == crate::Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `A (m, k) · B (k, n)` → row-major `(m, n)`, inputs rounded to bf16, sums in f32. Uses
/// `vdpbf16ps` when [`bf16_products_available`], the portable loop otherwise.
pub fn gemm_bf16(a: &MatView, b: &MatView) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "inner dimensions of A·B");
    #[cfg(target_arch = "x86_64")]
    if bf16_products_available() {
        return packed_gemm(a, b);
    }
    reference_gemm_bf16(a, b)
}

/// The oracle: each `C[i][j]` summed over k in order, in f32, from bf16-rounded inputs.
pub fn reference_gemm_bf16(a: &MatView, b: &MatView) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "inner dimensions of A·B");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut c = vec![0f32; m * n];
    c.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        let ai: Vec<f32> = (0..k).map(|p| round_to_bf16(a.at(i, p))).collect();
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..k).fold(0f32, |s, p| s + ai[p] * round_to_bf16(b.at(p, j)));
        }
    });
    c
}

/// Two bf16 values in one 32-bit lane, the lower k first (`vdpbf16ps`'s pair layout).
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

#[cfg(target_arch = "x86_64")]
/// A packed into micro-panels of MR rows: `[panel][k-pair][row]`, zero beyond m and k.
fn pack_a(a: &MatView, kp: usize) -> Vec<u32> {
    let mut packed = vec![0u32; a.rows.div_ceil(MR) * kp * MR];
    packed
        .par_chunks_mut(kp * MR)
        .enumerate()
        .for_each(|(ip, panel)| pack_panel(a, ip * MR, MR, panel, false));
    packed
}

#[cfg(target_arch = "x86_64")]
/// B packed into panels of NR columns: `[panel][k-pair][column]`, zero beyond n and k.
fn pack_b(b: &MatView, kp: usize) -> Vec<u32> {
    let mut packed = vec![0u32; b.cols.div_ceil(NR) * kp * NR];
    packed
        .par_chunks_mut(kp * NR)
        .enumerate()
        .for_each(|(jp, panel)| pack_panel(b, jp * NR, NR, panel, true));
    packed
}

#[cfg(target_arch = "x86_64")]
/// One panel of `width` lines (rows of A, or columns of B when `lines_are_columns`) starting
/// at `first`: `panel[k-pair * width + line]`. The loops run along whichever index is
/// contiguous in memory, so both a matrix and its transpose pack at streaming speed.
fn pack_panel(m: &MatView, first: usize, width: usize, panel: &mut [u32], lines_are_columns: bool) {
    // (line, k) → offset in m.data, and the counts.
    let (line_stride, k_stride, lines, k) = if lines_are_columns {
        (m.col_stride, m.row_stride, m.cols, m.rows)
    } else {
        (m.row_stride, m.col_stride, m.rows, m.cols)
    };
    let count = width.min(lines - first);
    let data = m.data;
    let value = |line: usize, p: usize| -> f32 {
        if p < k {
            data[(first + line) * line_stride + p * k_stride]
        } else {
            0.0
        }
    };
    let kp = panel.len() / width;
    if k_stride == 1 {
        // Each line's values are contiguous along k: walk a line at a time.
        for line in 0..count {
            let start = (first + line) * line_stride;
            let row = &data[start..start + k];
            let line_out = &mut panel[line..];
            // SAFETY: packing runs only where the GEMM's AVX512-BF16 path does.
            let done = unsafe { x86::pack_line(row, line_out, width) };
            for p2 in done..k / 2 {
                line_out[p2 * width] = pair(row[2 * p2], row[2 * p2 + 1]);
            }
            if k % 2 == 1 {
                panel[(kp - 1) * width + line] = pair(row[k - 1], 0.0);
            }
        }
    } else if line_stride == 1 {
        // Lines are contiguous at each k: walk a k-pair at a time across the lines.
        let at_k = |p: usize| &data[p * k_stride + first..][..count];
        for p2 in 0..kp {
            let out = &mut panel[p2 * width..][..count];
            let lo = at_k(2 * p2);
            if 2 * p2 + 1 < k {
                let hi = at_k(2 * p2 + 1);
                // SAFETY: as above.
                let done = unsafe { x86::pack_pairs(lo, hi, out) };
                for ((o, &x0), &x1) in out.iter_mut().zip(lo).zip(hi).skip(done) {
                    *o = pair(x0, x1);
                }
            } else {
                for (o, &x0) in out.iter_mut().zip(lo) {
                    *o = pair(x0, 0.0);
                }
            }
        }
    } else {
        for p2 in 0..kp {
            let out = &mut panel[p2 * width..][..count];
            for (line, o) in out.iter_mut().enumerate() {
                *o = pair(value(line, 2 * p2), value(line, 2 * p2 + 1));
            }
        }
    }
}

/// C's base pointer, shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The address `offset` elements in (a method, so closures capture the whole `Send` wrapper
    /// rather than its raw pointer field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

#[cfg(target_arch = "x86_64")]
fn packed_gemm(a: &MatView, b: &MatView) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    // Not zeroed: the first k block of every tile stores each element of C exactly once.
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let kp = k.div_ceil(2);
    let (pa, pb) = rayon::join(|| pack_a(a, kp), || pack_b(b, kp));
    let row_panels = m.div_ceil(MR);
    let col_panels = n.div_ceil(NR);
    let row_tasks = row_panels.div_ceil(TASK_ROW_PANELS);
    let col_tasks = col_panels.div_ceil(TASK_COL_PANELS);
    let out = OutPtr(c.as_mut_ptr());
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (rt, ct) = (task / col_tasks, task % col_tasks);
        let ips = rt * TASK_ROW_PANELS..((rt + 1) * TASK_ROW_PANELS).min(row_panels);
        let jps = ct * TASK_COL_PANELS..((ct + 1) * TASK_COL_PANELS).min(col_panels);
        for k0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - k0);
            for jp in jps.clone() {
                let bp = &pb[(jp * kp + k0) * NR..][..kc * NR];
                for ip in ips.clone() {
                    let ap = &pa[(ip * kp + k0) * MR..][..kc * MR];
                    let (rows, cols) = (MR.min(m - ip * MR), NR.min(n - jp * NR));
                    // SAFETY: the tile (ip, jp) lies inside C and only this task writes it;
                    // the caller checked the CPU has AVX512-F and AVX512-BF16.
                    unsafe {
                        x86::tile(ap, bp, out.at(ip * MR * n + jp * NR), n, rows, cols, k0 > 0);
                    }
                }
            }
        }
    });
    // SAFETY: the tiles cover C (row and column panels cover m and n) and each stored its
    // elements in its first k block (there is one: k >= 1).
    unsafe { c.set_len(m * n) };
    c
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `out[p2 * width] = pair(row[2 p2], row[2 p2 + 1])` for the whole blocks of 16 pairs of
    /// `row`; returns the pairs written. The conversion is `vcvtne2ps2bf16` (round to nearest
    /// even, as [`super::bf16_bits`]); the 16 pairs are then stored `width` apart.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_line(row: &[f32], out: &mut [u32], width: usize) -> usize {
        let pairs = row.len() / 2;
        let mut block = [0u32; 16];
        let mut p2 = 0;
        while p2 + 16 <= pairs {
            let lo = _mm512_loadu_ps(row.as_ptr().add(2 * p2));
            let hi = _mm512_loadu_ps(row.as_ptr().add(2 * p2 + 16));
            // The lower 16 bf16 come from the second operand: k order throughout.
            let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(block.as_mut_ptr().cast(), bf);
            for (i, v) in block.iter().enumerate() {
                out[(p2 + i) * width] = *v;
            }
            p2 += 16;
        }
        p2
    }

    /// `out[i] = pair(lo[i], hi[i])` for every `i` of the shortest slice (16 at a time, the
    /// rest under a mask: an A panel is 8 lines wide); returns how many.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_pairs(lo: &[f32], hi: &[f32], out: &mut [u32]) -> usize {
        let n = out.len().min(lo.len()).min(hi.len());
        let mut i = 0;
        while i < n {
            let mask: __mmask16 = if n - i >= 16 {
                0xFFFF
            } else {
                ((1u32 << (n - i)) - 1) as __mmask16
            };
            let l = _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(i));
            let h = _mm512_maskz_loadu_ps(mask, hi.as_ptr().add(i));
            let l: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(l));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(h));
            let v = _mm512_or_si512(
                _mm512_cvtepu16_epi32(l),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)),
            );
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(i).cast(), mask, v);
            i += 16;
        }
        n
    }

    /// One `rows × cols` (at most MR × NR) tile of C over the k-pairs of `a` and `b`:
    /// `C = A·B`, or `C += A·B` when `accumulate` (a later k block).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(
        a: &[u32],
        b: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let kc = b.len() / NR;
        debug_assert_eq!(a.len(), kc * MR);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p2 in 0..kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p2 * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p2 * NR + 16).cast()));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ap.add(p2 * MR + r) as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
            }
        }
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            let row = c.add(r * ldc);
            for (half, mask) in [(0usize, m0), (1, m1)] {
                if mask == 0 {
                    continue;
                }
                let dst = row.add(16 * half);
                let mut v = acc_r[half];
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
                }
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values with low mantissa bits set, so rounding to bf16 changes them.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    /// `sum_p A[i][p] B[p][j]` in f64 from the given rounding of the inputs, and the bound
    /// `sum_p |A[i][p] B[p][j]|` that scales the f32 summation's error.
    fn exact(a: &MatView, b: &MatView, round: fn(f32) -> f32) -> (Vec<f64>, Vec<f64>) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let (mut c, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let t = round(a.at(i, p)) as f64 * round(b.at(p, j)) as f64;
                    c[i * n + j] += t;
                    mag[i * n + j] += t.abs();
                }
            }
        }
        (c, mag)
    }

    fn assert_close(got: &[f32], want: &[f64], mag: &[f64], what: &str) {
        for (idx, ((g, w), s)) in got.iter().zip(want).zip(mag).enumerate() {
            let tol = 1e-5 * s + 1e-30;
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{what}: element {idx}: {g} vs {w} (tolerance {tol})"
            );
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        let one = 1.0f32;
        let ulp = 2f32.powi(-7); // bf16's spacing at 1
        assert_eq!(
            round_to_bf16(one + ulp / 2.0),
            one,
            "a tie goes to the even 1.0"
        );
        assert_eq!(
            round_to_bf16(one + 1.5 * ulp),
            one + 2.0 * ulp,
            "a tie goes up to even"
        );
        assert_eq!(round_to_bf16(one + ulp / 2.0 + 2f32.powi(-20)), one + ulp);
        assert_eq!(round_to_bf16(-3.0), -3.0);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
    }

    /// Shapes with ragged edges in every dimension (m, n not multiples of the tile, odd k),
    /// k beyond one cache block, and every operand both row-major and transposed.
    fn cases() -> Vec<(usize, usize, usize)> {
        vec![
            (1, 1, 1),
            (13, 37, 45),
            (8, 32, 32),
            (70, 601, 150),
            (130, 64, 9),
        ]
    }

    fn check(gemm: fn(&MatView, &MatView) -> Vec<f32>, what: &str) {
        for (ci, (m, k, n)) in cases().into_iter().enumerate() {
            let av = values(m * k, 1 + ci as u64);
            let bv = values(k * n, 100 + ci as u64);
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta {
                    MatView::transposed(&av, k, m)
                } else {
                    MatView::row_major(&av, m, k)
                };
                let b = if tb {
                    MatView::transposed(&bv, n, k)
                } else {
                    MatView::row_major(&bv, k, n)
                };
                let (want, mag) = exact(&a, &b, round_to_bf16);
                let got = gemm(&a, &b);
                assert_eq!(got.len(), m * n);
                assert_close(
                    &got,
                    &want,
                    &mag,
                    &format!("{what} {m}x{k}x{n} ta={ta} tb={tb}"),
                );
            }
        }
    }

    #[test]
    fn the_oracle_sums_bf16_rounded_products() {
        check(reference_gemm_bf16, "reference");
        // And the rounding is real: the f32 inputs' exact product is further away than the
        // summation error allows.
        let (m, k, n) = (4, 64, 4);
        let (av, bv) = (values(m * k, 7), values(k * n, 8));
        let (a, b) = (MatView::row_major(&av, m, k), MatView::row_major(&bv, k, n));
        let (unrounded, mag) = exact(&a, &b, |x| x);
        let got = reference_gemm_bf16(&a, &b);
        let far = got
            .iter()
            .zip(&unrounded)
            .zip(&mag)
            .filter(|((g, w), s)| (**g as f64 - **w).abs() > 1e-5 * **s)
            .count();
        assert!(far > 0, "bf16 rounding changed nothing");
    }

    #[test]
    fn vdpbf16ps_equals_the_oracle() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            check(packed_gemm, "avx512bf16");
            return;
        }
        eprintln!("skipped: this CPU has no AVX512-BF16 (the portable path is the oracle)");
    }
}
