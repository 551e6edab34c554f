//! `metrics.jsonl`: one JSON object per logged step (`step, tokens, loss, lr, grad_norm,
//! tokens_per_s, mfu`) and one per evaluation (`step, tokens, val_loss`, plus `val_accuracy`,
//! the masked-token accuracy, for MLM runs).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file every run writes its logged rows to, in its run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

use crate::TrainError;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Masked-token accuracy on the validation split (MLM runs' eval rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    /// Distributed runs: rank 0's seconds in collectives during the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_s: Option<f64>,
}

impl MetricsRow {
    /// The row of a training step that took `secs`: tokens/s and MFU from the step's tokens,
    /// the model's training FLOPs per token and the peak FLOP/s.
    pub fn train(
        step: u64,
        tokens: u64,
        r: &crate::StepResult,
        secs: f64,
        flops_per_token: f64,
        peak_flops: f64,
    ) -> Self {
        let tokens_per_s = r.n_tokens as f64 / secs;
        Self {
            step,
            tokens,
            loss: Some(r.loss),
            lr: Some(r.lr),
            grad_norm: Some(r.grad_norm),
            tokens_per_s: Some(tokens_per_s),
            mfu: Some(crate::perf::mfu(flops_per_token * tokens_per_s, peak_flops)),
            comm_s: r.comm_s,
            ..Default::default()
        }
    }

    /// The row of an evaluation.
    pub fn eval(step: u64, tokens: u64, val_loss: f64, val_accuracy: Option<f64>) -> Self {
        Self {
            step,
            tokens,
            val_loss: Some(val_loss),
            val_accuracy,
            ..Default::default()
        }
    }
}

pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `metrics.jsonl` for appending, first dropping rows after `keep_through_step`
    /// (rows logged after the checkpoint a run resumes from), so a resumed run's file reads
    /// exactly like an uninterrupted one.
    pub fn open(path: &Path, keep_through_step: u64) -> Result<Self, TrainError> {
        if path.exists() {
            // Keep the original lines byte for byte (re-serialising would change float digits).
            let text = fs::read_to_string(path)
                .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
            let rows = read_rows(path)?;
            let kept: String = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .zip(&rows)
                .filter(|(_, r)| r.step <= keep_through_step)
                .map(|(line, _)| format!("{line}\n"))
                .collect();
            let tmp = path.with_extension("jsonl.tmp");
            fs::write(&tmp, kept).map_err(|e| TrainError::Io(format!("{}: {e}", tmp.display())))?;
            fs::rename(&tmp, path)
                .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<(), TrainError> {
        let line = serde_json::to_string(row).expect("invariant: row serialises");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::Io(format!("{}: {e}", self.path.display())))
    }
}

pub fn read_rows(path: &Path) -> Result<Vec<MetricsRow>, TrainError> {
    let f = File::open(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line).map_err(|e| {
            TrainError::Io(format!(
                "{}:{}: not a metrics row: {e}",
                path.display(),
                i + 1
            ))
        })?;
        rows.push(row);
    }
    Ok(rows)
}
