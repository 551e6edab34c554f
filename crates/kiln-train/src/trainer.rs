//! The training loop: sample → forward → per-token loss → backward (accumulated over
//! micro-batches) → clip → AdamW, with evaluation, metrics, checkpoints and exact resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use kiln_data::{
    eval_batch_count, eval_batches, mlm_seed, Batch, Dataset, KilnTokenizer, MlmMasker,
    WindowSampler, IGNORE_INDEX, VAL_MASK_SEED,
};
use kiln_kernels::{count_valid_targets, cross_entropy_sum};
use kiln_model::sharded::SHARD_MANIFEST;
use kiln_model::{Llama, ModelConfig, Params, SplitMix64, TokenBatch};

use crate::checkpoint::{self, CheckpointState, MODEL_FILE, OPTIMIZER_FILE};
use crate::dist::DataParallel;
use crate::fsdp::{Fsdp, FsdpMemory};
use crate::metrics::MetricsRow;
use crate::optim::{lr_at, AdamW};
use crate::run_loop::{metrics_writer, run_steps, LoopSettings, Steps};
use crate::Strategy;
use crate::{Objective, RunConfig, TrainError};

/// What the loop knows at start, for the console.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_dir: PathBuf,
    pub total_params: usize,
    pub non_embedding_params: usize,
    pub flops_per_token: f64,
    pub peak_flops: f64,
    pub tokens_per_step: usize,
    pub start_step: u64,
    pub total_steps: u64,
    pub n_train_tokens: u64,
    pub n_val_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub tokens: u64,
    pub final_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// Masked-token accuracy of the last evaluation (MLM runs).
    pub final_val_accuracy: Option<f64>,
    pub wall_s: f64,
    pub stopped_early: bool,
    pub last_checkpoint: Option<PathBuf>,
}

/// Progress callbacks; the binary draws bars and logs, tests collect rows.
pub trait Observer {
    fn on_start(&mut self, _info: &RunInfo) {}
    /// Every step; `row` is what was (or would be) written to metrics.jsonl.
    fn on_step(&mut self, _row: &MetricsRow, _logged: bool) {}
    fn on_eval(&mut self, _row: &MetricsRow) {}
    fn on_checkpoint(&mut self, _dir: &Path) {}
    /// Free-form status lines (dataset preparation, resume).
    fn on_message(&mut self, _msg: &str) {}
}

/// An observer that does nothing.
pub struct Silent;
impl Observer for Silent {}

pub struct Trainer {
    pub cfg: RunConfig,
    pub run_dir: PathBuf,
    replica: Replica,
    pub sampler: WindowSampler,
    pub data: Dataset,
    pub tokens_seen: u64,
    /// The masker of an MLM run (`train.objective = "mlm"`).
    pub mlm: Option<MlmMasker>,
    dropout_rng: SplitMix64,
    flops_per_token: f64,
    peak_flops: f64,
    config_toml: String,
    /// The data-parallel group when the run has several ranks.
    dist: Option<DataParallel>,
}

/// What one process holds of the model: all of it (one process, DDP, ZeRO-1: whose optimizer
/// keeps a shard of the state), or its FSDP shards.
#[allow(clippy::large_enum_variant)] // one per trainer; the FSDP engine is boxed already
pub enum Replica {
    Full {
        params: Params,
        model: Llama,
        optimizer: AdamW,
    },
    Sharded(Box<Fsdp>),
}

impl Replica {
    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        match self {
            Replica::Full { optimizer, .. } => optimizer.step,
            Replica::Sharded(f) => f.step,
        }
    }

    /// The whole trainable parameters (`None` under FSDP, where this rank holds shards).
    pub fn params(&self) -> Option<&Params> {
        match self {
            Replica::Full { params, .. } => Some(params),
            Replica::Sharded(_) => None,
        }
    }

    /// The model (`None` under FSDP).
    pub fn model(&self) -> Option<&Llama> {
        match self {
            Replica::Full { model, .. } => Some(model),
            Replica::Sharded(_) => None,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Replica::Full { model, .. } => model.device().clone(),
            Replica::Sharded(f) => f.device().clone(),
        }
    }
}

