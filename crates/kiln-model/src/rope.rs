//! RoPE cos/sin tables for a model config: `angle[p, i] = p * inv_freq[i]` with
//! `inv_freq[i] = theta^(-2i / rotary_dim)`, rescaled by the checkpoint's `rope_scaling` (and
//! cos/sin multiplied by LongRoPE's or YaRN's attention factor).
//! Sliding layers of Gemma 3 use their own base (`rope_local_theta`) and no scaling.

use candle_core::{DType, Device, Tensor};

use crate::config::LayerRope;
use crate::{ModelConfig, ModelError, RopeScaling};

/// `(cos, sin)`, each `(max_seq_len, rotary_dim / 2)`.
#[derive(Clone)]
pub(crate) struct RopeTables {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

/// The tables a model needs: global (every model) and local (only with `rope_local_theta`).
#[derive(Clone)]
pub(crate) struct ModelRope {
    pub(crate) global: RopeTables,
    pub(crate) local: Option<RopeTables>,
}

impl ModelRope {
    pub(crate) fn new(
        cfg: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let global = tables(
            cfg,
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
            device,
            dtype,
        )?;
        let local = match cfg.rope_local_theta {
            Some(theta) => Some(tables(cfg, theta, None, device, dtype)?),
            None => None,
        };
        Ok(Self { global, local })
    }

    /// The tables of a layer, None for a layer without RoPE.
    pub(crate) fn for_layer(&self, which: LayerRope) -> Option<&RopeTables> {
        match which {
            LayerRope::Global => Some(&self.global),
            LayerRope::Local => self.local.as_ref(),
            LayerRope::None => None,
        }
    }
}

fn tables(
    cfg: &ModelConfig,
    theta: f64,
    scaling: Option<&RopeScaling>,
    device: &Device,
    dtype: DType,
) -> Result<RopeTables, ModelError> {
    let rot = cfg.rotary_dim();
    let half = rot / 2;
    let base: Vec<f64> = (0..half)
        .map(|i| theta.powf(-((2 * i) as f64) / rot as f64))
        .collect();
    let mut inv_freq = base.clone();
    // LongRoPE switches to its long factors past the original context, and scales both.
    let mut long = None;
    let mut magnitude = 1.0;
    if let Some(s) = scaling {
        s.apply(&mut inv_freq, theta);
        magnitude = s.magnitude();
        if let RopeScaling::Longrope {
            long_factor,
            original_max_position_embeddings,
            ..
        } = s
        {
            let freqs: Vec<f64> = base.iter().zip(long_factor).map(|(f, l)| f / l).collect();
            long = Some((*original_max_position_embeddings, freqs));
        }
    }
    let n = cfg.max_seq_len;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        let freqs = match &long {
            Some((original, freqs)) if p >= *original => freqs,
            _ => &inv_freq,
        };
        for &f in freqs {
            let a = p as f64 * f;
            cos.push(a.cos() * magnitude);
            sin.push(a.sin() * magnitude);
        }
    }
    let mk = |v: Vec<f64>| -> Result<Tensor, ModelError> {
        Ok(Tensor::from_vec(v, (n, half), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    Ok(RopeTables {
        cos: mk(cos)?,
        sin: mk(sin)?,
    })
}
