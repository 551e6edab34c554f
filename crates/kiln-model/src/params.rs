//! Named parameters in flat storage: one 1-D `Var` holds every tensor, and each named tensor is
//! a view into it (`narrow` + `reshape`, sharing storage), so the model's weights see every
//! in-place update of the buffer and the optimizer can run over whole ranges of it. Init draws
//! every tensor from its own stream (deterministic, independent of the order), and checkpoints
//! are safetensors with one tensor per name.
//!
//! The buffer's order ([`flat_group`]): LoRA adapters, then the other matrices, then the
//! embedding table and the norm vectors. So the tensors that train under LoRA are one range,
//! and AdamW's decay group (matrices; nanoGPT's rule) and no-decay group (norms and the
//! embedding) are one range each.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::flat::{FlatLayout, Grads};
use crate::{ModelConfig, ModelError, SplitMix64};

pub struct Params {
    layout: Arc<FlatLayout>,
    /// `(layout.total())`: every parameter.
    flat: Var,
    /// One view per layout entry (on the autograd graph of `flat`).
    views: Vec<Tensor>,
}

/// How a parameter is initialised.
#[derive(Clone, Copy)]
pub(crate) enum Init {
    Zeros,
    Ones,
    Normal(f64),
}

/// Whether `name` is a LoRA adapter tensor.
pub fn is_lora_name(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// The group of a tensor in the flat buffer's order: 0 LoRA adapters, 1 other matrices, 2 the
/// embedding table and 1-D tensors (norms).
pub fn flat_group(name: &str, shape: &[usize]) -> u8 {
    if is_lora_name(name) {
        0
    } else if shape.len() >= 2 && name != "tok_embeddings.weight" {
        1
    } else {
        2
    }
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
        ]);
        if cfg.qkv_bias {
            let kv = cfg.n_kv_heads() * hd;
            out.extend([
                (l("attention.wq.bias"), vec![cfg.n_heads * hd], Init::Zeros),
                (l("attention.wk.bias"), vec![kv], Init::Zeros),
                (l("attention.wv.bias"), vec![kv], Init::Zeros),
            ]);
        }
        if cfg.qk_norm {
            out.extend([
                (l("attention.q_norm.weight"), vec![hd], Init::Ones),
                (l("attention.k_norm.weight"), vec![hd], Init::Ones),
            ]);
        }
        if cfg.post_norms {
            out.push((l("post_attention_norm.weight"), vec![d], Init::Ones));
        }
        out.extend([
            (l("ffn_norm.weight"), vec![d], Init::Ones),
            (l("feed_forward.w1.weight"), vec![f, d], Init::Normal(std)),
            (l("feed_forward.w3.weight"), vec![f, d], Init::Normal(std)),
            (
                l("feed_forward.w2.weight"),
                vec![d, f],
                Init::Normal(residual_std),
            ),
        ]);
        if cfg.post_norms {
            out.push((l("post_ffn_norm.weight"), vec![d], Init::Ones));
        }
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
        let specs = layout(cfg);
        let flat_layout = FlatLayout::grouped(
            specs.iter().map(|(n, s, _)| (n.clone(), s.clone())),
            flat_group,
        )?;
        let mut data = vec![0f32; flat_layout.total()];
        for (name, _, init) in &specs {
            let e = flat_layout
                .entry(name)
                .expect("invariant: every spec is laid out");
            let dst = &mut data[e.range()];
            match init {
                Init::Zeros => dst.fill(0.0),
                Init::Ones => dst.fill(1.0),
                Init::Normal(std) => {
                    let mut rng = SplitMix64::new(seed ^ fnv1a(name.as_bytes()));
                    for x in dst.iter_mut() {
                        *x = (rng.next_normal() * std) as f32;
                    }
                }
            }
        }
        let flat = if dtype == DType::F32 {
            Var::from_vec(data, flat_layout.total(), device)?
        } else {
            Var::from_tensor(
                &Tensor::from_vec(data, flat_layout.total(), device)?.to_dtype(dtype)?,
            )?
        };
        Self::over(Arc::new(flat_layout), flat)
    }

    fn over(layout: Arc<FlatLayout>, flat: Var) -> Result<Self, ModelError> {
        let views = layout.views(flat.as_tensor())?;
        Ok(Self {
            layout,
            flat,
            views,
        })
    }

    /// Packs named tensors into a fresh flat buffer (in the dtype and on the device of
    /// `tok_embeddings.weight`, or of the first tensor).
    fn pack(tensors: &HashMap<String, Tensor>) -> Result<Self, ModelError> {
        let layout = FlatLayout::grouped(
            tensors.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())),
            flat_group,
        )?;
        let like = tensors
            .get("tok_embeddings.weight")
            .or_else(|| layout.entries().first().map(|e| &tensors[&e.name]));
        let (dtype, device) = match like {
            Some(t) => (t.dtype(), t.device().clone()),
            None => (DType::F32, Device::Cpu),
        };
        let flat = Var::zeros(layout.total(), dtype, &device)?;
        for e in layout.entries() {
            let t = tensors[&e.name]
                .to_device(&device)?
                .to_dtype(dtype)?
                .flatten_all()?
                .contiguous()?;
            flat.slice_set(&t, 0, e.offset)?;
        }
        Self::over(Arc::new(layout), flat)
    }

    /// Wraps loaded tensors (copied into one flat buffer); names and shapes are checked against
    /// `cfg` (extra tensors are an error too, so a wrong config is not silently accepted).
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<Self, ModelError> {
        let shapes: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        check_shapes(cfg, &shapes).map_err(|e| match e {
            ModelError::Weights { msg, .. } => ModelError::Weights {
                path: source.into(),
                msg,
            },
            other => other,
        })?;
        Self::pack(&tensors)
    }

    /// Loads `model.safetensors`-style weights (kiln names) and checks them against `cfg`.
    /// Reads a safetensors file of kiln names, or (given a `shards.json`) the sharded
    /// checkpoint it describes.
    pub fn load(path: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self, ModelError> {
        if path.file_name() == Some(std::ffi::OsStr::new(crate::sharded::SHARD_MANIFEST)) {
            // A distributed run's checkpoint: every rank's pieces, assembled.
            let dir = path.parent().unwrap_or(Path::new("."));
            let manifest = crate::sharded::read_manifest(dir)?;
            let tensors = crate::sharded::read_sharded(dir, &manifest, "model", device)?;
            return Self::from_tensors(cfg, tensors, &path.display().to_string());
        }
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| ModelError::Weights {
                path: path.display().to_string(),
                msg: format!("cannot read safetensors: {e}"),
            })?;
        Self::from_tensors(cfg, tensors, &path.display().to_string())
    }

    /// Writes the weights to `path`, one tensor per name (not atomic on its own; checkpointing
    /// renames it into place).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let map: HashMap<String, Tensor> = self
            .iter()
            .map(|(k, v)| (k.to_string(), v.detach()))
            .collect();
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// Checks names and shapes against `cfg`. Besides the base tensors only LoRA adapters
    /// (`<projection>.lora_A.weight (r, in)` / `lora_B.weight (out, r)`) may be present.
    pub(crate) fn check_against(&self, cfg: &ModelConfig) -> Result<(), ModelError> {
        let shapes: Vec<(String, Vec<usize>)> = self
            .layout
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect();
        check_shapes(cfg, &shapes)
    }

    /// Adds LoRA adapters for `spec.targets` in every layer: A kaiming-uniform (PEFT's
    /// init), B zero, each drawn from its own stream seeded by (seed, name). The buffer is
    /// rebuilt (with the adapters first): build models from these params after this call.
    pub fn add_lora(
        &mut self,
        cfg: &ModelConfig,
        spec: &crate::LoraSpec,
        seed: u64,
    ) -> Result<(), ModelError> {
        let (device, dtype) = (self.flat.device().clone(), self.flat.dtype());
        let mut tensors: HashMap<String, Tensor> = self
            .iter()
            .map(|(k, v)| (k.to_string(), v.detach()))
            .collect();
        tensors.extend(fresh_adapters(cfg, spec, seed, &device, dtype)?);
        *self = Self::pack(&tensors)?;
        Ok(())
    }

    /// Fresh LoRA adapters alone (what trains on a frozen base, dense or quantised, kept
    /// elsewhere): the same tensors and init as [`Params::add_lora`].
    pub fn lora_adapters(
        cfg: &ModelConfig,
        spec: &crate::LoraSpec,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Self::pack(&fresh_adapters(cfg, spec, seed, device, dtype)?)
    }

    /// Adapter tensors read from a file (e.g. a PEFT adapter, renamed to kiln names); every
    /// name must be a LoRA tensor.
    pub fn from_adapter_tensors(tensors: HashMap<String, Tensor>) -> Result<Self, ModelError> {
        if tensors.is_empty() {
            return Err(ModelError::Input("the adapter holds no tensors".into()));
        }
        if let Some(bad) = tensors.keys().find(|k| !is_lora_name(k)) {
            return Err(ModelError::Input(format!(
                "{bad:?} is not a LoRA tensor (expected <projection>.lora_A.weight / lora_B.weight)"
            )));
        }
        Self::pack(&tensors)
    }

    /// Overwrites every tensor of these params with the tensor of the same name in the
    /// safetensors file `path` (a checkpoint of exactly these params, or a superset).
    pub fn assign_from_file(&self, path: &Path) -> Result<(), ModelError> {
        let err = |msg: String| ModelError::Weights {
            path: path.display().to_string(),
            msg,
        };
        let tensors = candle_core::safetensors::load(path, self.flat.device())
            .map_err(|e| err(format!("cannot read safetensors: {e}")))?;
        for name in self.names() {
            let t = tensors
                .get(name)
                .ok_or_else(|| err(format!("missing tensor {name:?}")))?;
            self.set(name, t)?;
        }
        Ok(())
    }

    /// Named tensors of any kind (a reward or value head, say) packed into one flat buffer,
    /// with no check against a model config.
    pub fn from_named(tensors: HashMap<String, Tensor>) -> Result<Self, ModelError> {
        if tensors.is_empty() {
            return Err(ModelError::Input("no tensors to pack".into()));
        }
        Self::pack(&tensors)
    }

    /// Names of the LoRA adapter tensors (what trains under LoRA), in buffer order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.names()
            .filter(|k| is_lora_name(k))
            .map(str::to_string)
            .collect()
    }

    /// The tensor `name`: a view into the flat buffer (sharing its storage, on its autograd
    /// graph).
    pub fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        self.layout
            .position(name)
            .map(|i| self.views[i].clone())
            .ok_or_else(|| ModelError::Weights {
                path: "weights".into(),
                msg: format!("missing tensor {name:?}"),
            })
    }

    /// Overwrites the values of `name` in place (every model built over these params sees them).
    pub fn set(&self, name: &str, value: &Tensor) -> Result<(), ModelError> {
        let view = self.tensor(name)?;
        if value.dims() != view.dims() {
            return Err(ModelError::Weights {
                path: "weights".into(),
                msg: format!(
                    "cannot set {name:?} of shape {:?} to a tensor of shape {:?}",
                    view.dims(),
                    value.dims()
                ),
            });
        }
        let value = value
            .to_device(self.flat.device())?
            .to_dtype(self.flat.dtype())?
            .flatten_all()?
            .contiguous()?;
        let offset = self.layout.entry(name).expect("checked above").offset;
        self.flat.slice_set(&value, 0, offset)?;
        Ok(())
    }

    /// Copies every tensor of `other` (same names and shapes) into these params, in place.
    pub fn copy_from(&self, other: &Params) -> Result<(), ModelError> {
        if other.layout == self.layout {
            let src = other
                .flat
                .as_detached_tensor()
                .to_device(self.flat.device())?;
            self.flat
                .slice_set(&src.to_dtype(self.flat.dtype())?, 0, 0)?;
            return Ok(());
        }
        if other.layout.len() != self.layout.len() {
            return Err(ModelError::Weights {
                path: "weights".into(),
                msg: format!(
                    "cannot copy {} tensors into {}",
                    other.layout.len(),
                    self.layout.len()
                ),
            });
        }
        for (name, t) in other.iter() {
            self.set(name, t)?;
        }
        Ok(())
    }

    /// The flat buffer (`(total)`), every parameter in layout order.
    pub fn flat(&self) -> &Var {
        &self.flat
    }

    /// Where each named tensor sits in [`Params::flat`].
    pub fn layout(&self) -> &Arc<FlatLayout> {
        &self.layout
    }

    /// Names in buffer order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.layout.entries().iter().map(|e| e.name.as_str())
    }

    /// `(name, view)` in buffer order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.layout
            .entries()
            .iter()
            .map(|e| e.name.as_str())
            .zip(&self.views)
    }

    /// candle autograd's gradients of these parameters (after `loss.backward()` through a model
    /// built over them): the flat buffer's gradient, viewed per name. None when the loss does
    /// not depend on the parameters.
    pub fn autograd_grads(&self, store: &GradStore) -> Result<Option<Grads>, ModelError> {
        match store.get(self.flat.as_tensor()) {
            Some(g) => Ok(Some(Grads::from_flat(self.layout.clone(), g.clone())?)),
            None => Ok(None),
        }
    }

    pub fn num_elements(&self) -> usize {
        self.layout.total()
    }
}

