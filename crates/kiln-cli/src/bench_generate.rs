//! `kiln bench generate`: prefill and decode throughput of a model, the way llama-bench
//! measures it (pp: one forward over a prompt of N tokens; tg: N single-token steps with the
//! KV cache), median over runs after a warm-up. Greedy argmax, fixed token ids.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use kiln_load::Weights;
use kiln_model::{CausalLm, KvCache};

use crate::commands::device;

#[derive(Args)]
pub struct BenchGenerateArgs {
    /// A GGUF file, HF directory or kiln run.
    #[arg(long)]
    pub model: PathBuf,
    /// Weights: `native` (as stored: a GGUF's blocks, an HF checkpoint's bf16/f16 matrices
    /// memory-mapped; kiln runs in f32), `f32` (dequantised, kiln's training model), or a GGML
    /// type to quantise to on load (q8_0, q4_0, f16, ...).
    #[arg(long, default_value = "native")]
    pub weights: String,
    /// Prompt length of the prefill test.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated in the decode test.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Sequences decoded together in the decode test (one token per sequence per step);
    /// decode tokens/s is the aggregate over all of them.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed runs (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

fn load(a: &BenchGenerateArgs) -> Result<(Box<dyn CausalLm>, String)> {
    let Some(weights) = Weights::parse(&a.weights) else {
        bail!(
            "--weights {:?}: use native, f32 or a GGML type (q8_0, q4_0, f16, ...)",
            a.weights
        );
    };
    let m = kiln_load::load_model(&a.model, weights, &device())?;
    Ok((m.model, m.weights))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: BenchGenerateArgs) -> Result<()> {
    anyhow::ensure!(
        a.runs > 0 && a.prompt_tokens > 0,
        "--runs and --prompt-tokens must be positive"
    );
    anyhow::ensure!(a.batch > 0, "--batch must be positive");
    let (model, desc) = load(&a)?;
    let cfg = model.config().clone();
    anyhow::ensure!(
        a.prompt_tokens + a.new_tokens <= cfg.max_seq_len,
        "prompt + new tokens exceed the context ({})",
        cfg.max_seq_len
    );
    let dev = model.device().clone();
    let ids: Vec<u32> = (0..a.prompt_tokens)
        .map(|i| (1000 + (i * 7919) % (cfg.vocab_size - 1000)) as u32)
        .collect();
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for run in 0..=a.runs {
        // Prefill.
        let mut cache = KvCache::new();
        let input = Tensor::from_slice(&ids, (1, ids.len()), &dev)?;
        let t0 = Instant::now();
        let logits = model.forward_decode(&input, &mut cache)?;
        let _ = logits.to_dtype(DType::F32)?.argmax(1)?.to_vec1::<u32>()?;
        let prefill = t0.elapsed().as_secs_f64();
        // Decode from a 1-token prompt per sequence (as llama-bench's tg test), all
        // sequences in one step.
        let mut cache = KvCache::new();
        let rows: Vec<usize> = (0..a.batch).collect();
        let mut next: Vec<u32> = (0..a.batch).map(|r| ids[r % ids.len()]).collect();
        let t0 = Instant::now();
        for _ in 0..a.new_tokens {
            let logits = model.decode_step(&rows, &next, &mut cache)?;
            next = logits.to_dtype(DType::F32)?.argmax(1)?.to_vec1::<u32>()?;
        }
        let decode = t0.elapsed().as_secs_f64();
        if run > 0 {
            pp.push(a.prompt_tokens as f64 / prefill);
            tg.push((a.new_tokens * a.batch) as f64 / decode.max(1e-9));
        }
    }
    let (pp, tg) = (median(pp), median(tg));
    let threads = rayon::current_num_threads();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "impl": "kiln", "model": a.model.display().to_string(), "weights": a.weights,
                "weight_types": desc, "threads": threads, "prompt_tokens": a.prompt_tokens,
                "new_tokens": a.new_tokens, "batch": a.batch, "prefill_tokens_per_s": pp, "decode_tokens_per_s": tg,
                "isa": kiln_kernels::active_isa().name(), "cpu_features": kiln_kernels::cpu_features(),
                "activations": if kiln_kernels::q8_activations() { "q8" } else { "f32" },
            })
        );
    } else {
        println!(
            "kiln bench generate {} ({}, {desc}), {threads} threads, {} kernels{} (CPU: {})\n  prefill pp{}: {pp:.1} tokens/s\n  decode  tg{} x batch {}: {tg:.1} tokens/s (all sequences)",
            a.model.display(),
            a.weights,
            kiln_kernels::active_isa().name(),
            if kiln_kernels::q8_activations() { ", 8-bit activations" } else { "" },
            kiln_kernels::cpu_features().join(" "),
            a.prompt_tokens,
            a.new_tokens,
            a.batch
        );
    }
    Ok(())
}