/// One evaluation: mean loss per predicted token and, for MLM, masked-token accuracy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: Option<f64>,
}

/// Result of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepResult {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub n_tokens: usize,
    /// Distributed runs: seconds this rank spent in collectives (including waiting for the
    /// slowest rank).
    pub comm_s: Option<f64>,
}

impl Trainer {
    /// Sets up a run in `run_dir`: opens (or prepares) the dataset, initialises or loads the
    /// weights, and with `resume` continues from the run's latest checkpoint.
    pub fn new(
        cfg: RunConfig,
        run_dir: &Path,
        resume: bool,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<Self, TrainError> {
        Self::new_with(cfg, run_dir, resume, device, obs, None)
    }

    /// [`Trainer::new`] as one rank of a data-parallel group (`dist`; `None`: one process).
    /// Rank 0 prepares the dataset and writes the run's files; every rank trains on its rows
    /// of each global batch.
    pub fn new_with(
        cfg: RunConfig,
        run_dir: &Path,
        resume: bool,
        device: &Device,
        obs: &mut dyn Observer,
        dist: Option<DataParallel>,
    ) -> Result<Self, TrainError> {
        cfg.validate()?;
        let main = dist.as_ref().is_none_or(|d| d.is_main());
        if let Some(d) = &dist {
            d.check_batch(cfg.train.batch_size)?;
        }
        std::fs::create_dir_all(run_dir)
            .map_err(|e| TrainError::Io(format!("{}: {e}", run_dir.display())))?;
        // Rank 0 prepares the dataset (when it does not exist yet); the others then open it.
        let data = if main {
            let data = crate::dataset::ensure_dataset(&cfg, obs)?;
            if let Some(d) = &dist {
                d.io_barrier()?;
            }
            data
        } else {
            dist.as_ref().expect("not main").io_barrier()?;
            crate::dataset::ensure_dataset(&cfg, obs)?
        };
        check_vocab(&cfg.model, data.meta.vocab_size, &data.dir)?;
        let mlm = match cfg.train.objective {
            Objective::Clm => None,
            Objective::Mlm => Some(mlm_masker(&cfg, &data)?),
        };
        let n_needed = cfg.train.seq_len + 1;
        if (data.train.len()) < n_needed {
            return Err(TrainError::Config(format!(
                "{}: train split has {} tokens, fewer than one window of seq_len + 1 = {n_needed}",
                data.dir.display(),
                data.train.len()
            )));
        }
        // The run directory is self-contained: config, tokenizer, metrics, checkpoints.
        let config_toml = cfg.to_toml();
        if resume {
            if let Some((_, dir)) = checkpoint::list(run_dir)?.last() {
                checkpoint::check_resume_config(dir, &config_toml)?;
            }
        }
        if main {
            write_atomic(&run_dir.join("config.toml"), config_toml.as_bytes())?;
        }
        let tok_src = data.dir.join("tokenizer.json");
        if main && tok_src.exists() {
            std::fs::copy(&tok_src, run_dir.join("tokenizer.json"))
                .map_err(|e| TrainError::Io(format!("{}: {e}", tok_src.display())))?;
        }

        let params = match &cfg.train.init_from {
            Some(src) => {
                // A kiln run/checkpoint, an HF directory or a GGUF file (dequantised).
                let weights = crate::resolve::load_weights(src, device)?;
                crate::resolve::check_init_compatible(&weights.config, &cfg.model, src)?;
                obs.on_message(&format!("initialising from {}", weights.weights.display()));
                weights.params
            }
            None => Params::init(&cfg.model, cfg.train.seed, device, DType::F32)?,
        };
        if main && cfg.train.save_init && !resume {
            params.save(&run_dir.join("init.safetensors"))?;
        }
        let replica = match &dist {
            Some(d) if d.cfg.strategy == Strategy::Fsdp => {
                if cfg.train.objective == Objective::Mlm {
                    return Err(TrainError::Config(
                        "dist.strategy = \"fsdp\" trains causal LMs; use \"ddp\" or \"zero1\" for train.objective = \"mlm\"".into(),
                    ));
                }
                // Every rank holds the same initial weights; each keeps its shards of them.
                d.comm.broadcast(&params.flat().as_detached_tensor(), 0)?;
                let mut fsdp = Fsdp::new(
                    &cfg.model,
                    &params,
                    &cfg.optim,
                    d.cfg.param_dtype,
                    d.comm.clone(),
                )?;
                fsdp.set_activation_checkpointing(cfg.train.activation_checkpointing);
                fsdp.set_precision(cfg.train.precision);
                Replica::Sharded(Box::new(fsdp))
            }
            _ => {
                let mut model = Llama::new(&cfg.model, &params)?;
                model.set_activation_checkpointing(cfg.train.activation_checkpointing);
                model.set_precision(cfg.train.precision);
                let mut optimizer = AdamW::for_model(&model, &params, &cfg.optim)?;
                if let Some(d) = &dist {
                    d.setup(&params, &mut optimizer)?;
                }
                Replica::Full {
                    params,
                    model,
                    optimizer,
                }
            }
        };
        let sampler = WindowSampler::new(cfg.train.seed, cfg.train.batch_size, cfg.train.seq_len);
        let peak_flops = match cfg.train.peak_flops {
            Some(p) => p,
            None => crate::perf::measure_peak(device, cfg.train.precision.effective())?,
        };
        let mut trainer = Self {
            flops_per_token: cfg.model.train_flops_per_token(cfg.train.seq_len),
            dropout_rng: SplitMix64::new(cfg.train.seed ^ 0xD50F),
            cfg,
            run_dir: run_dir.to_path_buf(),
            replica,
            sampler,
            data,
            tokens_seen: 0,
            mlm,
            peak_flops,
            config_toml,
            dist,
        };
        if resume {
            match checkpoint::list(run_dir)?.last() {
                Some((_, dir)) => {
                    let dir = dir.clone();
                    trainer.load_checkpoint(&dir)?;
                    obs.on_message(&format!(
                        "resumed from {} (step {})",
                        dir.display(),
                        trainer.step()
                    ));
                }
                None => obs.on_message("no checkpoint to resume from; starting fresh"),
            }
        }
        Ok(trainer)
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.replica.step()
    }

    /// The whole parameters (`None` under FSDP, where this rank holds shards).
    pub fn params(&self) -> Option<&Params> {
        self.replica.params()
    }

    /// The model (`None` under FSDP).
    pub fn model(&self) -> Option<&Llama> {
        self.replica.model()
    }

    /// Under FSDP: this rank's bytes of parameters, gradients and optimizer state.
    pub fn fsdp_memory(&self) -> Option<FsdpMemory> {
        match &self.replica {
            Replica::Sharded(f) => Some(f.memory()),
            Replica::Full { .. } => None,
        }
    }

    fn device(&self) -> Device {
        self.replica.device()
    }

    pub fn peak_flops(&self) -> f64 {
        self.peak_flops
    }

    fn batch_tensors(&self, batch: &Batch) -> Result<(Tensor, Tensor), TrainError> {
        let device = &self.device();
        let inputs = Tensor::from_slice(&batch.inputs, (batch.batch_size, batch.ctx), device)?;
        let targets = Tensor::from_slice(&batch.targets, batch.batch_size * batch.ctx, device)?;
        Ok((inputs, targets))
    }

    /// The next training batch; for MLM, masked with the stream of its batch index, so a
    /// resumed run (whose sampler restores the index) masks exactly as an uninterrupted one.
    fn next_batch(&mut self) -> Result<Batch, TrainError> {
        let index = self.sampler.next_batch;
        let batch = self.sampler.next_batch(&self.data.train)?;
        Ok(match &self.mlm {
            Some(m) => m.mask_batch(&batch, mlm_seed(self.cfg.train.seed, index)),
            None => batch,
        })
    }

    /// One optimizer step over `grad_accum` micro-batches drawn from the sampler.
    pub fn train_step(&mut self) -> Result<StepResult, TrainError> {
        let batches: Vec<Batch> = (0..self.cfg.train.grad_accum)
            .map(|_| self.next_batch())
            .collect::<Result<_, _>>()?;
        let lr = lr_at(self.step(), self.cfg.train.steps, &self.cfg.optim);
        if let Some(d) = &self.dist {
            // Every rank draws the same global batches and trains on its rows of each.
            let n_valid = batches
                .iter()
                .map(|b| b.targets.iter().filter(|&&t| t != IGNORE_INDEX).count())
                .sum();
            let n_tokens = batches.iter().map(|b| b.inputs.len()).sum();
            let local: Vec<(TokenBatch, Tensor)> = batches
                .iter()
                .map(|b| {
                    let (i, t) = self.batch_tensors(&d.rows(b)?)?;
                    Ok((TokenBatch::new(i), t))
                })
                .collect::<Result<_, TrainError>>()?;
            let clip = self.cfg.optim.grad_clip;
            let rng = Some(&mut self.dropout_rng);
            let r = match &mut self.replica {
                Replica::Full {
                    params,
                    model,
                    optimizer,
                } => d.step(
                    model, params, optimizer, &local, n_valid, n_tokens, lr, clip, rng,
                )?,
                Replica::Sharded(f) => f.train_step(&local, n_valid, n_tokens, lr, clip, rng)?,
            };
            self.tokens_seen += r.n_tokens as u64;
            return Ok(r);
        }
        let tensors: Vec<(Tensor, Tensor)> = batches
            .iter()
            .map(|b| self.batch_tensors(b))
            .collect::<Result<_, _>>()?;
        let Replica::Full {
            params,
            model,
            optimizer,
        } = &mut self.replica
        else {
            unreachable!("FSDP runs with a data-parallel group")
        };
        let r = optimizer_step(
            model,
            params,
            optimizer,
            &tensors,
            lr,
            self.cfg.optim.grad_clip,
            Some(&mut self.dropout_rng),
        )?;
        self.tokens_seen += r.n_tokens as u64;
        Ok(r)
    }

    /// Mean loss per token over the deterministic validation batches.
    pub fn evaluate(&mut self) -> Result<f64, TrainError> {
        Ok(self.evaluate_metrics()?.loss)
    }

    /// Validation loss and, for MLM, masked-token accuracy. MLM validation batches are masked
    /// with a fixed seed ([`VAL_MASK_SEED`]), so every evaluation scores the same positions.
    pub fn evaluate_metrics(&mut self) -> Result<EvalResult, TrainError> {
        let t = &self.cfg.train;
        let shard = &self.data.val;
        if eval_batch_count(shard.len(), t.batch_size, t.seq_len, t.eval_batches) == 0 {
            return Err(TrainError::Config(format!(
                "{}: validation split ({} tokens) is shorter than one batch of {} x {}; raise data.val_fraction or lower train.batch_size",
                self.data.dir.display(),
                shard.len(),
                t.batch_size,
                t.seq_len + 1
            )));
        }
        let batches = eval_batches(shard, t.batch_size, t.seq_len, t.eval_batches);
        if let Some(d) = self.dist.clone() {
            let batches: Vec<Batch> = batches.collect();
            return self.evaluate_distributed(&d, batches.into_iter());
        }
        let Replica::Full { model, .. } = &self.replica else {
            unreachable!("FSDP runs with a data-parallel group")
        };
        match &self.mlm {
            Some(m) => evaluate_mlm(model, m, batches),
            None => Ok(EvalResult {
                loss: evaluate_loss(model, batches)?,
                accuracy: None,
            }),
        }
    }

    /// Evaluation split over the ranks like training: each rank scores its rows of every
    /// validation batch, and the sums are added over ranks.
    fn evaluate_distributed(
        &mut self,
        d: &DataParallel,
        batches: impl Iterator<Item = Batch>,
    ) -> Result<EvalResult, TrainError> {
        let device = self.device();
        // [loss sum, predicted tokens, correct (MLM)]
        let mut sums = [0.0f64; 3];
        for (k, b) in batches.enumerate() {
            let b = match &self.mlm {
                Some(m) => m.mask_batch(&b, mlm_seed(VAL_MASK_SEED, k as u64)),
                None => b,
            };
            let b = d.rows(&b)?;
            let inputs = Tensor::from_slice(&b.inputs, (b.batch_size, b.ctx), &device)?;
            let targets = Tensor::from_slice(&b.targets, b.batch_size * b.ctx, &device)?;
            let model = match &mut self.replica {
                Replica::Full { model, .. } => model,
                Replica::Sharded(f) => {
                    let (sum, n) = f.loss_sum(&TokenBatch::new(inputs), &targets)?;
                    sums[0] += sum;
                    sums[1] += n as f64;
                    continue;
                }
            };
            let logits = model.forward_train(&inputs, None)?;
            sums[0] += cross_entropy_sum(&logits, &targets)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            sums[1] += count_valid_targets(&targets)? as f64;
            if self.mlm.is_some() {
                let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                for (&label, &p) in b.targets.iter().zip(&predicted) {
                    if label != IGNORE_INDEX && i64::from(p) == label {
                        sums[2] += 1.0;
                    }
                }
            }
        }
        d.comm.all_reduce_sum_f64(&mut sums)?;
        if sums[1] == 0.0 {
            return Err(TrainError::Config(
                "evaluation data holds no target token".into(),
            ));
        }
        Ok(EvalResult {
            loss: sums[0] / sums[1],
            accuracy: self.mlm.as_ref().map(|_| sums[2] / sums[1]),
        })
    }

    /// What a checkpoint records besides the tensors (the files' digests are added on save).
    fn checkpoint_state(&self) -> CheckpointState {
        CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step(),
            tokens_seen: self.tokens_seen,
            sampler: self.sampler.clone(),
            dropout_rng: self.dropout_rng.clone(),
            files: Default::default(),
        }
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        if let Some(d) = &self.dist {
            return self.save_sharded_checkpoint(d);
        }
        let Replica::Full {
            params, optimizer, ..
        } = &self.replica
        else {
            unreachable!("FSDP runs with a data-parallel group")
        };
        checkpoint::save(
            &self.run_dir,
            self.checkpoint_state(),
            &self.config_toml,
            |dir| {
                params.save(&dir.join(MODEL_FILE))?;
                optimizer.save(&dir.join(OPTIMIZER_FILE))
            },
            &checkpoint::Retention::of(&self.cfg.train)?,
        )
    }

