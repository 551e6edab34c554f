//! Loss-curve PNGs (plotters, bitmap backend, with an embedded DejaVu Sans so it needs no
//! system fonts).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::metrics::read_rows;
use crate::TrainError;

static FONT: Once = Once::new();

/// Registers kiln's one embedded font (DejaVu Sans) as plotters' "sans-serif", once per
/// process; every crate that draws charts calls this, so text renders without system fonts.
pub fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // A failure only means text renders blank; the curves are still drawn.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// One curve: a label and (x, y) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Palette index: one per quantity (or run), so a quantity keeps its colour whichever
    /// curves a chart happens to have, and its training (solid) and held-out (dashed) curves
    /// share it.
    pub color: usize,
}

/// Draws curves on one chart (log-scaled y when the range spans more than 10x).
pub fn plot_series(
    out: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), TrainError> {
    register_font();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .collect();
    if all.is_empty() {
        return Err(TrainError::Io(format!(
            "{}: nothing to plot",
            out.display()
        )));
    }
    let (x_min, x_max) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    let (y_min, y_max) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
        (a.min(*y), b.max(*y))
    });
    let x_max = if x_max > x_min { x_max } else { x_min + 1.0 };
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    // Losses sit at 0 when the data do not go below; rewards and margins may be negative.
    let y_floor = if y_min >= 0.0 {
        (y_min - pad).max(0.0)
    } else {
        y_min - pad
    };
    let err = |e: &dyn std::fmt::Display| {
        TrainError::Io(format!("{}: plotting failed: {e}", out.display()))
    };
    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, y_floor..(y_max + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for s in series {
        let color = Palette99::pick(s.color).to_rgba();
        let style = color.stroke_width(2);
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(_, y)| y.is_finite())
            .collect();
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, 8, 5, style))
                .map_err(|e| err(&e))?
        } else {
            chart
                .draw_series(LineSeries::new(pts, style))
                .map_err(|e| err(&e))?
        };
        anno.label(s.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A run's own loss curve, `RUN/loss.png` (labelled with the run directory's name).
pub fn plot_run(run_dir: &Path) -> Result<(), TrainError> {
    let label = run_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    plot_runs(&[(label, run_dir)], &run_dir.join("loss.png"))
}

/// Train and validation loss of one or more runs against tokens seen, in one PNG.
pub fn plot_runs(run_dirs: &[(String, &Path)], out: &Path) -> Result<(), TrainError> {
    let mut series = Vec::new();
    for (color, (label, dir)) in run_dirs.iter().enumerate() {
        let rows = read_rows(&dir.join("metrics.jsonl"))?;
        let train: Vec<_> = rows
            .iter()
            .filter_map(|r| r.loss.map(|l| (r.tokens as f64, l)))
            .collect();
        let val: Vec<_> = rows
            .iter()
            .filter_map(|r| r.val_loss.map(|l| (r.tokens as f64, l)))
            .collect();
        if !train.is_empty() {
            series.push(Series {
                label: format!("{label} train"),
                points: train,
                dashed: false,
                color,
            });
        }
        if !val.is_empty() {
            series.push(Series {
                label: format!("{label} val"),
                points: val,
                dashed: true,
                color,
            });
        }
    }
    plot_series(out, "loss", "tokens", "cross-entropy (nats)", &series)
}

/// Validation masked-token accuracy of one or more MLM runs against tokens seen, in one PNG.
pub fn plot_accuracy(run_dirs: &[(String, &Path)], out: &Path) -> Result<(), TrainError> {
    let mut series = Vec::new();
    for (color, (label, dir)) in run_dirs.iter().enumerate() {
        let rows = read_rows(&dir.join("metrics.jsonl"))?;
        let points: Vec<_> = rows
            .iter()
            .filter_map(|r| r.val_accuracy.map(|a| (r.tokens as f64, a)))
            .collect();
        if !points.is_empty() {
            series.push(Series {
                label: format!("{label} val"),
                points,
                dashed: false,
                color,
            });
        }
    }
    plot_series(
        out,
        "masked-token accuracy",
        "tokens",
        "accuracy (validation)",
        &series,
    )
}
