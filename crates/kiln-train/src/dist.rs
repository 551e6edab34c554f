//! Data-parallel training over a [`Collectives`] engine (MPI on CPUs), with the semantics of
//! one process: `train.batch_size` is the global batch, each rank takes a fixed slice of every
//! micro-batch's rows; the loss of every rank is a token sum divided by the valid-token count
//! of the whole global step; gradients are summed over ranks; the clip uses the global norm.
//! Replicas start from the same weights and apply the same update, so they stay equal.
//!
//! - DDP: the gradient buffer is all-reduced in buckets (`dist.bucket_mb`), then every rank
//!   runs the same AdamW update.
//! - ZeRO-1: the gradients are reduce-scattered, so each rank holds the summed gradients of its
//!   contiguous shard of the flat buffer and AdamW's m and v for that shard only; it updates
//!   its shard of the parameters, and the parameters are all-gathered.
//!
//! Checkpoints are sharded (`kiln_model::sharded`): each rank writes the parameter and
//! optimizer pieces of its shard, rank 0 the manifest and state, and the directory is renamed
//! into place only when every rank has written (barriers around the writes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::Tensor;
use kiln_data::Batch;
use kiln_dist::{shard_range, shard_sizes, Collectives};
use kiln_model::sharded::{piece_key, write_pieces, ShardManifest, SHARD_MANIFEST};
use kiln_model::{FlatLayout, Llama, Params, SplitMix64, TokenBatch};

use crate::checkpoint::{self, CheckpointState, FileDigest};
use crate::optim::AdamW;
use crate::trainer::StepResult;
use crate::{DistConfig, Strategy, TrainError};

/// This process's place in a data-parallel group.
#[derive(Clone)]
pub struct DataParallel {
    pub comm: Rc<dyn Collectives>,
    pub cfg: DistConfig,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataParallel({} rank {}/{}, {:?})",
            self.comm.engine(),
            self.comm.rank(),
            self.comm.world_size(),
            self.cfg.strategy
        )
    }
}

