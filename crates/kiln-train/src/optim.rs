//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay, parameter groups by name,
//! and state that is saved in checkpoints (candle-nn's AdamW keeps its moments private, so
//! exact resume is impossible with it).
//!
//! Flat storage: the first and second moments are one buffer each, with the layout of the
//! gradients (the trainable tensors, in the parameters' buffer order), and the optimizer owns
//! the gradient buffer of that layout. A step runs the fused AdamW kernel once per contiguous
//! range of equal weight decay, over slices of the flat parameter, gradient, m and v buffers:
//! with kiln's parameter order ([`kiln_model::flat_group`]) that is two calls (decay, no decay)
//! for a full model and one for LoRA adapters, whatever the number of tensors.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use kiln_kernels::{adamw_step, AdamWParams};
use kiln_model::{FlatLayout, Grads, Llama, Params};

use crate::{OptimConfig, TrainError};

pub struct AdamW {
    cfg: OptimConfig,
    /// The layout of the gradients, m and v: the tensors this optimizer updates.
    layout: Arc<FlatLayout>,
    m: Tensor,
    v: Tensor,
    /// Per layout entry: whether weight decay applies.
    decay: Vec<bool>,
    /// The gradient buffer, filled by the backward of each step ([`AdamW::grads_mut`]).
    grads: Grads,
    /// Optimizer steps taken (bias correction uses `step + 1` for the next one).
    pub step: u64,
    /// ZeRO-1: the element range of the gradient buffer this rank updates; m and v hold that
    /// range only. `None`: every element (m and v in the gradients' layout).
    shard: Option<Range<usize>>,
}

/// nanoGPT's rule: matrices decay; norms (1-D) and the embedding table do not, unless asked.
pub fn decays(name: &str, shape: &[usize], cfg: &OptimConfig) -> bool {
    cfg.decay_norms_and_embeddings || (shape.len() >= 2 && name != "tok_embeddings.weight")
}

/// One fused AdamW call: matching element ranges of the flat parameter, gradient and state
/// (m, v) buffers, all with the same weight decay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRange {
    pub decay: bool,
    pub param: Range<usize>,
    pub grad: Range<usize>,
    pub state: Range<usize>,
}

impl AdamW {
    /// An optimizer over every tensor of `params`.
    pub fn new(params: &Params, cfg: &OptimConfig) -> Result<Self, TrainError> {
        Self::with_layout(params, params.layout().clone(), cfg)
    }

    /// An optimizer over what `model` trains (its gradient layout): everything for a full
    /// model, the adapters alone under LoRA (frozen tensors get no state).
    pub fn for_model(
        model: &Llama,
        params: &Params,
        cfg: &OptimConfig,
    ) -> Result<Self, TrainError> {
        Self::with_layout(params, Arc::new(model.grad_layout(params)?), cfg)
    }

    /// An optimizer over the tensors of `layout` (each one a tensor of `params` with the same
    /// shape).
    pub fn with_layout(
        params: &Params,
        layout: Arc<FlatLayout>,
        cfg: &OptimConfig,
    ) -> Result<Self, TrainError> {
        for e in layout.entries() {
            match params.layout().entry(&e.name) {
                Some(p) if p.shape == e.shape => {}
                _ => {
                    return Err(TrainError::Config(format!(
                        "optimizer layout: {:?} {:?} is not a parameter",
                        e.name, e.shape
                    )))
                }
            }
        }
        let flat = params.flat();
        let (dtype, device) = (flat.dtype(), flat.device());
        Ok(Self {
            cfg: cfg.clone(),
            m: Tensor::zeros(layout.total(), dtype, device)?,
            v: Tensor::zeros(layout.total(), dtype, device)?,
            decay: layout
                .entries()
                .iter()
                .map(|e| decays(&e.name, &e.shape, cfg))
                .collect(),
            grads: Grads::new(layout.clone(), dtype, device)?,
            layout,
            step: 0,
            shard: None,
        })
    }

