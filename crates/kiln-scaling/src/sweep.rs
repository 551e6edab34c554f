//! IsoFLOP sweeps.
//!
//! A sweep file is a run config (`[model] [data] [optim] [train]`, the schema of
//! `configs/tiny.toml`) plus a `[sweep]` section. For each budget C and each model size, a run
//! trains for `D = C / f` tokens, where `f` is the PaLM FLOPs per token `6 N_matmul + 12 L d T`
//! (`ModelConfig::train_flops_per_token`): `train.steps = round(D / tokens_per_step)`,
//! `optim.warmup_steps = round(warmup_fraction * steps)`, and the cosine schedule ends at the
//! run's last step. A size that would need fewer than `min_steps` steps is dropped from that
//! budget (it cannot be trained within it). Each run lives in `out_dir/c{C}-n{params}`; a run
//! whose directory holds `scaling-result.json` is done and skipped, an interrupted run resumes
//! from its latest checkpoint, and the CSV (see [`crate::data`]) is rewritten after every run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use kiln_model::ModelConfig;
use kiln_train::{apply_override, checkpoint, Observer, RunConfig, Trainer};
use serde::Deserialize;

use crate::data::{write_sweep_csv, RunRow};
use crate::shape::{shape_for_params, with_shape, SizeBy};
use crate::{human, io_err, Result, ScalingError};

/// The marker a finished run leaves in its directory (a [`RunRow`] as JSON).
pub const RESULT_FILE: &str = "scaling-result.json";

/// An explicit model shape in `[sweep] sizes`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitShape {
    pub dim: usize,
    pub n_layers: usize,
    #[serde(default)]
    pub n_heads: Option<usize>,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
}

/// The `[sweep]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSection {
    /// Compute budgets in FLOPs (PaLM convention).
    pub budgets: Vec<f64>,
    /// Parent of the run directories.
    pub out_dir: PathBuf,
    /// Results CSV (default `out_dir/runs.csv`).
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// Explicit shapes, the same at every budget (instead of the automatic family).
    #[serde(default)]
    pub sizes: Vec<ExplicitShape>,
    /// Automatic family: this many sizes, log-spaced from `min_params` to `max_params`.
    #[serde(default)]
    pub n_sizes: Option<usize>,
    #[serde(default)]
    pub min_params: Option<f64>,
    #[serde(default)]
    pub max_params: Option<f64>,
    /// Which count `min_params` / `max_params` refer to.
    #[serde(default)]
    pub size_by: SizeBy,
    /// The family's range is multiplied by `(C / smallest budget)^range_exponent` at each
    /// budget, so it can follow the optimum (about 0.5) instead of staying put (0).
    #[serde(default)]
    pub range_exponent: f64,
    /// Cap on one run's training tokens (say 4 epochs of the training split, so no run
    /// repeats its data more than that). At a budget where the automatic family's smallest
    /// sizes would need more tokens, the family's lower end is raised until they fit; it keeps
    /// `n_sizes` sizes. Explicit `sizes` that exceed it are dropped from that budget.
    #[serde(default)]
    pub max_tokens: Option<f64>,
    #[serde(default = "d_warmup_fraction")]
    pub warmup_fraction: f64,
    #[serde(default = "d_min_steps")]
    pub min_steps: u64,
}

fn d_warmup_fraction() -> f64 {
    0.05
}
fn d_min_steps() -> u64 {
    50
}

/// A sweep file: the base run config and the `[sweep]` section.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub base: RunConfig,
    pub sweep: SweepSection,
}

/// One run of the plan.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    pub budget: f64,
    pub name: String,
    pub run_dir: PathBuf,
    pub config: RunConfig,
    pub params: usize,
    pub non_embedding_params: usize,
    pub flops_per_token: f64,
    pub steps: u64,
    pub tokens: u64,
    /// `tokens * flops_per_token` (differs from the budget by the rounding of steps).
    pub flops: f64,
}

#[derive(Debug, Clone)]
pub struct SweepPlan {
    pub runs: Vec<PlannedRun>,
    /// Sizes dropped from a budget, duplicate shapes, and other remarks.
    pub notes: Vec<String>,
}

