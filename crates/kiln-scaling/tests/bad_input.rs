//! Bad runs CSVs give clear errors naming the file, line and column.

use std::path::Path;

use kiln_scaling::data::parse_runs;
use kiln_scaling::fit::{fit, Approaches, FitOptions};
use kiln_scaling::ScalingError;

fn parse(text: &str) -> Result<kiln_scaling::data::RunsTable, ScalingError> {
    parse_runs(text, Path::new("runs.csv"), "params")
}

#[test]
fn missing_columns_are_named() {
    let err = parse("params,loss\n1e6,3.0\n").unwrap_err();
    assert!(
        matches!(&err, ScalingError::MissingColumn { column, .. } if column == "tokens"),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("runs.csv") && msg.contains("\"tokens\"") && msg.contains("params,loss"),
        "{msg}"
    );

    let err = parse_runs(
        "params,tokens,loss\n1,2,3\n",
        Path::new("runs.csv"),
        "non_embedding_params",
    )
    .unwrap_err();
    assert!(err.to_string().contains("non_embedding_params"), "{err}");
    let err = parse("").unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn non_positive_and_non_numeric_values_name_line_and_column() {
    let err = parse("params,tokens,loss\n1e6,2e7,3.0\n# comment\n2e6,0,2.9\n").unwrap_err();
    match &err {
        ScalingError::BadValue {
            line,
            column,
            problem,
            ..
        } => {
            assert_eq!((*line, column.as_str()), (4, "tokens"));
            assert!(problem.contains("positive"));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().starts_with("runs.csv:4:"), "{err}");

    let err = parse("params,tokens,loss,flops\n1e6,2e7,-3.0,1e15\n").unwrap_err();
    assert!(
        err.to_string().contains("\"loss\"") && err.to_string().contains("positive"),
        "{err}"
    );
    let err = parse("params,tokens,loss\n1e6,2e7,abc\n").unwrap_err();
    assert!(
        err.to_string().contains("not a number") && err.to_string().contains(":2:"),
        "{err}"
    );
    let err = parse("params,tokens,loss\n1e6,2e7,NaN\n").unwrap_err();
    assert!(err.to_string().contains("finite"), "{err}");
    let err = parse("params,tokens,loss\n1e6,2e7\n").unwrap_err();
    assert!(
        err.to_string().contains("2 fields") && err.to_string().contains(":2:"),
        "{err}"
    );
    let err = parse("params,tokens,loss\n").unwrap_err();
    assert!(
        matches!(err, ScalingError::TooFewPoints { got: 0, .. }),
        "{err}"
    );
}

#[test]
fn too_few_points_for_each_fit() {
    let three = "params,tokens,loss\n1e6,2e7,3.0\n2e6,1e7,2.9\n4e6,5e6,2.95\n";
    let table = parse(three).unwrap();
    let only = |approaches| FitOptions {
        approaches,
        bootstrap: 0,
        ..Default::default()
    };
    let err = fit(&table, &only(Approaches::Three)).unwrap_err();
    assert!(
        matches!(
            err,
            ScalingError::TooFewPoints {
                need: 6,
                got: 3,
                ..
            }
        ),
        "{err}"
    );
    // One budget (all at C = 1.2e14): Approach 2 needs two.
    let err = fit(&table, &only(Approaches::Two)).unwrap_err();
    assert!(
        matches!(
            err,
            ScalingError::TooFewPoints {
                need: 2,
                got: 1,
                ..
            }
        ),
        "{err}"
    );
    // Both requested, neither possible: one error naming both reasons.
    let err = fit(&table, &only(Approaches::Both))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Approach 2") && err.contains("Approach 3"),
        "{err}"
    );

    // Two budgets with only two sizes each: the parabola needs three.
    let two_sizes = "params,tokens,loss,budget\n1e6,2e7,3.0,1.2e14\n2e6,1e7,2.9,1.2e14\n1e6,2e8,2.8,1.2e15\n2e6,1e8,2.7,1.2e15\n";
    let err = fit(&parse(two_sizes).unwrap(), &only(Approaches::Two))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 3"), "{err}");

    // Both requested and only Approach 3 possible: Approach 2 is reported as skipped.
    let mut six = String::from("params,tokens,loss\n");
    for (n, d) in [
        (1e6, 1e7),
        (2e6, 1e7),
        (4e6, 1e7),
        (1e6, 1e8),
        (2e6, 1e8),
        (4e6, 1e8),
    ] {
        let l = 1.7 + 400.0 / f64::powf(n, 0.34) + 400.0 / f64::powf(d, 0.28);
        six.push_str(&format!("{n},{d},{l}\n"));
    }
    let r = fit(&parse(&six).unwrap(), &only(Approaches::Both)).unwrap();
    assert!(r.approach3.is_some() && r.approach2.is_none());
    assert!(
        r.summary().contains("Approach 2: skipped"),
        "{}",
        r.summary()
    );
}
