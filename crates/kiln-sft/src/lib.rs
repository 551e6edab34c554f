//! kiln-sft: instruction tuning. Chat records (Alpaca, messages, ShareGPT, TRL's, tool calls)
//! are read, rendered with the model's chat template and labelled on the assistant's tokens
//! only by kiln-chat, packed into rows with segment ids ([`pack`]) and trained with the shared
//! model core: full
//! fine-tuning, LoRA on a frozen dense base, or LoRA on a base kept in its GGUF blocks (QLoRA).
//! Adapters are written in PEFT's format (kiln-load's `adapter` module).
//!
//! A new objective is a data builder and a head: SFT is this crate's data builder plus the
//! model's LM head with `-100` on every non-assistant target.

mod pack;
mod trainer;

pub use pack::{pack, Packed, Row};
pub use trainer::{batch_of, SftInfo, SftObserver, SftSource, SftSummary, SftTrainer};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sft config: {0}")]
    Config(String),
    #[error(transparent)]
    Chat(#[from] kiln_chat::ChatError),
    #[error(transparent)]
    Infer(#[from] kiln_infer::InferError),
    #[error(transparent)]
    Train(#[from] kiln_train::TrainError),
    #[error(transparent)]
    Load(#[from] kiln_load::LoadError),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
