//! What every trainer here shares: the model that learns (all weights, or LoRA adapters on a
//! frozen base), an optional scalar head (the reward model's score, PPO's value) with its own
//! AdamW state, one optimizer step over both with a global gradient-norm clip, the run
//! directory (config, tokenizer, metrics, plots) and atomic checkpoints with exact resume.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kiln_chat::ChatFormat;
use kiln_data::WindowSampler;
use kiln_model::{Grads, Llama, LoraSpec, ModelConfig, Params, ScalarHead, SplitMix64};
use kiln_train::checkpoint::{self, CheckpointState, MODEL_FILE, OPTIMIZER_FILE};
use kiln_train::optim::AdamW;
use kiln_train::plot::{plot_series, Series};
use kiln_train::{write_atomic, TrainError};

use crate::{RlhfConfig, RlhfError};

/// The head's weight in a checkpoint (`score.weight`, transformers' name).
pub const HEAD_FILE: &str = "score.safetensors";
const HEAD_OPTIMIZER_FILE: &str = "score_optimizer.safetensors";
/// Trainer state beyond kiln-train's (the adaptive KL coefficient).
const EXTRA_FILE: &str = "trainer_state.json";

/// A scalar head that trains: `score.weight (1, d)` in its own flat buffer.
pub struct TrainedHead {
    pub head: ScalarHead,
    pub params: Params,
    pub opt: AdamW,
}

impl TrainedHead {
    pub fn new(weight: &Tensor, cfg: &kiln_train::OptimConfig) -> Result<Self, RlhfError> {
        let name = format!("{}.weight", ScalarHead::NAME);
        let params = Params::from_named(HashMap::from([(name.clone(), weight.detach())]))?;
        let head = ScalarHead::from_weight(params.tensor(&name)?);
        let opt = AdamW::new(&params, cfg)?;
        Ok(Self { head, params, opt })
    }
}

