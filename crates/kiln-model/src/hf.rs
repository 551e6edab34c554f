//! Hugging Face checkpoints: a directory with `config.json` and `model.safetensors` (or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`), as
//! `save_pretrained` writes it, for the LLaMA family (`LlamaForCausalLM`,
//! `MistralForCausalLM`; SmolLM2 is Llama). transformers' Llama uses the same half-split RoPE
//! as kiln, so loading is renaming plus a cast to f32; export is the reverse.
//!
//! The safetensors files are memory-mapped. For training each tensor is converted straight
//! from the mapping into the model's f32 storage (bf16/f16/f32 supported); for inference
//! bf16/f16 matrices stay in the mapping and kiln's kernels read them there
//! ([`HfWeights::weight`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use kiln_kernels::qkernels::SharedBytes;
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::Dtype as St;
use serde::{Deserialize, Serialize};

use crate::linear::LinearWeight;
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
    /// Gemma: `gelu_pytorch_tanh`.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2/3 and Qwen: `sliding_attention` / `full_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Phi-3 (older configs keep it here rather than in `rope_parameters`).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// SmolLM3: 1 = the layer uses RoPE, 0 = NoPE.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<u8>>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

/// The model families kiln reads from HF directories: one decoder, switched by the config
/// (see [`ModelConfig`]'s architecture switches); each family differs only in its config keys,
/// tensor names and stored conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
    SmolLm3,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
        Family::SmolLm3,
    ];

    /// The `architectures` entry of `config.json`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::SmolLm3 => "SmolLM3ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
            Family::SmolLm3 => "smollm3",
        }
    }

    pub fn from_architecture(arch: &str) -> Option<Family> {
        if arch == "Gemma3TextModel" {
            // The trunk alone (EmbeddingGemma's encoder, loaded by `sentence`).
            return Some(Family::Gemma3);
        }
        Family::ALL.into_iter().find(|f| f.architecture() == arch)
    }

    /// The family whose switches `cfg` has (what an export writes).
    pub fn of(cfg: &ModelConfig) -> Family {
        if cfg.post_norms && cfg.qk_norm {
            Family::Gemma3
        } else if cfg.post_norms {
            Family::Gemma2
        } else if cfg.qk_norm {
            Family::Qwen3
        } else if cfg.qkv_bias {
            Family::Qwen2
        } else if cfg.rotary_dim.is_some() {
            Family::Phi3
        } else if !cfg.nope_layers.is_empty() {
            Family::SmolLm3
        } else if cfg.sliding_window.is_some() {
            Family::Mistral
        } else {
            Family::Llama
        }
    }

    /// Gemma 2 and 3: sandwich norms, GELU-tanh, scaled embeddings, `1 + w` norms.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// Gemma stores RMSNorm weights as `w` and scales by `1 + w`; kiln keeps `1 + w`.
    pub fn norm_offset(self) -> f64 {
        if self.is_gemma() {
            1.0
        } else {
            0.0
        }
    }

    /// Phi-3 stores Q|K|V and gate|up as one matrix each; kiln keeps them apart.
    pub fn fused_projections(self) -> bool {
        self == Family::Phi3
    }
}

/// Architectures kiln knows but cannot run yet, with what is missing (named before anything
/// else is read, so the error is the first thing a user sees).
const KNOWN_UNSUPPORTED: &[(&str, &str)] = &[
    ("MixtralForCausalLM", "mixture-of-experts layers"),
    ("Qwen2MoeForCausalLM", "mixture-of-experts layers"),
    ("Qwen3MoeForCausalLM", "mixture-of-experts layers"),
    ("Qwen3NextForCausalLM", "hybrid linear attention"),
    ("Qwen3_5ForCausalLM", "hybrid linear attention"),
    (
        "Gemma3ForConditionalGeneration",
        "the vision tower (use the text-only Gemma3ForCausalLM)",
    ),
    (
        "PhiForCausalLM",
        "LayerNorm with biases and a parallel block (Phi-1/2)",
    ),
];

