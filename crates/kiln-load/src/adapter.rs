//! LoRA adapters in PEFT's directory format, read and written.
//!
//! A PEFT LoRA adapter directory holds `adapter_config.json` (`peft_type` "LORA", `r`,
//! `lora_alpha`, `target_modules` in transformers' names, `use_rslora`, ...) and
//! `adapter_model.safetensors` with tensors named after the wrapped transformers model:
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `(r, in)` and
//! `...lora_B.weight` `(out, r)`. kiln's RoPE uses the same half-split layout as transformers,
//! so the matrices need no permutation: only the names change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_model::{LoraSpec, ModelConfig, Params, LORA_TARGETS};
use serde::{Deserialize, Serialize};

use crate::LoadError;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// kiln's record of the base an adapter was trained on (PEFT ignores files it does not know).
pub const ADAPTER_BASE_FILE: &str = "kiln_base.json";

/// The base an adapter was trained on: its path as given, and its norm fingerprint
/// (`kiln_model::Llama::norm_fingerprint`), so that applying the adapter to another model with
/// the same shapes is caught rather than silently producing nonsense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterBase {
    pub base_model: String,
    pub norm_fingerprint: Vec<f32>,
}

impl AdapterBase {
    /// Whether `fingerprint` (of the base the adapter is about to be applied to) is this base's,
    /// up to bf16 rounding; otherwise the first value that differs, as (index, base's, ours).
    pub fn mismatch(&self, fingerprint: &[f32]) -> Option<(usize, f32, f32)> {
        if fingerprint.len() != self.norm_fingerprint.len() {
            return Some((
                fingerprint.len().min(self.norm_fingerprint.len()),
                f32::NAN,
                f32::NAN,
            ));
        }
        fingerprint
            .iter()
            .zip(&self.norm_fingerprint)
            .enumerate()
            .find(|(_, (a, b))| (*a - *b).abs() > 4e-3 * a.abs().max(b.abs()).max(1e-3))
            .map(|(i, (a, b))| (i, *a, *b))
    }
}

/// PEFT's module names for kiln's short projection names, in the same order.
const HF_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// kiln's short projection name (`wq`) → PEFT's (`q_proj`).
pub fn peft_target(kiln: &str) -> Option<&'static str> {
    LORA_TARGETS
        .iter()
        .position(|t| *t == kiln)
        .map(|i| HF_TARGETS[i])
}

/// PEFT's module name (`q_proj`, or a dotted path ending in it) → kiln's (`wq`).
pub fn kiln_target(peft: &str) -> Option<&'static str> {
    let last = peft.rsplit('.').next().unwrap_or(peft);
    HF_TARGETS
        .iter()
        .position(|t| *t == last)
        .map(|i| LORA_TARGETS[i])
}

/// The fields of `adapter_config.json` kiln writes and reads (PEFT writes more; unknown
/// fields are ignored on reading, and checked where they would change the result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// A list of module names, or a regex string (unsupported by kiln: named in the error).
    pub target_modules: serde_json::Value,
    #[serde(default = "none_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    /// Per-module ranks / alphas (PEFT's `rank_pattern`, `alpha_pattern`): kiln supports only
    /// empty ones.
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_dora: Option<bool>,
}