    /// Every rank writes its shards into the checkpoint's temporary directory; rank 0 writes
    /// the manifest and state and renames the directory into place once all have written.
    fn save_sharded_checkpoint(&self, d: &DataParallel) -> Result<PathBuf, TrainError> {
        d.save_checkpoint(
            &self.run_dir,
            self.checkpoint_state(),
            &self.config_toml,
            &checkpoint::Retention::of(&self.cfg.train)?,
            |dir| {
                let manifest = match &self.replica {
                    Replica::Full { params, .. } => d.manifest(params),
                    Replica::Sharded(f) => f.manifest(),
                };
                crate::dist::write_manifest(dir, &manifest)
            },
            |dir| self.write_shards(d, dir),
        )
    }

    fn write_shards(&self, d: &DataParallel, dir: &Path) -> Result<(), TrainError> {
        match &self.replica {
            Replica::Full {
                params, optimizer, ..
            } => d.write_shards(dir, params, optimizer),
            Replica::Sharded(f) => f.write_shards(dir),
        }
    }

    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<(), TrainError> {
        let state = checkpoint::load_state(dir)?;
        let sharded = !dir.join(MODEL_FILE).exists() && dir.join(SHARD_MANIFEST).exists();
        let model_file = if sharded {
            dir.join(SHARD_MANIFEST)
        } else {
            dir.join(MODEL_FILE)
        };
        let device = self.device();
        let loaded = Params::load(&model_file, &self.cfg.model, &device)
            .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        // Written by any number of ranks (or one process).
        let moments = checkpoint::load_moments(dir, &device)?;
        match &mut self.replica {
            Replica::Full {
                params, optimizer, ..
            } => {
                params.copy_from(&loaded)?;
                optimizer.load_tensors(&moments, &dir.display().to_string(), state.step)?;
            }
            Replica::Sharded(f) => {
                f.load_params(&loaded)?;
                f.load_moments(&moments, state.step)?;
            }
        }
        if state.sampler.batch_size != self.cfg.train.batch_size
            || state.sampler.ctx != self.cfg.train.seq_len
        {
            return Err(TrainError::Checkpoint(format!(
                "{}: saved with batch_size {} / seq_len {}, but the config now says {} / {}",
                dir.display(),
                state.sampler.batch_size,
                state.sampler.ctx,
                self.cfg.train.batch_size,
                self.cfg.train.seq_len
            )));
        }
        self.sampler = state.sampler;
        self.dropout_rng = state.dropout_rng;
        self.tokens_seen = state.tokens_seen;
        Ok(())
    }

