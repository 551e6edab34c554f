//! The runs CSV.
//!
//! `kiln scaling sweep` writes `params,non_embedding_params,tokens,flops,loss,run_dir,budget`:
//! `params` all parameters, `tokens` the tokens actually trained, `flops = tokens x` the PaLM
//! FLOPs per token (`6 N_matmul + 12 L d T`), `loss` the final validation loss, `budget` the
//! nominal IsoFLOP budget the run belongs to.
//!
//! `kiln scaling fit` reads any CSV with `params,tokens,loss` (or another column for N),
//! `flops` and `budget` optional. Blank lines and lines starting with `#` are skipped; fields
//! may be double-quoted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{io_err, Result, ScalingError};

/// The sweep CSV's header, in order.
pub const CSV_HEADER: &str = "params,non_embedding_params,tokens,flops,loss,run_dir,budget";

/// One finished sweep run (also the `scaling-result.json` marker in its directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    pub params: u64,
    pub non_embedding_params: u64,
    pub tokens: u64,
    pub flops: f64,
    pub loss: f64,
    pub run_dir: String,
    pub budget: f64,
}

impl RunRow {
    pub fn to_csv_line(&self) -> String {
        format!(
            "{},{},{},{:e},{},{},{:e}",
            self.params,
            self.non_embedding_params,
            self.tokens,
            self.flops,
            self.loss,
            quote(&self.run_dir),
            self.budget
        )
    }
}

fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Splits one CSV line (RFC 4180 quoting, no embedded newlines).
pub fn split_csv_line(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut in_quotes = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    in_quotes = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && field.trim().is_empty() && !was_quoted {
            field.clear();
            in_quotes = true;
            was_quoted = true;
        } else if c == ',' {
            out.push(std::mem::take(&mut field));
            was_quoted = false;
        } else {
            field.push(c);
        }
    }
    if in_quotes {
        return Err("unterminated quoted field".into());
    }
    out.push(field);
    Ok(out.into_iter().map(|f| f.trim().to_string()).collect())
}

/// One row of a runs CSV, as the fits see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Parameters (from the chosen column).
    pub n: f64,
    /// Training tokens.
    pub d: f64,
    /// Training FLOPs, when the CSV has a `flops` column.
    pub flops: Option<f64>,
    pub loss: f64,
    /// Nominal budget, when the CSV has a `budget` column.
    pub budget: Option<f64>,
    /// 1-based line in the file.
    pub line: usize,
}

/// A parsed runs CSV.
#[derive(Debug, Clone)]
pub struct RunsTable {
    pub source: PathBuf,
    /// The column N was read from.
    pub params_column: String,
    pub points: Vec<Point>,
    pub has_flops: bool,
    pub has_budget: bool,
}

impl RunsTable {
    /// Training compute of a point: the `flops` column, else `6 N D`.
    pub fn compute(&self, p: &Point) -> f64 {
        p.flops.unwrap_or(6.0 * p.n * p.d)
    }

    /// Where compute numbers come from, for reports.
    pub fn compute_source(&self) -> &'static str {
        if self.has_flops {
            "the flops column"
        } else {
            "C = 6 N D (no flops column)"
        }
    }

    /// A copy holding only `points` (for bootstrap resamples and filters).
    pub fn with_points(&self, points: Vec<Point>) -> Self {
        Self {
            points,
            ..self.clone()
        }
    }
}

pub fn read_runs(path: &Path, params_column: &str) -> Result<RunsTable> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    parse_runs(&text, path, params_column)
}

