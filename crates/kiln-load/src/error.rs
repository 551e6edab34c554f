use std::path::PathBuf;

/// Why a model could not be found or loaded. Every variant about a file names it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("{}: not a model: {why}", .path.display())]
    Unrecognised { path: PathBuf, why: String },
    #[error("{}: a kiln run directory without a complete checkpoint (nothing in {}/step-*/ has a state.json)", .run.display(), .run.join(crate::CHECKPOINTS_DIR).display())]
    NoCheckpoint { run: PathBuf },
    #[error("{}: no {} next to the weights, so the model shape is unknown (expected {})", .weights.display(), crate::CONFIG_FILE, .config.display())]
    MissingConfig { weights: PathBuf, config: PathBuf },
    #[error("{}: {msg}", .path.display())]
    Config { path: PathBuf, msg: String },
    /// A `[model]` section that is not a valid model config (no file involved).
    #[error("{0}")]
    ModelSection(String),
    #[error("{}: {msg}", .path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// The OS error is part of the message, not a `source`, so a chain prints it once.
    #[error("{}: {cause}", .path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// An export option that cannot be carried out (a type kiln cannot write, ...).
    #[error("{0}")]
    Export(String),
    #[error("no tokenizer found for {}; looked for {}", .model.display(), .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoTokenizer {
        model: PathBuf,
        searched: Vec<PathBuf>,
    },
    #[error("tokenizer/model vocab mismatch: {} has {tokenizer} tokens but the model's vocab_size is {model}", .source_path.display())]
    VocabMismatch {
        source_path: PathBuf,
        tokenizer: usize,
        model: usize,
    },
    #[error("train.init_from {}: its model config differs from [model] of this run: {}", .path.display(), .diffs.join("; "))]
    Incompatible { path: PathBuf, diffs: Vec<String> },
    /// An adapter applied to a base other than the one it was trained on.
    #[error("{0}")]
    AdapterBase(String),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LoadError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            cause: source,
        }
    }
}
