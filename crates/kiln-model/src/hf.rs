//! Hugging Face checkpoints: a directory with `config.json` and `model.safetensors` (or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`), as
//! `save_pretrained` writes it, for the LLaMA family (`LlamaForCausalLM`,
//! `MistralForCausalLM`; SmolLM2 is Llama). transformers' Llama uses the same half-split RoPE
//! as kiln, so loading is renaming plus a cast to f32; export is the reverse.
//!
//! The safetensors files are memory-mapped and each tensor is converted straight from the
//! mapping into the model's f32 storage (bf16/f16/f32 supported), with no intermediate copy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::params::layout;
use crate::{ModelConfig, ModelError, Params, RopeScaling};

/// The file names of an HF model directory.
pub const CONFIG_JSON: &str = "config.json";
pub const SINGLE_WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// True when `dir` looks like an HF model directory (a `config.json` and safetensors weights).
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.is_dir()
        && dir.join(CONFIG_JSON).is_file()
        && (dir.join(SINGLE_WEIGHTS).is_file() || dir.join(WEIGHTS_INDEX).is_file())
}

/// The `config.json` fields kiln reads (unknown ones are ignored, as transformers does).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes theta and scaling together here.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

const ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

fn rope_from_json(v: &serde_json::Value, what: &str) -> Result<Option<RopeScaling>, String> {
    let obj = match v {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::Object(o) => o,
        other => return Err(format!("{what} should be an object, got {other}")),
    };
    let ty = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, String> {
        obj.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("{what} ({ty}) needs a number {k:?}"))
    };
    match ty {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(format!(
            "{what}: RoPE type {other:?} is not supported (kiln supports default, linear and llama3)"
        )),
    }
}

impl HfConfig {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(CONFIG_JSON);
        let err = |msg: String| ModelError::Weights {
            path: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        serde_json::from_str(&text).map_err(|e| err(format!("not a model config: {e}")))
    }

    /// The kiln config of this checkpoint; unsupported variants are errors naming the field.
    pub fn to_model_config(&self, source: &Path) -> Result<ModelConfig, ModelError> {
        let err = |msg: String| ModelError::Weights {
            path: source.join(CONFIG_JSON).display().to_string(),
            msg,
        };
        let arch = self.architectures.first().cloned().unwrap_or_default();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(err(format!(
                "unsupported architecture {:?} (config.json \"architectures\"); kiln loads {}",
                if arch.is_empty() { "<none>" } else { &arch },
                ARCHITECTURES.join(", ")
            )));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(err(format!(
                    "hidden_act {act:?} is not supported (kiln's FFN is SwiGLU, \"silu\")"
                )));
            }
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            return Err(err(
                "attention_bias / mlp_bias = true is not supported (kiln's linears have no bias)"
                    .into(),
            ));
        }
        let mut max_seq_len = self.max_position_embeddings.unwrap_or(2048);
        if let Some(w) = self.sliding_window.as_ref().and_then(|w| w.as_u64()) {
            // Within the window, sliding-window attention is full causal attention.
            if (w as usize) < max_seq_len {
                max_seq_len = w as usize;
            }
        }
        let mut rope_theta = self.rope_theta;
        let mut rope_scaling = None;
        if let Some(rp) = &self.rope_parameters {
            if let Some(t) = rp.get("rope_theta").and_then(|t| t.as_f64()) {
                rope_theta = Some(t);
            }
            rope_scaling = rope_from_json(rp, "rope_parameters").map_err(err)?;
        }
        if let Some(rs) = &self.rope_scaling {
            rope_scaling = rope_from_json(rs, "rope_scaling").map_err(err)?;
        }
        let d = self.hidden_size;
        let head_dim = self
            .head_dim
            .filter(|&hd| self.num_attention_heads == 0 || hd != d / self.num_attention_heads);
        let cfg = ModelConfig {
            n_kv_heads: Some(self.num_key_value_heads.unwrap_or(self.num_attention_heads)),
            ffn_dim: Some(self.intermediate_size),
            max_seq_len,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            tie_embeddings: self.tie_word_embeddings.unwrap_or(false),
            head_dim,
            rope_scaling,
            ..ModelConfig::base(
                self.vocab_size,
                d,
                self.num_hidden_layers,
                self.num_attention_heads,
            )
        };
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }
}

