//! Masked-language-modelling inputs, as in BERT (Devlin et al. 2019, §3.1 and App. A).
//!
//! Every non-special token of a window is *selected* with probability `mask_prob` (0.15). A
//! selected token becomes `[MASK]` with probability `mask_replace` (0.8), a token drawn
//! uniformly from the non-special vocabulary with probability `random_replace` (0.1), and
//! stays unchanged otherwise. The label is the original token at selected positions and -100
//! (ignored by the loss) everywhere else; the model predicts the label at the same position
//! (no shift). Special tokens (every token the tokenizer declares special, plus the usual
//! BOS/EOS/PAD/CLS/SEP/MASK names when present) are never selected and never drawn as a
//! random replacement.
//!
//! With `whole_word` the unit of selection is a word instead of a token (Google's whole word
//! masking): a token continues the previous token's word when the previous token ends with an
//! alphanumeric character and this one starts with one (byte-level BPE marks a word start with
//! a leading space, which is not alphanumeric). A selected word has every token selected; each
//! of them then gets its own 80/10/10 draw.
//!
//! Randomness is a splitmix64 stream per batch seeded by [`mlm_seed`]`(seed, batch_index)`, so
//! a run that resumes at batch `i` masks batch `i` exactly as an uninterrupted run would. Per
//! row the draws are, position by position: one uniform for the selection (per word start
//! with `whole_word`) and, for each selected token, one uniform for the 80/10/10 choice; then
//! one u64 per random replacement, in position order.

use crate::error::{DataError, Result};
use crate::sampler::Batch;
use crate::tokenizer::{KilnTokenizer, EOS_TOKEN};
use kiln_rng::{splitmix64, SplitMix64 as Stream};

/// The mask token added by `kiln tokenizer train --mlm`.
pub const MASK_TOKEN: &str = "[MASK]";
pub const CLS_TOKEN: &str = "[CLS]";
pub const SEP_TOKEN: &str = "[SEP]";
pub const PAD_TOKEN: &str = "[PAD]";
/// The special tokens an MLM tokenizer adds after `<|endoftext|>`.
pub const MLM_SPECIAL_TOKENS: [&str; 4] = [MASK_TOKEN, CLS_TOKEN, SEP_TOKEN, PAD_TOKEN];
/// Adds the MLM special tokens missing from `specials` (after the ones already there), so a
/// tokenizer trained with them supports masked language modelling.
pub fn add_mlm_special_tokens(specials: &mut Vec<String>) {
    for t in MLM_SPECIAL_TOKENS {
        if !specials.iter().any(|s| s == t) {
            specials.push(t.to_string());
        }
    }
}

/// Label of positions the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Token names treated as special whenever the vocabulary has them, even if a loaded
/// tokenizer does not flag them as special.
const KNOWN_SPECIAL: &[&str] = &[
    EOS_TOKEN,
    MASK_TOKEN,
    CLS_TOKEN,
    SEP_TOKEN,
    PAD_TOKEN,
    "[UNK]",
    "[BOS]",
    "[EOS]",
    "<s>",
    "</s>",
    "<pad>",
    "<mask>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
];

/// Seed of the validation masking stream: fixed, so every evaluation of a run (and of any run)
/// scores the same masked positions.
pub const VAL_MASK_SEED: u64 = 0x4D4C_4D5F_5641_4C21; // "MLM_VAL!"

/// The masking options of a run config's `[mlm]` section.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlmOptions {
    /// Probability that a non-special token (or word, with `whole_word`) is selected.
    pub mask_prob: f64,
    /// Of the selected tokens: fraction replaced by `[MASK]`.
    pub mask_replace: f64,
    /// Of the selected tokens: fraction replaced by a random non-special token (the rest,
    /// `1 - mask_replace - random_replace`, stay unchanged).
    pub random_replace: f64,
    /// Select whole words instead of single tokens.
    pub whole_word: bool,
}

impl Default for MlmOptions {
    fn default() -> Self {
        Self {
            mask_prob: 0.15,
            mask_replace: 0.8,
            random_replace: 0.1,
            whole_word: false,
        }
    }
}

impl MlmOptions {
    /// Checks the probabilities; errors name the `[mlm]` key.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, problem: String| Err(DataError::InvalidOption { field, problem });
        if !(self.mask_prob > 0.0 && self.mask_prob <= 1.0) {
            return bad(
                "mlm.mask_prob",
                format!("{} is not in (0, 1]", self.mask_prob),
            );
        }
        for (field, v) in [
            ("mlm.mask_replace", self.mask_replace),
            ("mlm.random_replace", self.random_replace),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(field, format!("{v} is not in [0, 1]"));
            }
        }
        if self.mask_replace + self.random_replace > 1.0 + 1e-12 {
            return bad(
                "mlm.random_replace",
                format!(
                    "mask_replace + random_replace = {} exceeds 1",
                    self.mask_replace + self.random_replace
                ),
            );
        }
        Ok(())
    }
}

