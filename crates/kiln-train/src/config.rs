//! Run configuration: typed sections deserialised from TOML, with `--set a.b=value` overrides
//! applied to the TOML tree *before* typed deserialisation so an error names the key.

use std::path::{Path, PathBuf};

use kiln_data::MlmOptions;
use kiln_model::{AttentionMode, ModelConfig, Precision};
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

/// What the model learns to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Causal language modelling: the next token (a decoder).
    #[default]
    Clm,
    /// Masked language modelling (BERT): the tokens hidden by `[mlm]` masking (an encoder).
    Mlm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `"clm"` (default) or `"mlm"`; mlm needs `model.attention = "bidirectional"`.
    #[serde(default, skip_serializing_if = "is_clm")]
    pub objective: Objective,
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub seq_len: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Steps between metrics rows. Unset: `steps / 50`, from 1 to 10 (so a short run still
    /// logs a curve); SFT does the same, preference tuning logs every step.
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
    /// Also keep the best checkpoint by a logged metric (a key of `metrics.jsonl`, e.g.
    /// "val_loss" or "reward"): `min:KEY` or `max:KEY`, or the bare key (minimised when it
    /// names a loss, KL or perplexity, maximised otherwise). Its step is written to
    /// `checkpoints/best.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<String>,
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
    /// Activation checkpointing per block: keep each block's input only and recompute its
    /// activations in the backward (same gradients, about one more forward of compute, a
    /// peak of one block's activations instead of all of them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub activation_checkpointing: bool,
    /// The projections' matrix products: "f32", or "bf16" (inputs rounded to bf16, sums in
    /// f32; weights, gradients and AdamW stay f32). bf16 needs AVX512-BF16; other CPUs
    /// compute f32 and the run says so.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

impl TrainConfig {
    /// Whether step `step` (1-based, after the update) writes its metrics row (every
    /// `log_every`, and at the end).
    pub fn logs_at(&self, step: u64) -> bool {
        step.is_multiple_of(self.log_every) || step == self.steps
    }

    /// Whether the model is evaluated after step `step` (every `eval_every`, and at the end).
    pub fn evaluates_at(&self, step: u64) -> bool {
        (self.eval_every > 0 && step.is_multiple_of(self.eval_every)) || step == self.steps
    }

    /// Whether a checkpoint is saved after step `step` (every `checkpoint_every`, and at the
    /// end).
    pub fn checkpoints_at(&self, step: u64) -> bool {
        (self.checkpoint_every > 0 && step.is_multiple_of(self.checkpoint_every))
            || step == self.steps
    }
}

fn is_clm(o: &Objective) -> bool {
    *o == Objective::Clm
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
    /// Masking options of `objective = "mlm"` (defaults when the section is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlm: Option<MlmOptions>,
    /// Distributed training (used when the run is launched on several ranks, e.g. by
    /// `mpirun`; a single process ignores it).
    #[serde(default)]
    pub dist: DistConfig,
}

/// How the ranks of a distributed run share the work (`[dist]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Replicated parameters and optimizer; gradients all-reduced in buckets.
    #[default]
    Ddp,
    /// Replicated parameters; gradients reduce-scattered, AdamW state and update sharded,
    /// parameters all-gathered after the step.
    Zero1,
    /// Fully sharded: parameters, gradients and AdamW state sharded; each block's parameters
    /// all-gathered for its forward and again for its backward, its gradients reduce-scattered.
    Fsdp,
}

