//! The tokenizer of a pretrained model with what generation and chat need besides the
//! vocabulary: BOS/EOS, whether BOS starts plain text, the chat template and the stop tokens.
//!
//! Sources: a GGUF file (its `tokenizer.ggml.*` metadata, see [`crate::gguf_tokenizer`]); an
//! HF directory (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
//! `chat_template.jinja`, `generation_config.json`); or a bare `tokenizer.json` (a kiln run,
//! whose documents are separated by `<|endoftext|>`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};
use crate::gguf_tokenizer::{special_tokens, GgufVocab};
use crate::{KilnTokenizer, EOS_TOKEN};

#[derive(Debug, Clone)]
pub struct ModelTokenizer {
    pub tokenizer: KilnTokenizer,
    /// `(id, text)` of the beginning-of-sequence token, if the model has one.
    pub bos: Option<(u32, String)>,
    /// `(id, text)` of the end-of-sequence token.
    pub eos: Option<(u32, String)>,
    /// Whether BOS is put in front of plain text (as the reference implementation does).
    pub add_bos: bool,
    /// The model's Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    /// Token ids that end a generation: every end token the model declares (EOS; an HF
    /// directory's `generation_config.json` and `config.json` EOS ids; a GGUF's EOT/EOM ids and
    /// the end-of-turn token its chat template uses) and `<|endoftext|>` where the vocabulary
    /// has it. Sorted, no duplicates; an HF export writes exactly these as
    /// `generation_config.json`'s `eos_token_id`.
    pub stop_ids: Vec<u32>,
    /// Where the tokenizer came from (for messages).
    pub source: PathBuf,
}

fn io_err(path: &Path, e: std::io::Error) -> DataError {
    DataError::io("reading", path, e)
}

fn json_file(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| DataError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelTokenizer {
    /// Detects the source: a GGUF file, a directory with `tokenizer.json`, or a
    /// `tokenizer.json` file.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_file() && is_gguf(path) {
            return Self::from_gguf(path);
        }
        if path.is_dir() && path.join("tokenizer.json").is_file() {
            return Self::from_hf_dir(path);
        }
        if path.is_file() {
            return Self::from_tokenizer_json(path);
        }
        Err(DataError::MissingSource {
            path: path.join("tokenizer.json"),
        })
    }

    /// The tokenizer of a GGUF file (header only).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let vocab = GgufVocab::read(path)?;
        let tokenizer = vocab.to_tokenizer().map_err(|msg| {
            DataError::tok(
                format!("building the tokenizer of {}", path.display()),
                msg.into(),
            )
        })?;
        let special = special_tokens(&vocab);
        let bos = special.get("bos").cloned();
        let eos = special.get("eos").cloned();
        let stop_ids = gguf_stop_ids(&vocab, &tokenizer);
        Ok(Self {
            add_bos: vocab.adds_bos(),
            chat_template: vocab.chat_template.clone(),
            tokenizer,
            bos,
            eos,
            stop_ids,
            source: path.to_path_buf(),
        })
    }

    /// The tokenizer of an HF model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer = KilnTokenizer::load(dir.join("tokenizer.json"))?;
        let cfg = json_file(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let map = json_file(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let gen = json_file(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let model_cfg = json_file(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let find = |role: &str| -> Option<(u32, String)> {
            let text = token_text(cfg.get(role)).or_else(|| token_text(map.get(role)))?;
            Some((tokenizer.token_id(&text)?, text))
        };
        let by_id = |key: &str| -> Option<(u32, String)> {
            let id = *ids_of(gen.get(key).or_else(|| model_cfg.get(key))).first()?;
            Some((id, tokenizer.inner().id_to_token(id)?))
        };
        let bos = find("bos_token").or_else(|| by_id("bos_token_id"));
        let eos = find("eos_token").or_else(|| by_id("eos_token_id"));
        // BOS on plain text: the config says so, or the post-processor adds it.
        let adds_bos_itself = bos.as_ref().is_some_and(|(b, _)| {
            let with = tokenizer.inner().encode("a", true).ok();
            let without = tokenizer.inner().encode("a", false).ok();
            matches!((with, without), (Some(w), Some(wo))
                if w.get_ids().first() == Some(b) && wo.get_ids().first() != Some(b))
        });
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(adds_bos_itself)
            && bos.is_some();
        let chat_template = match dir.join("chat_template.jinja") {
            p if p.is_file() => Some(std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?),
            _ => match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the default one.
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| a.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            },
        };
        let mut stop_ids: Vec<u32> = eos.iter().map(|e| e.0).collect();
        stop_ids.extend(ids_of(gen.get("eos_token_id")));
        stop_ids.extend(ids_of(model_cfg.get("eos_token_id")));
        stop_ids.extend(tokenizer.token_id(EOS_TOKEN));
        // Ids past the vocabulary cannot be generated (and could not be decoded).
        stop_ids.retain(|&id| (id as usize) < tokenizer.vocab_size());
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            tokenizer,
            bos,
            eos,
            add_bos,
            chat_template,
            stop_ids,
            source: dir.to_path_buf(),
        })
    }

    /// A bare `tokenizer.json` (kiln runs): EOS is `<|endoftext|>`, no BOS, no template.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let tokenizer = KilnTokenizer::load(path)?;
        let eos = tokenizer.eos_id().map(|id| (id, EOS_TOKEN.to_string()));
        Ok(Self {
            stop_ids: eos.iter().map(|e| e.0).collect(),
            tokenizer,
            bos: None,
            eos,
            add_bos: false,
            chat_template: None,
            source: path.to_path_buf(),
        })
    }

    /// Token ids of a plain-text prompt: BOS first when the model expects it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos.as_ref().map(|b| b.0));
        }
        ids.extend(self.tokenizer.encode(text)?);
        Ok(ids)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) so
    /// that `transformers.AutoTokenizer.from_pretrained(dir)` loads the same tokenizer.
    pub fn save_hf(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io("creating", dir, e))?;
        self.tokenizer.save(dir.join("tokenizer.json"))?;
        let mut cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        if let Some((_, t)) = &self.bos {
            cfg["bos_token"] = Value::String(t.clone());
        }
        if let Some((_, t)) = &self.eos {
            cfg["eos_token"] = Value::String(t.clone());
        }
        if let Some(t) = &self.chat_template {
            cfg["chat_template"] = Value::String(t.clone());
        }
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap() + "\n")
            .map_err(|e| DataError::io("writing", &path, e))
    }
}

