//! Sentence embeddings as sentence-transformers defines them: a directory whose `modules.json`
//! chains a `Transformer` (here the decoder's trunk, e.g. EmbeddingGemma's bidirectional
//! Gemma 3), a `Pooling` (mean over the tokens), `Dense` layers and a `Normalize`.
//!
//! ```text
//! h = Trunk(tokens)                 (t, d)      final hidden states, after the last norm
//! e = mean_t h                      (d)
//! e = W_k ... W_1 e                 (Dense: y = W x, no bias, identity activation)
//! e = e / |e|                       (Normalize)
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::hf::load_hf_dir;
use crate::{Llama, ModelError, TokenBatch};

/// The modules file of a sentence-transformers directory.
pub const MODULES_JSON: &str = "modules.json";

/// True when `dir` is a sentence-transformers model directory.
pub fn is_sentence_transformers_dir(dir: &Path) -> bool {
    dir.join(MODULES_JSON).is_file()
}

#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    #[serde(default)]
    bias: bool,
    #[serde(default)]
    activation_function: Option<String>,
}

/// A sentence encoder: the trunk, mean pooling, dense layers `(out, in)`, and whether the
/// result is normalised.
pub struct SentenceEncoder {
    pub model: Llama,
    dense: Vec<Tensor>,
    normalize: bool,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelError> {
    let err = |msg: String| ModelError::Weights {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| err(format!("not what sentence-transformers writes: {e}")))
}

impl SentenceEncoder {
    /// Loads a sentence-transformers directory. Modules kiln cannot run (a pooling other than
    /// the mean, a dense layer with a bias or an activation) are errors naming the file.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let modules: Vec<Module> = read_json(&dir.join(MODULES_JSON))?;
        let mut model = None;
        let mut pooled = false;
        let mut dense = Vec::new();
        let mut normalize = false;
        for m in &modules {
            let at: PathBuf = dir.join(&m.path);
            let unsupported = |what: String| ModelError::Weights {
                path: at.display().to_string(),
                msg: what,
            };
            let short = m.kind.rsplit('.').next().unwrap_or(&m.kind);
            match short {
                "Transformer" => model = Some(load_trunk(&at)?),
                "Pooling" => {
                    let p: PoolingConfig = read_json(&at.join("config.json"))?;
                    let others = p.pooling_mode_cls_token
                        || p.pooling_mode_max_tokens
                        || p.pooling_mode_mean_sqrt_len_tokens
                        || p.pooling_mode_weightedmean_tokens
                        || p.pooling_mode_lasttoken;
                    if !p.pooling_mode_mean_tokens || others {
                        return Err(unsupported(
                            "kiln pools sentence embeddings by the mean over tokens only".into(),
                        ));
                    }
                    pooled = true;
                }
                "Dense" => {
                    let c: DenseConfig = read_json(&at.join("config.json"))?;
                    let identity = c
                        .activation_function
                        .as_deref()
                        .is_none_or(|a| a.ends_with("Identity"));
                    if c.bias || !identity {
                        return Err(unsupported(format!(
                            "a Dense layer with bias = {} and activation {:?} (kiln runs bias-free, identity ones)",
                            c.bias, c.activation_function
                        )));
                    }
                    let file = at.join("model.safetensors");
                    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
                        ModelError::Weights {
                            path: file.display().to_string(),
                            msg: format!("cannot read: {e}"),
                        }
                    })?;
                    let w = tensors
                        .get("linear.weight")
                        .ok_or_else(|| unsupported("no tensor \"linear.weight\"".into()))?
                        .to_dtype(DType::F32)?;
                    if w.dims() != [c.out_features, c.in_features] {
                        return Err(unsupported(format!(
                            "linear.weight is {:?}, the config says ({}, {})",
                            w.dims(),
                            c.out_features,
                            c.in_features
                        )));
                    }
                    dense.push(w);
                }
                "Normalize" => normalize = true,
                other => {
                    return Err(unsupported(format!(
                        "sentence-transformers module {other:?} is not supported (kiln runs Transformer, Pooling, Dense, Normalize)"
                    )))
                }
            }
        }
        let model = model.ok_or_else(|| ModelError::Weights {
            path: dir.join(MODULES_JSON).display().to_string(),
            msg: "no Transformer module".into(),
        })?;
        if !pooled {
            return Err(ModelError::Weights {
                path: dir.join(MODULES_JSON).display().to_string(),
                msg: "no Pooling module (kiln embeds sentences by mean pooling)".into(),
            });
        }
        Ok(Self {
            model,
            dense,
            normalize,
        })
    }

    /// The embedding's size.
    pub fn dim(&self) -> usize {
        self.dense
            .last()
            .map_or(self.model.config().dim, |w| w.dims()[0])
    }

    /// The embedding of one tokenized text (with the special tokens the tokenizer frames it
    /// with; the mean runs over all of them, as sentence-transformers' does).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let t = ids.len();
        let x = Tensor::from_slice(ids, (1, t), self.model.device())?;
        let hidden = self.model.hidden_states(&TokenBatch::new(x), None)?; // (t, d)
        let mut e = hidden.mean_keepdim(0)?; // (1, d)
        for w in &self.dense {
            e = e.matmul(&w.t()?)?;
        }
        let mut v: Vec<f32> = e.flatten_all()?.to_vec1()?;
        if self.normalize {
            let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
            v.iter_mut().for_each(|x| *x /= norm.max(1e-12));
        }
        Ok(v)
    }
}

fn load_trunk(dir: &Path) -> Result<Llama, ModelError> {
    let (cfg, params) = load_hf_dir(dir, &Device::Cpu)?;
    Llama::new(&cfg, &params)
}