/// A chart of [`MetricsLog::plot`]: file name, title, and the metrics drawn (`true`: the
/// held-out rows).
pub type Chart<'a> = (&'a str, &'a str, &'a [(&'a str, bool)]);

/// Metrics of one step, by name.
pub type Metrics = BTreeMap<String, f64>;

/// Progress callbacks (the library never prints).
pub trait RlhfObserver {
    fn on_message(&mut self, _msg: &str) {}
    /// Progress of long work before training (DPO's reference log-probabilities): `done` of
    /// `total` items of `what`.
    fn on_progress(&mut self, _what: &str, _done: u64, _total: u64) {}
    fn on_start(&mut self, _total_steps: u64, _start_step: u64) {}
    fn on_step(&mut self, _step: u64, _metrics: &Metrics) {}
    fn on_eval(&mut self, _step: u64, _metrics: &Metrics) {}
    fn on_sample(&mut self, _step: u64, _prompt: &str, _response: &str, _reward: f64) {}
    fn on_checkpoint(&mut self, _dir: &Path) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl RlhfObserver for Quiet {}

/// The model that learns and its optimizer state.
pub struct Learner {
    pub model: Llama,
    pub params: Params,
    pub opt: AdamW,
    pub head: Option<TrainedHead>,
    pub lora: Option<LoraSpec>,
    /// How it trains, for the log.
    pub mode: String,
    pub total_params: usize,
    /// Where the starting weights came from, with their fingerprint (written next to every
    /// adapter).
    pub base: kiln_load::AdapterBase,
}

impl Learner {
    /// The model at `path` set up as `cfg` says (full fine-tuning, LoRA, or LoRA on a
    /// quantised GGUF base), with a scalar head when `head` gives its starting weight.
    pub fn build(
        path: &Path,
        model_config: &ModelConfig,
        cfg: &RlhfConfig,
        head: Option<Tensor>,
        device: &Device,
    ) -> Result<Self, RlhfError> {
        let lora = cfg.base.lora_spec()?;
        let kiln_load::Trainable {
            mut model,
            params,
            mode,
            total_params,
            base,
        } = kiln_load::build_trainable(
            path,
            model_config,
            lora.as_ref(),
            cfg.base.sft.base_quantized,
            cfg.base.train.seed,
            device,
        )?;
        model.set_activation_checkpointing(cfg.base.train.activation_checkpointing);
        model.set_precision(cfg.base.train.precision);
        let opt = AdamW::for_model(&model, &params, &cfg.base.optim)?;
        let head = head
            .map(|w| TrainedHead::new(&w, &cfg.base.optim))
            .transpose()?;
        Ok(Self {
            model,
            params,
            opt,
            head,
            lora,
            mode,
            total_params,
            base,
        })
    }

    pub fn step(&self) -> u64 {
        self.opt.step
    }

    /// Parameters that train (the head's included).
    pub fn trainable(&self) -> usize {
        self.opt.layout().total() + self.head.as_ref().map_or(0, |h| h.opt.layout().total())
    }

    /// One optimizer step: `backward` fills the gradients (the trunk's, and the head's when
    /// there is one; both start at zero), then both are clipped by their joint norm and
    /// updated. Returns what `backward` returned and the gradient norm before clipping.
    pub fn optimizer_step<T>(
        &mut self,
        lr: f64,
        clip: f64,
        backward: impl FnOnce(
            &Llama,
            Option<&ScalarHead>,
            &mut Grads,
            Option<&mut Grads>,
        ) -> Result<T, RlhfError>,
    ) -> Result<(T, f64), RlhfError> {
        self.opt.grads_mut().zero();
        if let Some(h) = &mut self.head {
            h.opt.grads_mut().zero();
        }
        let out = {
            let (head, head_grads) = match &mut self.head {
                Some(h) => (Some(&h.head), Some(h.opt.grads_mut())),
                None => (None, None),
            };
            backward(&self.model, head, self.opt.grads_mut(), head_grads)?
        };
        let mut ss = self.opt.grads().sum_of_squares()?;
        if let Some(h) = &self.head {
            ss += h.opt.grads().sum_of_squares()?;
        }
        let norm = ss.sqrt();
        if !norm.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step() + 1,
                what: format!("gradient norm is {norm}"),
            }
            .into());
        }
        let scale = if clip > 0.0 {
            (clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.opt.step(&self.params, lr, scale)?;
        if let Some(h) = &mut self.head {
            h.opt.step(&h.params, lr, scale)?;
        }
        Ok((out, norm))
    }

    /// Saves a checkpoint of the run at the current step: the trainable weights, optimizer
    /// state, the head, a PEFT adapter under LoRA, the RNG and `extra` trainer state.
    pub fn save_checkpoint(
        &self,
        step: u64,
        run_dir: &Path,
        cfg: &RlhfConfig,
        config_toml: &str,
        rng: &SplitMix64,
        extra: &serde_json::Value,
    ) -> Result<PathBuf, RlhfError> {
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            tokens_seen: 0,
            sampler: WindowSampler {
                seed: cfg.base.train.seed,
                batch_size: cfg.base.train.batch_size,
                ctx: cfg.base.train.seq_len,
                next_batch: step,
            },
            dropout_rng: rng.clone(),
            files: Default::default(),
        };
        let base = &self.base;
        Ok(checkpoint::save(
            run_dir,
            state,
            config_toml,
            |dir| {
                self.params.save(&dir.join(MODEL_FILE))?;
                self.opt.save(&dir.join(OPTIMIZER_FILE))?;
                if let Some(h) = &self.head {
                    h.params.save(&dir.join(HEAD_FILE))?;
                    h.opt.save(&dir.join(HEAD_OPTIMIZER_FILE))?;
                }
                if let Some(spec) = &self.lora {
                    kiln_load::save_adapter(&dir.join("adapter"), &self.params, spec, base)
                        .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
                }
                let p = dir.join(EXTRA_FILE);
                std::fs::write(&p, extra.to_string())
                    .map_err(|e| TrainError::Io(format!("{}: {e}", p.display())))?;
                Ok(())
            },
            &kiln_train::checkpoint::Retention::of(&cfg.base.train)?,
        )?)
    }

    /// Restores the newest checkpoint of `run_dir`, if any: returns its directory, step, RNG
    /// and extra state. A run step is `updates_per_step` optimizer updates.
    pub fn resume(
        &mut self,
        run_dir: &Path,
        cfg: &RlhfConfig,
        updates_per_step: u64,
    ) -> Result<Option<(PathBuf, u64, SplitMix64, serde_json::Value)>, RlhfError> {
        let Some((_, dir)) = checkpoint::list(run_dir)?.last().cloned() else {
            return Ok(None);
        };
        let state = checkpoint::load_state(&dir)?;
        if state.sampler.batch_size != cfg.base.train.batch_size
            || state.sampler.seed != cfg.base.train.seed
        {
            return Err(RlhfError::Config(format!(
                "{}: saved with batch_size {} and seed {}, but the config now says {} and {}: resume with the same config",
                dir.display(),
                state.sampler.batch_size,
                state.sampler.seed,
                cfg.base.train.batch_size,
                cfg.base.train.seed
            )));
        }
        self.params.assign_from_file(&dir.join(MODEL_FILE))?;
        let updates = state.step * updates_per_step;
        self.opt.load(&dir.join(OPTIMIZER_FILE), updates)?;
        if let Some(h) = &mut self.head {
            h.params.assign_from_file(&dir.join(HEAD_FILE))?;
            h.opt.load(&dir.join(HEAD_OPTIMIZER_FILE), updates)?;
        }
        let extra = std::fs::read_to_string(dir.join(EXTRA_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        Ok(Some((dir, state.step, state.dropout_rng, extra)))
    }
}

/// What every trainer reads first: the model's shape, the run config (with the model's
/// context for its defaults) and the chat format (the model's template, or `sft.template`).
pub(crate) fn open_model(
    model: &Path,
    method: crate::Method,
    config_file: Option<&Path>,
    overrides: &[String],
) -> Result<(RlhfConfig, ChatFormat, ModelConfig), RlhfError> {
    let tokenizer = kiln_load::load_tokenizer(model)?;
    let (_, model_config) = kiln_load::load_model_config(model)?;
    kiln_load::check_vocab(&tokenizer, &model_config)?;
    let cfg = RlhfConfig::load(method, config_file, overrides, model_config.max_seq_len)?;
    if cfg.base.train.seq_len > model_config.max_seq_len {
        return Err(RlhfError::Config(format!(
            "train.seq_len {} exceeds the model's context of {}",
            cfg.base.train.seq_len, model_config.max_seq_len
        )));
    }
    let template = match &cfg.base.sft.template {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| RlhfError::Io {
            path: p.clone(),
            source: e,
        })?),
        None => None,
    };
    let format = ChatFormat::new(tokenizer, template)?;
    Ok((cfg, format, model_config))
}

/// Prepares the run directory: `config.toml` (the config, the model's `[model]` so kiln's
/// loaders read the run, and `[source]`), the tokenizer with the chat template used.
pub fn init_run_dir(
    run_dir: &Path,
    cfg: &RlhfConfig,
    model_config: &ModelConfig,
    format: &ChatFormat,
    source: &[(&str, String)],
) -> Result<String, RlhfError> {
    std::fs::create_dir_all(run_dir).map_err(|e| RlhfError::Io {
        path: run_dir.to_path_buf(),
        source: e,
    })?;
    let mut root: toml::Table = cfg.to_toml().parse().expect("invariant: own TOML parses");
    root.insert(
        "model".into(),
        toml::Value::try_from(model_config.resolved()).expect("invariant: serialises"),
    );
    let mut src = toml::Table::new();
    src.insert(
        "method".into(),
        toml::Value::String(cfg.method.section().into()),
    );
    for (k, v) in source {
        src.insert((*k).into(), toml::Value::String(v.clone()));
    }
    root.insert("source".into(), toml::Value::Table(src));
    let text = toml::to_string(&root).expect("invariant: serialises");
    write_atomic(&run_dir.join("config.toml"), text.as_bytes())?;
    let mut tok = format.tokenizer.clone();
    tok.chat_template = Some(format.source.clone());
    tok.save_hf(run_dir, model_config.max_seq_len)?;
    write_atomic(
        &run_dir.join("chat_template.jinja"),
        format.source.as_bytes(),
    )?;
    Ok(text)
}

/// `metrics.jsonl`: one JSON object per step (`{"step": n, name: value, ...}`; evaluation
/// rows carry `"eval": true`). On resume, rows after the resumed step are dropped.
pub struct MetricsLog {
    path: PathBuf,
    rows: Vec<serde_json::Value>,
}

impl MetricsLog {
    pub fn open(run_dir: &Path, keep_through_step: u64) -> Result<Self, RlhfError> {
        let path = run_dir.join("metrics.jsonl");
        let rows = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["step"].as_u64().is_some_and(|s| s <= keep_through_step))
                .collect(),
            Err(_) => Vec::new(),
        };
        let log = Self { path, rows };
        log.flush()?;
        Ok(log)
    }

    fn flush(&self) -> Result<(), RlhfError> {
        let text: String = self.rows.iter().map(|r| r.to_string() + "\n").collect();
        write_atomic(&self.path, text.as_bytes())?;
        Ok(())
    }

    pub fn write(&mut self, step: u64, eval: bool, m: &Metrics) -> Result<(), RlhfError> {
        let mut row = serde_json::Map::new();
        row.insert("step".into(), step.into());
        if eval {
            row.insert("eval".into(), true.into());
        }
        for (k, v) in m {
            row.insert(k.clone(), serde_json::json!(v));
        }
        self.rows.push(serde_json::Value::Object(row));
        self.flush()
    }

    /// `(step, value)` of metric `name` over the training (or evaluation) rows.
    pub fn series(&self, name: &str, eval: bool) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter(|r| r["eval"].as_bool().unwrap_or(false) == eval)
            .filter_map(|r| Some((r["step"].as_f64()?, r[name].as_f64()?)))
            .collect()
    }

    /// One PNG per group of metrics (`(file, title, [(metric, eval)])`), skipping empty ones.
    pub fn plot(&self, run_dir: &Path, charts: &[Chart]) -> Result<(), RlhfError> {
        for (file, title, names) in charts {
            // A colour per metric, by its first place in the chart's list: chosen and
            // rejected keep theirs whether or not the other is drawn.
            let color_of = |n: &str| names.iter().position(|(m, _)| *m == n).unwrap_or(0);
            let series: Vec<Series> = names
                .iter()
                .map(|(n, eval)| Series {
                    label: if *eval {
                        format!("held-out {n}")
                    } else {
                        n.to_string()
                    },
                    points: self.series(n, *eval),
                    dashed: *eval,
                    color: color_of(n),
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            if !series.is_empty() {
                plot_series(&run_dir.join(file), title, "step", "", &series)?;
            }
        }
        Ok(())
    }
}

/// The order of rows of optimizer step `step` for a dataset of `n` items taking
/// `per_step` each: shuffled per epoch by the seed and epoch, so a resumed run replays the
/// same items (as SFT does).
pub fn step_items(n: usize, per_step: usize, seed: u64, step: u64) -> Vec<usize> {
    let per_step = per_step.min(n).max(1);
    let spe = n.div_ceil(per_step) as u64;
    let (epoch, k) = (step / spe, (step % spe) as usize);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed ^ 0xE90C ^ epoch.wrapping_mul(0x9E37_79B9));
    for i in (1..n).rev() {
        let j = (rng.next_f64() * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    order[k * per_step..((k + 1) * per_step).min(n)].to_vec()
}
