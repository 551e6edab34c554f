//! The SFT loop: full fine-tuning, LoRA on a frozen dense base, or LoRA on a base kept in its
//! GGUF blocks (QLoRA-style), over packed rows with assistant-only targets. Metrics,
//! checkpoints, Ctrl-C and exact resume work as in pretraining (kiln-train's pieces).
//!
//! Schedule: the rows are shuffled per epoch (seeded by the run seed and the epoch); step s of
//! an epoch takes the next `batch_size * grad_accum` rows as `grad_accum` micro-batches. A
//! step is a pure function of (seed, s), so a resumed run replays exactly the same rows.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{Device, Tensor};
use kiln_data::WindowSampler;
use kiln_load::ModelFormat;
use kiln_model::{Llama, LoraSpec, ModelConfig, Params, SplitMix64, TokenBatch};
use kiln_train::checkpoint::{self, CheckpointState, MODEL_FILE, OPTIMIZER_FILE};
use kiln_train::fsdp::Fsdp;
use kiln_train::metrics::MetricsRow;
use kiln_train::optim::{lr_at, AdamW};
use kiln_train::run_loop::{metrics_writer, run_steps, LoopSettings, Steps};
use kiln_train::{
    optimizer_step_batches, write_atomic, DataParallel, EvalResult, Observer, Replica, RunInfo,
    StepResult, Strategy, TrainError,
};

use crate::pack::IGNORE;
use kiln_chat::{read_records, split_held_out, ChatFormat};
use kiln_train::TuneConfig;

use crate::{pack, Row, SftError};

/// Where the model and data come from (the command line).
#[derive(Debug, Clone)]
pub struct SftSource {
    /// A GGUF file, HF directory or kiln run/checkpoint.
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    /// Held-out conversations; when empty, `sft.val_fraction` of `data` is held out.
    pub eval_data: Vec<PathBuf>,
}

