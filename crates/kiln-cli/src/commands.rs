//! The verbs of the `kiln` binary.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use kiln_data::{
    prepare_dataset, train_bpe, BpeTrainOptions, Dataset, KilnTokenizer, PrepareOptions,
};
use kiln_infer::{generate as generate_text, generate_batch, GenerateOptions, Sampler};
use kiln_load::{InferenceModel, LoadedWeights, Weights};
use kiln_model::{Llama, ModelConfig};
use kiln_train::{evaluate_loss, Observer, RunConfig, Silent, Trainer};
use tracing::{info, warn};

use crate::progress::Console;
use crate::{
    DataCommand, EvalArgs, GenerateArgs, InfoArgs, PlotArgs, PretrainArgs, TokenizerCommand,
};

pub fn device() -> Device {
    CHOSEN_DEVICE.get().cloned().unwrap_or_else(auto_device)
}

/// The process's one device handle, chosen by `--device` before any command runs.
static CHOSEN_DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// `--device auto`: one GPU per rank in a CUDA build (the launcher's local rank picks it), the
/// CPU otherwise; a CUDA build that cannot open its GPU says so before using the CPU.
fn auto_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        let local_rank = ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        match Device::new_cuda(local_rank) {
            Ok(d) => return d,
            Err(e) => tracing::warn!(
                "--device auto: GPU {local_rank} does not open ({e}); running on the CPU \
                 (--device cpu says so explicitly, --device cuda:{local_rank} makes this an error)"
            ),
        }
    }
    Device::Cpu
}

/// Parses and opens `--device` (auto, cpu, cuda, cuda:N) once for the whole process. Asking
/// for a GPU the build or machine lacks is an error naming what is missing.
pub fn set_device(spec: &str) -> Result<()> {
    let spec = spec.trim().to_ascii_lowercase();
    let device = match spec.as_str() {
        "auto" => auto_device(),
        "cpu" => Device::Cpu,
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!(
                        "--device {s}: the GPU index must be a number (cuda:0, cuda:1, ...)"
                    )
                })?,
            };
            open_cuda(index)?
        }
        other => bail!("unknown --device {other:?}: use auto, cpu, cuda or cuda:N"),
    };
    let _ = CHOSEN_DEVICE.set(device);
    Ok(())
}

