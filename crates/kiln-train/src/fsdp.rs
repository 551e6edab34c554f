//! Fully sharded data parallelism (FSDP, "full shard"): every rank keeps only its shard of
//! each unit's parameters, gradients and AdamW moments. A unit is one decoder block, the
//! embedding, or the head (final norm and LM head); a tied embedding is also the head, so it
//! and the final norm make one unit. A unit's parameters are all-gathered into an unsharded
//! scratch buffer just before they are read (each block before its forward and again before
//! its backward), and its gradients are reduce-scattered into the rank's gradient shard as
//! soon as they are complete.
//!
//! The model is built once over one parameter workspace, the size of the largest unit: every
//! unit's tensors are views of it, and it holds whichever unit was gathered last. Each unit is
//! gathered right before it is read (the embedding before the lookup, the head before the
//! final norm, block `i` before its forward and before its backward), so a reader always finds
//! its own weights. Gradients share one workspace the same way: the head's (and final norm's)
//! are reduced before the blocks' backward writes theirs, and the embedding's after it. A
//! reduce-scatter's output goes into the parameter workspace, whose unit is no longer needed
//! at that point. Memory per rank: `4 P / N` (parameters, gradients, m, v) plus the two
//! workspaces: see [`FsdpMemory`].
//!
//! With `dist.param_dtype = "bf16"` each rank rounds its f32 shard to bf16 before the gather,
//! the ranks gather bf16 (half the bytes) into a bf16 staging buffer, and it is widened into the
//! f32 workspace the kernels read: the forward and backward see bf16 weights, while the master
//! shards, the gradients, their reduce-scatter and AdamW stay f32 (PyTorch FSDP's
//! `MixedPrecision(param_dtype=bfloat16, reduce_dtype=float32)`). Activations stay f32: kiln's
//! CPU kernels compute in f32.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use kiln_dist::{shard_range, shard_sizes, Collectives};
use kiln_kernels::{adamw_step, AdamWParams};
use kiln_model::sharded::{piece_key, write_pieces, ShardManifest};
use kiln_model::{
    FlatEntry, FlatLayout, Grads, LayerHooks, Llama, ModelConfig, ModelError, Params, SplitMix64,
    TokenBatch,
};

use crate::optim::decays;
use crate::trainer::StepResult;
use crate::{OptimConfig, ParamDtype, TrainError};

/// One sharded unit: its tensors packed in a flat layout, and this rank's range of it.
struct Unit {
    layout: Arc<FlatLayout>,
    chunks: Vec<usize>,
    /// This rank's elements of the unit.
    mine: Range<usize>,
    /// Where they sit in the rank's shard buffers.
    local: usize,
}

/// Bytes of parameters, gradients and optimizer state one rank holds under FSDP, next to one
/// process's (parameters + gradients + m + v of the whole model, f32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FsdpMemory {
    /// Shards: parameters, gradients, m and v.
    pub sharded_bytes: usize,
    /// Unsharded working buffers: parameters and gradients of the largest unit (embedding,
    /// head or block), and the bf16 staging buffer of `dist.param_dtype = "bf16"`.
    pub scratch_bytes: usize,
    pub single_process_bytes: usize,
}

impl FsdpMemory {
    pub fn total_bytes(&self) -> usize {
        self.sharded_bytes + self.scratch_bytes
    }

    /// This rank's total over one process's.
    pub fn ratio(&self) -> f64 {
        self.total_bytes() as f64 / self.single_process_bytes as f64
    }
}

/// The shards and scratch buffers (tensors are written in place, so `&self` suffices).
struct Core {
    comm: Rc<dyn Collectives>,
    /// In the order of [`Units`].
    units: Vec<Unit>,
    map: Units,
    params: Tensor,
    grads: Tensor,
    m: Tensor,
    v: Tensor,
    /// The gathered parameters of one unit, the largest unit's size.
    workspace: Tensor,
    /// Under `param_dtype = "bf16"`: the gathered bf16 parameters, widened into `workspace`.
    staging_bf16: Option<Tensor>,
    /// Seconds spent in collectives since the step began.
    comm_s: std::cell::Cell<f64>,
}

