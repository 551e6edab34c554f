//! Chinchilla fits (Hoffmann et al. 2022) with bootstrap confidence intervals.
//!
//! **Approach 2 (IsoFLOP profiles).** Runs are grouped by compute budget (the `budget` column;
//! without one, runs whose compute is within 25% of the previous one in sorted order share a
//! group). Per budget a parabola `loss = c0 + c1 x + c2 x^2` in `x = ln N` is fitted by least
//! squares (at least 3 distinct sizes; it must open upwards); its vertex is `N_opt(C)` and
//! `L_opt(C)`. `D_opt(C) = C / f(N_opt)` where `f`, the FLOPs per token, is interpolated
//! log-linearly in N from the budget's own runs (`flops / tokens`); without a flops column
//! `C = 6 N D`, so `f(N) = 6 N` and `D_opt = C / (6 N_opt)`. Then `ln N_opt = a ln C + k` and
//! `ln D_opt = b ln C + k'` by least squares over budgets (at least 2). Bootstrap: runs are
//! resampled with replacement within each budget (a resample with fewer than 3 distinct sizes
//! in a budget is redrawn) and everything is refitted.
//!
//! **Approach 3 (parametric).** `L(N, D) = E + A / N^alpha + B / D^beta`, parameterised as in
//! the paper with `A = e^a`, `B = e^b`, `E = e^e` and
//! `log L_pred = LSE(a - alpha ln N, b - beta ln D, e)`; the objective is the Huber loss
//! (delta 1e-3) of `log L_pred - log L_obs`, summed over runs, minimised with L-BFGS. The paper
//! started L-BFGS from every point of a grid; here the objective is evaluated on the grid
//! `alpha, beta in {0, 0.5, .., 2.5}`, `e in {-1, -0.5, .., 1.5}`, `a, b in {0, 5, .., 30}`
//! (10,584 points) and L-BFGS starts from the best 32 of them; the lowest optimum wins. Then
//! `a = beta / (alpha + beta)`, `b = alpha / (alpha + beta)`. Bootstrap: runs are resampled
//! with replacement and refitted from the full-data optimum and the 4 best grid points.
//!
//! Intervals are bootstrap percentile intervals (default 95%, 200 resamples, fixed seed).

use std::fmt::Write;

use serde::Serialize;

use crate::data::{Point, RunsTable};
use crate::law::ParametricLaw;
use crate::lbfgs::{minimize, LbfgsOptions};
use crate::{human, Result, Rng, ScalingError};

/// Which approaches to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approaches {
    Both,
    Two,
    Three,
}

#[derive(Debug, Clone)]
pub struct FitOptions {
    pub approaches: Approaches,
    /// Bootstrap resamples (0 = point estimates only).
    pub bootstrap: usize,
    pub seed: u64,
    /// Confidence level of the percentile intervals.
    pub ci_level: f64,
    pub huber_delta: f64,
    /// L-BFGS starts (best grid points) for the full-data Approach 3 fit.
    pub n_starts: usize,
    /// Extra grid starts per bootstrap refit (besides the full-data optimum).
    pub bootstrap_starts: usize,
    /// Approach 2: leave out budgets whose minimum was not sampled (the lowest loss at the
    /// smallest or largest size, or the vertex outside the sizes run) instead of flagging them.
    pub bracketed_only: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            approaches: Approaches::Both,
            bootstrap: 200,
            seed: 0,
            ci_level: 0.95,
            huber_delta: 1e-3,
            n_starts: 32,
            bootstrap_starts: 4,
            bracketed_only: false,
        }
    }
}

/// A point estimate and its bootstrap percentile interval (`[NaN, NaN]` without resamples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub ci: [f64; 2],
}

impl Estimate {
    fn new(value: f64, samples: &mut [f64], level: f64) -> Self {
        let ci = if samples.is_empty() {
            [f64::NAN, f64::NAN]
        } else {
            samples.sort_by(|a, b| a.total_cmp(b));
            let q = (1.0 - level) / 2.0;
            [percentile(samples, q), percentile(samples, 1.0 - q)]
        };
        Self { value, ci }
    }

