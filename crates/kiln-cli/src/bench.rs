//! `kiln bench train`: times full training steps (forward, backward, clip, AdamW) on a preset
//! after warm-up and reports median tokens/s, MFU against the measured fp32 GEMM peak, and
//! peak RSS. Performance lives here, never in timed tests.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use clap::Subcommand;
use kiln_model::{Llama, ModelConfig, Params, SplitMix64};
use kiln_train::optim::AdamW;
use kiln_train::perf::{measure_gemm_peak, peak_rss_mib};
use kiln_train::{optimizer_step, OptimConfig};

use crate::commands::device;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time training steps of a model preset on random tokens.
    Train {
        /// tiny, 10m, reference, smollm2-135m
        #[arg(long, default_value = "reference")]
        preset: String,
        /// Sequences per step (default: 8, the reference config).
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Context length (default: 256).
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Print one JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Train {
            preset,
            batch_size,
            seq_len,
            warmup,
            steps,
            json,
        } => bench_train(&preset, batch_size, seq_len, warmup, steps, json),
    }
}

fn bench_train(
    preset: &str,
    batch_size: usize,
    seq_len: usize,
    warmup: usize,
    steps: usize,
    json: bool,
) -> Result<()> {
    anyhow::ensure!(steps > 0, "--steps must be positive");
    let dev = device();
    let mut cfg = ModelConfig::preset(preset)?;
    cfg.max_seq_len = cfg.max_seq_len.max(seq_len);
    let params = Params::init(&cfg, 0, &dev, DType::F32)?;
    let model = Llama::new(&cfg, &params)?;
    let mut opt = AdamW::new(&params, &OptimConfig::default())?;
    let mut rng = SplitMix64::new(1);
    let mut batch = || -> Result<(Tensor, Tensor)> {
        let n = batch_size * seq_len;
        let ids: Vec<u32> = (0..n + 1)
            .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
            .collect();
        let targets: Vec<i64> = ids[1..].iter().map(|&x| x as i64).collect();
        Ok((
            Tensor::from_slice(&ids[..n], (batch_size, seq_len), &dev)?,
            Tensor::from_slice(&targets, n, &dev)?,
        ))
    };
    let peak = measure_gemm_peak(&dev)?;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let mb = [batch()?];
        let t0 = Instant::now();
        optimizer_step(&model, &params, &mut opt, &mb, 1e-4, 1.0, None)?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    // Where the step goes: forward alone (with the loss), and the optimizer update alone.
    let mut fwd_times = Vec::new();
    let mut opt_times = Vec::new();
    for _ in 0..steps.min(3) {
        let (inputs, targets) = batch()?;
        let t0 = Instant::now();
        let logits = model.forward_train(&inputs, None)?;
        let loss = kiln_kernels::cross_entropy_sum(&logits, &targets)?;
        let _ = loss.to_scalar::<f32>()?;
        fwd_times.push(t0.elapsed().as_secs_f64());
        let grads: std::collections::BTreeMap<String, Tensor> = params
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().zeros_like().unwrap()))
            .collect();
        let t0 = Instant::now();
        opt.step(&params, &grads, 1e-4, 1.0)?;
        opt_times.push(t0.elapsed().as_secs_f64());
    }
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (fwd, optim) = (median_of(fwd_times), median_of(opt_times));
    let median = median_of(times.clone());
    let tokens_per_s = (batch_size * seq_len) as f64 / median;
    let flops_per_token = cfg.train_flops_per_token(seq_len);
    let mfu = flops_per_token * tokens_per_s / peak;
    let threads = candle_core::utils::get_num_threads();
    let rss = peak_rss_mib();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "impl": "kiln", "preset": preset, "threads": threads, "batch_size": batch_size, "seq_len": seq_len,
                "step_ms_median": median * 1e3, "tokens_per_s": tokens_per_s, "mfu": mfu,
                "gemm_peak_gflops": peak / 1e9, "flops_per_token": flops_per_token, "peak_rss_mb": rss,
                "step_ms_all": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
                "forward_ms": fwd * 1e3, "optimizer_ms": optim * 1e3,
            })
        );
    } else {
        println!(
            "kiln bench train --preset {preset}: {threads} threads, batch {batch_size} x {seq_len}\n  median step {:.1} ms, {tokens_per_s:.0} tokens/s, MFU {:.1}% of the measured {:.1} GFLOP/s fp32 GEMM peak, peak RSS {:.0} MiB",
            median * 1e3,
            mfu * 100.0,
            peak / 1e9,
            rss.unwrap_or(0.0)
        );
        println!(
            "  forward+loss {:.1} ms, backward+clip {:.1} ms, AdamW {:.1} ms",
            fwd * 1e3,
            (median - fwd - optim) * 1e3,
            optim * 1e3
        );
    }
    Ok(())
}
