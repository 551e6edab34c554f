//! RoPE cos/sin tables for a model config: the plain tables of `kiln_kernels::rope_tables`, or,
//! for a checkpoint with `rope_scaling`, tables built from its rescaled inverse frequencies.

use candle_core::{DType, Device, Tensor};
use kiln_kernels as k;

use crate::{ModelConfig, ModelError};

/// `(cos, sin)`, each `(max_seq_len, head_dim / 2)`, in `dtype` on `device`.
pub(crate) fn tables(
    cfg: &ModelConfig,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor), ModelError> {
    let hd = cfg.head_dim();
    let Some(scaling) = &cfg.rope_scaling else {
        return Ok(k::rope_tables(
            hd,
            cfg.max_seq_len,
            cfg.rope_theta,
            device,
            dtype,
        )?);
    };
    let half = hd / 2;
    let mut inv_freq: Vec<f64> = (0..half)
        .map(|i| cfg.rope_theta.powf(-((2 * i) as f64) / hd as f64))
        .collect();
    scaling.apply(&mut inv_freq);
    let n = cfg.max_seq_len;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv_freq {
            let a = p as f64 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let mk = |v: Vec<f64>| -> Result<Tensor, ModelError> {
        Ok(Tensor::from_vec(v, (n, half), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    Ok((mk(cos)?, mk(sin)?))
}
