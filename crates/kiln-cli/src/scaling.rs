//! `kiln scaling ...`: FLOP accounting, compute-optimal planning, IsoFLOP sweeps, Chinchilla
//! fits and plots (the library is kiln-scaling; docs/scaling.md explains the conventions).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use kiln_model::ModelConfig;
use kiln_scaling::data::read_runs;
use kiln_scaling::fit::{approach2, fit, Approaches, FitOptions};
use kiln_scaling::flops::flop_report;
use kiln_scaling::law::{compare_known_runs, load_law};
use kiln_scaling::shape::{describe, shape_for_params, SizeBy};
use kiln_scaling::sweep::{run_sweep, Sweep};
use kiln_scaling::{human, plot};
use kiln_train::RunConfig;
use tracing::info;

use crate::progress::Console;

#[derive(Subcommand)]
pub enum ScalingCommand {
    /// Parameters and training FLOPs per token under each convention (Kaplan 6N, Chinchilla
    /// full count, PaLM 6N + 12LdT, 6N with all parameters).
    Flops(FlopsArgs),
    /// Compute-optimal N and D for a FLOP budget from a parametric law.
    Plan(PlanArgs),
    /// Run an IsoFLOP sweep (resumable; finished runs are skipped) into one CSV.
    Sweep(SweepArgs),
    /// Fit Approach 2 (IsoFLOP parabolas) and Approach 3 (parametric law) with bootstrap
    /// intervals to a runs CSV.
    Fit(FitArgs),
    /// PNGs: loss vs compute, IsoFLOP curves, N_opt and D_opt vs compute.
    Plot(PlotArgs),
}

#[derive(Args)]
pub struct FlopsArgs {
    /// A run config or sweep config (TOML; a sweep's base model).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// A model preset: tiny, 10m, reference, smollm2-135m.
    #[arg(long)]
    pub preset: Option<String>,
    /// Context length (default: the config's train.seq_len, else 256).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PlanArgs {
    /// FLOP budget(s), e.g. 1e21 (repeatable).
    #[arg(long = "compute", required = true)]
    pub compute: Vec<f64>,
    /// chinchilla, epoch, or a JSON file written by `kiln scaling fit --json`.
    #[arg(long, default_value = "chinchilla")]
    pub law: String,
    /// Base config for the concrete shape (vocab, context, tying); default: vocab 32000,
    /// context 2048.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 32000)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SweepArgs {
    /// Sweep config: a run config plus a [sweep] section (configs/scaling-smoke.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a key: --set sweep.n_sizes=3 or --set train.batch_size=8 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the plan and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Effective training throughput in GFLOP/s (PaLM convention) for the plan's time estimate.
    #[arg(long)]
    pub assume_gflops: Option<f64>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ApproachArg {
    Both,
    #[value(name = "2")]
    Two,
    #[value(name = "3")]
    Three,
}

#[derive(Args)]
pub struct FitArgs {
    /// CSV with columns params,tokens,loss (flops and budget optional).
    #[arg(long)]
    pub runs: PathBuf,
    /// The column to read N from (e.g. non_embedding_params).
    #[arg(long, default_value = "params")]
    pub params_column: String,
    #[arg(long, value_enum, default_value = "both")]
    pub approach: ApproachArg,
    /// Bootstrap resamples (0 = point estimates only).
    #[arg(long, default_value_t = 200)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Confidence level of the intervals.
    #[arg(long, default_value_t = 0.95)]
    pub ci: f64,
    /// Approach 2: leave out budgets whose IsoFLOP minimum was not sampled (lowest loss at the
    /// smallest or largest size, or the parabola's vertex outside the sizes) instead of flagging.
    #[arg(long)]
    pub bracketed_only: bool,
    /// Print all constants and intervals as one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON to this file (usable as `kiln scaling plan --law FILE`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct PlotArgs {
    /// The runs CSV.
    #[arg(long)]
    pub runs: PathBuf,
    #[arg(long, default_value = "params")]
    pub params_column: String,
    /// Where the PNGs go (default: the CSV's directory).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Fit and draw the optimal-allocation power laws from bracketed budgets only (as
    /// `fit --bracketed-only`).
    #[arg(long)]
    pub bracketed_only: bool,
}

/// Up to 5 significant digits, without exponent for moderate values.
fn num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e6) {
        format!("{x:.4e}")
    } else {
        let s = format!("{x:.5}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

/// A run config, or the base run config of a sweep file (one with a `[sweep]` section).
fn load_run_config(path: &std::path::Path) -> Result<RunConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let is_sweep = text
        .parse::<toml::Table>()
        .map(|t| t.contains_key("sweep"))
        .unwrap_or(false);
    if is_sweep {
        Ok(Sweep::load(path, &[])?.base)
    } else {
        Ok(RunConfig::load(path, &[])?)
    }
}

pub fn run(c: ScalingCommand) -> Result<()> {
    match c {
        ScalingCommand::Flops(a) => flops(a),
        ScalingCommand::Plan(a) => plan(a),
        ScalingCommand::Sweep(a) => sweep(a),
        ScalingCommand::Fit(a) => fit_cmd(a),
        ScalingCommand::Plot(a) => plot_cmd(a),
    }
}

fn flops(a: FlopsArgs) -> Result<()> {
    let (cfg, seq_len) = match (&a.config, &a.preset) {
        (Some(path), _) => {
            let run = load_run_config(path)?;
            let t = a.seq_len.unwrap_or(run.train.seq_len);
            (run.model, t)
        }
        (None, Some(name)) => (ModelConfig::preset(name)?, a.seq_len.unwrap_or(256)),
        (None, None) => bail!("give --config or --preset"),
    };
    let report = flop_report(&cfg, seq_len);
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = serde_json::to_value(cfg.resolved())?;
        println!("{v}");
    } else {
        print!("{}", report.summary(&cfg));
    }
    Ok(())
}

