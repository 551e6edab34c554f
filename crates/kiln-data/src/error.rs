//! The crate's single error type. Every variant carries enough context (file, line,
//! field, sizes) for the message alone to tell the user what to fix.

use std::path::PathBuf;

/// Result alias used throughout kiln-data.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Errors from tokenizers, dataset preparation, shards and the sampler.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A filesystem operation failed on `path`. The OS error is part of the message and not
    /// a `source`, so an error chain does not print it twice.
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },

    /// The `tokenizers` library failed (loading, saving, training, encoding or decoding).
    #[error("tokenizer error while {context}: {cause}")]
    Tokenizer {
        context: String,
        cause: tokenizers::Error,
    },

    /// A GGUF file's header cannot be read (truncated, not a GGUF, a malformed value).
    #[error("{path}: {msg}")]
    Gguf { path: PathBuf, msg: String },

    /// A source file given to `prepare_dataset` or `train_bpe` does not exist.
    #[error("source not found: {path}")]
    MissingSource { path: PathBuf },

    /// A source directory contains no `.txt` / `.jsonl` files.
    #[error("source directory {path} contains no .txt or .jsonl files")]
    EmptySourceDir { path: PathBuf },

    /// A source file is not a `.txt` or `.jsonl` file.
    #[error("unsupported source {path}: expected a .txt or .jsonl file (or a directory of them)")]
    UnsupportedSource { path: PathBuf },

    /// A text source is not valid UTF-8.
    #[error("{path}:{line}: not valid UTF-8")]
    InvalidUtf8 { path: PathBuf, line: usize },

    /// A JSONL line is not valid JSON.
    #[error("{path}:{line}: invalid JSON: {source}")]
    JsonlSyntax {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },

    /// A JSONL line is valid JSON but a required field is missing or has the wrong type.
    #[error("{path}:{line}: field `{field}` {problem}")]
    JsonlField {
        path: PathBuf,
        line: usize,
        field: &'static str,
        problem: String,
    },

    /// A JSON file (e.g. `meta.json`) could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The tokenizer has no end-of-text token, which dataset preparation needs.
    #[error("tokenizer has no `{token}` token; documents need an EOS separator (train the tokenizer with it as a special token)")]
    NoEos { token: &'static str },

    /// Masked language modelling needs a mask token the tokenizer does not have.
    #[error("the tokenizer has no `{token}` token, which masked language modelling needs: retrain it with `kiln tokenizer train --mlm ...` (adds [MASK], [CLS], [SEP] and [PAD] as special tokens) and prepare the data again, or point data.dataset at a new directory so that kiln trains an MLM tokenizer itself")]
    NoMaskToken { token: &'static str },

    /// The validation split came out empty.
    #[error("validation split is empty ({n_blocks} blocks of {block_tokens} tokens, val_fraction {val_fraction}); use a larger val_fraction, smaller split_block_tokens or more data")]
    EmptyValSplit {
        n_blocks: u64,
        block_tokens: usize,
        val_fraction: f64,
    },

    /// An option has an invalid value.
    #[error("invalid option `{field}`: {problem}")]
    InvalidOption {
        field: &'static str,
        problem: String,
    },

    /// A `.bin` shard's length is not a whole number of elements.
    #[error("{path}: length {len} bytes is not a multiple of the {elem_size}-byte element size (truncated or wrong dtype?)")]
    ShardLength {
        path: PathBuf,
        len: u64,
        elem_size: usize,
    },

    /// The dataset directory does not exist.
    #[error("dataset directory not found: {path} (run `prepare` first)")]
    MissingDatasetDir { path: PathBuf },

    /// The dataset directory has no `meta.json` (not prepared, or preparation was interrupted).
    #[error("{path} not found: the dataset directory is not prepared or preparation was interrupted; re-run `prepare`")]
    MissingMeta { path: PathBuf },

    /// `meta.json` disagrees with the files next to it.
    #[error("{path}: {field} mismatch: meta.json says {expected}, found {found}")]
    MetaMismatch {
        path: PathBuf,
        field: &'static str,
        expected: String,
        found: String,
    },

    /// A shard is too short for the requested window.
    #[error(
        "{path}: shard has {n_tokens} tokens but context length {ctx} needs at least {needed}"
    )]
    ShardTooShort {
        path: PathBuf,
        n_tokens: usize,
        ctx: usize,
        needed: usize,
    },

    /// A read past the end of a shard.
    #[error("{path}: window [{start}, {start}+{len}) is out of range for {n_tokens} tokens")]
    OutOfRange {
        path: PathBuf,
        start: usize,
        len: usize,
        n_tokens: usize,
    },

    /// A token id outside the tokenizer's vocabulary.
    #[error("token id {id} is outside the tokenizer vocabulary (size {vocab_size})")]
    UnknownTokenId { id: u32, vocab_size: usize },

    /// A token id does not fit the shard's element type.
    #[error("token id {id} does not fit dtype {dtype}")]
    TokenOverflow { id: u32, dtype: &'static str },
}

impl DataError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        DataError::Io {
            action,
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn tok(context: impl Into<String>, source: tokenizers::Error) -> Self {
        DataError::Tokenizer {
            context: context.into(),
            cause: source,
        }
    }
}
