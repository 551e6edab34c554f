//! kiln-rlhf: learning from preferences on kiln's model core. A reward model (the trunk plus a
//! scalar head read at the last token, Bradley–Terry loss), DPO (completion log-probabilities
//! against a frozen reference), PPO (KL-penalised reward, value head, GAE, clipped objective)
//! and GRPO (group-relative advantages). Every trainer reads records as SFT does (kiln-chat's
//! records, chat template and labels), trains all weights or LoRA adapters, and writes
//! metrics, plots and checkpoints with exact resume.
//!
//! The objectives are plain functions in [`losses`] returning values and gradients with
//! respect to what the heads produce; [`seqs`] runs the trunk and heads and carries those
//! gradients back.

mod config;
mod data;
mod learner;
pub mod losses;
mod offline;
mod online;
mod reward;
pub mod seqs;

pub use config::{DpoOptions, Method, MethodOptions, OnlineOptions, RewardOptions, RlhfConfig};
pub use data::{
    parse_preference, parse_prompt, read_preferences, read_prompts, PreferencePair, PromptRecord,
};
pub use learner::{
    step_items, Learner, Metrics, MetricsLog, Quiet, RlhfObserver, TrainedHead, HEAD_FILE,
};
pub use offline::{encode_pairs, EncodedPair, PairSource, PairSummary, PairTrainer};
pub use online::{
    sample_responses, OnlineSource, OnlineSummary, OnlineTrainer, RewardSpec, Sample,
};
pub use reward::{
    export_reward_hf, reward_checkpoint, RewardCmd, RewardFn, RewardItem, RewardModel, RewardSource,
};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RlhfError {
    #[error("{origin}: {msg}")]
    Record { origin: String, msg: String },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("reward: {0}")]
    Reward(String),
    #[error(transparent)]
    Chat(#[from] kiln_chat::ChatError),
    #[error(transparent)]
    Train(#[from] kiln_train::TrainError),
    #[error(transparent)]
    Load(#[from] kiln_load::LoadError),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Infer(#[from] kiln_infer::InferError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