/// The list of supported architectures, for errors.
pub fn supported_architectures() -> String {
    Family::ALL
        .iter()
        .map(|f| f.architecture())
        .collect::<Vec<_>>()
        .join(", ")
}

/// YaRN's default attention factor (transformers' `yarn_get_mscale`).
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

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
        "yarn" => {
            let factor = num("factor")?;
            let opt = |k: &str| obj.get(k).and_then(|x| x.as_f64());
            Ok(Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: num("original_max_position_embeddings")?
                    as usize,
                beta_fast: opt("beta_fast").unwrap_or(32.0),
                beta_slow: opt("beta_slow").unwrap_or(1.0),
                attention_factor: match (opt("attention_factor"), opt("mscale"), opt("mscale_all_dim")) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, all)
                    }
                    _ => yarn_mscale(factor, 1.0),
                },
                truncate: obj.get("truncate").and_then(|t| t.as_bool()).unwrap_or(true),
            }))
        }
        "longrope" => {
            let list = |k: &str| -> Result<Vec<f64>, String> {
                obj.get(k)
                    .and_then(|x| x.as_array())
                    .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| format!("{what} (longrope) needs a list of numbers {k:?}"))
            };
            Ok(Some(RopeScaling::Longrope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                // Filled in by the caller, which knows the context lengths.
                original_max_position_embeddings: obj
                    .get("original_max_position_embeddings")
                    .and_then(|x| x.as_u64())
                    .unwrap_or(0) as usize,
                attention_factor: obj
                    .get("attention_factor")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(0.0),
            }))
        }
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
            "{what}: RoPE type {other:?} is not supported (kiln supports default, linear, llama3, longrope and yarn)"
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

    /// The family of this checkpoint, or an error naming its architecture and what kiln runs.
    pub fn family(&self, source: &Path) -> Result<Family, ModelError> {
        let err = |msg: String| ModelError::Weights {
            path: source.join(CONFIG_JSON).display().to_string(),
            msg,
        };
        let arch = self.architectures.first().cloned().unwrap_or_default();
        if let Some(f) = Family::from_architecture(&arch) {
            return Ok(f);
        }
        let why = KNOWN_UNSUPPORTED
            .iter()
            .find(|(a, _)| *a == arch)
            .map(|(_, why)| format!(" (kiln does not implement {why} yet)"))
            .unwrap_or_default();
        Err(err(format!(
            "unsupported architecture {:?}{why} (config.json \"architectures\"); kiln loads {}",
            if arch.is_empty() { "<none>" } else { &arch },
            supported_architectures()
        )))
    }

    /// The kiln config of this checkpoint; unsupported variants are errors naming the field.
    pub fn to_model_config(&self, source: &Path) -> Result<ModelConfig, ModelError> {
        let err = |msg: String| ModelError::Weights {
            path: source.join(CONFIG_JSON).display().to_string(),
            msg,
        };
        let family = self.family(source)?;
        let act = self.hidden_activation.as_ref().or(self.hidden_act.as_ref());
        let activation = match act.map(String::as_str) {
            None | Some("silu") => crate::Activation::Silu,
            Some("gelu_pytorch_tanh" | "gelu_tanh") => crate::Activation::GeluTanh,
            Some(other) => {
                return Err(err(format!(
                    "hidden_act {other:?} is not supported (kiln's gated MLPs use \"silu\" or \"gelu_pytorch_tanh\")"
                )))
            }
        };
        if self.mlp_bias == Some(true)
            || (self.attention_bias == Some(true) && family != Family::Qwen2)
        {
            return Err(err(
                "attention_bias / mlp_bias = true is not supported for this architecture (kiln's linears have biases only on Qwen2's Q/K/V)"
                    .into(),
            ));
        }
        for (key, v) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if v.is_some() && !family.is_gemma() {
                return Err(err(format!(
                    "{key} is set, but kiln soft-caps only Gemma 2/3 models (a {} config with it is not one transformers defines)",
                    family.architecture()
                )));
            }
        }
        let bidirectional = self.use_bidirectional_attention == Some(true);
        let max_seq_len = self.max_position_embeddings.unwrap_or(2048);
        // Sliding windows: Mistral slides on every layer; Gemma by layer_types (or every
        // pattern-th layer global); Qwen only with use_sliding_window (off in released models).
        let window = self
            .sliding_window
            .as_ref()
            .and_then(|w| w.as_u64())
            .map(|w| w as usize)
            .filter(|_| self.use_sliding_window != Some(false))
            .filter(|&w| w < max_seq_len);
        let mut sliding_window_pattern = None;
        if let (Some(_), Some(types)) = (window, &self.layer_types) {
            let sliding: Vec<bool> = types.iter().map(|t| t == "sliding_attention").collect();
            if sliding.len() != self.num_hidden_layers {
                return Err(err(format!(
                    "layer_types has {} entries for {} layers",
                    sliding.len(),
                    self.num_hidden_layers
                )));
            }
            if sliding.iter().any(|s| !s) {
                let n = sliding.iter().position(|s| !s).expect("a global layer") + 1;
                if sliding
                    .iter()
                    .enumerate()
                    .any(|(i, &s)| s != (i % n != n - 1))
                {
                    return Err(err(format!(
                        "layer_types {types:?}: kiln supports one global layer every n layers"
                    )));
                }
                sliding_window_pattern = Some(n);
            }
        } else if window.is_some() && family == Family::Gemma3 {
            sliding_window_pattern = Some(self.sliding_window_pattern.unwrap_or(6));
        } else if window.is_some() && family == Family::Gemma2 {
            // Older Gemma 2 configs have no layer_types: even layers slide, odd ones are global.
            sliding_window_pattern = Some(2);
        }
        let window = if self
            .layer_types
            .as_ref()
            .is_some_and(|t| t.iter().all(|t| t == "full_attention"))
        {
            None
        } else if bidirectional {
            // transformers' bidirectional Gemma 3 (EmbeddingGemma): a token sees `w/2` tokens
            // on each side, `|i - j| < w/2 + 1`.
            window.map(|w| w / 2 + 1)
        } else {
            window
        };
        let mut rope_theta = self.rope_theta;
        let mut rope_local_theta = self.rope_local_base_freq;
        let mut rope_scaling = None;
        let mut partial_rotary_factor = self.partial_rotary_factor;
        if let Some(rp) = &self.rope_parameters {
            // Gemma 3 (transformers >= 5) keys its parameters by layer type.
            let (global, local) = match (rp.get("full_attention"), rp.get("sliding_attention")) {
                (Some(g), l) => (g, l),
                _ => (rp, None),
            };
            if let Some(t) = global.get("rope_theta").and_then(|t| t.as_f64()) {
                rope_theta = Some(t);
            }
            if let Some(t) = local
                .and_then(|l| l.get("rope_theta"))
                .and_then(|t| t.as_f64())
            {
                rope_local_theta = Some(t);
            }
            if let Some(f) = global.get("partial_rotary_factor").and_then(|f| f.as_f64()) {
                partial_rotary_factor = Some(f);
            }
            rope_scaling = rope_from_json(global, "rope_parameters").map_err(err)?;
        }
        if let Some(rs) = &self.rope_scaling {
            rope_scaling = rope_from_json(rs, "rope_scaling").map_err(err)?;
        }
        if let Some(RopeScaling::Longrope {
            original_max_position_embeddings,
            attention_factor,
            ..
        }) = &mut rope_scaling
        {
            // transformers: the original context and the attention factor come from the
            // config when the scaling does not name them.
            if *original_max_position_embeddings == 0 {
                *original_max_position_embeddings =
                    self.original_max_position_embeddings.unwrap_or(max_seq_len);
            }
            if *attention_factor == 0.0 {
                let factor = max_seq_len as f64 / *original_max_position_embeddings as f64;
                *attention_factor = if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (*original_max_position_embeddings as f64).ln()).sqrt()
                };
            }
        }
        let d = self.hidden_size;
        let natural_head_dim = d.checked_div(self.num_attention_heads).unwrap_or(0);
        let head_dim = self.head_dim.filter(|&hd| hd != natural_head_dim);
        let full_head_dim = head_dim.unwrap_or(natural_head_dim);
        let rotary_dim = partial_rotary_factor
            .filter(|&f| f < 1.0)
            .map(|f| (full_head_dim as f64 * f) as usize);
        let nope_layers = match (family, &self.no_rope_layers) {
            (Family::SmolLm3, Some(uses)) => uses
                .iter()
                .enumerate()
                .filter(|(_, &u)| u == 0)
                .map(|(i, _)| i)
                .collect(),
            _ => Vec::new(),
        };
        let gemma = family.is_gemma();
        let cfg = ModelConfig {
            n_kv_heads: Some(self.num_key_value_heads.unwrap_or(self.num_attention_heads)),
            ffn_dim: Some(self.intermediate_size),
            max_seq_len,
            rope_theta: rope_theta.unwrap_or(if family == Family::Gemma3 {
                1_000_000.0
            } else {
                10_000.0
            }),
            norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            tie_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            head_dim,
            rope_scaling,
            qkv_bias: family == Family::Qwen2,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            scale_embeddings: gemma,
            post_norms: gemma,
            activation,
            query_pre_attn_scalar: self.query_pre_attn_scalar.filter(|_| gemma),
            sliding_window: window,
            sliding_window_pattern,
            rope_local_theta: if family == Family::Gemma3 && window.is_some() {
                Some(rope_local_theta.unwrap_or(10_000.0))
            } else {
                None
            },
            rotary_dim,
            nope_layers,
            attn_logit_softcapping: self.attn_logit_softcapping,
            final_logit_softcapping: self.final_logit_softcapping,
            attention: if bidirectional {
                crate::AttentionMode::Bidirectional
            } else {
                crate::AttentionMode::Causal
            },
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

/// Where a kiln tensor lies in a family's checkpoint: a tensor of its own, or a block of rows
/// of a fused one (Phi-3's `qkv_proj`, `gate_up_proj`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfSource {
    Whole(String),
    Rows {
        name: String,
        start: usize,
        len: usize,
    },
}

