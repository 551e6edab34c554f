//! kiln-model: the LLaMA-style model (config, parameters and gradients in flat storage, one
//! decoder as a trunk plus heads, `Linear` projections with LoRA, KV cache, quantised weights)
//! and its parameter/FLOP accounting. It knows nothing of optimizers, data or parallelism.

mod block;
mod cache;
mod config;
mod decoding;
mod flat;
pub mod gguf;
pub mod heads;
pub mod hf;
pub mod linear;
mod model;
mod params;
pub mod quantize;
mod quantized;
mod rope;
pub mod sentence;
pub mod sharded;

pub use cache::KvCache;
pub use config::{Activation, AttentionMode, LayerAttention, LayerRope, ModelConfig, RopeScaling};
pub use decoding::CausalLm;
pub use flat::{FlatEntry, FlatLayout, Grads};
pub use heads::{
    last_token_rows, logprobs_of, loss_sum, ScalarHead, LOGITS_CHUNK_ELEMENTS,
    LOGPROB_CHUNK_ELEMENTS,
};
pub use kiln_rng::SplitMix64;
pub use linear::set_candle_qmatmul;
pub use linear::{Linear, LinearWeight, Lora, Precision};
pub use model::{norm_fingerprint, LayerHooks, Llama, LoraSpec, TokenBatch, Trunk, LORA_TARGETS};
pub use params::{flat_group, is_lora_name, Params};
pub use quantized::QLlama;

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
    /// A [`LayerHooks`] callback failed (e.g. a collective of distributed training).
    #[error("{0}")]
    Hook(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
