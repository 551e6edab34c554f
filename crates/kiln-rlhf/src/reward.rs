//! Where rewards come from: a trained reward model, a built-in programmatic reward, or a
//! user's program. Plus loading, scoring and exporting reward models.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use candle_core::{DType, Device};
use kiln_chat::ChatFormat;
use kiln_data::ModelTokenizer;
use kiln_infer::Message;
use kiln_model::{hf, Llama, ModelConfig, Params, ScalarHead};
use serde_json::Value;

use crate::learner::HEAD_FILE;
use crate::seqs::{last_token_scores, Padding, Seq, SeqBatch};
use crate::RlhfError;

/// The built-in programmatic rewards (`--reward-fn`), each in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub enum RewardFn {
    /// `contains:WORD`: 1 if the response contains WORD, else 0.
    Contains(String),
    /// `length:N`: `1 - |tokens - N| / N`, floored at 0.
    Length(usize),
    /// `json-valid`: 1 if the response parses as JSON.
    JsonValid,
}

impl RewardFn {
    pub fn parse(spec: &str) -> Result<Self, RlhfError> {
        let bad = |m: &str| {
            RlhfError::Config(format!(
                "--reward-fn {spec:?}: {m} (expected contains:WORD, length:N or json-valid)"
            ))
        };
        match spec.split_once(':') {
            Some(("contains", w)) if !w.is_empty() => Ok(Self::Contains(w.to_string())),
            Some(("length", n)) => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Self::Length(n)),
                _ => Err(bad("the length must be a positive integer")),
            },
            None if spec == "json-valid" => Ok(Self::JsonValid),
            _ => Err(bad("unknown reward function")),
        }
    }

    /// The reward of a response of `n_tokens` tokens (its end-of-turn token not counted).
    pub fn score(&self, response: &str, n_tokens: usize) -> f64 {
        match self {
            Self::Contains(w) => f64::from(u8::from(response.contains(w.as_str()))),
            Self::Length(n) => {
                let n = *n as f64;
                (1.0 - (n_tokens as f64 - n).abs() / n).max(0.0)
            }
            Self::JsonValid => f64::from(u8::from(
                serde_json::from_str::<Value>(response.trim()).is_ok(),
            )),
        }
    }
}

/// A user's reward program (`--reward-cmd`): reads one JSON object `{"prompt", "response",
/// "record"}` per line on stdin and prints one number per line. It is started once and kept
/// running across batches.
pub struct RewardCmd {
    cmd: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl RewardCmd {
    pub fn spawn(cmd: &str) -> Result<Self, RlhfError> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| RlhfError::Reward(format!("--reward-cmd {cmd:?}: cannot start: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            cmd: cmd.to_string(),
            child,
            stdin,
            stdout,
        })
    }