fn none_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The config PEFT would write for `spec` on `base`.
    pub fn for_spec(spec: &LoraSpec, base: &str) -> Self {
        let targets: Vec<serde_json::Value> = spec
            .targets
            .iter()
            .filter_map(|t| peft_target(t))
            .map(|t| serde_json::Value::String(t.into()))
            .collect();
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: spec.rank,
            lora_alpha: spec.alpha,
            lora_dropout: spec.dropout,
            target_modules: serde_json::Value::Array(targets),
            bias: "none".into(),
            use_rslora: spec.rslora,
            base_model_name_or_path: Some(base.into()),
            fan_in_fan_out: false,
            inference_mode: true,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            use_dora: Some(false),
        }
    }

    /// kiln's [`LoraSpec`] for this config; anything kiln would apply differently from PEFT
    /// is an error naming the field.
    pub fn to_spec(&self, path: &Path) -> Result<LoraSpec, LoadError> {
        let bad = |msg: String| LoadError::Config {
            path: path.to_path_buf(),
            msg,
        };
        if self.peft_type != "LORA" {
            return Err(bad(format!(
                "peft_type is {:?}; kiln reads LoRA adapters only",
                self.peft_type
            )));
        }
        if self.bias != "none" {
            return Err(bad(format!(
                "bias is {:?}; kiln supports LoRA adapters without bias terms (\"none\")",
                self.bias
            )));
        }
        if self.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out is true (a Conv1D/GPT-2 adapter); a LLaMA adapter has it false"
                    .into(),
            ));
        }
        if self.use_dora == Some(true) {
            return Err(bad("use_dora is true; kiln does not implement DoRA".into()));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(bad(
                "rank_pattern/alpha_pattern set per-module ranks; kiln supports one rank and alpha for all targets".into(),
            ));
        }
        let names: Vec<String> = match &self.target_modules {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("target_modules holds {v}, not a name")))
                })
                .collect::<Result<_, _>>()?,
            serde_json::Value::String(s) if s == "all-linear" => {
                HF_TARGETS.iter().map(|s| s.to_string()).collect()
            }
            other => {
                return Err(bad(format!(
                    "target_modules {other} is not a list of module names; kiln reads lists such as [\"q_proj\", \"v_proj\"]"
                )))
            }
        };
        let mut targets = Vec::new();
        for n in &names {
            let t = kiln_target(n).ok_or_else(|| {
                bad(format!(
                    "target module {n:?} is not one of the seven LLaMA projections ({})",
                    HF_TARGETS.join(", ")
                ))
            })?;
            if !targets.iter().any(|x: &String| x == t) {
                targets.push(t.to_string());
            }
        }
        let spec = LoraSpec {
            rank: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            rslora: self.use_rslora,
        };
        spec.validate().map_err(|e| bad(e.to_string()))?;
        Ok(spec)
    }
}

/// kiln adapter name (`layers.0.attention.wq.lora_A.weight`) → PEFT's
/// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn peft_name(kiln: &str) -> Option<String> {
    let (prefix, which) = kiln
        .strip_suffix(".lora_A.weight")
        .map(|p| (p, "lora_A"))
        .or_else(|| kiln.strip_suffix(".lora_B.weight").map(|p| (p, "lora_B")))?;
    let hf = kiln_model::hf::hf_name(&format!("{prefix}.weight"))?;
    Some(format!(
        "base_model.model.{}.{which}.weight",
        hf.strip_suffix(".weight")?
    ))
}

/// PEFT's tensor name → kiln's. Accepts the names PEFT writes (with or without the adapter
/// name `.default` that older versions kept).
pub fn kiln_adapter_name(peft: &str) -> Option<String> {
    let name = peft.replace(".default.weight", ".weight");
    let (prefix, which) = name
        .strip_suffix(".lora_A.weight")
        .map(|p| (p, "lora_A"))
        .or_else(|| name.strip_suffix(".lora_B.weight").map(|p| (p, "lora_B")))?;
    let hf = prefix.strip_prefix("base_model.model.")?;
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, module) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let short = kiln_target(module)?;
    let block = if ["wq", "wk", "wv", "wo"].contains(&short) {
        "attention"
    } else {
        "feed_forward"
    };
    if !module.ends_with(peft_target(short)?) {
        return None;
    }
    Some(format!("layers.{i}.{block}.{short}.{which}.weight"))
}

/// A loaded adapter: its spec and tensors in kiln's names.
pub struct LoadedAdapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub spec: LoraSpec,
    /// `layers.{i}.attention.wq.lora_A.weight` etc., f32 on the requested device.
    pub params: Params,
    /// The base it was trained on, where kiln trained it (`kiln_base.json`).
    pub base: Option<AdapterBase>,
}

impl LoadedAdapter {
    /// Refuses (unless `force`) to apply this adapter to a base whose norm fingerprint differs
    /// from the one it was trained on. Returns a warning to show when `force` let a mismatch
    /// through, or when the adapter records no base (PEFT's own adapters) and nothing could
    /// be checked beyond the shapes.
    pub fn check_base(
        &self,
        base: &Path,
        fingerprint: &[f32],
        force: bool,
    ) -> Result<Option<String>, LoadError> {
        let Some(recorded) = &self.base else {
            return Ok(None);
        };
        let Some((i, theirs, ours)) = recorded.mismatch(fingerprint) else {
            return Ok(None);
        };
        let msg = format!(
            "adapter {} was trained on {}, and {} is a different model with the same shapes (norm fingerprint value {i}: {ours} here, {theirs} in the adapter's base)",
            self.dir.display(),
            recorded.base_model,
            base.display()
        );
        if force {
            Ok(Some(format!("{msg}; applied anyway (--force)")))
        } else {
            Err(LoadError::AdapterBase(format!(
                "{msg}; pass --force to apply it anyway"
            )))
        }
    }
}

