//! Quantisers of kiln's own where candle's differ from llama.cpp's: Q6_K as llama.cpp's
//! reference `quantize_row_q6_K_ref` computes it (candle's port predates llama.cpp's scale
//! search and gives a ~4% larger error on SmolLM2), so that `kiln export` writes the bytes
//! `llama-quantize` writes for the same weights.

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes per Q6_K super-block: 128 low-nibble bytes, 64 high-bit bytes, 16 scales, f16 d.
pub const Q6K_BYTES: usize = 210;
/// Below this a group counts as all zeros (llama.cpp's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, the way llama.cpp's `nearest_int` does it (adding 1.5 *
/// 2^23 and reading the mantissa), for |v| < 2^22.
#[inline]
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The scale of `x` on signed levels `-nmax..nmax-1` (stored in `levels` offset by `nmax`)
/// that minimises the x²-weighted squared error: the plain absmax scale, then 18 nearby
/// scales `-(nmax ± 0.1 i) / max`, keeping whichever fits best.
fn levels_and_scale(x: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |v: f32, iscale: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Sums of w x l and w l² with w = x², in llama.cpp's order.
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = level(v, iscale) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = (level(v, iscale) + nmax) as i8;
    }
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = (level(v, iscale) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `x` (a multiple of 256 long) as Q6_K super-blocks: per 16 weights a scale fitted by
/// [`levels_and_scale`] on 6-bit levels, the 16 scales then stored as i8 times one f16 `d`,
/// and the weights re-rounded against the stored scales.
pub fn quantize_q6k(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK_K),
        "Q6_K needs whole 256-weight blocks"
    );
    let mut out = Vec::with_capacity(x.len() / QK_K * Q6K_BYTES);
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    for block in x.chunks_exact(QK_K) {
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for (ib, s) in scales.iter_mut().enumerate() {
            let g = 16 * ib..16 * ib + 16;
            *s = levels_and_scale(&block[g.clone()], 32, &mut levels[g]);
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = *s;
            }
        }
        let mut blk = [0u8; Q6K_BYTES];
        if max_abs_scale < GROUP_MAX_EPS {
            out.extend_from_slice(&blk); // d = 0: an all-zero block
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = half::f16::from_f32(1.0 / iscale);
        blk[208..210].copy_from_slice(&d.to_bits().to_le_bytes());
        let mut q_scales = [0i8; QK_K / 16];
        for (q, s) in q_scales.iter_mut().zip(&scales) {
            *q = nearest_int(iscale * s).min(127) as i8;
            // (as i8 keeps the low byte, as llama.cpp's store into an int8_t does)
        }
        for (ib, q) in q_scales.iter().enumerate() {
            blk[192 + ib] = *q as u8;
        }
        for (j, q) in q_scales.iter().enumerate() {
            let dj = d.to_f32() * *q as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(block[16 * j + ii] / dj).clamp(-32, 31);
                levels[16 * j + ii] = (l + 32) as i8;
            }
        }
        // Halves of 128: low nibbles of weights l and l + 64 share ql[l], of l + 32 and l + 96
        // share ql[l + 32]; the four weights' top two bits share qh[l].
        let lv = |i: usize| levels[i] as u8;
        for half in 0..2 {
            let (j, ql, qh) = (128 * half, 64 * half, 128 + 32 * half);
            for l in 0..32 {
                let (q1, q2, q3, q4) = (lv(j + l), lv(j + l + 32), lv(j + l + 64), lv(j + l + 96));
                blk[ql + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                blk[ql + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                blk[qh + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        out.extend_from_slice(&blk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_kernels::qkernels::{RawKind, RawQ};

    #[test]
    fn q6k_round_trips_within_its_step_and_reads_as_candle_reads_it() {
        let x: Vec<f32> = (0..2 * QK_K)
            .map(|i| {
                ((i * 7919 % 1009) as f32 - 504.0) / 300.0 * if i % 97 == 0 { 8.0 } else { 1.0 }
            })
            .collect();
        let bytes = quantize_q6k(&x);
        assert_eq!(bytes.len(), 2 * Q6K_BYTES);
        let back = RawQ::new(RawKind::Q6K, 1, x.len(), bytes.clone())
            .unwrap()
            .dequantize();
        let candle = candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_core::quantized::GgmlDType::Q6K,
            &bytes,
            vec![x.len()],
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .dequantize(&candle_core::Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert_eq!(back, candle);
        // Each 16-weight group is within half a level of its own scale (6-bit levels, so at
        // most ~1/60 of the group's largest weight; the i8 scales add a little).
        for (g, (xs, ys)) in x.chunks(16).zip(back.chunks(16)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = xs
                .iter()
                .zip(ys)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(err <= amax / 40.0, "group {g}: error {err}, max {amax}");
        }
        assert_eq!(quantize_q6k(&[0.0; QK_K]), vec![0u8; Q6K_BYTES]);
    }
}
