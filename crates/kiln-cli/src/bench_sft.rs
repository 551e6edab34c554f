//! `kiln bench sft`: times LoRA (or QLoRA-style, or full) fine-tuning steps of a real model on
//! real instruction data, and with `--pytorch` the same steps in PyTorch + PEFT
//! (bench/reference/bench_sft.py) on exactly the same token batches, side by side.
//!
//! The batches are the first rows kiln's SFT data builder makes of the data (chat template,
//! assistant-only targets, best-fit packing into rows of `--seq-len`); they are written to a
//! safetensors file that the PyTorch script reads, so both train on the same tokens and targets.
//! PyTorch gets the same tokens with a plain causal mask (transformers has no segment mask
//! without flash-attention; the cost of the forward is the same).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use kiln_chat::{read_records, ChatFormat};
use kiln_model::LoraSpec;
use kiln_sft::{batch_of, pack, Row};
use kiln_train::optim::AdamW;
use kiln_train::perf::{measure_gemm_peak, peak_rss_mib};
use kiln_train::{optimizer_step_batches, OptimConfig, Truncation};

use crate::commands::device;

#[derive(Args)]
pub struct BenchSftArgs {
    /// The model (a GGUF file for --pytorch and --base-quantized).
    #[arg(long)]
    pub model: PathBuf,
    /// Instruction records (JSON/JSONL: Alpaca, messages or ShareGPT).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// LoRA rank on all seven projections (0 = full fine-tuning).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Keep a GGUF base in its quantised blocks (QLoRA-style).
    #[arg(long)]
    pub base_quantized: bool,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Also run PyTorch + PEFT on the same batches and report the ratio.
    #[arg(long)]
    pub pytorch: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchSftArgs) -> Result<()> {
    ensure!(a.steps > 0, "--steps must be positive");
    let dev = device();
    // Rows exactly as `kiln sft` builds them.
    let tok = kiln_load::load_tokenizer(&a.model)?;
    let format = ChatFormat::new(tok, None)?;
    let records = read_records(std::slice::from_ref(&a.data), false)?;
    let need = (a.warmup + a.steps) * a.batch_size;
    let mut rows: Vec<Row> = Vec::new();
    for chunk in records.conversations.chunks(64) {
        let ex = chunk
            .iter()
            .map(|c| format.encode(c, false))
            .collect::<Result<Vec<_>, _>>()?;
        rows.extend(pack(&ex, a.seq_len, true, Truncation::KeepStart).rows);
        if rows.len() >= need {
            break;
        }
    }
    ensure!(
        rows.len() >= need,
        "{} makes only {} rows of {}; lower --steps or --batch-size",
        a.data.display(),
        rows.len(),
        a.seq_len
    );
    rows.truncate(need);
    let batches = rows
        .chunks(a.batch_size)
        .map(|c| batch_of(&c.iter().collect::<Vec<_>>(), a.seq_len, &dev))
        .collect::<Result<Vec<_>, _>>()?;

    // The model and what trains.
    let (_, cfg) = kiln_load::load_model_config(&a.model)?;
    let spec = (a.rank > 0).then(|| LoraSpec::all_projections(a.rank, 2.0 * a.rank as f64));
    let kiln_load::Trainable { model, params, .. } =
        kiln_load::build_trainable(&a.model, &cfg, spec.as_ref(), a.base_quantized, 0, &dev)?;
    let mut opt = AdamW::for_model(&model, &params, &OptimConfig::default())?;
    let peak = measure_gemm_peak(&dev)?;
    let mut times = Vec::new();
    for (i, mb) in batches.iter().enumerate() {
        let t0 = Instant::now();
        optimizer_step_batches(
            &model,
            &params,
            &mut opt,
            std::slice::from_ref(mb),
            1e-4,
            1.0,
            None,
        )?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = a.batch_size * a.seq_len; // padded rows: what both sides compute
    let tps = tokens as f64 / median;
    let full = cfg.train_flops_per_token(a.seq_len);
    let fpt = if a.rank == 0 {
        full
    } else {
        full - 2.0 * cfg.param_counts().1 as f64
    };
    let mode = match (a.rank, a.base_quantized) {
        (0, _) => "full".to_string(),
        (r, false) => format!("lora-r{r}"),
        (r, true) => format!("qlora-r{r}"),
    };
    let rss = peak_rss_mib();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"impl": "kiln", "mode": mode, "batch_size": a.batch_size, "seq_len": a.seq_len,
                "step_ms_median": median * 1e3, "tokens_per_s": tps, "mfu": fpt * tps / peak, "peak_rss_mb": rss,
                "threads": candle_core::utils::get_num_threads()})
        );
    } else {
        println!(
            "kiln bench sft {mode}: {} x {} tokens, median step {:.0} ms, {tps:.0} tokens/s, MFU {:.1}%, peak RSS {:.0} MiB",
            a.batch_size,
            a.seq_len,
            median * 1e3,
            100.0 * fpt * tps / peak,
            rss.unwrap_or(0.0)
        );
    }
    if a.pytorch {
        ensure!(a.rank > 0 && !a.base_quantized, "--pytorch compares LoRA on a dequantised base (PEFT's LoRA); drop --base-quantized and use --rank > 0");
        compare_with_peft(&a, &batches, tps, fpt, peak)?;
    }
    Ok(())
}