/// kiln's name → transformers' Llama name.
pub fn hf_name(kiln: &str) -> Option<String> {
    let fixed = match kiln {
        "tok_embeddings.weight" => Some("model.embed_tokens.weight"),
        "norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = kiln.strip_prefix("layers.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let h = match tail {
        "attention_norm.weight" => "input_layernorm.weight",
        "attention.wq.weight" => "self_attn.q_proj.weight",
        "attention.wk.weight" => "self_attn.k_proj.weight",
        "attention.wv.weight" => "self_attn.v_proj.weight",
        "attention.wo.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "feed_forward.w1.weight" => "mlp.gate_proj.weight",
        "feed_forward.w3.weight" => "mlp.up_proj.weight",
        "feed_forward.w2.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{i}.{h}"))
}

/// Tensor name → the shard file that holds it (`weight_map` of the index).
type WeightMap = HashMap<String, String>;

/// The safetensors files of an HF directory, and which file holds each tensor.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>), ModelError> {
    let index = dir.join(WEIGHTS_INDEX);
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let err = |msg: String| ModelError::Weights {
            path: index.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(&index).map_err(|e| err(format!("cannot read: {e}")))?;
        let idx: Index =
            serde_json::from_str(&text).map_err(|e| err(format!("not a weights index: {e}")))?;
        let files: BTreeSet<&String> = idx.weight_map.values().collect();
        let mut paths = Vec::new();
        for f in files {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(err(format!("shard {f:?} listed in the index is missing")));
            }
            paths.push(p);
        }
        return Ok((paths, Some(idx.weight_map)));
    }
    let single = dir.join(SINGLE_WEIGHTS);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    Err(ModelError::Weights {
        path: dir.display().to_string(),
        msg: format!("no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}"),
    })
}

/// Loads an HF directory: its config and its weights (f32, renamed to kiln's names).
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<(ModelConfig, Params), ModelError> {
    let cfg = HfConfig::load(dir)?.to_model_config(dir)?;
    let params = load_hf_weights(dir, &cfg, device)?;
    Ok((cfg, params))
}

/// Loads the safetensors weights of an HF directory for `cfg`.
pub fn load_hf_weights(
    dir: &Path,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<Params, ModelError> {
    let (files, index) = weight_files(dir)?;
    // name -> (file index); every file is mapped once.
    let mut maps = Vec::new();
    let mut where_is: HashMap<String, usize> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        // SAFETY: read-only mapping of a file we do not modify while it is open.
        let st = unsafe { MmapedSafetensors::new(f) }.map_err(|e| ModelError::Weights {
            path: f.display().to_string(),
            msg: format!("cannot read safetensors (truncated or corrupt?): {e}"),
        })?;
        for (name, _) in st.tensors() {
            where_is.insert(name, i);
        }
        maps.push(st);
    }
    if let Some(index) = &index {
        for (name, file) in index {
            if !where_is.contains_key(name) {
                return Err(ModelError::Weights {
                    path: dir.join(file).display().to_string(),
                    msg: format!(
                        "tensor {name:?} is listed in {WEIGHTS_INDEX} but not in the file"
                    ),
                });
            }
        }
    }
    let expected = layout(cfg);
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut tensors = HashMap::new();
    for (name, shape, _) in &expected {
        let h = hf_name(name).expect("every kiln tensor has an HF name");
        let Some(&fi) = where_is.get(&h) else {
            return Err(ModelError::Weights {
                path: dir.display().to_string(),
                msg: format!("missing tensor {h:?} (kiln {name:?})"),
            });
        };
        let file = &files[fi];
        let ferr = |msg: String| ModelError::Weights {
            path: file.display().to_string(),
            msg,
        };
        let view = maps[fi]
            .get(&h)
            .map_err(|e| ferr(format!("tensor {h:?}: {e}")))?;
        use safetensors::Dtype as St;
        if !matches!(view.dtype(), St::F32 | St::F16 | St::BF16) {
            return Err(ferr(format!(
                "tensor {h:?} has dtype {:?}; kiln reads F32, F16 and BF16",
                view.dtype()
            )));
        }
        if view.shape() != shape.as_slice() {
            return Err(ferr(format!(
                "tensor {h:?} has shape {:?} but config.json implies {shape:?}",
                view.shape()
            )));
        }
        let t = maps[fi]
            .load(&h, device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| ferr(format!("tensor {h:?}: {e}")))?;
        wanted.insert(h);
        tensors.insert(name.clone(), t);
    }
    let extra: Vec<&String> = where_is
        .keys()
        .filter(|k| !wanted.contains(*k))
        .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
        // Some tied checkpoints also store the head; it is the embedding, so it is ignored.
        .filter(|k| !(cfg.tie_embeddings && k.as_str() == "lm_head.weight"))
        .collect();
    if !extra.is_empty() {
        let mut extra: Vec<_> = extra.into_iter().cloned().collect();
        extra.sort();
        return Err(ModelError::Weights {
            path: dir.display().to_string(),
            msg: format!("unexpected tensors for a Llama model: {extra:?}"),
        });
    }
    Params::from_tensors(cfg, tensors, &dir.display().to_string())
}

