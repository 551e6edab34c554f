//! CPU matmuls straight from GGML blocks: `y = x W^T` with `W (n, k)` stored as Q4_0, Q4_1,
//! Q8_0 or F16 and `x (m, k)` in f32.
//!
//! Each 32-weight block is expanded to exactly the f32 values dequantisation gives
//! (`d * q`, `d * (q - 8)`, `d * q + m`) in registers and multiplied with f32 activations, so
//! the result equals the dequantised model's up to summation order. (llama.cpp and candle
//! instead round the activations to 8 bits and use integer dot products, which is cheaper
//! but moves the logits by a few percent: enough to change a greedy answer.) A block is
//! expanded once and used for up to 8 activation rows, so prefill reuses it from registers.
//!
//! Work is split over output rows with rayon; AVX-512, AVX2+FMA and portable scalar kernels
//! are chosen at run time.

use rayon::prelude::*;

/// GGML block types with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    Q4_0,
    Q4_1,
    Q8_0,
    F16,
}

impl RawKind {
    /// The inverse of the `K` ids the kernels are instantiated with.
    pub(crate) const fn from_id(id: u8) -> RawKind {
        match id {
            0 => RawKind::Q4_0,
            1 => RawKind::Q4_1,
            2 => RawKind::Q8_0,
            _ => RawKind::F16,
        }
    }

    /// Bytes of one 32-element block.
    pub fn block_bytes(self) -> usize {
        match self {
            RawKind::Q4_0 => 18,
            RawKind::Q4_1 => 20,
            RawKind::Q8_0 => 34,
            RawKind::F16 => 64,
        }
    }
}

pub const BLOCK: usize = 32;

/// A weight matrix `(n, k)` as GGML blocks, row by row.
pub struct RawQ {
    pub kind: RawKind,
    pub n: usize,
    pub k: usize,
    data: Vec<u8>,
}

#[inline(always)]
fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

impl RawQ {
    /// `data` holds `n` rows of `k / 32` blocks (`k` must be a multiple of 32).
    pub fn new(kind: RawKind, n: usize, k: usize, data: Vec<u8>) -> Option<Self> {
        (k.is_multiple_of(BLOCK) && data.len() == n * k / BLOCK * kind.block_bytes())
            .then_some(Self { kind, n, k, data })
    }

    pub fn row_bytes(&self) -> usize {
        self.k / BLOCK * self.kind.block_bytes()
    }

    /// Stacks matrices with the same kind and `k` along the rows (e.g. Q, K and V).
    pub fn concat_rows(parts: &[&RawQ]) -> Option<RawQ> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.kind != first.kind || p.k != first.k) {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(RawQ {
            kind: first.kind,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            data,
        })
    }

    /// Row `r`, dequantised into `out` (`k` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let row = &self.data[r * rb..(r + 1) * rb];
        let bb = self.kind.block_bytes();
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let blk = &row[b * bb..(b + 1) * bb];
            dequant_block_scalar(self.kind, blk, o);
        }
    }

    /// The whole matrix as f32 `(n, k)`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `x (m, k)` row-major → `x W^T (m, n)` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.k,
            "matmul: x has {} values, not {m} x {}",
            x.len(),
            self.k
        );
        let n = self.n;
        let level = simd_level();
        // Output rows per task: enough work per task, a few tasks per thread.
        let threads = rayon::current_num_threads().max(1);
        let chunk = n.div_ceil(threads * 4).clamp(16, 256);
        let mut out = vec![0f32; m * n];
        let dst = SyncPtr(out.as_mut_ptr());
        let rb = self.row_bytes();
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let dst = &dst;
            let mut tile = [0f32; 8];
            let mut tile2 = [0f32; 8];
            let end = ((c + 1) * chunk).min(n);
            let mut r = c * chunk;
            while r < end {
                // Prefill: two weight rows at a time share every activation load.
                let pair = m > 1 && r + 1 < end && level == Level::best_pairs();
                let row = &self.data[r * rb..(r + 1) * rb];
                let mut i = 0;
                while i < m {
                    // The pair kernel keeps 2 x 6 accumulators in registers.
                    let take = (m - i).min(if pair { 6 } else { 8 });
                    let xs = &x[i * self.k..(i + take) * self.k];
                    if pair {
                        let row2 = &self.data[(r + 1) * rb..(r + 2) * rb];
                        row_dots2(
                            self.kind,
                            row,
                            row2,
                            xs,
                            self.k,
                            &mut tile[..take],
                            &mut tile2[..take],
                        );
                    } else {
                        row_dots(level, self.kind, row, xs, self.k, &mut tile[..take]);
                    }
                    for j in 0..take {
                        // SAFETY: (i + j, r) and (i + j, r + 1) are in bounds, and these
                        // columns belong to this task alone, so no two tasks write the same
                        // element.
                        unsafe {
                            *dst.0.add((i + j) * n + r) = tile[j];
                            if pair {
                                *dst.0.add((i + j) * n + r + 1) = tile2[j];
                            }
                        }
                    }
                    i += take;
                }
                r += if pair { 2 } else { 1 };
            }
        });
        out
    }
}

