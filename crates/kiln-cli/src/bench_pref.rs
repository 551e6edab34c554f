//! `kiln bench dpo` and `kiln bench grpo`: time preference-tuning steps of a real model on
//! real data, and with `--pytorch` the same work through TRL (`DPOTrainer`, `GRPOTrainer`,
//! PEFT LoRA of the same rank) right after, side by side.
//!
//! Both sides get the same token ids in the same step order: kiln builds its trainer as
//! `kiln dpo` / `kiln grpo` would (chat template, truncation, the seeded per-step order), and
//! writes each step's pairs (or prompts) in that order to a JSON file that
//! bench/reference/bench_dpo.py (bench_grpo.py) feeds to TRL without shuffling.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Args;
use kiln_rlhf::{
    step_items, Method, OnlineSource, OnlineTrainer, PairSource, PairTrainer, RewardSpec,
    RlhfObserver,
};
use kiln_train::perf::peak_rss_mib;

/// What both benchmarks share.
#[derive(Args, Clone)]
pub struct PrefBenchArgs {
    /// The policy: a GGUF file (TRL loads the same file, dequantised to f32).
    #[arg(long)]
    pub model: PathBuf,
    /// Preference records (DPO) or prompt records (GRPO; preference records work too: their
    /// prompts are used).
    #[arg(long)]
    pub data: PathBuf,
    /// LoRA rank on all seven projections (alpha = 2 x rank).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed optimizer steps after the warmup.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Also run TRL on the same work (needs PYTHON with torch, transformers, peft and trl).
    #[arg(long)]
    pub pytorch: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchDpoArgs {
    #[command(flatten)]
    pub common: PrefBenchArgs,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Longest prompt + completion, in tokens (longer pairs are cut as `kiln dpo` cuts them).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
}

#[derive(Args)]
pub struct BenchGrpoArgs {
    #[command(flatten)]
    pub common: PrefBenchArgs,
    /// Prompts per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub prompts_per_step: usize,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    pub group_size: usize,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// The reward: kiln's `contains:TEXT` (1 when the response contains TEXT, else 0; the
    /// missing-EOS penalty is off on both sides).
    #[arg(long, default_value = "with")]
    pub reward_contains: String,
}

/// Logs the trainers' messages and nothing else.
struct Log;
impl RlhfObserver for Log {
    fn on_message(&mut self, msg: &str) {
        tracing::info!("{msg}");
    }
}

/// Median and per-step seconds of the steps after the warmup.
struct Timings {
    steps: Vec<f64>,
    median: f64,
}

fn timings(all: &[f64], warmup: usize) -> Timings {
    let steps = all[warmup..].to_vec();
    let mut sorted = steps.clone();
    sorted.sort_by(f64::total_cmp);
    Timings {
        median: sorted[sorted.len() / 2],
        steps,
    }
}

fn common_overrides(c: &PrefBenchArgs, total_steps: usize, lr: f64) -> Vec<String> {
    vec![
        format!("train.steps={total_steps}"),
        "train.eval_every=0".into(),
        "train.checkpoint_every=0".into(),
        "sft.val_fraction=0.0".into(),
        format!("lora.rank={}", c.rank),
        format!("lora.alpha={}", 2 * c.rank),
        format!("optim.lr={lr}"),
        "optim.warmup_steps=0".into(),
    ]
}

pub fn run_dpo(a: BenchDpoArgs) -> Result<()> {
    let c = &a.common;
    ensure!(a.batch_size > 0, "--batch-size must be positive");
    ensure!(c.steps > 0, "--steps must be positive");
    let total = c.warmup + c.steps;
    let lr = 1e-4;
    let mut overrides = common_overrides(c, total, lr);
    overrides.extend([
        format!("train.batch_size={}", a.batch_size),
        format!("train.seq_len={}", a.seq_len),
        format!("sft.max_records={}", total * a.batch_size),
    ]);
    let run_dir = tempfile::tempdir()?;
    let t0 = Instant::now();
    let source = PairSource {
        model: c.model.clone(),
        data: vec![c.data.clone()],
        reference: None,
    };
    let mut trainer = PairTrainer::new(
        Method::Dpo,
        source,
        None,
        &overrides,
        run_dir.path(),
        false,
        &mut Log,
    )?;
    let setup_s = t0.elapsed().as_secs_f64();
    let n = trainer.train.len();
    ensure!(
        n >= total * a.batch_size,
        "{} holds {n} pairs; --warmup + --steps = {total} steps of {} need {}",
        c.data.display(),
        a.batch_size,
        total * a.batch_size
    );
    let seed = trainer.cfg.base.train.seed;
    // Each step's pairs, in kiln's order, for TRL.
    let mut pairs_json = Vec::new();
    let mut step_tokens = Vec::new();
    for s in 0..total {
        let mut tokens = 0;
        for i in step_items(n, a.batch_size, seed, s as u64) {
            let p = &trainer.train[i];
            let (c_ids, r_ids) = (&p.chosen.ids, &p.rejected.ids);
            tokens += c_ids.len() + r_ids.len();
            // One prompt for both completions, as TRL holds it: both were cut from the
            // prompt's start, so the shorter is the other's tail.
            let keep = p.chosen.prompt_len.min(p.rejected.prompt_len);
            let prompt = &c_ids[p.chosen.prompt_len - keep..p.chosen.prompt_len];
            pairs_json.push(serde_json::json!({
                "prompt_ids": prompt,
                "chosen_ids": &c_ids[p.chosen.prompt_len..],
                "rejected_ids": &r_ids[p.rejected.prompt_len..],
            }));
        }
        step_tokens.push(tokens);
    }
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..total {
        let t = Instant::now();
        let m = trainer.train_step()?;
        times.push(t.elapsed().as_secs_f64());
        losses.push(m.get("loss").copied().unwrap_or(f64::NAN));
    }
    let t = timings(&times, c.warmup);
    let tokens: usize = step_tokens[c.warmup..].iter().sum();
    let tps = tokens as f64 / t.steps.iter().sum::<f64>();
    let rss = peak_rss_mib().unwrap_or(f64::NAN);
    let what = format!(
        "dpo lora-r{} {} pairs x {} tokens",
        c.rank, a.batch_size, a.seq_len
    );
    report(
        c,
        &what,
        &t,
        tps,
        rss,
        &[("setup_and_reference_s", setup_s)],
        ("loss", &losses),
    );
    if c.pytorch {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("pairs.json");
        std::fs::write(&file, serde_json::to_string(&pairs_json)?)?;
        let args = trl_args(
            c,
            total,
            lr,
            &[
                ("--pairs", file.display().to_string()),
                ("--batch-size", a.batch_size.to_string()),
                ("--seq-len", a.seq_len.to_string()),
                ("--beta", trainer.cfg.dpo().beta.to_string()),
            ],
        );
        compare(
            c,
            Path::new("bench/reference/bench_dpo.py"),
            &args,
            "TRL's DPOTrainer",
            t.median,
            tps,
            rss,
        )?;
    }
    Ok(())
}

pub fn run_grpo(a: BenchGrpoArgs) -> Result<()> {
    let c = &a.common;
    ensure!(
        a.prompts_per_step > 0 && a.group_size >= 2,
        "--prompts-per-step must be positive and --group-size at least 2"
    );
    ensure!(c.steps > 0, "--steps must be positive");
    let total = c.warmup + c.steps;
    let lr = 1e-5;
    let mut overrides = common_overrides(c, total, lr);
    overrides.extend([
        format!("train.batch_size={}", a.prompts_per_step),
        format!("sft.max_records={}", total * a.prompts_per_step),
        format!("grpo.group_size={}", a.group_size),
        format!("grpo.max_new_tokens={}", a.max_new_tokens),
        "grpo.temperature=1.0".into(),
        "grpo.penalize_missing_eos=false".into(),
        "grpo.kl_coef=0.0".into(),
        // TRL computes no KL at β = 0; kiln then skips its reference pass too.
        "grpo.measure_kl=false".into(),
        "grpo.sample_every=0".into(),
    ]);
    let run_dir = tempfile::tempdir()?;
    let source = OnlineSource {
        model: c.model.clone(),
        prompts: vec![c.data.clone()],
        reward: RewardSpec::Fn(format!("contains:{}", a.reward_contains)),
    };
    let mut trainer = OnlineTrainer::new(
        Method::Grpo,
        source,
        None,
        &overrides,
        run_dir.path(),
        false,
        &mut Log,
    )?;
    let n = trainer.prompts.len();
    ensure!(
        n >= total * a.prompts_per_step,
        "{} holds {n} prompts; --warmup + --steps = {total} steps of {} need {}",
        c.data.display(),
        a.prompts_per_step,
        total * a.prompts_per_step
    );
    let seed = trainer.cfg.base.train.seed;
    let mut prompts_json = Vec::new();
    let mut prompt_tokens = Vec::new();
    for s in 0..total {
        let mut tokens = 0;
        for i in step_items(n, a.prompts_per_step, seed, s as u64) {
            let ids = trainer.format.encode_prompt(&trainer.prompts[i].prompt)?;
            tokens += ids.len();
            prompts_json.push(serde_json::json!({ "prompt_ids": ids }));
        }
        prompt_tokens.push(tokens);
    }
    let samples = (a.prompts_per_step * a.group_size) as f64;
    let (mut times, mut rewards, mut rollout_s) = (Vec::new(), Vec::new(), 0.0);
    let mut tokens = 0.0;
    for (s, &prompt_tokens) in prompt_tokens.iter().enumerate() {
        let t = Instant::now();
        let m = trainer.train_step(&mut Log)?;
        times.push(t.elapsed().as_secs_f64());
        rewards.push(m.get("reward").copied().unwrap_or(f64::NAN));
        if s >= c.warmup {
            // Every sample is its prompt and its response, through the rollout and the update.
            let response = m.get("response_len").copied().unwrap_or(0.0);
            tokens += a.group_size as f64 * prompt_tokens as f64 + samples * response;
            rollout_s += m.get("rollout_s").copied().unwrap_or(f64::NAN);
        }
    }
    let t = timings(&times, c.warmup);
    let tps = tokens / t.steps.iter().sum::<f64>();
    let rss = peak_rss_mib().unwrap_or(f64::NAN);
    let what = format!(
        "grpo lora-r{} {} prompts x {} samples of up to {} tokens",
        c.rank, a.prompts_per_step, a.group_size, a.max_new_tokens
    );
    report(
        c,
        &what,
        &t,
        tps,
        rss,
        &[("rollout_s_mean", rollout_s / c.steps as f64)],
        ("reward", &rewards),
    );
    if c.pytorch {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("prompts.json");
        std::fs::write(&file, serde_json::to_string(&prompts_json)?)?;
        let args = trl_args(
            c,
            total,
            lr,
            &[
                ("--prompts", file.display().to_string()),
                ("--prompts-per-step", a.prompts_per_step.to_string()),
                ("--group-size", a.group_size.to_string()),
                ("--max-new-tokens", a.max_new_tokens.to_string()),
                ("--temperature", "1.0".into()),
                ("--reward-contains", a.reward_contains.clone()),
            ],
        );
        compare(
            c,
            Path::new("bench/reference/bench_grpo.py"),
            &args,
            "TRL's GRPOTrainer",
            t.median,
            tps,
            rss,
        )?;
    }
    Ok(())
}

/// The TRL script's arguments: the model, LoRA, schedule and threads both scripts take, then
/// the method's own.
fn trl_args(
    c: &PrefBenchArgs,
    total_steps: usize,
    lr: f64,
    own: &[(&str, String)],
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--gguf".into(), c.model.clone().into()];
    let shared = [
        ("--rank", c.rank.to_string()),
        ("--alpha", (2 * c.rank).to_string()),
        ("--steps", total_steps.to_string()),
        ("--warmup", c.warmup.to_string()),
        ("--lr", lr.to_string()),
        (
            "--threads",
            candle_core::utils::get_num_threads().to_string(),
        ),
    ];
    for (flag, value) in shared.iter().chain(own) {
        args.push(flag.into());
        args.push(value.into());
    }
    args
}

/// kiln's line (or JSON object): median step, tokens/s, peak RSS, extra figures and one value
/// per step.
fn report(
    c: &PrefBenchArgs,
    what: &str,
    t: &Timings,
    tps: f64,
    rss: f64,
    extra: &[(&str, f64)],
    per_step: (&str, &[f64]),
) {
    if c.json {
        let mut o = serde_json::json!({"impl": "kiln", "work": what, "median_step_s": t.median,
            "step_s": t.steps, "tokens_per_s": tps, "peak_rss_mib": rss,
            "threads": candle_core::utils::get_num_threads()});
        for (k, v) in extra {
            o[*k] = serde_json::json!(v);
        }
        o[format!("{}_per_step", per_step.0)] = serde_json::json!(per_step.1);
        println!("{o}");
    } else {
        let extra: String = extra.iter().map(|(k, v)| format!(", {k} {v:.1}")).collect();
        let steps: Vec<String> = per_step.1.iter().map(|v| format!("{v:.4}")).collect();
        println!(
            "kiln bench {what}: median step {:.2} s, {tps:.0} tokens/s, peak RSS {rss:.0} MiB{extra}\n  {} per step: {}",
            t.median,
            per_step.0,
            steps.join(" ")
        );
    }
}

/// Runs the TRL script on the same work and prints its figures and the ratios.
fn compare(
    c: &PrefBenchArgs,
    script: &Path,
    args: &[std::ffi::OsString],
    what: &str,
    kiln_step: f64,
    kiln_tps: f64,
    kiln_rss: f64,
) -> Result<()> {
    ensure!(
        script.exists(),
        "{} not found: run from the repository root",
        script.display()
    );
    let trl = crate::bench::run_python_json(script, args, what)?;
    let step = trl["median_step_s"].as_f64().unwrap_or(f64::NAN);
    let tps = trl["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let rss = trl["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
    let (speedup, rss_ratio) = (step / kiln_step, kiln_rss / rss);
    if c.json {
        let mut o = trl.clone();
        o["impl"] = serde_json::json!("trl");
        o["kiln_speedup"] = serde_json::json!(speedup);
        o["kiln_tokens_per_s_ratio"] = serde_json::json!(kiln_tps / tps);
        o["kiln_over_trl_peak_rss"] = serde_json::json!(rss_ratio);
        println!("{o}");
    } else {
        println!(
            "{what} (trl {}, torch {}), same work: median step {step:.2} s, {tps:.0} tokens/s, peak RSS {rss:.0} MiB\n  kiln is {speedup:.2}x TRL's speed ({:.2}x its tokens/s) at {rss_ratio:.2}x its peak RSS",
            trl["trl_version"].as_str().unwrap_or("?"),
            trl["torch_version"].as_str().unwrap_or("?"),
            kiln_tps / tps
        );
    }
    Ok(())
}
