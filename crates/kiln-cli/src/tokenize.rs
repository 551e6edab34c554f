//! `kiln tokenize`: token ids of a text as a JSON array (or, with `--decode`, the text of a
//! JSON array of ids), from the tokenizer part of a model only (a `tokenizer.json`, an HF
//! directory's tokenizer files, or a GGUF's vocabulary and merges), so it is instant and works
//! on vocabulary-only GGUF files. For checking tokenization against other implementations.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct TokenizeArgs {
    /// A model (run, checkpoint, HF directory, GGUF file) or a tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// The text (default: all of stdin). With --decode: a JSON array of ids.
    #[arg(long)]
    pub text: Option<String>,
    /// Decode a JSON array of ids to text instead.
    #[arg(long)]
    pub decode: bool,
    /// Put BOS first when the model adds it to plain text (as generate does).
    #[arg(long)]
    pub bos: bool,
    /// Print the decoded text as a JSON string (exact, including whitespace).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let tok = kiln_load::load_tokenizer(&a.model)?;
    let text = match a.text {
        Some(t) => t,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            s
        }
    };
    if a.decode {
        let ids: Vec<u32> = serde_json::from_str(text.trim())
            .with_context(|| format!("--decode needs a JSON array of token ids, got {text:?}"))?;
        let out = tok.tokenizer.decode(&ids)?;
        if a.json {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!("{out}");
        }
    } else {
        let ids = if a.bos {
            tok.encode_prompt(&text)?
        } else {
            tok.tokenizer.encode(&text)?
        };
        println!("{}", serde_json::to_string(&ids)?);
    }
    Ok(())
}
