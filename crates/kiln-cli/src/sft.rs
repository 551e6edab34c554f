//! `kiln sft`: instruction tuning (full, LoRA, QLoRA-style) and `kiln lora merge`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use kiln_sft::{SftInfo, SftObserver, SftSource, SftTrainer};
use kiln_train::Observer;
use tracing::info;

use crate::commands::stop_on_ctrl_c;
use crate::progress::Console;

#[derive(Args)]
pub struct SftArgs {
    /// The model to fine-tune: a GGUF file, an HF directory or a kiln run/checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Training records: JSON or JSONL in Alpaca, messages, ShareGPT or TRL prompt-completion format, tool-calling conversations included (repeatable).
    #[arg(long = "data", required = true)]
    pub data: Vec<PathBuf>,
    /// Held-out records for the evaluation loss (default: sft.val_fraction of --data).
    #[arg(long = "eval-data")]
    pub eval_data: Vec<PathBuf>,
    /// An SFT config (TOML: [train], [optim], [sft], [lora]); flags and --set override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key: --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The run directory (train.run_dir; default runs/sft).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start over in a run directory that already holds a run: its metrics.jsonl and
    /// checkpoints/ are removed first (without this, or --resume, kiln refuses).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Train LoRA adapters of this rank on a frozen base (lora.rank).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (lora.alpha; default 2 x rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapters' input (lora.dropout).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Projections with adapters, comma-separated: q,k,v,o,gate,up,down (default all).
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// rsLoRA: scale alpha / sqrt(r) (lora.rslora).
    #[arg(long)]
    pub rslora: bool,
    /// Keep a GGUF base in its quantised blocks while training LoRA adapters (QLoRA-style).
    #[arg(long)]
    pub base_quantized: bool,
    /// Train on every token, not only the assistant's (sft.train_on_prompt).
    #[arg(long)]
    pub train_on_prompt: bool,
    /// One example per row instead of packing (sft.packing = false).
    #[arg(long)]
    pub no_packing: bool,
    /// A Jinja chat template instead of the model's own (sft.template).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Skip bad records (counted and reported) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_records: bool,
}

impl SftArgs {
    /// The flags as config overrides (applied after --set, so a flag wins).
    fn overrides(&self) -> Vec<String> {
        let mut o = self.overrides.clone();
        let q = |p: &PathBuf| format!("{:?}", p.display().to_string());
        if let Some(out) = &self.out {
            o.push(format!("train.run_dir={}", q(out)));
        }
        if let Some(r) = self.lora_rank {
            o.push(format!("lora.rank={r}"));
        }
        if let Some(a) = self.lora_alpha {
            o.push(format!("lora.alpha={a:?}"));
        }
        if let Some(d) = self.lora_dropout {
            o.push(format!("lora.dropout={d:?}"));
        }
        if let Some(t) = &self.lora_targets {
            let list: Vec<String> = t.split(',').map(|s| format!("{:?}", s.trim())).collect();
            o.push(format!("lora.targets=[{}]", list.join(",")));
        }
        if self.rslora {
            o.push("lora.rslora=true".into());
        }
        if self.base_quantized {
            o.push("sft.base_quantized=true".into());
        }
        if self.train_on_prompt {
            o.push("sft.train_on_prompt=true".into());
        }
        if self.no_packing {
            o.push("sft.packing=false".into());
        }
        if let Some(t) = &self.template {
            o.push(format!("sft.template={}", q(t)));
        }
        if self.skip_bad_records {
            o.push("sft.skip_bad_records=true".into());
        }
        o
    }
}

