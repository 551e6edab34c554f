//! The config of a preference-tuning run: kiln-train's fine-tuning config (`[train]`,
//! `[optim]`, `[sft]` for the data options such as `template` and `skip_bad_records`,
//! `[lora]`) with its defaults, plus the method's own section: `[rm]`, `[dpo]`, `[ppo]` or
//! `[grpo]`.

use std::path::{Path, PathBuf};

use kiln_train::TuneConfig;
use serde::{Deserialize, Serialize};

use crate::losses::DpoLoss;
use crate::RlhfError;

/// The four trainers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rm,
    Dpo,
    Ppo,
    Grpo,
}

impl Method {
    /// The config section of the method's own options.
    pub fn section(self) -> &'static str {
        match self {
            Method::Rm => "rm",
            Method::Dpo => "dpo",
            Method::Ppo => "ppo",
            Method::Grpo => "grpo",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardOptions {
    /// TRL's `center_rewards_coefficient`: adds `coef * mean((r_c + r_r)^2)` to the loss.
    #[serde(default)]
    pub center_coef: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoOptions {
    pub beta: f64,
    #[serde(default)]
    pub loss: DpoLoss,
    /// Conservative DPO's ε (sigmoid loss only).
    #[serde(default)]
    pub label_smoothing: f64,
    /// The reference model; by default the starting model (under LoRA: the base without the
    /// adapter, so no second copy).
    #[serde(default)]
    pub reference: Option<PathBuf>,
}

/// PPO's and GRPO's options (one struct: they share rollouts and the clipped objective).
/// Fields marked PPO-only are ignored by GRPO.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineOptions {
    /// Sampling temperature of rollouts; log-probabilities use the same temperature.
    pub temperature: f64,
    /// Response budget in tokens.
    pub max_new_tokens: usize,
    /// The score of a response with no end-of-turn token within the budget...
    pub missing_eos_penalty: f64,
    /// ...when this is on (else such a response keeps its reward).
    pub penalize_missing_eos: bool,
    /// PPO: the per-token KL penalty (k1) coefficient; GRPO: β, the weight of the k3 KL term.
    pub kl_coef: f64,
    /// Ziegler et al.'s adaptive KL controller (PPO).
    pub adaptive_kl: bool,
    /// Its target KL per sequence and horizon in samples.
    pub kl_target: f64,
    pub kl_horizon: f64,
    /// Clip range of the policy ratio.
    pub cliprange: f64,
    /// Passes over each rollout.
    pub epochs: usize,
    /// Minibatches per pass.
    pub minibatches: usize,
    /// GRPO: samples per prompt.
    pub group_size: usize,
    /// PPO: whiten the scores over each batch (mean 0, std 1) before the KL penalty is added.
    pub whiten_rewards: bool,
    /// PPO: GAE's γ and λ.
    pub gamma: f64,
    pub lam: f64,
    /// PPO: the value loss's clip range and coefficient.
    pub cliprange_value: f64,
    pub vf_coef: f64,
    /// Log one sampled response every this many steps (0 = never).
    pub sample_every: u64,
    /// GRPO with `kl_coef = 0`: still run the reference model over each rollout, to log the
    /// KL to it. `false` saves that forward pass (about a third of the update), as TRL does
    /// with β = 0, and logs no `kl`.
    pub measure_kl: bool,
}

impl OnlineOptions {
    fn defaults(method: Method) -> toml::Table {
        let grpo = method == Method::Grpo;
        let mut t = toml::Table::new();
        let mut set = |k: &str, v: toml::Value| {
            t.insert(k.into(), v);
        };
        set("temperature", 1.0.into());
        set("max_new_tokens", 64.into());
        set("missing_eos_penalty", (-1.0).into());
        set("penalize_missing_eos", true.into());
        set("kl_coef", if grpo { 0.0 } else { 0.1 }.into());
        set("adaptive_kl", false.into());
        set("kl_target", 6.0.into());
        set("kl_horizon", 10000.0.into());
        set("cliprange", 0.2.into());
        set("epochs", if grpo { 1 } else { 4 }.into());
        set("minibatches", 1.into());
        set("group_size", if grpo { 8 } else { 1 }.into());
        set("whiten_rewards", true.into());
        set("gamma", 1.0.into());
        set("lam", 0.95.into());
        set("cliprange_value", 0.2.into());
        set("vf_coef", 0.1.into());
        set("sample_every", 10.into());
        set("measure_kl", true.into());
        t
    }
}

/// The method's own options.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodOptions {
    Rm(RewardOptions),
    Dpo(DpoOptions),
    Online(OnlineOptions),
}

/// A whole preference-tuning config.
#[derive(Debug, Clone)]
pub struct RlhfConfig {
    pub method: Method,
    /// `[train]`, `[optim]`, `[sft]` (data options) and `[lora]`.
    pub base: TuneConfig,
    pub options: MethodOptions,
}

impl RlhfConfig {
    /// Reads the optional file and `--set` overrides (`dpo.beta=0.2`, `train.steps=50`).
    pub fn load(
        method: Method,
        file: Option<&Path>,
        overrides: &[String],
        model_context: usize,
    ) -> Result<Self, RlhfError> {
        let section = method.section();
        // Every step of these trainers is expensive and worth a metrics row: log each one
        // unless the config or --set says otherwise.
        let in_file = file
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.parse::<toml::Table>().ok())
            .is_some_and(|t| t.get("train").and_then(|x| x.get("log_every")).is_some());
        let mut overrides = overrides.to_vec();
        if !in_file && !overrides.iter().any(|o| o.starts_with("train.log_every=")) {
            overrides.insert(0, "train.log_every=1".into());
        }
        let (base, mut extra) = TuneConfig::load_with(file, &overrides, model_context, &[section])?;
        let given = match extra.remove(section) {
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err(RlhfError::Config(format!("[{section}] must be a table"))),
            None => toml::Table::new(),
        };
        let bad = |e: toml::de::Error| RlhfError::Config(format!("[{section}] {}", e.message()));
        let options = match method {
            Method::Rm => MethodOptions::Rm(toml::Value::Table(given).try_into().map_err(bad)?),
            Method::Dpo => {
                let mut t = given;
                t.entry("beta").or_insert(0.1.into());
                MethodOptions::Dpo(toml::Value::Table(t).try_into().map_err(bad)?)
            }
            Method::Ppo | Method::Grpo => {
                let mut t = OnlineOptions::defaults(method);
                t.extend(given);
                MethodOptions::Online(toml::Value::Table(t).try_into().map_err(bad)?)
            }
        };
        let cfg = Self {
            method,
            base,
            options,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), RlhfError> {
        let err = |m: String| Err(RlhfError::Config(m));
        match &self.options {
            MethodOptions::Rm(_) => {}
            MethodOptions::Dpo(d) => {
                if d.beta.is_nan() || d.beta <= 0.0 {
                    return err(format!("dpo.beta must be positive, got {}", d.beta));
                }
                if !(0.0..0.5).contains(&d.label_smoothing) {
                    return err(format!(
                        "dpo.label_smoothing must be in [0, 0.5), got {}",
                        d.label_smoothing
                    ));
                }
                if d.label_smoothing > 0.0 && d.loss != DpoLoss::Sigmoid {
                    return err("dpo.label_smoothing applies to the sigmoid loss only".into());
                }
            }
            MethodOptions::Online(o) => {
                if o.temperature.is_nan() || o.temperature <= 0.0 {
                    return err(format!(
                        "temperature must be positive, got {}",
                        o.temperature
                    ));
                }
                if o.max_new_tokens == 0 || o.epochs == 0 || o.minibatches == 0 {
                    return err("max_new_tokens, epochs and minibatches must be at least 1".into());
                }
                if self.method == Method::Grpo && o.group_size < 2 {
                    return err(format!(
                        "grpo.group_size must be at least 2 (advantages compare samples of one prompt), got {}",
                        o.group_size
                    ));
                }
                if o.cliprange.is_nan() || o.cliprange <= 0.0 || o.kl_coef < 0.0 {
                    return err("cliprange must be positive and kl_coef at least 0".into());
                }
            }
        }
        Ok(())
    }

    pub fn dpo(&self) -> &DpoOptions {
        match &self.options {
            MethodOptions::Dpo(d) => d,
            _ => unreachable!("a DPO config"),
        }
    }

    pub fn online(&self) -> &OnlineOptions {
        match &self.options {
            MethodOptions::Online(o) => o,
            _ => unreachable!("a PPO or GRPO config"),
        }
    }

    pub fn rm(&self) -> &RewardOptions {
        match &self.options {
            MethodOptions::Rm(r) => r,
            _ => unreachable!("a reward-model config"),
        }
    }

    /// The config as TOML, the method's section included.
    pub fn to_toml(&self) -> String {
        let section = match &self.options {
            MethodOptions::Rm(o) => toml::Value::try_from(o),
            MethodOptions::Dpo(o) => toml::Value::try_from(o),
            MethodOptions::Online(o) => toml::Value::try_from(o),
        }
        .expect("invariant: options serialise");
        let mut extra = toml::Table::new();
        extra.insert(self.method.section().into(), section);
        self.base.to_toml_with(&extra)
    }
}