impl Sweep {
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ScalingError::Config(format!("cannot read sweep config {}: {e}", path.display()))
        })?;
        Self::from_toml_str(&text, overrides).map_err(|e| match e {
            ScalingError::Config(m) => ScalingError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Self> {
        let cfg_err = |m: String| ScalingError::Config(m);
        let mut root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| cfg_err(format!("invalid TOML: {}", e.message())))?;
        for o in overrides {
            apply_override(&mut root, o).map_err(train_err)?;
        }
        let sweep = root
            .remove("sweep")
            .ok_or_else(|| cfg_err("missing section [sweep]".into()))?;
        let sweep: SweepSection = sweep
            .try_into()
            .map_err(|e: toml::de::Error| cfg_err(format!("[sweep] {}", e.message())))?;
        // Steps are set per run; the base need not name them.
        if let Some(train) = root.get_mut("train").and_then(|t| t.as_table_mut()) {
            train.entry("steps").or_insert(toml::Value::Integer(1));
        }
        let base = RunConfig::from_table(root).map_err(train_err)?;
        let s = Self { base, sweep };
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        let s = &self.sweep;
        let bad = |m: &str| Err(ScalingError::Config(m.to_string()));
        if s.budgets.is_empty() {
            return bad("[sweep] budgets is empty");
        }
        if s.budgets.iter().any(|b| !(b.is_finite() && *b > 0.0)) {
            return bad("[sweep] budgets must be positive FLOP counts");
        }
        let mut sorted = s.budgets.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        sorted.dedup();
        if sorted.len() != s.budgets.len() {
            return bad("[sweep] budgets has duplicates");
        }
        let auto = s.n_sizes.is_some() || s.min_params.is_some() || s.max_params.is_some();
        match (s.sizes.is_empty(), auto) {
            (false, true) => {
                return bad("[sweep] give either sizes = [...] or n_sizes/min_params/max_params, not both")
            }
            (true, false) => {
                return bad("[sweep] give sizes = [{dim = .., n_layers = ..}, ...] or n_sizes, min_params and max_params")
            }
            (true, true) => {
                let (Some(n), Some(lo), Some(hi)) = (s.n_sizes, s.min_params, s.max_params) else {
                    return bad("[sweep] the automatic family needs all of n_sizes, min_params and max_params");
                };
                if n == 0 || !(lo > 0.0 && hi >= lo) {
                    return bad("[sweep] need n_sizes >= 1 and 0 < min_params <= max_params");
                }
            }
            (false, false) => {}
        }
        if !(0.0..=0.5).contains(&s.warmup_fraction) {
            return bad("[sweep] warmup_fraction must be in [0, 0.5]");
        }
        if s.min_steps == 0 {
            return bad("[sweep] min_steps must be positive");
        }
        if s.max_tokens.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
            return bad("[sweep] max_tokens must be a positive token count");
        }
        if self.base.train.init_from.is_some() {
            return bad(
                "[train] init_from cannot be used in a sweep (every run starts from scratch)",
            );
        }
        Ok(())
    }

    pub fn csv_path(&self) -> PathBuf {
        self.sweep
            .csv
            .clone()
            .unwrap_or_else(|| self.sweep.out_dir.join("runs.csv"))
    }

    /// Model shapes for one budget, and a note when `max_tokens` raised the family's lower end.
    fn shapes(&self, budget: f64) -> (Vec<ModelConfig>, Option<String>) {
        let s = &self.sweep;
        let base = &self.base.model;
        if !s.sizes.is_empty() {
            let shapes = s
                .sizes
                .iter()
                .map(|x| with_shape(base, x.dim, x.n_layers, x.n_heads, x.n_kv_heads))
                .collect();
            return (shapes, None);
        }
        let (n, lo, hi) = (
            s.n_sizes.unwrap_or(1),
            s.min_params.unwrap_or(1.0),
            s.max_params.unwrap_or(1.0),
        );
        let smallest = s.budgets.iter().cloned().fold(f64::INFINITY, f64::min);
        let shift = (budget / smallest).powf(s.range_exponent);
        let (mut low, high) = (lo * shift, hi * shift);
        let mut note = None;
        if let Some(cap) = s.max_tokens {
            let (seq, tps) = (self.base.train.seq_len, self.base.tokens_per_step() as f64);
            // The run's tokens as `plan` rounds them: whole steps.
            let tokens_at = |target: f64| {
                let fpt = shape_for_params(base, target, s.size_by).train_flops_per_token(seq);
                (budget / fpt / tps).round() * tps
            };
            let planned_low = low;
            // Shapes are discrete, so walk up in 1% steps to the first that fits.
            while tokens_at(low) > cap && low < high {
                low = (low * 1.01).min(high);
            }
            if low > planned_low {
                note = Some(format!(
                    "budget {budget:e}: smallest size raised from {} to {} {} params so that no run trains on more than max_tokens = {}",
                    human(planned_low),
                    human(low),
                    s.size_by.name(),
                    human(cap)
                ));
            }
        }
        let shapes = (0..n)
            .map(|i| {
                let frac = if n == 1 {
                    0.5
                } else {
                    i as f64 / (n - 1) as f64
                };
                let target = (low.ln() + frac * (high / low).ln()).exp();
                shape_for_params(base, target, s.size_by)
            })
            .collect();
        (shapes, note)
    }

    /// Every run of the sweep, budgets in the given order, sizes ascending.
    pub fn plan(&self) -> Result<SweepPlan> {
        let mut runs = Vec::new();
        let mut notes = Vec::new();
        let tps = self.base.tokens_per_step() as f64;
        let seq = self.base.train.seq_len;
        for &budget in &self.sweep.budgets {
            let (mut shapes, raised) = self.shapes(budget);
            notes.extend(raised);
            shapes.sort_by_key(|m| m.param_counts().0);
            let mut seen = std::collections::HashSet::new();
            let mut kept = 0;
            for model in shapes {
                model.validate().map_err(|e| {
                    ScalingError::Config(format!(
                        "budget {budget:e}: shape {}: {e}",
                        crate::shape::describe(&model)
                    ))
                })?;
                let (params, non_emb) = model.param_counts();
                if !seen.insert(params) {
                    notes.push(format!(
                        "budget {budget:e}: two sizes map to the same shape ({}); kept once",
                        crate::shape::describe(&model)
                    ));
                    continue;
                }
                let fpt = model.train_flops_per_token(seq);
                let steps_f = budget / fpt / tps;
                if steps_f < self.sweep.min_steps as f64 {
                    notes.push(format!(
                        "budget {budget:e}: dropped {} params: {steps_f:.1} steps < min_steps {}",
                        human(params as f64),
                        self.sweep.min_steps
                    ));
                    continue;
                }
                let steps = (steps_f.round() as u64).max(1);
                let tokens = steps * tps as u64;
                if let Some(cap) = self.sweep.max_tokens {
                    if tokens as f64 > cap {
                        notes.push(format!(
                            "budget {budget:e}: dropped {} params: {} tokens > max_tokens {}",
                            human(params as f64),
                            human(tokens as f64),
                            human(cap)
                        ));
                        continue;
                    }
                }
                let name = format!("c{budget:e}-n{params}");
                let run_dir = self.sweep.out_dir.join(&name);
                let mut config = self.base.clone();
                config.model = model;
                config.train.steps = steps;
                config.train.run_dir = Some(run_dir.clone());
                config.optim.warmup_steps =
                    (self.sweep.warmup_fraction * steps as f64).round() as u64;
                config.validate()?;
                runs.push(PlannedRun {
                    budget,
                    name,
                    run_dir,
                    config,
                    params,
                    non_embedding_params: non_emb,
                    flops_per_token: fpt,
                    steps,
                    tokens,
                    flops: tokens as f64 * fpt,
                });
                kept += 1;
            }
            if kept < 3 {
                notes.push(format!(
                    "budget {budget:e}: {kept} size(s); Approach 2 needs at least 3 per budget"
                ));
            }
        }
        if runs.is_empty() {
            return Err(ScalingError::Config(format!(
                "the sweep plans no runs: {}",
                notes.join("; ")
            )));
        }
        Ok(SweepPlan { runs, notes })
    }
}

