//! Run configuration: typed sections deserialised from TOML, with `--set a.b=value` overrides
//! applied to the TOML tree *before* typed deserialisation so an error names the key.

use std::path::{Path, PathBuf};

use kiln_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::TrainError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A prepared dataset directory (`train.bin`, `val.bin`, `meta.json`, `tokenizer.json`).
    pub dataset: PathBuf,
    /// When `dataset` does not exist yet it is prepared from these text/JSONL files or folders.
    #[serde(default)]
    pub sources: Vec<PathBuf>,
    /// Tokenizer for preparing; when unset, a byte-level BPE with `model.vocab_size` tokens is
    /// trained on `sources`.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
}

fn default_val_fraction() -> f64 {
    0.05
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Floor of the cosine decay.
    #[serde(default = "d_min_lr")]
    pub min_lr: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Decoupled weight decay (AdamW), applied to matrices only unless
    /// `decay_norms_and_embeddings`.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default)]
    pub decay_norms_and_embeddings: bool,
    /// Clip the global gradient norm to this (0 = off).
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
}

fn d_lr() -> f64 {
    3e-4
}
fn d_min_lr() -> f64 {
    3e-5
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd() -> f64 {
    0.1
}
fn d_clip() -> f64 {
    1.0
}
fn d_warmup() -> u64 {
    100
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: d_lr(),
            min_lr: d_min_lr(),
            beta1: d_beta1(),
            beta2: d_beta2(),
            eps: d_eps(),
            weight_decay: d_wd(),
            decay_norms_and_embeddings: false,
            grad_clip: d_clip(),
            warmup_steps: d_warmup(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub seq_len: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    #[serde(default = "d_eval_every")]
    pub eval_every: u64,
    /// Validation batches per evaluation (consecutive windows from the start of `val.bin`).
    #[serde(default = "d_eval_batches")]
    pub eval_batches: usize,
    /// Save a checkpoint every N steps (0 = only at the end and on Ctrl-C).
    #[serde(default = "d_ckpt_every")]
    pub checkpoint_every: u64,
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    /// Where the run writes its config, metrics, checkpoints and plots.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// Start from these weights (a kiln run directory, checkpoint or model.safetensors).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Write the initial weights to `RUN/init.safetensors` (so a reference implementation can
    /// start from the same point).
    #[serde(default)]
    pub save_init: bool,
    /// Peak FLOP/s for MFU; when unset, the fp32 GEMM peak is measured at start.
    #[serde(default)]
    pub peak_flops: Option<f64>,
}

fn one() -> usize {
    1
}
fn d_seed() -> u64 {
    1337
}
fn d_log_every() -> u64 {
    10
}
fn d_eval_every() -> u64 {
    100
}
fn d_eval_batches() -> usize {
    20
}
fn d_ckpt_every() -> u64 {
    200
}
fn d_keep() -> usize {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    pub train: TrainConfig,
}

/// Parses a `--set` value as TOML (numbers, booleans, arrays), falling back to a plain string.
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Applies `key.path=value` to a TOML tree, creating tables as needed.
pub fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<(), TrainError> {
    let (key, value) = assignment.split_once('=').ok_or_else(|| {
        TrainError::Config(format!("--set {assignment:?}: expected key.path=value"))
    })?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().expect("split always yields one part");
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| TrainError::Config(format!("--set {key}: {p:?} is not a table")))?;
    }
    table.insert(last.to_string(), parse_value(value.trim()));
    Ok(())
}

