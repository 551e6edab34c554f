//! kiln-infer: token sampling (temperature, top-k, top-p) and the generate loop over the
//! model's KV cache, with streaming output and stop strings.

pub mod chat;
mod generate;
mod sampling;

pub use chat::{ChatTemplate, Conversation, Message};
pub use generate::{generate, generate_batch, FinishReason, GenerateOptions, Generation};
pub use sampling::{Sampler, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("prompt has {prompt} tokens but the context window is {max_seq_len}; shorten it or pass --truncate-prompt to keep its last tokens")]
    PromptTooLong { prompt: usize, max_seq_len: usize },
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
