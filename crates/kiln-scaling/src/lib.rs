//! kiln-scaling: scaling laws as a feature.
//!
//! - [`flops`]: parameter counts and training FLOPs per token under each declared convention
//!   (Kaplan `6N`, the full Chinchilla count, PaLM `6N + 12LdT`, `6N` with all parameters).
//! - [`law`]: the parametric law `L(N, D) = E + A / N^alpha + B / D^beta`, built-in constant
//!   sets, compute-optimal allocation for a FLOP budget.
//! - [`shape`]: concrete model shapes (layers, width, heads) near a parameter count.
//! - [`sweep`]: IsoFLOP sweeps: a base run config plus `[sweep]`, resumable runs, one CSV.
//! - [`data`]: reading and writing the runs CSV.
//! - [`fit`]: Approach 2 (IsoFLOP parabolas) and Approach 3 (Huber + L-BFGS parametric fit),
//!   each with bootstrap confidence intervals.
//! - [`plot`]: PNGs of the runs and the fits.

pub mod data;
pub mod fit;
pub mod flops;
pub mod law;
pub mod lbfgs;
pub mod plot;
pub mod shape;
pub mod sweep;

use std::path::PathBuf;

/// Everything that can go wrong; messages name the file, line and column where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ScalingError {
    #[error("{path}: missing column {column:?} (found: {found})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("{path}:{line}: column {column:?}: {problem} (value {value:?})")]
    BadValue {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
        problem: String,
    },
    #[error("{path}:{line}: {problem}")]
    BadRow {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("too few points for {what}: need at least {need}, got {got}")]
    TooFewPoints {
        what: String,
        need: usize,
        got: usize,
    },
    #[error("fit failed: {0}")]
    Fit(String),
    #[error("sweep config error: {0}")]
    Config(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("plotting failed: {0}")]
    Plot(String),
    #[error(transparent)]
    Train(#[from] kiln_train::TrainError),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
}

pub type Result<T, E = ScalingError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path, e: impl std::fmt::Display) -> ScalingError {
    ScalingError::Io(format!("{}: {e}", path.display()))
}

/// The seeded generator of bootstrap resampling, so fits are reproducible.
pub use kiln_rng::SplitMix64 as Rng;

/// Formats a count or FLOP number compactly: 1.23e+14 -> "1.23e14", 12_345 -> "12.3K".
pub fn human(x: f64) -> String {
    let ax = x.abs();
    if ax >= 1e15 || (ax < 1e-2 && ax > 0.0) {
        let s = format!("{x:.3e}");
        return s;
    }
    for (div, suffix) in [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")] {
        if ax >= div {
            return format!("{:.3}{suffix}", x / div);
        }
    }
    format!("{x:.3}")
}