fn plan(a: PlanArgs) -> Result<()> {
    let named = load_law(&a.law)?;
    let (law_name, law) = (named.name.clone(), named.law);
    law.validate()?;
    // Shapes are matched on the count the law's N means.
    let size_by = if named.params_column == "non_embedding_params" {
        SizeBy::NonEmbedding
    } else {
        SizeBy::Total
    };
    let mut base = match &a.config {
        Some(p) => load_run_config(p)?.model,
        None => ModelConfig {
            vocab_size: a.vocab_size,
            max_seq_len: a.seq_len,
            ..ModelConfig::m10()
        },
    };
    base.ffn_dim = None;
    let seq = base.max_seq_len;
    let mut budgets = Vec::new();
    for &c in &a.compute {
        if !(c.is_finite() && c > 0.0) {
            bail!("--compute must be a positive FLOP count, got {c}");
        }
        let o = law.optimal(c);
        let shape = shape_for_params(&base, o.params, size_by);
        let shape_params = size_by.count(&shape);
        budgets.push((o, shape, shape_params));
    }
    let known = compare_known_runs(&law);
    if a.json {
        let out = serde_json::json!({
            "law": {"name": law_name, "E": law.e, "A": law.a, "B": law.b, "alpha": law.alpha, "beta": law.beta,
                    "a": law.exponent_a(), "b": law.exponent_b(), "G": law.g()},
            "convention": format!("C = 6 N D, N = {}", named.params_column),
            "budgets": budgets.iter().map(|(o, shape, p)| serde_json::json!({
                "flops": o.flops, "params": o.params, "tokens": o.tokens,
                "tokens_per_param": o.tokens_per_param, "loss": o.loss,
                "shape": {"model": shape.resolved(), "params": p,
                          "tokens": o.flops / (6.0 * *p as f64),
                          "palm_flops_per_token": shape.train_flops_per_token(seq)},
            })).collect::<Vec<_>>(),
            "known_runs": known,
        });
        println!("{out}");
        return Ok(());
    }
    println!("law: {law_name}");
    println!(
        "  L(N, D) = {} + {} / N^{} + {} / D^{}",
        num(law.e),
        num(law.a),
        num(law.alpha),
        num(law.b),
        num(law.beta)
    );
    println!(
        "  N_opt = G (C/6)^a, a = beta/(alpha+beta) = {:.4}, b = {:.4}, G = {:.4}",
        law.exponent_a(),
        law.exponent_b(),
        law.g()
    );
    println!(
        "  convention: C = 6 N D, N = {}",
        if named.params_column == "params" {
            "all parameters".to_string()
        } else {
            format!("the {} column", named.params_column)
        }
    );
    for (o, shape, p) in &budgets {
        println!();
        println!("C = {:.3e} FLOPs:", o.flops);
        println!("  N_opt            {} parameters", human(o.params));
        println!("  D_opt            {} tokens", human(o.tokens));
        println!("  tokens/param     {:.1}", o.tokens_per_param);
        println!("  predicted loss   {:.4}", o.loss);
        println!(
            "  a shape near it  {} (vocab {}, context {})",
            describe(shape),
            shape.vocab_size,
            seq
        );
        println!(
            "                   with D = C / (6 N) = {} tokens",
            human(o.flops / (6.0 * *p as f64))
        );
    }
    println!();
    println!("well-known runs (C = 6 N D) and what this law would have used:");
    println!(
        "  {:<16} {:>10} {:>9} {:>8} {:>8}   {:>10} {:>9} {:>8} {:>8}",
        "run", "C", "N", "D", "D/N", "N_opt", "D_opt", "D/N", "loss"
    );
    for k in &known {
        println!(
            "  {:<16} {:>10.3e} {:>9} {:>8} {:>8.1}   {:>10} {:>9} {:>8.1} {:>8.4}",
            k.run.name,
            k.flops,
            human(k.run.params),
            human(k.run.tokens),
            k.tokens_per_param,
            human(k.optimal.params),
            human(k.optimal.tokens),
            k.optimal.tokens_per_param,
            k.optimal.loss,
        );
        println!(
            "  {:<16} law's loss at the actual N, D: {:.4} (optimal: {:.4})",
            "", k.loss, k.optimal.loss
        );
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> Result<()> {
    let sweep = Sweep::load(&a.config, &a.overrides)?;
    let plan = sweep.plan()?;
    let csv = sweep.csv_path();
    println!("{}", plan.table(a.assume_gflops.map(|g| g * 1e9)));
    println!(
        "D = C / (PaLM FLOPs per token 6 N_matmul + 12 L d T); runs in {}, results in {}",
        sweep.sweep.out_dir.display(),
        csv.display()
    );
    if a.dry_run {
        return Ok(());
    }
    let stop = crate::commands::stop_on_ctrl_c()?;
    let mut console = Console::new();
    let out = run_sweep(&plan, &csv, &mut console, &stop)?;
    console.finish();
    info!(
        trained = out.trained,
        skipped = out.skipped,
        finished = out.rows.len(),
        planned = plan.runs.len(),
        csv = %csv.display(),
        "sweep"
    );
    if !out.stopped {
        info!(
            "next: kiln scaling fit --runs {0} && kiln scaling plot --runs {0}",
            csv.display()
        );
    }
    crate::commands::finish_run(
        out.stopped,
        format!("kiln scaling sweep --config {}", a.config.display()),
    )
}

fn fit_cmd(a: FitArgs) -> Result<()> {
    if !(a.ci > 0.0 && a.ci < 1.0) {
        bail!("--ci must be in (0, 1), got {}", a.ci);
    }
    let table = read_runs(&a.runs, &a.params_column)?;
    let opts = FitOptions {
        approaches: match a.approach {
            ApproachArg::Both => Approaches::Both,
            ApproachArg::Two => Approaches::Two,
            ApproachArg::Three => Approaches::Three,
        },
        bootstrap: a.bootstrap,
        seed: a.seed,
        ci_level: a.ci,
        bracketed_only: a.bracketed_only,
        ..Default::default()
    };
    let report = fit(&table, &opts)?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &a.out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", report.summary());
    }
    Ok(())
}

fn plot_cmd(a: PlotArgs) -> Result<()> {
    let table = read_runs(&a.runs, &a.params_column)?;
    let out_dir = a.out_dir.clone().unwrap_or_else(|| {
        a.runs
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let opts = FitOptions {
        bootstrap: 0,
        bracketed_only: a.bracketed_only,
        ..Default::default()
    };
    let a2 = match approach2(&table, &opts) {
        Ok(a2) => Some(a2),
        Err(e) => {
            info!("no IsoFLOP fit ({e}); plotting the runs only");
            None
        }
    };
    for p in plot::plot_all(&table, a2.as_ref(), &out_dir)? {
        info!(out = %p.display(), "plot written");
    }
    Ok(())
}