/// The dtype FSDP gathers parameters in for the forward and backward (`dist.param_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    #[default]
    F32,
    /// Each rank rounds its f32 shard to bf16 and the ranks gather bf16 (half the bytes); the
    /// forward and backward see bf16 weights. Master weights, gradients, their reduction and
    /// AdamW stay f32 (PyTorch FSDP's `MixedPrecision(param_dtype=bfloat16,
    /// reduce_dtype=float32)`).
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    #[serde(default)]
    pub strategy: Strategy,
    /// FSDP only: the dtype of the gathered parameters the model computes with.
    #[serde(default)]
    pub param_dtype: ParamDtype,
    /// Seconds one collective may wait for the other ranks before the run is ended with an
    /// error naming the unresponsive ranks (plus a 5 s probe: detection within a minute).
    #[serde(default = "d_dist_timeout")]
    pub timeout_s: f64,
    /// Gradient all-reduce bucket size (PyTorch DDP's default is 25 MB).
    #[serde(default = "d_bucket_mb")]
    pub bucket_mb: f64,
    /// Seconds the ranks wait at the barriers around long work: rank 0 preparing the dataset,
    /// every rank writing and sealing its checkpoint shards, rank 0 renaming the checkpoint.
    #[serde(default = "d_io_timeout")]
    pub io_timeout_s: f64,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            param_dtype: ParamDtype::default(),
            timeout_s: d_dist_timeout(),
            bucket_mb: d_bucket_mb(),
            io_timeout_s: d_io_timeout(),
        }
    }
}

impl DistConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        for (name, v) in [
            ("timeout_s", self.timeout_s),
            ("bucket_mb", self.bucket_mb),
            ("io_timeout_s", self.io_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("dist.{name} must be a positive number, not {v}"));
            }
        }
        if self.param_dtype != ParamDtype::F32 && self.strategy != Strategy::Fsdp {
            return bad(format!(
                "dist.param_dtype = \"bf16\" applies to dist.strategy = \"fsdp\" (parameters \
                 gathered in bf16); the {:?} replicas keep f32 parameters",
                self.strategy
            ));
        }
        Ok(())
    }
}

fn d_dist_timeout() -> f64 {
    45.0
}

fn d_bucket_mb() -> f64 {
    25.0
}