    pub fn info(&self) -> RunInfo {
        let (total, non_emb) = self.cfg.model.param_counts();
        RunInfo {
            run_dir: self.run_dir.clone(),
            total_params: total,
            non_embedding_params: non_emb,
            flops_per_token: self.flops_per_token,
            peak_flops: self.peak_flops,
            tokens_per_step: self.cfg.tokens_per_step(),
            start_step: self.step(),
            total_steps: self.cfg.train.steps,
            n_train_tokens: self.data.meta.n_train_tokens,
            n_val_tokens: self.data.meta.n_val_tokens,
        }
    }

    /// Runs to `train.steps` (or until `stop` is set, e.g. by Ctrl-C: then a checkpoint is
    /// saved so the run resumes), evaluating, logging and checkpointing on schedule, and
    /// draws the loss curve at the end.
    pub fn run(
        &mut self,
        obs: &mut dyn Observer,
        stop: &AtomicBool,
    ) -> Result<RunSummary, TrainError> {
        let t0 = Instant::now();
        let start_step = self.step();
        let main = self.dist.as_ref().is_none_or(|d| d.is_main());
        // Rank 0 alone writes metrics and plots.
        let mut metrics = metrics_writer(&self.run_dir, start_step, self.dist.as_ref())?;
        obs.on_start(&self.info());
        // The loop borrows the trainer mutably: it gets its own copies of the settings.
        let (train, dist) = (self.cfg.train.clone(), self.dist.clone());
        let settings = LoopSettings {
            train: &train,
            flops_per_token: self.flops_per_token,
            peak_flops: self.peak_flops,
            dist: dist.as_ref(),
        };
        let end = run_steps(self, &settings, &mut metrics, obs, stop)?;
        let summary = RunSummary {
            steps: self.step(),
            tokens: self.tokens_seen,
            final_loss: end.final_loss,
            final_val_loss: end.final_val.map(|e| e.loss),
            final_val_accuracy: end.final_val.and_then(|e| e.accuracy),
            wall_s: t0.elapsed().as_secs_f64(),
            stopped_early: end.stopped_early,
            last_checkpoint: end.last_checkpoint,
        };
        if !main {
            return Ok(summary);
        }
        drop(metrics);
        crate::plot::plot_run(&self.run_dir)?;
        if self.mlm.is_some() && summary.final_val_accuracy.is_some() {
            let label = self
                .run_dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let runs = [(label, self.run_dir.as_path())];
            crate::plot::plot_accuracy(&runs, &self.run_dir.join("accuracy.png"))?;
        }
        Ok(summary)
    }
}