/// A base-config error as a sweep config error, without a second "config error:" prefix.
fn train_err(e: kiln_train::TrainError) -> ScalingError {
    match e {
        kiln_train::TrainError::Config(m) => ScalingError::Config(m),
        other => ScalingError::Train(other),
    }
}

/// A run's status on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum RunStatus {
    Done(RunRow),
    /// Has a checkpoint at this step.
    Partial(u64),
    Fresh,
}

fn normalised(cfg: &RunConfig) -> String {
    let mut c = cfg.clone();
    c.train.peak_flops = None;
    c.to_toml()
}

/// Fails when `run.run_dir` holds a run made from a different config.
fn check_same_config(run: &PlannedRun) -> Result<()> {
    let path = run.run_dir.join("config.toml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let stored = RunConfig::from_toml_str(&text, &[])
        .map_err(|e| ScalingError::Config(format!("{}: {e}", path.display())))?;
    let (a, b) = (normalised(&stored), normalised(&run.config));
    if a != b {
        let diff = a
            .lines()
            .zip(b.lines())
            .find(|(x, y)| x != y)
            .map(|(x, y)| format!("on disk `{x}`, planned `{y}`"))
            .unwrap_or_else(|| "different length".into());
        return Err(ScalingError::Config(format!(
            "{} holds a run with a different config ({diff}); delete the directory or change sweep.out_dir",
            run.run_dir.display()
        )));
    }
    Ok(())
}

pub fn run_status(run: &PlannedRun) -> Result<RunStatus> {
    let marker = run.run_dir.join(RESULT_FILE);
    if marker.exists() {
        check_same_config(run)?;
        let text = std::fs::read_to_string(&marker).map_err(|e| io_err(&marker, e))?;
        let row: RunRow = serde_json::from_str(&text)
            .map_err(|e| ScalingError::Io(format!("{}: not a result: {e}", marker.display())))?;
        return Ok(RunStatus::Done(row));
    }
    match checkpoint::list(&run.run_dir)?.last() {
        Some((step, _)) => {
            check_same_config(run)?;
            Ok(RunStatus::Partial(*step))
        }
        None => Ok(RunStatus::Fresh),
    }
}

#[derive(Debug, Clone)]
pub struct SweepOutcome {
    /// Results of every finished run of the plan, in plan order.
    pub rows: Vec<RunRow>,
    pub trained: usize,
    pub skipped: usize,
    /// Stopped by the `stop` flag (a checkpoint was saved; rerun to resume).
    pub stopped: bool,
}

/// Runs (or skips, or resumes) every run of the plan, rewriting `csv` after each.
pub fn run_sweep(
    plan: &SweepPlan,
    csv: &Path,
    obs: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<SweepOutcome> {
    let device = Device::Cpu;
    let mut out = SweepOutcome {
        rows: Vec::new(),
        trained: 0,
        skipped: 0,
        stopped: false,
    };
    let mut peak: Option<f64> = None;
    let (mut done_flops, mut done_secs) = (0.0f64, 0.0f64);
    let total = plan.runs.len();
    for (i, run) in plan.runs.iter().enumerate() {
        let status = run_status(run)?;
        let tag = format!(
            "[{}/{total}] {} (C {:e}, {} params, {} steps, {} tokens)",
            i + 1,
            run.name,
            run.budget,
            human(run.params as f64),
            run.steps,
            human(run.tokens as f64)
        );
        let resume = match status {
            RunStatus::Done(row) => {
                obs.on_message(&format!("{tag}: done, loss {:.4}; skipped", row.loss));
                out.rows.push(row);
                out.skipped += 1;
                continue;
            }
            RunStatus::Partial(step) => {
                obs.on_message(&format!("{tag}: resuming from step {step}"));
                true
            }
            RunStatus::Fresh => {
                obs.on_message(&format!("{tag}: starting"));
                false
            }
        };
        if stop.load(Ordering::SeqCst) {
            out.stopped = true;
            break;
        }
        let mut cfg = run.config.clone();
        if cfg.train.peak_flops.is_none() {
            // Measured once per sweep (it only feeds the MFU column of metrics.jsonl).
            let p = match peak {
                Some(p) => p,
                None => {
                    let p = kiln_train::perf::measure_gemm_peak(&device)?;
                    peak = Some(p);
                    p
                }
            };
            cfg.train.peak_flops = Some(p);
        }
        let mut trainer = Trainer::new(cfg, &run.run_dir, resume, &device, obs)?;
        let tokens_before = trainer.tokens_seen;
        let summary = trainer.run(obs, stop)?;
        done_flops += (trainer.tokens_seen - tokens_before) as f64 * run.flops_per_token;
        done_secs += summary.wall_s;
        if summary.stopped_early || trainer.step() < run.steps {
            out.stopped = true;
            break;
        }
        let loss = match summary.final_val_loss {
            Some(l) => l,
            None => trainer.evaluate()?, // resumed at the final checkpoint: nothing ran
        };
        let row = RunRow {
            params: run.params as u64,
            non_embedding_params: run.non_embedding_params as u64,
            tokens: trainer.tokens_seen,
            flops: trainer.tokens_seen as f64 * run.flops_per_token,
            loss,
            run_dir: run.run_dir.display().to_string(),
            budget: run.budget,
        };
        let json = serde_json::to_string_pretty(&row).expect("invariant: row serialises");
        kiln_train::write_atomic(&run.run_dir.join(RESULT_FILE), json.as_bytes())?;
        obs.on_message(&format!(
            "{tag}: final val loss {loss:.4} in {:.0} s",
            summary.wall_s
        ));
        let left: f64 = plan.runs[i + 1..].iter().map(|r| r.flops).sum();
        if done_secs > 0.0 && left > 0.0 {
            let rate = done_flops / done_secs;
            obs.on_message(&format!(
                "sweep: {:.1} GFLOP/s measured so far; at most {:.0} min of planned runs left",
                rate / 1e9,
                left / rate / 60.0
            ));
        }
        out.rows.push(row);
        out.trained += 1;
        write_sweep_csv(csv, &out.rows)?;
    }
    write_sweep_csv(csv, &out.rows)?;
    Ok(out)
}

impl SweepPlan {
    /// Total planned FLOPs.
    pub fn total_flops(&self) -> f64 {
        self.runs.iter().map(|r| r.flops).sum()
    }

    /// The plan as a table; with `flops_per_s`, estimated minutes per run and per budget.
    pub fn table(&self, flops_per_s: Option<f64>) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<28} {:>10} {:>10} {:>5} {:>6} {:>6} {:>7} {:>10} {:>10} {:>7}",
            "run",
            "params",
            "non-emb",
            "dim",
            "layers",
            "heads",
            "steps",
            "tokens",
            "flops",
            "minutes"
        );
        let mut budgets: Vec<f64> = Vec::new();
        for r in &self.runs {
            if !budgets.contains(&r.budget) {
                budgets.push(r.budget);
            }
            let m = &r.config.model;
            let minutes = flops_per_s
                .map(|f| format!("{:.1}", r.flops / f / 60.0))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:<28} {:>10} {:>10} {:>5} {:>6} {:>6} {:>7} {:>10} {:>10.3e} {:>7}",
                r.name,
                r.params,
                r.non_embedding_params,
                m.dim,
                m.n_layers,
                m.n_heads,
                r.steps,
                human(r.tokens as f64),
                r.flops,
                minutes
            );
        }
        for b in budgets {
            let runs: Vec<&PlannedRun> = self.runs.iter().filter(|r| r.budget == b).collect();
            let f: f64 = runs.iter().map(|r| r.flops).sum();
            let _ = write!(s, "budget {b:e}: {} runs, {f:.3e} FLOPs", runs.len());
            if let Some(fps) = flops_per_s {
                let _ = write!(s, ", about {:.0} min", f / fps / 60.0);
            }
            let _ = writeln!(s);
        }
        let _ = write!(
            s,
            "total: {} runs, {:.3e} FLOPs",
            self.runs.len(),
            self.total_flops()
        );
        if let Some(fps) = flops_per_s {
            let _ = write!(
                s,
                ", about {:.2} h at {:.1} GFLOP/s",
                self.total_flops() / fps / 3600.0,
                fps / 1e9
            );
        }
        let _ = writeln!(s);
        let max_tokens = self.runs.iter().map(|r| r.tokens).max().unwrap_or(0);
        let _ = writeln!(s, "longest run: {} tokens", human(max_tokens as f64));
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