/// The HF source of kiln tensor `kiln` in `family`'s checkpoint for `cfg`.
pub fn hf_source(family: Family, cfg: &ModelConfig, kiln: &str) -> Option<HfSource> {
    let layer_tail = kiln.strip_prefix("layers.").and_then(|r| r.split_once('.'));
    if let (true, Some((layer, tail))) = (family.fused_projections(), layer_tail) {
        let (h, hkv, hd, f) = (cfg.n_heads, cfg.n_kv_heads(), cfg.head_dim(), cfg.ffn_dim());
        let fused = match tail {
            "attention.wq.weight" => Some(("self_attn.qkv_proj", 0, h * hd)),
            "attention.wk.weight" => Some(("self_attn.qkv_proj", h * hd, hkv * hd)),
            "attention.wv.weight" => Some(("self_attn.qkv_proj", (h + hkv) * hd, hkv * hd)),
            "feed_forward.w1.weight" => Some(("mlp.gate_up_proj", 0, f)),
            "feed_forward.w3.weight" => Some(("mlp.gate_up_proj", f, f)),
            _ => None,
        };
        if let Some((name, start, len)) = fused {
            return Some(HfSource::Rows {
                name: format!("model.layers.{layer}.{name}.weight"),
                start,
                len,
            });
        }
    }
    hf_name_in(family, kiln).map(HfSource::Whole)
}