impl Steps for Trainer {
    type Error = TrainError;
    fn steps_done(&self) -> u64 {
        self.step()
    }
    fn tokens_seen(&self) -> u64 {
        self.tokens_seen
    }
    fn train_step(&mut self) -> Result<StepResult, TrainError> {
        Trainer::train_step(self)
    }
    fn evaluate(&mut self) -> Result<Option<EvalResult>, TrainError> {
        self.evaluate_metrics().map(Some)
    }
    fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        Trainer::save_checkpoint(self)
    }
}

/// One optimizer step over micro-batches `(inputs (b, t) u32, targets (b*t) i64)`. The loss of
/// every micro-batch is a token SUM divided by the valid tokens of the whole step, counted
/// before any forward, so accumulating 4 x 2 equals one batch of 8 (STYLE.md §3.1). Gradients
/// are clipped by global norm (`clip` 0 = off) inside the fused AdamW update. The gradients
/// accumulate in place in the optimizer's flat gradient buffer.
pub fn optimizer_step(
    model: &Llama,
    params: &Params,
    optimizer: &mut AdamW,
    micro_batches: &[(Tensor, Tensor)],
    lr: f64,
    clip: f64,
    dropout_rng: Option<&mut SplitMix64>,
) -> Result<StepResult, TrainError> {
    let batches: Vec<(TokenBatch, Tensor)> = micro_batches
        .iter()
        .map(|(i, t)| (TokenBatch::new(i.clone()), t.clone()))
        .collect();
    optimizer_step_batches(model, params, optimizer, &batches, lr, clip, dropout_rng)
}