pub struct Fsdp {
    core: Core,
    cfg: ModelConfig,
    optim: OptimConfig,
    /// The final norm's and the LM head's gradients (and a tied embedding's).
    head_grads: Grads,
    /// An untied embedding's gradients.
    embed_grads: Option<Grads>,
    /// One per layer. All of them share one buffer with the head's and the embedding's.
    block_grads: Vec<Grads>,
    /// The model over the scratch buffers.
    model: Llama,
    /// Optimizer steps taken.
    pub step: u64,
    /// Every parameter name with its shape, in kiln's order (for checkpoints).
    names: Vec<(String, Vec<usize>)>,
}

/// Where each unit sits in [`Core::units`]: the embedding, the head (the same unit when the
/// embedding is tied: it is the head's weight too), then one unit per block.
#[derive(Debug, Clone, Copy)]
struct Units {
    embed: usize,
    head: usize,
    first_block: usize,
}

impl Units {
    fn for_model(cfg: &ModelConfig) -> Self {
        if cfg.tie_embeddings {
            Self {
                embed: 0,
                head: 0,
                first_block: 1,
            }
        } else {
            Self {
                embed: 0,
                head: 1,
                first_block: 2,
            }
        }
    }

    fn split(&self) -> bool {
        self.embed != self.head
    }

    fn of(&self, name: &str) -> usize {
        match name.strip_prefix("layers.") {
            Some(rest) => {
                self.first_block
                    + rest
                        .split('.')
                        .next()
                        .and_then(|i| i.parse::<usize>().ok())
                        .expect("invariant: layer names are layers.<i>.*")
            }
            None if name == "tok_embeddings.weight" => self.embed,
            None => self.head,
        }
    }
}

fn hook_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Hook(e.to_string())
}

