//! Both fits recover the constants of a known law from synthetic IsoFLOP data with noise, and
//! the truth lies inside their bootstrap intervals.

use std::path::Path;

use kiln_scaling::data::parse_runs;
use kiln_scaling::fit::{fit, Approaches, FitOptions};
use kiln_scaling::law::ParametricLaw;
use kiln_scaling::Rng;

const TRUTH: ParametricLaw = ParametricLaw::CHINCHILLA;

/// Five budgets spanning 100x, seven sizes each centred (in log N) on the true optimum, D from
/// C = 6 N D, loss times lognormal noise of `sigma`.
fn synthetic_csv(sigma: f64, seed: u64, with_flops: bool) -> String {
    let mut rng = Rng::new(seed);
    let mut csv = String::from(if with_flops {
        "params,tokens,flops,loss\n"
    } else {
        "params,tokens,loss\n"
    });
    for c in [1e18, 3e18, 1e19, 3e19, 1e20] {
        let n_opt = TRUTH.optimal(c).params;
        for k in -3..=3 {
            let n = (n_opt * (0.35 * k as f64).exp()).round();
            let d = c / (6.0 * n);
            let loss = TRUTH.loss(n, d) * (sigma * rng.next_normal()).exp();
            if with_flops {
                csv.push_str(&format!("{n},{d},{},{loss}\n", 6.0 * n * d));
            } else {
                csv.push_str(&format!("{n},{d},{loss}\n"));
            }
        }
    }
    csv
}

#[test]
fn approach3_recovers_the_law_within_its_intervals() {
    let table = parse_runs(
        &synthetic_csv(0.003, 7, false),
        Path::new("synthetic.csv"),
        "params",
    )
    .unwrap();
    let opts = FitOptions {
        approaches: Approaches::Three,
        bootstrap: 100,
        ..Default::default()
    };
    let r = fit(&table, &opts).unwrap();
    let a3 = r.approach3.as_ref().unwrap();
    eprintln!("{}", r.summary());
    for (name, est, truth) in [
        ("E", a3.e, TRUTH.e),
        ("A", a3.big_a, TRUTH.a),
        ("B", a3.big_b, TRUTH.b),
        ("alpha", a3.alpha, TRUTH.alpha),
        ("beta", a3.beta, TRUTH.beta),
        ("a", a3.a, TRUTH.exponent_a()),
        ("b", a3.b, TRUTH.exponent_b()),
    ] {
        assert!(est.contains(truth), "{name}: truth {truth} outside {est:?}");
        assert!(
            est.ci[0] <= est.value && est.value <= est.ci[1],
            "{name}: {est:?}"
        );
    }
    assert!(
        (a3.alpha.value - TRUTH.alpha).abs() < 0.05,
        "{:?}",
        a3.alpha
    );
    assert!((a3.beta.value - TRUTH.beta).abs() < 0.05, "{:?}", a3.beta);
    assert!((a3.e.value - TRUTH.e).abs() < 0.1, "{:?}", a3.e);
    assert!((a3.a.value - TRUTH.exponent_a()).abs() < 0.02, "{:?}", a3.a);
    assert_eq!(a3.resamples_ok, 100);
}

#[test]
fn approach3_is_exact_without_noise() {
    let table = parse_runs(
        &synthetic_csv(0.0, 1, false),
        Path::new("exact.csv"),
        "params",
    )
    .unwrap();
    let opts = FitOptions {
        approaches: Approaches::Three,
        bootstrap: 0,
        ..Default::default()
    };
    let a3 = fit(&table, &opts).unwrap().approach3.unwrap();
    assert!((a3.alpha.value - TRUTH.alpha).abs() < 1e-3, "{a3:?}");
    assert!((a3.beta.value - TRUTH.beta).abs() < 1e-3, "{a3:?}");
    assert!((a3.e.value - TRUTH.e).abs() < 1e-3, "{a3:?}");
    assert!((a3.big_a.value / TRUTH.a).ln().abs() < 0.02, "{a3:?}");
    assert!((a3.big_b.value / TRUTH.b).ln().abs() < 0.02, "{a3:?}");
}

