//! Tokenizers stored in GGUF files (llama.cpp's `tokenizer.ggml.*` metadata), rebuilt as
//! Hugging Face tokenizers so everything downstream ([`KilnTokenizer`], streaming decode, the
//! chat template) works unchanged.
//!
//! Only the header is read (a small reader of its own, no tensor data), so this is instant and
//! works on vocabulary-only GGUF files too.
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE from the tokens and merges. The text is
//!   split before BPE the way llama.cpp splits it for the file's `tokenizer.ggml.pre`: for
//!   `smollm` (and `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`) first
//!   every `\p{N}` alone (digits one by one), then the GPT-2 rule; `llama3`-style, `qwen2`-style
//!   and plain `gpt2` have their own rules (see [`pre_split_regexes`]).
//! * `tokenizer.ggml.model = "llama"`: SentencePiece BPE; merges recovered from the scores
//!   (as transformers does), byte fallback, `▁` for spaces, and a prefix space unless
//!   `tokenizer.ggml.add_space_prefix` is false.
//!
//! Tokens the file marks as control (type 3) become special added tokens, user-defined ones
//! (type 4) plain added tokens, so both are matched whole in text.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{DataError, Result};
use crate::KilnTokenizer;

/// A GGUF metadata value (the one GGUF reader's, `kiln_gguf`).
pub use kiln_gguf::GgufValue as MetaValue;

/// Reads the metadata key/values of a GGUF file (not the tensor table or data).
pub fn read_gguf_metadata(path: &Path) -> Result<BTreeMap<String, MetaValue>> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io("opening GGUF", path, e))?;
    // SAFETY: read-only map of a file we do not modify.
    let mmap =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io("mapping GGUF", path, e))?;
    parse_metadata(&mmap).map_err(|msg| DataError::Gguf {
        path: path.to_path_buf(),
        msg: format!("reading the GGUF metadata: {msg}"),
    })
}

fn parse_metadata(buf: &[u8]) -> std::result::Result<BTreeMap<String, MetaValue>, String> {
    kiln_gguf::read_header(buf)
        .map(|h| h.metadata)
        .map_err(|e| e.0)
}

/// The tokenizer part of a GGUF's metadata.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name (`smollm`, `llama-bpe`, ...).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub scores: Vec<f32>,
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`: end of turn (chat models whose EOS is another token).
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`: end of message (e.g. Llama 3.1 tool calls).
    pub eom_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
pub const TOKEN_TYPE_BYTE: i32 = 6;

impl GgufVocab {
    /// Reads the `tokenizer.*` keys of a GGUF file.
    pub fn read(path: &Path) -> Result<Self> {
        let meta = read_gguf_metadata(path)?;
        Self::from_metadata(&meta).map_err(|msg| {
            DataError::tok(
                format!("reading the GGUF tokenizer of {}", path.display()),
                msg.into(),
            )
        })
    }

