//! `kiln`: pretrain, instruction-tune, evaluate, sample from and benchmark LLaMA-style models.
//!
//! Only this binary parses argv, installs the tracing subscriber and draws progress bars;
//! the libraries report through `kiln_train::Observer`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

mod alloc;
mod bench;
mod bench_eval;
mod bench_generate;
mod bench_pref;
mod bench_quant;
mod bench_sft;
mod chat;
mod commands;
mod dist;
mod embed;
mod evaluate;
mod export;
mod fill_mask;
mod progress;
mod rlhf;
mod scaling;
mod serve;
mod sft;
mod tokenize;

// A non-churning allocator: candle allocates a fresh buffer per op, and freeing large ones to
// the OS makes every step page-fault its working set back in (see alloc.rs, docs/benchmarks.md).
#[global_allocator]
static GLOBAL: alloc::CachingAlloc = alloc::CachingAlloc::new();

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Pretrain, evaluate and sample from LLaMA-style models"
)]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Kernel instruction set: auto (the best this CPU runs), avx512, avx2, neon or scalar.
    /// Forcing one compares paths on one machine (quantised matmuls and attention; dense
    /// matmuls are candle's and pick their own).
    #[arg(long, global = true, default_value = "auto")]
    isa: String,
    /// Device: auto (the launcher's GPU in a CUDA build, else the CPU), cpu, cuda or cuda:N.
    /// A device this build or machine lacks is an error, never a silent fallback.
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// Activations of quantised matmuls: f32 (exact: the dequantised model's numbers) or q8
    /// (rounded to 8 bits per 32 values and multiplied with integer dot products, as llama.cpp
    /// does: faster decoding on CPUs without AVX-512, at the accuracy `kiln bench
    /// quant-accuracy` reports).
    #[arg(long, global = true, value_enum, default_value_t = Activations::F32)]
    activations: Activations,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Activations {
    F32,
    Q8,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain a causal LM from a run config (TOML).
    Pretrain(PretrainArgs),
    /// Instruction-tune a model on chat records: full fine-tuning, LoRA or QLoRA-style LoRA
    /// on a quantised GGUF base; assistant-only loss, packing, PEFT adapters.
    Sft(sft::SftArgs),
    /// LoRA adapters: merge one into its base model.
    #[command(subcommand)]
    Lora(sft::LoraCommand),
    /// Reward models: train one on preference pairs, or score a response.
    #[command(subcommand)]
    Reward(rlhf::RewardCommand),
    /// Direct preference optimisation on preference pairs (sigmoid, IPO or hinge loss).
    Dpo(rlhf::DpoArgs),
    /// PPO against a reward model, a built-in reward or a reward program, with a KL penalty
    /// to the frozen starting model.
    Ppo(rlhf::OnlineArgs),
    /// GRPO: group-relative advantages over G samples per prompt, no value model.
    Grpo(rlhf::OnlineArgs),
    /// Loss and perplexity of a model on a prepared dataset.
    Eval(EvalArgs),
    /// Sample a continuation of a prompt (streams to stdout).
    Generate(GenerateArgs),
    /// Interactive chat with a model's own chat template (or one user turn per stdin line).
    Chat(chat::ChatArgs),
    /// Serve a model over the OpenAI HTTP API (chat, completions, streaming) with
    /// continuous batching, and a chat page at /.
    Serve(serve::ServeArgs),
    /// Token ids of a text as a JSON array (or --decode ids), from a model's tokenizer only.
    Tokenize(tokenize::TokenizeArgs),
    /// Write a model as an HF directory (transformers) or a GGUF file (llama.cpp).
    Export(export::ExportArgs),
    /// Top-k candidates with probabilities for each [MASK] in a text (MLM encoders).
    FillMask(fill_mask::FillMaskArgs),
    /// Normalised sentence embeddings from a sentence-transformers model (EmbeddingGemma).
    Embed(embed::EmbedArgs),
    /// Train or inspect tokenizers.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Prepare token shards.
    #[command(subcommand)]
    Data(DataCommand),
    /// Overlay the loss curves of runs in one PNG.
    Plot(PlotArgs),
    /// Benchmarks (tokens/s, MFU, memory).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Parameter counts and training FLOPs per token of a config or preset.
    Info(InfoArgs),
    /// Scaling laws: FLOP conventions, compute-optimal plans, IsoFLOP sweeps, fits, plots.
    #[command(subcommand)]
    Scaling(scaling::ScalingCommand),
}