fn d_io_timeout() -> f64 {
    1800.0
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
            if !["model", "data", "optim", "train", "mlm", "dist"].contains(&key.as_str()) {
                return Err(TrainError::Config(format!(
                    "unknown section [{key}] (expected model, data, optim, train, mlm, dist)"
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
        // `[model]` (a preset with overrides) is read the way kiln-load reads a run's model.
        let model = kiln_load::model_from_toml(section("model", true)?)?;
        let data = section("data", true)?;
        let optim = section("optim", false)?;
        let train = section("train", true)?;
        let log_every_given = train.get("log_every").is_some();
        let dist = section("dist", false)?;
        let mlm = root.remove("mlm");
        fn typed<T: serde::de::DeserializeOwned>(
            name: &str,
            v: toml::Value,
        ) -> Result<T, TrainError> {
            v.try_into().map_err(|e: toml::de::Error| {
                TrainError::Config(format!("[{name}] {}", e.message()))
            })
        }
        let mut cfg = RunConfig {
            model,
            data: typed("data", data)?,
            optim: typed("optim", optim)?,
            train: typed("train", train)?,
            mlm: mlm.map(|v| typed("mlm", v)).transpose()?,
            dist: typed("dist", dist)?,
        };
        if !log_every_given {
            // A row every steps/50 (1 to 10), so a short run still logs a curve.
            cfg.train.log_every = (cfg.train.steps / 50).clamp(1, 10);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        self.model.validate()?;
        self.dist.validate()?;
        let t = &self.train;
        crate::checkpoint::Retention::of(t)?;
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
        let attention = self.model.attention;
        match self.train.objective {
            Objective::Mlm => {
                if attention != AttentionMode::Bidirectional {
                    return bad(
                        "train.objective = \"mlm\" trains an encoder: set model.attention = \"bidirectional\" (every position must see the whole window)".into(),
                    );
                }
                if let Some(m) = &self.mlm {
                    m.validate()
                        .map_err(|e| TrainError::Config(e.to_string()))?;
                }
            }
            Objective::Clm => {
                if attention == AttentionMode::Bidirectional {
                    return bad(
                        "model.attention = \"bidirectional\" with train.objective = \"clm\" would let every position see the token it predicts; use train.objective = \"mlm\" for an encoder".into(),
                    );
                }
                if self.mlm.is_some() {
                    return bad(
                        "[mlm] is set but train.objective is \"clm\"; add train.objective = \"mlm\" or drop [mlm]".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The masking options of an MLM run (`[mlm]`, or the BERT defaults).
    pub fn mlm_options(&self) -> MlmOptions {
        self.mlm.clone().unwrap_or_default()
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
        if self.train.objective == Objective::Mlm {
            resolved.mlm = Some(self.mlm_options());
        }
        toml::to_string_pretty(&resolved).expect("invariant: RunConfig serialises to TOML")
    }

    pub fn tokens_per_step(&self) -> usize {
        self.train.batch_size * self.train.grad_accum * self.train.seq_len
    }
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
    fn an_unset_log_every_follows_the_run_length() {
        let every = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            RunConfig::from_toml_str(BASE, &o).unwrap().train.log_every
        };
        assert_eq!(every(&[]), 1, "10 steps: a row each");
        assert_eq!(every(&["train.steps=300"]), 6);
        assert_eq!(every(&["train.steps=100000"]), 10);
        assert_eq!(
            every(&["train.steps=300", "train.log_every=7"]),
            7,
            "given: kept"
        );
    }

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
        // A keep_best the checkpoints could not follow is refused when the config loads.
        let err = RunConfig::from_toml_str(BASE, &["train.keep_best=\"max:\"".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.keep_best"), "{err}");
        let ok = RunConfig::from_toml_str(BASE, &["train.keep_best=\"val_loss\"".into()]);
        assert!(ok.is_ok());
    }

    #[test]
    fn mlm_objective_and_section() {
        let bidi = "model.attention=\"bidirectional\"";
        // objective = mlm needs an encoder, and says which key to set.
        let err = RunConfig::from_toml_str(BASE, &["train.objective=\"mlm\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.attention") && err.contains("bidirectional"),
            "{err}"
        );
        let cfg = RunConfig::from_toml_str(BASE, &["train.objective=\"mlm\"".into(), bidi.into()])
            .unwrap();
        assert_eq!(cfg.train.objective, Objective::Mlm);
        assert_eq!(cfg.mlm_options(), MlmOptions::default());
        // The resolved config writes the [mlm] defaults out and round-trips.
        let toml = cfg.to_toml();
        assert!(
            toml.contains("[mlm]") && toml.contains("mask_prob = 0.15"),
            "{toml}"
        );
        let again = RunConfig::from_toml_str(&toml, &[]).unwrap();
        assert_eq!(again.train.objective, Objective::Mlm);
        assert_eq!(again.mlm, Some(MlmOptions::default()));

        let cfg = RunConfig::from_toml_str(
            BASE,
            &[
                "train.objective=\"mlm\"".into(),
                bidi.into(),
                "mlm.mask_prob=0.3".into(),
                "mlm.whole_word=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.mlm_options().mask_prob, 0.3);
        assert!(cfg.mlm_options().whole_word);
        assert_eq!(cfg.mlm_options().mask_replace, 0.8);

        // Unknown and invalid [mlm] keys are named.
        let err = RunConfig::from_toml_str(
            BASE,
            &[
                "train.objective=\"mlm\"".into(),
                bidi.into(),
                "mlm.mask_probability=0.2".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[mlm]") && err.contains("mask_probability"),
            "{err}"
        );
        let err = RunConfig::from_toml_str(
            BASE,
            &[
                "train.objective=\"mlm\"".into(),
                bidi.into(),
                "mlm.random_replace=0.5".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mlm.random_replace"), "{err}");

        // [mlm] without the objective, and an encoder with the causal objective, are refused.
        let err = RunConfig::from_toml_str(BASE, &["mlm.mask_prob=0.2".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[mlm]") && err.contains("train.objective"),
            "{err}"
        );
        let err = RunConfig::from_toml_str(BASE, &[bidi.into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.objective") && err.contains("mlm"),
            "{err}"
        );
        // A causal config's resolved TOML does not change.
        let clm = RunConfig::from_toml_str(BASE, &[]).unwrap().to_toml();
        assert!(
            !clm.contains("objective") && !clm.contains("[mlm]"),
            "{clm}"
        );
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
