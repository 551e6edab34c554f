//! Data pipeline for kiln: tokenizers, prepared token shards and the training sampler.
//!
//! The flow is
//!
//! 1. [`train_bpe`] (or [`KilnTokenizer::load`]) gives a byte-level BPE tokenizer;
//! 2. [`prepare_dataset`] tokenizes text/JSONL sources into `train.bin` / `val.bin`
//!    plus `tokenizer.json` and `meta.json` in one directory;
//! 3. [`Dataset::open`] memory-maps that directory;
//! 4. [`WindowSampler`] draws reproducible training windows from the train shard and
//!    [`eval_batches`] walks the validation shard deterministically.
//!
//! Everything here is deterministic given its inputs, so a run can be resumed
//! (the sampler is serialisable) and a Python reference can reproduce the same batches.

mod error;
pub mod gguf_tokenizer;
mod mlm;
mod model_tokenizer;
mod prepare;
mod sampler;
mod shard;
mod tokenizer;

pub use error::{DataError, Result};
pub use mlm::{
    add_mlm_special_tokens, mlm_seed, MaskAction, MlmMasker, MlmOptions, CLS_TOKEN, IGNORE_INDEX,
    MASK_TOKEN, MLM_SPECIAL_TOKENS, PAD_TOKEN, SEP_TOKEN, VAL_MASK_SEED,
};
pub use model_tokenizer::{is_gguf, ModelTokenizer};
pub use prepare::{expand_sources, prepare_dataset, DatasetMeta, PrepareOptions};
pub use sampler::{eval_batch_count, eval_batches, splitmix64, window_start, Batch, WindowSampler};
pub use shard::{Dataset, Dtype, TokenShard};
pub use tokenizer::{train_bpe, BpeTrainOptions, IncrementalDecoder, KilnTokenizer, EOS_TOKEN};
