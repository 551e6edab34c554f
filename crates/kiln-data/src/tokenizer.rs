//! Tokenizer loading, byte-level BPE training and streaming decode.
//!
//! [`KilnTokenizer`] is a thin wrapper over a Hugging Face `tokenizers::Tokenizer`, so any
//! `tokenizer.json` loads; [`train_bpe`] builds a GPT-2 style byte-level BPE from text files.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DataError, Result};

/// The end-of-text token; documents are separated by it in prepared datasets.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// A loaded or trained tokenizer.
#[derive(Clone)]
pub struct KilnTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for KilnTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KilnTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id())
            .finish()
    }
}

impl KilnTokenizer {
    /// Wraps an existing `tokenizers::Tokenizer`.
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        Self { inner }
    }

    /// Loads any Hugging Face `tokenizer.json`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Read ourselves so that a missing file is an Io error naming the path.
        let bytes = std::fs::read(path).map_err(|e| DataError::io("reading tokenizer", path, e))?;
        // Check the JSON syntax first: `tokenizers` panics (rather than erring) on some
        // malformed JSON inside its `decoder` section (found by examples/fuzz_formats.rs).
        let invalid =
            |why: String| DataError::tok(format!("loading {}", path.display()), why.into());
        let text =
            std::str::from_utf8(&bytes).map_err(|e| invalid(format!("not UTF-8 text: {e}")))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| DataError::tok(format!("loading {}", path.display()), e))?;
        Ok(Self { inner })
    }

    /// Saves as a (pretty-printed) `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| DataError::tok(format!("serialising to {}", path.display()), e))?;
        std::fs::write(path, json).map_err(|e| DataError::io("writing tokenizer", path, e))
    }

    /// Encodes text without adding special tokens (special tokens written literally in
    /// the text, like `<|endoftext|>`, are still recognised as single tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::tok("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text as the tokenizer's own post-processor frames it (e.g. `<bos> ... <eos>` for
    /// EmbeddingGemma): what sentence-transformers feeds its encoder.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| DataError::tok("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts in parallel; same result as calling [`encode`](Self::encode) on each.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| DataError::tok("encoding batch", e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Decodes ids to text, keeping special tokens. Incomplete UTF-8 at the end (or
    /// anywhere) decodes to U+FFFD. Ids outside the vocabulary are an error rather than
    /// silently dropped, since they point at a model/tokenizer mismatch.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(DataError::UnknownTokenId { id, vocab_size });
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::tok("decoding", e))
    }

    /// Decodes ids to display text: like [`decode`](Self::decode), but special tokens (EOS,
    /// chat markers, `[MASK]`, ...) are left out, as transformers' `skip_special_tokens=True`.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(DataError::UnknownTokenId { id, vocab_size });
        }
        self.inner
            .decode(ids, true)
            .map_err(|e| DataError::tok("decoding", e))
    }

    /// Vocabulary size including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token`, if it is in the vocabulary (model or added tokens).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of [`EOS_TOKEN`] (`<|endoftext|>`), if present.
    pub fn eos_id(&self) -> Option<u32> {
        self.token_id(EOS_TOKEN)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Options for [`train_bpe`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BpeTrainOptions {
    /// Target vocabulary size, including the 256 byte tokens and the special tokens.
    pub vocab_size: usize,
    /// A merge must occur at least this many times to be learned.
    pub min_frequency: u64,
    /// Special tokens, given the first ids in order (so `<|endoftext|>` is id 0 by default).
    pub special_tokens: Vec<String>,
}

impl Default for BpeTrainOptions {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            min_frequency: 2,
            special_tokens: vec![EOS_TOKEN.to_string()],
        }
    }
}