/// [`optimizer_step`] over [`TokenBatch`]es (packed rows with segment ids and positions).
pub fn optimizer_step_batches(
    model: &Llama,
    params: &Params,
    optimizer: &mut AdamW,
    micro_batches: &[(TokenBatch, Tensor)],
    lr: f64,
    clip: f64,
    dropout_rng: Option<&mut SplitMix64>,
) -> Result<StepResult, TrainError> {
    let mut n_valid = 0;
    for (_, targets) in micro_batches {
        n_valid += count_valid_targets(targets)?;
    }
    if n_valid == 0 {
        return Err(TrainError::Config(
            "a training step has no valid target tokens".into(),
        ));
    }
    let loss_sum = accumulate_gradients(
        model,
        optimizer.grads_mut(),
        micro_batches,
        n_valid,
        dropout_rng,
    )?;
    // One fused pass over the flat gradient buffer.
    let grad_norm = optimizer.grads().sum_of_squares()?.sqrt();
    let grad_scale = clip_scale(grad_norm, clip, optimizer.step + 1)?;
    optimizer.step(params, lr, grad_scale)?;
    let n_tokens = micro_batches
        .iter()
        .map(|(b, _)| b.tokens.elem_count())
        .sum::<usize>();
    Ok(StepResult {
        loss: loss_sum / n_valid as f64,
        grad_norm,
        lr,
        n_tokens,
        comm_s: None,
    })
}