/// The stop ids a GGUF vocabulary declares: EOS, EOT and EOM, `<|endoftext|>`, and the
/// end-of-turn token its chat template uses (chat models end a turn with it even when their EOS
/// is another token).
fn gguf_stop_ids(vocab: &GgufVocab, tokenizer: &KilnTokenizer) -> Vec<u32> {
    let mut stop_ids: Vec<u32> = [vocab.eos_id, vocab.eot_id, vocab.eom_id]
        .into_iter()
        .flatten()
        .collect();
    stop_ids.extend(tokenizer.token_id(EOS_TOKEN));
    for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
        if vocab
            .chat_template
            .as_deref()
            .is_some_and(|c| c.contains(t))
        {
            stop_ids.extend(tokenizer.token_id(t));
        }
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    stop_ids
}

/// True when `path` starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf_tokenizer::{TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL};

    /// A byte-level vocabulary with `<|endoftext|>` and chat markers as control tokens.
    fn vocab() -> GgufVocab {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eom|>"]
            .map(String::from)
            .to_vec();
        let mut token_types = vec![TOKEN_TYPE_CONTROL; tokens.len()];
        for c in 'a'..='z' {
            tokens.push(c.to_string());
            token_types.push(TOKEN_TYPE_NORMAL);
        }
        GgufVocab {
            model: "gpt2".into(),
            pre: Some("gpt2".into()),
            tokens,
            token_types,
            bos_id: Some(1),
            eos_id: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn gguf_stop_ids_are_every_declared_end_token() {
        let mut v = vocab();
        let tok = v.to_tokenizer().unwrap();
        // EOS and <|endoftext|>.
        assert_eq!(gguf_stop_ids(&v, &tok), vec![0, 1]);
        // The template's end-of-turn marker, and the EOM id from the metadata.
        v.chat_template = Some("{{ '<|im_start|>' + m + '<|im_end|>' }}".into());
        v.eom_id = Some(3);
        assert_eq!(gguf_stop_ids(&v, &tok), vec![0, 1, 2, 3]);
        // An EOT id alone is enough too.
        v.chat_template = None;
        v.eom_id = None;
        v.eot_id = Some(2);
        assert_eq!(gguf_stop_ids(&v, &tok), vec![0, 1, 2]);
    }

    #[test]
    fn hf_stop_ids_join_generation_config_and_config_json() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        vocab()
            .to_tokenizer()
            .unwrap()
            .save(d.join("tokenizer.json"))
            .unwrap();
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"eos_token": "<|im_end|>"}"#,
        )
        .unwrap();
        std::fs::write(
            d.join("generation_config.json"),
            r#"{"eos_token_id": [2, 3]}"#,
        )
        .unwrap();
        std::fs::write(d.join("config.json"), r#"{"eos_token_id": [1, 2, 99999]}"#).unwrap();
        let tok = ModelTokenizer::from_hf_dir(d).unwrap();
        assert_eq!(tok.eos, Some((2, "<|im_end|>".to_string())));
        // 99999 is past the vocabulary: it can never be generated.
        assert_eq!(tok.stop_ids, vec![0, 1, 2, 3]);
    }
}
