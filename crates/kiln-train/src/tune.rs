//! The config of tuning a pretrained model (instruction tuning, and preference tuning, which
//! adds its method's own section): the pretraining `[train]` and `[optim]` sections with
//! fine-tuning defaults, `[sft]` (the chat-data options), `[lora]` and `[dist]`. The model and
//! data come from the command line, so there is no `[model]` or `[data]`. `--set key=value`
//! overrides are applied to the TOML tree before typed deserialisation, so an error names the
//! key.

use std::path::{Path, PathBuf};

use kiln_model::LoraSpec;
use serde::{Deserialize, Serialize};

use crate::{DistConfig, OptimConfig, TrainConfig, TrainError};

/// Which end of an over-long example to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    #[default]
    KeepStart,
    KeepEnd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftOptions {
    /// Passes over the training set when `train.steps` is 0 (the default).
    #[serde(default = "one")]
    pub epochs: u64,
    /// Best-fit-decreasing packing into rows of `train.seq_len` (segment-masked).
    #[serde(default = "yes")]
    pub packing: bool,
    /// Train on every token, prompts included (no assistant-only masking).
    #[serde(default)]
    pub train_on_prompt: bool,
    #[serde(default)]
    pub truncation: Truncation,
    /// Conversations held out for the evaluation loss (ignored when eval data is given).
    #[serde(default = "d_val_fraction")]
    pub val_fraction: f64,
    /// A Jinja chat template overriding the model's own.
    #[serde(default)]
    pub template: Option<PathBuf>,
    /// Skip (and count) bad records instead of stopping at the first.
    #[serde(default)]
    pub skip_bad_records: bool,
    /// LoRA on a GGUF base kept in its quantised blocks (QLoRA-style).
    #[serde(default)]
    pub base_quantized: bool,
    /// Use only the first N records (quick runs).
    #[serde(default)]
    pub max_records: Option<usize>,
}

fn one() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn d_val_fraction() -> f64 {
    0.05
}