/// Zeroes `grads`, then adds the gradients of every micro-batch's loss sum divided by
/// `n_valid` (the valid targets of the whole step, over every micro-batch and rank); returns
/// the summed loss of these micro-batches.
pub(crate) fn accumulate_gradients(
    model: &Llama,
    grads: &mut kiln_model::Grads,
    micro_batches: &[(TokenBatch, Tensor)],
    n_valid: usize,
    mut dropout_rng: Option<&mut SplitMix64>,
) -> Result<f64, TrainError> {
    grads.zero();
    let scale = 1.0 / n_valid as f64;
    let mut loss_sum = 0.0;
    for (batch, targets) in micro_batches {
        loss_sum += model.forward_backward_batch(
            batch,
            targets,
            scale,
            grads,
            dropout_rng.as_deref_mut(),
        )?;
    }
    Ok(loss_sum)
}

/// The factor that clips gradients of global norm `grad_norm` to `clip` (0: no clipping), as
/// `torch.nn.utils.clip_grad_norm_` does: `clip / (norm + 1e-6)` when above it. A non-finite
/// norm ends the run (at optimizer step `step`).
pub(crate) fn clip_scale(grad_norm: f64, clip: f64, step: u64) -> Result<f64, TrainError> {
    if !grad_norm.is_finite() {
        return Err(TrainError::Diverged {
            step,
            what: format!("gradient norm is {grad_norm}"),
        });
    }
    Ok(if clip > 0.0 {
        (clip / (grad_norm + 1e-6)).min(1.0)
    } else {
        1.0
    })
}