    pub fn contains(&self, x: f64) -> bool {
        self.ci[0] <= x && x <= self.ci[1]
    }

    fn show(&self, prec: usize) -> String {
        if self.ci[0].is_nan() {
            format!("{:.*}", prec, self.value)
        } else {
            format!(
                "{:.*}  [{:.*}, {:.*}]",
                prec, self.value, prec, self.ci[0], prec, self.ci[1]
            )
        }
    }

    fn show_e(&self) -> String {
        if self.ci[0].is_nan() {
            format!("{:.3e}", self.value)
        } else {
            format!(
                "{:.3e}  [{:.3e}, {:.3e}]",
                self.value, self.ci[0], self.ci[1]
            )
        }
    }
}

/// Linear-interpolated percentile of sorted data, `q` in [0, 1].
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Approach 2's fit of one budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetFit {
    /// The budget's compute (the `budget` column, else the group's geometric mean).
    pub flops: f64,
    pub n_runs: usize,
    pub n_opt: f64,
    pub d_opt: f64,
    /// The parabola's value at its vertex.
    pub loss_opt: f64,
    /// The vertex lies outside the sizes run at this budget.
    pub extrapolated: bool,
    /// The lowest loss was measured strictly inside the sizes run (a larger loss on both
    /// sides), so the minimum was sampled rather than inferred from the curve's shape.
    pub bracketed: bool,
    /// `loss = c0 + c1 ln N + c2 (ln N)^2`.
    pub parabola: [f64; 3],
    pub n_range: [f64; 2],
}

#[derive(Debug, Clone, Serialize)]
pub struct Approach2 {
    pub budgets: Vec<BudgetFit>,
    /// Budgets left out, with the reason.
    pub excluded: Vec<String>,
    /// `N_opt = n_coef * C^a`.
    pub a: Estimate,
    /// `D_opt = d_coef * C^b`.
    pub b: Estimate,
    pub n_coef: Estimate,
    pub d_coef: Estimate,
    pub d_opt_method: String,
    pub resamples_ok: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Approach3 {
    #[serde(rename = "E")]
    pub e: Estimate,
    #[serde(rename = "A")]
    pub big_a: Estimate,
    #[serde(rename = "B")]
    pub big_b: Estimate,
    pub alpha: Estimate,
    pub beta: Estimate,
    /// `beta / (alpha + beta)`: exponent of `N_opt ∝ C^a`.
    pub a: Estimate,
    /// `alpha / (alpha + beta)`: exponent of `D_opt ∝ C^b`.
    pub b: Estimate,
    /// `(alpha A / (beta B))^(1/(alpha+beta))`, the coefficient of `N_opt = G (C/6)^a`.
    #[serde(rename = "G")]
    pub g: Estimate,
    pub huber_delta: f64,
    /// Summed Huber loss at the optimum.
    pub objective: f64,
    pub converged: bool,
    pub grid_size: usize,
    pub n_starts: usize,
    pub resamples_ok: usize,
}

impl Approach3 {
    pub fn law(&self) -> ParametricLaw {
        ParametricLaw {
            e: self.e.value,
            a: self.big_a.value,
            b: self.big_b.value,
            alpha: self.alpha.value,
            beta: self.beta.value,
        }
    }
}

/// Everything `kiln scaling fit` reports (`--json` prints this object).
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub source: String,
    pub n_runs: usize,
    /// The CSV column N was read from.
    pub params_column: String,
    /// Where C comes from: the flops column or 6 N D.
    pub compute_source: String,
    pub ci_level: f64,
    pub bootstrap: usize,
    pub seed: u64,
    pub approach2: Option<Approach2>,
    pub approach2_skipped: Option<String>,
    pub approach3: Option<Approach3>,
    pub approach3_skipped: Option<String>,
}

