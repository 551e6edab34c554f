//! The decoder's ops on plain `f32` rows, for the single-token decode fast path (one new token
//! for each of a few rows, where the per-op overhead of the tensor path would dominate). Each is
//! the row form of a tensor op of this crate and is tested against it (`tests/rows.rs`).

/// `sum(a * b)` with independent partial sums, so it vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`crate::rms_norm`] of each `w.len()`-long row of `x`, in place.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let rinv = 1.0 / (dot(row, row) / d as f32 + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(x, w)| *x *= rinv * w);
    }
}

/// [`crate::rope`] on `n` heads of `hd` values at one position: the first `2 * cos.len()`
/// values of each head rotate (half-split), the rest pass through (partial rotary).
pub fn rope_row(x: &mut [f32], n: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for v in x.chunks_exact_mut(hd).take(n) {
        for i in 0..half {
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/// Which cached keys one decoding query sees and how its scores are shaped: the row form of
/// [`crate::AttentionMask`] (the query is the newest position, so causality is implied).
#[derive(Clone, Copy, Debug, Default)]
pub struct CachedMask {
    /// Only the last `window` positions (sliding-window layers).
    pub window: Option<usize>,
    /// Gemma 2's score soft cap.
    pub softcap: Option<f32>,
}

/// One query head over cached keys and values (`t` positions of `hd` values each), the last
/// `window` of them when sliding: `out = softmax(s) . v` with `s_j = scale q.k_j` (soft-capped
/// to `c tanh(s_j / c)` with a cap), added into `out`.
pub fn attend_cached(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    mask: CachedMask,
    out: &mut [f32],
) {
    let hd = q.len();
    let t_all = keys.len() / hd;
    let first = mask.window.map_or(0, |w| t_all.saturating_sub(w));
    let mut p: Vec<f32> = (first..t_all)
        .map(|t| dot(q, &keys[t * hd..(t + 1) * hd]) * scale)
        .collect();
    if let Some(cap) = mask.softcap {
        for s in p.iter_mut() {
            *s = cap * (*s / cap).tanh();
        }
    }
    let mx = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0f32;
    for s in p.iter_mut() {
        *s = (*s - mx).exp();
        z += *s;
    }
    for (t, s) in (first..t_all).zip(&p) {
        let w = s / z;
        for (o, v) in out.iter_mut().zip(&values[t * hd..(t + 1) * hd]) {
            *o += w * v;
        }
    }
}

/// [`crate::swiglu`]: `silu(gate) * up`.
pub fn swiglu_rows(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// [`crate::gelu_tanh_gate`]: `gelu_tanh(gate) * up`.
pub fn gelu_tanh_gate_rows(gate: &[f32], up: &[f32]) -> Vec<f32> {
    const C: f32 = 0.797_884_6;
    gate.iter()
        .zip(up)
        .map(|(&g, u)| 0.5 * g * (1.0 + (C * (g + 0.044_715 * g * g * g)).tanh()) * u)
        .collect()
}

/// Runs `f` on the values of `t` (any shape, read in row-major order) as `f32`: borrowed
/// straight from the storage of a contiguous f32 CPU tensor (norm weights, biases, a RoPE table
/// row), so the decode loop copies nothing; converted into a temporary otherwise.
pub fn with_values<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    Ok(f(&v))
}
