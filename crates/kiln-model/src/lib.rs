//! kiln-model: the LLaMA-style model (config, parameters, forward, KV cache) and its
//! parameter/FLOP accounting. It knows nothing of optimizers, data or parallelism.

mod backward;
mod cache;
mod config;
pub mod gguf;
pub mod hf;
mod model;
mod params;
pub mod qkernels;
mod qmodel;
mod rng;
mod rope;

pub use cache::KvCache;
pub use config::{AttentionMode, ModelConfig, RopeScaling};
pub use model::{loss_sum, Llama};
pub use params::Params;
pub use qmodel::{CausalLm, QLinear, QLlama};
pub use rng::SplitMix64;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(
        "sequence of {needed} tokens exceeds the context window (max_seq_len = {max_seq_len})"
    )]
    ContextOverflow { needed: usize, max_seq_len: usize },
    #[error("{path}: {msg}")]
    Weights { path: String, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