/// Parses CSV text; every error names the file, the line and the column.
pub fn parse_runs(text: &str, path: &Path, params_column: &str) -> Result<RunsTable> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (header_line, header) = lines.next().ok_or_else(|| ScalingError::BadRow {
        path: path.to_path_buf(),
        line: 1,
        problem: "empty file: expected a header with params,tokens,loss".into(),
    })?;
    let header = split_csv_line(header).map_err(|problem| ScalingError::BadRow {
        path: path.to_path_buf(),
        line: header_line,
        problem,
    })?;
    let find = |name: &str| header.iter().position(|h| h == name);
    let require = |name: &str| {
        find(name).ok_or_else(|| ScalingError::MissingColumn {
            path: path.to_path_buf(),
            column: name.to_string(),
            found: header.join(","),
        })
    };
    let (i_n, i_d, i_loss) = (
        require(params_column)?,
        require("tokens")?,
        require("loss")?,
    );
    let (i_flops, i_budget) = (find("flops"), find("budget"));

    let mut points = Vec::new();
    for (line, raw) in lines {
        let fields = split_csv_line(raw).map_err(|problem| ScalingError::BadRow {
            path: path.to_path_buf(),
            line,
            problem,
        })?;
        if fields.len() != header.len() {
            return Err(ScalingError::BadRow {
                path: path.to_path_buf(),
                line,
                problem: format!(
                    "{} fields, but the header has {}",
                    fields.len(),
                    header.len()
                ),
            });
        }
        let num = |i: usize| -> Result<f64> {
            let raw = &fields[i];
            let bad = |problem: &str| ScalingError::BadValue {
                path: path.to_path_buf(),
                line,
                column: header[i].clone(),
                value: raw.clone(),
                problem: problem.into(),
            };
            let v: f64 = raw.parse().map_err(|_| bad("not a number"))?;
            if !v.is_finite() {
                return Err(bad("not finite"));
            }
            if v <= 0.0 {
                return Err(bad("must be positive"));
            }
            Ok(v)
        };
        points.push(Point {
            n: num(i_n)?,
            d: num(i_d)?,
            flops: i_flops.map(num).transpose()?,
            loss: num(i_loss)?,
            budget: i_budget.map(num).transpose()?,
            line,
        });
    }
    if points.is_empty() {
        return Err(ScalingError::TooFewPoints {
            what: format!("{} (no data rows)", path.display()),
            need: 1,
            got: 0,
        });
    }
    Ok(RunsTable {
        source: path.to_path_buf(),
        params_column: params_column.to_string(),
        points,
        has_flops: i_flops.is_some(),
        has_budget: i_budget.is_some(),
    })
}

/// Writes `rows` as the sweep CSV, keeping rows of an existing file whose `run_dir` is not
/// among `rows` (so several sweeps can accumulate into one file). Atomic (temp + rename).
pub fn write_sweep_csv(path: &Path, rows: &[RunRow]) -> Result<()> {
    let mut kept: Vec<String> = Vec::new();
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        if let Some(h) = lines.next() {
            if h.trim() != CSV_HEADER {
                return Err(ScalingError::Config(format!(
                    "{}: exists with a different header ({h:?}); expected {CSV_HEADER:?}. Move it away or set sweep.csv",
                    path.display()
                )));
            }
        }
        let ours: std::collections::HashSet<&str> =
            rows.iter().map(|r| r.run_dir.as_str()).collect();
        for l in lines {
            let fields = split_csv_line(l).unwrap_or_default();
            match fields.get(5) {
                Some(dir) if ours.contains(dir.as_str()) => {}
                _ => kept.push(l.to_string()),
            }
        }
    }
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for l in kept {
        out.push_str(&l);
        out.push('\n');
    }
    for r in rows {
        out.push_str(&r.to_csv_line());
        out.push('\n');
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    let tmp = path.with_extension("csv.tmp");
    std::fs::write(&tmp, out).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            split_csv_line(r#"1, "a,b" ,"say ""hi""",x"#).unwrap(),
            vec!["1", "a,b", "say \"hi\"", "x"]
        );
        assert!(split_csv_line("\"open").is_err());
    }

    #[test]
    fn round_trip() {
        let row = RunRow {
            params: 1000,
            non_embedding_params: 500,
            tokens: 20_000,
            flops: 1.2e11,
            loss: 3.25,
            run_dir: "runs/x,y".into(),
            budget: 1e11,
        };
        let text = format!("{CSV_HEADER}\n{}\n", row.to_csv_line());
        let t = parse_runs(&text, Path::new("t.csv"), "params").unwrap();
        assert_eq!(t.points[0].n, 1000.0);
        assert_eq!(t.points[0].flops, Some(1.2e11));
        assert_eq!(t.points[0].budget, Some(1e11));
        let t = parse_runs(&text, Path::new("t.csv"), "non_embedding_params").unwrap();
        assert_eq!(t.points[0].n, 500.0);
    }

    #[test]
    fn sweep_csv_keeps_other_sweeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.csv");
        let row = |d: &str, loss: f64| RunRow {
            params: 10,
            non_embedding_params: 5,
            tokens: 100,
            flops: 6e3,
            loss,
            run_dir: d.into(),
            budget: 6e3,
        };
        write_sweep_csv(&path, &[row("a", 3.0), row("b", 3.0)]).unwrap();
        write_sweep_csv(&path, &[row("b", 2.5), row("c", 2.0)]).unwrap();
        let t = read_runs(&path, "params").unwrap();
        let losses: Vec<f64> = t.points.iter().map(|p| p.loss).collect();
        assert_eq!(losses, vec![3.0, 2.5, 2.0]);
        std::fs::write(&path, "params,tokens,loss\n1,2,3\n").unwrap();
        let err = write_sweep_csv(&path, &[row("a", 1.0)]).unwrap_err();
        assert!(err.to_string().contains("different header"), "{err}");
    }
}