impl SftObserver for Console {
    fn on_sft_start(&mut self, i: &SftInfo) {
        self.on_message(&format!(
            "{}: {} of {} parameters train ({:.2}%){}",
            i.mode,
            i.trainable_params,
            i.total_params,
            100.0 * i.trainable_params as f64 / i.total_params.max(1) as f64,
            if i.saved_state_bytes > 0 {
                format!(
                    "; the frozen base keeps no gradient or AdamW state, {:.0} MiB less than full fine-tuning",
                    i.saved_state_bytes as f64 / (1 << 20) as f64
                )
            } else {
                String::new()
            }
        ));
        self.on_message(&format!(
            "data: {} train / {} held-out conversations, {} rows, {} tokens of which {} assistant (labelled); {} truncated, {} dropped with no assistant token left, {} bad records skipped; {} steps ({} per epoch)",
            i.n_train_conversations,
            i.n_val_conversations,
            i.train_rows,
            i.train_tokens,
            i.train_label_tokens,
            i.truncated,
            i.dropped_no_labels,
            i.skipped_records,
            i.steps,
            i.steps_per_epoch
        ));
    }
}

pub fn run(a: SftArgs) -> Result<()> {
    let overrides = a.overrides();
    let run_dir = crate::commands::run_dir_of(
        a.out.as_deref(),
        &overrides,
        a.config.as_deref(),
        "runs/sft",
    );
    let source = SftSource {
        model: a.model.clone(),
        data: a.data.clone(),
        eval_data: a.eval_data.clone(),
    };
    crate::commands::claim_run_dir(&run_dir, a.resume, a.overwrite)?;
    // Under mpirun each process is one rank; rank 0 alone draws progress and logs.
    let group = crate::dist::join(&crate::dist::config_of(a.config.as_deref(), &overrides)?)?;
    let main = group.as_ref().is_none_or(|g| g.is_main());
    let mut console = Console::new();
    let mut quiet = crate::dist::Quiet;
    let obs: &mut dyn SftObserver = if main { &mut console } else { &mut quiet };
    let mut trainer = SftTrainer::new_with(
        source,
        a.config.as_deref(),
        &overrides,
        &run_dir,
        a.resume,
        obs,
        group,
    )?;
    if main {
        crate::commands::log_precision(trainer.cfg.train.precision);
    }
    let stop = stop_on_ctrl_c()?;
    let s = trainer.run(obs, &stop)?;
    drop(trainer);
    crate::dist::leave();
    if !main {
        return Ok(());
    }
    console.finish();
    // Only the figures the run has (no held-out split: no held-out losses).
    let loss = |x: Option<f64>| x.map(|l| format!("{l:.4}"));
    let figures: Vec<String> = [
        ("final_loss", loss(s.final_loss)),
        ("held_out_loss_before", loss(s.val_loss_before)),
        ("held_out_loss_after", loss(s.final_val_loss)),
        (
            "peak_rss_mib",
            kiln_train::perf::peak_rss_mib().map(|m| format!("{m:.0}")),
        ),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
    .collect();
    info!(
        "done: steps={} {} wall_s={:.1}",
        s.steps,
        figures.join(" "),
        s.wall_s
    );
    match &s.adapter_dir {
        Some(d) => info!(
            "PEFT adapter: {} (use it with: kiln generate --model {} --adapter {})",
            d.display(),
            a.model.display(),
            d.display()
        ),
        None => info!(
            "fine-tuned model: {} (kiln generate/chat --model {})",
            run_dir.display(),
            run_dir.display()
        ),
    }
    info!("loss curve: {}", run_dir.join("loss.png").display());
    crate::commands::finish_run(s.stopped_early, "the same command and --resume")
}

#[derive(Subcommand)]
pub enum LoraCommand {
    /// Merge a PEFT LoRA adapter into its base and write the merged model (HF or GGUF).
    Merge(MergeArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model the adapter was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output: a directory for hf, a .gguf file for gguf.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "hf")]
    pub format: crate::export::ExportFormat,
    /// Weight type (as for kiln export).
    #[arg(long = "type")]
    pub dtype: Option<String>,
    /// Merge even into a base other than the one kiln trained the adapter on.
    #[arg(long)]
    pub force: bool,
}

pub fn lora(c: LoraCommand) -> Result<()> {
    match c {
        LoraCommand::Merge(m) => crate::export::run(crate::export::ExportArgs {
            model: m.model,
            format: m.format,
            out: m.out,
            dtype: m.dtype,
            adapter: Some(m.adapter),
            force: m.force,
        }),
    }
}