/// The masking seed of batch `batch_index` of a run seeded with `seed`.
pub fn mlm_seed(seed: u64, batch_index: u64) -> u64 {
    splitmix64(splitmix64(seed ^ 0x4D4C_4D00) ^ batch_index)
}

/// What masking did to one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskAction {
    /// Not selected: input unchanged, label -100.
    Skip,
    /// Selected and replaced by `[MASK]`.
    Mask,
    /// Selected and replaced by a random non-special token.
    Random,
    /// Selected and left as it was.
    Keep,
}

/// Applies BERT masking to token windows. Build it once per run from the dataset's tokenizer.
#[derive(Debug, Clone)]
pub struct MlmMasker {
    opts: MlmOptions,
    mask_id: u32,
    /// `special[id]`: never selected, never a random replacement. Ids past the end (a model
    /// vocabulary padded beyond the tokenizer's) count as special.
    special: Vec<bool>,
    /// The ids random replacements are drawn from.
    non_special: Vec<u32>,
    /// `(starts_alnum, ends_alnum)` per id, for whole-word masking.
    word_edges: Vec<(bool, bool)>,
}

impl MlmMasker {
    /// A masker for `tokenizer`'s vocabulary. Fails, saying how to get one, when the tokenizer
    /// has no `[MASK]` token.
    pub fn new(tokenizer: &KilnTokenizer, opts: MlmOptions) -> Result<Self> {
        let mask_id = tokenizer
            .token_id(MASK_TOKEN)
            .ok_or(DataError::NoMaskToken { token: MASK_TOKEN })?;
        let vocab = tokenizer.vocab_size();
        let mut special_ids: Vec<u32> = tokenizer
            .inner()
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        special_ids.extend(KNOWN_SPECIAL.iter().filter_map(|t| tokenizer.token_id(t)));
        let word_edges = (0..vocab as u32)
            .map(|id| {
                let text = tokenizer.inner().decode(&[id], false).unwrap_or_default();
                // U+FFFD: part of a multi-byte character, i.e. inside a word.
                let alnum = |c: char| c.is_alphanumeric() || c == char::REPLACEMENT_CHARACTER;
                (
                    text.chars().next().is_some_and(alnum),
                    text.chars().last().is_some_and(alnum),
                )
            })
            .collect();
        Self::from_parts(vocab, mask_id, &special_ids, word_edges, opts)
    }

    /// A masker over ids `0..vocab_size` with the given special ids (`mask_id` is always
    /// special). `word_edges[id] = (starts_alnum, ends_alnum)` drives whole-word masking;
    /// pass an empty vector to treat every token as its own word.
    pub fn from_parts(
        vocab_size: usize,
        mask_id: u32,
        special_ids: &[u32],
        word_edges: Vec<(bool, bool)>,
        opts: MlmOptions,
    ) -> Result<Self> {
        opts.validate()?;
        let mut special = vec![false; vocab_size];
        for &id in special_ids.iter().chain([&mask_id]) {
            if let Some(s) = special.get_mut(id as usize) {
                *s = true;
            }
        }
        let non_special: Vec<u32> = (0..vocab_size as u32)
            .filter(|&id| !special[id as usize])
            .collect();
        if non_special.is_empty() {
            return Err(DataError::InvalidOption {
                field: "tokenizer",
                problem: "has no non-special tokens to mask".into(),
            });
        }
        Ok(Self {
            opts,
            mask_id,
            special,
            non_special,
            word_edges,
        })
    }

    pub fn options(&self) -> &MlmOptions {
        &self.opts
    }

    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    /// Ids a random replacement is drawn from (the non-special vocabulary).
    pub fn non_special(&self) -> &[u32] {
        &self.non_special
    }

    /// Does `cur` continue the word `prev` belongs to?
    fn continues_word(&self, prev: u32, cur: u32) -> bool {
        if !self.opts.whole_word || self.is_special(prev) || self.is_special(cur) {
            return false;
        }
        match (
            self.word_edges.get(prev as usize),
            self.word_edges.get(cur as usize),
        ) {
            (Some(&(_, prev_ends)), Some(&(cur_starts, _))) => prev_ends && cur_starts,
            _ => false,
        }
    }

