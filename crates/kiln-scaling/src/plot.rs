//! PNGs of a sweep and its fits (plotters, bitmap backend). Log axes are drawn by plotting
//! `log10` values on a linear axis labelled with powers of ten.
//!
//! - `loss_vs_compute.png`: every run's final loss against its compute, coloured by budget,
//!   with the compute-optimal frontier (the IsoFLOP parabolas' vertices).
//! - `isoflop.png`: loss against N per budget with the fitted parabolas and their minima.
//! - `optimal_allocation.png`: N_opt and D_opt against C with the fitted power laws and a
//!   `C^0.5` reference line through each.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::data::{Point, RunsTable};
use crate::fit::{group_budgets, Approach2, Group};
use crate::{Result, ScalingError};

use kiln_train::plot::register_font;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mark {
    Line,
    Dashed,
    Points,
}

/// One thing on a chart.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Legend entry (none when `None`).
    pub label: Option<String>,
    pub points: Vec<(f64, f64)>,
    pub mark: Mark,
    /// Palette index; `usize::MAX` is black.
    pub color: usize,
}

fn color_of(i: usize) -> RGBAColor {
    if i == usize::MAX {
        BLACK.to_rgba()
    } else {
        Palette99::pick(i).to_rgba()
    }
}

fn fmt_pow10(v: f64) -> String {
    let x = 10f64.powf(v);
    if (v - v.round()).abs() < 1e-6 {
        format!("1e{}", v.round() as i64)
    } else {
        format!("{x:.1e}").replace(".0e", "e")
    }
}