/// Runs the requested approaches. A requested approach that cannot run is an error; with
/// both requested, one that cannot run is reported as skipped (both failing is an error).
pub fn fit(table: &RunsTable, opts: &FitOptions) -> Result<FitReport> {
    let mut report = FitReport {
        source: table.source.display().to_string(),
        n_runs: table.points.len(),
        params_column: table.params_column.clone(),
        compute_source: table.compute_source().to_string(),
        ci_level: opts.ci_level,
        bootstrap: opts.bootstrap,
        seed: opts.seed,
        approach2: None,
        approach2_skipped: None,
        approach3: None,
        approach3_skipped: None,
    };
    if matches!(opts.approaches, Approaches::Both | Approaches::Two) {
        match approach2(table, opts) {
            Ok(a) => report.approach2 = Some(a),
            Err(e) if opts.approaches == Approaches::Two => return Err(e),
            Err(e) => report.approach2_skipped = Some(e.to_string()),
        }
    }
    if matches!(opts.approaches, Approaches::Both | Approaches::Three) {
        match approach3(table, opts) {
            Ok(a) => report.approach3 = Some(a),
            Err(e) if opts.approaches == Approaches::Three => return Err(e),
            Err(e) => report.approach3_skipped = Some(e.to_string()),
        }
    }
    if report.approach2.is_none() && report.approach3.is_none() {
        return Err(ScalingError::Fit(format!(
            "{}: no fit possible. Approach 2: {}. Approach 3: {}",
            report.source,
            report.approach2_skipped.as_deref().unwrap_or("-"),
            report.approach3_skipped.as_deref().unwrap_or("-")
        )));
    }
    Ok(report)
}

// ---------------------------------------------------------------- Approach 2

/// Runs of one compute budget (indices into the table's points).
#[derive(Debug, Clone)]
pub struct Group {
    pub flops: f64,
    pub idx: Vec<usize>,
}

/// Groups runs by budget: the `budget` column, else compute clusters (25% gaps).
pub fn group_budgets(t: &RunsTable) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    if t.has_budget {
        for (i, p) in t.points.iter().enumerate() {
            let b = p
                .budget
                .expect("invariant: has_budget means every row has one");
            match groups.iter_mut().find(|g| g.flops == b) {
                Some(g) => g.idx.push(i),
                None => groups.push(Group {
                    flops: b,
                    idx: vec![i],
                }),
            }
        }
    } else {
        let mut order: Vec<(f64, usize)> = t
            .points
            .iter()
            .enumerate()
            .map(|(i, p)| (t.compute(p), i))
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut prev = f64::NAN;
        for (c, i) in order {
            if groups.is_empty() || c > prev * 1.25 {
                groups.push(Group {
                    flops: 0.0,
                    idx: vec![],
                });
            }
            groups.last_mut().expect("pushed above").idx.push(i);
            prev = c;
        }
        for g in &mut groups {
            let mean_ln = g
                .idx
                .iter()
                .map(|&i| t.compute(&t.points[i]).ln())
                .sum::<f64>()
                / g.idx.len() as f64;
            g.flops = mean_ln.exp();
        }
    }
    groups.sort_by(|a, b| a.flops.total_cmp(&b.flops));
    groups
}

/// Least-squares line `y = slope x + intercept`.
fn linear_fit(xs: &[f64], ys: &[f64]) -> Option<(f64, f64)> {
    let n = xs.len() as f64;
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = sxy / sxx;
    Some((slope, my - slope * mx))
}