    /// ZeRO-1: from now on this optimizer keeps m and v for elements `range` of the gradient
    /// buffer only, and [`AdamW::step`] updates the parameters of that range alone (the caller
    /// has reduced the gradients of the range and gathers the parameters afterwards). Call
    /// before the first step; the state is reset to zeros.
    pub fn shard_to(&mut self, range: Range<usize>) -> Result<(), TrainError> {
        if range.end > self.layout.total() {
            return Err(TrainError::Config(format!(
                "optimizer shard {range:?} is outside the {} trainable elements",
                self.layout.total()
            )));
        }
        let (dtype, device) = (self.m.dtype(), self.m.device().clone());
        self.m = Tensor::zeros(range.len(), dtype, &device)?;
        self.v = Tensor::zeros(range.len(), dtype, &device)?;
        self.shard = Some(range);
        Ok(())
    }

    /// The elements of the gradient buffer whose optimizer state this process holds.
    pub fn state_range(&self) -> Range<usize> {
        self.shard.clone().unwrap_or(0..self.layout.total())
    }

    /// Bytes of optimizer state (m and v) this process holds.
    pub fn state_bytes(&self) -> usize {
        2 * self.state_range().len() * self.m.dtype().size_in_bytes()
    }

    /// The layout of the gradients and of m and v.
    pub fn layout(&self) -> &Arc<FlatLayout> {
        &self.layout
    }

    /// The gradient buffer [`AdamW::step`] reads.
    pub fn grads(&self) -> &Grads {
        &self.grads
    }

    /// The gradient buffer, for the backward to fill (zero it first: [`Grads::zero`]).
    pub fn grads_mut(&mut self) -> &mut Grads {
        &mut self.grads
    }

    /// The contiguous ranges one step over `grads` updates, one fused kernel call each: maximal
    /// runs of live gradient entries with the same weight decay that are consecutive in the
    /// gradient, state and parameter buffers alike.
    pub fn update_ranges(
        &self,
        params: &Params,
        grads: &Grads,
    ) -> Result<Vec<UpdateRange>, TrainError> {
        let mut out: Vec<UpdateRange> = Vec::new();
        for (i, g) in grads.layout().entries().iter().enumerate() {
            if !grads.is_live(i) {
                continue; // a parameter the loss does not touch (e.g. unused positions)
            }
            let missing = |what: &str| {
                TrainError::Config(format!("the gradient of {:?} has no {what}", g.name))
            };
            let si = self
                .layout
                .position(&g.name)
                .ok_or_else(|| missing("optimizer state"))?;
            let s = &self.layout.entries()[si];
            let p = params
                .layout()
                .entry(&g.name)
                .ok_or_else(|| missing("parameter"))?;
            if s.shape != g.shape || p.shape != g.shape {
                return Err(TrainError::Config(format!(
                    "the gradient of {:?} has shape {:?}; parameter {:?}, state {:?}",
                    g.name, g.shape, p.shape, s.shape
                )));
            }
            let decay = self.decay[si];
            match out.last_mut() {
                Some(r)
                    if r.decay == decay
                        && r.grad.end == g.offset
                        && r.state.end == s.offset
                        && r.param.end == p.offset =>
                {
                    r.grad.end += g.numel;
                    r.state.end += g.numel;
                    r.param.end += g.numel;
                }
                _ => out.push(UpdateRange {
                    decay,
                    param: p.range(),
                    grad: g.range(),
                    state: s.range(),
                }),
            }
        }
        Ok(out)
    }

    /// One update with learning rate `lr` from the optimizer's own gradient buffer; every
    /// gradient is multiplied by `grad_scale` first (the clipping coefficient), fused into the
    /// same pass.
    pub fn step(&mut self, params: &Params, lr: f64, grad_scale: f64) -> Result<(), TrainError> {
        self.step += 1;
        self.apply(params, &self.grads, lr, grad_scale)
    }

    /// [`AdamW::step`] from another gradient buffer (e.g. candle autograd's,
    /// [`Params::autograd_grads`]); its entries are matched to the state by name.
    pub fn step_with(
        &mut self,
        params: &Params,
        grads: &Grads,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), TrainError> {
        self.step += 1;
        self.apply(params, grads, lr, grad_scale)
    }