/// Draws `layers` into a 1000x650 PNG; `log_x` / `log_y` use log10 axes.
#[allow(clippy::too_many_arguments)] // a chart's labels and axes, all distinct
pub fn chart(
    out: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    log_y: bool,
    legend: SeriesLabelPosition,
    layers: &[Layer],
) -> Result<()> {
    register_font();
    let tx = |x: f64| if log_x { x.log10() } else { x };
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let layers: Vec<Layer> = layers
        .iter()
        .map(|l| Layer {
            points: l
                .points
                .iter()
                .map(|&(x, y)| (tx(x), ty(y)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
            ..l.clone()
        })
        .collect();
    let all: Vec<(f64, f64)> = layers.iter().flat_map(|l| l.points.clone()).collect();
    if all.is_empty() {
        return Err(ScalingError::Plot(format!(
            "{}: nothing to plot",
            out.display()
        )));
    }
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
        (a.min(*y), b.max(*y))
    });
    let px = ((x1 - x0) * 0.05).max(if log_x { 0.05 } else { 1e-3 });
    let py = ((y1 - y0) * 0.08).max(if log_y { 0.02 } else { 1e-3 });
    x0 -= px;
    x1 += px;
    y0 -= py;
    y1 += py;
    let err = |e: &dyn std::fmt::Display| ScalingError::Plot(format!("{}: {e}", out.display()));
    let root = BitMapBackend::new(out, (1000, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    let fx = |v: &f64| {
        if log_x {
            fmt_pow10(*v)
        } else {
            format!("{v:.3}")
        }
    };
    let fy = |v: &f64| {
        if log_y {
            fmt_pow10(*v)
        } else {
            format!("{v:.3}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    let mut any_label = false;
    for l in &layers {
        let color = color_of(l.color);
        let pts = l.points.clone();
        let anno = match l.mark {
            Mark::Line => chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| err(&e))?,
            Mark::Dashed => chart
                .draw_series(DashedLineSeries::new(pts, 8, 5, color.stroke_width(2)))
                .map_err(|e| err(&e))?,
            Mark::Points => chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?,
        };
        if let Some(label) = &l.label {
            any_label = true;
            let mark = l.mark;
            anno.label(label.clone()).legend(move |(x, y)| match mark {
                Mark::Points => Circle::new((x + 10, y), 4, color.filled()).into_dyn(),
                _ => PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)).into_dyn(),
            });
        }
    }
    if any_label {
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A line through `(c0, y0)` with slope `k` in log-log space, across `[c_lo, c_hi]`.
fn power_line(c_lo: f64, c_hi: f64, coef: f64, k: f64) -> Vec<(f64, f64)> {
    (0..=40)
        .map(|i| {
            let c = (c_lo.ln() + (c_hi / c_lo).ln() * i as f64 / 40.0).exp();
            (c, coef * c.powf(k))
        })
        .collect()
}

/// Writes the three PNGs into `out_dir`; returns their paths. Without an Approach 2 fit only
/// the run scatter plots are drawn.
/// One budget's runs as points of (x, final loss), in the budget's colour.
fn budget_runs(table: &RunsTable, group: &Group, color: usize, x: impl Fn(&Point) -> f64) -> Layer {
    Layer {
        label: Some(format!("C = {:.2e}", group.flops)),
        points: group
            .idx
            .iter()
            .map(|&j| (x(&table.points[j]), table.points[j].loss))
            .collect(),
        mark: Mark::Points,
        color,
    }
}

pub fn plot_all(
    table: &RunsTable,
    approach2: Option<&Approach2>,
    out_dir: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).map_err(|e| crate::io_err(out_dir, e))?;
    let mut written = Vec::new();
    let groups = group_budgets(table);
    let n_name = &table.params_column;

    // 1. Loss against compute.
    let mut layers: Vec<Layer> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| budget_runs(table, g, i, |p| table.compute(p)))
        .collect();
    if let Some(a2) = approach2 {
        layers.push(Layer {
            label: Some("compute-optimal frontier (IsoFLOP minima)".into()),
            points: a2.budgets.iter().map(|b| (b.flops, b.loss_opt)).collect(),
            mark: Mark::Line,
            color: usize::MAX,
        });
    }
    let p = out_dir.join("loss_vs_compute.png");
    chart(
        &p,
        "final validation loss vs training compute",
        &format!("compute C (FLOPs, {})", table.compute_source()),
        "final validation loss (nats/token)",
        true,
        false,
        SeriesLabelPosition::UpperRight,
        &layers,
    )?;
    written.push(p);

    // 2. IsoFLOP curves.
    let mut layers = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        layers.push(budget_runs(table, g, i, |p| p.n));
        let fit = approach2.and_then(|a| a.budgets.iter().find(|b| b.flops == g.flops));
        if let Some(b) = fit {
            let (lo, hi) = (
                b.n_range[0].min(b.n_opt) / 1.3,
                b.n_range[1].max(b.n_opt) * 1.3,
            );
            let c = b.parabola;
            let curve = (0..=60)
                .map(|k| {
                    let x = lo.ln() + (hi / lo).ln() * k as f64 / 60.0;
                    (x.exp(), c[0] + c[1] * x + c[2] * x * x)
                })
                .collect();
            layers.push(Layer {
                label: None,
                points: curve,
                mark: Mark::Line,
                color: i,
            });
        }
    }
    if let Some(a2) = approach2 {
        layers.push(Layer {
            label: Some("parabola minimum (N_opt)".into()),
            points: a2.budgets.iter().map(|b| (b.n_opt, b.loss_opt)).collect(),
            mark: Mark::Points,
            color: usize::MAX,
        });
    }
    let p = out_dir.join("isoflop.png");
    chart(
        &p,
        "IsoFLOP curves: loss vs model size at fixed compute",
        &format!("N ({n_name})"),
        "final validation loss (nats/token)",
        true,
        false,
        SeriesLabelPosition::UpperRight,
        &layers,
    )?;
    written.push(p);

    // 3. Optimal N and D against C.
    if let Some(a2) = approach2 {
        let cs: Vec<f64> = a2.budgets.iter().map(|b| b.flops).collect();
        let (c_lo, c_hi) = cs
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &c| (a.min(c), b.max(c)));
        let (c_lo, c_hi) = (c_lo / 1.5, c_hi * 1.5);
        let reference = |vals: &[f64]| {
            // C^0.5 through the geometric centre of the points.
            let mc = cs.iter().map(|c| c.ln()).sum::<f64>() / cs.len() as f64;
            let mv = vals.iter().map(|v| v.ln()).sum::<f64>() / vals.len() as f64;
            power_line(c_lo, c_hi, (mv - 0.5 * mc).exp(), 0.5)
        };
        let n_opt: Vec<f64> = a2.budgets.iter().map(|b| b.n_opt).collect();
        let d_opt: Vec<f64> = a2.budgets.iter().map(|b| b.d_opt).collect();
        let layers = vec![
            Layer {
                label: Some(format!("N_opt ({n_name})")),
                points: cs.iter().cloned().zip(n_opt.iter().cloned()).collect(),
                mark: Mark::Points,
                color: 0,
            },
            Layer {
                label: Some(format!("N_opt fit: C^{:.3}", a2.a.value)),
                points: power_line(c_lo, c_hi, a2.n_coef.value, a2.a.value),
                mark: Mark::Line,
                color: 0,
            },
            Layer {
                label: Some("dashed: C^0.5 reference".into()),
                points: reference(&n_opt),
                mark: Mark::Dashed,
                color: 0,
            },
            Layer {
                label: Some("D_opt (tokens)".into()),
                points: cs.iter().cloned().zip(d_opt.iter().cloned()).collect(),
                mark: Mark::Points,
                color: 1,
            },
            Layer {
                label: Some(format!("D_opt fit: C^{:.3}", a2.b.value)),
                points: power_line(c_lo, c_hi, a2.d_coef.value, a2.b.value),
                mark: Mark::Line,
                color: 1,
            },
            Layer {
                label: None,
                points: reference(&d_opt),
                mark: Mark::Dashed,
                color: 1,
            },
        ];
        let p = out_dir.join("optimal_allocation.png");
        chart(
            &p,
            "compute-optimal N and D (Approach 2)",
            &format!("compute C (FLOPs, {})", table.compute_source()),
            "parameters / tokens",
            true,
            true,
            SeriesLabelPosition::LowerRight,
            &layers,
        )?;
        written.push(p);
    }
    Ok(written)
}
