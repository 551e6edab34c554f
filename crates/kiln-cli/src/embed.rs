//! `kiln embed`: sentence embeddings from a sentence-transformers directory (EmbeddingGemma):
//! the trunk, mean pooling, the dense layers and normalisation, as sentence-transformers
//! computes them (`kiln_model::sentence`).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_model::sentence::{is_sentence_transformers_dir, SentenceEncoder};

#[derive(Args)]
pub struct EmbedArgs {
    /// A sentence-transformers directory (modules.json, config.json, model.safetensors,
    /// tokenizer.json, the pooling and dense modules).
    #[arg(long)]
    pub model: PathBuf,
    /// A text to embed (repeatable; default: one text per line of stdin).
    #[arg(long)]
    pub text: Vec<String>,
    /// Print `{"model", "dim", "embeddings": [[...], ...]}` (every value) instead of a summary
    /// line per text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EmbedArgs) -> Result<()> {
    if !is_sentence_transformers_dir(&a.model) {
        bail!(
            "{}: not a sentence-transformers directory (no modules.json); kiln embed runs \
             embedding models such as EmbeddingGemma (scripts/fetch-embeddinggemma.sh)",
            a.model.display()
        );
    }
    let texts = if a.text.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<Vec<_>>>()
            .context("reading stdin")?
    } else {
        a.text.clone()
    };
    let tok = kiln_load::load_tokenizer(&a.model)?;
    let started = std::time::Instant::now();
    let encoder = SentenceEncoder::load(&a.model)?;
    tracing::info!(
        model = %a.model.display(),
        dim = encoder.dim(),
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "loaded"
    );
    let mut embeddings = Vec::with_capacity(texts.len());
    for text in &texts {
        let ids = tok.tokenizer.encode_with_special_tokens(text)?;
        embeddings.push(encoder.embed(&ids)?);
    }
    if a.json {
        let out = serde_json::json!({
            "model": a.model.display().to_string(),
            "dim": encoder.dim(),
            "embeddings": embeddings,
        });
        println!("{out}");
    } else {
        for (text, e) in texts.iter().zip(&embeddings) {
            let head: Vec<String> = e.iter().take(6).map(|v| format!("{v:+.4}")).collect();
            println!("{:<40.40}  dim {}  [{} ...]", text, e.len(), head.join(" "));
        }
    }
    Ok(())
}