/// What the run is about to do, for the log.
#[derive(Debug, Clone)]
pub struct SftInfo {
    pub mode: String,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Bytes of gradient + AdamW state LoRA does not keep for the frozen base (f32: 12 bytes a
    /// parameter), 0 for full fine-tuning.
    pub saved_state_bytes: usize,
    pub n_train_conversations: usize,
    pub n_val_conversations: usize,
    pub skipped_records: usize,
    pub train_rows: usize,
    pub train_label_tokens: usize,
    pub train_tokens: usize,
    pub truncated: usize,
    pub dropped_no_labels: usize,
    pub steps: u64,
    pub steps_per_epoch: u64,
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct SftSummary {
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub val_loss_before: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub wall_s: f64,
    pub stopped_early: bool,
    pub adapter_dir: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
}

/// SFT progress callbacks: the pretraining [`Observer`] plus the run's description.
pub trait SftObserver: Observer {
    fn on_sft_start(&mut self, _info: &SftInfo) {}
}

pub struct SftTrainer {
    pub cfg: TuneConfig,
    pub run_dir: PathBuf,
    /// The model, what trains (all weights, or the adapters alone) and its optimizer; or,
    /// under FSDP, this rank's shards.
    replica: Replica,
    pub lora: Option<LoraSpec>,
    /// The base the adapters train on, recorded next to every adapter written.
    adapter_base: kiln_load::AdapterBase,
    pub format: ChatFormat,
    pub train_rows: Vec<Row>,
    pub val_rows: Vec<Row>,
    pub info: SftInfo,
    model_config: ModelConfig,
    dropout_rng: SplitMix64,
    tokens_seen: u64,
    config_toml: String,
    /// Training FLOPs per token (6N + attention; 4N + attention under LoRA, where no weight
    /// gradient is computed) and the measured GEMM peak, for MFU.
    flops_per_token: f64,
    peak_flops: f64,
    /// The data-parallel group when the run has several ranks.
    dist: Option<DataParallel>,
}

/// This rank's rows of one global micro-batch, as a batch: a contiguous share of the rows.
/// A rank left without rows gets nothing, or under FSDP (whose gathers must pair up across
/// ranks) one row with no targets, which adds nothing to the loss or the gradients.
fn rank_part(
    d: &DataParallel,
    rows: &[&Row],
    max_len: usize,
    device: &Device,
    fsdp: bool,
) -> Result<Option<(TokenBatch, Tensor)>, SftError> {
    let mine = kiln_dist::shard_range(rows.len(), d.rank(), d.world());
    if !mine.is_empty() {
        return Ok(Some(batch_of(&rows[mine], max_len, device)?));
    }
    if !fsdp || rows.is_empty() {
        return Ok(None);
    }
    let (batch, targets) = batch_of(&rows[..1], max_len, device)?;
    let ignored = Tensor::full(IGNORE, targets.shape(), device)?;
    Ok(Some((batch, ignored)))
}

/// The run directory's files besides checkpoints: config (with the model's shape for
/// loaders), tokenizer with the template the run used (so `kiln chat` on the result renders
/// the same way), and the held-out conversations.
fn write_run_files(
    run_dir: &Path,
    config_toml: &str,
    format: &ChatFormat,
    model_config: &ModelConfig,
    val_convs: &[kiln_chat::Conversation],
) -> Result<(), SftError> {
    write_atomic(&run_dir.join("config.toml"), config_toml.as_bytes())?;
    let mut tok = format.tokenizer.clone();
    tok.chat_template = Some(format.source.clone());
    tok.save_hf(run_dir, model_config.max_seq_len)?;
    write_atomic(
        &run_dir.join("chat_template.jinja"),
        format.source.as_bytes(),
    )?;
    // The held-out conversations, as messages JSONL, for evaluating the result later.
    let held_out: String = val_convs
        .iter()
        .map(|c| {
            let msgs: Vec<serde_json::Value> = c
                .messages()
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect();
            serde_json::json!({ "messages": msgs }).to_string() + "\n"
        })
        .collect();
    write_atomic(&run_dir.join("held_out.jsonl"), held_out.as_bytes())?;
    Ok(())
}

fn io(path: &Path, e: std::io::Error) -> SftError {
    SftError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

impl SftTrainer {
    /// Loads the model, reads and packs the data, and sets up the run in `run_dir` (with
    /// `resume`, from its newest checkpoint).
    pub fn new(
        source: SftSource,
        config_file: Option<&Path>,
        overrides: &[String],
        run_dir: &Path,
        resume: bool,
        obs: &mut dyn SftObserver,
    ) -> Result<Self, SftError> {
        Self::new_with(source, config_file, overrides, run_dir, resume, obs, None)
    }

    /// [`SftTrainer::new`] as one rank of a data-parallel group (`dist.strategy` ddp, zero1,
    /// or fsdp for full fine-tuning): rank 0 writes the run's files; each rank trains on its
    /// rows of every micro-batch.
    pub fn new_with(
        source: SftSource,
        config_file: Option<&Path>,
        overrides: &[String],
        run_dir: &Path,
        resume: bool,
        obs: &mut dyn SftObserver,
        dist: Option<DataParallel>,
    ) -> Result<Self, SftError> {
        let device = Device::Cpu;
        let main = dist.as_ref().is_none_or(|d| d.is_main());
        if source.data.is_empty() {
            return Err(SftError::Config("no training data (--data FILE)".into()));
        }
        let tokenizer = kiln_load::load_tokenizer(&source.model)?;
        // The config needs the model's context for its default seq_len: read the shape first.
        let (format, model_config) = kiln_load::load_model_config(&source.model)?;
        kiln_load::check_vocab(&tokenizer, &model_config)?;
        let mut cfg = TuneConfig::load(config_file, overrides, model_config.max_seq_len)?;
        if cfg.train.seq_len > model_config.max_seq_len {
            return Err(SftError::Config(format!(
                "train.seq_len {} exceeds the model's context of {}",
                cfg.train.seq_len, model_config.max_seq_len
            )));
        }
        let lora = cfg.lora_spec()?;
        if cfg.sft.base_quantized && format != ModelFormat::Gguf {
            return Err(SftError::Config(format!(
                "--base-quantized keeps a GGUF base in its quantised blocks, but {} is not a GGUF file",
                source.model.display()
            )));
        }

        // Data: records → conversations → held-out split → examples → rows.
        let template = match &cfg.sft.template {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| io(p, e))?),
            None => None,
        };
        let format = ChatFormat::new(tokenizer, template)?;
        let mut records = read_records(&source.data, cfg.sft.skip_bad_records)?;
        if records.skipped > 0 {
            obs.on_message(&format!(
                "skipped {} bad record(s) (sft.skip_bad_records), e.g. {}",
                records.skipped,
                records.skipped_examples.join(" | ")
            ));
        }
        if let Some(n) = cfg.sft.max_records {
            records.conversations.truncate(n);
        }
        let (train_convs, val_convs) = if source.eval_data.is_empty() {
            let (tr, va) = split_held_out(
                records.conversations.len(),
                cfg.sft.val_fraction,
                cfg.train.seed,
            );
            let pick = |ix: &[usize]| {
                ix.iter()
                    .map(|&i| records.conversations[i].clone())
                    .collect::<Vec<_>>()
            };
            (pick(&tr), pick(&va))
        } else {
            let ev = read_records(&source.eval_data, cfg.sft.skip_bad_records)?;
            (records.conversations, ev.conversations)
        };
        if train_convs.is_empty() {
            return Err(SftError::Config("no training conversations".into()));
        }
        let encode_all = |convs: &[kiln_chat::Conversation]| -> Result<Vec<_>, SftError> {
            convs
                .iter()
                .map(|c| Ok(format.encode(c, cfg.sft.train_on_prompt)?))
                .collect()
        };
        let (seq_len, packing, trunc) = (cfg.train.seq_len, cfg.sft.packing, cfg.sft.truncation);
        let train = pack(&encode_all(&train_convs)?, seq_len, packing, trunc);
        let val = pack(&encode_all(&val_convs)?, seq_len, packing, trunc);
        if train.rows.is_empty() {
            return Err(SftError::Config(format!(
                "every training example lost its assistant tokens to truncation at train.seq_len = {seq_len}; raise it or use sft.truncation = \"keep_end\""
            )));
        }
        let rows_per_step = cfg.train.batch_size * cfg.train.grad_accum;
        let steps_per_epoch = train.rows.len().div_ceil(rows_per_step) as u64;
        cfg.finalize(steps_per_epoch);

        // Model: the trainable params and the model over them.
        let kiln_load::Trainable {
            mut model,
            params,
            mode,
            total_params,
            base: adapter_base,
        } = kiln_load::build_trainable(
            &source.model,
            &model_config,
            lora.as_ref(),
            cfg.sft.base_quantized,
            cfg.train.seed,
            &device,
        )?;
        model.set_activation_checkpointing(cfg.train.activation_checkpointing);
        model.set_precision(cfg.train.precision);
        let trainable = model.grad_layout(&params)?.total();
        let replica = match &dist {
            Some(d) if d.cfg.strategy == Strategy::Fsdp => {
                if lora.is_some() {
                    return Err(SftError::Config(
                        "dist.strategy = \"fsdp\" shards full fine-tuning; LoRA adapters are small enough to replicate: use \"ddp\" or \"zero1\"".into(),
                    ));
                }
                // Every rank loaded the same weights; each keeps its shards.
                d.comm
                    .broadcast(&params.flat().as_detached_tensor(), 0)
                    .map_err(TrainError::from)?;
                let mut f = Fsdp::new(
                    &model_config,
                    &params,
                    &cfg.optim,
                    d.cfg.param_dtype,
                    d.comm.clone(),
                )?;
                f.set_activation_checkpointing(cfg.train.activation_checkpointing);
                f.set_precision(cfg.train.precision);
                Replica::Sharded(Box::new(f))
            }
            _ => {
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
        let info = SftInfo {
            mode,
            trainable_params: trainable,
            total_params,
            saved_state_bytes: if lora.is_some() {
                total_params.saturating_sub(trainable) * 12
            } else {
                0
            },
            n_train_conversations: train_convs.len(),
            n_val_conversations: val_convs.len(),
            skipped_records: records.skipped,
            train_rows: train.rows.len(),
            train_label_tokens: train.n_label_tokens,
            train_tokens: train.n_tokens,
            truncated: train.truncated + val.truncated,
            dropped_no_labels: train.dropped_no_labels + val.dropped_no_labels,
            steps: cfg.train.steps,
            steps_per_epoch,
        };

        // The run directory: config (with the model's shape for loaders), tokenizer with the
        // template the run used (so `kiln chat` on the result renders the same way).
        std::fs::create_dir_all(run_dir).map_err(|e| io(run_dir, e))?;
        let config_toml = run_config_toml(&cfg, &model_config, &source, train.rows.len());
        if main {
            write_run_files(run_dir, &config_toml, &format, &model_config, &val_convs)?;
        }
        let full = model_config.train_flops_per_token(cfg.train.seq_len);
        let flops_per_token = if lora.is_some() {
            // No weight gradients: forward (2N) + input gradients (2N) of the 6N.
            full - 2.0 * model_config.param_counts().1 as f64
        } else {
            full
        };
        let peak_flops = match cfg.train.peak_flops {
            Some(p) => p,
            None => kiln_train::perf::measure_peak(&device, cfg.train.precision.effective())?,
        };
        let mut t = Self {
            flops_per_token,
            peak_flops,
            dropout_rng: SplitMix64::new(cfg.train.seed ^ 0x5F7),
            cfg,
            run_dir: run_dir.to_path_buf(),
            replica,
            lora,
            adapter_base,
            format,
            train_rows: train.rows,
            val_rows: val.rows,
            info,
            model_config,
            tokens_seen: 0,
            config_toml,
            dist,
        };
        if resume {
            match checkpoint::list(run_dir)?.last() {
                Some((_, dir)) => {
                    let dir = dir.clone();
                    t.load_checkpoint(&dir)?;
                    obs.on_message(&format!(
                        "resumed from {} (step {})",
                        dir.display(),
                        t.step()
                    ));
                }
                None => obs.on_message("no checkpoint to resume from; starting fresh"),
            }
        }
        Ok(t)
    }

    pub fn step(&self) -> u64 {
        self.replica.step()
    }

    /// The model (`None` under FSDP, where this rank holds shards).
    pub fn model(&self) -> Option<&Llama> {
        self.replica.model()
    }

    /// What trains: all weights, or the adapters alone (`None` under FSDP).
    pub fn params(&self) -> Option<&Params> {
        self.replica.params()
    }

    fn device(&self) -> Device {
        self.replica.device()
    }

    /// The rows of optimizer step `step` (0-based), as micro-batches of row indices.
    pub fn step_rows(&self, step: u64) -> Vec<Vec<usize>> {
        let n = self.train_rows.len();
        let rps = self.cfg.train.batch_size * self.cfg.train.grad_accum;
        let spe = n.div_ceil(rps) as u64;
        let (epoch, k) = (step / spe, (step % spe) as usize);
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng =
            SplitMix64::new(self.cfg.train.seed ^ 0xE90C ^ epoch.wrapping_mul(0x9E37_79B9));
        for i in (1..n).rev() {
            let j = (rng.next_f64() * (i + 1) as f64) as usize;
            order.swap(i, j.min(i));
        }
        let rows = &order[k * rps..((k + 1) * rps).min(n)];
        rows.chunks(self.cfg.train.batch_size)
            .map(|c| c.to_vec())
            .collect()
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<kiln_train::StepResult, SftError> {
        let micro = self.step_rows(self.step());
        if let Some(d) = self.dist.clone() {
            return self.train_step_distributed(&d, &micro);
        }
        let batches = micro
            .iter()
            .map(|ix| {
                let rows: Vec<&Row> = ix.iter().map(|&i| &self.train_rows[i]).collect();
                batch_of(&rows, self.cfg.train.seq_len, &self.device())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lr = lr_at(self.step(), self.cfg.train.steps, &self.cfg.optim);
        let Replica::Full {
            model,
            params,
            optimizer,
        } = &mut self.replica
        else {
            unreachable!("FSDP runs with a data-parallel group")
        };
        let r = optimizer_step_batches(
            model,
            params,
            optimizer,
            &batches,
            lr,
            self.cfg.optim.grad_clip,
            Some(&mut self.dropout_rng),
        )?;
        self.tokens_seen += r.n_tokens as u64;
        Ok(r)
    }

    /// This rank's rows of each micro-batch: a contiguous share of the row indices (a short
    /// last micro-batch may leave a rank none).
    fn train_step_distributed(
        &mut self,
        d: &DataParallel,
        micro: &[Vec<usize>],
    ) -> Result<kiln_train::StepResult, SftError> {
        let (mut n_valid, mut n_tokens) = (0, 0);
        let mut local = Vec::new();
        let device = self.device();
        let fsdp = matches!(self.replica, Replica::Sharded(_));
        for ix in micro {
            let rows: Vec<&Row> = ix.iter().map(|&i| &self.train_rows[i]).collect();
            // The global batch's counts, as one process would see them.
            let (whole, targets) = batch_of(&rows, self.cfg.train.seq_len, &device)?;
            n_valid += kiln_kernels::count_valid_targets(&targets)?;
            n_tokens += whole.tokens.elem_count();
            if let Some(b) = rank_part(d, &rows, self.cfg.train.seq_len, &device, fsdp)? {
                local.push(b);
            }
        }
        let lr = lr_at(self.step(), self.cfg.train.steps, &self.cfg.optim);
        let (clip, rng) = (self.cfg.optim.grad_clip, Some(&mut self.dropout_rng));
        let r = match &mut self.replica {
            Replica::Full {
                model,
                params,
                optimizer,
            } => d.step(
                model, params, optimizer, &local, n_valid, n_tokens, lr, clip, rng,
            )?,
            Replica::Sharded(f) => f.train_step(&local, n_valid, n_tokens, lr, clip, rng)?,
        };
        self.tokens_seen += r.n_tokens as u64;
        Ok(r)
    }

    /// Mean loss per assistant token over the held-out rows (`None` without held-out data);
    /// split over the ranks of a distributed run.
    pub fn evaluate(&mut self) -> Result<Option<f64>, SftError> {
        let (bs, len) = (self.cfg.train.batch_size, self.cfg.train.seq_len);
        let device = self.device();
        let (sum, n) = match (&mut self.replica, &self.dist) {
            (Replica::Full { model, .. }, None) => {
                return evaluate_rows(model, &self.val_rows, bs, len)
            }
            (Replica::Full { model, .. }, Some(d)) => {
                let mine = kiln_dist::shard_range(self.val_rows.len(), d.rank(), d.world());
                loss_sums(model, &self.val_rows[mine], bs, len)?
            }
            (Replica::Sharded(f), Some(d)) => {
                // Every rank runs a forward for every global batch (FSDP's gathers pair up),
                // on its rows of it or on a row with no targets.
                let (mut sum, mut n) = (0.0, 0);
                for chunk in self.val_rows.chunks(bs.max(1)) {
                    let rows: Vec<&Row> = chunk.iter().collect();
                    let (batch, targets) =
                        rank_part(d, &rows, len, &device, true)?.expect("FSDP always gets a batch");
                    let (s, k) = f.loss_sum(&batch, &targets)?;
                    sum += s;
                    n += k;
                }
                (sum, n)
            }
            (Replica::Sharded(_), None) => unreachable!("FSDP runs with a data-parallel group"),
        };
        let d = self.dist.as_ref().expect("distributed");
        let mut sums = [sum, n as f64];
        d.comm
            .all_reduce_sum_f64(&mut sums)
            .map_err(TrainError::from)?;
        Ok((sums[1] > 0.0).then(|| sums[0] / sums[1]))
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf, SftError> {
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step(),
            tokens_seen: self.tokens_seen,
            // The schedule is a function of (seed, step): the sampler records the cursor.
            sampler: WindowSampler {
                seed: self.cfg.train.seed,
                batch_size: self.cfg.train.batch_size,
                ctx: self.cfg.train.seq_len,
                next_batch: self.step(),
            },
            dropout_rng: self.dropout_rng.clone(),
            files: Default::default(),
        };
        let base = &self.adapter_base;
        // Rank 0's part (the weights and adapter, whole, unless FSDP shards them).
        let write_main = |dir: &Path| -> Result<(), TrainError> {
            match &self.replica {
                Replica::Full { params, .. } => {
                    params.save(&dir.join(MODEL_FILE))?;
                    if let Some(spec) = &self.lora {
                        kiln_load::save_adapter(&dir.join("adapter"), params, spec, base)
                            .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
                    }
                    Ok(())
                }
                Replica::Sharded(f) => kiln_train::dist::write_manifest(dir, &f.manifest()),
            }
        };
        // Every rank's part in a distributed run.
        let write_shards = |d: &DataParallel, dir: &Path| -> Result<(), TrainError> {
            match &self.replica {
                Replica::Full { optimizer, .. } => d.write_optimizer_shard(dir, optimizer),
                Replica::Sharded(f) => f.write_shards(dir),
            }
        };
        let Some(d) = &self.dist else {
            let Replica::Full { optimizer, .. } = &self.replica else {
                unreachable!("FSDP runs with a data-parallel group")
            };
            return Ok(checkpoint::save(
                &self.run_dir,
                state,
                &self.config_toml,
                |dir| {
                    write_main(dir)?;
                    optimizer.save(&dir.join(OPTIMIZER_FILE))
                },
                &kiln_train::checkpoint::Retention::of(&self.cfg.train)?,
            )?);
        };
        // Distributed: replicated weights are written by rank 0 and each rank writes its shard
        // of the optimizer state (FSDP: of everything).
        d.save_checkpoint(
            &self.run_dir,
            state,
            &self.config_toml,
            &kiln_train::checkpoint::Retention::of(&self.cfg.train)?,
            |dir| {
                write_main(dir)?;
                if let Replica::Full { optimizer, .. } = &self.replica {
                    kiln_train::dist::write_manifest(dir, &d.optimizer_manifest(optimizer))?;
                }
                Ok(())
            },
            |dir| write_shards(d, dir),
        )
        .map_err(Into::into)
    }

    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<(), SftError> {
        let state = checkpoint::load_state(dir)?;
        if state.sampler.batch_size != self.cfg.train.batch_size
            || state.sampler.ctx != self.cfg.train.seq_len
        {
            return Err(SftError::Config(format!(
                "{}: saved with batch_size {} / seq_len {}, but the config now says {} / {}",
                dir.display(),
                state.sampler.batch_size,
                state.sampler.ctx,
                self.cfg.train.batch_size,
                self.cfg.train.seq_len
            )));
        }
        let saved_rows = std::fs::read_to_string(dir.join(checkpoint::CONFIG_FILE))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("source")?.get("train_rows")?.as_integer());
        if saved_rows != Some(self.train_rows.len() as i64) {
            return Err(SftError::Config(format!(
                "{}: saved after packing the data into {} rows, but it now makes {} rows: resume with the same --data, template and [sft] settings",
                dir.display(),
                saved_rows.map_or("an unknown number of".into(), |n| n.to_string()),
                self.train_rows.len()
            )));
        }
        // The rest of the run's settings, after the data (whose error says more).
        checkpoint::check_resume_config(dir, &self.config_toml)?;
        let device = self.device();
        // Written by any number of ranks (or one process).
        let moments = checkpoint::load_moments(dir, &device)?;
        match &mut self.replica {
            Replica::Full {
                params, optimizer, ..
            } => {
                params.assign_from_file(&dir.join(MODEL_FILE))?;
                optimizer.load_tensors(&moments, &dir.display().to_string(), state.step)?;
            }
            Replica::Sharded(f) => {
                let model_file = if dir.join(MODEL_FILE).exists() {
                    dir.join(MODEL_FILE)
                } else {
                    dir.join(kiln_model::sharded::SHARD_MANIFEST)
                };
                f.load_params(&Params::load(&model_file, &self.model_config, &device)?)?;
                f.load_moments(&moments, state.step)?;
            }
        }
        self.dropout_rng = state.dropout_rng;
        self.tokens_seen = state.tokens_seen;
        Ok(())
    }

    /// Runs to `train.steps` (or until `stop`), evaluating before the first step and on
    /// schedule, checkpointing, and writing the adapter (LoRA) and the loss curve at the end.
    pub fn run(
        &mut self,
        obs: &mut dyn SftObserver,
        stop: &AtomicBool,
    ) -> Result<SftSummary, SftError> {
        let t0 = Instant::now();
        let start = self.step();
        let main = self.dist.as_ref().is_none_or(|d| d.is_main());
        // Rank 0 alone writes metrics, the adapter and plots.
        let mut metrics = metrics_writer(&self.run_dir, start, self.dist.as_ref())?;
        obs.on_sft_start(&self.info);
        obs.on_start(&RunInfo {
            run_dir: self.run_dir.clone(),
            total_params: self.info.total_params,
            non_embedding_params: self.model_config.param_counts().1,
            flops_per_token: self.flops_per_token,
            peak_flops: self.peak_flops,
            tokens_per_step: self.cfg.train.batch_size
                * self.cfg.train.grad_accum
                * self.cfg.train.seq_len,
            start_step: start,
            total_steps: self.cfg.train.steps,
            n_train_tokens: self.info.train_tokens as u64,
            n_val_tokens: self.val_rows.iter().map(Row::len).sum::<usize>() as u64,
        });
        let mut val_loss_before = None;
        if start == 0 {
            if let Some(v) = self.evaluate()? {
                val_loss_before = Some(v);
                let row = MetricsRow::eval(0, 0, v, None);
                if let Some(m) = metrics.as_mut() {
                    m.write(&row)?;
                }
                obs.on_eval(&row);
            }
        }
        // The loop borrows the trainer mutably: it gets its own copies of the settings.
        let (train, dist) = (self.cfg.train.clone(), self.dist.clone());
        let settings = LoopSettings {
            train: &train,
            flops_per_token: self.flops_per_token,
            peak_flops: self.peak_flops,
            dist: dist.as_ref(),
        };
        let end = run_steps(self, &settings, &mut metrics, obs, stop)?;
        let mut summary = SftSummary {
            steps: self.step(),
            final_loss: end.final_loss,
            val_loss_before,
            final_val_loss: end.final_val.map(|e| e.loss),
            wall_s: t0.elapsed().as_secs_f64(),
            stopped_early: end.stopped_early,
            adapter_dir: None,
            last_checkpoint: end.last_checkpoint,
        };
        if !main {
            return Ok(summary);
        }
        if let (Some(spec), Some(params)) = (&self.lora, self.params()) {
            let dir = self.run_dir.join("adapter");
            kiln_load::save_adapter(&dir, params, spec, &self.adapter_base)?;
            summary.adapter_dir = Some(dir);
        }
        summary.wall_s = t0.elapsed().as_secs_f64();
        kiln_train::plot::plot_run(&self.run_dir)?;
        Ok(summary)
    }
}

impl Steps for SftTrainer {
    type Error = SftError;
    fn steps_done(&self) -> u64 {
        self.step()
    }
    fn tokens_seen(&self) -> u64 {
        self.tokens_seen
    }
    fn train_step(&mut self) -> Result<StepResult, SftError> {
        SftTrainer::train_step(self)
    }
    fn evaluate(&mut self) -> Result<Option<EvalResult>, SftError> {
        Ok(SftTrainer::evaluate(self)?.map(|loss| EvalResult {
            loss,
            accuracy: None,
        }))
    }
    fn save_checkpoint(&self) -> Result<PathBuf, SftError> {
        SftTrainer::save_checkpoint(self)
    }
}

/// The run's `config.toml`: the SFT config, the model's resolved `[model]` (so kiln's loaders
/// read a fully fine-tuned run like a pretraining one) and where model and data came from.
fn run_config_toml(
    cfg: &TuneConfig,
    model: &ModelConfig,
    source: &SftSource,
    train_rows: usize,
) -> String {
    let mut root: toml::Table = cfg.to_toml().parse().expect("invariant: own TOML parses");
    root.insert(
        "model".into(),
        toml::Value::try_from(model.resolved()).expect("invariant: ModelConfig serialises"),
    );
    let paths = |v: &[PathBuf]| {
        toml::Value::Array(
            v.iter()
                .map(|p| toml::Value::String(p.display().to_string()))
                .collect(),
        )
    };
    let mut src = toml::Table::new();
    src.insert(
        "model".into(),
        toml::Value::String(source.model.display().to_string()),
    );
    src.insert("data".into(), paths(&source.data));
    src.insert("eval_data".into(), paths(&source.eval_data));
    // The schedule indexes these rows: a resume checks it finds the same number.
    src.insert("train_rows".into(), toml::Value::Integer(train_rows as i64));
    root.insert("source".into(), toml::Value::Table(src));
    toml::to_string(&root).expect("invariant: serialises")
}

/// Padded lengths are multiples of this (capped at the row length), so micro-batches come in
/// a few shapes: the buffers of one step are reused by the next instead of piling up in the
/// allocator's cache as ever new sizes.
pub const PAD_MULTIPLE: usize = 64;

/// Rows → one micro-batch: padded to the longest row rounded up to [`PAD_MULTIPLE`] and at
/// most `max_len` (pad tokens are their own segment with no target), with segment ids and
/// per-segment positions.
pub fn batch_of(
    rows: &[&Row],
    max_len: usize,
    device: &Device,
) -> Result<(TokenBatch, Tensor), SftError> {
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let t = longest
        .div_ceil(PAD_MULTIPLE)
        .saturating_mul(PAD_MULTIPLE)
        .min(max_len)
        .max(longest);
    let b = rows.len();
    let (mut tokens, mut targets, mut segs) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b),
    );
    for r in rows {
        let pad = t - r.len();
        tokens.extend_from_slice(&r.tokens);
        tokens.extend(std::iter::repeat_n(0u32, pad));
        targets.extend_from_slice(&r.targets);
        targets.extend(std::iter::repeat_n(IGNORE, pad));
        let mut s = r.segments.clone();
        let pad_seg = s.last().map_or(0, |x| x + 1);
        s.extend(std::iter::repeat_n(pad_seg, pad));
        segs.push(s);
    }
    let tokens = Tensor::from_vec(tokens, (b, t), device)?;
    let batch = TokenBatch::packed(tokens, &segs)?;
    Ok((batch, Tensor::from_vec(targets, b * t, device)?))
}

/// Mean cross-entropy per target over `rows` (forward only), `None` when there are none.
pub(crate) fn evaluate_rows(
    model: &Llama,
    rows: &[Row],
    batch_size: usize,
    max_len: usize,
) -> Result<Option<f64>, SftError> {
    let (sum, n) = loss_sums(model, rows, batch_size, max_len)?;
    Ok((n > 0).then(|| sum / n as f64))
}

/// The summed loss over the assistant tokens of `rows`, and their count.
fn loss_sums(
    model: &Llama,
    rows: &[Row],
    batch_size: usize,
    max_len: usize,
) -> Result<(f64, usize), SftError> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(batch_size.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let (batch, targets) = batch_of(&refs, max_len, model.device())?;
        let hidden = model.hidden_states(&batch, None)?;
        let (s, k) = model.lm_loss_sum(&hidden, &targets)?;
        sum += s;
        n += k;
    }
    Ok((sum, n))
}