impl RunConfig {
    /// Reads a TOML run config, applies overrides, resolves the model preset and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TrainError::Config(format!("cannot read config {}: {e}", path.display()))
        })?;
        Self::from_toml_str(&text, overrides)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Self, TrainError> {
        let mut root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            TrainError::Config(format!("invalid TOML: {}", e.message()))
        })?;
        for o in overrides {
            apply_override(&mut root, o)?;
        }
        Self::from_table(root)
    }

    /// Typed deserialisation section by section, so errors say which section.
    pub fn from_table(mut root: toml::Table) -> Result<Self, TrainError> {
        for key in root.keys() {
            if !["model", "data", "optim", "train"].contains(&key.as_str()) {
                return Err(TrainError::Config(format!(
                    "unknown section [{key}] (expected model, data, optim, train)"
                )));
            }
        }
        let mut section = |name: &str, required: bool| -> Result<toml::Value, TrainError> {
            match root.remove(name) {
                Some(v) => Ok(v),
                None if required => Err(TrainError::Config(format!("missing section [{name}]"))),
                None => Ok(toml::Value::Table(Default::default())),
            }
        };
        let mut model = section("model", true)?;
        resolve_preset(&mut model)?;
        let data = section("data", true)?;
        let optim = section("optim", false)?;
        let train = section("train", true)?;
        fn typed<T: serde::de::DeserializeOwned>(
            name: &str,
            v: toml::Value,
        ) -> Result<T, TrainError> {
            v.try_into().map_err(|e: toml::de::Error| {
                TrainError::Config(format!("[{name}] {}", e.message()))
            })
        }
        let cfg = RunConfig {
            model: typed("model", model)?,
            data: typed("data", data)?,
            optim: typed("optim", optim)?,
            train: typed("train", train)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        self.model.validate()?;
        let t = &self.train;
        let bad = |m: String| Err(TrainError::Config(m));
        if t.batch_size == 0 || t.grad_accum == 0 || t.seq_len == 0 || t.steps == 0 {
            return bad("train.steps, train.batch_size, train.grad_accum and train.seq_len must be positive".into());
        }
        if t.seq_len > self.model.max_seq_len {
            return bad(format!(
                "train.seq_len ({}) exceeds model.max_seq_len ({})",
                t.seq_len, self.model.max_seq_len
            ));
        }
        if t.log_every == 0 {
            return bad("train.log_every must be positive".into());
        }
        let o = &self.optim;
        if o.lr <= 0.0 || o.min_lr < 0.0 || o.min_lr > o.lr {
            return bad(format!(
                "optim.lr ({}) must be positive and >= optim.min_lr ({})",
                o.lr, o.min_lr
            ));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return bad("optim.beta1 and optim.beta2 must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return bad("data.val_fraction must be in [0, 1)".into());
        }
        Ok(())
    }

    /// The run directory: `train.run_dir`, else `runs/<config file stem>`.
    pub fn run_dir(&self, config_path: Option<&Path>) -> PathBuf {
        self.train.run_dir.clone().unwrap_or_else(|| {
            let stem = config_path
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            PathBuf::from("runs").join(stem)
        })
    }

    /// The resolved config as TOML (every derived model size written out).
    pub fn to_toml(&self) -> String {
        let mut resolved = self.clone();
        resolved.model = self.model.resolved();
        toml::to_string_pretty(&resolved).expect("invariant: RunConfig serialises to TOML")
    }

    pub fn tokens_per_step(&self) -> usize {
        self.train.batch_size * self.train.grad_accum * self.train.seq_len
    }
}

/// `[model] preset = "10m"` starts from a named preset; keys given next to it override it.
fn resolve_preset(model: &mut toml::Value) -> Result<(), TrainError> {
    let table = model
        .as_table_mut()
        .ok_or_else(|| TrainError::Config("[model] must be a table".into()))?;
    let Some(preset) = table.remove("preset") else {
        return Ok(());
    };
    let name = preset
        .as_str()
        .ok_or_else(|| TrainError::Config("[model] preset must be a string".into()))?;
    let base = ModelConfig::preset(name)?;
    let mut merged = toml::Table::try_from(&base).expect("invariant: ModelConfig serialises");
    for (k, v) in std::mem::take(table) {
        merged.insert(k, v);
    }
    *table = merged;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
preset = "tiny"
[data]
dataset = "d"
[train]
steps = 10
batch_size = 2
seq_len = 32
"#;

    #[test]
    fn preset_and_overrides() {
        let cfg = RunConfig::from_toml_str(BASE, &["model.dim=128".into(), "optim.lr=1e-3".into()])
            .unwrap();
        assert_eq!(cfg.model.dim, 128);
        assert_eq!(cfg.model.n_layers, ModelConfig::tiny().n_layers);
        assert_eq!(cfg.optim.lr, 1e-3);
        assert_eq!(cfg.optim.beta2, 0.95);
        // The resolved config round-trips.
        let again = RunConfig::from_toml_str(&cfg.to_toml(), &[]).unwrap();
        assert_eq!(again.model, cfg.model.resolved());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = RunConfig::from_toml_str(BASE, &["train.stpes=5".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[train]") && err.contains("stpes"), "{err}");
        let err = RunConfig::from_toml_str(&format!("{BASE}\n[trian]\nx=1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("trian"), "{err}");
        let err = RunConfig::from_toml_str(BASE, &["model.preset=\"huge\"".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("huge"), "{err}");
    }

    #[test]
    fn malformed_toml_and_bad_values() {
        assert!(RunConfig::from_toml_str("[model\n", &[]).is_err());
        let err = RunConfig::from_toml_str(BASE, &["train.seq_len=4096".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("seq_len"), "{err}");
        let err = RunConfig::from_toml_str(BASE, &["train.batch_size=\"two\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batch_size") || err.contains("[train]"),
            "{err}"
        );
    }
}
