//! kiln-infer: token sampling (temperature, top-k, top-p, min-p, repetition penalties), the
//! generate loop over the model's
//! KV cache (streaming output, stop tokens and strings), chat templates and the chat turn
//! policy ([`ChatSession`]: history kept within the context, the reply's token budget), and
//! an MLM encoder's fill-mask ([`fill_mask`]).

pub mod chat;
pub mod fill_mask;
mod generate;
mod sampling;

pub use chat::{
    rewrite_generation_tags, ChatConfig, ChatSession, ChatTemplate, ChatTurn, Conversation,
    Message, GENERATION_END, GENERATION_START,
};
pub use generate::{
    generate, generate_batch, prepare_prompt, row_values, FinishReason, GenerateOptions,
    Generation, Sequence, TokenConstraint,
};
pub use sampling::{fresh_seed, log_sum_exp, top_logprobs, Sampler, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("prompt has {prompt} tokens but the context window is {max_seq_len}; shorten it or pass --truncate-prompt to keep its last tokens")]
    PromptTooLong { prompt: usize, max_seq_len: usize },
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{} has no chat template; give one (kiln chat --template FILE)", .0.display())]
    NoChatTemplate(std::path::PathBuf),
    #[error("the newest chat turn alone needs {prompt} prompt tokens, more than the {budget} that fit ({max_context}-token context less {reserve} kept for the reply); shorten the message, or lower --max-new-tokens")]
    TurnTooLong {
        prompt: usize,
        budget: usize,
        max_context: usize,
        reserve: usize,
    },
    #[error("{0}")]
    FillMask(String),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