#[cfg(feature = "cuda")]
fn open_cuda(index: usize) -> Result<Device> {
    Device::new_cuda(index).with_context(|| {
        format!(
            "--device cuda:{index}: this machine's GPU {index} does not open (use --device cpu)"
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(index: usize) -> Result<Device> {
    bail!(
        "--device cuda:{index}: this kiln was built without CUDA; build it with \
         `cargo build --release --features cuda` (docs/distributed.md, \"GPUs\"), or use --device cpu"
    )
}

/// A fine-tuning run's directory: `--out`, else the last `train.run_dir=` of the overrides,
/// else `[train] run_dir` of the config file, else `default`.
pub fn run_dir_of(
    out: Option<&Path>,
    overrides: &[String],
    config: Option<&Path>,
    default: &str,
) -> std::path::PathBuf {
    use std::path::PathBuf;
    out.map(Path::to_path_buf)
        .or_else(|| {
            overrides
                .iter()
                .rev()
                .find_map(|o| o.strip_prefix("train.run_dir="))
                .map(|v| PathBuf::from(v.trim_matches('"')))
        })
        .or_else(|| {
            let text = std::fs::read_to_string(config?).ok()?;
            let t: toml::Table = text.parse().ok()?;
            Some(PathBuf::from(t.get("train")?.get("run_dir")?.as_str()?))
        })
        .unwrap_or_else(|| PathBuf::from(default))
}

/// A new run may start in `run_dir` only when it holds no run yet (no `metrics.jsonl`, no
/// checkpoint): starting over there would mix old rows and checkpoints with new ones. With
/// `--resume` the run continues; with `--overwrite` its history is removed first. Under a
/// launcher only rank 0 checks and removes (the others write nothing there).
pub fn claim_run_dir(run_dir: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if resume || (crate::dist::launched_as_rank() && crate::dist::rank() != 0) {
        return Ok(());
    }
    let metrics = run_dir.join("metrics.jsonl");
    let checkpoints = run_dir.join("checkpoints");
    let rows = std::fs::read_to_string(&metrics)
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0);
    let saved = std::fs::read_dir(&checkpoints)
        .map(|d| d.count())
        .unwrap_or(0);
    if rows == 0 && saved == 0 {
        return Ok(());
    }
    if overwrite {
        warn!(
            "--overwrite: removing {} ({rows} rows) and {} ({saved} checkpoints)",
            metrics.display(),
            checkpoints.display()
        );
        if metrics.exists() {
            std::fs::remove_file(&metrics)
                .with_context(|| format!("removing {}", metrics.display()))?;
        }
        if checkpoints.exists() {
            std::fs::remove_dir_all(&checkpoints)
                .with_context(|| format!("removing {}", checkpoints.display()))?;
        }
        return Ok(());
    }
    anyhow::bail!(
        "{} already holds a run ({rows} metric rows, {saved} checkpoints): continue it with \
         --resume, start over with --overwrite (removes its metrics.jsonl and checkpoints/), \
         or choose another run directory",
        run_dir.display()
    )
}

/// A run stopped by Ctrl-C after saving its checkpoint: `main` exits 130, as a shell expects
/// of an interrupted command, so `kiln sft ... && kiln lora merge ...` goes no further.
#[derive(Debug)]
pub struct Interrupted {
    /// How to continue the run.
    pub resume: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted; the checkpoint is saved (continue with: {})",
            self.resume
        )
    }
}

impl std::error::Error for Interrupted {}

/// Err([`Interrupted`]) when the run stopped on Ctrl-C, after its last messages are out.
pub fn finish_run(stopped_early: bool, resume: impl Into<String>) -> Result<()> {
    if stopped_early {
        return Err(Interrupted {
            resume: resume.into(),
        }
        .into());
    }
    Ok(())
}

/// Ctrl-C sets the returned flag: the training loop finishes its step, saves a checkpoint and
/// returns (the command then exits 130, see [`Interrupted`]); a second Ctrl-C aborts at once.
pub fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// Says which arithmetic a run's products use: bf16 mixed precision when asked and the CPU
/// has AVX512-BF16, and a warning when asked on a CPU without it (the run computes in f32).
pub fn log_precision(requested: kiln_model::Precision) {
    use kiln_model::Precision;
    match (requested, requested.effective()) {
        (Precision::Bf16, Precision::Bf16) => info!(
            "train.precision = \"bf16\": matrix products with bf16 inputs and f32 sums \
             (AVX512-BF16); weights, gradients and AdamW in f32"
        ),
        (Precision::Bf16, _) => tracing::warn!(
            "train.precision = \"bf16\" needs the avx512 kernels on a CPU with AVX512-BF16; \
             this run uses the {} kernels (CPU: {}), so the products compute in f32, at the \
             speed of kiln's f32 path",
            kiln_kernels::active_isa().name(),
            kiln_kernels::cpu_features().join(" ")
        ),
        _ => {}
    }
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let mut overrides = a.overrides.clone();
    if let Some(p) = &a.init_from {
        overrides.push(format!("train.init_from=\"{}\"", p.display()));
    }
    let cfg = RunConfig::load(&a.config, &overrides)?;
    let run_dir = cfg.run_dir(Some(&a.config));
    claim_run_dir(&run_dir, a.resume, a.overwrite)?;
    // Under mpirun each process is one rank; rank 0 alone draws progress and logs.
    let group = crate::dist::join(&cfg.dist)?;
    let main = group.as_ref().is_none_or(|g| g.is_main());
    let mut console = Console::new();
    let mut silent = Silent;
    let obs: &mut dyn Observer = if main { &mut console } else { &mut silent };
    let mut trainer = Trainer::new_with(cfg, &run_dir, a.resume, &device(), obs, group)?;
    if main {
        log_precision(trainer.cfg.train.precision);
    }
    if let (true, Some(m)) = (main, trainer.fsdp_memory()) {
        info!(
            "fsdp: parameters + gradients + optimizer state per rank {} bytes (shards {} + \
             unsharded working buffers {}) = {:.3}x one process's {} bytes",
            m.total_bytes(),
            m.sharded_bytes,
            m.scratch_bytes,
            m.ratio(),
            m.single_process_bytes
        );
    }

    let stop = stop_on_ctrl_c()?;
    let summary = trainer.run(obs, &stop)?;
    drop(trainer);
    crate::dist::leave();
    if !main {
        return Ok(());
    }
    console.finish();
    if summary.final_loss.is_none() && !summary.stopped_early {
        info!(
            "nothing to train: {} is already at step {} of train.steps = {}; raise it to go on (--set train.steps=N --resume)",
            run_dir.display(),
            summary.steps,
            summary.steps
        );
        return Ok(());
    }
    info!(
        steps = summary.steps,
        tokens = summary.tokens,
        final_loss = summary
            .final_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_default(),
        final_val_loss = summary
            .final_val_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_default(),
        wall_s = format!("{:.1}", summary.wall_s),
        "done"
    );
    info!("loss curve: {}", run_dir.join("loss.png").display());
    finish_run(
        summary.stopped_early,
        format!("kiln pretrain --config {} --resume", a.config.display()),
    )
}

/// Loads a model and its tokenizer from a run, checkpoint, weights file, HF directory or GGUF
/// file (dequantised: this is the model training and evaluation use).
pub fn load_model(path: &Path) -> Result<(LoadedWeights, Llama, KilnTokenizer)> {
    let tok = kiln_load::load_tokenizer(path)?;
    let w = kiln_load::load_weights(path, &device())?;
    kiln_load::check_vocab(&tok, &w.config)?;
    let model = Llama::new(&w.config, &w.params)?;
    Ok((w, model, tok.tokenizer))
}

/// The weights `--dequantize` / `--quantize TYPE` ask for: a GGUF as stored (quantised) and
/// other formats dense f32 unless told otherwise.
pub fn weights_choice(dequantize: bool, quantize: Option<&str>) -> Result<Weights> {
    match quantize {
        None => Ok(Weights::native_or_dense(dequantize)),
        Some(name) => match kiln_model::gguf::parse_dtype(name) {
            Some(d) => Ok(Weights::Quantized(d)),
            None => anyhow::bail!(
                "--quantize {name:?}: not a GGML type kiln quantises to (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, f16, bf16)"
            ),
        },
    }
}

/// Loads a model for generation and chat with the given weights (see [`weights_choice`]).
pub fn load_for_inference(
    path: &Path,
    weights: Weights,
    adapter: Option<kiln_load::AdapterChoice>,
) -> Result<InferenceModel> {
    let t0 = std::time::Instant::now();
    let m = crate::GLOBAL.without_caching(|| {
        kiln_load::load_inference_with_adapter(path, weights, adapter, &device())
    })?;
    info!(
        format = m.format.name(),
        params = m.config.param_counts().0,
        weights = m.weights,
        context = m.config.max_seq_len,
        secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
        "loaded {}",
        path.display()
    );
    for w in &m.warnings {
        warn!("{w}");
    }
    Ok(m)
}

/// Applies an adapter unmerged to `model` (loaded from `path`), refusing one kiln trained on
/// another base unless forced (then warning).
pub fn attach_adapter(
    model: &mut kiln_model::Llama,
    path: &Path,
    choice: kiln_load::AdapterChoice,
) -> Result<()> {
    let adapter = kiln_load::load_adapter(choice.dir, model.config(), &device())?;
    if let Some(w) = adapter.check_base(path, &model.norm_fingerprint()?, choice.force)? {
        warn!("{w}");
    }
    model.attach_lora(&adapter.params, &adapter.spec)?;
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if !a.task.is_empty() || !a.task_file.is_empty() {
        return crate::evaluate::run(a);
    }
    let (loaded, mut model, _) = load_model(&a.model)?;
    if let Some(choice) = a.adapter.choice() {
        attach_adapter(&mut model, &a.model, choice)?;
    }
    let run = loaded.run.as_ref();
    let data_dir = match (&a.data, run.and_then(|r| r.dataset.as_ref())) {
        (Some(d), _) => d.clone(),
        (None, Some(dataset)) => dataset.clone(),
        (None, None) => bail!("--data is required: {} names no dataset", a.model.display()),
    };
    let data = Dataset::open(&data_dir)?;
    if data.meta.vocab_size > loaded.config.vocab_size {
        bail!(
            "tokenizer/model vocab mismatch: dataset {} has {} tokens, the model {}",
            data_dir.display(),
            data.meta.vocab_size,
            loaded.config.vocab_size
        );
    }
    let shard = match a.split.as_str() {
        "val" => &data.val,
        "train" => &data.train,
        other => bail!("--split must be val or train, got {other:?}"),
    };
    let seq_len = a.seq_len.unwrap_or(loaded.config.max_seq_len);
    let n = kiln_data::eval_batch_count(shard.len(), a.batch_size, seq_len, a.batches);
    if n == 0 {
        bail!(
            "the {} split ({} tokens) is shorter than one batch of {} x {}",
            a.split,
            shard.len(),
            a.batch_size,
            seq_len + 1
        );
    }
    let batches = kiln_data::eval_batches(shard, a.batch_size, seq_len, a.batches);
    if model.config().attention == kiln_model::AttentionMode::Bidirectional {
        // An MLM encoder: loss and accuracy over the masked tokens (fixed validation masking).
        let opts = match run {
            Some(r) => RunConfig::load(&r.config_file, &[])?.mlm_options(),
            None => Default::default(),
        };
        let tok = KilnTokenizer::load(data_dir.join("tokenizer.json"))?;
        let masker = kiln_data::MlmMasker::new(&tok, opts)?;
        let r = kiln_train::evaluate_mlm(&model, &masker, batches)?;
        let acc = r.accuracy.unwrap_or(f64::NAN);
        if a.json {
            println!(
                "{}",
                serde_json::json!({"objective": "mlm", "loss": r.loss, "accuracy": acc, "split": a.split})
            );
        } else {
            println!(
                "masked-token loss {:.4}  accuracy {acc:.4}  (the {} split)",
                r.loss, a.split
            );
        }
        return Ok(());
    }
    let loss = evaluate_loss(&model, batches)?;
    let tokens = n * a.batch_size * seq_len;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens, "split": a.split})
        );
    } else {
        println!(
            "loss {loss:.4}  perplexity {:.2}  ({tokens} tokens of the {} split)",
            loss.exp(),
            a.split
        );
    }
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    // A bad prompt file is reported before the model is loaded.
    let prompt_file = match &a.prompt_file {
        Some(file) => Some((file, read_prompt_file(file)?)),
        None => None,
    };
    let m = load_for_inference(
        &a.model,
        weights_choice(a.dequantize, a.quantize.as_deref())?,
        a.adapter.choice(),
    )?;
    let (model, tokenizer) = (m.model.as_ref(), &m.tokenizer.tokenizer);
    let s = &a.sampling;
    let mut sampler = Sampler::new(s.params(&m.generation))?;
    let opts = GenerateOptions {
        max_new_tokens: s.max_new_tokens,
        stop_strings: s.stop.clone(),
        stop_tokens: m.tokenizer.stop_ids.clone(),
        truncate_prompt: s.truncate_prompt,
    };
    if let Some((file, text)) = prompt_file {
        return generate_file(&m, file, &text, s, &opts);
    }
    let prompt = m.tokenizer.encode_prompt(&a.prompt)?;
    // stdout is the continuation, byte for byte; a terminal gets its line break on stderr.
    let mut stdout = std::io::stdout().lock();
    let out = generate_text(model, tokenizer, &prompt, &mut sampler, &opts, |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    if stdout.is_terminal() {
        eprintln!();
    }
    let n = out.token_ids.len();
    info!(
        prompt_tokens = out.prompt_tokens,
        new_tokens = n,
        finish = ?out.finish_reason,
        prefill_s = format!("{:.2}", out.prefill_s),
        prefill_tok_per_s = rate(out.prompt_tokens as f64 / out.prefill_s.max(1e-9)),
        decode_tok_per_s = rate(n as f64 / out.decode_s.max(1e-9)),
        peak_rss_mib = peak_rss(),
        "generated"
    );
    Ok(())
}