fn compare_with_peft(
    a: &BenchSftArgs,
    batches: &[(kiln_model::TokenBatch, Tensor)],
    kiln_tps: f64,
    fpt: f64,
    peak: f64,
) -> Result<()> {
    let script = std::path::Path::new("bench/reference/bench_sft.py");
    ensure!(
        script.exists(),
        "{} not found: run from the repository root",
        script.display()
    );
    // The same batches, for PyTorch: inputs and HF-style labels (shifted right by one: HF
    // predicts labels[j] from position j - 1).
    let mut map = HashMap::new();
    for (i, (b, targets)) in batches.iter().enumerate() {
        let (n, t) = b.tokens.dims2()?;
        let tg: Vec<i64> = targets.to_vec1()?;
        let mut labels = vec![-100i64; n * t];
        for r in 0..n {
            for j in 0..t - 1 {
                labels[r * t + j + 1] = tg[r * t + j];
            }
        }
        map.insert(format!("input_ids.{i}"), b.tokens.to_dtype(DType::I64)?);
        map.insert(
            format!("labels.{i}"),
            Tensor::from_vec(labels, (n, t), &candle_core::Device::Cpu)?,
        );
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("batches.safetensors");
    candle_core::safetensors::save(&map, &file)?;
    let args: Vec<std::ffi::OsString> = vec![
        "--gguf".into(),
        a.model.clone().into(),
        "--batches".into(),
        file.clone().into(),
        "--rank".into(),
        a.rank.to_string().into(),
        "--alpha".into(),
        (2 * a.rank).to_string().into(),
        "--warmup".into(),
        a.warmup.to_string().into(),
        "--threads".into(),
        candle_core::utils::get_num_threads().to_string().into(),
    ];
    let torch = crate::bench::run_python_json(script, &args, "the PyTorch + PEFT benchmark")?;
    let ttps = torch["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let ratio = kiln_tps / ttps;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"impl": "pytorch+peft", "tokens_per_s": ttps, "mfu": fpt * ttps / peak,
                "step_ms_median": torch["step_ms_median"], "peak_rss_mb": torch["peak_rss_mb"],
                "versions": torch["versions"], "kiln_over_pytorch": ratio})
        );
    } else {
        println!(
            "pytorch + peft ({}), same batches: {ttps:.0} tokens/s, MFU {:.1}%, peak RSS {:.0} MiB\n  kiln / pytorch = {ratio:.2}x",
            torch["versions"],
            100.0 * fpt * ttps / peak,
            torch["peak_rss_mb"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