impl Default for SftOptions {
    fn default() -> Self {
        toml::Table::new()
            .try_into()
            .expect("invariant: every field has a default")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraOptions {
    pub rank: usize,
    /// Default `2 * rank`.
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub dropout: f64,
    /// Projections: `q,k,v,o,gate,up,down` (or PEFT's `q_proj`..., or kiln's `wq`...).
    #[serde(default = "all_targets")]
    pub targets: Vec<String>,
    /// rsLoRA: scale `alpha / sqrt(r)`.
    #[serde(default)]
    pub rslora: bool,
}

fn all_targets() -> Vec<String> {
    ["q", "k", "v", "o", "gate", "up", "down"]
        .map(String::from)
        .to_vec()
}

impl LoraOptions {
    pub fn spec(&self) -> Result<LoraSpec, TrainError> {
        let targets = self
            .targets
            .iter()
            .map(|t| {
                let short = match t.trim().trim_end_matches("_proj") {
                    "q" | "wq" => "wq",
                    "k" | "wk" => "wk",
                    "v" | "wv" => "wv",
                    "o" | "wo" => "wo",
                    "gate" | "w1" => "w1",
                    "up" | "w3" => "w3",
                    "down" | "w2" => "w2",
                    other => {
                        return Err(TrainError::Config(format!(
                            "lora.targets: unknown projection {other:?} (expected q, k, v, o, gate, up, down)"
                        )))
                    }
                };
                Ok(short.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = LoraSpec {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(2.0 * self.rank as f64),
            dropout: self.dropout,
            targets,
            rslora: self.rslora,
        };
        spec.validate()
            .map_err(|e| TrainError::Config(format!("[lora] {e}")))?;
        Ok(spec)
    }
}

/// A whole fine-tuning config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneConfig {
    pub train: TrainConfig,
    pub optim: OptimConfig,
    #[serde(default = "SftOptions::default")]
    pub sft: SftOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraOptions>,
    /// Distributed training (`mpirun -np N kiln sft ...`): `ddp`, `zero1` or `fsdp` (full
    /// fine-tuning only).
    #[serde(default)]
    pub dist: DistConfig,
    /// Whether `optim.warmup_steps` was given (else it is 10% of the steps).
    #[serde(skip)]
    warmup_given: bool,
    /// Whether `train.log_every` was given (else a row every steps/50, 1 to 10, so a short run
    /// still logs a curve).
    #[serde(skip)]
    log_every_given: bool,
}

impl TuneConfig {
    /// Reads the optional config file, applies `--set` overrides and fills SFT defaults that
    /// fit a laptop: `train.seq_len = min(1024, model_context)`, `train.batch_size = 4`, lr
    /// 2e-4 with LoRA and 2e-5 without, no weight decay, cosine to 0, one epoch.
    pub fn load(
        file: Option<&Path>,
        overrides: &[String],
        model_context: usize,
    ) -> Result<Self, TrainError> {
        Ok(Self::load_with(file, overrides, model_context, &[])?.0)
    }

    /// [`TuneConfig::load`] for a trainer with sections of its own (`extra`, e.g. `dpo`):
    /// returns them untyped, by name, for the caller to deserialise.
    pub fn load_with(
        file: Option<&Path>,
        overrides: &[String],
        model_context: usize,
        extra: &[&str],
    ) -> Result<(Self, toml::Table), TrainError> {
        let mut root: toml::Table = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| TrainError::Io(format!("{}: {e}", p.display())))?;
                text.parse().map_err(|e: toml::de::Error| {
                    TrainError::Config(format!("{}: invalid TOML: {}", p.display(), e.message()))
                })?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            crate::apply_override(&mut root, o)?;
        }
        let at = file
            .map(|p| format!("{}: ", p.display()))
            .unwrap_or_default();
        for key in root.keys() {
            match key.as_str() {
                "train" | "optim" | "sft" | "lora" | "dist" => {}
                k if extra.contains(&k) => {}
                "model" | "data" => {
                    return Err(TrainError::Config(format!(
                        "{at}a fine-tuning config has no [{key}] section: the model comes from --model and the data from --data"
                    )))
                }
                other => {
                    let mut expected = vec!["train", "optim", "sft", "lora", "dist"];
                    expected.extend(extra);
                    return Err(TrainError::Config(format!(
                        "{at}unknown section [{other}] (expected {})",
                        expected.join(", ")
                    )));
                }
            }
        }
        let lora = root.contains_key("lora");
        let section = |root: &mut toml::Table, name: &str| -> toml::Table {
            match root.remove(name) {
                Some(toml::Value::Table(t)) => t,
                _ => toml::Table::new(),
            }
        };
        let mut train = section(&mut root, "train");
        let log_every_given = train.contains_key("log_every");
        let defaults: [(&str, toml::Value); 4] = [
            ("steps", 0.into()),
            ("batch_size", 4.into()),
            ("seq_len", (model_context.min(1024) as i64).into()),
            ("checkpoint_every", 100.into()),
        ];
        for (k, v) in defaults {
            train.entry(k).or_insert(v);
        }
        let mut optim = section(&mut root, "optim");
        let warmup_given = optim.contains_key("warmup_steps");
        let lr = if lora { 2e-4 } else { 2e-5 };
        let defaults: [(&str, toml::Value); 5] = [
            ("lr", lr.into()),
            ("min_lr", 0.0.into()),
            ("beta2", 0.999.into()),
            ("weight_decay", 0.0.into()),
            ("warmup_steps", 0.into()),
        ];
        for (k, v) in defaults {
            optim.entry(k).or_insert(v);
        }
        let train: TrainConfig =
            toml::Value::Table(train)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    TrainError::Config(format!("{at}[train] {}", e.message()))
                })?;
        let optim: OptimConfig =
            toml::Value::Table(optim)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    TrainError::Config(format!("{at}[optim] {}", e.message()))
                })?;
        let sft: SftOptions = toml::Value::Table(section(&mut root, "sft"))
            .try_into()
            .map_err(|e: toml::de::Error| {
                TrainError::Config(format!("{at}[sft] {}", e.message()))
            })?;
        let lora: Option<LoraOptions> = if lora {
            Some(
                toml::Value::Table(section(&mut root, "lora"))
                    .try_into()
                    .map_err(|e: toml::de::Error| {
                        TrainError::Config(format!("{at}[lora] {}", e.message()))
                    })?,
            )
        } else {
            None
        };
        let dist: DistConfig = toml::Value::Table(section(&mut root, "dist"))
            .try_into()
            .map_err(|e: toml::de::Error| {
                TrainError::Config(format!("{at}[dist] {}", e.message()))
            })?;
        let cfg = Self {
            train,
            optim,
            sft,
            lora,
            dist,
            warmup_given,
            log_every_given,
        };
        cfg.validate()?;
        let extra: toml::Table = extra
            .iter()
            .filter_map(|k| root.remove(*k).map(|v| (k.to_string(), v)))
            .collect();
        Ok((cfg, extra))
    }

    /// The same config with `extra` sections (a trainer's own, as given) added, as TOML.
    pub fn to_toml_with(&self, extra: &toml::Table) -> String {
        let mut root: toml::Table = self.to_toml().parse().expect("invariant: own TOML parses");
        root.extend(extra.clone());
        toml::to_string(&root).expect("invariant: serialises")
    }

    fn validate(&self) -> Result<(), TrainError> {
        self.dist.validate()?;
        let t = &self.train;
        crate::checkpoint::Retention::of(t)?;
        if t.batch_size == 0 || t.grad_accum == 0 || t.seq_len < 2 {
            return Err(TrainError::Config(
                "train.batch_size and train.grad_accum must be at least 1 and train.seq_len at least 2".into(),
            ));
        }
        if self.sft.epochs == 0 {
            return Err(TrainError::Config("sft.epochs must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.sft.val_fraction) {
            return Err(TrainError::Config(format!(
                "sft.val_fraction must be in [0, 1), got {}",
                self.sft.val_fraction
            )));
        }
        if self.sft.base_quantized && self.lora.is_none() {
            return Err(TrainError::Config(
                "sft.base_quantized (--base-quantized) trains LoRA adapters on a frozen quantised base: also give --lora-rank".into(),
            ));
        }
        if let Some(l) = &self.lora {
            l.spec()?;
        }
        Ok(())
    }

    /// Fixes the step count (when `train.steps` is 0: `epochs` passes of `steps_per_epoch`) and
    /// the warmup (10% of the steps unless given).
    pub fn finalize(&mut self, steps_per_epoch: u64) {
        if self.train.steps == 0 {
            self.train.steps = steps_per_epoch.max(1) * self.sft.epochs;
        }
        if !self.warmup_given {
            self.optim.warmup_steps = self.train.steps / 10;
        }
        if !self.log_every_given {
            self.train.log_every = (self.train.steps / 50).clamp(1, 10);
        }
    }

    pub fn lora_spec(&self) -> Result<Option<LoraSpec>, TrainError> {
        self.lora.as_ref().map(LoraOptions::spec).transpose()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("invariant: the config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_named_errors() {
        let c = TuneConfig::load(None, &[], 8192).unwrap();
        assert_eq!((c.train.batch_size, c.train.seq_len), (4, 1024));
        assert_eq!(c.optim.lr, 2e-5);
        assert!(c.lora.is_none());
        let c = TuneConfig::load(None, &["lora.rank=8".into()], 512).unwrap();
        assert_eq!(c.train.seq_len, 512);
        assert_eq!(c.optim.lr, 2e-4);
        let spec = c.lora_spec().unwrap().unwrap();
        assert_eq!((spec.rank, spec.alpha, spec.targets.len()), (8, 16.0, 7));
        let mut c = TuneConfig::load(None, &["train.seq_len=64".into()], 512).unwrap();
        c.finalize(25);
        assert_eq!((c.train.steps, c.optim.warmup_steps), (25, 2));
        let e = TuneConfig::load(None, &["sft.epoch=2".into()], 512).unwrap_err();
        assert!(
            e.to_string().contains("[sft]") && e.to_string().contains("epoch"),
            "{e}"
        );
        let e = TuneConfig::load(None, &["model.dim=3".into()], 512).unwrap_err();
        assert!(e.to_string().contains("--model"), "{e}");
        let e = TuneConfig::load(
            None,
            &["lora.rank=4".into(), "lora.targets=[\"q\",\"x\"]".into()],
            512,
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"x\""), "{e}");
        let e = TuneConfig::load(None, &["sft.base_quantized=true".into()], 512).unwrap_err();
        assert!(e.to_string().contains("--lora-rank"), "{e}");
    }
}
