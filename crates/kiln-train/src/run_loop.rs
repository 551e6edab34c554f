//! The step loop every trainer runs (pretraining, SFT): the stop flag agreed by every rank,
//! one optimizer step, its metrics row (written by rank 0 alone), evaluation and checkpoints
//! on the `[train]` schedule, and a last checkpoint when stopped early so the run resumes.
//! What a step, an evaluation or a checkpoint is stays with each trainer ([`Steps`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::metrics::{MetricsRow, MetricsWriter};
use crate::{DataParallel, EvalResult, Observer, StepResult, TrainConfig, TrainError};

/// A trainer as the loop sees it.
pub trait Steps {
    type Error: From<TrainError>;
    /// Optimizer steps completed.
    fn steps_done(&self) -> u64;
    fn tokens_seen(&self) -> u64;
    fn train_step(&mut self) -> Result<StepResult, Self::Error>;
    /// The validation loss (and accuracy), or `None` when there is nothing to validate on.
    fn evaluate(&mut self) -> Result<Option<EvalResult>, Self::Error>;
    fn save_checkpoint(&self) -> Result<PathBuf, Self::Error>;
}

/// The loop's settings: the schedule, the MFU inputs of each row, the data-parallel group.
pub struct LoopSettings<'a> {
    pub train: &'a TrainConfig,
    pub flops_per_token: f64,
    pub peak_flops: f64,
    pub dist: Option<&'a DataParallel>,
}

/// How the loop ended.
#[derive(Debug, Default)]
pub struct LoopEnd {
    pub final_loss: Option<f64>,
    pub final_val: Option<EvalResult>,
    pub stopped_early: bool,
    pub last_checkpoint: Option<PathBuf>,
}

/// Rank 0's `metrics.jsonl` writer for a run continuing after `start_step` (earlier rows are
/// kept, later ones dropped); the other ranks write none.
pub fn metrics_writer(
    run_dir: &Path,
    start_step: u64,
    dist: Option<&DataParallel>,
) -> Result<Option<MetricsWriter>, TrainError> {
    if dist.is_some_and(|d| !d.is_main()) {
        return Ok(None);
    }
    MetricsWriter::open(&run_dir.join("metrics.jsonl"), start_step).map(Some)
}

/// Runs `trainer` to `train.steps`, or until `stop` is set on any rank (e.g. by Ctrl-C: every
/// rank stops at the same step, and a checkpoint is saved if a step was taken). `metrics` is
/// rank 0's writer (`None` on the other ranks).
pub fn run_steps<S: Steps>(
    trainer: &mut S,
    settings: &LoopSettings,
    metrics: &mut Option<MetricsWriter>,
    obs: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<LoopEnd, S::Error> {
    let t = settings.train;
    let start = trainer.steps_done();
    let mut end = LoopEnd::default();
    let mut write = |row: &MetricsRow| match metrics.as_mut() {
        Some(m) => m.write(row),
        None => Ok(()),
    };
    while trainer.steps_done() < t.steps {
        let mut stopping = [f64::from(u8::from(stop.load(Ordering::SeqCst)))];
        if let Some(d) = settings.dist {
            // Ctrl-C reaches the ranks at different times: they agree on the step to stop at.
            d.comm
                .all_reduce_max_f64(&mut stopping)
                .map_err(TrainError::from)?;
        }
        if stopping[0] > 0.0 {
            end.stopped_early = true;
            break;
        }
        let started = Instant::now();
        let r = trainer.train_step()?;
        let secs = started.elapsed().as_secs_f64();
        let step = trainer.steps_done();
        if !r.loss.is_finite() {
            return Err(TrainError::Diverged {
                step,
                what: format!("loss is {}", r.loss),
            }
            .into());
        }
        let row = MetricsRow::train(
            step,
            trainer.tokens_seen(),
            &r,
            secs,
            settings.flops_per_token,
            settings.peak_flops,
        );
        let logged = t.logs_at(step);
        if logged {
            write(&row)?;
        }
        end.final_loss = Some(r.loss);
        obs.on_step(&row, logged);
        if t.evaluates_at(step) {
            if let Some(eval) = trainer.evaluate()? {
                let row = MetricsRow::eval(step, trainer.tokens_seen(), eval.loss, eval.accuracy);
                write(&row)?;
                end.final_val = Some(eval);
                obs.on_eval(&row);
            }
        }
        if t.checkpoints_at(step) {
            let dir = trainer.save_checkpoint()?;
            obs.on_checkpoint(&dir);
            end.last_checkpoint = Some(dir);
        }
    }
    // A stop right after a scheduled checkpoint has nothing new to save.
    let saved_already = t.checkpoints_at(trainer.steps_done());
    if end.stopped_early && trainer.steps_done() > start && !saved_already {
        let dir = trainer.save_checkpoint()?;
        obs.on_checkpoint(&dir);
        end.last_checkpoint = Some(dir);
    }
    Ok(end)
}
