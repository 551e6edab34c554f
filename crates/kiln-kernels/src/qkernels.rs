//! CPU matmuls straight from GGML blocks: `y = x W^T` with `W (n, k)` stored as Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, F16, BF16 or one of the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), and
//! `x (m, k)` in f32. F16 and BF16 "blocks" are simply 32 consecutive values, so a row-major
//! 16-bit matrix (an HF safetensors tensor) is already in this layout and is used where it
//! lies: [`SharedBytes`] lets a matrix's rows live in a memory-mapped file.
//!
//! Each 32-weight chunk is expanded to exactly the f32 values dequantisation gives
//! (`d * q`, `d * (q - 8)`, `d * q + m`, `d * sc * q - dmin * m`, ...) in registers and
//! multiplied with f32 activations, so the result equals the dequantised model's up to
//! summation order and FMA rounding. (llama.cpp and candle instead round the activations to 8
//! bits and use integer dot products, which is cheaper but moves the logits by a few percent:
//! enough to change a greedy answer.)
//!
//! Decoding: Q4_0, Q4_1, Q8_0, F16, BF16, Q5_0 and Q5_1 have a one-block decoder. The
//! K-quants (and, on AVX2, the Q5 types) are first decoded to 32 unsigned byte codes with AVX2
//! byte operations, then widened to f32 as `scale * code + offset`, with one (scale, offset) per
//! 16 weights computed once per block.
//!
//! Kernels: a weight row against up to 8 activation rows, each block expanded once per tile
//! (decode, and prefill on AVX2/scalar); on AVX-512, two weight rows at a time for the types
//! with a one-block decoder; and for prefill (at least [`PANEL_MIN_ROWS`] rows, AVX-512) weight
//! rows decoded once into f32 panels and multiplied by a 4 x 4 register-tiled kernel.
//!
//! Work is split over output rows with rayon; AVX-512, AVX2+FMA and portable scalar kernels
//! are chosen at run time ([`crate::set_isa`] forces one, for tests and comparisons).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

mod q8;
pub use q8::Q8Rows;

static Q8_ACTIVATIONS: AtomicBool = AtomicBool::new(false);

/// Rounds the activations of every later quantised matmul to 8 bits and multiplies them with
/// integer dot products ([`Q8Rows`]; off by default: exact f32 activations).
pub fn set_q8_activations(on: bool) {
    Q8_ACTIVATIONS.store(on, Ordering::Relaxed);
}

/// Whether quantised matmuls round their activations to 8 bits ([`set_q8_activations`]).
pub fn q8_activations() -> bool {
    Q8_ACTIVATIONS.load(Ordering::Relaxed)
}

/// GGML block types with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    Q4_0,
    Q4_1,
    Q8_0,
    F16,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
    Q2K,
    Q3K,
    /// bfloat16: the top half of an f32, so decoding is a 16-bit shift.
    BF16,
}

impl RawKind {
    /// The inverse of the `K` ids the kernels are instantiated with.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) const fn from_id(id: u8) -> RawKind {
        match id {
            0 => RawKind::Q4_0,
            1 => RawKind::Q4_1,
            2 => RawKind::Q8_0,
            3 => RawKind::F16,
            4 => RawKind::Q5_0,
            5 => RawKind::Q5_1,
            6 => RawKind::Q4K,
            7 => RawKind::Q5K,
            8 => RawKind::Q6K,
            9 => RawKind::Q2K,
            10 => RawKind::Q3K,
            _ => RawKind::BF16,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            RawKind::Q4_0 => 18,
            RawKind::Q4_1 => 20,
            RawKind::Q8_0 => 34,
            RawKind::F16 | RawKind::BF16 => 64,
            RawKind::Q5_0 => 22,
            RawKind::Q5_1 => 24,
            RawKind::Q4K => 144,
            RawKind::Q5K => 176,
            RawKind::Q6K => 210,
            RawKind::Q2K => 84,
            RawKind::Q3K => 110,
        }
    }

    /// Weights in one block: 256 for the K-quants' super-blocks, 32 otherwise.
    pub fn block_elems(self) -> usize {
        match self {
            RawKind::Q2K | RawKind::Q3K | RawKind::Q4K | RawKind::Q5K | RawKind::Q6K => 256,
            _ => BLOCK,
        }
    }

    /// Has a one-block AVX-512 decoder (`x86::block512`, with the two-weight-row prefill
    /// kernel); the K-quants go through codes there too.
    fn has_block512(self) -> bool {
        !matches!(
            self,
            RawKind::Q2K | RawKind::Q3K | RawKind::Q4K | RawKind::Q5K | RawKind::Q6K
        )
    }
}

/// The weights one register-level decode step covers (a whole block for the 32-weight types,
/// an eighth of a K-quant super-block).
pub const BLOCK: usize = 32;