/// Mean per-token loss of `model` over `batches` (no optimizer involved).
pub fn evaluate_loss(
    model: &Llama,
    batches: impl Iterator<Item = Batch>,
) -> Result<f64, TrainError> {
    let device = model.device().clone();
    let (mut sum, mut n) = (0.0, 0usize);
    for b in batches {
        let inputs = Tensor::from_slice(&b.inputs, (b.batch_size, b.ctx), &device)?;
        let targets = Tensor::from_slice(&b.targets, b.batch_size * b.ctx, &device)?;
        let logits = model.forward_train(&inputs, None)?;
        sum += cross_entropy_sum(&logits, &targets)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        n += count_valid_targets(&targets)?;
    }
    if n == 0 {
        return Err(TrainError::Config(
            "evaluation data holds no complete batch".into(),
        ));
    }
    Ok(sum / n as f64)
}

/// Masked-LM loss (mean over masked positions) and accuracy (argmax == original token over
/// masked positions) of `model` over `batches`, each masked by `masker` with the fixed
/// validation stream of its index.
pub fn evaluate_mlm(
    model: &Llama,
    masker: &MlmMasker,
    batches: impl Iterator<Item = Batch>,
) -> Result<EvalResult, TrainError> {
    let device = model.device().clone();
    let (mut sum, mut n, mut correct) = (0.0, 0usize, 0usize);
    for (k, b) in batches.enumerate() {
        let b = masker.mask_batch(&b, mlm_seed(VAL_MASK_SEED, k as u64));
        let inputs = Tensor::from_slice(&b.inputs, (b.batch_size, b.ctx), &device)?;
        let targets = Tensor::from_slice(&b.targets, b.batch_size * b.ctx, &device)?;
        let logits = model.forward_train(&inputs, None)?; // (b*t, v)
        sum += cross_entropy_sum(&logits, &targets)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (&label, &p) in b.targets.iter().zip(&predicted) {
            if label != IGNORE_INDEX {
                n += 1;
                correct += usize::from(i64::from(p) == label);
            }
        }
    }
    if n == 0 {
        return Err(TrainError::Config(
            "evaluation data holds no masked token".into(),
        ));
    }
    Ok(EvalResult {
        loss: sum / n as f64,
        accuracy: Some(correct as f64 / n as f64),
    })
}

/// The masker of an MLM run, over the dataset's tokenizer; refuses a tokenizer without
/// `[MASK]`, saying how to get one.
fn mlm_masker(cfg: &RunConfig, data: &Dataset) -> Result<MlmMasker, TrainError> {
    let path = data.dir.join("tokenizer.json");
    let tokenizer = KilnTokenizer::load(&path)?;
    MlmMasker::new(&tokenizer, cfg.mlm_options()).map_err(|e| {
        TrainError::Config(format!(
            "train.objective = \"mlm\" with dataset {}: {e}",
            data.dir.display()
        ))
    })
}

fn check_vocab(model: &ModelConfig, tokenizer_vocab: usize, dir: &Path) -> Result<(), TrainError> {
    if tokenizer_vocab > model.vocab_size {
        return Err(TrainError::Config(format!(
            "tokenizer/model vocab mismatch: the dataset {} was tokenized with {tokenizer_vocab} tokens but model.vocab_size is {}",
            dir.display(),
            model.vocab_size
        )));
    }
    Ok(())
}

/// Writes a small file atomically (temp + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| TrainError::Io(format!("{}: {e}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| TrainError::Io(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}
