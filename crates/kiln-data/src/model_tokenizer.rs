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
    /// Token ids that end a generation: EOS, `generation_config.json`'s EOS ids and
    /// `<|endoftext|>` where the vocabulary has it.
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
        let mut stop_ids: Vec<u32> = eos.iter().map(|e| e.0).collect();
        stop_ids.extend(tokenizer.token_id(EOS_TOKEN));
        // Chat models end a turn with their end-of-turn token even when EOS is another one.
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
        stop_ids.extend(tokenizer.token_id(EOS_TOKEN));
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

/// True when `path` starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}
