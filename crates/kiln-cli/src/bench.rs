//! `kiln bench train`: times full training steps (forward, backward, clip, AdamW) on a preset
//! after warm-up and reports median tokens/s, MFU against the measured fp32 GEMM peak, and
//! peak RSS. Performance lives here, never in timed tests.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use clap::Subcommand;
use kiln_model::Precision;
use kiln_model::{Grads, Llama, ModelConfig, Params, SplitMix64};
use kiln_train::optim::AdamW;
use kiln_train::perf::{measure_peak, peak_rss_mib};
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
        /// Also run the PyTorch twin (bench/reference/bench_train.py, same preset, steps and
        /// threads) right after, and report both side by side with the ratio.
        #[arg(long)]
        pytorch: bool,
        /// Compute gradients with candle's autograd instead of the hand-written backward
        /// (to measure what the hand-written one saves).
        #[arg(long)]
        autograd: bool,
        /// The projections' products: f32, or bf16 (inputs rounded to bf16, sums in f32;
        /// needs AVX512-BF16). With --pytorch and bf16, PyTorch runs twice: fp32 eager and
        /// under torch.autocast("cpu", dtype=torch.bfloat16).
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        precision: String,
    },
    /// Prefill and decode tokens/s of a model (GGUF quantised or dequantised, HF, kiln run).
    Generate(crate::bench_generate::BenchGenerateArgs),
    /// LoRA / QLoRA / full fine-tuning steps on real instruction data (vs PyTorch + PEFT).
    Sft(crate::bench_sft::BenchSftArgs),
    /// DPO steps (LoRA) on real preference pairs; with --pytorch the same pairs, in the same
    /// order, through TRL's DPOTrainer right after.
    Dpo(crate::bench_pref::BenchDpoArgs),
    /// GRPO steps (rollouts + update, LoRA) on real prompts; with --pytorch the same prompts
    /// through TRL's GRPOTrainer right after.
    Grpo(crate::bench_pref::BenchGrpoArgs),
    /// Benchmark scoring (documents/s) on real task documents (vs transformers).
    Eval(crate::bench_eval::BenchEvalArgs),
    /// Top-1 agreement and KL of a quantised GGUF's predictions against the same weights
    /// dequantised to f32, over held-out text (kiln's kernels and candle's).
    QuantAccuracy(crate::bench_quant::BenchQuantAccuracyArgs),
    /// Memory read bandwidth with every thread (decoding one token reads every weight once,
    /// so bandwidth / weight bytes bounds decode tokens/s).
    Memory {
        /// Buffer size in MiB (far beyond the caches).
        #[arg(long, default_value_t = 2048)]
        mib: usize,
        /// Timed passes; the best is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print one JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Generate(a) => crate::bench_generate::run(a),
        BenchCommand::Sft(a) => crate::bench_sft::run(a),
        BenchCommand::Dpo(a) => crate::bench_pref::run_dpo(a),
        BenchCommand::Grpo(a) => crate::bench_pref::run_grpo(a),
        BenchCommand::Eval(a) => crate::bench_eval::run(a),
        BenchCommand::QuantAccuracy(a) => crate::bench_quant::run(a),
        BenchCommand::Memory { mib, runs, json } => {
            anyhow::ensure!(mib > 0, "--mib must be positive");
            let gbps = kiln_kernels::bandwidth::read_bandwidth(mib << 20, runs) / 1e9;
            let threads = rayon::current_num_threads();
            let features = kiln_kernels::cpu_features();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"read_gb_per_s": gbps, "threads": threads, "mib": mib,
                        "runs": runs, "cpu_features": features})
                );
            } else {
                println!(
                    "read bandwidth {gbps:.1} GB/s ({threads} threads, {mib} MiB buffer, best of {runs}); CPU: {}",
                    features.join(" ")
                );
            }
            Ok(())
        }
        BenchCommand::Train {
            preset,
            batch_size,
            seq_len,
            warmup,
            steps,
            json,
            pytorch,
            autograd,
            precision,
        } => {
            let precision = match precision.as_str() {
                "bf16" => Precision::Bf16,
                _ => Precision::F32,
            };
            anyhow::ensure!(
                !(autograd && precision == Precision::Bf16),
                "--autograd measures candle's autograd in f32; drop it or --precision bf16"
            );
            let kiln = bench_train(
                &preset, batch_size, seq_len, warmup, steps, json, autograd, precision,
            )?;
            if pytorch {
                compare_with_pytorch(&preset, warmup, steps, json, &kiln, "fp32")?;
                if precision == Precision::Bf16 {
                    compare_with_pytorch(&preset, warmup, steps, json, &kiln, "bf16")?;
                }
            }
            Ok(())
        }
    }
}