    /// Masks one row in place, drawing from `rng`, and returns what happened at each position.
    fn mask_row_with(&self, row: &mut [u32], rng: &mut Stream) -> Vec<MaskAction> {
        let mut actions = Vec::with_capacity(row.len());
        let mut selected = false;
        for i in 0..row.len() {
            let id = row[i];
            if self.is_special(id) {
                actions.push(MaskAction::Skip);
                continue;
            }
            // A new selection draw at every word start (every token without whole_word). The
            // row still holds the original tokens: replacements are applied after the loop.
            let new_word = i == 0 || !self.continues_word(row[i - 1], id);
            if new_word {
                selected = rng.next_f64() < self.opts.mask_prob;
            }
            if !selected {
                actions.push(MaskAction::Skip);
                continue;
            }
            let u = rng.next_f64();
            let action = if u < self.opts.mask_replace {
                MaskAction::Mask
            } else if u < self.opts.mask_replace + self.opts.random_replace {
                MaskAction::Random
            } else {
                MaskAction::Keep
            };
            actions.push(action);
        }
        // Apply the replacements after all word decisions, which read the original tokens.
        for (i, a) in actions.iter().enumerate() {
            match a {
                MaskAction::Mask => row[i] = self.mask_id,
                MaskAction::Random => {
                    row[i] = self.non_special[rng.below(self.non_special.len())];
                }
                MaskAction::Skip | MaskAction::Keep => {}
            }
        }
        actions
    }

    /// Masks `tokens` (rows of `ctx` tokens, row-major) with the stream seeded by `seed`:
    /// returns `(inputs, labels, actions)`.
    pub fn mask_with_actions(
        &self,
        tokens: &[u32],
        ctx: usize,
        seed: u64,
    ) -> (Vec<u32>, Vec<i64>, Vec<MaskAction>) {
        let mut rng = Stream::new(seed);
        let mut inputs = tokens.to_vec();
        let mut actions = Vec::with_capacity(tokens.len());
        for row in inputs.chunks_mut(ctx.max(1)) {
            actions.extend(self.mask_row_with(row, &mut rng));
        }
        let labels = tokens
            .iter()
            .zip(&actions)
            .map(|(&t, a)| match a {
                MaskAction::Skip => IGNORE_INDEX,
                _ => i64::from(t),
            })
            .collect();
        (inputs, labels, actions)
    }