impl Fsdp {
    /// Shards `full` (the same initial weights on every rank) and builds the model over the
    /// scratch buffers; the model computes with parameters gathered in `param_dtype`. `full`
    /// can be dropped afterwards.
    /// See [`Llama::set_activation_checkpointing`].
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.model.set_activation_checkpointing(on);
    }

    /// See [`Llama::set_precision`].
    pub fn set_precision(&mut self, precision: kiln_model::Precision) -> kiln_model::Precision {
        self.model.set_precision(precision)
    }

    pub fn new(
        cfg: &ModelConfig,
        full: &Params,
        optim: &OptimConfig,
        param_dtype: ParamDtype,
        comm: Rc<dyn Collectives>,
    ) -> Result<Self, TrainError> {
        if full
            .layout()
            .entries()
            .iter()
            .any(|e| kiln_model::is_lora_name(&e.name))
        {
            return Err(TrainError::Config(
                "dist.strategy = \"fsdp\" trains every parameter; LoRA adapters are small \
                 enough to replicate: use \"ddp\""
                    .into(),
            ));
        }
        let (rank, world) = (comm.rank(), comm.world_size());
        let device = full.flat().device().clone();
        let names: Vec<(String, Vec<usize>)> = full
            .layout()
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect();
        let map = Units::for_model(cfg);
        let mut per_unit: Vec<Vec<(String, Vec<usize>)>> =
            vec![Vec::new(); map.first_block + cfg.n_layers];
        for (n, s) in &names {
            per_unit[map.of(n)].push((n.clone(), s.clone()));
        }
        let mut units = Vec::new();
        let mut local = 0;
        for tensors in per_unit {
            let layout = Arc::new(FlatLayout::new(tensors)?);
            let chunks = shard_sizes(layout.total(), world);
            let mine = shard_range(layout.total(), rank, world);
            units.push(Unit {
                layout,
                chunks,
                mine: mine.clone(),
                local,
            });
            local += mine.len();
        }
        let zeros = |n: usize| Tensor::zeros(n, DType::F32, &device);
        let (params, grads, m, v) = (zeros(local)?, zeros(local)?, zeros(local)?, zeros(local)?);
        let largest = units.iter().map(|u| u.layout.total()).max().unwrap_or(0);
        let workspace = zeros(largest)?;
        let staging_bf16 = match param_dtype {
            ParamDtype::F32 => None,
            ParamDtype::Bf16 => Some(Tensor::zeros(largest, DType::BF16, &device)?),
        };
        // Gradients: one buffer too, every unit's layout over its start.
        let grad_workspace = zeros(largest)?;
        let over = |u: &Unit| {
            let n = u.layout.total();
            Grads::over_buffer(u.layout.clone(), grad_workspace.narrow(0, 0, n)?)
        };
        let head_grads = over(&units[map.head])?;
        let embed_grads = map.split().then(|| over(&units[map.embed])).transpose()?;
        let block_grads = units[map.first_block..]
            .iter()
            .map(over)
            .collect::<Result<Vec<_>, _>>()?;
        let model = {
            let layouts: Vec<Arc<FlatLayout>> = units.iter().map(|u| u.layout.clone()).collect();
            let buf = workspace.clone();
            Llama::over_tensors(cfg, move |name| {
                // Every block has the same offsets: layer 0's names locate them.
                let key = match name.strip_prefix("layers.") {
                    None => name.to_string(),
                    Some(rest) => {
                        format!("layers.0.{}", rest.split_once('.').map_or("", |(_, t)| t))
                    }
                };
                let layout = &layouts[map.of(&key)];
                let e = layout
                    .entry(&key)
                    .ok_or_else(|| ModelError::Input(format!("no parameter {name:?}")))?;
                Ok(buf.narrow(0, e.offset, e.numel)?.reshape(e.shape.clone())?)
            })?
        };
        let mut fsdp = Self {
            core: Core {
                comm,
                units,
                map,
                params,
                grads,
                m,
                v,
                workspace,
                staging_bf16,
                comm_s: std::cell::Cell::new(0.0),
            },
            cfg: cfg.clone(),
            optim: optim.clone(),
            head_grads,
            embed_grads,
            block_grads,
            model,
            step: 0,
            names,
        };
        fsdp.load_params(full)?;
        Ok(fsdp)
    }

    /// Copies this rank's shards out of whole parameters (initialisation, resume).
    pub fn load_params(&mut self, full: &Params) -> Result<(), TrainError> {
        self.core.fill_from(&self.core.params, |name| {
            full.tensor(name).map_err(Into::into)
        })
    }

    /// Restores m and v from whole tensors `m.NAME` / `v.NAME`.
    pub fn load_moments(
        &mut self,
        moments: &HashMap<String, Tensor>,
        step: u64,
    ) -> Result<(), TrainError> {
        for (prefix, buf) in [("m", &self.core.m), ("v", &self.core.v)] {
            self.core.fill_from(buf, |name| {
                moments
                    .get(&format!("{prefix}.{name}"))
                    .cloned()
                    .ok_or_else(|| {
                        TrainError::Checkpoint(format!("missing optimizer tensor {prefix}.{name}"))
                    })
            })?;
        }
        self.step = step;
        Ok(())
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// One micro-batch's forward and backward (`scale`: 1 / the global step's valid targets),
    /// gradients added into the shards. Returns the local loss sum.
    fn forward_backward(
        &mut self,
        batch: &TokenBatch,
        targets: &Tensor,
        scale: f64,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<f64, TrainError> {
        let map = self.core.map;
        self.core.gather(map.embed)?;
        let mut hooks = Hooks {
            core: &self.core,
            block_grads: &mut self.block_grads,
            embed_grads: self.embed_grads.as_mut(),
        };
        let (hidden, trunk) =
            self.model
                .forward_hidden_hooked(batch, dropout_rng, Some(&mut hooks))?;
        self.head_grads.zero();
        let (loss_sum, d_hidden) =
            self.model
                .lm_loss_backward(&hidden, targets, scale, &mut self.head_grads)?;
        drop(hidden);
        self.model.backward_hidden_hooked(
            trunk,
            &d_hidden,
            &mut self.head_grads,
            Some(&mut hooks),
        )?;
        // The embedding's gradients are complete (tied: in the head's buffer).
        match self.embed_grads.as_mut() {
            Some(g) => self.core.reduce(map.embed, g)?,
            None => self.core.reduce(map.head, &mut self.head_grads)?,
        }
        Ok(loss_sum)
    }

    /// One optimizer step over this rank's micro-batches (see [`crate::DataParallel::step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn train_step(
        &mut self,
        local: &[(TokenBatch, Tensor)],
        n_valid_global: usize,
        n_tokens_global: usize,
        lr: f64,
        clip: f64,
        mut dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<StepResult, TrainError> {
        if n_valid_global == 0 {
            return Err(TrainError::Config(
                "a training step has no valid target tokens".into(),
            ));
        }
        self.core.grads.zero_set()?;
        self.core.comm_s.set(0.0);
        let scale = 1.0 / n_valid_global as f64;
        let mut loss_sum = 0.0;
        for (batch, targets) in local {
            loss_sum += self.forward_backward(batch, targets, scale, dropout_rng.as_deref_mut())?;
        }
        let mut sums = [loss_sum, kiln_kernels::sum_of_squares(&self.core.grads)?];
        self.core
            .timed(|| self.core.comm.all_reduce_sum_f64(&mut sums))?;
        let grad_norm = sums[1].sqrt();
        self.step += 1;
        let grad_scale = crate::trainer::clip_scale(grad_norm, clip, self.step)?;
        let c = &self.core;
        for Piece {
            entry: e,
            at,
            len: n,
            ..
        } in c.pieces()
        {
            let hp = AdamWParams {
                lr,
                beta1: self.optim.beta1,
                beta2: self.optim.beta2,
                eps: self.optim.eps,
                weight_decay: if decays(&e.name, &e.shape, &self.optim) {
                    self.optim.weight_decay
                } else {
                    0.0
                },
                step: self.step,
                grad_scale,
            };
            adamw_step(
                &c.params.narrow(0, at, n)?,
                &c.grads.narrow(0, at, n)?,
                &c.m.narrow(0, at, n)?,
                &c.v.narrow(0, at, n)?,
                &hp,
            )?;
        }
        Ok(StepResult {
            loss: sums[0] / n_valid_global as f64,
            grad_norm,
            lr,
            n_tokens: n_tokens_global,
            comm_s: Some(self.core.comm_s.get()),
        })
    }

    /// The loss sum and target count of this rank's rows of one batch (no gradients).
    pub fn loss_sum(
        &mut self,
        batch: &TokenBatch,
        targets: &Tensor,
    ) -> Result<(f64, usize), TrainError> {
        self.core.gather(self.core.map.embed)?;
        let mut hooks = Hooks {
            core: &self.core,
            block_grads: &mut self.block_grads,
            embed_grads: self.embed_grads.as_mut(),
        };
        let (hidden, _) = self
            .model
            .forward_hidden_hooked(batch, None, Some(&mut hooks))?;
        Ok(self.model.lm_loss_sum(&hidden, targets)?)
    }

    /// Bytes held for parameters, gradients and optimizer state (see [`FsdpMemory`]).
    pub fn memory(&self) -> FsdpMemory {
        let f = DType::F32.size_in_bytes();
        let c = &self.core;
        let total: usize = c.units.iter().map(|u| u.layout.total()).sum();
        let staging = c
            .staging_bf16
            .as_ref()
            .map_or(0, |t| t.elem_count() * DType::BF16.size_in_bytes());
        FsdpMemory {
            sharded_bytes: 4 * c.params.elem_count() * f,
            // The parameter workspace and the gradient workspace, the same size.
            scratch_bytes: 2 * c.workspace.elem_count() * f + staging,
            single_process_bytes: 4 * total * f,
        }
    }

    /// This rank's pieces of a checkpoint: parameters into `model-RANK-of-N`, m and v into
    /// `optimizer-RANK-of-N`.
    pub fn write_shards(&self, dir: &Path) -> Result<(), TrainError> {
        let c = &self.core;
        let (rank, world) = (c.comm.rank(), c.comm.world_size());
        let (mut model, mut optim) = (Vec::new(), Vec::new());
        for Piece {
            entry: e,
            start,
            at,
            len,
        } in c.pieces()
        {
            let key = |n: &str| piece_key(n, start);
            model.push((key(&e.name), c.params.narrow(0, at, len)?.copy()?));
            for (p, buf) in [("m", &c.m), ("v", &c.v)] {
                optim.push((
                    key(&format!("{p}.{}", e.name)),
                    buf.narrow(0, at, len)?.copy()?,
                ));
            }
        }
        write_pieces(
            &dir.join(ShardManifest::file_name("model", rank, world)),
            model,
        )?;
        write_pieces(
            &dir.join(ShardManifest::file_name("optimizer", rank, world)),
            optim,
        )?;
        Ok(())
    }

    pub fn manifest(&self) -> ShardManifest {
        ShardManifest::per_rank(
            self.core.comm.world_size(),
            "fsdp",
            self.names.iter().cloned(),
            &["model", "optimizer"],
        )
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
}

/// Elements `start..start + len` of tensor `entry` are this rank's, at `at` in its shard
/// buffers.
struct Piece<'a> {
    entry: &'a FlatEntry,
    start: usize,
    at: usize,
    len: usize,
}

impl Core {
    /// Every tensor piece this rank holds, unit by unit.
    fn pieces(&self) -> impl Iterator<Item = Piece<'_>> {
        self.units.iter().flat_map(|u| {
            u.layout.entries().iter().filter_map(move |e| {
                let start = e.offset.max(u.mine.start);
                let end = (e.offset + e.numel).min(u.mine.end);
                (start < end).then(|| Piece {
                    entry: e,
                    start: start - e.offset,
                    at: u.local + start - u.mine.start,
                    len: end - start,
                })
            })
        })
    }

    /// Runs a collective, adding its wall time to the step's communication time.
    fn timed<T>(&self, f: impl FnOnce() -> kiln_dist::Result<T>) -> kiln_dist::Result<T> {
        let t = std::time::Instant::now();
        let r = f();
        self.comm_s
            .set(self.comm_s.get() + t.elapsed().as_secs_f64());
        r
    }

    /// Writes this rank's part of every unit into `buf` (a shard buffer) from whole tensors.
    fn fill_from(
        &self,
        buf: &Tensor,
        tensor: impl Fn(&str) -> Result<Tensor, TrainError>,
    ) -> Result<(), TrainError> {
        for Piece {
            entry: e,
            start,
            at,
            len,
        } in self.pieces()
        {
            let whole = tensor(&e.name)?.to_dtype(DType::F32)?.flatten_all()?;
            buf.slice_set(&whole.narrow(0, start, len)?.contiguous()?, 0, at)?;
        }
        Ok(())
    }

    fn shard(&self, buf: &Tensor, u: usize) -> Result<Tensor, TrainError> {
        let unit = &self.units[u];
        Ok(buf.narrow(0, unit.local, unit.mine.len())?)
    }

    /// Unit `u`'s whole parameters into the workspace (the model's views of the unit read them),
    /// in f32 or through bf16.
    fn gather(&self, u: usize) -> Result<(), TrainError> {
        let unit = &self.units[u];
        let n = unit.layout.total();
        let into = self.workspace.narrow(0, 0, n)?;
        let shard = self.shard(&self.params, u)?;
        match &self.staging_bf16 {
            None => self.timed(|| self.comm.all_gather(&shard, &into, &unit.chunks))?,
            Some(staging) => {
                let mine = shard.to_dtype(DType::BF16)?;
                let gathered = staging.narrow(0, 0, n)?;
                self.timed(|| self.comm.all_gather(&mine, &gathered, &unit.chunks))?;
                kiln_kernels::widen_into(&into, &gathered)?;
            }
        }
        Ok(())
    }

    /// Sums unit `u`'s gradients (`full`, unsharded) over ranks into this rank's shard, and
    /// empties `full`. The reduced chunk lands in the parameter workspace: every caller is done
    /// with the unit it holds.
    fn reduce(&self, u: usize, full: &mut Grads) -> Result<(), TrainError> {
        full.make_all_live()?;
        let unit = &self.units[u];
        let out = self.workspace.narrow(0, 0, unit.mine.len())?;
        self.timed(|| {
            self.comm
                .reduce_scatter_sum(full.flat(), &out, &unit.chunks)
        })?;
        kiln_kernels::add_in_place(&self.shard(&self.grads, u)?, &out)?;
        full.zero();
        Ok(())
    }
}