/// Checks names and shapes against `cfg`. Besides the base tensors only LoRA adapters
/// (`<projection>.lora_A.weight (r, in)` / `lora_B.weight (out, r)`) may be present.
fn check_shapes(cfg: &ModelConfig, shapes: &[(String, Vec<usize>)]) -> Result<(), ModelError> {
    let expected = layout(cfg);
    let err = |msg: String| {
        Err(ModelError::Weights {
            path: "weights".into(),
            msg,
        })
    };
    let have: std::collections::BTreeMap<&str, &Vec<usize>> =
        shapes.iter().map(|(n, s)| (n.as_str(), s)).collect();
    for (name, shape) in expected.iter().map(|(n, s, _)| (n, s)) {
        match have.get(name.as_str()) {
            None => return err(format!("missing tensor {name:?}")),
            Some(dims) if dims.as_slice() != shape.as_slice() => {
                return err(format!(
                    "tensor {name:?} has shape {dims:?} but the config needs {shape:?}"
                ))
            }
            Some(_) => {}
        }
    }
    if have.len() != expected.len() {
        let known: std::collections::BTreeMap<_, _> =
            expected.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
        let extra: Vec<_> = have
            .iter()
            .filter(|(k, dims)| !known.contains_key(*k) && !is_adapter(k, dims, &known))
            .map(|(k, _)| k)
            .collect();
        if !extra.is_empty() {
            return err(format!("unexpected tensors for this config: {extra:?}"));
        }
    }
    Ok(())
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

/// PEFT-initialised adapters for `spec.targets` in every layer, each from its own stream.
fn fresh_adapters(
    cfg: &ModelConfig,
    spec: &crate::LoraSpec,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>, ModelError> {
    spec.validate()?;
    let mut out = HashMap::new();
    for (name, shape, _) in layout(cfg) {
        if !(name.starts_with("layers.") && shape.len() == 2) {
            continue;
        }
        let prefix = name.trim_end_matches(".weight");
        if !spec.applies_to(prefix) {
            continue;
        }
        let mut rng = SplitMix64::new(seed ^ fnv1a(prefix.as_bytes()));
        let lora = crate::Lora::init(
            shape[0],
            shape[1],
            spec.rank,
            spec.alpha,
            spec.dropout,
            &mut rng,
            device,
            dtype,
        )?;
        out.insert(format!("{prefix}.lora_A.weight"), lora.a);
        out.insert(format!("{prefix}.lora_B.weight"), lora.b);
    }
    Ok(out)
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
        let mut tensors: HashMap<String, Tensor> =
            p.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
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
