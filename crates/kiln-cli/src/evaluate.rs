//! `kiln eval --task ...`: benchmark evaluation (kiln-eval) with a progress bar per task, a
//! table or one JSON object on stdout.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_eval::{evaluate, load_task, load_task_file, Scorer, Task, TaskResult};
use tracing::{info, warn};

use crate::commands::device;
use crate::EvalArgs;

fn docs_bar(task: &Task) -> ProgressBar {
    let bar = ProgressBar::hidden();
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:30.cyan/blue} {pos}/{len} docs [{elapsed_precise} < {eta_precise}] {per_sec}",
        )
        .expect("invariant: valid template"),
    );
    bar.set_length(task.docs.len() as u64);
    bar.set_prefix(task.name.clone());
    bar
}

pub fn run(a: EvalArgs) -> Result<()> {
    // Bad task names and missing data are reported before the model loads.
    let mut tasks = Vec::new();
    for name in &a.task {
        tasks.push(load_task(
            &a.eval_data,
            name.trim(),
            a.num_fewshot,
            a.limit,
        )?);
    }
    for file in &a.task_file {
        tasks.push(load_task_file(file, a.limit)?);
    }
    // A GGUF stays quantised and an HF checkpoint's bf16/f16 matrices stay in their mapped
    // files (the kernels compute the dequantised values, so the scores are the f32 model's, at
    // a fraction of the memory); kiln's own runs are dense f32.
    let tokenizer = kiln_load::load_tokenizer(&a.model)?;
    let t0 = std::time::Instant::now();
    let choice = crate::commands::weights_choice(a.dequantize, a.quantize.as_deref())?;
    let (mut model, config, weights) =
        crate::GLOBAL.without_caching(|| kiln_load::load_llama(&a.model, choice, &device()))?;
    kiln_load::check_vocab(&tokenizer, &config)?;
    info!(
        weights,
        secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
        "loaded {}",
        a.model.display()
    );
    if let Some(choice) = a.adapter.choice() {
        crate::commands::attach_adapter(&mut model, &a.model, choice)?;
    }
    let scorer = Scorer::new(&model, &tokenizer);
    let mut results: Vec<(String, TaskResult)> = Vec::new();
    for task in &tasks {
        info!(
            docs = task.docs.len(),
            shots = a.num_fewshot,
            source = %task.source.display(),
            "scoring {}",
            task.name
        );
        let bar = docs_bar(task);
        let every = (task.docs.len() / 10).max(1);
        let quiet_bar = bar.is_hidden();
        let r = evaluate(&scorer, task, &mut |done| {
            bar.set_position(done as u64);
            if quiet_bar && done % every == 0 {
                info!("{}: {done}/{} docs", task.name, task.docs.len());
            }
        })?;
        bar.finish_and_clear();
        if r.truncated > 0 {
            warn!(
                "{}: {} requests longer than the model's {}-token window were cut from the left",
                task.name,
                r.truncated,
                scorer.window()
            );
        }
        info!(
            docs_per_s = format!("{:.2}", r.n as f64 / r.seconds),
            tokens_per_s = format!("{:.0}", r.tokens_fed as f64 / r.seconds),
            "{} done in {:.1} s",
            task.name,
            r.seconds
        );
        results.push((task.name.clone(), r));
    }
    if let Some(path) = &a.samples {
        let mut text = String::new();
        for (name, r) in &results {
            for s in &r.samples {
                let mut v = serde_json::to_value(s)?;
                v["task"] = name.clone().into();
                text.push_str(&v.to_string());
                text.push('\n');
            }
        }
        let tmp = path.with_extension("jsonl.part");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        info!("per-document scores in {}", path.display());
    }
    if a.json {
        let tasks: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(n, r)| (n.clone(), serde_json::to_value(r).expect("plain numbers")))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "tasks": tasks,
                "model": a.model.display().to_string(),
                "weights": weights,
                "adapter": a.adapter.adapter.as_ref().map(|p| p.display().to_string()),
                "limit": a.limit,
                "num_fewshot": a.num_fewshot,
                "kiln_version": env!("CARGO_PKG_VERSION"),
            })
        );
        return Ok(());
    }
    println!(
        "{:<16} {:>6}  {:>16}  {:>16}  {:>8}",
        "task", "n", "acc", "acc_norm", "docs/s"
    );
    for (name, r) in &results {
        let pm = |m: Option<f64>, s: Option<f64>| match (m, s) {
            (Some(m), Some(s)) => format!("{m:.4} ± {s:.4}"),
            _ => "-".to_string(),
        };
        println!(
            "{name:<16} {:>6}  {:>16}  {:>16}  {:>8.2}",
            r.n,
            pm(Some(r.acc), Some(r.acc_stderr)),
            pm(r.acc_norm, r.acc_norm_stderr),
            r.n as f64 / r.seconds
        );
        if let (Some(p), Some(s)) = (r.perplexity, r.perplexity_stderr) {
            println!("{:<16} perplexity {p:.3} ± {s:.3}", "");
        }
    }
    Ok(())
}