/// The process's peak resident memory so far in MiB, for the summary line ("?" where the OS
/// does not say).
fn peak_rss() -> String {
    kiln_train::perf::peak_rss_mib().map_or("?".into(), |m| format!("{m:.0}"))
}

/// Tokens per second with three significant figures (a 7B decodes at about 1 token/s).
fn rate(per_s: f64) -> String {
    match per_s {
        r if r < 10.0 => format!("{r:.2}"),
        r if r < 100.0 => format!("{r:.1}"),
        r => format!("{r:.0}"),
    }
}

/// The text of a prompt file: readable UTF-8 with at least one line.
fn read_prompt_file(file: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    if text.lines().next().is_none() {
        bail!("{}: no prompts (one prompt per line)", file.display());
    }
    Ok(text)
}

/// `generate --prompt-file`: every line a prompt, all decoded as one batch, JSONL out.
fn generate_file(
    m: &InferenceModel,
    file: &Path,
    text: &str,
    s: &crate::SamplingArgs,
    opts: &GenerateOptions,
) -> Result<()> {
    let lines: Vec<&str> = text.lines().collect();
    let prompts = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            m.tokenizer.encode_prompt(l).with_context(|| {
                format!("{}:{}: cannot tokenize the prompt", file.display(), i + 1)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Each row samples with its own sampler, seeded like a single run, so a prompt's output
    // does not depend on its neighbours.
    let mut samplers = (0..prompts.len())
        .map(|_| Sampler::new(s.params(&m.generation)))
        .collect::<Result<Vec<_>, _>>()?;
    let t0 = std::time::Instant::now();
    let outs = generate_batch(
        m.model.as_ref(),
        &m.tokenizer.tokenizer,
        &prompts,
        &mut samplers,
        opts,
    )
    .with_context(|| format!("generating for the prompts of {}", file.display()))?;
    let mut stdout = std::io::stdout().lock();
    for (line, out) in lines.iter().zip(&outs) {
        let row = serde_json::json!({
            "prompt": line,
            "text": out.text,
            "tokens": out.token_ids,
            "logprobs": out.logprobs,
            "finish_reason": out.finish_reason.openai_name(),
        });
        writeln!(stdout, "{row}")?;
    }
    let new_tokens: usize = outs.iter().map(|o| o.token_ids.len()).sum();
    info!(
        prompts = outs.len(),
        new_tokens,
        tok_per_s = format!(
            "{:.0}",
            new_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)
        ),
        peak_rss_mib = peak_rss(),
        "generated"
    );
    Ok(())
}

pub fn tokenizer(c: TokenizerCommand) -> Result<()> {
    match c {
        TokenizerCommand::Train {
            inputs,
            vocab_size,
            special,
            mlm,
            min_frequency,
            out,
        } => {
            let files = kiln_data::expand_sources(&inputs)?;
            let mut opts = BpeTrainOptions {
                vocab_size,
                min_frequency,
                ..Default::default()
            };
            if !special.is_empty() {
                opts.special_tokens = special;
            }
            if mlm {
                kiln_data::add_mlm_special_tokens(&mut opts.special_tokens);
            }
            let t0 = std::time::Instant::now();
            let tok = train_bpe(&files, &opts)?;
            tok.save(&out)?;
            info!(
                files = files.len(),
                vocab_size = tok.vocab_size(),
                secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
                out = %out.display(),
                "tokenizer trained"
            );
        }
    }
    Ok(())
}

pub fn data(c: DataCommand) -> Result<()> {
    match c {
        DataCommand::Prepare {
            inputs,
            tokenizer,
            out,
            val_fraction,
            seed,
        } => {
            // A tokenizer.json, or the tokenizer of a model (HF directory, GGUF file, run).
            let tok = kiln_load::load_tokenizer(&tokenizer)?.tokenizer;
            let opts = PrepareOptions {
                val_fraction,
                seed,
                ..Default::default()
            };
            let meta = prepare_dataset(&inputs, &tok, &out, &opts)?;
            info!(
                train_tokens = meta.n_train_tokens,
                val_tokens = meta.n_val_tokens,
                documents = meta.n_documents,
                dtype = meta.dtype.name(),
                out = %out.display(),
                "dataset prepared"
            );
        }
    }
    Ok(())
}

pub fn plot(a: PlotArgs) -> Result<()> {
    let runs: Vec<(String, &Path)> = a
        .runs
        .iter()
        .map(|p| {
            (
                p.file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                p.as_path(),
            )
        })
        .collect();
    kiln_train::plot::plot_runs(&runs, &a.out)?;
    info!(out = %a.out.display(), "plot written");
    Ok(())
}

pub fn info(a: InfoArgs) -> Result<()> {
    let (cfg, seq_len): (ModelConfig, usize) = match (&a.config, &a.preset) {
        (Some(path), _) => {
            let run = RunConfig::load(path, &[])?;
            let t = run.train.seq_len;
            (run.model, t)
        }
        (None, Some(name)) => (ModelConfig::preset(name)?, a.seq_len),
        (None, None) => bail!("give --config or --preset"),
    };
    let (total, non_emb) = cfg.param_counts();
    println!(
        "{}",
        serde_json::json!({
            "params": total,
            "non_embedding_params": non_emb,
            "matmul_params": cfg.matmul_params(),
            "seq_len": seq_len,
            "train_flops_per_token": cfg.train_flops_per_token(seq_len),
            "convention": "PaLM: 6*N_matmul + 12*L*d*T",
            "model": cfg.resolved(),
        })
    );
    Ok(())
}
