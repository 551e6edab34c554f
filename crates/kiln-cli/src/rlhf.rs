//! `kiln reward train|score`, `kiln dpo`, `kiln ppo`, `kiln grpo`: preference tuning.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use kiln_rlhf::{
    Method, Metrics, OnlineSource, OnlineTrainer, PairSource, PairTrainer, RewardModel, RewardSpec,
    RlhfObserver,
};
use tracing::info;

use crate::commands::stop_on_ctrl_c;

/// What every training verb takes: config, overrides, run directory, resume, LoRA.
#[derive(Args, Clone)]
pub struct CommonArgs {
    /// A config (TOML: [train], [optim], [sft] data options, [lora] and the method's own
    /// section); flags and --set override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key: --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The run directory (train.run_dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start over in a run directory that already holds a run: its metrics.jsonl and
    /// checkpoints/ are removed first (without this, or --resume, kiln refuses).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Train LoRA adapters of this rank on a frozen base (lora.rank).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (lora.alpha; default 2 x rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Keep a GGUF base in its quantised blocks while training LoRA adapters.
    #[arg(long)]
    pub base_quantized: bool,
    /// A Jinja chat template instead of the model's own (sft.template).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Skip bad records (counted) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_records: bool,
}

impl CommonArgs {
    fn overrides(&self, extra: Vec<String>) -> Vec<String> {
        let mut o = self.overrides.clone();
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        if let Some(out) = &self.out {
            o.push(format!("train.run_dir={}", q(out)));
        }
        if let Some(r) = self.lora_rank {
            o.push(format!("lora.rank={r}"));
        }
        if let Some(a) = self.lora_alpha {
            o.push(format!("lora.alpha={a}"));
        }
        if self.base_quantized {
            o.push("sft.base_quantized=true".into());
        }
        if let Some(t) = &self.template {
            o.push(format!("sft.template={}", q(t)));
        }
        if self.skip_bad_records {
            o.push("sft.skip_bad_records=true".into());
        }
        o.extend(extra);
        o
    }

    fn run_dir(&self, overrides: &[String], default: &str) -> PathBuf {
        crate::commands::run_dir_of(
            self.out.as_deref(),
            overrides,
            self.config.as_deref(),
            default,
        )
    }
}

#[derive(Subcommand)]
pub enum RewardCommand {
    /// Train a reward model on preference pairs (Bradley-Terry on the last token's score).
    Train(RewardTrainArgs),
    /// Score a response to a prompt with a trained reward model.
    Score(RewardScoreArgs),
}

#[derive(Args)]
pub struct RewardTrainArgs {
    /// The base model: a GGUF file, an HF directory or a kiln run/checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Preference records ({prompt, chosen, rejected} or ShareGPT with chosen/rejected).
    #[arg(long = "data", required = true)]
    pub data: Vec<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args)]
pub struct RewardScoreArgs {
    /// A reward-model run directory or checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub response: String,
    /// Print {"score": x}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DpoArgs {
    /// The policy to tune: a GGUF file, an HF directory or a kiln run/checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Preference records.
    #[arg(long = "data", required = true)]
    pub data: Vec<PathBuf>,
    /// The reference model (default: the starting model; under LoRA, its base).
    #[arg(long = "ref")]
    pub reference: Option<PathBuf>,
    /// dpo.beta (default 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// dpo.loss: sigmoid, ipo or hinge.
    #[arg(long)]
    pub loss: Option<String>,
    /// dpo.label_smoothing (sigmoid only).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args)]
pub struct OnlineArgs {
    /// The policy: a GGUF file, an HF directory or a kiln run/checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt records ({prompt} or messages ending with the user).
    #[arg(long = "prompts", required = true)]
    pub prompts: Vec<PathBuf>,
    /// A reward model trained with `kiln reward train`.
    #[arg(long, group = "rewardsrc")]
    pub reward: Option<PathBuf>,
    /// A built-in reward: contains:WORD, length:N or json-valid.
    #[arg(long, group = "rewardsrc")]
    pub reward_fn: Option<String>,
    /// A program reading {"prompt","response","record"} lines on stdin, printing one number
    /// per line (run with sh -c, kept running).
    #[arg(long, group = "rewardsrc")]
    pub reward_cmd: Option<String>,
    /// GRPO: samples per prompt (grpo.group_size, default 8).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// GRPO: β of the KL term (grpo.kl_coef, default 0); PPO: the KL penalty coefficient
    /// (ppo.kl_coef, default 0.1).
    #[arg(long, alias = "kl-coef")]
    pub beta: Option<f64>,
    /// Sampling temperature (default 1).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Response budget in tokens (default 64). A response that reaches it without an
    /// end-of-turn token scores the missing-EOS penalty, -1, instead of its reward
    /// (`<method>.penalize_missing_eos = false` turns that off); kiln warns when every response
    /// of a step was cut.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Training progress: a bar with ETA, log lines above it.
struct RlhfConsole {
    bar: ProgressBar,
    keys: &'static [&'static str],
    /// The last tenth of `on_progress` work logged (without a terminal).
    progress_tenth: Option<u64>,
}

impl RlhfConsole {
    fn new(keys: &'static [&'static str]) -> Self {
        Self {
            bar: crate::progress::steps_bar(),
            keys,
            progress_tenth: None,
        }
    }

