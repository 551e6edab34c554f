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

/// A small seeded generator for bootstrap resampling (SplitMix64), so fits are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform index in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(1e-300);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

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