/// Reads a PEFT LoRA adapter directory and checks it against the base model `cfg`: every
/// tensor must be one of the targets' `lora_A (r, in)` / `lora_B (out, r)` with the base's
/// shapes, and every target of every layer must be present. Errors name the file and tensor.
pub fn load_adapter(
    dir: &Path,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<LoadedAdapter, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::NotFound(dir.to_path_buf()));
    }
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| LoadError::io(&config_path, e))?;
    let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: config_path.clone(),
        msg: format!("not a PEFT adapter config: {e}"),
    })?;
    let spec = config.to_spec(&config_path)?;
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(LoadError::Checkpoint {
            path: weights,
            msg: "file is missing (kiln reads safetensors adapters, not adapter_model.bin)".into(),
        });
    }
    let raw =
        candle_core::safetensors::load(&weights, device).map_err(|e| LoadError::Checkpoint {
            path: weights.clone(),
            msg: format!("cannot read safetensors: {e}"),
        })?;
    let bad = |msg: String| LoadError::Checkpoint {
        path: weights.clone(),
        msg,
    };
    let expected = expected_shapes(cfg, &spec);
    let mut tensors = HashMap::new();
    // In model order, so a mismatch always names the same (first) tensor.
    let mut raw: Vec<(String, Tensor)> = raw.into_iter().collect();
    raw.sort_by_cached_key(|(name, _)| model_order(name));
    for (name, t) in raw {
        let kiln = kiln_adapter_name(&name).ok_or_else(|| {
            bad(format!(
                "tensor {name:?} is not a LoRA A/B matrix of a LLaMA projection"
            ))
        })?;
        let want = expected.get(&kiln).ok_or_else(|| {
            bad(format!(
                "tensor {name:?} is for a projection outside target_modules or a layer the base model ({} layers) does not have",
                cfg.n_layers
            ))
        })?;
        if t.dims() != want.as_slice() {
            return Err(bad(format!(
                "tensor {name:?} has shape {:?} but the base model needs {want:?} at rank {}: an adapter for another base model?",
                t.dims(),
                spec.rank
            )));
        }
        tensors.insert(kiln, t.to_dtype(DType::F32)?);
    }
    let mut missing: Vec<&String> = expected
        .keys()
        .filter(|k| !tensors.contains_key(*k))
        .collect();
    missing.sort_by_cached_key(|k| model_order(k));
    if let Some(missing) = missing.first() {
        return Err(bad(format!(
            "tensor {:?} is missing",
            peft_name(missing).unwrap_or_else(|| missing.to_string())
        )));
    }
    let base_path = dir.join(ADAPTER_BASE_FILE);
    let base = match std::fs::read_to_string(&base_path) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| LoadError::Config {
            path: base_path.clone(),
            msg: format!("not kiln's record of an adapter's base: {e}"),
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(LoadError::io(&base_path, e)),
    };
    Ok(LoadedAdapter {
        dir: dir.to_path_buf(),
        config,
        spec,
        params: Params::from_adapter_tensors(tensors)?,
        base,
    })
}

/// Merges an adapter into dense weights: `W += s B A` for every adapted projection (what
/// `kiln lora merge` writes).
pub fn merge_adapter(params: &Params, adapter: &LoadedAdapter) -> Result<(), LoadError> {
    let scale = adapter.spec.scale();
    for (name, a) in adapter.params.iter() {
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = adapter.params.tensor(&format!("{prefix}.lora_B.weight"))?;
        let w_name = format!("{prefix}.weight");
        let w = params.tensor(&w_name)?;
        let delta = (b.matmul(a)? * scale)?.to_dtype(w.dtype())?;
        params.set(&w_name, &(w + delta)?)?;
    }
    Ok(())
}

/// A tensor name's place in the model: its layer number, then the name (so layer 2 comes
/// before layer 10).
fn model_order(name: &str) -> (usize, String) {
    let layer = name
        .split('.')
        .find_map(|part| part.parse::<usize>().ok())
        .unwrap_or(usize::MAX);
    (layer, name.to_string())
}

