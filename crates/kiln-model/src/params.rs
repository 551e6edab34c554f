//! Named parameters, ordered by name (a `BTreeMap`, so iteration order, init and checkpoints
//! are deterministic), with init, shape checks and safetensors I/O.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::{ModelConfig, ModelError, SplitMix64};

pub struct Params {
    vars: BTreeMap<String, Var>,
}

/// How a parameter is initialised.
#[derive(Clone, Copy)]
pub(crate) enum Init {
    Ones,
    Normal(f64),
}

/// Every parameter of `cfg` with its shape and init, in kiln's names (Meta LLaMA names).
pub(crate) fn layout(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (d, hd, f) = (cfg.dim, cfg.head_dim(), cfg.ffn_dim());
    let std = cfg.init_std;
    // GPT-2: scale the init of projections that write into the residual stream.
    let residual_std = std / (2.0 * cfg.n_layers as f64).sqrt();
    let mut out = vec![(
        "tok_embeddings.weight".to_string(),
        vec![cfg.vocab_size, d],
        Init::Normal(std),
    )];
    for i in 0..cfg.n_layers {
        let l = |s: &str| format!("layers.{i}.{s}");
        out.extend([
            (l("attention_norm.weight"), vec![d], Init::Ones),
            (
                l("attention.wq.weight"),
                vec![cfg.n_heads * hd, d],
                Init::Normal(std),
            ),
            (
                l("attention.wk.weight"),
                vec![cfg.n_kv_heads() * hd, d],
                Init::Normal(std),
            ),
            (
                l("attention.wv.weight"),
                vec![cfg.n_kv_heads() * hd, d],
                Init::Normal(std),
            ),
            (
                l("attention.wo.weight"),
                vec![d, cfg.n_heads * hd],
                Init::Normal(residual_std),
            ),
            (l("ffn_norm.weight"), vec![d], Init::Ones),
            (l("feed_forward.w1.weight"), vec![f, d], Init::Normal(std)),
            (l("feed_forward.w3.weight"), vec![f, d], Init::Normal(std)),
            (
                l("feed_forward.w2.weight"),
                vec![d, f],
                Init::Normal(residual_std),
            ),
        ]);
    }
    out.push(("norm.weight".to_string(), vec![d], Init::Ones));
    if !cfg.tie_embeddings {
        out.push((
            "output.weight".to_string(),
            vec![cfg.vocab_size, d],
            Init::Normal(std),
        ));
    }
    out
}