#[derive(Args)]
pub struct PretrainArgs {
    /// Run config (TOML), e.g. configs/tiny.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key: --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start over in a run directory that already holds a run: its metrics.jsonl and
    /// checkpoints/ are removed first (without this, or --resume, kiln refuses).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Start from existing weights: a kiln run/checkpoint, an HF directory or a GGUF file
    /// (same as train.init_from).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
}

/// `--adapter DIR [--force]` for the commands that run a model with an adapter unmerged.
#[derive(Args)]
pub struct AdapterArgs {
    /// Apply a PEFT LoRA adapter directory without merging it.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Apply the adapter even to a base other than the one kiln trained it on (same shapes,
    /// different norm weights: usually the wrong base, e.g. the instruct model for the base).
    #[arg(long, requires = "adapter")]
    pub force: bool,
}

impl AdapterArgs {
    pub fn choice(&self) -> Option<kiln_load::AdapterChoice<'_>> {
        self.adapter.as_deref().map(|dir| kiln_load::AdapterChoice {
            dir,
            force: self.force,
        })
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// A run directory, checkpoint directory, model.safetensors, HF model directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// A prepared dataset directory (default: the run's own dataset).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Which split to evaluate.
    #[arg(long, default_value = "val")]
    pub split: String,
    #[arg(long, default_value_t = 50)]
    pub batches: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Window length (default: the model's context).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Benchmark mode: score these tasks (comma-separated) as lm-evaluation-harness does:
    /// hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada, mmlu.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["data", "split"])]
    pub task: Vec<String>,
    /// Benchmark mode on a request file (gzip or plain): OLMo's requests.jsonl format, or JSONL
    /// `{context, choices, gold}` with each choice scored exactly as written.
    #[arg(long, conflicts_with_all = ["data", "split"])]
    pub task_file: Vec<PathBuf>,
    /// Score the first N documents of each task by ascending doc_id (MMLU: of each subject).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Few-shot examples in each context: 0 or 5 (MMLU takes its shots from its dev split).
    #[arg(long, default_value_t = 0)]
    pub num_fewshot: usize,
    /// Where scripts/fetch-eval-data.sh unpacked the benchmark data.
    #[arg(long, default_value = ".cache/eval")]
    pub eval_data: PathBuf,
    /// Write every document's scores to this JSONL file (`task`, `doc_id`, `gold`, `logprobs`,
    /// `n_tokens`, `greedy`, `pred`, `pred_norm`, `acc`), like lm-evaluation-harness's
    /// --log_samples.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Benchmark mode: score a GGUF model on dequantised f32 weights instead of its quantised
    /// ones (the same values, at four to eight times the memory).
    #[arg(long)]
    pub dequantize: bool,
    /// Quantise the weights while loading (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k,
    /// f16, ...): an HF checkpoint or GGUF is read and quantised one tensor at a time, so peak
    /// memory is the quantised model plus one tensor.
    #[arg(long, conflicts_with = "dequantize")]
    pub quantize: Option<String>,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy [default: the model's generation_config, else 0.7].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Keep the k most likely tokens, 0 = off [default: the model's, else 0].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set reaching this probability [default: the
    /// model's, else 0.9].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep tokens at least this fraction as likely as the most likely one, 0 = off
    /// [default: the model's, else 0].
    #[arg(long)]
    pub min_p: Option<f64>,
    /// transformers' repetition penalty over prompt and output tokens, 1 = off [default: the
    /// model's, else 1].
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// OpenAI's presence penalty over output tokens, -2 to 2 (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f64,
    /// OpenAI's frequency penalty over output tokens, -2 to 2 (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f64,
    /// Seed of the sampler: the same seed, prompt and settings give the same text. Without
    /// one every run samples differently.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this string appears (repeatable); it is not printed.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep the last tokens of a prompt longer than the context instead of failing.
    #[arg(long)]
    pub truncate_prompt: bool,
}

impl SamplingArgs {
    /// The sampler settings: each flag given, else the model's `generation_config.json`,
    /// else kiln's default (temperature 0.7, top-p 0.9, as transformers users write).
    pub fn params(&self, model: &kiln_load::GenerationDefaults) -> kiln_infer::SamplingParams {
        let d = kiln_infer::SamplingParams::default();
        kiln_infer::SamplingParams {
            temperature: self
                .temperature
                .or(model.temperature)
                .unwrap_or(d.temperature),
            top_k: self.top_k.or(model.top_k).unwrap_or(d.top_k),
            top_p: self.top_p.or(model.top_p).unwrap_or(d.top_p),
            min_p: self.min_p.or(model.min_p).unwrap_or(d.min_p),
            repetition_penalty: self
                .repetition_penalty
                .or(model.repetition_penalty)
                .unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed.unwrap_or_else(kiln_infer::fresh_seed),
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A run directory, checkpoint directory, model.safetensors, HF model directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Run on f32 copies of the weights: a GGUF dequantised, an HF checkpoint converted (by
    /// default both are used as stored).
    #[arg(long)]
    pub dequantize: bool,
    /// Quantise the weights while loading (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k,
    /// f16, ...): an HF checkpoint or GGUF is read and quantised one tensor at a time, so peak
    /// memory is the quantised model plus one tensor.
    #[arg(long, conflicts_with = "dequantize")]
    pub quantize: Option<String>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    #[arg(long, default_value = "", conflicts_with = "prompt_file")]
    pub prompt: String,
    /// Decode every line of FILE (one prompt per line) as one batch; stdout is JSONL, one
    /// object per prompt in file order: prompt, text, tokens, logprobs, finish_reason.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on text/JSONL files or folders.
    Train {
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Special tokens (default: <|endoftext|>).
        #[arg(long = "special")]
        special: Vec<String>,
        /// For masked language modelling: also add [MASK], [CLS], [SEP] and [PAD].
        #[arg(long)]
        mlm: bool,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize text/JSONL into train.bin / val.bin shards.
    Prepare {
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0.05)]
        val_fraction: f64,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
    },
}

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (each with metrics.jsonl).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    #[arg(long, default_value = "loss.png")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
}

fn set_isa(name: &str) -> Result<()> {
    let isa = kiln_kernels::Isa::parse(name)?;
    kiln_kernels::set_isa(isa)?;
    if isa.is_some() {
        tracing::info!(
            "kernels: {} (forced; this CPU runs up to {})",
            kiln_kernels::active_isa().name(),
            kiln_kernels::Isa::detected().name()
        );
    }
    Ok(())
}

fn set_threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        anyhow::ensure!(n > 0, "--threads must be positive");
        // candle reads RAYON_NUM_THREADS for its GEMM; rayon's global pool serves our kernels.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    Ok(())
}

/// Under `mpirun` (or `srun`) every process is one rank; only `kiln pretrain` and `kiln sft`
/// split their work over the ranks. Any other command would run the whole job once per rank,
/// logging everything twice and writing the same run directory at once, so it refuses to start,
/// naming itself.
fn refuse_single_process_commands_under_a_launcher(command: &Command) -> Result<()> {
    if !dist::launched_as_rank() {
        return Ok(());
    }
    let name = match command {
        Command::Pretrain(_) | Command::Sft(_) => return Ok(()),
        Command::Lora(_) => "lora",
        Command::Reward(_) => "reward",
        Command::Dpo(_) => "dpo",
        Command::Ppo(_) => "ppo",
        Command::Grpo(_) => "grpo",
        Command::Eval(_) => "eval",
        Command::Generate(_) => "generate",
        Command::Chat(_) => "chat",
        Command::Serve(_) => "serve",
        Command::Tokenize(_) => "tokenize",
        Command::Export(_) => "export",
        Command::FillMask(_) => "fill-mask",
        Command::Embed(_) => "embed",
        Command::Tokenizer(_) => "tokenizer",
        Command::Data(_) => "data",
        Command::Plot(_) => "plot",
        Command::Bench(_) => "bench",
        Command::Info(_) => "info",
        Command::Scaling(_) => "scaling",
    };
    anyhow::bail!(
        "kiln {name} runs in one process: started by a launcher (mpirun, srun) as one of several \
         ranks, every rank would run the whole job and write the same files. Run it without the \
         launcher; distributed training is kiln pretrain and kiln sft (dist.strategy)"
    )
}

fn main() {
    // candle's element-wise ops run on a spin-waiting thread pool of their own, next to rayon's
    // (which our kernels and candle's GEMM use). On 2 cores the spinning costs more than the
    // parallelism gains (docs/benchmarks.md), so keep those ops on the calling thread unless
    // the user asks otherwise. Set before any candle op creates the pool.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // A kernel choice for comparisons (the libraries read no environment; the binary passes
    // it in): KILN_QMATMUL=candle sends quantised matmuls through candle (8-bit activations).
    kiln_model::set_candle_qmatmul(std::env::var("KILN_QMATMUL").as_deref() == Ok("candle"));
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = set_threads(cli.threads)
        .and_then(|_| set_isa(&cli.isa))
        .map(|_| {
            let q8 = cli.activations == Activations::Q8;
            kiln_kernels::set_q8_activations(q8);
            if q8 {
                tracing::info!("quantised matmuls: 8-bit activations (--activations q8)");
            }
        })
        .and_then(|_| commands::set_device(&cli.device))
        .and_then(|_| refuse_single_process_commands_under_a_launcher(&cli.command))
        .and_then(|_| match cli.command {
            Command::Pretrain(a) => commands::pretrain(a),
            Command::Sft(a) => sft::run(a),
            Command::Lora(c) => sft::lora(c),
            Command::Reward(c) => rlhf::reward(c),
            Command::Dpo(a) => rlhf::dpo(a),
            Command::Ppo(a) => rlhf::online(kiln_rlhf::Method::Ppo, a),
            Command::Grpo(a) => rlhf::online(kiln_rlhf::Method::Grpo, a),
            Command::Eval(a) => commands::eval(a),
            Command::Generate(a) => commands::generate(a),
            Command::Chat(a) => chat::run(a),
            Command::Serve(a) => serve::run(a),
            Command::Tokenize(a) => tokenize::run(a),
            Command::Export(a) => export::run(a),
            Command::FillMask(a) => fill_mask::run(a),
            Command::Embed(a) => embed::run(a),
            Command::Tokenizer(c) => commands::tokenizer(c),
            Command::Data(c) => commands::data(c),
            Command::Plot(a) => commands::plot(a),
            Command::Bench(c) => bench::run(c),
            Command::Info(a) => commands::info(a),
            Command::Scaling(c) => scaling::run(c),
        });
    if let Err(e) = result {
        if let Some(i) = e.downcast_ref::<commands::Interrupted>() {
            eprintln!("{i}");
            std::process::exit(130);
        }
        if dist::launched_as_rank() {
            eprintln!("error (rank {}): {e:#}", dist::rank());
            dist::abort_job(1); // the other ranks must not wait for this one
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(1);
    }
}