    /// The reward of one item: writes its line, reads one number back.
    pub fn score(&mut self, item: &Value) -> Result<f64, RlhfError> {
        let err = |m: String| RlhfError::Reward(format!("--reward-cmd {:?}: {m}", self.cmd));
        let exited = |child: &mut Child| match child.try_wait() {
            Ok(Some(status)) => format!(" (the program exited with {status})"),
            _ => String::new(),
        };
        if let Err(e) = writeln!(self.stdin, "{item}").and_then(|_| self.stdin.flush()) {
            let why = exited(&mut self.child);
            return Err(err(format!("writing a request failed: {e}{why}")));
        }
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => {
                let why = exited(&mut self.child);
                return Err(err(format!(
                    "the program closed its output instead of printing a reward{why}"
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(err(format!("reading its output: {e}"))),
        }
        let v: f64 = line.trim().parse().map_err(|_| {
            err(format!(
                "printed {:?}, not a number (print one number per input line)",
                line.trim_end()
            ))
        })?;
        if !v.is_finite() {
            return Err(err(format!("printed a non-finite reward {v}")));
        }
        Ok(v)
    }
}

impl Drop for RewardCmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A trained reward model: a trunk and a scalar head read at the last token.
pub struct RewardModel {
    pub model: Llama,
    pub head: ScalarHead,
    pub format: ChatFormat,
    pub config: ModelConfig,
    /// The checkpoint it was loaded from.
    pub checkpoint: PathBuf,
}

/// The checkpoint behind a reward-model path (a run directory or one of its checkpoints), or
/// `None` when `path` is not a kiln reward model.
pub fn reward_checkpoint(path: &Path) -> Result<Option<PathBuf>, RlhfError> {
    let dir = if path.join("checkpoints").is_dir() {
        match kiln_load::latest_checkpoint(path)? {
            Some((_, d)) => d,
            None => return Ok(None),
        }
    } else {
        path.to_path_buf()
    };
    Ok(dir.join(HEAD_FILE).is_file().then_some(dir))
}

/// The run directory of a checkpoint (`RUN/checkpoints/step-N`).
fn run_of(checkpoint: &Path) -> PathBuf {
    checkpoint
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| checkpoint.to_path_buf())
}

/// A reward run's weights: the base with any LoRA adapter merged, as dense params.
fn reward_weights(ckpt: &Path, device: &Device) -> Result<(ModelConfig, Params), RlhfError> {
    let cfg_path = ckpt.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| RlhfError::Io {
        path: cfg_path.clone(),
        source: e,
    })?;
    let root: toml::Table = text
        .parse()
        .map_err(|e| RlhfError::Config(format!("{}: {e}", cfg_path.display())))?;
    if root.contains_key("lora") {
        let base = root
            .get("source")
            .and_then(|s| s.get("model"))
            .and_then(|m| m.as_str())
            .ok_or_else(|| {
                RlhfError::Config(format!(
                    "{}: a LoRA reward model must name its base in [source] model",
                    cfg_path.display()
                ))
            })?;
        let w = kiln_load::load_weights(Path::new(base), device)?;
        let adapter = kiln_load::load_adapter(&ckpt.join("adapter"), &w.config, device)?;
        kiln_load::merge_adapter(&w.params, &adapter)?;
        Ok((w.config, w.params))
    } else {
        let w = kiln_load::load_weights(ckpt, device)?;
        Ok((w.config, w.params))
    }
}

impl RewardModel {
    /// Loads a reward model trained by `kiln reward train` (a run directory or checkpoint).
    pub fn load(path: &Path, device: &Device) -> Result<Self, RlhfError> {
        let ckpt = reward_checkpoint(path)?.ok_or_else(|| {
            RlhfError::Config(format!(
                "{} is not a kiln reward model (no checkpoint with {HEAD_FILE}); train one with `kiln reward train`",
                path.display()
            ))
        })?;
        kiln_load::verify_checkpoint(&ckpt)?;
        let (config, params) = reward_weights(&ckpt, device)?;
        let model = Llama::new(&config, &params)?;
        let head_w = candle_core::safetensors::load(ckpt.join(HEAD_FILE), device)?;
        let w = head_w
            .get("score.weight")
            .ok_or_else(|| RlhfError::Config(format!("{}: no score.weight", ckpt.display())))?;
        let tokenizer = kiln_load::load_tokenizer(&run_of(&ckpt))?;
        let format = ChatFormat::new(tokenizer, None)?;
        Ok(Self {
            model,
            head: ScalarHead::from_weight(w.to_dtype(DType::F32)?),
            format,
            config,
            checkpoint: ckpt,
        })
    }

    /// The score of `response` to a one-turn `prompt`, rendered as in training.
    pub fn score_text(&self, prompt: &str, response: &str) -> Result<f64, RlhfError> {
        let (mut ids, prompt_len) = self.format.encode_completion(
            &[Message::new("user", prompt)],
            response,
            "the response",
        )?;
        if let Some(e) = self.format.tokenizer.eos.as_ref().map(|e| e.0) {
            if ids.last() != Some(&e) {
                ids.push(e);
            }
        }
        Ok(self.score_ids(&[Seq { ids, prompt_len }])?[0])
    }

    /// Scores of token sequences (each already ending as training sequences end).
    pub fn score_ids(&self, seqs: &[Seq]) -> Result<Vec<f64>, RlhfError> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(8) {
            let refs: Vec<&Seq> = chunk.iter().collect();
            let b = SeqBatch::new(&refs, Padding::Right, self.model.device())?;
            out.extend(last_token_scores(&self.model, &self.head, &b)?);
        }
        Ok(out)
    }

    /// Refuses a policy whose tokenizer differs (scores are read on the policy's token ids).
    pub fn check_tokenizer(&self, policy: &ModelTokenizer) -> Result<(), RlhfError> {
        let mine = &self.format.tokenizer;
        let probe = "Hello, world! 12345 <|im_end|> Ünïcødé\n\tend";
        let same = mine.tokenizer.vocab_size() == policy.tokenizer.vocab_size()
            && mine.eos.as_ref().map(|e| e.0) == policy.eos.as_ref().map(|e| e.0)
            && mine.tokenizer.encode(probe)? == policy.tokenizer.encode(probe)?;
        if same {
            Ok(())
        } else {
            Err(RlhfError::Config(format!(
                "the reward model {} uses a different tokenizer than the policy ({} tokens vs {}): train the reward model from the policy's base",
                self.checkpoint.display(),
                mine.tokenizer.vocab_size(),
                policy.tokenizer.vocab_size()
            )))
        }
    }
}