/// The `config.json` transformers needs to build `LlamaForCausalLM` for `cfg`.
pub fn hf_config_json(
    cfg: &ModelConfig,
    torch_dtype: &str,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
) -> serde_json::Value {
    let rope_scaling = match &cfg.rope_scaling {
        None => serde_json::Value::Null,
        Some(RopeScaling::Linear { factor }) => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => serde_json::json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
        // transformers has no per-frequency factors; save_hf_weights refuses these.
        Some(RopeScaling::Factors { .. }) => serde_json::Value::Null,
    };
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim(),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads(),
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": true,
    })
}

/// Writes `config.json` and `model.safetensors` (HF names, `dtype` F32/BF16/F16) into `dir`.
pub fn save_hf_weights(
    dir: &Path,
    cfg: &ModelConfig,
    params: &Params,
    dtype: DType,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
) -> Result<(), ModelError> {
    let err = |p: &Path, msg: String| ModelError::Weights {
        path: p.display().to_string(),
        msg,
    };
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => {
            return Err(err(
                dir,
                format!("cannot export weights as {other:?} (use f32, bf16 or f16)"),
            ))
        }
    };
    if let Some(RopeScaling::Factors { .. }) = cfg.rope_scaling {
        return Err(err(
            dir,
            "the model's RoPE frequency factors (a GGUF rope_freqs tensor) have no config.json form"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| err(dir, format!("cannot create: {e}")))?;
    let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, _, _) in layout(cfg) {
        let t = params.tensor(&name)?.to_dtype(dtype)?.contiguous()?;
        map.insert(hf_name(&name).expect("HF name"), t);
    }
    let weights = dir.join(SINGLE_WEIGHTS);
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(map.iter(), Some(meta), &weights)
        .map_err(|e| err(&weights, format!("cannot write: {e}")))?;
    let config = hf_config_json(cfg, torch_dtype, bos_token_id, eos_token_id);
    let path = dir.join(CONFIG_JSON);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap() + "\n")
        .map_err(|e| err(&path, format!("cannot write: {e}")))?;
    Ok(())
}

/// `generation_config.json` fields kiln uses as sampling defaults and stop tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub do_sample: Option<bool>,
}

impl GenerationConfig {
    /// `generation_config.json` of `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Weights {
            path: path.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Weights {
                path: path.display().to_string(),
                msg: format!("not a generation config: {e}"),
            })
    }

    /// The EOS ids (a single id or a list in the JSON).
    pub fn eos_ids(&self) -> Vec<u32> {
        ids_of(self.eos_token_id.as_ref())
    }
}

/// A token id field that may be a number, a list of numbers or null.
pub fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_round_trips_through_the_loader() {
        let mut cfg = ModelConfig {
            n_kv_heads: Some(2),
            ffn_dim: Some(96),
            head_dim: Some(24),
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }),
            ..ModelConfig::tiny()
        };
        cfg.norm_eps = 1e-6;
        let json = hf_config_json(&cfg, "float32", Some(1), Some(2));
        let hf: HfConfig = serde_json::from_value(json).unwrap();
        let back = hf.to_model_config(Path::new("x")).unwrap();
        // (multiple_of only matters when ffn_dim is derived.)
        cfg.multiple_of = back.multiple_of;
        assert_eq!(back.resolved(), cfg.resolved());
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        let base = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        });
        let hf: HfConfig = serde_json::from_value(base.clone()).unwrap();
        let e = hf.to_model_config(Path::new("d")).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("d/config.json"),
            "{e}"
        );
        let mut llama = base;
        llama["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        llama["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 2.0});
        let hf: HfConfig = serde_json::from_value(llama).unwrap();
        let e = hf.to_model_config(Path::new("d")).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
