//! Benchmark evaluation as lm-evaluation-harness scores it: multiple-choice tasks (HellaSwag,
//! ARC, PIQA, WinoGrande, MMLU, or any request file) by the summed log-probability of each
//! choice's continuation, and LAMBADA by greedy last-word accuracy and perplexity.
//!
//! - [`requests`] reads request files: OLMo's `requests.jsonl.gz` (one line per document and
//!   choice) and plain `{context, choices, gold}` JSONL;
//! - [`tasks`] names the benchmarks and builds MMLU's prompts;
//! - [`score`] turns a request into tokens exactly as lm-evaluation-harness does and scores a
//!   document's choices with one shared prefill of their common prefix;
//! - [`metrics`] turns scores into accuracies with standard errors.

pub mod metrics;
pub mod requests;
pub mod score;
pub mod tasks;

pub use metrics::{evaluate, DocSample, TaskResult};
pub use requests::{read_request_file, Doc, Request};
pub use score::{encode_request, score_alone, Encoded, Scored, Scorer};
pub use tasks::{load_task, load_task_file, Task, TaskKind, TASK_NAMES};

/// Errors of evaluation: bad files name the file, line and field.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {msg}")]
    Record {
        path: std::path::PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EvalError>;