/// A pointer the parallel tasks write disjoint elements through.
struct SyncPtr(*mut f32);
// SAFETY: only used for writes to disjoint elements, while the owner waits.
unsafe impl Sync for SyncPtr {}

fn dequant_block_scalar(kind: RawKind, blk: &[u8], o: &mut [f32]) {
    match kind {
        RawKind::Q4_0 => {
            let d = f16(&blk[0..2]);
            for j in 0..16 {
                let q = blk[2 + j];
                o[j] = d * ((q & 0x0F) as f32 - 8.0);
                o[j + 16] = d * ((q >> 4) as f32 - 8.0);
            }
        }
        RawKind::Q4_1 => {
            let (d, m) = (f16(&blk[0..2]), f16(&blk[2..4]));
            for j in 0..16 {
                let q = blk[4 + j];
                o[j] = d * (q & 0x0F) as f32 + m;
                o[j + 16] = d * (q >> 4) as f32 + m;
            }
        }
        RawKind::Q8_0 => {
            let d = f16(&blk[0..2]);
            for j in 0..32 {
                o[j] = d * (blk[2 + j] as i8) as f32;
            }
        }
        RawKind::F16 => {
            for j in 0..32 {
                o[j] = f16(&blk[2 * j..2 * j + 2]);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Which SIMD kernels the block matmuls use (a process-wide choice, for comparisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdChoice {
    /// The best the CPU supports.
    Auto,
    /// AVX2+FMA even where AVX-512 is available.
    Avx2,
    /// The portable scalar kernels.
    Scalar,
}

static SIMD_CHOICE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the kernels for every later matmul.
pub fn set_simd_choice(c: SimdChoice) {
    let v = match c {
        SimdChoice::Auto => 0,
        SimdChoice::Avx2 => 1,
        SimdChoice::Scalar => 2,
    };
    SIMD_CHOICE.store(v, std::sync::atomic::Ordering::Relaxed);
}

fn simd_level() -> Level {
    static DETECTED: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    let choice = SIMD_CHOICE.load(std::sync::atomic::Ordering::Relaxed);
    if choice == 2 {
        return Level::Scalar;
    }
    let best = *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Scalar
    });
    #[cfg(target_arch = "x86_64")]
    if choice == 1 && best == Level::Avx512 {
        return Level::Avx2;
    }
    best
}

impl Level {
    /// The level with a two-weight-row kernel (AVX-512), if it is the one in use.
    fn best_pairs() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            Level::Avx512
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Level::Scalar
        }
    }
}

/// [`row_dots`] for two weight rows at once (AVX-512 only; see `Level::best_pairs`).
fn row_dots2(
    kind: RawKind,
    row: &[u8],
    row2: &[u8],
    xs: &[f32],
    k: usize,
    out: &mut [f32],
    out2: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only called when the AVX-512 level was detected.
    unsafe {
        x86::dots2_avx512(kind, row, row2, xs, k, out, out2)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        row_dots(Level::Scalar, kind, row, xs, k, out);
        row_dots(Level::Scalar, kind, row2, xs, k, out2);
    }
}

/// `out[i] = dot(row, xs[i])` for up to 8 activation rows `xs` (each `k` long).
fn row_dots(level: Level, kind: RawKind, row: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected at run time.
        Level::Avx512 => unsafe { x86::dots_avx512(kind, row, xs, k, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::dots_avx2(kind, row, xs, k, out) },
        Level::Scalar => {
            let mut w = [0f32; BLOCK];
            let bb = kind.block_bytes();
            out.iter_mut().for_each(|o| *o = 0.0);
            for b in 0..k / BLOCK {
                dequant_block_scalar(kind, &row[b * bb..(b + 1) * bb], &mut w);
                for (i, o) in out.iter_mut().enumerate() {
                    let x = &xs[i * k + b * BLOCK..i * k + (b + 1) * BLOCK];
                    *o += w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{RawKind, BLOCK};
    use std::arch::x86_64::*;

    /// The f16 at `p` (unaligned), converted and broadcast to 16 lanes.
    #[inline(always)]
    unsafe fn bcast_f16_512(p: *const u8) -> __m512 {
        let bits = std::ptr::read_unaligned(p as *const u16);
        _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// One block as 2 x 16 f32 (elements 0..16, 16..32).
    #[inline(always)]
    unsafe fn block512(kind: RawKind, p: *const u8) -> (__m512, __m512) {
        let nib = _mm_set1_epi8(0x0F);
        match kind {
            RawKind::Q4_0 | RawKind::Q4_1 => {
                let (d, m, qs) = if kind == RawKind::Q4_0 {
                    let d = bcast_f16_512(p);
                    (d, _mm512_mul_ps(d, _mm512_set1_ps(-8.0)), p.add(2))
                } else {
                    (bcast_f16_512(p), bcast_f16_512(p.add(2)), p.add(4))
                };
                let q = _mm_loadu_si128(qs as *const __m128i);
                let lo = _mm_and_si128(q, nib);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), nib);
                let flo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                let fhi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                (_mm512_fmadd_ps(flo, d, m), _mm512_fmadd_ps(fhi, d, m))
            }
            RawKind::Q8_0 => {
                let d = bcast_f16_512(p);
                let q0 = _mm_loadu_si128(p.add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(p.add(18) as *const __m128i);
                (
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d),
                )
            }
            RawKind::F16 => (
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i)),
            ),
        }
    }

    /// `R` activation rows against one weight row. Each row has two accumulators (low and
    /// high half of a block); with few rows, even and odd blocks get separate ones too, so
    /// enough FMAs are in flight to hide their latency.
    #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
    unsafe fn dots512<const R: usize, const K: u8>(
        row: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        // The block type is a constant here, so block decoding is not a run-time switch.
        let kind = RawKind::from_id(K);
        let bb = kind.block_bytes();
        let nb = k / BLOCK;
        let x = xs.as_ptr();
        let w = row.as_ptr();
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let mut b = 0;
        if R <= 2 {
            let mut c0 = [_mm512_setzero_ps(); R];
            let mut c1 = [_mm512_setzero_ps(); R];
            while b + 2 <= nb {
                let (w0, w1) = block512(kind, w.add(b * bb));
                let (v0, v1) = block512(kind, w.add((b + 1) * bb));
                for i in 0..R {
                    let xp = x.add(i * k + b * BLOCK);
                    a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a0[i]);
                    a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a1[i]);
                    c0[i] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xp.add(32)), c0[i]);
                    c1[i] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xp.add(48)), c1[i]);
                }
                b += 2;
            }
            for i in 0..R {
                a0[i] = _mm512_add_ps(a0[i], c0[i]);
                a1[i] = _mm512_add_ps(a1[i], c1[i]);
            }
        }
        while b < nb {
            let (w0, w1) = block512(kind, w.add(b * bb));
            for i in 0..R {
                let xp = x.add(i * k + b * BLOCK);
                a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a0[i]);
                a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a1[i]);
            }
            b += 1;
        }
        for i in 0..R {
            out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
        }
    }

    /// Two weight rows against `R` activation rows: each activation load feeds 4 FMAs.
    #[target_feature(enable = "avx512f,avx512bw,f16c,fma")]
    unsafe fn dots2_512<const R: usize, const K: u8>(
        row: &[u8],
        row2: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
        out2: &mut [f32],
    ) {
        // The block type is a constant here, so block decoding is not a run-time switch.
        let kind = RawKind::from_id(K);
        let bb = kind.block_bytes();
        let x = xs.as_ptr();
        let mut a = [_mm512_setzero_ps(); R];
        let mut c = [_mm512_setzero_ps(); R];
        for b in 0..k / BLOCK {
            let (w0, w1) = block512(kind, row.as_ptr().add(b * bb));
            let (v0, v1) = block512(kind, row2.as_ptr().add(b * bb));
            for i in 0..R {
                let xp = x.add(i * k + b * BLOCK);
                let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                a[i] = _mm512_fmadd_ps(w1, x1, _mm512_fmadd_ps(w0, x0, a[i]));
                c[i] = _mm512_fmadd_ps(v1, x1, _mm512_fmadd_ps(v0, x0, c[i]));
            }
        }
        for i in 0..R {
            out[i] = _mm512_reduce_add_ps(a[i]);
            out2[i] = _mm512_reduce_add_ps(c[i]);
        }
    }

    pub(super) unsafe fn dots2_avx512(
        kind: RawKind,
        row: &[u8],
        row2: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
        out2: &mut [f32],
    ) {
        match kind {
            RawKind::Q4_0 => rows2_512::<0>(row, row2, xs, k, out, out2),
            RawKind::Q4_1 => rows2_512::<1>(row, row2, xs, k, out, out2),
            RawKind::Q8_0 => rows2_512::<2>(row, row2, xs, k, out, out2),
            RawKind::F16 => rows2_512::<3>(row, row2, xs, k, out, out2),
        }
    }

    #[inline(always)]
    unsafe fn rows2_512<const K: u8>(
        row: &[u8],
        row2: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
        out2: &mut [f32],
    ) {
        match out.len() {
            1 => dots2_512::<1, K>(row, row2, xs, k, out, out2),
            2 => dots2_512::<2, K>(row, row2, xs, k, out, out2),
            3 => dots2_512::<3, K>(row, row2, xs, k, out, out2),
            4 => dots2_512::<4, K>(row, row2, xs, k, out, out2),
            5 => dots2_512::<5, K>(row, row2, xs, k, out, out2),
            6 => dots2_512::<6, K>(row, row2, xs, k, out, out2),
            7 => dots2_512::<7, K>(row, row2, xs, k, out, out2),
            8 => dots2_512::<8, K>(row, row2, xs, k, out, out2),
            n => unreachable!("{n} rows per tile"),
        }
    }

    pub(super) unsafe fn dots_avx512(
        kind: RawKind,
        row: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        match kind {
            RawKind::Q4_0 => rows512::<0>(row, xs, k, out),
            RawKind::Q4_1 => rows512::<1>(row, xs, k, out),
            RawKind::Q8_0 => rows512::<2>(row, xs, k, out),
            RawKind::F16 => rows512::<3>(row, xs, k, out),
        }
    }

    #[inline(always)]
    unsafe fn rows512<const K: u8>(row: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
        match out.len() {
            1 => dots512::<1, K>(row, xs, k, out),
            2 => dots512::<2, K>(row, xs, k, out),
            3 => dots512::<3, K>(row, xs, k, out),
            4 => dots512::<4, K>(row, xs, k, out),
            5 => dots512::<5, K>(row, xs, k, out),
            6 => dots512::<6, K>(row, xs, k, out),
            7 => dots512::<7, K>(row, xs, k, out),
            8 => dots512::<8, K>(row, xs, k, out),
            n => unreachable!("{n} rows per tile"),
        }
    }

    /// The f16 at `p` (unaligned), converted and broadcast to 8 lanes.
    #[inline(always)]
    unsafe fn bcast_f16_256(p: *const u8) -> __m256 {
        let bits = std::ptr::read_unaligned(p as *const u16);
        _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// One block as 4 x 8 f32.
    #[inline(always)]
    unsafe fn block256(kind: RawKind, p: *const u8) -> [__m256; 4] {
        let nib = _mm_set1_epi8(0x0F);
        match kind {
            RawKind::Q4_0 | RawKind::Q4_1 => {
                let (d, m, qs) = if kind == RawKind::Q4_0 {
                    let d = bcast_f16_256(p);
                    (d, _mm256_mul_ps(d, _mm256_set1_ps(-8.0)), p.add(2))
                } else {
                    (bcast_f16_256(p), bcast_f16_256(p.add(2)), p.add(4))
                };
                let q = _mm_loadu_si128(qs as *const __m128i);
                let lo = _mm_and_si128(q, nib);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), nib);
                let f =
                    |v: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), d, m);
                [
                    f(lo),
                    f(_mm_srli_si128(lo, 8)),
                    f(hi),
                    f(_mm_srli_si128(hi, 8)),
                ]
            }
            RawKind::Q8_0 => {
                let d = bcast_f16_256(p);
                let q0 = _mm_loadu_si128(p.add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(p.add(18) as *const __m128i);
                let f = |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
                [
                    f(q0),
                    f(_mm_srli_si128(q0, 8)),
                    f(q1),
                    f(_mm_srli_si128(q1, 8)),
                ]
            }
            RawKind::F16 => {
                let f = |o: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(o) as *const __m128i));
                [f(0), f(16), f(32), f(48)]
            }
        }
    }

    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn dots256<const R: usize, const K: u8>(
        row: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        // The block type is a constant here, so block decoding is not a run-time switch.
        let kind = RawKind::from_id(K);
        let bb = kind.block_bytes();
        // Independent accumulators per row, as many as the 16 registers allow.
        let n_acc = if R <= 2 {
            4
        } else if R <= 4 {
            2
        } else {
            1
        };
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let x = xs.as_ptr();
        for b in 0..k / BLOCK {
            let w = block256(kind, row.as_ptr().add(b * bb));
            for (i, a) in acc.iter_mut().enumerate() {
                let xp = x.add(i * k + b * BLOCK);
                for (j, wj) in w.iter().enumerate() {
                    let s = j % n_acc;
                    a[s] = _mm256_fmadd_ps(*wj, _mm256_loadu_ps(xp.add(8 * j)), a[s]);
                }
            }
        }
        for i in 0..R {
            let mut v = acc[i][0];
            for a in acc[i].iter().take(n_acc).skip(1) {
                v = _mm256_add_ps(v, *a);
            }
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            out[i] = _mm_cvtss_f32(s);
        }
    }

    pub(super) unsafe fn dots_avx2(
        kind: RawKind,
        row: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        match kind {
            RawKind::Q4_0 => rows256::<0>(row, xs, k, out),
            RawKind::Q4_1 => rows256::<1>(row, xs, k, out),
            RawKind::Q8_0 => rows256::<2>(row, xs, k, out),
            RawKind::F16 => rows256::<3>(row, xs, k, out),
        }
    }

    #[inline(always)]
    unsafe fn rows256<const K: u8>(row: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
        match out.len() {
            1 => dots256::<1, K>(row, xs, k, out),
            2 => dots256::<2, K>(row, xs, k, out),
            3 => dots256::<3, K>(row, xs, k, out),
            4 => dots256::<4, K>(row, xs, k, out),
            5 => dots256::<5, K>(row, xs, k, out),
            6 => dots256::<6, K>(row, xs, k, out),
            7 => dots256::<7, K>(row, xs, k, out),
            8 => dots256::<8, K>(row, xs, k, out),
            n => unreachable!("{n} rows per tile"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn raw(kind: RawKind, d: GgmlDType, w: &Tensor) -> (RawQ, Vec<f32>) {
        let q = QTensor::quantize(w, d).unwrap();
        let (n, k) = w.dims2().unwrap();
        let r = RawQ::new(kind, n, k, q.data().unwrap().to_vec()).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (r, deq)
    }

    #[test]
    fn kernels_equal_dequantised_matmul() {
        let (n, k) = (70, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for (kind, d) in [
            (RawKind::Q4_0, GgmlDType::Q4_0),
            (RawKind::Q4_1, GgmlDType::Q4_1),
            (RawKind::Q8_0, GgmlDType::Q8_0),
            (RawKind::F16, GgmlDType::F16),
        ] {
            let (r, deq) = raw(kind, d, &w);
            let mut row = vec![0f32; k];
            r.dequantize_row(3, &mut row);
            assert_eq!(row, deq[3 * k..4 * k], "{kind:?} dequantize_row");
            let mut levels = vec![Level::Scalar];
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    levels.push(Level::Avx2);
                }
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    levels.push(Level::Avx512);
                }
            }
            let x: Vec<f32> = (0..5 * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            for level in levels {
                let mut got = vec![0f32; 5];
                row_dots(level, kind, &r.data[..r.row_bytes()], &x, k, &mut got);
                for (i, g) in got.iter().enumerate() {
                    let want: f32 = (0..k).map(|t| x[i * k + t] * deq[t]).sum();
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{kind:?} {level:?} row {i}: {g} vs {want}"
                    );
                }
            }
            for m in [1, 3, 8, 11] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let y = r.matmul(&x, m);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|t| x[i * k + t] * deq[j * k + t]).sum();
                        let got = y[i * n + j];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{kind:?} m={m} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