/// Bytes that blocks live in: a range of a shared buffer (an owned `Vec`, or a memory-mapped
/// file kept alive by the `Arc`). Cloning shares the buffer.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    /// Bytes `start .. start + len` of `owner`; `None` if the range is outside it.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= (*owner).as_ref().len()).then_some(Self { owner, start, len })
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            owner: Arc::new(v),
            start: 0,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A weight matrix `(n, k)` as GGML blocks, row by row: one or more runs of whole rows (more
/// than one when matrices are stacked, e.g. Q|K|V, which shares their bytes rather than
/// copying them).
pub struct RawQ {
    pub kind: RawKind,
    pub n: usize,
    pub k: usize,
    parts: Vec<SharedBytes>,
}

#[inline(always)]
fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

impl RawQ {
    /// `data` holds `n` rows of `k / block_elems` blocks (`k` must be a multiple of the
    /// block size).
    pub fn new(kind: RawKind, n: usize, k: usize, data: Vec<u8>) -> Option<Self> {
        Self::from_shared(kind, n, k, SharedBytes::from_vec(data))
    }

    /// A matrix over bytes that already hold `n` rows of `k / block_elems` blocks (a
    /// memory-mapped tensor); nothing is copied.
    pub fn from_shared(kind: RawKind, n: usize, k: usize, data: SharedBytes) -> Option<Self> {
        let elems = kind.block_elems();
        (k.is_multiple_of(elems) && data.len() == n * k / elems * kind.block_bytes()).then_some(
            Self {
                kind,
                n,
                k,
                parts: vec![data],
            },
        )
    }

    pub fn row_bytes(&self) -> usize {
        self.k / self.kind.block_elems() * self.kind.block_bytes()
    }

    /// Stacks matrices with the same kind and `k` along the rows (e.g. Q, K and V), sharing
    /// their bytes.
    pub fn concat_rows(parts: &[&RawQ]) -> Option<RawQ> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.kind != first.kind || p.k != first.k) {
            return None;
        }
        Some(RawQ {
            kind: first.kind,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            parts: parts.iter().flat_map(|p| p.parts.iter().cloned()).collect(),
        })
    }

    /// The bytes of rows `r0 .. r0 + rows` as runs that are each contiguous: `(first row,
    /// bytes)`, in order (one run unless the range crosses stacked matrices).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn row_runs(&self, r0: usize, rows: usize) -> Vec<(usize, &[u8])> {
        let rb = self.row_bytes();
        let (mut runs, mut base, end) = (Vec::new(), 0, r0 + rows);
        for p in &self.parts {
            let (lo, hi) = (base, base + p.len() / rb);
            let (a, b) = (r0.max(lo), end.min(hi));
            if a < b {
                runs.push((a, &p.as_slice()[(a - lo) * rb..(b - lo) * rb]));
            }
            base = hi;
        }
        runs
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        let mut r = r;
        for p in &self.parts {
            let rows = p.len() / rb;
            if r < rows {
                return &p.as_slice()[r * rb..(r + 1) * rb];
            }
            r -= rows;
        }
        panic!("row {r} past the matrix's {} rows", self.n)
    }

    /// Row `r`, dequantised into `out` (`k` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        let bb = self.kind.block_bytes();
        for (b, o) in out.chunks_exact_mut(self.kind.block_elems()).enumerate() {
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

    /// `x (m, k)` row-major → `x W^T (m, n)` row-major, with the kernels of
    /// [`crate::active_isa`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_isa(x, m, crate::active_isa())
    }

    /// [`RawQ::matmul`] on the kernels of one level (tests compare every level the CPU runs
    /// without touching the process-wide choice). A level the CPU lacks runs the scalar
    /// kernels. With [`set_q8_activations`] on, the activations are rounded to 8 bits first
    /// ([`RawQ::matmul_q8_isa`]).
    pub fn matmul_isa(&self, x: &[f32], m: usize, isa: crate::Isa) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.k,
            "matmul: x has {} values, not {m} x {}",
            x.len(),
            self.k
        );
        if q8_activations() {
            return self.matmul_q8_isa(x, m, isa);
        }
        self.matmul_exact(x, m, Level::of(isa))
    }

    /// The product with exact f32 activations.
    fn matmul_exact(&self, x: &[f32], m: usize, level: Level) -> Vec<f32> {
        let n = self.n;
        #[cfg(target_arch = "x86_64")]
        if m >= PANEL_MIN_ROWS && level != Level::Scalar {
            return self.panel_matmul(x, m, level);
        }
        // Output rows per task: enough work per task, a few tasks per thread.
        let threads = rayon::current_num_threads().max(1);
        let chunk = n.div_ceil(threads * 4).clamp(16, 256);
        let mut out = vec![0f32; m * n];
        let dst = SyncPtr(out.as_mut_ptr());
        // bf16 weights widen without shuffles when the activations come in even/odd order
        // (see `x86::bf16_dots`): the activations are reordered once here.
        #[cfg(target_arch = "x86_64")]
        let bf16_lanes = match level {
            _ if self.kind != RawKind::BF16 => None,
            Level::Avx512 => Some(16),
            Level::Avx2 => Some(8),
            Level::Scalar => None,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let bf16_lanes: Option<usize> = None;
        let x_split = bf16_lanes.map(|lanes| split_even_odd(x, lanes));
        let x = x_split.as_deref().unwrap_or(x);
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let dst = &dst;
            let mut tile = [0f32; 8];
            let mut tile2 = [0f32; 8];
            let end = ((c + 1) * chunk).min(n);
            let mut r = c * chunk;
            while r < end {
                // Prefill: two weight rows at a time share every activation load.
                let pair = m > 1
                    && r + 1 < end
                    && level == Level::best_pairs()
                    && self.kind.has_block512()
                    && bf16_lanes.is_none();
                let row = self.row(r);
                let mut i = 0;
                while i < m {
                    // The pair kernel keeps 2 x 6 accumulators in registers.
                    let take = (m - i).min(if pair { 6 } else { 8 });
                    let xs = &x[i * self.k..(i + take) * self.k];
                    if pair {
                        let row2 = self.row(r + 1);
                        row_dots2(
                            self.kind,
                            row,
                            row2,
                            xs,
                            self.k,
                            &mut tile[..take],
                            &mut tile2[..take],
                        );
                    } else if let Some(lanes) = bf16_lanes {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `lanes` comes from a level the CPU was detected to have.
                        unsafe {
                            x86::bf16_dots(lanes, row, xs, self.k, &mut tile[..take])
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        unreachable!("{lanes}-lane bf16 kernels are x86 only");
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

/// From this many activation rows on (prefill), weight rows are decoded once into f32 panels
/// and multiplied by a register-tiled kernel, rather than decoded again for every 6-8 rows.
pub const PANEL_MIN_ROWS: usize = 16;
/// Activation rows per register tile of the panel kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PANEL_TILE_ROWS: usize = 4;

impl RawQ {
    /// [`RawQ::matmul`] for many activation rows (AVX-512 or AVX2): each task decodes a panel
    /// of weight rows into f32 with the SIMD decoders (32 rows on AVX-512, 30 on AVX2: a
    /// whole number of tiles, small enough to stay in L2), then computes every activation row
    /// against it in register tiles of dot products (4 weight rows x 4 activation rows in 16
    /// zmm accumulators on AVX-512; 3 x 4 in 12 of AVX2's 16 ymm registers).
    #[cfg(target_arch = "x86_64")]
    fn panel_matmul(&self, x: &[f32], m: usize, level: Level) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let avx512 = level == Level::Avx512;
        let (panel_rows, tile_w) = if avx512 { (32, 4) } else { (30, 3) };
        let mut out = vec![0f32; m * n];
        let dst = SyncPtr(out.as_mut_ptr());
        (0..n.div_ceil(panel_rows)).into_par_iter().for_each(|p| {
            let dst = &dst;
            let r0 = p * panel_rows;
            let rows = panel_rows.min(n - r0);
            // Rounded up to whole tiles; the padding rows stay zero and are not written.
            let mut panel = vec![0f32; rows.next_multiple_of(tile_w) * k];
            for (first, data) in self.row_runs(r0, rows) {
                let at = &mut panel[(first - r0) * k..];
                // SAFETY: `matmul` picked this level from the detected features; the panel
                // holds `rows` rows of k from `r0`.
                unsafe {
                    if avx512 {
                        x86::decode_rows512(self.kind, data, k, at)
                    } else {
                        x86::decode_rows256(self.kind, data, k, at)
                    }
                };
            }
            let mut i = 0;
            while i < m {
                let take = (m - i).min(PANEL_TILE_ROWS);
                for w in (0..rows).step_by(tile_w) {
                    let mut tile = [[0f32; 6]; 4];
                    let (wp, xs) = (&panel[w * k..(w + tile_w) * k], &x[i * k..(i + take) * k]);
                    // SAFETY: as above; the tile reads `tile_w` panel rows and `take` rows of x.
                    unsafe {
                        if avx512 {
                            x86::tile512(wp, xs, k, take, &mut tile)
                        } else {
                            x86::tile256(wp, xs, k, take, &mut tile)
                        }
                    };
                    for (dw, t) in tile.iter().enumerate().take(tile_w.min(rows - w)) {
                        for (j, v) in t.iter().enumerate().take(take) {
                            // SAFETY: (i + j, r0 + w + dw) is in bounds and these columns
                            // belong to this task alone.
                            unsafe { *dst.0.add((i + j) * n + r0 + w + dw) = *v };
                        }
                    }
                }
                i += take;
            }
        });
        out
    }
}

/// `x` with each group of `2 lanes` values reordered as its even-indexed values, then its
/// odd-indexed ones: the order in which `x86::bf16_dots` widens a vector of bf16 weights
/// (a 32-bit lane holds weights `2j` and `2j + 1`; a shift and a mask make each an f32).
fn split_even_odd(x: &[f32], lanes: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x
        .chunks_exact(2 * lanes)
        .zip(out.chunks_exact_mut(2 * lanes))
    {
        for j in 0..lanes {
            dst[j] = src[2 * j];
            dst[lanes + j] = src[2 * j + 1];
        }
    }
    out
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
        RawKind::BF16 => {
            for j in 0..32 {
                o[j] = half::bf16::from_bits(u16::from_le_bytes([blk[2 * j], blk[2 * j + 1]]))
                    .to_f32();
            }
        }
        // The rest straight from GGML's reference `dequantize_row_*`, one term per weight.
        RawKind::Q5_0 | RawKind::Q5_1 => {
            let five_0 = kind == RawKind::Q5_0;
            let d = f16(&blk[0..2]);
            let (m, at) = if five_0 {
                (0.0, 2)
            } else {
                (f16(&blk[2..4]), 4)
            };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let qs = &blk[at + 4..at + 20];
            for j in 0..16 {
                let lo = (qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                if five_0 {
                    o[j] = d * (lo as f32 - 16.0);
                    o[j + 16] = d * (hi as f32 - 16.0);
                } else {
                    o[j] = d * lo as f32 + m;
                    o[j + 16] = d * hi as f32 + m;
                }
            }
        }
        RawKind::Q4K | RawKind::Q5K => {
            let (d, dmin) = (f16(&blk[0..2]), f16(&blk[2..4]));
            let scales = &blk[4..16];
            let five = kind == RawKind::Q5K;
            let (qh, qs) = if five {
                (&blk[16..48], &blk[48..176])
            } else {
                (&blk[0..0], &blk[16..144])
            };
            for j in 0..4 {
                let ql = &qs[32 * j..32 * j + 32];
                for half in 0..2 {
                    let sub = 2 * j + half;
                    let (sc, mn) = k_scale_min(sub, scales);
                    let (d1, m1) = (d * sc as f32, dmin * mn as f32);
                    for l in 0..32 {
                        let mut q = if half == 0 { ql[l] & 0x0F } else { ql[l] >> 4 };
                        if five && qh[l] & (1 << sub) != 0 {
                            q += 16;
                        }
                        o[32 * sub + l] = d1 * q as f32 - m1;
                    }
                }
            }
        }
        // Q2_K: 16 groups of 16 weights `d * (sc & 15) * q - dmin * (sc >> 4)`, the 2-bit codes
        // of weights 128 n + 32 j + l in bits 2j, 2j+1 of qs[32 n + l].
        RawKind::Q2K => {
            let (d, dmin) = (f16(&blk[80..82]), f16(&blk[82..84]));
            for (w, y) in o.iter_mut().enumerate().take(256) {
                let (n, j, l) = (w / 128, (w % 128) / 32, w % 32);
                let sc = blk[w / 16];
                let q = (blk[16 + 32 * n + l] >> (2 * j)) & 3;
                *y = d * (sc & 0x0F) as f32 * q as f32 - dmin * (sc >> 4) as f32;
            }
        }
        // Q3_K: `d * (sc - 32) * (q - 4)` with q's low bits as Q2_K's and its third bit, bit
        // 4 n + j of hmask[l]; the 16 six-bit scales packed in 12 bytes.
        RawKind::Q3K => {
            let d = f16(&blk[108..110]);
            for (w, y) in o.iter_mut().enumerate().take(256) {
                let (n, j, l) = (w / 128, (w % 128) / 32, w % 32);
                let low = (blk[32 + 32 * n + l] >> (2 * j)) & 3;
                let high = (blk[l] >> (4 * n + j)) & 1;
                let q = (low | (high << 2)) as f32 - 4.0;
                *y = d * q3k_scale(w / 16, &blk[96..108]) as f32 * q;
            }
        }
        RawKind::Q6K => {
            let d = f16(&blk[208..210]);
            for n in 0..2 {
                let ql = &blk[64 * n..64 * n + 64];
                let qh = &blk[128 + 32 * n..160 + 32 * n];
                let sc = &blk[192 + 8 * n..200 + 8 * n];
                let y = &mut o[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    let s = |i: usize| d * (sc[i] as i8) as f32;
                    y[l] = s(is) * q1 as f32;
                    y[l + 32] = s(is + 2) * q2 as f32;
                    y[l + 64] = s(is + 4) * q3 as f32;
                    y[l + 96] = s(is + 6) * q4 as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, packed in 12
/// bytes: the first four pairs in the low 6 bits of bytes 0..8, the last four split between
/// the nibbles of bytes 8..12 and the top 2 bits of bytes 0..8.
#[inline(always)]
fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's signed scale of group `i` (0..16) from its 12 packed bytes: the low 4 bits in the
/// low (i < 8) or high nibble of byte `i % 8`, the top 2 bits in bits `2 (i / 4)` of byte
/// `8 + i % 4`, minus 32.
fn q3k_scale(i: usize, packed: &[u8]) -> i32 {
    let low = if i < 8 {
        packed[i] & 0x0F
    } else {
        packed[i - 8] >> 4
    };
    let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// The (scale, offset) of each 16 weights of a coded block, so that weight = scale * code +
/// offset with the byte code of [`x86::codes`]: 2 pairs for the 32-weight types, 16 for the
/// K-quants.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn coded_affine(kind: RawKind, blk: &[u8], scale: &mut [f32; 16], offset: &mut [f32; 16]) {
    match kind {
        RawKind::Q5_0 => {
            let d = f16(&blk[0..2]);
            scale[..2].fill(d);
            offset[..2].fill(-16.0 * d);
        }
        RawKind::Q5_1 => {
            scale[..2].fill(f16(&blk[0..2]));
            offset[..2].fill(f16(&blk[2..4]));
        }
        RawKind::Q4K | RawKind::Q5K => {
            let (d, dmin) = (f16(&blk[0..2]), f16(&blk[2..4]));
            for sub in 0..8 {
                let (sc, mn) = k_scale_min(sub, &blk[4..16]);
                let (s, o) = (d * sc as f32, -(dmin * mn as f32));
                scale[2 * sub] = s;
                scale[2 * sub + 1] = s;
                offset[2 * sub] = o;
                offset[2 * sub + 1] = o;
            }
        }
        RawKind::Q6K => {
            let d = f16(&blk[208..210]);
            for h in 0..16 {
                let s = d * (blk[192 + h] as i8) as f32;
                scale[h] = s;
                offset[h] = -32.0 * s;
            }
        }
        RawKind::Q2K => {
            let (d, dmin) = (f16(&blk[80..82]), f16(&blk[82..84]));
            for h in 0..16 {
                scale[h] = d * (blk[h] & 0x0F) as f32;
                offset[h] = -(dmin * (blk[h] >> 4) as f32);
            }
        }
        RawKind::Q3K => {
            // q3k_scale for all 16 at once, without branches (so it vectorises: in decode this
            // runs once per 256 weights of every row).
            let d = f16(&blk[108..110]);
            let packed: [u8; 12] = blk[96..108].try_into().expect("12 scale bytes");
            let mut six = [0u8; 16];
            for i in 0..8 {
                six[i] = packed[i] & 0x0F;
                six[i + 8] = packed[i] >> 4;
            }
            for (i, v) in six.iter_mut().enumerate() {
                *v |= ((packed[8 + i % 4] >> (2 * (i / 4))) & 3) << 4;
            }
            for h in 0..16 {
                let s = d * (six[h] as i32 - 32) as f32;
                scale[h] = s;
                offset[h] = -4.0 * s;
            }
        }
        RawKind::Q4_0 | RawKind::Q4_1 | RawKind::Q8_0 | RawKind::F16 | RawKind::BF16 => {
            unreachable!("{kind:?} has its own decoder")
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

impl Level {
    /// The kernels that serve `isa` (NEON runs the portable kernels, compiled for aarch64);
    /// the scalar ones for a level the CPU lacks.
    fn of(isa: crate::Isa) -> Level {
        match isa {
            _ if !isa.available() => Level::Scalar,
            #[cfg(target_arch = "x86_64")]
            crate::Isa::Avx512 => Level::Avx512,
            #[cfg(target_arch = "x86_64")]
            crate::Isa::Avx2 => Level::Avx2,
            _ => Level::Scalar,
        }
    }

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
            let mut buf = [0f32; 256];
            let (bb, elems) = (kind.block_bytes(), kind.block_elems());
            let w = &mut buf[..elems];
            out.iter_mut().for_each(|o| *o = 0.0);
            for b in 0..k / elems {
                dequant_block_scalar(kind, &row[b * bb..(b + 1) * bb], w);
                for (i, o) in out.iter_mut().enumerate() {
                    let x = &xs[i * k + b * elems..i * k + (b + 1) * elems];
                    *o += w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{coded_affine, RawKind, BLOCK};
    use std::arch::x86_64::*;

    /// Chunk `s` (weights `32 s .. 32 s + 32`) of a coded block at `p` as 32 unsigned byte
    /// codes, lane `l` holding weight `32 s + l` (see [`coded_affine`] for the values).
    #[inline(always)]
    pub(super) unsafe fn codes(kind: RawKind, p: *const u8, s: usize) -> __m256i {
        let low4 = _mm256_set1_epi8(0x0F);
        // Low (even) or high (odd) nibbles of 32 bytes.
        let nibbles = |b: __m256i, high: bool| {
            if high {
                _mm256_and_si256(_mm256_srli_epi16(b, 4), low4)
            } else {
                _mm256_and_si256(b, low4)
            }
        };
        let shift = |b: __m256i, n: usize| _mm256_srl_epi16(b, _mm_cvtsi32_si128(n as i32));
        match kind {
            RawKind::Q5_0 | RawKind::Q5_1 => {
                let at = if kind == RawKind::Q5_0 { 2 } else { 4 };
                // 16 bytes: weight j in the low nibble of byte j, weight j + 16 in its high one.
                let q = _mm_loadu_si128(p.add(at + 4) as *const __m128i);
                let lo = _mm_and_si128(q, _mm_set1_epi8(0x0F));
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F));
                let nib = _mm256_set_m128i(hi, lo);
                // Bit j of `qh` is weight j's fifth bit: send byte j / 8 of it to lane j, keep
                // bit j % 8, and turn a set one into 16.
                let qh = std::ptr::read_unaligned(p.add(at) as *const u32);
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh as i32),
                    _mm256_set_epi64x(
                        0x0303_0303_0303_0303,
                        0x0202_0202_0202_0202,
                        0x0101_0101_0101_0101,
                        0,
                    ),
                );
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
            }
            RawKind::Q4K => {
                let q = _mm256_loadu_si256(p.add(16 + 32 * (s / 2)) as *const __m256i);
                nibbles(q, s % 2 == 1)
            }
            RawKind::Q5K => {
                let q = _mm256_loadu_si256(p.add(48 + 32 * (s / 2)) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(16) as *const __m256i);
                // Bit s of qh[l] is the fifth bit of weight 32 s + l.
                let h = _mm256_and_si256(shift(qh, s), _mm256_set1_epi8(1));
                _mm256_or_si256(nibbles(q, s % 2 == 1), _mm256_slli_epi16(h, 4))
            }
            RawKind::Q6K => {
                // Half n of the super-block, group g of its four 32-weight groups: low bits in
                // the low (g < 2) or high nibbles of ql[32 (g % 2) ..], high bits in bits 2g,
                // 2g + 1 of qh[l].
                let (n, g) = (s / 4, s % 4);
                let q = _mm256_loadu_si256(p.add(64 * n + 32 * (g % 2)) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let h = _mm256_and_si256(shift(qh, 2 * g), _mm256_set1_epi8(3));
                _mm256_or_si256(nibbles(q, g >= 2), _mm256_slli_epi16(h, 4))
            }
            RawKind::Q2K | RawKind::Q3K => {
                // Chunk s = 4 n + j: bits 2j, 2j+1 of the 32 bytes qs[32 n ..]; Q3_K adds bit
                // s (= 4 n + j) of hmask[l] as the third.
                let (n, j) = (s / 4, s % 4);
                let at = if kind == RawKind::Q2K { 16 } else { 32 };
                let q = _mm256_loadu_si256(p.add(at + 32 * n) as *const __m256i);
                let low = _mm256_and_si256(shift(q, 2 * j), _mm256_set1_epi8(3));
                if kind == RawKind::Q2K {
                    low
                } else {
                    let hm = _mm256_loadu_si256(p as *const __m256i);
                    let h = _mm256_and_si256(shift(hm, s), _mm256_set1_epi8(1));
                    _mm256_or_si256(low, _mm256_slli_epi16(h, 2))
                }
            }
            RawKind::Q4_0 | RawKind::Q4_1 | RawKind::Q8_0 | RawKind::F16 | RawKind::BF16 => {
                unreachable!("{kind:?} has its own decoder")
            }
        }
    }

    /// Chunk `s` of the coded block at `p` as 2 x 16 f32: its byte codes widened as
    /// `scale * code + offset` with the block's pairs (see [`coded_affine`]).
    #[inline(always)]
    unsafe fn coded_chunk512(
        kind: RawKind,
        p: *const u8,
        s: usize,
        scale: &[f32; 16],
        offset: &[f32; 16],
    ) -> (__m512, __m512) {
        let c = codes(kind, p, s);
        let widen = |v: __m128i, h: usize| {
            _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)),
                _mm512_set1_ps(scale[h]),
                _mm512_set1_ps(offset[h]),
            )
        };
        (
            widen(_mm256_castsi256_si128(c), 2 * s),
            widen(_mm256_extracti128_si256::<1>(c), 2 * s + 1),
        )
    }

    /// [`dots512`] for the coded types: per block, the (scale, offset) pairs once, then each
    /// 32-weight chunk as codes widened to 2 x 16 f32.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c,fma")]
    unsafe fn coded_dots512<const R: usize, const K: u8>(
        row: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        let kind = RawKind::from_id(K);
        let (bb, elems) = (kind.block_bytes(), kind.block_elems());
        let x = xs.as_ptr();
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
        for b in 0..k / elems {
            let blk = &row[b * bb..(b + 1) * bb];
            coded_affine(kind, blk, &mut scale, &mut offset);
            for s in 0..elems / BLOCK {
                let (w0, w1) = coded_chunk512(kind, blk.as_ptr(), s, &scale, &offset);
                for i in 0..R {
                    let xp = x.add(i * k + b * elems + s * BLOCK);
                    a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a0[i]);
                    a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a1[i]);
                }
            }
        }
        for i in 0..R {
            out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
        }
    }

    /// Chunk `s` of the coded block at `p` as 4 x 8 f32 (see [`coded_chunk512`]).
    #[inline(always)]
    unsafe fn coded_chunk256(
        kind: RawKind,
        p: *const u8,
        s: usize,
        scale: &[f32; 16],
        offset: &[f32; 16],
    ) -> [__m256; 4] {
        let c = codes(kind, p, s);
        let (lo, hi) = (_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c));
        let widen = |v: __m128i, h: usize| {
            _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)),
                _mm256_set1_ps(scale[h]),
                _mm256_set1_ps(offset[h]),
            )
        };
        [
            widen(lo, 2 * s),
            widen(_mm_srli_si128::<8>(lo), 2 * s),
            widen(hi, 2 * s + 1),
            widen(_mm_srli_si128::<8>(hi), 2 * s + 1),
        ]
    }

    /// [`decode_rows512`] with the AVX2 decoders.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub(super) unsafe fn decode_rows256(kind: RawKind, data: &[u8], k: usize, panel: &mut [f32]) {
        match kind {
            RawKind::Q4_0 => decode_rows_k256::<0>(data, k, panel),
            RawKind::Q4_1 => decode_rows_k256::<1>(data, k, panel),
            RawKind::Q8_0 => decode_rows_k256::<2>(data, k, panel),
            RawKind::F16 => decode_rows_k256::<3>(data, k, panel),
            RawKind::Q5_0 => decode_rows_k256::<4>(data, k, panel),
            RawKind::Q5_1 => decode_rows_k256::<5>(data, k, panel),
            RawKind::Q4K => decode_rows_k256::<6>(data, k, panel),
            RawKind::Q5K => decode_rows_k256::<7>(data, k, panel),
            RawKind::Q6K => decode_rows_k256::<8>(data, k, panel),
            RawKind::Q2K => decode_rows_k256::<9>(data, k, panel),
            RawKind::Q3K => decode_rows_k256::<10>(data, k, panel),
            RawKind::BF16 => decode_rows_k256::<11>(data, k, panel),
        }
    }

    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn decode_rows_k256<const K: u8>(data: &[u8], k: usize, panel: &mut [f32]) {
        let kind = RawKind::from_id(K);
        let (bb, elems) = (kind.block_bytes(), kind.block_elems());
        let blocks = data.len() / bb;
        assert!(panel.len() >= blocks * elems && (blocks * elems).is_multiple_of(k));
        let out = panel.as_mut_ptr();
        let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
        for b in 0..blocks {
            let blk = &data[b * bb..(b + 1) * bb];
            let o = out.add(b * elems);
            let store = |at: usize, w: [__m256; 4]| {
                for (j, v) in w.into_iter().enumerate() {
                    _mm256_storeu_ps(o.add(at + 8 * j), v);
                }
            };
            match kind {
                RawKind::Q4_0 | RawKind::Q4_1 | RawKind::Q8_0 | RawKind::F16 | RawKind::BF16 => {
                    store(0, block256(kind, blk.as_ptr()))
                }
                _ => {
                    coded_affine(kind, blk, &mut scale, &mut offset);
                    for s in 0..elems / BLOCK {
                        store(
                            s * BLOCK,
                            coded_chunk256(kind, blk.as_ptr(), s, &scale, &offset),
                        );
                    }
                }
            }
        }
    }

    /// Dot products of 3 weight rows (`w`, 3 x k) with `rows` (1..=4) activation rows:
    /// `tile[wr][xr]`. 12 accumulators + 3 weight vectors + 1 activation vector fill AVX2's
    /// 16 registers.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub(super) unsafe fn tile256(
        w: &[f32],
        xs: &[f32],
        k: usize,
        rows: usize,
        tile: &mut [[f32; 6]; 4],
    ) {
        match rows {
            1 => tile_r256::<1>(w, xs, k, tile),
            2 => tile_r256::<2>(w, xs, k, tile),
            3 => tile_r256::<3>(w, xs, k, tile),
            4 => tile_r256::<4>(w, xs, k, tile),
            n => unreachable!("{n} rows per tile"),
        }
    }

    /// The sum of the 8 lanes.
    #[inline(always)]
    pub(super) unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn tile_r256<const R: usize>(w: &[f32], xs: &[f32], k: usize, tile: &mut [[f32; 6]; 4]) {
        assert!(w.len() >= 3 * k && xs.len() >= R * k && k.is_multiple_of(8));
        let (wp, xp) = (w.as_ptr(), xs.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        let mut a2 = [_mm256_setzero_ps(); R];
        let mut t = 0;
        while t < k {
            let w0 = _mm256_loadu_ps(wp.add(t));
            let w1 = _mm256_loadu_ps(wp.add(k + t));
            let w2 = _mm256_loadu_ps(wp.add(2 * k + t));
            // Unrolled by hand, as in `tile_r512`, to keep the accumulators in registers.
            macro_rules! row {
                ($j:literal) => {
                    if R > $j {
                        let xv = _mm256_loadu_ps(xp.add($j * k + t));
                        a0[$j] = _mm256_fmadd_ps(w0, xv, a0[$j]);
                        a1[$j] = _mm256_fmadd_ps(w1, xv, a1[$j]);
                        a2[$j] = _mm256_fmadd_ps(w2, xv, a2[$j]);
                    }
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            t += 8;
        }
        for j in 0..R {
            tile[0][j] = hsum256(a0[j]);
            tile[1][j] = hsum256(a1[j]);
            tile[2][j] = hsum256(a2[j]);
        }
    }

    /// [`coded_dots512`] with 8-lane registers.
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn coded_dots256<const R: usize, const K: u8>(
        row: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        let kind = RawKind::from_id(K);
        let (bb, elems) = (kind.block_bytes(), kind.block_elems());
        let x = xs.as_ptr();
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
        for b in 0..k / elems {
            let blk = &row[b * bb..(b + 1) * bb];
            coded_affine(kind, blk, &mut scale, &mut offset);
            for s in 0..elems / BLOCK {
                let w = coded_chunk256(kind, blk.as_ptr(), s, &scale, &offset);
                for i in 0..R {
                    let xp = x.add(i * k + b * elems + s * BLOCK);
                    a0[i] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xp), a0[i]);
                    a1[i] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), a1[i]);
                    a0[i] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), a0[i]);
                    a1[i] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), a1[i]);
                }
            }
        }
        for i in 0..R {
            let v = _mm256_add_ps(a0[i], a1[i]);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            out[i] = _mm_cvtss_f32(s);
        }
    }

    /// Dequantises consecutive weight rows (`data`, each `k` weights) into `panel` (row-major
    /// f32), with the same SIMD decoders the dot kernels use.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c,fma")]
    pub(super) unsafe fn decode_rows512(kind: RawKind, data: &[u8], k: usize, panel: &mut [f32]) {
        match kind {
            RawKind::Q4_0 => decode_rows_k512::<0>(data, k, panel),
            RawKind::Q4_1 => decode_rows_k512::<1>(data, k, panel),
            RawKind::Q8_0 => decode_rows_k512::<2>(data, k, panel),
            RawKind::F16 => decode_rows_k512::<3>(data, k, panel),
            RawKind::Q5_0 => decode_rows_k512::<4>(data, k, panel),
            RawKind::Q5_1 => decode_rows_k512::<5>(data, k, panel),
            RawKind::Q4K => decode_rows_k512::<6>(data, k, panel),
            RawKind::Q5K => decode_rows_k512::<7>(data, k, panel),
            RawKind::Q6K => decode_rows_k512::<8>(data, k, panel),
            RawKind::Q2K => decode_rows_k512::<9>(data, k, panel),
            RawKind::Q3K => decode_rows_k512::<10>(data, k, panel),
            RawKind::BF16 => decode_rows_k512::<11>(data, k, panel),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c,fma")]
    unsafe fn decode_rows_k512<const K: u8>(data: &[u8], k: usize, panel: &mut [f32]) {
        let kind = RawKind::from_id(K);
        let (bb, elems) = (kind.block_bytes(), kind.block_elems());
        let blocks = data.len() / bb;
        assert!(panel.len() >= blocks * elems && (blocks * elems).is_multiple_of(k));
        let out = panel.as_mut_ptr();
        let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
        for b in 0..blocks {
            let blk = &data[b * bb..(b + 1) * bb];
            let o = out.add(b * elems);
            if !kind.has_block512() {
                coded_affine(kind, blk, &mut scale, &mut offset);
                for s in 0..elems / BLOCK {
                    let (w0, w1) = coded_chunk512(kind, blk.as_ptr(), s, &scale, &offset);
                    _mm512_storeu_ps(o.add(s * BLOCK), w0);
                    _mm512_storeu_ps(o.add(s * BLOCK + 16), w1);
                }
            } else {
                let (w0, w1) = block512(kind, blk.as_ptr());
                _mm512_storeu_ps(o, w0);
                _mm512_storeu_ps(o.add(16), w1);
            }
        }
    }

    /// Dot products of 4 weight rows (`w`, 4 x k) with `rows` (1..=6) activation rows
    /// (`xs`): `tile[wr][xr]`. 24 accumulators; each step loads 4 + 6 vectors for 24 FMAs.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c,fma")]
    pub(super) unsafe fn tile512(
        w: &[f32],
        xs: &[f32],
        k: usize,
        rows: usize,
        tile: &mut [[f32; 6]; 4],
    ) {
        match rows {
            1 => tile_r512::<1>(w, xs, k, tile),
            2 => tile_r512::<2>(w, xs, k, tile),
            3 => tile_r512::<3>(w, xs, k, tile),
            4 => tile_r512::<4>(w, xs, k, tile),
            5 => tile_r512::<5>(w, xs, k, tile),
            6 => tile_r512::<6>(w, xs, k, tile),
            n => unreachable!("{n} rows per tile"),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c,fma")]
    unsafe fn tile_r512<const R: usize>(w: &[f32], xs: &[f32], k: usize, tile: &mut [[f32; 6]; 4]) {
        assert!(w.len() >= 4 * k && xs.len() >= R * k && k.is_multiple_of(16));
        let (wp, xp) = (w.as_ptr(), xs.as_ptr());
        // Four named accumulator rows (rather than one 2-D array) so that they stay in
        // registers: 4 x 6 accumulators + 4 weight vectors + 1 activation vector of the 32.
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let mut a2 = [_mm512_setzero_ps(); R];
        let mut a3 = [_mm512_setzero_ps(); R];
        let mut t = 0;
        while t < k {
            let w0 = _mm512_loadu_ps(wp.add(t));
            let w1 = _mm512_loadu_ps(wp.add(k + t));
            let w2 = _mm512_loadu_ps(wp.add(2 * k + t));
            let w3 = _mm512_loadu_ps(wp.add(3 * k + t));
            // Unrolled by hand (`R` is a constant, so the untaken arms vanish): as a loop,
            // LLVM kept the accumulators on the stack.
            macro_rules! row {
                ($j:literal) => {
                    if R > $j {
                        let xv = _mm512_loadu_ps(xp.add($j * k + t));
                        a0[$j] = _mm512_fmadd_ps(w0, xv, a0[$j]);
                        a1[$j] = _mm512_fmadd_ps(w1, xv, a1[$j]);
                        a2[$j] = _mm512_fmadd_ps(w2, xv, a2[$j]);
                        a3[$j] = _mm512_fmadd_ps(w3, xv, a3[$j]);
                    }
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            row!(4);
            row!(5);
            t += 16;
        }
        for j in 0..R {
            tile[0][j] = _mm512_reduce_add_ps(a0[j]);
            tile[1][j] = _mm512_reduce_add_ps(a1[j]);
            tile[2][j] = _mm512_reduce_add_ps(a2[j]);
            tile[3][j] = _mm512_reduce_add_ps(a3[j]);
        }
    }

    /// Instantiates `$kernel::<R, K>` for the tile height `out.len()`.
    macro_rules! by_rows {
        ($kernel:ident, $k_id:expr, $row:expr, $xs:expr, $k:expr, $out:expr) => {
            match $out.len() {
                1 => $kernel::<1, { $k_id }>($row, $xs, $k, $out),
                2 => $kernel::<2, { $k_id }>($row, $xs, $k, $out),
                3 => $kernel::<3, { $k_id }>($row, $xs, $k, $out),
                4 => $kernel::<4, { $k_id }>($row, $xs, $k, $out),
                5 => $kernel::<5, { $k_id }>($row, $xs, $k, $out),
                6 => $kernel::<6, { $k_id }>($row, $xs, $k, $out),
                7 => $kernel::<7, { $k_id }>($row, $xs, $k, $out),
                8 => $kernel::<8, { $k_id }>($row, $xs, $k, $out),
                n => unreachable!("{n} rows per tile"),
            }
        };
    }

    /// `out[i] = dot(row, xs[i])` for bf16 weights and activations in even/odd order
    /// ([`super::split_even_odd`] with `lanes`): each vector of weights widens with a shift
    /// (even weights) and a mask (odd ones), no lane crossing. `lanes` is 16 (AVX-512) or 8.
    pub(super) unsafe fn bf16_dots(
        lanes: usize,
        row: &[u8],
        xs: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        macro_rules! by_rows {
            ($f:ident) => {
                match out.len() {
                    1 => $f::<1>(row, xs, k, out),
                    2 => $f::<2>(row, xs, k, out),
                    3 => $f::<3>(row, xs, k, out),
                    4 => $f::<4>(row, xs, k, out),
                    5 => $f::<5>(row, xs, k, out),
                    6 => $f::<6>(row, xs, k, out),
                    7 => $f::<7>(row, xs, k, out),
                    8 => $f::<8>(row, xs, k, out),
                    n => unreachable!("{n} rows per tile"),
                }
            };
        }
        if lanes == 16 {
            by_rows!(bf16_dots512)
        } else {
            by_rows!(bf16_dots256)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn bf16_dots512<const R: usize>(row: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
        assert!(row.len() >= 2 * k && xs.len() >= R * k && k.is_multiple_of(32));
        let (w, x) = (row.as_ptr(), xs.as_ptr());
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // Two accumulators per row and per half: four independent FMA chains at R = 1.
        let mut a = [[_mm512_setzero_ps(); 2]; R];
        let mut c = [[_mm512_setzero_ps(); 2]; R];
        let widen = |t: usize| {
            let v = _mm512_loadu_si512(w.add(2 * t) as *const __m512i);
            (
                _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                _mm512_castsi512_ps(_mm512_and_si512(v, high)),
            )
        };
        let mut t = 0;
        while t < k {
            // Two blocks a step where there are two (into `a` and `c`), else one.
            let (even, odd) = widen(t);
            for (i, acc) in a.iter_mut().enumerate() {
                let xp = x.add(i * k + t);
                acc[0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp), acc[0]);
                acc[1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp.add(16)), acc[1]);
            }
            if t + 64 <= k {
                let (even, odd) = widen(t + 32);
                for (i, acc) in c.iter_mut().enumerate() {
                    let xp = x.add(i * k + t + 32);
                    acc[0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp), acc[0]);
                    acc[1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp.add(16)), acc[1]);
                }
            }
            t += 64;
        }
        for i in 0..R {
            let s = _mm512_add_ps(
                _mm512_add_ps(a[i][0], a[i][1]),
                _mm512_add_ps(c[i][0], c[i][1]),
            );
            out[i] = _mm512_reduce_add_ps(s);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16_dots256<const R: usize>(row: &[u8], xs: &[f32], k: usize, out: &mut [f32]) {
        assert!(row.len() >= 2 * k && xs.len() >= R * k && k.is_multiple_of(16));
        let (w, x) = (row.as_ptr(), xs.as_ptr());
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut a = [[_mm256_setzero_ps(); 2]; R];
        let mut t = 0;
        while t < k {
            let v = _mm256_loadu_si256(w.add(2 * t) as *const __m256i);
            let even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for (i, acc) in a.iter_mut().enumerate() {
                let xp = x.add(i * k + t);
                acc[0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp), acc[0]);
                acc[1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp.add(8)), acc[1]);
            }
            t += 16;
        }
        for i in 0..R {
            let v = _mm256_add_ps(a[i][0], a[i][1]);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            out[i] = _mm_cvtss_f32(s);
        }
    }

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
            // bf16 → f32: widen each 16-bit value and shift it into the top half.
            RawKind::BF16 => {
                let f = |o: usize| {
                    let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(o) as *const __m256i));
                    _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))
                };
                (f(0), f(32))
            }
            RawKind::Q5_0 | RawKind::Q5_1 => {
                let (d, m, at) = if kind == RawKind::Q5_0 {
                    let d = bcast_f16_512(p);
                    (d, _mm512_mul_ps(d, _mm512_set1_ps(-16.0)), 2)
                } else {
                    (bcast_f16_512(p), bcast_f16_512(p.add(2)), 4)
                };
                // Bit j of qh is weight j's fifth bit: used directly as a lane mask.
                let qh = std::ptr::read_unaligned(p.add(at) as *const u32);
                let q = _mm_loadu_si128(p.add(at + 4) as *const __m128i);
                let lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, nib));
                let hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), nib));
                let sixteen = _mm512_set1_epi32(16);
                let lo = _mm512_mask_or_epi32(lo, qh as u16, lo, sixteen);
                let hi = _mm512_mask_or_epi32(hi, (qh >> 16) as u16, hi, sixteen);
                (
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m),
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m),
                )
            }
            _ => unreachable!("{kind:?} is decoded through codes"),
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
            RawKind::BF16 => rows2_512::<11>(row, row2, xs, k, out, out2),
            RawKind::Q5_0 => rows2_512::<4>(row, row2, xs, k, out, out2),
            RawKind::Q5_1 => rows2_512::<5>(row, row2, xs, k, out, out2),
            _ => unreachable!("no two-row kernel for {kind:?}"),
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
            RawKind::BF16 => rows512::<11>(row, xs, k, out),
            RawKind::Q5_0 => rows512::<4>(row, xs, k, out),
            RawKind::Q5_1 => rows512::<5>(row, xs, k, out),
            RawKind::Q4K => by_rows!(coded_dots512, 6, row, xs, k, out),
            RawKind::Q5K => by_rows!(coded_dots512, 7, row, xs, k, out),
            RawKind::Q6K => by_rows!(coded_dots512, 8, row, xs, k, out),
            RawKind::Q2K => by_rows!(coded_dots512, 9, row, xs, k, out),
            RawKind::Q3K => by_rows!(coded_dots512, 10, row, xs, k, out),
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
            RawKind::BF16 => {
                let f = |o: usize| {
                    let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(o) as *const __m128i));
                    _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
                };
                [f(0), f(16), f(32), f(48)]
            }
            _ => unreachable!("{kind:?} is decoded through codes"),
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
            RawKind::BF16 => rows256::<11>(row, xs, k, out),
            RawKind::Q5_0 => by_rows!(coded_dots256, 4, row, xs, k, out),
            RawKind::Q5_1 => by_rows!(coded_dots256, 5, row, xs, k, out),
            RawKind::Q4K => by_rows!(coded_dots256, 6, row, xs, k, out),
            RawKind::Q5K => by_rows!(coded_dots256, 7, row, xs, k, out),
            RawKind::Q6K => by_rows!(coded_dots256, 8, row, xs, k, out),
            RawKind::Q2K => by_rows!(coded_dots256, 9, row, xs, k, out),
            RawKind::Q3K => by_rows!(coded_dots256, 10, row, xs, k, out),
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
    use candle_core::quantized::{ggml_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Every type with its candle counterpart (the q8 tests use the list too).
    pub(super) const ALL: [(RawKind, GgmlDType); 12] = [
        (RawKind::Q4_0, GgmlDType::Q4_0),
        (RawKind::Q4_1, GgmlDType::Q4_1),
        (RawKind::Q8_0, GgmlDType::Q8_0),
        (RawKind::F16, GgmlDType::F16),
        (RawKind::Q5_0, GgmlDType::Q5_0),
        (RawKind::Q5_1, GgmlDType::Q5_1),
        (RawKind::Q4K, GgmlDType::Q4K),
        (RawKind::Q5K, GgmlDType::Q5K),
        (RawKind::Q6K, GgmlDType::Q6K),
        (RawKind::Q2K, GgmlDType::Q2K),
        (RawKind::Q3K, GgmlDType::Q3K),
        (RawKind::BF16, GgmlDType::BF16),
    ];

    /// Candle's dequantisation of the blocks: the independent reference.
    fn candle_dequant(d: GgmlDType, data: &[u8], n: usize, k: usize) -> Vec<f32> {
        ggml_file::qtensor_from_ggml(d, data, vec![n, k], &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `w` quantised to `d` as a [`RawQ`], with candle's dequantisation of it.
    pub(super) fn raw(kind: RawKind, d: GgmlDType, w: &Tensor) -> (RawQ, Vec<f32>) {
        let q = QTensor::quantize(w, d).unwrap();
        let (n, k) = w.dims2().unwrap();
        let data = q.data().unwrap().to_vec();
        let deq = candle_dequant(d, &data, n, k);
        (RawQ::new(kind, n, k, data).unwrap(), deq)
    }

    fn levels() -> Vec<Level> {
        crate::Isa::all_available()
            .into_iter()
            .map(Level::of)
            .collect()
    }

    /// Every level's `row_dots` on the first weight row against the dequantised reference.
    fn check_row_dots(kind: RawKind, r: &RawQ, deq: &[f32], what: &str) {
        let k = r.k;
        let x: Vec<f32> = (0..5 * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        for level in levels() {
            for rows in [1, 2, 5] {
                let mut got = vec![0f32; rows];
                row_dots(level, kind, r.row(0), &x, k, &mut got);
                for (i, g) in got.iter().enumerate() {
                    let want: f32 = (0..k).map(|t| x[i * k + t] * deq[t]).sum();
                    let scale: f32 = (0..k).map(|t| (x[i * k + t] * deq[t]).abs()).sum();
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + scale),
                        "{kind:?} {what} {level:?} tile {rows} row {i}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_equal_dequantised_matmul() {
        let (n, k) = (70, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for (kind, d) in ALL {
            let (r, deq) = raw(kind, d, &w);
            let mut row = vec![0f32; k];
            r.dequantize_row(3, &mut row);
            for (t, (a, b)) in row.iter().zip(&deq[3 * k..4 * k]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{kind:?} dequantize_row weight {t}: {a} vs {b}"
                );
            }
            check_row_dots(kind, &r, &deq, "quantised randn");
            // 1-8 rows: the register kernels; from PANEL_MIN_ROWS: the panel kernels.
            for isa in crate::Isa::all_available() {
                for m in [1, 3, 8, 11, 17, 23] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                        .collect();
                    let y = r.matmul_isa(&x, m, isa);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f32 = (0..k).map(|t| x[i * k + t] * deq[j * k + t]).sum();
                            let got = y[i * n + j];
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{kind:?} {isa:?} m={m} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Random block bytes, every code and bit pattern the format allows, with the f16 scales
    /// set to extremes: the largest finite f16, a subnormal, negative, zero.
    #[test]
    fn kernels_on_random_blocks_with_extreme_scales() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut byte = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        let k = 512;
        for (kind, d) in ALL {
            if matches!(kind, RawKind::F16 | RawKind::BF16) {
                continue; // random bits would include NaN and infinity
            }
            // Byte offsets of the block's f16 scales.
            let f16_at: &[usize] = match kind {
                RawKind::Q4_0 | RawKind::Q8_0 | RawKind::Q5_0 => &[0],
                RawKind::Q4_1 | RawKind::Q5_1 | RawKind::Q4K | RawKind::Q5K => &[0, 2],
                RawKind::Q6K => &[208],
                RawKind::Q2K => &[80, 82],
                RawKind::Q3K => &[108],
                RawKind::F16 | RawKind::BF16 => unreachable!(),
            };
            for scale in [65504.0f32, -65504.0, 6.0e-8, -0.0137, 0.0, 1.0] {
                let blocks = k / kind.block_elems();
                let mut data: Vec<u8> = (0..blocks * kind.block_bytes()).map(|_| byte()).collect();
                for blk in data.chunks_exact_mut(kind.block_bytes()) {
                    for &at in f16_at {
                        let bits = half::f16::from_f32(scale).to_bits().to_le_bytes();
                        blk[at..at + 2].copy_from_slice(&bits);
                    }
                }
                let deq = candle_dequant(d, &data, 1, k);
                let r = RawQ::new(kind, 1, k, data).unwrap();
                let mut row = vec![0f32; k];
                r.dequantize_row(0, &mut row);
                // The affine forms round once (an FMA) where the reference rounds twice, and
                // `d sc q - dmin m` can cancel: compare against the row's magnitude.
                let row_max = deq.iter().fold(0f32, |a, b| a.max(b.abs()));
                for (t, (a, b)) in row.iter().zip(&deq).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * row_max,
                        "{kind:?} scale {scale} weight {t}: {a} vs candle {b}"
                    );
                }
                check_row_dots(kind, &r, &deq, &format!("scale {scale}"));
            }
        }
    }

    /// Stacked matrices (Q|K|V) share their parts' bytes; every kernel, the panel ones
    /// included (whose 30/32-row panels straddle the parts here), equals the parts run alone.
    #[test]
    fn stacked_matrices_equal_their_parts() {
        let k = 256;
        for (kind, d) in [
            (RawKind::BF16, GgmlDType::BF16),
            (RawKind::Q4K, GgmlDType::Q4K),
        ] {
            let parts: Vec<RawQ> = [37, 13, 41]
                .iter()
                .map(|&n| {
                    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                    raw(kind, d, &w).0
                })
                .collect();
            let stacked = RawQ::concat_rows(&parts.iter().collect::<Vec<_>>()).unwrap();
            let n = stacked.n;
            for isa in crate::Isa::all_available() {
                for m in [1, 5, 17] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 7 % 23) as f32 - 11.0) / 9.0)
                        .collect();
                    let y = stacked.matmul_isa(&x, m, isa);
                    let mut col = 0;
                    for p in &parts {
                        let yp = p.matmul_isa(&x, m, isa);
                        for i in 0..m {
                            for j in 0..p.n {
                                // Rows pair up differently (AVX-512 runs two at a time), which
                                // changes the summation order only.
                                let (a, b) = (y[i * n + col + j], yp[i * p.n + j]);
                                assert!(
                                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                    "{kind:?} {isa:?} m={m}: {a} vs {b}"
                                );
                            }
                        }
                        col += p.n;
                    }
                }
            }
        }
    }
}
