//! `kiln export`: parses the options and logs; the policy (what goes in the files) is
//! `kiln_load::export`. Reward models export through `kiln_rlhf`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use kiln_load::export::{export_model, hf_dtype, ExportRequest};
use tracing::info;

use crate::commands::device;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A transformers directory (config.json, model.safetensors, tokenizer files).
    Hf,
    /// One GGUF file (llama.cpp).
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A kiln run/checkpoint, an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output: a directory for hf, a .gguf file for gguf.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight type. hf: f32 (default), bf16, f16. gguf: f32, f16 (default), bf16, q8_0,
    /// q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, or llama.cpp's mixtures q4_k_m, q5_k_m.
    /// Matrices whose rows are not whole blocks fall back as in llama.cpp (Q4_K to Q5_0, Q5_K
    /// to Q5_1, Q6_K to Q8_0; F16 when nothing fits).
    #[arg(long = "type")]
    pub dtype: Option<String>,
    /// Merge this PEFT LoRA adapter into the weights first (same as `kiln lora merge`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Merge the adapter even into a base other than the one kiln trained it on.
    #[arg(long, requires = "adapter")]
    pub force: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    if kiln_rlhf::reward_checkpoint(&a.model)?.is_some() {
        // A reward model: transformers' LlamaForSequenceClassification (one label).
        if a.format != ExportFormat::Hf || a.adapter.is_some() {
            bail!("a reward model exports as --format hf (its LoRA adapter, if any, is merged), nothing else");
        }
        kiln_rlhf::export_reward_hf(&a.model, &a.out, hf_dtype(a.dtype.as_deref())?)?;
        info!(from = %a.model.display(), out = %a.out.display(), "exported the reward model (LlamaForSequenceClassification)");
        return Ok(());
    }
    let summary = export_model(
        &ExportRequest {
            model: &a.model,
            format: match a.format {
                ExportFormat::Hf => kiln_load::export::ExportFormat::Hf,
                ExportFormat::Gguf => kiln_load::export::ExportFormat::Gguf,
            },
            out: &a.out,
            type_name: a.dtype.as_deref(),
            adapter: a.adapter.as_deref().map(|dir| kiln_load::AdapterChoice {
                dir,
                force: a.force,
            }),
        },
        &device(),
    )?;
    for w in &summary.warnings {
        tracing::warn!("{w}");
    }
    if let Some((dir, rank, targets)) = &summary.merged_adapter {
        info!(
            adapter = %dir.display(),
            rank,
            targets = targets.join(","),
            "merged the LoRA adapter into the weights"
        );
    }
    info!(
        from = %a.model.display(),
        out = %summary.out.display(),
        secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "exported"
    );
    Ok(())
}
