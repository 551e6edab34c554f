//! `kiln fill-mask`: parses the flags, loads the model and prints `kiln_infer::fill_mask`'s
//! candidates.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use kiln_infer::fill_mask::fill_mask;

#[derive(Args)]
pub struct FillMaskArgs {
    /// An MLM run directory, checkpoint directory or model.safetensors.
    #[arg(long)]
    pub model: PathBuf,
    /// Text with one or more [MASK] tokens, e.g. "To be, or not to [MASK]".
    #[arg(long)]
    pub text: String,
    /// Candidates per mask.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The `kiln fill-mask` verb.
pub fn run(a: FillMaskArgs) -> Result<()> {
    let (_, model, tokenizer) = crate::commands::load_model(&a.model)?;
    let out = fill_mask(&model, &tokenizer, &a.text, a.top_k)?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let n = out.masks.len();
    for (i, m) in out.masks.iter().enumerate() {
        println!("[MASK] {} of {n} (token {}):", i + 1, m.position);
        for c in &m.candidates {
            println!("  {:>7.4}  {:?}", c.prob, c.text);
        }
    }
    println!("filled: {}", out.filled);
    Ok(())
}