    fn line(&self, m: &Metrics) -> String {
        self.keys
            .iter()
            .filter_map(|k| m.get(*k).map(|v| format!("{k} {v:.4}")))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

impl RlhfObserver for RlhfConsole {
    fn on_message(&mut self, msg: &str) {
        self.bar.suspend(|| info!("{msg}"));
    }
    fn on_progress(&mut self, what: &str, done: u64, total: u64) {
        // The steps bar shows it on a terminal (on_start resets it for training); elsewhere a
        // log line every 10%.
        self.bar.set_length(total);
        self.bar.set_position(done);
        self.bar.set_message(what.to_string());
        let tenth = done * 10 / total.max(1);
        if self.bar.is_hidden() && self.progress_tenth != Some(tenth) {
            self.progress_tenth = Some(tenth);
            info!("{what}: {done}/{total}");
        }
    }
    fn on_start(&mut self, total: u64, start: u64) {
        self.bar.set_length(total);
        self.bar.set_position(start);
        self.bar.reset_eta();
    }
    fn on_step(&mut self, step: u64, m: &Metrics) {
        self.bar.set_position(step);
        let line = self.line(m);
        self.bar.set_message(line.clone());
        self.bar.suspend(|| info!(step, "train: {line}"));
    }
    fn on_eval(&mut self, step: u64, m: &Metrics) {
        let line = self.line(m);
        self.bar.suspend(|| info!(step, "held-out: {line}"));
    }
    fn on_sample(&mut self, step: u64, prompt: &str, response: &str, reward: f64) {
        self.bar.suspend(|| {
            info!(
                step,
                reward = format!("{reward:.3}"),
                "sample: {prompt:?} -> {response:?}"
            )
        });
    }
    fn on_checkpoint(&mut self, dir: &Path) {
        self.bar
            .suspend(|| info!(checkpoint = %dir.display(), "saved"));
    }
}

const PAIR_KEYS: &[&str] = &[
    "loss",
    "accuracy",
    "margin",
    "reward_chosen",
    "reward_rejected",
];
const ONLINE_KEYS: &[&str] = &[
    "reward",
    "score",
    "kl",
    "entropy",
    "clip_fraction",
    "approx_kl",
    "value_loss",
    "response_len",
];

fn run_pairs(
    method: Method,
    source: PairSource,
    common: &CommonArgs,
    extra: Vec<String>,
    default_dir: &str,
) -> Result<()> {
    let overrides = common.overrides(extra);
    let run_dir = common.run_dir(&overrides, default_dir);
    crate::commands::claim_run_dir(&run_dir, common.resume, common.overwrite)?;
    let mut console = RlhfConsole::new(PAIR_KEYS);
    let mut t = PairTrainer::new(
        method,
        source,
        common.config.as_deref(),
        &overrides,
        &run_dir,
        common.resume,
        &mut console,
    )?;
    console.on_message(&format!(
        "{} of {} parameters train",
        t.learner.trainable(),
        t.learner.total_params
    ));
    crate::commands::log_precision(t.cfg.base.train.precision);
    let stop = stop_on_ctrl_c()?;
    let s = t.run(&mut console, &stop)?;
    console.bar.finish_and_clear();
    info!(
        steps = s.steps,
        before = console.line(&s.before),
        after = console.line(&s.after),
        wall_s = format!("{:.1}", s.wall_s),
        run_dir = %run_dir.display(),
        "done (held-out metrics)"
    );
    crate::commands::finish_run(s.stopped_early, "the same command and --resume")
}

pub fn reward(c: RewardCommand) -> Result<()> {
    match c {
        RewardCommand::Train(a) => run_pairs(
            Method::Rm,
            PairSource {
                model: a.model,
                data: a.data,
                reference: None,
            },
            &a.common,
            vec![],
            "runs/reward",
        ),
        RewardCommand::Score(a) => {
            let rm = RewardModel::load(&a.model, &crate::commands::device())?;
            let score = rm.score_text(&a.prompt, &a.response)?;
            if a.json {
                println!("{}", serde_json::json!({ "score": score }));
            } else {
                println!("{score:.6}");
            }
            Ok(())
        }
    }
}

pub fn dpo(a: DpoArgs) -> Result<()> {
    let mut extra = vec![];
    if let Some(b) = a.beta {
        extra.push(format!("dpo.beta={b}"));
    }
    if let Some(l) = &a.loss {
        if kiln_rlhf::losses::DpoLoss::parse(l).is_none() {
            bail!("--loss {l:?}: expected sigmoid, ipo or hinge");
        }
        extra.push(format!("dpo.loss={l:?}"));
    }
    if let Some(e) = a.label_smoothing {
        extra.push(format!("dpo.label_smoothing={e}"));
    }
    run_pairs(
        Method::Dpo,
        PairSource {
            model: a.model,
            data: a.data,
            reference: a.reference,
        },
        &a.common,
        extra,
        "runs/dpo",
    )
}

pub fn online(method: Method, a: OnlineArgs) -> Result<()> {
    let reward = match (&a.reward, &a.reward_fn, &a.reward_cmd) {
        (Some(p), None, None) => RewardSpec::Model(p.clone()),
        (None, Some(f), None) => RewardSpec::Fn(f.clone()),
        (None, None, Some(c)) => RewardSpec::Cmd(c.clone()),
        _ => bail!("give one reward: --reward RM, --reward-fn SPEC or --reward-cmd CMD"),
    };
    let s = method.section();
    let mut extra = vec![];
    if let Some(g) = a.group_size {
        if method == Method::Ppo {
            bail!("--group-size is a GRPO option");
        }
        extra.push(format!("{s}.group_size={g}"));
    }
    if let Some(b) = a.beta {
        extra.push(format!("{s}.kl_coef={b}"));
    }
    if let Some(t) = a.temperature {
        extra.push(format!("{s}.temperature={t}"));
    }
    if let Some(n) = a.max_new_tokens {
        extra.push(format!("{s}.max_new_tokens={n}"));
    }
    let overrides = a.common.overrides(extra);
    let run_dir = a.common.run_dir(&overrides, &format!("runs/{s}"));
    crate::commands::claim_run_dir(&run_dir, a.common.resume, a.common.overwrite)?;
    let mut console = RlhfConsole::new(ONLINE_KEYS);
    let mut t = OnlineTrainer::new(
        method,
        OnlineSource {
            model: a.model,
            prompts: a.prompts,
            reward,
        },
        a.common.config.as_deref(),
        &overrides,
        &run_dir,
        a.common.resume,
        &mut console,
    )?;
    crate::commands::log_precision(t.cfg.base.train.precision);
    let stop = stop_on_ctrl_c()?;
    let sum = t.run(&mut console, &stop)?;
    console.bar.finish_and_clear();
    info!(
        steps = sum.steps,
        first = console.line(&sum.first),
        last = console.line(&sum.last),
        wall_s = format!("{:.1}", sum.wall_s),
        run_dir = %run_dir.display(),
        "done"
    );
    crate::commands::finish_run(sum.stopped_early, "the same command and --resume")
}