/// Least-squares parabola `y = c0 + c1 x + c2 x^2` (solved in centred x for conditioning).
pub fn fit_parabola(xs: &[f64], ys: &[f64]) -> Option<[f64; 3]> {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    // Normal equations in u = x - m: sum u^(i+j) k_j = sum u^i y.
    let mut s = [0.0f64; 5];
    let mut t = [0.0f64; 3];
    for (x, y) in xs.iter().zip(ys) {
        let u = x - m;
        let mut p = 1.0;
        for (k, sk) in s.iter_mut().enumerate() {
            *sk += p;
            if k < 3 {
                t[k] += p * y;
            }
            p *= u;
        }
    }
    let mut a = [
        [s[0], s[1], s[2], t[0]],
        [s[1], s[2], s[3], t[1]],
        [s[2], s[3], s[4], t[2]],
    ];
    // Gaussian elimination with partial pivoting.
    for col in 0..3 {
        let piv = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        a.swap(col, piv);
        if a[col][col].abs() < 1e-300 {
            return None;
        }
        for r in col + 1..3 {
            let f = a[r][col] / a[col][col];
            // Row r -= f * row col, written as the textbook elimination step.
            #[allow(clippy::needless_range_loop)]
            for c in col..4 {
                a[r][c] -= f * a[col][c];
            }
        }
    }
    let mut k = [0.0; 3];
    for r in (0..3).rev() {
        let mut v = a[r][3];
        for c in r + 1..3 {
            v -= a[r][c] * k[c];
        }
        k[r] = v / a[r][r];
    }
    if !k.iter().all(|v| v.is_finite()) {
        return None;
    }
    // Back to x: k0 + k1 (x - m) + k2 (x - m)^2.
    Some([k[0] - k[1] * m + k[2] * m * m, k[1] - 2.0 * k[2] * m, k[2]])
}

fn distinct_count(mut v: Vec<f64>) -> usize {
    v.sort_by(|a, b| a.total_cmp(b));
    v.dedup();
    v.len()
}

fn fit_budget(t: &RunsTable, flops: f64, idx: &[usize]) -> std::result::Result<BudgetFit, String> {
    let pts: Vec<&Point> = idx.iter().map(|&i| &t.points[i]).collect();
    let distinct = distinct_count(pts.iter().map(|p| p.n).collect());
    if distinct < 3 {
        return Err(format!(
            "budget {flops:.3e}: {distinct} distinct model size(s), a parabola needs at least 3"
        ));
    }
    let xs: Vec<f64> = pts.iter().map(|p| p.n.ln()).collect();
    let ys: Vec<f64> = pts.iter().map(|p| p.loss).collect();
    let c = fit_parabola(&xs, &ys)
        .ok_or_else(|| format!("budget {flops:.3e}: the parabola fit is singular"))?;
    if c[2] <= 0.0 {
        return Err(format!(
            "budget {flops:.3e}: loss is not convex in log N here (the parabola opens downwards); add sizes on both sides of the minimum"
        ));
    }
    let x_opt = -c[1] / (2.0 * c[2]);
    let (x_min, x_max) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    // FLOPs per token as a log-linear function of N, from the budget's own runs.
    let lf: Vec<f64> = pts.iter().map(|p| (t.compute(p) / p.d).ln()).collect();
    let (q, p0) = linear_fit(&xs, &lf).unwrap_or((1.0, 6f64.ln()));
    let fpt = (p0 + q * x_opt).exp();
    let n_opt = x_opt.exp();
    let x_best = pts
        .iter()
        .zip(&xs)
        .min_by(|(p, _), (q, _)| p.loss.total_cmp(&q.loss))
        .map(|(_, &x)| x)
        .expect("invariant: at least 3 runs");
    let extrapolated = x_opt < x_min || x_opt > x_max;
    Ok(BudgetFit {
        flops,
        n_runs: pts.len(),
        n_opt,
        d_opt: flops / fpt,
        loss_opt: c[0] + c[1] * x_opt + c[2] * x_opt * x_opt,
        extrapolated,
        bracketed: !extrapolated && x_best > x_min && x_best < x_max,
        parabola: c,
        n_range: [x_min.exp(), x_max.exp()],
    })
}

struct PowerLaws {
    a: f64,
    n_coef: f64,
    b: f64,
    d_coef: f64,
}

fn power_laws(fits: &[BudgetFit]) -> Option<PowerLaws> {
    let lc: Vec<f64> = fits.iter().map(|f| f.flops.ln()).collect();
    let ln: Vec<f64> = fits.iter().map(|f| f.n_opt.ln()).collect();
    let ld: Vec<f64> = fits.iter().map(|f| f.d_opt.ln()).collect();
    let (a, ka) = linear_fit(&lc, &ln)?;
    let (b, kb) = linear_fit(&lc, &ld)?;
    Some(PowerLaws {
        a,
        n_coef: ka.exp(),
        b,
        d_coef: kb.exp(),
    })
}