impl Params {
    /// Fresh weights: every tensor draws from its own stream, seeded by (seed, name), so adding a
    /// layer does not change the init of the others.
    pub fn init(
        cfg: &ModelConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let mut vars = BTreeMap::new();
        for (name, shape, init) in layout(cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = match init {
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => {
                    let mut rng = SplitMix64::new(seed ^ fnv1a(name.as_bytes()));
                    (0..n).map(|_| (rng.next_normal() * std) as f32).collect()
                }
            };
            let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Ok(Self { vars })
    }

    /// Wraps loaded tensors; names and shapes are checked against `cfg` (extra tensors are an
    /// error too, so a wrong config is not silently accepted).
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<Self, ModelError> {
        let mut vars = BTreeMap::new();
        for (name, t) in tensors {
            vars.insert(name, Var::from_tensor(&t)?);
        }
        let params = Self { vars };
        params.check_against(cfg).map_err(|e| match e {
            ModelError::Weights { msg, .. } => ModelError::Weights {
                path: source.into(),
                msg,
            },
            other => other,
        })?;
        Ok(params)
    }

    /// Loads `model.safetensors`-style weights (kiln names) and checks them against `cfg`.
    pub fn load(path: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self, ModelError> {
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| ModelError::Weights {
                path: path.display().to_string(),
                msg: format!("cannot read safetensors: {e}"),
            })?;
        Self::from_tensors(cfg, tensors, &path.display().to_string())
    }

    /// Writes the weights to `path` (not atomic on its own; checkpointing renames it into place).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let map: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// Checks names and shapes against `cfg`. Besides the base tensors only LoRA adapters
    /// (`<projection>.lora_A.weight (r, in)` / `lora_B.weight (out, r)`) may be present.
    pub(crate) fn check_against(&self, cfg: &ModelConfig) -> Result<(), ModelError> {
        let expected = layout(cfg);
        let err = |msg: String| {
            Err(ModelError::Weights {
                path: "weights".into(),
                msg,
            })
        };
        for (name, shape, _) in &expected {
            match self.vars.get(name) {
                None => return err(format!("missing tensor {name:?}")),
                Some(v) if v.dims() != shape.as_slice() => {
                    return err(format!(
                        "tensor {name:?} has shape {:?} but the config needs {shape:?}",
                        v.dims()
                    ))
                }
                Some(_) => {}
            }
        }
        if self.vars.len() != expected.len() {
            let known: std::collections::BTreeMap<_, _> =
                expected.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
            let extra: Vec<_> = self
                .vars
                .iter()
                .filter(|(k, v)| {
                    !known.contains_key(k.as_str()) && !is_adapter(k, v.dims(), &known)
                })
                .map(|(k, _)| k)
                .collect();
            if !extra.is_empty() {
                return err(format!("unexpected tensors for this config: {extra:?}"));
            }
        }
        Ok(())
    }

    /// Adds LoRA adapters for `spec.targets` in every layer: A kaiming-uniform (PEFT's
    /// init), B zero, each drawn from its own stream seeded by (seed, name).
    pub fn add_lora(
        &mut self,
        cfg: &ModelConfig,
        spec: &crate::LoraSpec,
        seed: u64,
    ) -> Result<(), ModelError> {
        let shapes: Vec<(String, Vec<usize>)> = layout(cfg)
            .into_iter()
            .filter(|(n, s, _)| n.starts_with("layers.") && s.len() == 2)
            .map(|(n, s, _)| (n, s))
            .collect();
        for (name, shape) in shapes {
            let prefix = name.trim_end_matches(".weight");
            if !spec.applies_to(prefix) {
                continue;
            }
            let (device, dtype) = (self.vars[&name].device().clone(), self.vars[&name].dtype());
            let mut rng = SplitMix64::new(seed ^ fnv1a(prefix.as_bytes()));
            let lora = crate::Lora::init(
                shape[0],
                shape[1],
                spec.rank,
                spec.alpha,
                spec.dropout,
                &mut rng,
                &device,
                dtype,
            )?;
            self.vars.insert(
                format!("{prefix}.lora_A.weight"),
                Var::from_tensor(&lora.a)?,
            );
            self.vars.insert(
                format!("{prefix}.lora_B.weight"),
                Var::from_tensor(&lora.b)?,
            );
        }
        Ok(())
    }

    /// Names of the LoRA adapter tensors (what trains under LoRA).
    pub fn adapter_names(&self) -> Vec<String> {
        self.vars
            .keys()
            .filter(|k| k.contains(".lora_A.") || k.contains(".lora_B."))
            .cloned()
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| ModelError::Weights {
                path: "weights".into(),
                msg: format!("missing tensor {name:?}"),
            })
    }

    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
}

/// Whether `name` is a LoRA tensor of a known projection with a consistent shape.
fn is_adapter(
    name: &str,
    dims: &[usize],
    known: &std::collections::BTreeMap<&str, &Vec<usize>>,
) -> bool {
    let check = |suffix: &str, ok: &dyn Fn(&[usize]) -> bool| {
        name.strip_suffix(suffix)
            .and_then(|p| known.get(format!("{p}.weight").as_str()))
            .is_some_and(|s| ok(s))
    };
    dims.len() == 2
        && (check(".lora_A.weight", &|s| s[1] == dims[1])
            || check(".lora_B.weight", &|s| s[0] == dims[0]))
}

/// FNV-1a, to derive a per-tensor seed from its name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_count_matches_config_accounting() {
        for cfg in [ModelConfig::tiny(), ModelConfig::reference()] {
            let p = Params::init(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
            assert_eq!(p.num_elements(), cfg.param_counts().0);
        }
        let mut tied = ModelConfig::tiny();
        tied.tie_embeddings = true;
        let p = Params::init(&tied, 0, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(p.num_elements(), tied.param_counts().0);
    }

    #[test]
    fn init_is_deterministic_and_has_the_requested_std() {
        let cfg = ModelConfig::tiny();
        let a = Params::init(&cfg, 7, &Device::Cpu, DType::F32).unwrap();
        let b = Params::init(&cfg, 7, &Device::Cpu, DType::F32).unwrap();
        let e = |p: &Params| {
            p.tensor("tok_embeddings.weight")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(e(&a), e(&b));
        let v = e(&a);
        let std = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "std {std}");
    }

    #[test]
    fn shape_mismatch_names_the_tensor() {
        let cfg = ModelConfig::tiny();
        let p = Params::init(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
        let mut tensors: HashMap<String, Tensor> = p
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        tensors.insert(
            "norm.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Params::from_tensors(&cfg, tensors, "x.safetensors")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("norm.weight") && err.contains("x.safetensors"),
            "{err}"
        );
    }
}
