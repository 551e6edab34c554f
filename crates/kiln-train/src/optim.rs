//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay, parameter groups by name,
//! and state that is saved in checkpoints (candle-nn's AdamW keeps its moments private, so
//! exact resume is impossible with it).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Tensor, Var};
use kiln_kernels::{adamw_step, AdamWParams};
use kiln_model::Params;

use crate::{OptimConfig, TrainError};

pub struct AdamW {
    cfg: OptimConfig,
    /// Per parameter: first and second moments, and whether weight decay applies.
    state: BTreeMap<String, Moments>,
    /// Optimizer steps taken (bias correction uses `step + 1` for the next one).
    pub step: u64,
}

struct Moments {
    m: Var,
    v: Var,
    decay: bool,
}

/// nanoGPT's rule: matrices decay; norms (1-D) and the embedding table do not, unless asked.
pub fn decays(name: &str, shape: &[usize], cfg: &OptimConfig) -> bool {
    cfg.decay_norms_and_embeddings || (shape.len() >= 2 && name != "tok_embeddings.weight")
}

impl AdamW {
    pub fn new(params: &Params, cfg: &OptimConfig) -> Result<Self, TrainError> {
        let mut state = BTreeMap::new();
        for (name, var) in params.vars() {
            state.insert(
                name.clone(),
                Moments {
                    m: Var::zeros(var.shape(), var.dtype(), var.device())?,
                    v: Var::zeros(var.shape(), var.dtype(), var.device())?,
                    decay: decays(name, var.dims(), cfg),
                },
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            state,
            step: 0,
        })
    }

    /// One update with learning rate `lr`; every gradient is multiplied by `grad_scale` first
    /// (the clipping coefficient), fused into the same pass.
    pub fn step(
        &mut self,
        params: &Params,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), TrainError> {
        self.step += 1;
        for (name, var) in params.vars() {
            let s = &self.state[name];
            let Some(g) = grads.get(name) else {
                continue; // a parameter the loss does not touch (e.g. unused positions)
            };
            let hp = AdamWParams {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if s.decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            adamw_step(var, g, &s.m, &s.v, &hp)?;
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut map = HashMap::new();
        for (name, s) in &self.state {
            map.insert(format!("m.{name}"), s.m.as_tensor().clone());
            map.insert(format!("v.{name}"), s.v.as_tensor().clone());
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, step: u64) -> Result<(), TrainError> {
        let device = self.state.values().next().map(|s| s.m.device().clone());
        let Some(device) = device else { return Ok(()) };
        let loaded = candle_core::safetensors::load(path, &device)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        for (name, s) in &self.state {
            for (prefix, var) in [("m", &s.m), ("v", &s.v)] {
                let key = format!("{prefix}.{name}");
                let t = loaded.get(&key).ok_or_else(|| {
                    TrainError::Checkpoint(format!(
                        "{}: missing optimizer tensor {key:?}",
                        path.display()
                    ))
                })?;
                if t.dims() != var.dims() {
                    return Err(TrainError::Checkpoint(format!(
                        "{}: optimizer tensor {key:?} has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        var.dims()
                    )));
                }
                var.set(t)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup to `lr`, then cosine decay to `min_lr` at `total_steps` (step is 0-based).
pub fn lr_at(step: u64, total_steps: u64, cfg: &OptimConfig) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let decay_steps = total_steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = ((step - cfg.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    cfg.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (cfg.lr - cfg.min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let cfg = OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            ..Default::default()
        };
        assert!((lr_at(0, 100, &cfg) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, &cfg) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, &cfg) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, &cfg) - 0.55).abs() < 1e-12); // halfway through the cosine
        assert!((lr_at(100, 100, &cfg) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, 100, &cfg) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn decay_groups() {
        let cfg = OptimConfig::default();
        assert!(decays("layers.0.attention.wq.weight", &[4, 4], &cfg));
        assert!(!decays("layers.0.ffn_norm.weight", &[4], &cfg));
        assert!(!decays("tok_embeddings.weight", &[4, 4], &cfg));
        assert!(decays("output.weight", &[4, 4], &cfg));
    }
}