    pub fn from_metadata(meta: &BTreeMap<String, MetaValue>) -> std::result::Result<Self, String> {
        let get = |k: &str| meta.get(&format!("tokenizer.ggml.{k}"));
        let strings = |k: &str| -> std::result::Result<Vec<String>, String> {
            match get(k) {
                None => Ok(vec![]),
                Some(v) => v
                    .as_array()
                    .ok_or_else(|| format!("tokenizer.ggml.{k} is not an array"))?
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("tokenizer.ggml.{k} holds a non-string"))
                    })
                    .collect(),
            }
        };
        let model = get("model")
            .and_then(|v| v.as_str())
            .ok_or("no tokenizer.ggml.model in the metadata (the file has no tokenizer)")?
            .to_string();
        let tokens = strings("tokens")?;
        if tokens.is_empty() {
            return Err("tokenizer.ggml.tokens is missing or empty".into());
        }
        let token_types = match get("token_type").and_then(|v| v.as_array()) {
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
            Some(a) => a
                .iter()
                .map(|x| x.as_i64().map_or(TOKEN_TYPE_NORMAL, |v| v as i32))
                .collect(),
        };
        if token_types.len() != tokens.len() {
            return Err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            ));
        }
        let scores = get("scores")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
            .unwrap_or_default();
        let id = |k: &str| {
            get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        Ok(Self {
            pre: get("pre").and_then(|v| v.as_str()).map(str::to_string),
            merges: strings("merges")?,
            bos_id: id("bos_token_id"),
            eos_id: id("eos_token_id"),
            eot_id: id("eot_token_id"),
            eom_id: id("eom_token_id"),
            unk_id: id("unknown_token_id"),
            pad_id: id("padding_token_id"),
            add_bos: get("add_bos_token").and_then(|v| v.as_bool()),
            add_eos: get("add_eos_token").and_then(|v| v.as_bool()),
            add_space_prefix: get("add_space_prefix").and_then(|v| v.as_bool()),
            chat_template: meta
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            model,
            tokens,
            token_types,
            scores,
        })
    }

    /// Whether llama.cpp adds BOS in front of plain text for this vocabulary.
    pub fn adds_bos(&self) -> bool {
        // llama.cpp's default: yes for SentencePiece, no for byte-level BPE.
        self.add_bos.unwrap_or(self.model == "llama") && self.bos_id.is_some()
    }

    /// The Hugging Face tokenizer this vocabulary describes.
    pub fn to_tokenizer(&self) -> std::result::Result<KilnTokenizer, String> {
        let mut tok = match self.model.as_str() {
            "gpt2" => self.byte_level_bpe()?,
            "llama" => self.sentencepiece_bpe()?,
            other => {
                return Err(format!(
                    "tokenizer.ggml.model {other:?} is not supported (kiln reads \"gpt2\" byte-level BPE and \"llama\" SentencePiece)"
                ))
            }
        };
        let added = |types: i32, special: bool| -> Vec<AddedToken> {
            self.tokens
                .iter()
                .zip(&self.token_types)
                .filter(|(_, &t)| t == types)
                .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
                .collect()
        };
        tok.add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
            .map_err(|e| e.to_string())?;
        tok.add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
            .map_err(|e| e.to_string())?;
        Ok(KilnTokenizer::from_tokenizer(tok))
    }

    fn vocab(&self) -> Vocab {
        // A vocabulary may repeat a string (unused slots); the first id wins, as in llama.cpp.
        let mut v = Vocab::default();
        for (i, t) in self.tokens.iter().enumerate().rev() {
            v.insert(t.clone(), i as u32);
        }
        v
    }

    fn byte_level_bpe(&self) -> std::result::Result<Tokenizer, String> {
        let merges = self
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("merge {m:?} is not \"a b\""))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let pre = self.pre.as_deref().unwrap_or("default");
        let (regexes, ignore_merges) = pre_split_regexes(pre);
        let bpe = BPE::builder()
            .vocab_and_merges(self.vocab(), merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| e.to_string())?;
        let mut tok = Tokenizer::new(bpe);
        let mut pres: Vec<PreTokenizerWrapper> = Vec::new();
        for r in regexes {
            let split = Split::new(
                SplitPattern::Regex(r.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("pre-tokenizer regex {r:?}: {e}"))?;
            pres.push(split.into());
        }
        pres.push(
            ByteLevel::default()
                .add_prefix_space(false)
                .trim_offsets(false)
                .use_regex(false)
                .into(),
        );
        tok.with_pre_tokenizer(Some(PreSequence::new(pres)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(tok)
    }

    fn sentencepiece_bpe(&self) -> std::result::Result<Tokenizer, String> {
        let vocab = self.vocab();
        let scores: Vec<f32> = if self.scores.len() == self.tokens.len() {
            self.scores.clone()
        } else {
            // No scores: earlier tokens merge first.
            (0..self.tokens.len()).map(|i| -(i as f32)).collect()
        };
        let merges = merges_from_scores(&self.tokens, &scores, &vocab);
        let mut b = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = self.unk_id {
            b = b.unk_token(self.tokens[unk as usize].clone());
        }
        let bpe = b.build().map_err(|e| e.to_string())?;
        let mut tok = Tokenizer::new(bpe);
        let replace = Replace::new(" ", "\u{2581}").map_err(|e| e.to_string())?;
        if self.add_space_prefix.unwrap_or(true) {
            tok.with_normalizer(Some(NormalizerSequence::new(vec![
                Prepend::new("\u{2581}".into()).into(),
                replace.into(),
            ])))
            .map_err(|e| e.to_string())?;
        } else {
            tok.with_normalizer(Some(replace))
                .map_err(|e| e.to_string())?;
        }
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new("\u{2581}", " ")
                .map_err(|e| e.to_string())?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if self.add_space_prefix.unwrap_or(true) {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tok.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tok)
    }
}

/// BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
/// best-scored merged token first (transformers' `generate_merges`).
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut all: Vec<(String, String, f32, usize, usize, usize)> = Vec::new();
    for (order, (tok, &score)) in tokens.iter().zip(scores).enumerate() {
        let mut local = Vec::new();
        let chars: Vec<(usize, char)> = tok.char_indices().collect();
        for &(i, _) in chars.iter().skip(1) {
            let (l, r) = tok.split_at(i);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((l.to_string(), r.to_string(), li, ri));
            }
        }
        local.sort_by_key(|x| (x.2, x.3));
        for (l, r, _, _) in local {
            let (ll, rl) = (l.chars().count(), r.chars().count());
            all.push((l, r, score, ll, rl, order));
        }
    }
    // Highest score first, then longer pieces; stable in the order found.
    all.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(b.3.cmp(&a.3))
            .then(b.4.cmp(&a.4))
            .then(a.5.cmp(&b.5))
    });
    all.into_iter().map(|(l, r, ..)| (l, r)).collect()
}