/// Trains a GPT-2 style byte-level BPE on text files (read line by line), without any
/// progress output.
///
/// Pre-tokenizer, decoder and post-processor are all `ByteLevel` (no prefix space), and
/// the full 256-byte alphabet is always in the vocabulary, so any input encodes without
/// an unknown token. Special tokens come first: with the defaults `<|endoftext|>` is id 0.
pub fn train_bpe(files: &[PathBuf], opts: &BpeTrainOptions) -> Result<KilnTokenizer> {
    let min_vocab = 256 + opts.special_tokens.len();
    if opts.vocab_size < min_vocab {
        return Err(DataError::InvalidOption {
            field: "vocab_size",
            problem: format!(
                "{} is smaller than the 256 byte tokens plus {} special tokens",
                opts.vocab_size,
                opts.special_tokens.len()
            ),
        });
    }
    if files.is_empty() {
        return Err(DataError::InvalidOption {
            field: "files",
            problem: "no training files given".into(),
        });
    }
    let mut file_names = Vec::with_capacity(files.len());
    for f in files {
        if !f.is_file() {
            return Err(DataError::MissingSource { path: f.clone() });
        }
        // The tokenizers API takes String paths; reject non-UTF-8 paths explicitly.
        let name = f.to_str().ok_or_else(|| DataError::InvalidOption {
            field: "files",
            problem: format!("path {} is not valid UTF-8", f.display()),
        })?;
        file_names.push(name.to_string());
    }

    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(ByteLevelDecoder::default().add_prefix_space(false)))
        .with_post_processor(Some(byte_level));

    let special: Vec<AddedToken> = opts
        .special_tokens
        .iter()
        // `[MASK]` absorbs the space before it (as RoBERTa's `<mask>`), so "the [MASK] of"
        // leaves the mask to stand for a space-prefixed word token like the ones it replaced.
        .map(|t| AddedToken::from(t.clone(), true).lstrip(t == crate::mlm::MASK_TOKEN))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .show_progress(false)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);

    let t0 = std::time::Instant::now();
    tokenizer
        .train_from_files(&mut trainer, file_names)
        .map_err(|e| DataError::tok(format!("training BPE on {} files", files.len()), e))?;
    let tok = KilnTokenizer { inner: tokenizer };
    tracing::info!(
        files = files.len(),
        vocab_size = tok.vocab_size(),
        secs = t0.elapsed().as_secs_f32(),
        "trained byte-level BPE"
    );
    Ok(tok)
}

/// Turns a stream of generated token ids into printable text increments.
///
/// Byte-level BPE tokens can split a multi-byte character; decoding such a prefix gives
/// U+FFFD. This decoder re-decodes the whole sequence on every push and emits only the
/// new suffix, holding back trailing U+FFFD characters until the next token completes
/// them (or [`finish`](Self::finish) flushes them).
///
/// Generated text is for display, so special tokens are not printed: the concatenation of
/// everything emitted equals `tokenizer.decode_skip_special(all_ids)` (or
/// `tokenizer.decode(all_ids)` for a decoder made with [`keeping_special`](Self::keeping_special)).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Text already handed out; always a prefix of the current full decode.
    emitted: String,
    keep_special: bool,
}

impl IncrementalDecoder {
    /// A decoder that leaves special tokens out of the text.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder whose text includes special tokens, as [`KilnTokenizer::decode`].
    pub fn keeping_special() -> Self {
        Self {
            keep_special: true,
            ..Self::default()
        }
    }

    fn decode_all(&self, tokenizer: &KilnTokenizer) -> Result<String> {
        if self.keep_special {
            tokenizer.decode(&self.ids)
        } else {
            tokenizer.decode_skip_special(&self.ids)
        }
    }

    /// Adds one token and returns the newly printable text (possibly empty).
    pub fn push(&mut self, tokenizer: &KilnTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.decode_all(tokenizer)?;
        // Everything up to the trailing replacement chars is stable: later bytes can only
        // complete the incomplete sequence at the end.
        let stable = text.trim_end_matches(char::REPLACEMENT_CHARACTER);
        Ok(self.emit_up_to(stable))
    }

    /// Flushes any held-back text (e.g. genuinely invalid trailing bytes, shown as U+FFFD).
    pub fn finish(&mut self, tokenizer: &KilnTokenizer) -> Result<String> {
        let text = self.decode_all(tokenizer)?;
        Ok(self.emit_up_to(&text))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Forgets all state (start of a new generation).
    pub fn reset(&mut self) {
        self.ids.clear();
        self.emitted.clear();
    }

    fn emit_up_to(&mut self, stable: &str) -> String {
        let new = match stable.strip_prefix(self.emitted.as_str()) {
            Some(suffix) => suffix.to_string(),
            None => {
                // Only possible with a decoder whose output for a prefix is not a prefix of
                // the full output. We cannot retract text, so emit from the divergence.
                let common = common_prefix_len(&self.emitted, stable);
                tracing::warn!("incremental decode diverged from already emitted text");
                self.emitted.truncate(common);
                stable[common..].to_string()
            }
        };
        self.emitted.push_str(&new);
        new
    }
}

/// Length in bytes of the longest common prefix ending on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SAMPLE: &str = "To be, or not to be, that is the question:\n\
        Whether 'tis nobler in the mind to suffer\n\
        The slings and arrows of outrageous fortune,\n\
        Or to take arms against a sea of troubles\n\
        And by opposing end them. To die—to sleep,\n\
        Café naïve façade — 日本語のテキスト 🦀🔥 emoji!\n";