/// kiln's name → transformers' Llama name.
pub fn hf_name(kiln: &str) -> Option<String> {
    hf_name_in(Family::Llama, kiln)
}

/// kiln's name → the name in `family`'s checkpoints (unfused tensors).
pub fn hf_name_in(family: Family, kiln: &str) -> Option<String> {
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
        "attention.wq.bias" => "self_attn.q_proj.bias",
        "attention.wk.bias" => "self_attn.k_proj.bias",
        "attention.wv.bias" => "self_attn.v_proj.bias",
        "attention.q_norm.weight" => "self_attn.q_norm.weight",
        "attention.k_norm.weight" => "self_attn.k_norm.weight",
        // Gemma's sandwich: its post_attention_layernorm is on the attention output.
        "ffn_norm.weight" if family.is_gemma() => "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "post_ffn_norm.weight" => "post_feedforward_layernorm.weight",
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
    let weights = HfWeights::open(dir, cfg)?;
    let mut tensors = HashMap::new();
    for (name, _, _) in layout(cfg) {
        let t = weights.tensor(&name, device)?;
        tensors.insert(name, t);
    }
    Params::from_tensors(cfg, tensors, &dir.display().to_string())
}

/// An HF directory's safetensors shards, memory-mapped, read one kiln tensor at a time (so a
/// caller can quantise each as it comes and never hold the whole model in f32). Opening checks
/// the index, that every tensor `cfg` needs is present with its dtype and shape, and that no
/// unexpected tensor is there.
pub struct HfWeights {
    files: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    /// kiln name → where its values lie.
    sources: HashMap<String, Located>,
    family: Family,
}

