//! `kiln chat`: multi-turn chat in the terminal with the model's own chat template (Jinja,
//! rendered by minijinja), streaming each reply and keeping the history within the context
//! window (the oldest exchanges are dropped first; the system prompt stays). The turn policy
//! is kiln-infer's `ChatSession`; this file reads stdin and prints.
//!
//! On a terminal it is interactive (`/reset` forgets the history, `/quit` or Ctrl-D ends).
//! Otherwise every line of stdin is one user turn and each reply is printed followed by a
//! newline, so it can be scripted.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_infer::{
    generate as generate_text, ChatConfig, ChatSession, GenerateOptions, InferError, Sampler,
};
use tracing::info;

use crate::SamplingArgs;

#[derive(Args)]
pub struct ChatArgs {
    /// A GGUF file, an HF model directory, or a kiln run (which then needs --template).
    #[arg(long)]
    pub model: PathBuf,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Use this Jinja chat template file instead of the model's.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Tokens of history kept (default: the model's context window).
    #[arg(long)]
    pub max_context: Option<usize>,
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
    pub adapter: crate::AdapterArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let m = crate::commands::load_for_inference(
        &a.model,
        crate::commands::weights_choice(a.dequantize, a.quantize.as_deref())?,
        a.adapter.choice(),
    )?;
    let tok = &m.tokenizer;
    let template = match &a.template {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the chat template {}", p.display()))?,
        ),
        None => None,
    };
    let s = &a.sampling;
    let config = ChatConfig {
        system: a.system.clone(),
        template,
        max_context: a.max_context,
        max_new_tokens: s.max_new_tokens,
    };
    let mut session = ChatSession::new(tok, m.config.max_seq_len, config)?;
    let mut sampler = Sampler::new(s.params(&m.generation))?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} (/reset clears the history, /quit or Ctrl-D ends)",
            a.model.display()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("\n> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim_end_matches(['\r', '\n']);
        if text.trim().is_empty() {
            continue;
        }
        match text.trim() {
            "/quit" | "/exit" => break,
            "/reset" => {
                session.reset();
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        let turn = match session.user_turn(&tok.tokenizer, text) {
            Ok(t) => t,
            // At a terminal, a message too long for the context is reported and the chat
            // goes on; a script gets the error.
            Err(e @ InferError::TurnTooLong { .. }) if interactive => {
                eprintln!("error: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if turn.dropped_turns > 0 {
            info!(
                dropped_turns = turn.dropped_turns,
                "history trimmed to fit the context window"
            );
        }
        let opts = GenerateOptions {
            max_new_tokens: turn.max_new_tokens,
            stop_strings: s.stop.clone(),
            stop_tokens: tok.stop_ids.clone(),
            truncate_prompt: false,
        };
        let mut stdout = std::io::stdout().lock();
        let out = generate_text(
            m.model.as_ref(),
            &tok.tokenizer,
            &turn.prompt_ids,
            &mut sampler,
            &opts,
            |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            },
        )?;
        let _ = writeln!(stdout);
        drop(stdout);
        session.record_reply(&out.text);
        tracing::debug!(
            prompt_tokens = out.prompt_tokens,
            new_tokens = out.token_ids.len(),
            finish = ?out.finish_reason,
            "reply"
        );
    }
    Ok(())
}