    fn small_tokenizer() -> (tempfile::TempDir, KilnTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.txt");
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..20 {
            f.write_all(SAMPLE.as_bytes()).unwrap();
        }
        let opts = BpeTrainOptions {
            vocab_size: 400,
            ..Default::default()
        };
        let tok = train_bpe(&[path], &opts).unwrap();
        (dir, tok)
    }

    #[test]
    fn train_roundtrip_and_special_token() {
        let (dir, tok) = small_tokenizer();
        assert!(
            tok.vocab_size() > 257 && tok.vocab_size() <= 400,
            "{}",
            tok.vocab_size()
        );
        assert_eq!(tok.eos_id(), Some(0));
        assert_eq!(tok.token_id(EOS_TOKEN), Some(0));

        for text in [
            SAMPLE,
            "unseen words: zyzzyva quixotic",
            "Ünïcödé ☃ 中文 🦀🎉👩‍👩‍👧 and \t tabs \r\n",
            "",
        ] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }

        // Training actually learned merges: common words are shorter than their bytes.
        assert!(tok.encode("the question").unwrap().len() < "the question".len());

        // The special token is atomic inside text and survives decode.
        let ids = tok.encode("end.<|endoftext|>Start").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1);
        assert_eq!(tok.decode(&ids).unwrap(), "end.<|endoftext|>Start");

        // Save / load preserves behaviour.
        let p = dir.path().join("tokenizer.json");
        tok.save(&p).unwrap();
        let back = KilnTokenizer::load(&p).unwrap();
        // Training is deterministic (prepared datasets depend on it).
        let again = train_bpe(
            &[dir.path().join("sample.txt")],
            &BpeTrainOptions {
                vocab_size: 400,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            again.inner().to_string(false).unwrap(),
            tok.inner().to_string(false).unwrap()
        );
        assert_eq!(back.vocab_size(), tok.vocab_size());
        assert_eq!(back.encode(SAMPLE).unwrap(), tok.encode(SAMPLE).unwrap());

        // Out-of-vocabulary ids are reported, not silently dropped.
        let bad = tok.vocab_size() as u32 + 5;
        assert!(matches!(
            tok.decode(&[1, bad]),
            Err(DataError::UnknownTokenId { id, .. }) if id == bad
        ));
    }

    #[test]
    fn incremental_decoder_matches_full_decode() {
        let (_dir, tok) = small_tokenizer();
        let text = "Ab 🦀 ünï 日本 🔥🔥 zebra\u{1F469}\u{200D}\u{1F467} end";
        let ids = tok.encode(text).unwrap();
        let mut dec = IncrementalDecoder::new();
        let mut out = String::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            let piece = dec.push(&tok, id).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
            out.push_str(&piece);
            pieces.push(piece);
        }
        out.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(out, text);
        assert_eq!(out, tok.decode(&ids).unwrap());
        // Some multi-byte char really was split across tokens (so hold-back was exercised).
        assert!(pieces.iter().any(|p| p.is_empty()), "{pieces:?}");

        // Special tokens are not printed, unless asked for.
        let ids = tok.encode("end.<|endoftext|>Start 🦀").unwrap();
        for (mut dec, want) in [
            (IncrementalDecoder::new(), "end.Start 🦀"),
            (
                IncrementalDecoder::keeping_special(),
                "end.<|endoftext|>Start 🦀",
            ),
        ] {
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&dec.push(&tok, id).unwrap());
            }
            out.push_str(&dec.finish(&tok).unwrap());
            assert_eq!(out, want);
        }
        assert_eq!(tok.decode_skip_special(&ids).unwrap(), "end.Start 🦀");

        // A lone continuation-byte token is flushed by finish() as U+FFFD.
        let mut dec = IncrementalDecoder::new();
        let lone = tok.encode("🐍").unwrap(); // not in the training text: split into bytes
        assert!(lone.len() > 1);
        assert_eq!(dec.push(&tok, lone[0]).unwrap(), "");
        assert_eq!(dec.finish(&tok).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn train_errors() {
        let missing = PathBuf::from("/definitely/not/here.txt");
        let err = train_bpe(&[missing], &BpeTrainOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("/definitely/not/here.txt"),
            "{err}"
        );
        let err = KilnTokenizer::load("/definitely/not/tokenizer.json").unwrap_err();
        assert!(
            err.to_string().contains("/definitely/not/tokenizer.json"),
            "{err}"
        );
    }
}