/// One stored tensor in a mapped shard.
#[derive(Clone)]
struct Stored {
    file: usize,
    dtype: St,
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    len: usize,
}

/// The bytes of one kiln tensor: a stored tensor, or a run of its rows (a fused tensor).
struct Located {
    hf_name: String,
    stored: Stored,
    /// `(first row, rows)` of a fused tensor.
    rows: Option<(usize, usize)>,
}

impl Located {
    /// `(dtype, shape, byte start, byte length)` of the kiln tensor.
    fn span(&self) -> (St, Vec<usize>, usize, usize) {
        let s = &self.stored;
        match self.rows {
            None => (s.dtype, s.shape.clone(), s.start, s.len),
            Some((first, rows)) => {
                let row_bytes = s.len / s.shape[0].max(1);
                let mut shape = s.shape.clone();
                shape[0] = rows;
                (
                    s.dtype,
                    shape,
                    s.start + first * row_bytes,
                    rows * row_bytes,
                )
            }
        }
    }
}

impl HfWeights {
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (files, index) = weight_files(dir)?;
        // name -> where it is stored; every file is mapped once.
        let mut maps = Vec::new();
        let mut stored: HashMap<String, Stored> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let err = |msg: String| ModelError::Weights {
                path: f.display().to_string(),
                msg,
            };
            let file = std::fs::File::open(f).map_err(|e| err(format!("cannot open: {e}")))?;
            // SAFETY: read-only mapping of a file we do not modify while it is open.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| err(format!("cannot map: {e}")))?;
            // `deserialize` checks the header and that every tensor's bytes lie in the file.
            let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
                err(format!(
                    "cannot read safetensors (truncated or corrupt?): {e}"
                ))
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let at = Stored {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start: view.data().as_ptr() as usize - base,
                    len: view.data().len(),
                };
                stored.insert(name, at);
            }
            maps.push(Arc::new(map));
        }
        let where_is: HashMap<String, usize> =
            stored.iter().map(|(k, v)| (k.clone(), v.file)).collect();
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
        let family = HfConfig::load(dir)?.family(dir)?;
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        let mut sources = HashMap::new();
        for (name, shape, _) in &layout(cfg) {
            let source = hf_source(family, cfg, name)
                .unwrap_or_else(|| panic!("invariant: kiln tensor {name:?} has an HF name"));
            let h = match &source {
                HfSource::Whole(h) | HfSource::Rows { name: h, .. } => h.clone(),
            };
            // A bare trunk (`Gemma3TextModel`, as sentence-transformers saves it) has no
            // `model.`.
            let h = match h.strip_prefix("model.") {
                Some(bare) if !where_is.contains_key(&h) && where_is.contains_key(bare) => {
                    bare.to_string()
                }
                _ => h,
            };
            let Some(&fi) = where_is.get(&h) else {
                return Err(ModelError::Weights {
                    path: dir.display().to_string(),
                    msg: format!("missing tensor {h:?} (kiln {name:?})"),
                });
            };
            let ferr = |msg: String| ModelError::Weights {
                path: files[fi].display().to_string(),
                msg,
            };
            let view = &stored[&h];
            if !matches!(view.dtype, St::F32 | St::F16 | St::BF16) {
                return Err(ferr(format!(
                    "tensor {h:?} has dtype {:?}; kiln reads F32, F16 and BF16",
                    view.dtype
                )));
            }
            let want_shape = match &source {
                HfSource::Whole(_) => shape.clone(),
                HfSource::Rows { start, len, .. } => {
                    let rows = view.shape.first().copied().unwrap_or(0);
                    if rows < start + len || view.shape.get(1..) != shape.get(1..) {
                        return Err(ferr(format!(
                            "fused tensor {h:?} has shape {:?}, too small for kiln {name:?} (rows {start}..{})",
                            view.shape,
                            start + len
                        )));
                    }
                    view.shape.clone()
                }
            };
            if view.shape != want_shape {
                return Err(ferr(format!(
                    "tensor {h:?} has shape {:?} but config.json implies {want_shape:?}",
                    view.shape
                )));
            }
            wanted.insert(h.clone());
            let rows = match source {
                HfSource::Rows { start, len, .. } => Some((start, len)),
                HfSource::Whole(_) => None,
            };
            sources.insert(
                name.clone(),
                Located {
                    hf_name: h,
                    stored: view.clone(),
                    rows,
                },
            );
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
                msg: format!(
                    "unexpected tensors for a {} model: {extra:?}",
                    family.architecture()
                ),
            });
        }
        Ok(Self {
            files,
            maps,
            sources,
            family,
        })
    }

    fn located(&self, name: &str) -> Result<&Located, ModelError> {
        self.sources.get(name).ok_or_else(|| ModelError::Weights {
            path: self
                .files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            msg: format!("no tensor for kiln {name:?}"),
        })
    }

    /// Kiln tensor `name` in f32, converted from the mapping (F32, F16 or BF16), with the
    /// family's conventions applied (a fused tensor's rows, Gemma's `1 + w` norms).
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor, ModelError> {
        let at = self.located(name)?;
        let (dtype, shape, start, len) = at.span();
        let bytes = &self.maps[at.stored.file][start..start + len];
        // Widened straight into one f32 buffer (no 16-bit copy first: for a 7B's embedding
        // that is 262 MB less at the peak).
        let widen = |f: fn([u8; 2]) -> f32| -> Vec<f32> {
            bytes.par_chunks_exact(2).map(|b| f([b[0], b[1]])).collect()
        };
        let values = match dtype {
            St::BF16 => widen(|b| half::bf16::from_le_bytes(b).to_f32()),
            St::F16 => widen(|b| half::f16::from_le_bytes(b).to_f32()),
            _ => bytes
                .par_chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        let mut t = Tensor::from_vec(values, shape, device).map_err(|e| ModelError::Weights {
            path: self.files[at.stored.file].display().to_string(),
            msg: format!("tensor {:?}: {e}", at.hf_name),
        })?;
        if self.family.norm_offset() != 0.0 && name.ends_with("norm.weight") {
            t = (t + self.family.norm_offset())?;
        }
        // The pages just read are no longer needed: leave them to the page cache rather than
        // in this process's resident set (quantising a 7B on load would otherwise end with
        // the whole file resident next to the quantised model).
        // SAFETY: the mapping is shared, read-only and of a file nobody writes while we read
        // it: dropped pages are read back unchanged if touched again (a matrix still mapped
        // that shares an edge page with this tensor). No reference into the range is held.
        let _ = unsafe {
            self.maps[at.stored.file].unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                len,
            )
        };
        Ok(t)
    }

    /// Kiln matrix `name` for inference, used where it lies: a bf16/f16 matrix whose rows are
    /// whole 32-value blocks is read by kiln's kernels straight from the mapped file (no copy;
    /// the mapping stays alive as long as the weight); anything else is converted to f32.
    pub fn weight(&self, name: &str) -> Result<LinearWeight, ModelError> {
        let at = self.located(name)?;
        let (dtype, shape, start, len) = at.span();
        let ggml = match dtype {
            St::BF16 => Some(GgmlDType::BF16),
            St::F16 => Some(GgmlDType::F16),
            _ => None,
        };
        if let (Some(ggml), [n, k]) = (ggml, shape.as_slice()) {
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.maps[at.stored.file].clone();
            if let Some(w) = SharedBytes::new(owner, start, len)
                .and_then(|b| LinearWeight::mapped(ggml, *n, *k, b))
            {
                return Ok(w);
            }
        }
        Ok(LinearWeight::Dense(self.tensor(name, &Device::Cpu)?))
    }
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
        Some(RopeScaling::Longrope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        }) => serde_json::json!({
            "rope_type": "longrope", "short_factor": short_factor, "long_factor": long_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
            "attention_factor": attention_factor,
        }),
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) => serde_json::json!({
            "rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": original_max_position_embeddings,
            "beta_fast": beta_fast, "beta_slow": beta_slow,
            "attention_factor": attention_factor, "truncate": truncate,
        }),
        // transformers has no per-frequency factors; save_hf_weights refuses these.
        Some(RopeScaling::Factors { .. }) => serde_json::Value::Null,
    };
    let family = Family::of(cfg);
    let mut config = serde_json::json!({
        "architectures": [family.architecture()],
        "model_type": family.model_type(),
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
    });
    let set = |config: &mut serde_json::Value, key: &str, v: serde_json::Value| {
        config[key] = v;
    };
    if family == Family::Qwen2 {
        set(&mut config, "attention_bias", true.into());
    }
    if family.is_gemma() {
        set(&mut config, "hidden_activation", "gelu_pytorch_tanh".into());
        set(
            &mut config,
            "query_pre_attn_scalar",
            cfg.query_pre_attn_scalar
                .unwrap_or(cfg.head_dim() as f64)
                .into(),
        );
        if family == Family::Gemma3 {
            set(
                &mut config,
                "rope_local_base_freq",
                cfg.rope_local_theta.unwrap_or(cfg.rope_theta).into(),
            );
        }
        for (key, cap) in cfg.softcaps() {
            set(&mut config, key, cap.into());
        }
        let types: Vec<&str> = (0..cfg.n_layers)
            .map(|i| {
                if cfg.is_sliding(i) {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        set(&mut config, "layer_types", types.into());
    }
    if let Some(w) = cfg.sliding_window {
        set(&mut config, "sliding_window", w.into());
    }
    if let Some(r) = cfg.rotary_dim {
        set(
            &mut config,
            "partial_rotary_factor",
            (r as f64 / cfg.head_dim() as f64).into(),
        );
    }
    if family == Family::SmolLm3 {
        let uses: Vec<u8> = (0..cfg.n_layers)
            .map(|i| u8::from(!cfg.nope_layers.contains(&i)))
            .collect();
        set(&mut config, "no_rope_layers", uses.into());
    }
    config
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
    let family = Family::of(cfg);
    let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut fused: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    for (name, _, _) in layout(cfg) {
        let mut t = params.tensor(&name)?;
        if family.norm_offset() != 0.0 && name.ends_with("norm.weight") {
            t = (t - family.norm_offset())?;
        }
        let t = t.to_dtype(dtype)?.contiguous()?;
        match hf_source(family, cfg, &name).expect("HF name") {
            HfSource::Whole(h) => {
                map.insert(h, t);
            }
            HfSource::Rows { name, start, .. } => fused.entry(name).or_default().push((start, t)),
        }
    }
    for (name, mut parts) in fused {
        parts.sort_by_key(|(start, _)| *start);
        let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        map.insert(name, Tensor::cat(&parts, 0)?);
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
