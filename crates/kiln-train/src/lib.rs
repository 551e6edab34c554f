//! kiln-train: run configs, AdamW, the LR schedule, the training step and loop, atomic
//! checkpoints with exact resume, metrics.jsonl and loss plots.

pub mod checkpoint;
mod config;
mod dataset;
pub mod dist;
pub mod fsdp;
pub mod metrics;
pub mod optim;
pub mod perf;
pub mod plot;
pub mod resolve;
pub mod run_loop;
mod trainer;
mod tune;

pub use config::{
    apply_override, DataConfig, DistConfig, Objective, OptimConfig, ParamDtype, RunConfig,
    Strategy, TrainConfig,
};
pub use dataset::ensure_dataset;
pub use dist::DataParallel;
pub use trainer::{
    evaluate_loss, evaluate_mlm, optimizer_step, optimizer_step_batches, write_atomic, EvalResult,
    Observer, Replica, RunInfo, RunSummary, Silent, StepResult, Trainer,
};
pub use tune::{LoraOptions, SftOptions, Truncation, TuneConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config error: {0}")]
    Config(String),
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("training diverged at step {step}: {what}")]
    Diverged { step: u64, what: String },
    #[error(transparent)]
    Load(#[from] kiln_load::LoadError),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Dist(#[from] kiln_dist::DistError),
}