/// The per-layer gathers and reductions of one forward or backward.
struct Hooks<'a> {
    core: &'a Core,
    block_grads: &'a mut [Grads],
    embed_grads: Option<&'a mut Grads>,
}

impl LayerHooks for Hooks<'_> {
    fn before_layer(&mut self, layer: usize, backward: bool) -> Result<(), ModelError> {
        let unit = self.core.map.first_block + layer;
        self.core.gather(unit).map_err(hook_err)?;
        if backward {
            self.block_grads[layer].zero();
        }
        Ok(())
    }

    fn layer_grads(&mut self, layer: usize) -> &mut Grads {
        &mut self.block_grads[layer]
    }

    fn after_layer_backward(&mut self, layer: usize) -> Result<(), ModelError> {
        let unit = self.core.map.first_block + layer;
        self.core
            .reduce(unit, &mut self.block_grads[layer])
            .map_err(hook_err)
    }

    /// The blocks' forward overwrote the workspace: gather the head (a tied embedding again)
    /// for the final norm and the head.
    fn before_head(&mut self) -> Result<(), ModelError> {
        self.core.gather(self.core.map.head).map_err(hook_err)
    }

    /// The head's and the final norm's gradients are complete: reduce them now, so the blocks'
    /// gradients can use the buffer (the embedding's arrive after the blocks, reduced then).
    fn before_blocks_backward(&mut self, grads: &mut Grads) -> Result<(), ModelError> {
        self.core
            .reduce(self.core.map.head, grads)
            .map_err(hook_err)
    }

    /// An untied embedding's own buffer (over the same workspace, free again after the blocks).
    fn embedding_grads(&mut self) -> Option<&mut Grads> {
        self.embed_grads.as_deref_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamW;
    use kiln_dist::SingleProcess;

    fn loss_of(model: &Llama, batch: &TokenBatch, targets: &Tensor) -> f64 {
        let (hidden, _) = model.forward_hidden(batch, None).unwrap();
        model.lm_loss_sum(&hidden, targets).unwrap().0
    }

    fn master_params(fsdp: &Fsdp) -> HashMap<String, Tensor> {
        let dir = tempfile::tempdir().unwrap();
        fsdp.write_shards(dir.path()).unwrap();
        kiln_model::sharded::read_sharded(dir.path(), &fsdp.manifest(), "model", &Device::Cpu)
            .unwrap()
    }

    /// `param_dtype = "bf16"`: the forward sees the bf16-rounded weights (the loss of a model
    /// built from them, not the f32 model's), and one step moves the f32 master weights by
    /// exactly the update AdamW computes from the rounded model's gradients. Both unit layouts:
    /// an untied embedding and head in separate units, a tied one in one.
    #[test]
    fn bf16_params_compute_with_rounded_weights_and_update_f32_masters() {
        for tie_embeddings in [false, true] {
            bf16_step_matches_the_rounded_model(ModelConfig {
                tie_embeddings,
                ..ModelConfig::tiny()
            });
        }
    }

    fn bf16_step_matches_the_rounded_model(cfg: ModelConfig) {
        let dev = Device::Cpu;
        let master = Params::init(&cfg, 11, &dev, DType::F32).unwrap();
        let rounded = Params::init(&cfg, 11, &dev, DType::F32).unwrap();
        let to_bf16 = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        rounded
            .flat()
            .set(&to_bf16(master.flat().as_tensor()).unwrap())
            .unwrap();
        let optim = OptimConfig {
            weight_decay: 0.0,
            ..OptimConfig::default()
        };
        let ids: Vec<u32> = (0..2 * 17).map(|i| (i * 37 + i * i) % 1000).collect();
        let rows = Tensor::from_vec(ids, (2, 17), &dev).unwrap();
        let inputs = rows.narrow(1, 0, 16).unwrap().contiguous().unwrap();
        let targets = rows.narrow(1, 1, 16).unwrap().to_dtype(DType::I64).unwrap();
        let batch = TokenBatch::new(inputs.clone());

        let mut fsdp = Fsdp::new(
            &cfg,
            &master,
            &optim,
            ParamDtype::Bf16,
            Rc::new(SingleProcess),
        )
        .unwrap();
        let (loss_bf16, n_valid) = fsdp.loss_sum(&batch, &targets).unwrap();
        let rounded_model = Llama::new(&cfg, &rounded).unwrap();
        let loss_rounded = loss_of(&rounded_model, &batch, &targets);
        let loss_f32 = loss_of(&Llama::new(&cfg, &master).unwrap(), &batch, &targets);
        assert!(
            (loss_bf16 - loss_rounded).abs() <= 1e-9 * loss_rounded.abs(),
            "bf16 FSDP {loss_bf16} vs the rounded model {loss_rounded}"
        );
        assert!(
            (loss_bf16 - loss_f32).abs() > 1e-6,
            "the rounding must show: {loss_bf16} vs f32 {loss_f32}"
        );

        let (lr, clip) = (1e-3, 1.0);
        let mut optimizer = AdamW::for_model(&rounded_model, &rounded, &optim).unwrap();
        let before: HashMap<String, Tensor> = rounded
            .iter()
            .map(|(n, t)| (n.to_string(), t.copy().unwrap()))
            .collect();
        let reference = crate::optimizer_step(
            &rounded_model,
            &rounded,
            &mut optimizer,
            &[(inputs, targets.clone())],
            lr,
            clip,
            None,
        )
        .unwrap();
        let step = fsdp
            .train_step(&[(batch, targets)], n_valid, 32, lr, clip, None)
            .unwrap();
        assert!((step.loss - reference.loss).abs() <= 1e-9 * reference.loss);
        assert!((step.grad_norm - reference.grad_norm).abs() <= 1e-5 * reference.grad_norm);
        let after = master_params(&fsdp);
        let mut off_bf16_grid = 0;
        for (name, t) in after {
            let moved = (&t - master.tensor(&name).unwrap()).unwrap();
            let want = (rounded.tensor(&name).unwrap() - &before[&name]).unwrap();
            let err = (&moved - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                err < 1e-6,
                "{name} (tied: {}): master update off by {err}",
                cfg.tie_embeddings
            );
            let rounded_again = to_bf16(&t).unwrap();
            off_bf16_grid += t
                .ne(&rounded_again)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as usize;
        }
        assert!(
            off_bf16_grid > 0,
            "the master weights must keep f32 precision"
        );
    }
}
