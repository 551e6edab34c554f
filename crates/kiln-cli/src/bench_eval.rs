//! `kiln bench eval`: benchmark scoring speed (documents/s, tokens/s) on real task documents,
//! and with `--pytorch HF_DIR` the same documents scored lm-evaluation-harness-style by
//! transformers (bench/eval/hf_eval.py) right after, side by side with the ratio and both
//! accuracies (which must agree).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::Args;
use kiln_eval::{evaluate, load_task, Scorer};

use crate::commands::load_model;

#[derive(Args)]
pub struct BenchEvalArgs {
    /// The model kiln scores with (GGUF, HF directory, kiln run).
    #[arg(long)]
    pub model: PathBuf,
    /// Tasks (comma-separated; the request-file tasks: hellaswag, arc_easy, arc_challenge,
    /// piqa, winogrande, lambada).
    #[arg(long, value_delimiter = ',', default_value = "hellaswag,arc_easy")]
    pub task: Vec<String>,
    /// Documents per task (the first by doc_id).
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
    #[arg(long, default_value_t = 0)]
    pub num_fewshot: usize,
    #[arg(long, default_value = ".cache/eval")]
    pub eval_data: PathBuf,
    /// Also score with transformers from this HF directory (the same weights, e.g. `kiln
    /// export --format hf` of the GGUF) with as many threads as kiln.
    #[arg(long)]
    pub pytorch: Option<PathBuf>,
    /// Print one JSON line per task instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchEvalArgs) -> Result<()> {
    ensure!(a.limit > 0, "--limit must be positive");
    let mut tasks = Vec::new();
    for name in &a.task {
        let t = load_task(&a.eval_data, name.trim(), a.num_fewshot, Some(a.limit))?;
        ensure!(
            t.name != "mmlu",
            "kiln bench eval takes the request-file tasks (hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada), not {}",
            t.name
        );
        tasks.push(t);
    }
    let (_, model, _) = load_model(&a.model)?;
    let tokenizer = kiln_load::load_tokenizer(&a.model)?;
    let scorer = Scorer::new(&model, &tokenizer);
    let threads = candle_core::utils::get_num_threads();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !a.json {
        println!(
            "# kiln bench eval, {date}, {threads} threads, model {}",
            a.model.display()
        );
        println!(
            "{:<14} {:>5} {:>9} {:>9} {:>6} {:>10} {:>14} {:>14}",
            "task",
            "docs",
            "kiln d/s",
            "torch d/s",
            "ratio",
            "kiln tok/s",
            "kiln acc/norm",
            "torch acc/norm"
        );
    }
    for task in &tasks {
        let r = evaluate(&scorer, task, &mut |_| {})?;
        let kiln_dps = r.n as f64 / r.seconds;
        let torch = match &a.pytorch {
            Some(dir) => Some(run_torch(dir, &task.source, a.limit, threads)?),
            None => None,
        };
        let torch_dps = torch.as_ref().and_then(|t| t["docs_per_s"].as_f64());
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "task": task.name, "docs": r.n, "threads": threads, "date": date,
                    "kiln": {"docs_per_s": kiln_dps, "tokens_per_s": r.tokens_fed as f64 / r.seconds,
                             "acc": r.acc, "acc_norm": r.acc_norm, "perplexity": r.perplexity},
                    "torch": torch,
                    "ratio": torch_dps.map(|t| kiln_dps / t),
                })
            );
            continue;
        }
        let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
        println!(
            "{:<14} {:>5} {:>9.2} {:>9} {:>6} {:>10.0} {:>14} {:>14}",
            task.name,
            r.n,
            kiln_dps,
            f(torch_dps, 2),
            torch_dps.map_or("-".into(), |t| format!("{:.2}x", kiln_dps / t)),
            r.tokens_fed as f64 / r.seconds,
            format!(
                "{:.3}/{:.3}",
                r.acc,
                r.acc_norm.or(r.perplexity).unwrap_or(f64::NAN)
            ),
            torch.as_ref().map_or("-".into(), |t| format!(
                "{:.3}/{:.3}",
                t["acc"].as_f64().unwrap_or(f64::NAN),
                t["acc_norm"]
                    .as_f64()
                    .or(t["perplexity"].as_f64())
                    .unwrap_or(f64::NAN)
            )),
        );
    }
    Ok(())
}

fn run_torch(
    hf_dir: &std::path::Path,
    requests: &std::path::Path,
    limit: usize,
    threads: usize,
) -> Result<serde_json::Value> {
    let script = std::path::Path::new("bench/eval/hf_eval.py");
    ensure!(
        script.is_file(),
        "{} not found: run kiln bench eval --pytorch from the repository root",
        script.display()
    );
    let args: Vec<std::ffi::OsString> = vec![
        "--model".into(),
        hf_dir.into(),
        "--requests".into(),
        requests.into(),
        "--limit".into(),
        limit.to_string().into(),
        "--threads".into(),
        threads.to_string().into(),
    ];
    crate::bench::run_python_json(script, &args, "the transformers scorer")
}