/// Every adapter tensor `spec` puts on a model of shape `cfg`, with its shape.
fn expected_shapes(cfg: &ModelConfig, spec: &LoraSpec) -> HashMap<String, Vec<usize>> {
    let (d, hd, f) = (cfg.dim, cfg.head_dim(), cfg.ffn_dim());
    let (q, kv) = (cfg.n_heads * hd, cfg.n_kv_heads() * hd);
    let mut out = HashMap::new();
    for i in 0..cfg.n_layers {
        for t in &spec.targets {
            let (block, out_dim, in_dim) = match t.as_str() {
                "wq" => ("attention", q, d),
                "wk" | "wv" => ("attention", kv, d),
                "wo" => ("attention", d, q),
                "w1" | "w3" => ("feed_forward", f, d),
                _ => ("feed_forward", d, f), // w2
            };
            let p = format!("layers.{i}.{block}.{t}");
            out.insert(format!("{p}.lora_A.weight"), vec![spec.rank, in_dim]);
            out.insert(format!("{p}.lora_B.weight"), vec![out_dim, spec.rank]);
        }
    }
    out
}

/// Writes `adapters` (kiln names) as a PEFT adapter directory `dir`, atomically: the files go
/// to a temporary sibling directory that is renamed into place, so a crash never leaves a
/// half-written adapter (an existing `dir` is replaced only once the new one is complete).
pub fn save_adapter(
    dir: &Path,
    adapters: &Params,
    spec: &LoraSpec,
    base: &AdapterBase,
) -> Result<(), LoadError> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| LoadError::io(&parent, e))?;
    let file_name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let tmp = parent.join(format!(".tmp-{file_name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| LoadError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| LoadError::io(&tmp, e))?;
    let mut map = HashMap::new();
    for (name, t) in adapters.iter() {
        let peft = peft_name(name).ok_or_else(|| LoadError::Config {
            path: dir.to_path_buf(),
            msg: format!("{name:?} is not a LoRA tensor of a LLaMA projection"),
        })?;
        map.insert(peft, t.detach().to_dtype(DType::F32)?.contiguous()?);
    }
    let weights = tmp.join(ADAPTER_WEIGHTS_FILE);
    candle_core::safetensors::save(&map, &weights)?;
    let config = AdapterConfig::for_spec(spec, &base.base_model);
    let json = serde_json::to_string_pretty(&config).expect("invariant: config serialises");
    let config_path = tmp.join(ADAPTER_CONFIG_FILE);
    std::fs::write(&config_path, json).map_err(|e| LoadError::io(&config_path, e))?;
    let base_path = tmp.join(ADAPTER_BASE_FILE);
    let json = serde_json::to_string_pretty(base).expect("invariant: base record serialises");
    std::fs::write(&base_path, json).map_err(|e| LoadError::io(&base_path, e))?;
    for p in [&weights, &config_path, &base_path] {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| LoadError::io(p, e))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| LoadError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| LoadError::io(dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_matches_its_fingerprint_up_to_bf16_rounding_only() {
        let base = AdapterBase {
            base_model: "base".into(),
            norm_fingerprint: vec![1.0, 0.5, -2.0, 0.0],
        };
        // Rounded to bf16 (nearest, ties up): what a bf16 copy of the base stores.
        let bf16 = |v: f32| f32::from_bits((v.to_bits() + 0x8000) & 0xFFFF_0000);
        let same: Vec<f32> = [1.001, 0.5, -2.0, 0.0].map(bf16).to_vec();
        assert_eq!(base.mismatch(&same), None);
        assert_eq!(base.mismatch(&[1.0, 0.5, -2.1, 0.0]), Some((2, -2.1, -2.0)));
        assert!(base.mismatch(&[1.0, 0.5]).is_some(), "another shape");
    }

    #[test]
    fn names_map_both_ways() {
        let k = "layers.3.feed_forward.w1.lora_B.weight";
        let p = peft_name(k).unwrap();
        assert_eq!(
            p,
            "base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight"
        );
        assert_eq!(kiln_adapter_name(&p).unwrap(), k);
        let k = "layers.0.attention.wo.lora_A.weight";
        assert_eq!(kiln_adapter_name(&peft_name(k).unwrap()).unwrap(), k);
        assert_eq!(
            kiln_adapter_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            )
            .unwrap(),
            "layers.0.attention.wq.lora_A.weight"
        );
        assert!(kiln_adapter_name("base_model.model.lm_head.lora_A.weight").is_none());
        assert!(peft_name("layers.0.attention.wq.weight").is_none());
    }
}