pub fn approach2(t: &RunsTable, opts: &FitOptions) -> Result<Approach2> {
    let groups = group_budgets(t);
    let mut fits = Vec::new();
    let mut excluded = Vec::new();
    let mut valid_groups = Vec::new();
    for g in &groups {
        match fit_budget(t, g.flops, &g.idx) {
            Ok(f) if opts.bracketed_only && !f.bracketed => excluded.push(format!(
                "budget {:.3e}: minimum not sampled inside the sizes run [{:.3e}, {:.3e}] (parabola vertex {:.3e}; --bracketed-only)",
                g.flops, f.n_range[0], f.n_range[1], f.n_opt
            )),
            Ok(f) => {
                fits.push(f);
                valid_groups.push(g.clone());
            }
            Err(e) => excluded.push(e),
        }
    }
    if fits.len() < 2 {
        let what = format!(
            "Approach 2 (budgets with >= 3 sizes and a convex IsoFLOP curve; {} budget(s) found{})",
            groups.len(),
            if excluded.is_empty() {
                String::new()
            } else {
                format!(": {}", excluded.join("; "))
            }
        );
        return Err(ScalingError::TooFewPoints {
            what,
            need: 2,
            got: fits.len(),
        });
    }
    let pl = power_laws(&fits)
        .ok_or_else(|| ScalingError::Fit("Approach 2: all budgets are equal".into()))?;

    let mut rng = Rng::new(opts.seed ^ 0xA2);
    let (mut sa, mut sb, mut sn, mut sd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..opts.bootstrap {
        let mut rfits = Vec::new();
        for g in &valid_groups {
            let m = g.idx.len();
            for _attempt in 0..50 {
                let idx: Vec<usize> = (0..m).map(|_| g.idx[rng.below(m)]).collect();
                let distinct = distinct_count(idx.iter().map(|&i| t.points[i].n).collect());
                if distinct < 3 {
                    continue;
                }
                if let Ok(f) = fit_budget(t, g.flops, &idx) {
                    rfits.push(f);
                }
                break;
            }
        }
        if rfits.len() < 2 {
            continue;
        }
        if let Some(p) = power_laws(&rfits) {
            sa.push(p.a);
            sb.push(p.b);
            sn.push(p.n_coef);
            sd.push(p.d_coef);
        }
    }
    let level = opts.ci_level;
    Ok(Approach2 {
        budgets: fits,
        excluded,
        a: Estimate::new(pl.a, &mut sa, level),
        b: Estimate::new(pl.b, &mut sb, level),
        n_coef: Estimate::new(pl.n_coef, &mut sn, level),
        d_coef: Estimate::new(pl.d_coef, &mut sd, level),
        d_opt_method: if t.has_flops {
            "D_opt = C / f(N_opt), f = FLOPs per token interpolated log-linearly in N from the budget's runs (flops / tokens)".into()
        } else {
            "D_opt = C / (6 N_opt) (no flops column: C = 6 N D)".into()
        },
        resamples_ok: sa.len(),
    })
}

// ---------------------------------------------------------------- Approach 3

/// `(ln N, ln D, ln L)` per run.
type Obs = (f64, f64, f64);

/// Summed Huber loss of `log L_pred - log L_obs`; `grad` (when given) receives its gradient
/// with respect to `theta = [a, b, e, alpha, beta]`.
pub fn huber_objective(theta: &[f64], obs: &[Obs], delta: f64, grad: Option<&mut [f64]>) -> f64 {
    let (a, b, e, alpha, beta) = (theta[0], theta[1], theta[2], theta[3], theta[4]);
    let mut f = 0.0;
    let mut g = [0.0; 5];
    for &(ln_n, ln_d, ln_l) in obs {
        let u = a - alpha * ln_n;
        let v = b - beta * ln_d;
        let m = u.max(v).max(e);
        let (eu, ev, ee) = ((u - m).exp(), (v - m).exp(), (e - m).exp());
        let z = eu + ev + ee;
        let r = m + z.ln() - ln_l;
        let (h, dh) = if r.abs() <= delta {
            (0.5 * r * r, r)
        } else {
            (delta * (r.abs() - 0.5 * delta), delta * r.signum())
        };
        f += h;
        let (pu, pv, pe) = (eu / z, ev / z, ee / z);
        g[0] += dh * pu;
        g[1] += dh * pv;
        g[2] += dh * pe;
        g[3] -= dh * pu * ln_n;
        g[4] -= dh * pv * ln_d;
    }
    if let Some(out) = grad {
        out.copy_from_slice(&g);
    }
    f
}

fn init_grid() -> Vec<[f64; 5]> {
    let ab: Vec<f64> = (0..=6).map(|i| 5.0 * i as f64).collect();
    let e: Vec<f64> = (0..6).map(|i| -1.0 + 0.5 * i as f64).collect();
    let ex: Vec<f64> = (0..6).map(|i| 0.5 * i as f64).collect();
    let mut out = Vec::with_capacity(ab.len() * ab.len() * e.len() * ex.len() * ex.len());
    for &a in &ab {
        for &b in &ab {
            for &ei in &e {
                for &al in &ex {
                    for &be in &ex {
                        out.push([a, b, ei, al, be]);
                    }
                }
            }
        }
    }
    out
}

struct Fit3 {
    theta: [f64; 5],
    f: f64,
    converged: bool,
}

fn lbfgs_fit(obs: &[Obs], delta: f64, starts: &[[f64; 5]]) -> Option<Fit3> {
    // Scale the objective to O(residual) so the gradient tolerance means the same for any data
    // size and delta; the minimiser is unchanged.
    let scale = 1.0 / (obs.len() as f64 * delta);
    let opts = LbfgsOptions {
        max_iter: 1000,
        ..Default::default()
    };
    let mut best: Option<Fit3> = None;
    for s in starts {
        let r = minimize(
            |x, g| {
                let f = huber_objective(x, obs, delta, Some(g));
                for gi in g.iter_mut() {
                    *gi *= scale;
                }
                f * scale
            },
            s,
            &opts,
        );
        let f = r.f / scale;
        if f.is_finite()
            && r.x.iter().all(|v| v.is_finite())
            && best.as_ref().is_none_or(|b| f < b.f)
        {
            best = Some(Fit3 {
                theta: [r.x[0], r.x[1], r.x[2], r.x[3], r.x[4]],
                f,
                converged: r.converged,
            });
        }
    }
    best
}

fn observations(points: &[Point]) -> Vec<Obs> {
    points
        .iter()
        .map(|p| (p.n.ln(), p.d.ln(), p.loss.ln()))
        .collect()
}

pub fn approach3(t: &RunsTable, opts: &FitOptions) -> Result<Approach3> {
    let n = t.points.len();
    if n < 6 {
        return Err(ScalingError::TooFewPoints {
            what: "Approach 3 (5 parameters: E, A, B, alpha, beta)".into(),
            need: 6,
            got: n,
        });
    }
    let dn = distinct_count(t.points.iter().map(|p| p.n).collect());
    let dd = distinct_count(t.points.iter().map(|p| p.d).collect());
    if dn < 2 || dd < 2 {
        return Err(ScalingError::Fit(format!(
            "Approach 3 needs runs at >= 2 distinct sizes and >= 2 distinct token counts (got {dn} and {dd})"
        )));
    }
    let obs = observations(&t.points);
    let delta = opts.huber_delta;
    let grid = init_grid();
    let mut scored: Vec<(f64, usize)> = grid
        .iter()
        .enumerate()
        .map(|(i, th)| (huber_objective(th, &obs, delta, None), i))
        .filter(|(f, _)| f.is_finite())
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let starts: Vec<[f64; 5]> = scored
        .iter()
        .take(opts.n_starts.max(1))
        .map(|&(_, i)| grid[i])
        .collect();
    let best = lbfgs_fit(&obs, delta, &starts)
        .ok_or_else(|| ScalingError::Fit("Approach 3: L-BFGS found no finite optimum".into()))?;

    let mut boot_starts = vec![best.theta];
    boot_starts.extend(starts.iter().take(opts.bootstrap_starts));
    let mut rng = Rng::new(opts.seed ^ 0xA3);
    let mut samples: Vec<[f64; 5]> = Vec::new();
    for _ in 0..opts.bootstrap {
        let pts: Vec<Point> = (0..n).map(|_| t.points[rng.below(n)].clone()).collect();
        if distinct_count(pts.iter().map(|p| p.n).collect()) < 2
            || distinct_count(pts.iter().map(|p| p.d).collect()) < 2
        {
            continue;
        }
        if let Some(f) = lbfgs_fit(&observations(&pts), delta, &boot_starts) {
            samples.push(f.theta);
        }
    }
    let level = opts.ci_level;
    let th = best.theta;
    let derived = |th: &[f64; 5]| {
        let law = ParametricLaw {
            e: th[2].exp(),
            a: th[0].exp(),
            b: th[1].exp(),
            alpha: th[3],
            beta: th[4],
        };
        [
            law.e,
            law.a,
            law.b,
            law.alpha,
            law.beta,
            law.exponent_a(),
            law.exponent_b(),
            law.g(),
        ]
    };
    let point = derived(&th);
    let boot: Vec<[f64; 8]> = samples.iter().map(derived).collect();
    let est = |k: usize| {
        let mut s: Vec<f64> = boot
            .iter()
            .map(|v| v[k])
            .filter(|v| v.is_finite())
            .collect();
        Estimate::new(point[k], &mut s, level)
    };
    Ok(Approach3 {
        e: est(0),
        big_a: est(1),
        big_b: est(2),
        alpha: est(3),
        beta: est(4),
        a: est(5),
        b: est(6),
        g: est(7),
        huber_delta: delta,
        objective: best.f,
        converged: best.converged,
        grid_size: grid.len(),
        n_starts: starts.len(),
        resamples_ok: samples.len(),
    })
}

// ---------------------------------------------------------------- summary

impl FitReport {
    /// The human summary `kiln scaling fit` prints by default.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let n_desc = match self.params_column.as_str() {
            "params" => "params (all parameters)".to_string(),
            "non_embedding_params" => "non_embedding_params (Kaplan's N)".to_string(),
            other => other.to_string(),
        };
        let _ = writeln!(
            s,
            "{}: {} runs; N = column {}; C from {}",
            self.source, self.n_runs, n_desc, self.compute_source
        );
        let ci = if self.bootstrap > 0 {
            format!(
                "[{:.0}% bootstrap percentile interval, {} resamples, seed {}]",
                self.ci_level * 100.0,
                self.bootstrap,
                self.seed
            )
        } else {
            "(no bootstrap: point estimates only)".into()
        };
        let _ = writeln!(s, "intervals: {ci}");
        let _ = writeln!(s);
        match (&self.approach2, &self.approach2_skipped) {
            (Some(a2), _) => {
                let _ = writeln!(
                    s,
                    "Approach 2 (IsoFLOP parabolas in log N), {} budget(s):",
                    a2.budgets.len()
                );
                let _ = writeln!(
                    s,
                    "  {:>11} {:>5} {:>11} {:>11} {:>9} {:>8}",
                    "C", "runs", "N_opt", "D_opt", "L_opt", "D/N"
                );
                for b in &a2.budgets {
                    let _ = writeln!(
                        s,
                        "  {:>11.3e} {:>5} {:>11} {:>11} {:>9.4} {:>8.2}{}",
                        b.flops,
                        b.n_runs,
                        human(b.n_opt),
                        human(b.d_opt),
                        b.loss_opt,
                        b.d_opt / b.n_opt,
                        if b.extrapolated {
                            "  (vertex outside the sizes run: extrapolated)"
                        } else if !b.bracketed {
                            "  (lowest loss at the edge of the sizes run: not bracketed)"
                        } else {
                            ""
                        }
                    );
                }
                for e in &a2.excluded {
                    let _ = writeln!(s, "  excluded: {e}");
                }
                let _ = writeln!(s, "  N_opt = {} * C^a", a2.n_coef.show_e());
                let _ = writeln!(s, "      a = {}", a2.a.show(3));
                let _ = writeln!(s, "  D_opt = {} * C^b", a2.d_coef.show_e());
                let _ = writeln!(s, "      b = {}", a2.b.show(3));
                let _ = writeln!(s, "  ({})", a2.d_opt_method);
                if self.bootstrap > 0 {
                    let _ = writeln!(
                        s,
                        "  {} of {} resamples fitted",
                        a2.resamples_ok, self.bootstrap
                    );
                }
            }
            (None, Some(why)) => {
                let _ = writeln!(s, "Approach 2: skipped: {why}");
            }
            (None, None) => {}
        }
        let _ = writeln!(s);
        match (&self.approach3, &self.approach3_skipped) {
            (Some(a3), _) => {
                let _ = writeln!(
                    s,
                    "Approach 3 (L = E + A/N^alpha + B/D^beta; Huber delta {} on log-loss residuals, L-BFGS from the best {} of {} grid points):",
                    a3.huber_delta, a3.n_starts, a3.grid_size
                );
                let _ = writeln!(s, "      E = {}", a3.e.show(4));
                let _ = writeln!(s, "      A = {}", a3.big_a.show_e());
                let _ = writeln!(s, "      B = {}", a3.big_b.show_e());
                let _ = writeln!(s, "  alpha = {}", a3.alpha.show(4));
                let _ = writeln!(s, "   beta = {}", a3.beta.show(4));
                let _ = writeln!(s, "  N_opt ∝ C^a, a = beta/(alpha+beta) = {}", a3.a.show(3));
                let _ = writeln!(
                    s,
                    "  D_opt ∝ C^b, b = alpha/(alpha+beta) = {}",
                    a3.b.show(3)
                );
                let _ = writeln!(
                    s,
                    "  objective {:.4e}{}",
                    a3.objective,
                    if a3.converged {
                        ""
                    } else {
                        " (L-BFGS hit its iteration cap)"
                    }
                );
                if self.bootstrap > 0 {
                    let _ = writeln!(
                        s,
                        "  {} of {} resamples fitted",
                        a3.resamples_ok, self.bootstrap
                    );
                }
            }
            (None, Some(why)) => {
                let _ = writeln!(s, "Approach 3: skipped: {why}");
            }
            (None, None) => {}
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parabola_recovers_coefficients() {
        let xs: Vec<f64> = (0..7).map(|i| 10.0 + i as f64 * 0.5).collect();
        let ys: Vec<f64> = xs.iter().map(|x| 3.0 - 0.4 * x + 0.02 * x * x).collect();
        let c = fit_parabola(&xs, &ys).unwrap();
        assert!(
            (c[0] - 3.0).abs() < 1e-8 && (c[1] + 0.4).abs() < 1e-9 && (c[2] - 0.02).abs() < 1e-10,
            "{c:?}"
        );
    }

    #[test]
    fn huber_gradient_matches_finite_differences() {
        let obs: Vec<Obs> = [
            (1e6, 2e7, 3.1),
            (3e6, 1e7, 3.0),
            (1e7, 5e6, 3.05),
            (2e5, 1e8, 3.4),
        ]
        .iter()
        .map(|&(n, d, l): &(f64, f64, f64)| (n.ln(), d.ln(), l.ln()))
        .collect();
        for delta in [1e-3, 10.0] {
            let th = [6.0, 6.5, 0.5, 0.35, 0.3];
            let mut g = [0.0; 5];
            huber_objective(&th, &obs, delta, Some(&mut g));
            for k in 0..5 {
                let h = 1e-6;
                let (mut p, mut m) = (th, th);
                p[k] += h;
                m[k] -= h;
                let fd = (huber_objective(&p, &obs, delta, None)
                    - huber_objective(&m, &obs, delta, None))
                    / (2.0 * h);
                assert!(
                    (fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "delta {delta} k {k}: {fd} vs {}",
                    g[k]
                );
            }
        }
    }

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.125), 1.5);
    }
}