    fn apply(
        &self,
        params: &Params,
        grads: &Grads,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), TrainError> {
        let flat = params.flat().as_detached_tensor();
        let shard = self.state_range();
        for r in self.update_ranges(params, grads)? {
            // Under ZeRO-1 only the part of the range inside this rank's shard.
            let start = r.grad.start.max(shard.start);
            let end = r.grad.end.min(shard.end);
            if start >= end {
                continue;
            }
            let skip = start - r.grad.start;
            let state_start = r.state.start + skip - shard.start;
            let hp = AdamWParams {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if r.decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            let n = end - start;
            adamw_step(
                &flat.narrow(0, r.param.start + skip, n)?,
                &grads.flat().narrow(0, start, n)?,
                &self.m.narrow(0, state_start, n)?,
                &self.v.narrow(0, state_start, n)?,
                &hp,
            )?;
        }
        Ok(())
    }

    /// The moments of elements `range` of the gradient layout (inside [`AdamW::state_range`])
    /// as pieces `m.NAME@START` / `v.NAME@START` (see `kiln_model::sharded`): what one rank
    /// writes into a sharded checkpoint.
    pub fn state_pieces(&self, range: Range<usize>) -> Result<Vec<(String, Tensor)>, TrainError> {
        let held = self.state_range();
        if range.start < held.start || range.end > held.end {
            return Err(TrainError::Checkpoint(format!(
                "optimizer pieces {range:?} outside the state held here ({held:?})"
            )));
        }
        let mut out = Vec::new();
        for e in self.layout.entries() {
            let (start, end) = (
                e.offset.max(range.start),
                (e.offset + e.numel).min(range.end),
            );
            if start >= end {
                continue;
            }
            for (prefix, buf) in [("m", &self.m), ("v", &self.v)] {
                out.push((
                    kiln_model::sharded::piece_key(
                        &format!("{prefix}.{}", e.name),
                        start - e.offset,
                    ),
                    buf.narrow(0, start - held.start, end - start)?.copy()?,
                ));
            }
        }
        Ok(out)
    }

    /// The moments of `name`: views into the m and v buffers.
    fn moments(&self, e: &kiln_model::FlatEntry) -> Result<(Tensor, Tensor), TrainError> {
        let view = |t: &Tensor| -> Result<Tensor, TrainError> {
            Ok(t.narrow(0, e.offset, e.numel)?.reshape(e.shape.clone())?)
        };
        Ok((view(&self.m)?, view(&self.v)?))
    }

    /// Writes the moments as `m.<name>` / `v.<name>` tensors (the format of per-tensor state,
    /// so checkpoints from before flat storage still load).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        if self.shard.is_some() {
            return Err(TrainError::Checkpoint(
                "a ZeRO-1 optimizer holds a shard: save it as pieces (state_pieces)".into(),
            ));
        }
        let mut map = HashMap::new();
        for e in self.layout.entries() {
            let (m, v) = self.moments(e)?;
            map.insert(format!("m.{}", e.name), m);
            map.insert(format!("v.{}", e.name), v);
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, step: u64) -> Result<(), TrainError> {
        if self.layout.is_empty() {
            return Ok(());
        }
        let loaded = candle_core::safetensors::load(path, self.m.device())
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        self.load_tensors(&loaded, &path.display().to_string(), step)
    }

    /// Restores m and v from whole tensors `m.NAME` / `v.NAME` (a checkpoint file, or the
    /// pieces of a sharded one assembled), keeping only the shard under ZeRO-1.
    pub fn load_tensors(
        &mut self,
        loaded: &HashMap<String, Tensor>,
        source: &str,
        step: u64,
    ) -> Result<(), TrainError> {
        let held = self.state_range();
        for e in self.layout.entries() {
            let (start, end) = (e.offset.max(held.start), (e.offset + e.numel).min(held.end));
            if start >= end {
                continue;
            }
            for (prefix, buf) in [("m", &self.m), ("v", &self.v)] {
                let key = format!("{prefix}.{}", e.name);
                let t = loaded.get(&key).ok_or_else(|| {
                    TrainError::Checkpoint(format!("{source}: missing optimizer tensor {key:?}"))
                })?;
                if t.dims() != e.shape.as_slice() {
                    return Err(TrainError::Checkpoint(format!(
                        "{source}: optimizer tensor {key:?} has shape {:?}, expected {:?}",
                        t.dims(),
                        e.shape
                    )));
                }
                let t = t.to_dtype(buf.dtype())?.flatten_all()?;
                let part = t.narrow(0, start - e.offset, end - start)?.contiguous()?;
                buf.slice_set(&part, 0, start - held.start)?;
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