/// What the PyTorch comparison needs from kiln's measurement.
struct TrainBench {
    tokens_per_s: f64,
    peak_flops: f64,
    flops_per_token: f64,
    batch_size: usize,
    seq_len: usize,
    precision: Precision,
}

#[allow(clippy::too_many_arguments)] // the command's options, passed through
fn bench_train(
    preset: &str,
    batch_size: usize,
    seq_len: usize,
    warmup: usize,
    steps: usize,
    json: bool,
    autograd: bool,
    precision: Precision,
) -> Result<TrainBench> {
    anyhow::ensure!(steps > 0, "--steps must be positive");
    let dev = device();
    let mut cfg = ModelConfig::preset(preset)?;
    cfg.max_seq_len = cfg.max_seq_len.max(seq_len);
    let params = Params::init(&cfg, 0, &dev, DType::F32)?;
    let mut model = Llama::new(&cfg, &params)?;
    let precision = model.set_precision(precision);
    let mut opt = AdamW::new(&params, &OptimConfig::default())?;
    let mut autograd_ref = if autograd {
        Some(AutogradRef::new(&cfg, &params)?)
    } else {
        None
    };
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
    let peak = measure_peak(&dev, precision)?;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let mb = [batch()?];
        let t0 = Instant::now();
        if let Some(r) = autograd_ref.as_mut() {
            r.step(&params, &mut opt, &mb[0])?;
        } else {
            optimizer_step(&model, &params, &mut opt, &mb, 1e-4, 1.0, None)?;
        }
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
        // The update alone, over the last step's gradients (the values do not matter).
        let t0 = Instant::now();
        match &autograd_ref {
            Some(r) => opt.step_with(&params, &r.grads, 1e-4, 1.0)?,
            None => opt.step(&params, 1e-4, 1.0)?,
        }
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
    let mfu = kiln_train::perf::mfu(flops_per_token * tokens_per_s, peak);
    let threads = candle_core::utils::get_num_threads();
    let rss = peak_rss_mib();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "impl": if autograd { "kiln-autograd" } else { "kiln" }, "preset": preset, "precision": precision.name(), "threads": threads, "batch_size": batch_size, "seq_len": seq_len,
                "step_ms_median": median * 1e3, "tokens_per_s": tokens_per_s, "mfu": mfu,
                "gemm_peak_gflops": peak / 1e9, "flops_per_token": flops_per_token, "peak_rss_mb": rss,
                "step_ms_all": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
                "forward_ms": fwd * 1e3, "optimizer_ms": optim * 1e3,
                "isa": kiln_kernels::active_isa().name(), "cpu_features": kiln_kernels::cpu_features(),
            })
        );
    } else {
        println!(
            "kiln bench train --preset {preset}: {threads} threads, batch {batch_size} x {seq_len}, {} products\n  median step {:.1} ms, {tokens_per_s:.0} tokens/s, MFU {:.1}% of the measured {:.1} GFLOP/s {} GEMM peak, peak RSS {:.0} MiB",
            precision.name(),
            median * 1e3,
            mfu * 100.0,
            peak / 1e9,
            precision.name(),
            rss.unwrap_or(0.0)
        );
        println!(
            "  forward+loss {:.1} ms, backward+clip {:.1} ms, AdamW {:.1} ms",
            fwd * 1e3,
            (median - fwd - optim) * 1e3,
            optim * 1e3
        );
    }
    Ok(TrainBench {
        tokens_per_s,
        peak_flops: peak,
        flops_per_token,
        batch_size,
        seq_len,
        precision,
    })
}

/// candle's autograd computing the gradients (benchmark comparison only): a model over one
/// `Var` per tensor, holding a copy of the flat parameters, so autograd's bookkeeping is what
/// it was per tensor (autograd through views of the flat buffer would add a full-buffer
/// zero-padded gradient per view: candle's `narrow` backward).
struct AutogradRef {
    model: Llama,
    vars: Vec<(String, Var)>,
    grads: Grads,
}

