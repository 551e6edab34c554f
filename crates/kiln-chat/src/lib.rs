//! kiln-chat: the chat data that instruction tuning (kiln-sft) and preference tuning
//! (kiln-rlhf) share. Records in the common JSON formats (Alpaca, messages, ShareGPT, TRL's
//! prompt-completion, tool calls) are read into [`Conversation`]s ([`read_records`]), rendered
//! with the model's chat template and labelled on the assistant's tokens only
//! ([`ChatFormat`]), and split into training and held-out sets ([`split_held_out`]).

mod format;
mod records;

pub use format::{ChatFormat, Example, PLAIN_TEMPLATE};
pub use records::{json_kind, parse_record, read_records, split_records, Conversation, Records};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A record that cannot be read: `origin` names the file and the record (or line).
    #[error("{origin}: {msg}")]
    Record { origin: String, msg: String },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Infer(#[from] kiln_infer::InferError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
}

/// Splits conversations' indices into (train, held-out): every index whose seeded hash falls
/// under `fraction` is held out (at least one when `fraction > 0` and there are two or more),
/// so the split does not depend on the order of the other records.
pub fn split_held_out(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    if fraction <= 0.0 || n < 2 {
        return ((0..n).collect(), Vec::new());
    }
    let score = |i: usize| {
        let mut rng =
            kiln_rng::SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.next_f64()
    };
    let (mut train, mut held): (Vec<usize>, Vec<usize>) =
        (0..n).partition(|&i| score(i) >= fraction);
    if held.is_empty() {
        // Hold out the lowest-scoring record so a small set still gets an evaluation.
        let i = (0..n)
            .min_by(|&a, &b| score(a).total_cmp(&score(b)))
            .expect("n >= 2");
        train.retain(|&j| j != i);
        held.push(i);
    }
    (train, held)
}