#[test]
fn approach2_recovers_the_exponents_within_its_intervals() {
    for with_flops in [false, true] {
        let table = parse_runs(
            &synthetic_csv(0.003, 11, with_flops),
            Path::new("synthetic.csv"),
            "params",
        )
        .unwrap();
        let opts = FitOptions {
            approaches: Approaches::Two,
            bootstrap: 200,
            ..Default::default()
        };
        let r = fit(&table, &opts).unwrap();
        eprintln!("{}", r.summary());
        let a2 = r.approach2.as_ref().unwrap();
        assert_eq!(a2.budgets.len(), 5);
        assert!(a2.a.contains(TRUTH.exponent_a()), "a: {:?}", a2.a);
        assert!(a2.b.contains(TRUTH.exponent_b()), "b: {:?}", a2.b);
        assert!((a2.a.value - TRUTH.exponent_a()).abs() < 0.03, "{:?}", a2.a);
        assert!(
            (a2.a.value + a2.b.value - 1.0).abs() < 1e-9,
            "C = 6ND exactly: a + b = 1"
        );
        for b in &a2.budgets {
            let truth = TRUTH.optimal(b.flops).params;
            assert!((b.n_opt / truth).ln().abs() < 0.15, "{b:?} vs {truth}");
            assert!(!b.extrapolated);
        }
    }
}

#[test]
fn bracketed_only_leaves_out_a_budget_whose_minimum_was_not_sampled() {
    // The smallest budget keeps only its sizes above the optimum: its vertex is extrapolated.
    let csv: String = synthetic_csv(0.0, 3, false)
        .lines()
        .enumerate()
        .filter(|(i, _)| !(1..=4).contains(i))
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let table = parse_runs(&csv, Path::new("one-sided.csv"), "params").unwrap();
    let opts = |bracketed_only| FitOptions {
        approaches: Approaches::Two,
        bootstrap: 0,
        bracketed_only,
        ..Default::default()
    };
    let flagged = fit(&table, &opts(false)).unwrap().approach2.unwrap();
    assert_eq!(flagged.budgets.len(), 5);
    assert!(!flagged.budgets[0].bracketed, "{:?}", flagged.budgets[0]);
    assert!(flagged.budgets[1..]
        .iter()
        .all(|b| b.bracketed && !b.extrapolated));

    let left_out = fit(&table, &opts(true)).unwrap().approach2.unwrap();
    assert_eq!(left_out.budgets.len(), 4);
    assert!(left_out.budgets.iter().all(|b| b.bracketed));
    assert!(
        left_out
            .excluded
            .iter()
            .any(|e| e.contains("1.000e18") && e.contains("not sampled")),
        "{:?}",
        left_out.excluded
    );
    // Exact data: the remaining budgets give the true exponent.
    assert!(
        (left_out.a.value - TRUTH.exponent_a()).abs() < 0.01,
        "{:?}",
        left_out.a
    );
}

#[test]
fn both_approaches_and_json() {
    let table = parse_runs(&synthetic_csv(0.003, 3, true), Path::new("s.csv"), "params").unwrap();
    let opts = FitOptions {
        bootstrap: 20,
        ..Default::default()
    };
    let r = fit(&table, &opts).unwrap();
    let json = serde_json::to_value(&r).unwrap();
    for key in ["E", "A", "B", "alpha", "beta", "a", "b", "G"] {
        assert!(json["approach3"][key]["value"].is_f64(), "{key}: {json}");
        assert!(json["approach3"][key]["ci"][1].is_f64(), "{key}: {json}");
    }
    assert!(json["approach2"]["a"]["value"].is_f64());
    assert_eq!(json["params_column"], "params");
    // The JSON is a law the planner can read.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fit.json");
    std::fs::write(&p, json.to_string()).unwrap();
    let named = kiln_scaling::law::load_law(p.to_str().unwrap()).unwrap();
    assert!((named.law.alpha - TRUTH.alpha).abs() < 0.05);
    assert_eq!(named.params_column, "params");
}

#[test]
fn plots_are_written() {
    let table = parse_runs(&synthetic_csv(0.003, 5, true), Path::new("s.csv"), "params").unwrap();
    let opts = FitOptions {
        bootstrap: 0,
        ..Default::default()
    };
    let a2 = kiln_scaling::fit::approach2(&table, &opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = kiln_scaling::plot::plot_all(&table, Some(&a2), dir.path()).unwrap();
    assert_eq!(written.len(), 3);
    for p in &written {
        assert!(
            std::fs::metadata(p).unwrap().len() > 10_000,
            "{}",
            p.display()
        );
    }
    // Without an IsoFLOP fit only the run scatter plots are drawn.
    let written = kiln_scaling::plot::plot_all(&table, None, dir.path()).unwrap();
    assert_eq!(written.len(), 2);
}