    /// An MLM batch from a sampler batch: its `inputs` masked, `targets` = labels (original
    /// token at selected positions, -100 elsewhere). The sampler's next-token targets are
    /// not used.
    pub fn mask_batch(&self, batch: &Batch, seed: u64) -> Batch {
        let (inputs, targets, _) = self.mask_with_actions(&batch.inputs, batch.ctx, seed);
        Batch {
            inputs,
            targets,
            batch_size: batch.batch_size,
            ctx: batch.ctx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: usize = 1000;
    /// Ids 0..5 special (EOS, MASK, CLS, SEP, PAD); MASK = 1.
    fn masker(opts: MlmOptions) -> MlmMasker {
        MlmMasker::from_parts(V, 1, &[0, 2, 3, 4], Vec::new(), opts).unwrap()
    }

    /// A big batch with specials sprinkled in: every 17th token is EOS, every 31st PAD.
    fn tokens(n: usize) -> Vec<u32> {
        let mut s = Stream::new(99);
        (0..n)
            .map(|i| match i {
                i if i % 17 == 0 => 0,
                i if i % 31 == 0 => 4,
                _ => 5 + s.below(V - 5) as u32,
            })
            .collect()
    }

    /// |observed - n p| within `z` binomial standard deviations.
    fn within_binomial(name: &str, k: usize, n: usize, p: f64, z: f64) {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        let dev = (k as f64 - mean).abs() / sd;
        assert!(
            dev < z,
            "{name}: {k} of {n} (p {p}): {dev:.2} sd from the mean {mean:.0}"
        );
        println!(
            "{name}: {k} / {n} = {:.4} (p {p}, {dev:.2} sd)",
            k as f64 / n as f64
        );
    }

    #[test]
    fn masking_statistics_are_binomial_15_80_10_10() {
        let m = masker(MlmOptions::default());
        let ctx = 128;
        let toks = tokens(64 * ctx * 32); // 262144 tokens
        let (inputs, labels, actions) = m.mask_with_actions(&toks, ctx, mlm_seed(1337, 0));
        let eligible = toks.iter().filter(|&&t| !m.is_special(t)).count();
        let selected = actions.iter().filter(|a| **a != MaskAction::Skip).count();
        // 5 sd: a false failure once in ~3.5 million runs.
        within_binomial("selected", selected, eligible, 0.15, 5.0);
        let count = |x: MaskAction| actions.iter().filter(|a| **a == x).count();
        within_binomial("[MASK]", count(MaskAction::Mask), selected, 0.8, 5.0);
        within_binomial("random", count(MaskAction::Random), selected, 0.1, 5.0);
        within_binomial("unchanged", count(MaskAction::Keep), selected, 0.1, 5.0);

        for i in 0..toks.len() {
            let (t, x, l, a) = (toks[i], inputs[i], labels[i], actions[i]);
            // No special token is ever selected (or altered).
            if m.is_special(t) {
                assert_eq!((a, x, l), (MaskAction::Skip, t, IGNORE_INDEX), "pos {i}");
            }
            // Labels align with selections: the original token exactly where selected.
            match a {
                MaskAction::Skip => assert_eq!((x, l), (t, IGNORE_INDEX), "pos {i}"),
                MaskAction::Mask => assert_eq!((x, l), (1, i64::from(t)), "pos {i}"),
                MaskAction::Keep => assert_eq!((x, l), (t, i64::from(t)), "pos {i}"),
                MaskAction::Random => {
                    assert_eq!(l, i64::from(t), "pos {i}");
                    assert!(
                        !m.is_special(x),
                        "pos {i}: random replacement {x} is special"
                    );
                }
            }
        }
        // Random replacements cover the non-special vocabulary roughly uniformly.
        let randoms: Vec<u32> = (0..toks.len())
            .filter(|&i| actions[i] == MaskAction::Random)
            .map(|i| inputs[i])
            .collect();
        let low = randoms
            .iter()
            .filter(|&&x| x < 5 + (V as u32 - 5) / 2)
            .count();
        within_binomial("random in lower half", low, randoms.len(), 0.5, 5.0);
    }

    #[test]
    fn masking_is_seeded_and_reproducible() {
        let m = masker(MlmOptions::default());
        let toks = tokens(4096);
        let a = m.mask_with_actions(&toks, 64, mlm_seed(7, 3));
        let b = m.mask_with_actions(&toks, 64, mlm_seed(7, 3));
        assert_eq!(a, b);
        assert_ne!(a.0, m.mask_with_actions(&toks, 64, mlm_seed(7, 4)).0);
        assert_ne!(a.0, m.mask_with_actions(&toks, 64, mlm_seed(8, 3)).0);
        let batch = Batch {
            inputs: toks.clone(),
            targets: vec![0; toks.len()],
            batch_size: 64,
            ctx: 64,
        };
        let mb = m.mask_batch(&batch, mlm_seed(7, 3));
        assert_eq!((mb.inputs, mb.targets), (a.0, a.1));
    }

    #[test]
    fn options_are_honoured() {
        let opts = MlmOptions {
            mask_prob: 0.5,
            mask_replace: 1.0,
            random_replace: 0.0,
            whole_word: false,
        };
        let m = masker(opts);
        let toks = tokens(20_000);
        let (_, _, actions) = m.mask_with_actions(&toks, 100, 1);
        let eligible = toks.iter().filter(|&&t| !m.is_special(t)).count();
        let selected = actions.iter().filter(|a| **a != MaskAction::Skip).count();
        within_binomial("selected", selected, eligible, 0.5, 5.0);
        assert!(actions
            .iter()
            .all(|a| matches!(a, MaskAction::Skip | MaskAction::Mask)));

        let bad = MlmOptions {
            mask_replace: 0.95,
            ..Default::default()
        };
        let err = MlmMasker::from_parts(V, 1, &[], Vec::new(), bad).unwrap_err();
        assert!(err.to_string().contains("mlm.random_replace"), "{err}");
        let bad = MlmOptions {
            mask_prob: 0.0,
            ..Default::default()
        };
        let err = MlmMasker::from_parts(V, 1, &[], Vec::new(), bad).unwrap_err();
        assert!(err.to_string().contains("mlm.mask_prob"), "{err}");
    }

    fn train_tokenizer(specials: Vec<String>) -> (tempfile::TempDir, KilnTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        let line = "The king of Denmark is dead. Long live the queen of Denmark!\n";
        std::fs::write(&path, line.repeat(50)).unwrap();
        let opts = crate::BpeTrainOptions {
            vocab_size: 300,
            special_tokens: specials,
            ..Default::default()
        };
        let tok = crate::train_bpe(&[path], &opts).unwrap();
        (dir, tok)
    }

    #[test]
    fn masker_from_an_mlm_tokenizer() {
        let mut specials = vec![EOS_TOKEN.to_string()];
        add_mlm_special_tokens(&mut specials);
        assert_eq!(
            specials,
            ["<|endoftext|>", "[MASK]", "[CLS]", "[SEP]", "[PAD]"]
        );
        let (_d, tok) = train_tokenizer(specials.clone());
        let m = MlmMasker::new(&tok, MlmOptions::default()).unwrap();
        assert_eq!(m.mask_id(), tok.token_id(MASK_TOKEN).unwrap());
        for t in &specials {
            let id = tok.token_id(t).unwrap();
            assert!(m.is_special(id), "{t}");
            assert!(!m.non_special().contains(&id), "{t}");
        }
        assert_eq!(m.non_special().len(), tok.vocab_size() - specials.len());
        // `[MASK]` is one token and absorbs the space before it.
        let ids = tok.encode("the [MASK] of Denmark").unwrap();
        let mut want = tok.encode("the").unwrap();
        want.push(m.mask_id());
        want.extend(tok.encode(" of Denmark").unwrap());
        assert_eq!(ids, want);

        // Whole-word edges from the vocabulary: " Denmark" splits into a word start and
        // continuations, all selected together.
        let opts = MlmOptions {
            whole_word: true,
            mask_prob: 0.5,
            ..Default::default()
        };
        let m = MlmMasker::new(&tok, opts).unwrap();
        let text = " Denmark zyzzyva quux ".repeat(40);
        let ids = tok.encode(&text).unwrap();
        let (_, labels, _) = m.mask_with_actions(&ids, ids.len(), 3);
        // Tokens inside one space-free word share their selection.
        for i in 1..ids.len() {
            if m.continues_word(ids[i - 1], ids[i]) {
                assert_eq!(
                    labels[i - 1] == IGNORE_INDEX,
                    labels[i] == IGNORE_INDEX,
                    "at {i}"
                );
            }
        }
        assert!((1..ids.len()).any(|i| m.continues_word(ids[i - 1], ids[i])));
    }

    #[test]
    fn a_tokenizer_without_mask_is_refused_with_a_way_out() {
        let (_d, tok) = train_tokenizer(vec![EOS_TOKEN.to_string()]);
        let err = MlmMasker::new(&tok, MlmOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[MASK]")
                && err.contains("kiln tokenizer train --mlm")
                && err.contains("data.dataset"),
            "{err}"
        );
    }

    #[test]
    fn whole_word_masking_selects_words() {
        // ids: 0 EOS, 1 MASK; 5..: "word starts" (leading space, ends alnum) for even ids,
        // continuations (start and end alnum) for odd ids.
        let edges: Vec<(bool, bool)> = (0..V).map(|id| (id >= 5 && id % 2 == 1, id >= 5)).collect();
        let opts = MlmOptions {
            whole_word: true,
            ..Default::default()
        };
        let m = MlmMasker::from_parts(V, 1, &[0], edges, opts).unwrap();
        // Words of 1 to 4 tokens: a start (even) and continuations (odd); EOS between some.
        let mut s = Stream::new(5);
        let mut toks = Vec::new();
        let mut n_words = 0;
        while toks.len() < 200_000 {
            if s.below(10) == 0 {
                toks.push(0);
            }
            toks.push(6 + 2 * s.below(400) as u32);
            for _ in 0..s.below(4) {
                toks.push(7 + 2 * s.below(400) as u32);
            }
            n_words += 1;
        }
        let (_, labels, actions) = m.mask_with_actions(&toks, toks.len(), 11);
        let mut selected_words = 0;
        let mut i = 0;
        while i < toks.len() {
            if toks[i] == 0 {
                assert_eq!(actions[i], MaskAction::Skip);
                i += 1;
                continue;
            }
            let start = i;
            i += 1;
            while i < toks.len() && toks[i] % 2 == 1 && toks[i] != 0 {
                i += 1;
            }
            let sel: Vec<bool> = (start..i).map(|j| actions[j] != MaskAction::Skip).collect();
            assert!(
                sel.iter().all(|&x| x == sel[0]),
                "word at {start} partly selected: {sel:?}"
            );
            assert!(labels[start..i]
                .iter()
                .all(|&l| (l != IGNORE_INDEX) == sel[0]));
            selected_words += usize::from(sel[0]);
        }
        within_binomial("selected words", selected_words, n_words, 0.15, 5.0);
    }
}