impl DataParallel {
    pub fn new(comm: Rc<dyn Collectives>, cfg: DistConfig) -> Self {
        Self { comm, cfg }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// A barrier around rank 0's long work (dataset preparation, checkpoint commit), with
    /// `dist.io_timeout_s` instead of the collectives' timeout.
    pub fn io_barrier(&self) -> Result<(), TrainError> {
        let timeout = std::time::Duration::from_secs_f64(self.cfg.io_timeout_s);
        Ok(self.comm.barrier_within(timeout)?)
    }

    /// Checks that the global batch splits evenly over the ranks.
    pub fn check_batch(&self, batch_size: usize) -> Result<(), TrainError> {
        if !batch_size.is_multiple_of(self.world()) {
            return Err(TrainError::Config(format!(
                "train.batch_size = {batch_size} is the global batch and must split evenly over \
                 the {} ranks (use a multiple of {})",
                self.world(),
                self.world()
            )));
        }
        Ok(())
    }

    /// This rank's rows of a global batch: a contiguous slice of `batch_size / world` rows.
    pub fn rows(&self, b: &Batch) -> Result<Batch, TrainError> {
        self.check_batch(b.batch_size)?;
        let per = b.batch_size / self.world();
        let (start, n) = (self.rank() * per * b.ctx, per * b.ctx);
        Ok(Batch {
            inputs: b.inputs[start..start + n].to_vec(),
            targets: b.targets[start..start + n].to_vec(),
            batch_size: per,
            ctx: b.ctx,
        })
    }

    /// Prepares a replica's optimizer for the strategy: under ZeRO-1 it keeps the state of its
    /// shard only. The parameters must start equal on every rank: rank 0's are broadcast.
    pub fn setup(&self, params: &Params, optimizer: &mut AdamW) -> Result<(), TrainError> {
        if self.cfg.strategy == Strategy::Zero1 {
            trainable_base(params, optimizer)?;
            let total = optimizer.layout().total();
            optimizer.shard_to(shard_range(total, self.rank(), self.world()))?;
        }
        self.comm
            .broadcast(&params.flat().as_detached_tensor(), 0)?;
        Ok(())
    }

    /// One optimizer step on this rank's micro-batches (`n_valid_global`: the valid targets of
    /// the whole global step, over every rank and micro-batch). Returns the global loss.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        model: &Llama,
        params: &Params,
        optimizer: &mut AdamW,
        local: &[(TokenBatch, Tensor)],
        n_valid_global: usize,
        n_tokens_global: usize,
        lr: f64,
        clip: f64,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<StepResult, TrainError> {
        if n_valid_global == 0 {
            return Err(TrainError::Config(
                "a training step has no valid target tokens".into(),
            ));
        }
        let grads = optimizer.grads_mut();
        let loss_sum =
            crate::trainer::accumulate_gradients(model, grads, local, n_valid_global, dropout_rng)?;
        // Entries the backward did not touch hold stale values (lazy zeroing): zero them, so a
        // sum over ranks never reads them and every rank has the same live entries.
        grads.make_all_live()?;
        let comm_start = std::time::Instant::now();
        let mut compute_s = 0.0; // time inside the communication phase that is not communication
        let flat = grads.flat().clone();
        let total = flat.elem_count();
        let mut sums = [loss_sum, 0.0];
        match self.cfg.strategy {
            // (FSDP steps go through `Fsdp::train_step`; its replicated fallback is DDP's.)
            Strategy::Ddp | Strategy::Fsdp => {
                let bucket = ((self.cfg.bucket_mb * 1e6 / 4.0) as usize).max(1);
                let mut start = 0;
                while start < total {
                    let len = bucket.min(total - start);
                    self.comm.all_reduce_sum(&flat.narrow(0, start, len)?)?;
                    start += len;
                }
                let t = std::time::Instant::now();
                sums[1] = grads.sum_of_squares()?;
                compute_s += t.elapsed().as_secs_f64();
                self.comm.all_reduce_sum_f64(&mut sums[..1])?;
            }
            Strategy::Zero1 => {
                let chunks = shard_sizes(total, self.world());
                let mine = optimizer.state_range();
                let reduced = Tensor::zeros(mine.len(), flat.dtype(), flat.device())?;
                self.comm.reduce_scatter_sum(&flat, &reduced, &chunks)?;
                flat.slice_set(&reduced, 0, mine.start)?;
                sums[1] = kiln_kernels::sum_of_squares(&reduced)?;
                self.comm.all_reduce_sum_f64(&mut sums)?;
            }
        }
        let grad_norm = sums[1].sqrt();
        let grad_scale = crate::trainer::clip_scale(grad_norm, clip, optimizer.step + 1)?;
        let t = std::time::Instant::now();
        optimizer.step(params, lr, grad_scale)?;
        compute_s += t.elapsed().as_secs_f64();
        if self.cfg.strategy == Strategy::Zero1 {
            let base = trainable_base(params, optimizer)?;
            let trainable = params.flat().as_detached_tensor().narrow(0, base, total)?;
            self.comm
                .all_gather_in_place(&trainable, &shard_sizes(total, self.world()))?;
        }
        Ok(StepResult {
            loss: sums[0] / n_valid_global as f64,
            grad_norm,
            lr,
            n_tokens: n_tokens_global,
            comm_s: Some(comm_start.elapsed().as_secs_f64() - compute_s),
        })
    }

    /// Writes this rank's pieces of a checkpoint into `dir` (the checkpoint's temporary
    /// directory, which every rank sees): `model-RANK-of-N.safetensors` (its shard of the
    /// parameters) and `optimizer-RANK-of-N.safetensors` (its shard of m and v).
    pub fn write_shards(
        &self,
        dir: &Path,
        params: &Params,
        optimizer: &AdamW,
    ) -> Result<(), TrainError> {
        let (rank, world) = (self.rank(), self.world());
        let mine = shard_range(params.layout().total(), rank, world);
        let flat = params.flat().as_detached_tensor();
        let mut pieces = Vec::new();
        for e in params.layout().entries() {
            let (start, end) = (e.offset.max(mine.start), (e.offset + e.numel).min(mine.end));
            if start < end {
                pieces.push((
                    piece_key(&e.name, start - e.offset),
                    flat.narrow(0, start, end - start)?.copy()?,
                ));
            }
        }
        write_pieces(
            &dir.join(ShardManifest::file_name("model", rank, world)),
            pieces,
        )?;
        self.write_optimizer_shard(dir, optimizer)
    }

    /// Writes this rank's optimizer pieces (`optimizer-RANK-of-N.safetensors`): part of
    /// [`DataParallel::write_shards`], and alone for runs whose weights rank 0 writes whole
    /// (SFT, where they may be LoRA adapters).
    pub fn write_optimizer_shard(&self, dir: &Path, optimizer: &AdamW) -> Result<(), TrainError> {
        let (rank, world) = (self.rank(), self.world());
        // ZeRO-1 holds its shard of the state; replicated state is written 1/N per rank.
        let state = match self.cfg.strategy {
            Strategy::Zero1 => optimizer.state_range(),
            Strategy::Ddp | Strategy::Fsdp => shard_range(optimizer.layout().total(), rank, world),
        };
        write_pieces(
            &dir.join(ShardManifest::file_name("optimizer", rank, world)),
            optimizer.state_pieces(state)?,
        )?;
        Ok(())
    }

    /// The manifest of [`DataParallel::write_optimizer_shard`]'s files.
    pub fn optimizer_manifest(&self, optimizer: &AdamW) -> ShardManifest {
        ShardManifest::per_rank(
            self.world(),
            &self.strategy_name(),
            entries_of(optimizer.layout()),
            &["optimizer"],
        )
    }

    /// The manifest of a checkpoint written by every rank's [`DataParallel::write_shards`].
    pub fn manifest(&self, params: &Params) -> ShardManifest {
        ShardManifest::per_rank(
            self.world(),
            &self.strategy_name(),
            entries_of(params.layout()),
            &["model", "optimizer"],
        )
    }

    fn strategy_name(&self) -> String {
        format!("{:?}", self.cfg.strategy).to_lowercase()
    }

    /// Writes one checkpoint of a distributed run atomically. Every rank writes its own files
    /// (`write_own`: its shards) into the checkpoint's temporary directory, then fsyncs and
    /// digests them itself, so rank 0 never reads the other ranks' shards; rank 0 also writes
    /// the shared files (`write_main`: whole weights, manifests), `state.json` and
    /// `config.toml`, and renames the directory once every rank has written. The barriers
    /// after the writes wait up to `dist.io_timeout_s`.
    pub fn save_checkpoint(
        &self,
        run_dir: &Path,
        state: CheckpointState,
        config_toml: &str,
        keep: &crate::checkpoint::Retention,
        write_main: impl FnOnce(&Path) -> Result<(), TrainError>,
        write_own: impl FnOnce(&Path) -> Result<(), TrainError>,
    ) -> Result<PathBuf, TrainError> {
        let final_dir =
            checkpoint::checkpoints_dir(run_dir).join(checkpoint::step_dir_name(state.step));
        if final_dir.join(checkpoint::STATE_FILE).exists() {
            return Ok(final_dir); // already saved (every rank sees the same file system)
        }
        if self.is_main() {
            let dir = checkpoint::save_with(
                run_dir,
                state,
                config_toml,
                |dir| {
                    // The directory exists: the others write. Every rank arrives here straight
                    // from the same step, so a rank that stalled is named after the collectives'
                    // timeout; the writes that follow get the longer one.
                    self.comm.barrier()?;
                    write_main(dir)?;
                    write_own(dir)?;
                    let mut sealed = self.seal_own_files(dir)?;
                    self.io_barrier()?; // every rank has written and sealed
                    sealed.extend(self.collect_seals(dir)?);
                    Ok(sealed)
                },
                keep,
            )?;
            self.io_barrier()?; // renamed into place
            Ok(dir)
        } else {
            let tmp = checkpoint::tmp_dir(run_dir, state.step);
            self.comm.barrier()?;
            write_own(&tmp)?;
            let sealed = self.seal_own_files(&tmp)?;
            let record = tmp.join(seal_record(self.rank()));
            crate::write_atomic(
                &record,
                serde_json::to_string(&sealed)
                    .expect("invariant: digests serialise")
                    .as_bytes(),
            )?;
            self.io_barrier()?;
            self.io_barrier()?;
            Ok(final_dir)
        }
    }

    /// Fsyncs and digests the files this rank wrote into `dir` (`*-RANK-of-N.safetensors`).
    fn seal_own_files(&self, dir: &Path) -> Result<BTreeMap<String, FileDigest>, TrainError> {
        let mut sealed = BTreeMap::new();
        for prefix in ["model", "optimizer"] {
            let name = ShardManifest::file_name(prefix, self.rank(), self.world());
            let path = dir.join(&name);
            if path.exists() {
                checkpoint::fsync(&path)?;
                sealed.insert(name, checkpoint::digest(&path)?);
            }
        }
        Ok(sealed)
    }

    /// Rank 0: the other ranks' digests from their records, which are then removed.
    fn collect_seals(&self, dir: &Path) -> Result<BTreeMap<String, FileDigest>, TrainError> {
        let mut all = BTreeMap::new();
        for rank in 1..self.world() {
            let path = dir.join(seal_record(rank));
            let text = std::fs::read_to_string(&path)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
            let digests: BTreeMap<String, FileDigest> = serde_json::from_str(&text)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
            all.extend(digests);
            std::fs::remove_file(&path)
                .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        }
        Ok(all)
    }
}

/// The file in which rank `rank` hands rank 0 the digests of its shards.
fn seal_record(rank: usize) -> String {
    format!(".sealed-{rank:05}.json")
}

/// Every tensor of `layout` with its shape, for a manifest.
fn entries_of(layout: &FlatLayout) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
    layout
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone()))
}

/// Writes a checkpoint's `shards.json`.
pub fn write_manifest(dir: &Path, manifest: &ShardManifest) -> Result<(), TrainError> {
    let path = dir.join(SHARD_MANIFEST);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(manifest).expect("invariant: manifest serialises"),
    )
    .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// ZeRO-1 gathers the trainable parameters as one range of the flat parameter buffer: they
/// must sit there contiguously, in the gradients' order (true of kiln's layout: the whole
/// model, or the LoRA adapters first). Returns the range's start.
fn trainable_base(params: &Params, optimizer: &AdamW) -> Result<usize, TrainError> {
    let layout = optimizer.layout();
    let Some(first) = layout.entries().first() else {
        return Ok(0);
    };
    let base = params
        .layout()
        .entry(&first.name)
        .map(|p| p.offset)
        .unwrap_or(usize::MAX);
    for e in layout.entries() {
        match params.layout().entry(&e.name) {
            Some(p) if p.offset == base + e.offset => {}
            _ => {
                return Err(TrainError::Config(format!(
                    "dist.strategy = \"zero1\" needs the trainable tensors contiguous in the \
                     parameter buffer; {:?} is not (use \"ddp\")",
                    e.name
                )))
            }
        }
    }
    Ok(base)
}