impl AutogradRef {
    fn new(cfg: &ModelConfig, params: &Params) -> Result<Self> {
        let vars: Vec<(String, Var)> = params
            .iter()
            .map(|(n, t)| Ok((n.to_string(), Var::from_tensor(&t.detach())?)))
            .collect::<Result<_>>()?;
        let by_name: std::collections::HashMap<&str, &Var> =
            vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let model = Llama::over_tensors(cfg, |n| {
            by_name
                .get(n)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| kiln_model::ModelError::Input(format!("no tensor {n:?}")))
        })?;
        let flat = params.flat();
        let grads = Grads::new(params.layout().clone(), flat.dtype(), flat.device())?;
        Ok(Self { model, vars, grads })
    }

    /// One step: copy the weights in, forward, `loss.backward()`, clip, AdamW.
    fn step(&mut self, params: &Params, opt: &mut AdamW, batch: &(Tensor, Tensor)) -> Result<()> {
        for (name, var) in &self.vars {
            var.set(&params.tensor(name)?.detach())?;
        }
        let (inputs, targets) = batch;
        let logits = self.model.forward_train(inputs, None)?;
        let n = kiln_kernels::count_valid_targets(targets)?;
        let loss = (kiln_kernels::cross_entropy_sum(&logits, targets)? / n as f64)?;
        let g = loss.backward()?;
        self.grads.zero();
        for (name, var) in &self.vars {
            if let Some(gi) = g.get(var) {
                self.grads.accumulate(name, gi)?;
            }
        }
        let norm_sq = self.grads.sum_of_squares()?;
        let scale = (1.0 / (norm_sq.sqrt() + 1e-6)).min(1.0);
        opt.step_with(params, &self.grads, 1e-4, scale)?;
        Ok(())
    }
}

/// Runs the PyTorch twin on the same preset (`torch_precision`: "fp32" eager, or "bf16"
/// under autocast) and prints its result and kiln's ratio to it.
fn compare_with_pytorch(
    preset: &str,
    warmup: usize,
    steps: usize,
    json: bool,
    kiln: &TrainBench,
    torch_precision: &str,
) -> Result<()> {
    let script = std::path::Path::new("bench/reference/bench_train.py");
    anyhow::ensure!(
        script.exists(),
        "{} not found: run from the repository root",
        script.display()
    );
    let threads = candle_core::utils::get_num_threads().to_string();
    let args: Vec<std::ffi::OsString> = [
        "--preset",
        preset,
        "--threads",
        &threads,
        "--json",
        "--seq-len",
        &kiln.seq_len.to_string(),
        "--batch-size",
        &kiln.batch_size.to_string(),
        "--warmup",
        &warmup.to_string(),
        "--steps",
        &steps.to_string(),
        "--precision",
        torch_precision,
    ]
    .iter()
    .map(Into::into)
    .collect();
    let torch = run_python_json(script, &args, "the PyTorch benchmark")?;
    let torch_tps = torch["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let torch_mfu = kiln_train::perf::mfu(kiln.flops_per_token * torch_tps, kiln.peak_flops);
    let ratio = kiln.tokens_per_s / torch_tps;
    if json {
        println!(
            "{}",
            serde_json::json!({"impl": "pytorch", "preset": preset, "precision": torch_precision, "tokens_per_s": torch_tps, "mfu": torch_mfu,
                "step_ms_median": torch["step_ms_median"], "torch": torch["torch"], "peak_rss_mb": torch["peak_rss_mb"],
                "kiln_over_pytorch": ratio})
        );
    } else {
        println!(
            "pytorch {} {}, same preset and threads: {torch_tps:.0} tokens/s, MFU {:.1}%, peak RSS {:.0} MiB\n  kiln ({}) / pytorch ({torch_precision}) = {ratio:.2}x",
            torch["torch"].as_str().unwrap_or("?"),
            match torch_precision {
                "bf16" => "autocast bf16",
                _ => "fp32 eager",
            },
            torch_mfu * 100.0,
            torch["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
            kiln.precision.name(),
        );
    }
    Ok(())
}

/// Runs a Python reference benchmark (`$PYTHON`, default `python3`) and returns the last line
/// of its stdout that is a JSON object; `what` names it in errors.
pub fn run_python_json(
    script: &std::path::Path,
    args: &[std::ffi::OsString],
    what: &str,
) -> Result<serde_json::Value> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("running {python} {}: {e}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rfind(|l| l.trim_start().starts_with('{'))
        .unwrap_or_default();
    serde_json::from_str(line)
        .map_err(|e| anyhow::anyhow!("unexpected output of {what} ({e}): {stdout}"))
}
