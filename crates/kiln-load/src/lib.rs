//! kiln-load: everything between a `--model PATH` and a model in memory, in one place.
//!
//! * [`ModelFormat::detect`]: a kiln run directory, a kiln checkpoint directory, a weights file
//!   next to a run's `config.toml`, a Hugging Face directory or a GGUF file.
//! * [`resolve_kiln`]: a run directory → its newest complete checkpoint (verified: every file's
//!   size and CRC32, see [`checkpoint`]), the `[model]` of the run's `config.toml` and the
//!   tokenizer next to it (or the run's dataset's).
//! * [`load_weights`]: dense f32 [`Params`](kiln_model::Params) of any format (a GGUF
//!   dequantised), what training and evaluation use.
//! * [`load_tokenizer`]: the [`ModelTokenizer`](kiln_data::ModelTokenizer) of any format.
//! * [`load_adapter`] / [`save_adapter`]: LoRA adapters in PEFT's directory format.
//! * [`load_model`] / [`load_inference`]: a `Box<dyn CausalLm>` with the [`Weights`] asked
//!   for: a GGUF's quantised weights as stored, dense f32, or dense weights requantised.
//!
//! Dependencies point one way: kernels → model → load → train/infer → cli. This crate never
//! prints, parses argv or reads environment variables; errors name the path they are about.

pub mod adapter;
pub mod checkpoint;
mod error;
pub mod export;
mod format;
mod infer;
mod resolve;
mod run_config;
mod tokenizer;
mod trainable;
mod weights;

pub use adapter::{
    load_adapter, merge_adapter, save_adapter, AdapterBase, AdapterConfig, LoadedAdapter,
};
pub use checkpoint::{
    file_digest, latest_checkpoint, list_checkpoints, verify_checkpoint, CheckpointManifest,
    FileDigest, CHECKPOINTS_DIR, CHECKPOINT_FORMAT_VERSION, CONFIG_FILE, MODEL_FILE, STATE_FILE,
    TOKENIZER_FILE,
};
pub use error::LoadError;
pub use format::ModelFormat;
pub use infer::{
    generation_defaults, load_inference, load_inference_with_adapter, load_llama, load_model,
    load_model_with_adapter, AdapterChoice, GenerationDefaults, InferenceModel, LoadedModel,
    Weights,
};
pub use resolve::{resolve_kiln, KilnRun, ResolvedModel};
pub use run_config::{model_from_toml, read_run_model, RunModel};
pub use tokenizer::{check_vocab, load_tokenizer};
pub use trainable::{build_trainable, Trainable};
pub use weights::{check_init_compatible, load_model_config, load_weights, LoadedWeights};