const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp splits text with, in order, for a `tokenizer.ggml.pre` name, and
/// whether whole words found in the vocabulary skip the merges (llama 3's `ignore_merges`).
/// Unknown names get the GPT-2 rule, llama.cpp's default.
pub fn pre_split_regexes(pre: &str) -> (Vec<&'static str>, bool) {
    match pre {
        // llama.cpp: "\p{N}" then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            (vec![r"\p{N}", GPT2_SPLIT], false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            (vec![LLAMA3_SPLIT], true)
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" => (vec![QWEN2_SPLIT], false),
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "default" => (vec![GPT2_SPLIT], false),
        other => {
            tracing::warn!(
                pre = other,
                "unknown GGUF pre-tokenizer; splitting text with the GPT-2 rule"
            );
            (vec![GPT2_SPLIT], false)
        }
    }
}

/// The GGUF `tokenizer.ggml.*` vocabulary of an HF byte-level BPE tokenizer (for export).
/// `pre` is the pre-tokenizer name recorded for llama.cpp (see [`guess_pre`]).
pub fn vocab_from_tokenizer(tok: &KilnTokenizer) -> std::result::Result<GgufVocab, String> {
    let inner = tok.inner();
    let json: serde_json::Value =
        serde_json::from_str(&inner.to_string(false).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(format!(
            "only BPE tokenizers can be written to GGUF (this one is {})",
            model["type"]
        ));
    }
    let vocab = inner.get_vocab(true);
    let n = vocab
        .values()
        .copied()
        .max()
        .map(|m| m as usize + 1)
        .unwrap_or(0);
    let mut tokens = vec![String::new(); n];
    for (t, &i) in &vocab {
        tokens[i as usize] = t.clone();
    }
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
        }
    }
    let mut token_types = vec![TOKEN_TYPE_NORMAL; n];
    for (id, added) in inner.get_added_tokens_decoder() {
        token_types[id as usize] = if added.special {
            TOKEN_TYPE_CONTROL
        } else {
            TOKEN_TYPE_USER_DEFINED
        };
    }
    let merges: Vec<String> = match &model["merges"] {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                )),
                other => Err(format!("unexpected merge {other}")),
            })
            .collect::<std::result::Result<_, _>>()?,
        _ => vec![],
    };
    Ok(GgufVocab {
        model: "gpt2".into(),
        pre: Some(guess_pre(&json["pre_tokenizer"]).to_string()),
        tokens,
        token_types,
        merges,
        ..Default::default()
    })
}

/// The llama.cpp pre-tokenizer name that matches an HF `pre_tokenizer` JSON: `smollm` when
/// digits are split one by one before a byte-level split, `llama-bpe` for the llama 3 regex,
/// else `gpt2`.
pub fn guess_pre(pre: &serde_json::Value) -> &'static str {
    let text = pre.to_string();
    if text.contains("\"individual_digits\":true") || text.contains(r#""Regex":"\\p{N}""#) {
        "smollm"
    } else if text.contains(r"\\p{N}{1,3}") {
        "llama-bpe"
    } else if text.contains(r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|") {
        "qwen2"
    } else {
        "gpt2"
    }
}