/// Writes a reward model as an HF directory that transformers loads as
/// `LlamaForSequenceClassification` with one label: the trunk's weights, `score.weight`, and
/// a `pad_token_id` other than EOS (transformers reads the score at the last non-pad token).
pub fn export_reward_hf(path: &Path, out: &Path, dtype: DType) -> Result<(), RlhfError> {
    let device = Device::Cpu;
    let ckpt = reward_checkpoint(path)?
        .ok_or_else(|| RlhfError::Config(format!("{} is not a reward model", path.display())))?;
    let (config, params) = reward_weights(&ckpt, &device)?;
    let tok = kiln_load::load_tokenizer(&run_of(&ckpt))?;
    let (bos, eos) = (tok.bos.as_ref().map(|b| b.0), tok.eos.as_ref().map(|e| e.0));
    hf::save_hf_weights(out, &config, &params, dtype, bos, eos)?;
    tok.save_hf(out, config.max_seq_len)?;
    let weights = out.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &device)?;
    tensors.remove("lm_head.weight");
    let head = candle_core::safetensors::load(ckpt.join(HEAD_FILE), &device)?;
    tensors.insert("score.weight".into(), head["score.weight"].to_dtype(dtype)?);
    candle_core::safetensors::save(&tensors, &weights)?;
    let cfg_path = out.join("config.json");
    let io = |e: std::io::Error| RlhfError::Io {
        path: cfg_path.clone(),
        source: e,
    };
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(io)?)?;
    c["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
    c["num_labels"] = 1.into();
    c["id2label"] = serde_json::json!({"0": "LABEL_0"});
    c["label2id"] = serde_json::json!({"LABEL_0": 0});
    // transformers reads the score at the last token that is not `pad_token_id`, and kiln's
    // sequences end with EOS: the pad must be another token, or the score would be read one
    // token early. Without one, transformers takes the last position (batches of one).
    let pad = [
        "<|endoftext|>",
        "<pad>",
        "[PAD]",
        "<|finetune_right_pad_id|>",
    ]
    .iter()
    .filter_map(|t| tok.tokenizer.token_id(t))
    .find(|&id| Some(id) != eos);
    c["pad_token_id"] = serde_json::json!(pad);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&c)? + "\n").map_err(io)?;
    Ok(())
}

/// The reward of on-policy samples.
pub enum RewardSource {
    Fn(RewardFn),
    Cmd(RewardCmd),
    Model(Box<RewardModel>),
}

/// One sample to score.
pub struct RewardItem<'a> {
    pub prompt: &'a str,
    pub response: &'a str,
    pub record: &'a Value,
    /// Response tokens, its end-of-turn token not counted.
    pub n_tokens: usize,
    /// Prompt + response ids as the policy produced them (a reward model scores these).
    pub seq: Seq,
}

impl RewardSource {
    /// How the run names its reward, for the config and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Fn(f) => format!("{f:?}"),
            Self::Cmd(c) => format!("command {:?}", c.cmd),
            Self::Model(m) => format!("reward model {}", m.checkpoint.display()),
        }
    }

    pub fn score(&mut self, items: &[RewardItem]) -> Result<Vec<f64>, RlhfError> {
        match self {
            Self::Fn(f) => Ok(items
                .iter()
                .map(|i| f.score(i.response, i.n_tokens))
                .collect()),
            Self::Cmd(c) => items
                .iter()
                .map(|i| {
                    c.score(&serde_json::json!({
                        "prompt": i.prompt, "response": i.response, "record": i.record
                    }))
                })
                .collect(),
            Self::Model(m) => {
                let eos = m.format.tokenizer.eos.as_ref().map(|e| e.0);
                let seqs: Vec<Seq> = items
                    .iter()
                    .map(|i| {
                        let mut s = i.seq.clone();
                        if let Some(e) = eos.filter(|e| s.ids.last() != Some(e)) {
                            s.ids.push(e);
                        }
                        s
                    })
                    .collect();
                m.score_ids(&seqs)
            }
        }
    }
}
