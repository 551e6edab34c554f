//! Examples → training rows: truncation, then best-fit-decreasing packing into rows of
//! `seq_len` tokens with a segment id per example.
//!
//! An example of n tokens takes n positions of a row: its tokens as inputs, and as target at
//! position j the token j+1 when that token is labelled, else -100; its last position has no
//! target. So no position's target is a token of another segment, and with segment ids (the
//! attention mask) and positions restarting at each segment, packed examples neither attend
//! to nor predict each other.

use kiln_chat::Example;
use kiln_train::Truncation;

/// The ignored target (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// One training row: inputs, targets and the segment (example) of every position.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub targets: Vec<i64>,
    pub segments: Vec<u32>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    fn push(&mut self, ex: &Example) {
        let seg = self.segments.last().map_or(0, |s| s + 1);
        let n = ex.ids.len();
        for j in 0..n {
            self.tokens.push(ex.ids[j]);
            self.targets.push(if j + 1 < n && ex.labels[j + 1] {
                i64::from(ex.ids[j + 1])
            } else {
                IGNORE
            });
            self.segments.push(seg);
        }
    }
}

/// What [`pack`] made of the examples.
#[derive(Debug, Clone, Default)]
pub struct Packed {
    pub rows: Vec<Row>,
    /// Examples longer than `seq_len`, cut.
    pub truncated: usize,
    /// Examples with no labelled token left inside the window after truncation: dropped.
    pub dropped_no_labels: usize,
    /// Labelled (assistant) tokens in all rows.
    pub n_label_tokens: usize,
    /// Tokens of all examples kept (after truncation).
    pub n_tokens: usize,
}

/// Truncates every example to `seq_len` tokens (keeping its start or its end), drops those left
/// without a labelled target, and puts them into rows: with `packing`, best-fit decreasing
/// (longest first, each into the fullest row it still fits), else one example per row.
pub fn pack(examples: &[Example], seq_len: usize, packing: bool, truncation: Truncation) -> Packed {
    let mut out = Packed::default();
    let mut kept: Vec<Example> = Vec::with_capacity(examples.len());
    for ex in examples {
        let n = ex.ids.len();
        let ex = if n > seq_len {
            out.truncated += 1;
            let range = match truncation {
                Truncation::KeepStart => 0..seq_len,
                Truncation::KeepEnd => n - seq_len..n,
            };
            Example {
                ids: ex.ids[range.clone()].to_vec(),
                labels: ex.labels[range].to_vec(),
            }
        } else {
            ex.clone()
        };
        // Position 0 is never predicted.
        if ex.labels.iter().skip(1).any(|&l| l) {
            out.n_label_tokens += ex.labels.iter().skip(1).filter(|&&l| l).count();
            out.n_tokens += ex.ids.len();
            kept.push(ex);
        } else {
            out.dropped_no_labels += 1;
        }
    }
    if !packing {
        out.rows = kept
            .iter()
            .map(|ex| {
                let mut r = Row::default();
                r.push(ex);
                r
            })
            .collect();
        return out;
    }
    let mut order: Vec<usize> = (0..kept.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(kept[i].ids.len())); // stable: ties keep order
    let mut rows: Vec<Row> = Vec::new();
    for i in order {
        let n = kept[i].ids.len();
        let best = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.len() + n <= seq_len)
            .max_by_key(|(j, r)| (r.len(), std::cmp::Reverse(*j)))
            .map(|(j, _)| j);
        match best {
            Some(j) => rows[j].push(&kept[i]),
            None => {
                let mut r = Row::default();
                r.push(&kept[i]);
                rows.push(r);
            }
        }
    }
    out.rows = rows;
    out
}