/// Special token strings and ids of a vocabulary, by role.
pub fn special_tokens(v: &GgufVocab) -> HashMap<&'static str, (u32, String)> {
    let mut m = HashMap::new();
    for (role, id) in [
        ("bos", v.bos_id),
        ("eos", v.eos_id),
        ("unk", v.unk_id),
        ("pad", v.pad_id),
    ] {
        if let Some(id) = id {
            m.insert(role, (id, v.tokens[id as usize].clone()));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2_vocab(pre: &str) -> GgufVocab {
        // A byte-level alphabet for ASCII letters/digits/space plus a few merges.
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
        for c in ('a'..='z').chain('0'..='9') {
            tokens.push(c.to_string());
        }
        tokens.push("Ġ".into());
        for t in ["Ġa", "ab", "12", "Ġab"] {
            tokens.push(t.into());
        }
        let mut types = vec![TOKEN_TYPE_NORMAL; tokens.len()];
        types[0] = TOKEN_TYPE_CONTROL;
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            merges: vec!["Ġ a".into(), "a b".into(), "1 2".into(), "Ġa b".into()],
            tokens,
            token_types: types,
            eos_id: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn smollm_splits_digits_one_by_one_and_gpt2_does_not() {
        let smol = gpt2_vocab("smollm").to_tokenizer().unwrap();
        let gpt2 = gpt2_vocab("gpt2").to_tokenizer().unwrap();
        let id = |t: &KilnTokenizer, s: &str| t.token_id(s).unwrap();
        assert_eq!(
            smol.encode("ab 12").unwrap(),
            vec![
                id(&smol, "ab"),
                id(&smol, "Ġ"),
                id(&smol, "1"),
                id(&smol, "2")
            ]
        );
        assert_eq!(
            gpt2.encode("ab 12").unwrap(),
            vec![id(&gpt2, "ab"), id(&gpt2, "Ġ"), id(&gpt2, "12")]
        );
        assert_eq!(smol.encode(" ab").unwrap(), vec![id(&smol, "Ġab")]);
        // Control tokens are matched whole and decode back.
        let ids = smol.encode("a<|endoftext|>b").unwrap();
        assert_eq!(ids, vec![id(&smol, "a"), 0, id(&smol, "b")]);
        assert_eq!(smol.decode(&ids).unwrap(), "a<|endoftext|>b");
    }

    #[test]
    fn sentencepiece_vocab_uses_scores_and_byte_fallback() {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_TYPE_BYTE);
        }
        for t in ["▁", "a", "b", "▁a", "ab", "▁ab"] {
            tokens.push(t.into());
            types.push(TOKEN_TYPE_NORMAL);
        }
        let n = tokens.len();
        let scores: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
        let v = GgufVocab {
            model: "llama".into(),
            tokens,
            token_types: types,
            scores,
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            ..Default::default()
        };
        assert!(v.adds_bos());
        let tok = v.to_tokenizer().unwrap();
        let id = |s: &str| tok.token_id(s).unwrap();
        assert_eq!(tok.encode("ab").unwrap(), vec![id("▁ab")]);
        // "é" is not in the vocabulary: its UTF-8 bytes.
        assert_eq!(
            tok.encode("a é").unwrap(),
            vec![id("▁a"), id("▁"), id("<0xC3>"), id("<0xA9>")]
        );
        assert_eq!(
            tok.decode(&tok.encode("ab a é").unwrap()).unwrap(),
            "ab a é"
        );
    }

    #[test]
    fn corrupt_headers_are_errors_not_panics() {
        assert!(parse_metadata(b"GGUF").is_err());
        assert!(parse_metadata(b"NOPE\x03\0\0\0").is_err());
        let mut h = b"GGUF\x03\0\0\0".to_vec();
        h.extend(0u64.to_le_bytes());
        h.extend(1u64.to_le_bytes()); // one key...
        h.extend(u64::MAX.to_le_bytes()); // ...with an absurd length
        let e = parse_metadata(&h).unwrap_err();
        assert!(e.contains("more than"), "{e}");
    }
}
