//! GGUF checkpoints (llama.cpp's format): metadata → [`ModelConfig`], tensors → kiln's names,
//! dequantised [`Params`] for training and evaluation, raw [`QTensor`]s for quantised inference,
//! and a writer for export.
//!
//! llama.cpp's converter permutes the rows of the Q and K projections so that its RoPE can
//! rotate adjacent pairs `(x[2i], x[2i+1])`; kiln (like transformers) rotates the half-split
//! pairs `(x[i], x[i + hd/2])`. Loading undoes that permutation (row blocks are moved whole,
//! so it works on quantised data too) and export applies it, so the same math runs for every
//! source.
//!
//! Every error names the file, and the tensor where there is one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::hf::Family;
use crate::linear::LinearWeight;
use crate::params::layout;
use crate::{ModelConfig, ModelError, Params, RopeScaling};

pub use kiln_gguf::GgufValue;

/// The GGML tensor types kiln reads (every type candle can dequantise).
pub const SUPPORTED_TYPES: &[&str] = &[
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
    "Q5_K", "Q6_K", "Q8_K",
];

/// GGML's name for a tensor type id (also for the ones kiln cannot read, for error messages).
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// GGML's type id of a candle quantisation type.
pub fn dtype_id(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn dtype_from_id(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// GGML's name of a candle quantisation type.
pub fn dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Parses a type name as written on the command line (`q8_0`, `F16`, `q4_k`...).
pub fn parse_dtype(name: &str) -> Option<GgmlDType> {
    let n = name
        .to_ascii_uppercase()
        .replace('K', "_K")
        .replace("__", "_");
    [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ]
    .into_iter()
    .find(|d| dtype_name(*d) == n || dtype_name(*d) == name.to_ascii_uppercase())
}

/// kiln's name → llama.cpp's GGUF name.
pub fn gguf_name(kiln: &str) -> Option<String> {
    let fixed = match kiln {
        "tok_embeddings.weight" => Some("token_embd.weight"),
        "norm.weight" => Some("output_norm.weight"),
        "output.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = kiln.strip_prefix("layers.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let g = match tail {
        "attention_norm.weight" => "attn_norm.weight",
        "attention.wq.weight" => "attn_q.weight",
        "attention.wk.weight" => "attn_k.weight",
        "attention.wv.weight" => "attn_v.weight",
        "attention.wo.weight" => "attn_output.weight",
        "attention.wq.bias" => "attn_q.bias",
        "attention.wk.bias" => "attn_k.bias",
        "attention.wv.bias" => "attn_v.bias",
        "attention.q_norm.weight" => "attn_q_norm.weight",
        "attention.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_norm.weight" => "post_attention_norm.weight",
        "post_ffn_norm.weight" => "post_ffw_norm.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "feed_forward.w1.weight" => "ffn_gate.weight",
        "feed_forward.w3.weight" => "ffn_up.weight",
        "feed_forward.w2.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}"))
}

/// llama.cpp's GGUF name → kiln's name.
pub fn kiln_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("tok_embeddings.weight"),
        "output_norm.weight" => Some("norm.weight"),
        "output.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let k = match tail {
        "attn_norm.weight" => "attention_norm.weight",
        "attn_q.weight" => "attention.wq.weight",
        "attn_k.weight" => "attention.wk.weight",
        "attn_v.weight" => "attention.wv.weight",
        "attn_output.weight" => "attention.wo.weight",
        "attn_q.bias" => "attention.wq.bias",
        "attn_k.bias" => "attention.wk.bias",
        "attn_v.bias" => "attention.wv.bias",
        "attn_q_norm.weight" => "attention.q_norm.weight",
        "attn_k_norm.weight" => "attention.k_norm.weight",
        "post_attention_norm.weight" => "post_attention_norm.weight",
        "post_ffw_norm.weight" => "post_ffn_norm.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "ffn_gate.weight" => "feed_forward.w1.weight",
        "ffn_up.weight" => "feed_forward.w3.weight",
        "ffn_down.weight" => "feed_forward.w2.weight",
        _ => return None,
    };
    Some(format!("layers.{i}.{k}"))
}

/// llama.cpp's `general.architecture` for a config (what a GGUF export writes).
pub fn gguf_architecture(cfg: &ModelConfig) -> &'static str {
    match Family::of(cfg) {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
        Family::Gemma2 => "gemma2",
        Family::Gemma3 => "gemma3",
        Family::Phi3 => "phi3",
        Family::SmolLm3 => "smollm3",
    }
}

/// llama.cpp's SmolLM3: no RoPE on every 4th layer (`(i + 1) % 4 == 0`), fixed in its code.
fn smollm3_nope_layers(n_layers: usize) -> Vec<usize> {
    (0..n_layers).filter(|i| (i + 1) % 4 == 0).collect()
}

/// The architectures kiln reads from GGUF.
pub const GGUF_ARCHITECTURES: [&str; 7] = [
    "llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3",
];

/// llama.cpp's Gemma 2 attention scale: `query_pre_attn_scalar` is not in its files, so it
/// fixes it by size (the 27B, the only 46-layer one, scales by `dim / heads`, the others by
/// the head dim).
fn gemma2_query_pre_attn_scalar(cfg: &ModelConfig) -> f64 {
    if cfg.n_layers == 46 {
        (cfg.dim / cfg.n_heads.max(1)) as f64
    } else {
        cfg.head_dim() as f64
    }
}

/// Where kiln tensor `kiln` lies in a GGUF of `cfg`'s architecture: its tensor name and, for
/// Phi-3's fused `attn_qkv` (Q|K|V) and `ffn_up` (gate|up), the block of rows that is it.
pub fn gguf_source(cfg: &ModelConfig, kiln: &str) -> Option<(String, Option<(usize, usize)>)> {
    if gguf_architecture(cfg) == "phi3" {
        if let Some((layer, tail)) = kiln.strip_prefix("layers.").and_then(|r| r.split_once('.')) {
            let (h, hkv, hd, f) = (cfg.n_heads, cfg.n_kv_heads(), cfg.head_dim(), cfg.ffn_dim());
            let fused = match tail {
                "attention.wq.weight" => Some(("attn_qkv", 0, h * hd)),
                "attention.wk.weight" => Some(("attn_qkv", h * hd, hkv * hd)),
                "attention.wv.weight" => Some(("attn_qkv", (h + hkv) * hd, hkv * hd)),
                "feed_forward.w1.weight" => Some(("ffn_up", 0, f)),
                "feed_forward.w3.weight" => Some(("ffn_up", f, f)),
                _ => None,
            };
            if let Some((name, start, len)) = fused {
                return Some((format!("blk.{layer}.{name}.weight"), Some((start, len))));
            }
        }
    }
    gguf_name(kiln).map(|g| (g, None))
}

/// Tensors that carry RoPE scaling rather than weights.
const ROPE_TENSORS: [&str; 3] = [
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
];

/// The number of heads whose rows llama.cpp permutes in this (kiln-named) tensor, if any. Only
/// its `llama` architecture is converted to the interleaved RoPE layout; Qwen and Gemma keep
/// HF's half-split rows (llama.cpp's NEOX RoPE).
fn rope_heads(cfg: &ModelConfig, kiln: &str) -> Option<usize> {
    if !matches!(gguf_architecture(cfg), "llama" | "smollm3") {
        None
    } else if kiln.ends_with("attention.wq.weight") {
        Some(cfg.n_heads)
    } else if kiln.ends_with("attention.wk.weight") {
        Some(cfg.n_kv_heads())
    } else {
        None
    }
}

/// Reorders the rows (each `row_bytes` long) of a Q/K projection between llama.cpp's
/// interleaved RoPE layout and the half-split layout.
///
/// Within each head of `hd` rows, half-split row `s * hd/2 + i` (s in {0, 1}) is interleaved
/// row `2 i + s`. `to_half_split` undoes llama.cpp's `permute` (loading); `false` applies it
/// (export).
pub fn permute_rope_rows(
    data: &[u8],
    n_heads: usize,
    row_bytes: usize,
    to_half_split: bool,
) -> Vec<u8> {
    let rows = data.len() / row_bytes;
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for i in 0..half {
                let split = h * hd + s * half + i;
                let inter = h * hd + 2 * i + s;
                let (dst, src) = if to_half_split {
                    (split, inter)
                } else {
                    (inter, split)
                };
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// PyTorch order: `(out, in)` for a matrix (GGUF stores the dims reversed).
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    pub n_bytes: usize,
}

/// An opened (memory-mapped, header-checked) GGUF file.
pub struct GgufFile {
    path: PathBuf,
    /// Shared with the weights built over it ([`GgufFile::weight`]).
    mmap: std::sync::Arc<memmap2::Mmap>,
    metadata: BTreeMap<String, GgufValue>,
    tensors: BTreeMap<String, GgufTensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// True when `path` is a file that starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// The file's header ([`kiln_gguf::read_header`]) with every tensor's type and extent checked.
/// A file's metadata and its checked tensor table.
type ScannedHeader = (
    BTreeMap<String, GgufValue>,
    BTreeMap<String, GgufTensorInfo>,
);

fn scan_tensors(buf: &[u8]) -> Result<ScannedHeader, String> {
    let header = kiln_gguf::read_header(buf).map_err(|e| e.0)?;
    let data_start = header.data_start;
    let raw = header
        .tensors
        .into_iter()
        .map(|t| (t.name, t.dims, t.ggml_type, t.offset as usize));
    let mut out = BTreeMap::new();
    for (name, shape, ty, offset) in raw {
        let Some(dtype) = dtype_from_id(ty) else {
            return Err(format!(
                "tensor {name:?} has GGML type {ty} ({}), which kiln cannot read; supported types: {}",
                ggml_type_name(ty),
                SUPPORTED_TYPES.join(", ")
            ));
        };
        let elems: usize = shape.iter().product();
        let bs = dtype.block_size();
        if shape.last().is_some_and(|&d| d % bs != 0) {
            return Err(format!(
                "tensor {name:?} ({shape:?}, {}) has rows that are not a whole number of {bs}-element blocks",
                dtype_name(dtype)
            ));
        }
        let n_bytes = (elems / bs).saturating_mul(dtype.type_size());
        let start = data_start.saturating_add(offset);
        if start.saturating_add(n_bytes) > buf.len() {
            return Err(format!(
                "truncated file: tensor {name:?} ({}, {shape:?}) needs bytes {start}..{} but the file has {} bytes",
                dtype_name(dtype),
                start.saturating_add(n_bytes),
                buf.len()
            ));
        }
        if out.contains_key(&name) {
            return Err(format!("tensor {name:?} appears twice in the tensor table"));
        }
        out.insert(
            name,
            GgufTensorInfo {
                shape,
                dtype,
                start,
                n_bytes,
            },
        );
    }
    Ok((header.metadata, out))
}

impl GgufFile {
    /// Memory-maps `path` and checks the header: magic, version, every tensor's type and extent.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Weights {
            path: path.display().to_string(),
            msg,
        };
        let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only; like every mmap reader we assume the file is not
        // truncated underneath us while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(format!("mmap: {e}")))?;
        let (metadata, tensors) = scan_tensors(&mmap).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap: std::sync::Arc::new(mmap),
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Weights {
            path: self.path.display().to_string(),
            msg: msg.into(),
        }
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The tensor table, by GGUF name.
    pub fn tensors(&self) -> &BTreeMap<String, GgufTensorInfo> {
        &self.tensors
    }

    /// How many tensors of each GGML type the file holds, e.g. `{"F32": 61, "Q4_1": 210}`.
    pub fn type_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for t in self.tensors.values() {
            *m.entry(dtype_name(t.dtype)).or_insert(0) += 1;
        }
        m
    }

    pub fn architecture(&self) -> Result<String, ModelError> {
        self.meta_str("general.architecture")?
            .ok_or_else(|| self.err("metadata has no general.architecture"))
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<String>, ModelError> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(format!("metadata {key} should be a string, got {v:?}"))),
        }
    }

    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>, ModelError> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata {key} should be a non-negative integer, got {v:?}"
                ))
            }),
        }
    }

    /// A number (an f32 as the shortest decimal that reads back as it, so configs round-trip).
    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("metadata {key} should be a number, got {v:?}"))),
        }
    }

    /// The model config the metadata describes (LLaMA family only). Shapes are then checked
    /// tensor by tensor when the weights load.
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        let arch = self.architecture()?;
        if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
            let why = match arch.as_str() {
                "phi3" => " (kiln reads Phi-3 from its HF directory; not from GGUF yet)",
                a if a.contains("moe") || a == "mixtral" => " (mixture-of-experts layers)",
                _ => "",
            };
            return Err(self.err(format!(
                "unsupported architecture {arch:?}{why} (general.architecture); kiln reads GGUF \
                 files of {} (Llama, Mistral and SmolLM2 are \"llama\")",
                GGUF_ARCHITECTURES.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| -> Result<usize, ModelError> {
            self.meta_u64(&key(k))?
                .map(|v| v as usize)
                .ok_or_else(|| self.err(format!("metadata has no {}", key(k))))
        };
        if self.meta_u64(&key("expert_count"))?.unwrap_or(0) > 0 {
            return Err(self.err("mixture-of-experts models are not supported"));
        }
        let dim = need("embedding_length")?;
        let n_layers = need("block_count")?;
        let n_heads = need("attention.head_count")?;
        let n_kv_heads = self
            .meta_u64(&key("attention.head_count_kv"))?
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        let ffn_dim = need("feed_forward_length")?;
        let max_seq_len = need("context_length")?;
        let embd = self
            .tensors
            .get("token_embd.weight")
            .ok_or_else(|| self.err("missing tensor \"token_embd.weight\""))?;
        let vocab_size = match self.meta_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => embd.shape[0],
        };
        let head_dim = match self.meta_u64(&key("attention.key_length"))? {
            Some(k) if n_heads > 0 && k as usize != dim / n_heads => Some(k as usize),
            _ => None,
        };
        let hd = head_dim.unwrap_or(dim / n_heads.max(1));
        if let Some(rope_dim) = self.meta_u64(&key("rope.dimension_count"))? {
            if rope_dim as usize != hd && !matches!(arch.as_str(), "gemma3" | "phi3") {
                return Err(self.err(format!(
                    "{} = {rope_dim} but the head size is {hd}: partial rotary embeddings are not supported",
                    key("rope.dimension_count")
                )));
            }
        }
        let rope_scaling = match self.meta_str(&key("rope.scaling.type"))?.as_deref() {
            None | Some("none") => None,
            Some("linear") => {
                let factor = self.meta_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                (factor != 1.0).then_some(RopeScaling::Linear { factor })
            }
            Some(other) => {
                return Err(self.err(format!(
                    "unsupported RoPE scaling {other:?} ({}); kiln supports linear",
                    key("rope.scaling.type")
                )))
            }
        };
        let rope_scaling = match self.tensors.get("rope_freqs.weight") {
            // Llama 3.1-style scaling: per-frequency divisors.
            Some(info) => {
                if rope_scaling.is_some() || info.shape != [hd / 2] {
                    return Err(self.err(format!(
                        "tensor \"rope_freqs.weight\" has shape {:?} (head dim {hd}) or comes with another RoPE scaling",
                        info.shape
                    )));
                }
                let bytes = &self.mmap[info.start..info.start + info.n_bytes];
                let t = ggml_file::qtensor_from_ggml(
                    info.dtype,
                    bytes,
                    info.shape.clone(),
                    &Device::Cpu,
                )
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| self.err(format!("tensor \"rope_freqs.weight\": {e}")))?;
                let factors: Vec<f64> = t.into_iter().map(|x| x as f64).collect();
                (!factors.iter().all(|&f| f == 1.0)).then_some(RopeScaling::Factors { factors })
            }
            None => rope_scaling,
        };
        let cfg = ModelConfig {
            n_kv_heads: Some(n_kv_heads),
            ffn_dim: Some(ffn_dim),
            max_seq_len,
            rope_theta: self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            norm_eps: self
                .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            tie_embeddings: !self.tensors.contains_key("output.weight"),
            head_dim,
            rope_scaling,
            ..ModelConfig::base(vocab_size, dim, n_layers, n_heads)
        };
        let window = self
            .meta_u64(&key("attention.sliding_window"))?
            .map(|w| w as usize)
            .filter(|&w| w < max_seq_len);
        let query_pre_attn_scalar = self
            .meta_f64(&key("attention.scale"))?
            .map(|s| 1.0 / (s * s));
        let cfg = match arch.as_str() {
            "llama" => ModelConfig {
                sliding_window: window,
                ..cfg
            },
            "qwen2" => ModelConfig {
                qkv_bias: true,
                ..cfg
            },
            "qwen3" => ModelConfig {
                qk_norm: true,
                ..cfg
            },
            // llama.cpp's Gemma 3: every 6th layer global, the others slide with a 10k RoPE
            // base; norms are stored with Gemma's `1 + w` already added by the converter.
            "gemma3" => ModelConfig {
                qk_norm: true,
                post_norms: true,
                scale_embeddings: true,
                activation: crate::Activation::GeluTanh,
                sliding_window: window,
                sliding_window_pattern: Some(6),
                query_pre_attn_scalar,
                rope_local_theta: Some(10_000.0),
                rope_theta: self
                    .meta_f64(&key("rope.freq_base"))?
                    .unwrap_or(1_000_000.0),
                norm_eps: self
                    .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                    .unwrap_or(1e-6),
                ..cfg
            },
            // Phi-3: partial rotary, LongRoPE from its two factor tensors, a window on every
            // layer (Phi-3-mini-4k); Q|K|V and gate|up are fused in the file (gguf_source).
            "phi3" => {
                let rot = self
                    .meta_u64(&key("rope.dimension_count"))?
                    .map(|r| r as usize)
                    .filter(|&r| r != cfg.head_dim());
                let long = self.vector("rope_factors_long.weight")?;
                let short = self.vector("rope_factors_short.weight")?;
                let rope_scaling = match (long, short) {
                    (Some(long_factor), Some(short_factor)) => Some(RopeScaling::Longrope {
                        short_factor,
                        long_factor,
                        original_max_position_embeddings: self
                            .meta_u64(&key("rope.scaling.original_context_length"))?
                            .map_or(max_seq_len, |v| v as usize),
                        attention_factor: self
                            .meta_f64(&key("rope.scaling.attn_factor"))?
                            .unwrap_or(1.0),
                    }),
                    (None, None) => cfg.rope_scaling.clone(),
                    _ => {
                        return Err(self
                            .err("a Phi-3 file with only one of rope_factors_long/short.weight"))
                    }
                };
                ModelConfig {
                    rotary_dim: rot,
                    rope_scaling,
                    sliding_window: window,
                    ..cfg
                }
            }
            "smollm3" => ModelConfig {
                nope_layers: smollm3_nope_layers(cfg.n_layers),
                ..cfg
            },
            // llama.cpp's Gemma 2: even layers slide (4096 unless the file says), one RoPE
            // base, soft caps 50 / 30 unless the file says; norms hold `1 + w` as for Gemma 3.
            "gemma2" => {
                let window = self
                    .meta_u64(&key("attention.sliding_window"))?
                    .map_or(4096, |w| w as usize);
                let cfg = ModelConfig {
                    post_norms: true,
                    scale_embeddings: true,
                    activation: crate::Activation::GeluTanh,
                    sliding_window: (window < max_seq_len).then_some(window),
                    sliding_window_pattern: Some(2),
                    attn_logit_softcapping: Some(
                        self.meta_f64(&key("attn_logit_softcapping"))?
                            .unwrap_or(50.0),
                    ),
                    final_logit_softcapping: Some(
                        self.meta_f64(&key("final_logit_softcapping"))?
                            .unwrap_or(30.0),
                    ),
                    norm_eps: self
                        .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                        .unwrap_or(1e-6),
                    ..cfg
                };
                let scalar = gemma2_query_pre_attn_scalar(&cfg);
                ModelConfig {
                    query_pre_attn_scalar: (scalar != cfg.head_dim() as f64).then_some(scalar),
                    ..cfg
                }
            }
            _ => cfg,
        };
        cfg.validate().map_err(|e| self.err(e.to_string()))?;
        Ok(cfg)
    }

    /// A 1-D tensor's values (RoPE factors), None when the file has no such tensor.
    fn vector(&self, name: &str) -> Result<Option<Vec<f64>>, ModelError> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let bytes = &self.mmap[info.start..info.start + info.n_bytes];
        let v = ggml_file::qtensor_from_ggml(info.dtype, bytes, info.shape.clone(), &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| self.err(format!("tensor {name:?}: {e}")))?;
        Ok(Some(v.into_iter().map(f64::from).collect()))
    }

    /// Checks that the file's tensors are exactly the ones `cfg` needs, with its shapes.
    pub fn check_tensors(&self, cfg: &ModelConfig) -> Result<(), ModelError> {
        let expected = layout(cfg);
        let mut known = std::collections::BTreeSet::new();
        for (name, shape, _) in &expected {
            let (g, rows) = gguf_source(cfg, name).expect("every kiln tensor has a GGUF name");
            let Some(t) = self.tensors.get(&g) else {
                return Err(self.err(format!("missing tensor {g:?} (kiln {name:?})")));
            };
            let fits = match rows {
                None => &t.shape == shape,
                Some((start, len)) => {
                    t.shape.len() == 2
                        && t.shape[0] >= start + len
                        && t.shape[1] == shape[1]
                        && len == shape[0]
                }
            };
            if !fits {
                return Err(self.err(format!(
                    "tensor {g:?} has shape {:?} but the config needs {shape:?}{}",
                    t.shape,
                    rows.map(|(s, l)| format!(" in rows {s}..{}", s + l))
                        .unwrap_or_default()
                )));
            }
            known.insert(g);
        }
        let extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !known.contains(*k) && !ROPE_TENSORS.contains(&k.as_str()))
            .collect();
        if !extra.is_empty() {
            return Err(self.err(format!("unexpected tensors for this config: {extra:?}")));
        }
        Ok(())
    }

    /// Where kiln tensor `kiln` lies in the file: its GGUF name and type, its byte range and
    /// its shape (a fused tensor's block of rows: blocks run along rows, so rows are a byte
    /// range, quantised or not).
    fn span(
        &self,
        cfg: &ModelConfig,
        kiln: &str,
    ) -> Result<(String, GgmlDType, usize, usize, Vec<usize>), ModelError> {
        let (g, rows) =
            gguf_source(cfg, kiln).ok_or_else(|| self.err(format!("no GGUF name for {kiln:?}")))?;
        let info = self
            .tensors
            .get(&g)
            .ok_or_else(|| self.err(format!("missing tensor {g:?}")))?;
        let (mut start, mut n_bytes, mut shape) = (info.start, info.n_bytes, info.shape.clone());
        if let Some((first, len)) = rows {
            let row_bytes = info.n_bytes / info.shape[0];
            (start, n_bytes) = (start + first * row_bytes, len * row_bytes);
            shape[0] = len;
        }
        Ok((g, info.dtype, start, n_bytes, shape))
    }

    /// One tensor, still quantised, under its kiln name and in kiln's layout (Q/K rows
    /// un-permuted). Call [`check_tensors`](Self::check_tensors) first.
    pub fn qtensor(&self, cfg: &ModelConfig, kiln: &str) -> Result<QTensor, ModelError> {
        let (g, dtype, start, n_bytes, shape) = self.span(cfg, kiln)?;
        let bytes = &self.mmap[start..start + n_bytes];
        let data = match rope_heads(cfg, kiln) {
            Some(heads) => {
                let rows = shape[0];
                std::borrow::Cow::Owned(permute_rope_rows(bytes, heads, bytes.len() / rows, true))
            }
            None => std::borrow::Cow::Borrowed(bytes),
        };
        ggml_file::qtensor_from_ggml(dtype, &data, shape, &Device::Cpu)
            .map_err(|e| self.err(format!("tensor {g:?}: {e}")))
    }

    /// Matrix `kiln` for inference, used where it lies when kiln has a kernel for its type:
    /// the blocks stay in the mapped file (no copy). Q/K rows that llama.cpp stores permuted
    /// are un-permuted into an owned copy; types without a kiln kernel go through candle.
    pub fn weight(&self, cfg: &ModelConfig, kiln: &str) -> Result<LinearWeight, ModelError> {
        let (g, dtype, start, n_bytes, shape) = self.span(cfg, kiln)?;
        if shape.len() != 2 || rope_heads(cfg, kiln).is_some() {
            return LinearWeight::from_qtensor(self.qtensor(cfg, kiln)?);
        }
        let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = self.mmap.clone();
        let bytes = kiln_kernels::qkernels::SharedBytes::new(owner, start, n_bytes)
            .ok_or_else(|| self.err(format!("tensor {g:?} lies outside the file")))?;
        match LinearWeight::mapped(dtype, shape[0], shape[1], bytes) {
            Some(w) => Ok(w),
            None => LinearWeight::from_qtensor(self.qtensor(cfg, kiln)?),
        }
    }

    /// Every weight, dequantised to f32 (the training/eval path and the reference for the
    /// quantised one).
    pub fn load_params(&self, cfg: &ModelConfig, device: &Device) -> Result<Params, ModelError> {
        self.check_tensors(cfg)?;
        let mut tensors = HashMap::new();
        for (name, _, _) in layout(cfg) {
            let q = self.qtensor(cfg, &name)?;
            let t = q
                .dequantize(device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| self.err(format!("dequantising {name:?}: {e}")))?;
            tensors.insert(name, t);
        }
        Params::from_tensors(cfg, tensors, &self.path.display().to_string())
    }
}

/// How to store each tensor when writing a GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufExportTypes {
    /// Matrices (projections, embedding, head).
    pub matrices: GgmlDType,
    /// Norm weights (GGUF keeps them F32 by convention).
    pub vectors: GgmlDType,
    /// llama.cpp's `_M` mixtures (Q4_K_M, Q5_K_M): this type for the output matrix (the
    /// embedding when it is tied) and for `attn_v` and `ffn_down` in the layers llama.cpp's
    /// `use_more_bits` picks. `None`: every matrix is `matrices`.
    pub more_bits: Option<GgmlDType>,
}

impl GgufExportTypes {
    /// Every matrix as `matrices`, vectors F32.
    pub fn uniform(matrices: GgmlDType) -> Self {
        Self {
            matrices,
            vectors: GgmlDType::F32,
            more_bits: None,
        }
    }

    /// The type of matrix `kiln` before any fallback for rows that are not whole blocks.
    fn matrix_type(&self, cfg: &ModelConfig, kiln: &str) -> GgmlDType {
        let Some(more) = self.more_bits else {
            return self.matrices;
        };
        if kiln == "output.weight" || (cfg.tie_embeddings && kiln == "tok_embeddings.weight") {
            return more;
        }
        let layer = kiln
            .strip_prefix("layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let mixed =
            kiln.ends_with("attention.wv.weight") || kiln.ends_with("feed_forward.w2.weight");
        match layer {
            Some(i) if mixed && use_more_bits(i, cfg.n_layers) => more,
            _ => self.matrices,
        }
    }
}

/// llama.cpp's choice of layers whose `attn_v` and `ffn_down` get more bits in the `_M`
/// mixtures: the first and last eighth, and every third layer between.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

/// What llama.cpp stores a K-quant matrix as when its rows are not whole 256-weight
/// super-blocks (SmolLM2's 576-wide rows, for one): the 32-weight type of about the same
/// size. (For Q2_K/Q3_K llama.cpp picks IQ4_NL, which kiln cannot write; Q4_0 is the
/// nearest.)
fn row_fallback(d: GgmlDType) -> GgmlDType {
    match d {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    }
}

/// The `general.*` and `<arch>.*` metadata for `cfg`, as llama.cpp's converter writes it. Errors
/// for a family kiln does not write to GGUF yet (Phi-3, SmolLM3).
pub fn model_metadata(
    cfg: &ModelConfig,
    name: &str,
) -> Result<Vec<(String, GgufValue)>, ModelError> {
    let arch = gguf_architecture(cfg);
    match &cfg.rope_scaling {
        Some(RopeScaling::Yarn { .. }) => {
            return Err(ModelError::Config(
                "kiln does not write YaRN RoPE scaling to GGUF yet (export with --format hf)"
                    .into(),
            ))
        }
        _ if arch == "smollm3" && cfg.nope_layers != smollm3_nope_layers(cfg.n_layers) => {
            return Err(ModelError::Config(format!(
                "llama.cpp's smollm3 has no RoPE on every 4th layer only; this model's NoPE layers are {:?} (export with --format hf)",
                cfg.nope_layers
            )))
        }
        Some(RopeScaling::Longrope { .. }) if arch != "phi3" => {
            return Err(ModelError::Config(format!(
                "LongRoPE scaling has no GGUF form for {arch} (llama.cpp reads it for phi3 only)"
            )))
        }
        _ => {}
    }
    let u32v = |x: usize| GgufValue::U32(x as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let mut m = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(arch.into()),
        ),
        ("general.name".to_string(), GgufValue::String(name.into())),
        ("general.alignment".to_string(), GgufValue::U32(32)),
        (key("vocab_size"), u32v(cfg.vocab_size)),
        (key("context_length"), u32v(cfg.max_seq_len)),
        (key("embedding_length"), u32v(cfg.dim)),
        (key("block_count"), u32v(cfg.n_layers)),
        (key("feed_forward_length"), u32v(cfg.ffn_dim())),
        (key("attention.head_count"), u32v(cfg.n_heads)),
        (key("attention.head_count_kv"), u32v(cfg.n_kv_heads())),
        (key("rope.freq_base"), GgufValue::F32(cfg.rope_theta as f32)),
        (key("rope.dimension_count"), u32v(cfg.rotary_dim())),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(cfg.norm_eps as f32),
        ),
    ];
    if arch == "gemma2" {
        let scalar = cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim() as f64);
        if scalar != gemma2_query_pre_attn_scalar(cfg) {
            return Err(ModelError::Config(format!(
                "llama.cpp's gemma2 fixes query_pre_attn_scalar at {} for this shape; this model's is {scalar} (export with --format hf)",
                gemma2_query_pre_attn_scalar(cfg)
            )));
        }
        for (k, cap) in cfg.softcaps() {
            match cap {
                Some(c) => m.push((key(k), GgufValue::F32(c as f32))),
                None => {
                    return Err(ModelError::Config(format!(
                        "llama.cpp's gemma2 always soft-caps; this model has no {k} (export with --format hf)"
                    )))
                }
            }
        }
    }
    if cfg.head_dim.is_some() || matches!(arch, "gemma2" | "gemma3") {
        m.push((key("attention.key_length"), u32v(cfg.head_dim())));
        m.push((key("attention.value_length"), u32v(cfg.head_dim())));
    }
    // llama.cpp reads the window of Gemma 3 and ignores it on `llama` (as for Mistral's own
    // files); kiln reads it back on both.
    if let Some(w) = cfg.sliding_window {
        m.push((key("attention.sliding_window"), u32v(w)));
    } else if arch == "gemma2" {
        // llama.cpp's gemma2 slides 4096 unless told; a window as long as the context is none.
        m.push((key("attention.sliding_window"), u32v(cfg.max_seq_len)));
    }
    if let Some(q) = cfg.query_pre_attn_scalar {
        m.push((
            key("attention.scale"),
            GgufValue::F32((1.0 / q.sqrt()) as f32),
        ));
    }
    if let Some(RopeScaling::Longrope {
        original_max_position_embeddings,
        attention_factor,
        ..
    }) = cfg.rope_scaling
    {
        m.push((
            key("rope.scaling.original_context_length"),
            u32v(original_max_position_embeddings),
        ));
        m.push((
            key("rope.scaling.attn_factor"),
            GgufValue::F32(attention_factor as f32),
        ));
    }
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        m.push((key("rope.scaling.type"), GgufValue::String("linear".into())));
        m.push((key("rope.scaling.factor"), GgufValue::F32(factor as f32)));
    }
    Ok(m)
}

/// The type tensor `kiln` of shape `dims` is written as.
fn stored_type(cfg: &ModelConfig, kiln: &str, dims: &[usize], types: GgufExportTypes) -> GgmlDType {
    let mut dtype = if dims.len() == 1 {
        types.vectors
    } else {
        types.matrix_type(cfg, kiln)
    };
    let cols = dims.last().copied().unwrap_or(0);
    while cols % dtype.block_size() != 0 {
        dtype = row_fallback(dtype);
    }
    dtype
}

/// Quantises (or casts) one kiln tensor for a GGUF, applying llama.cpp's Q/K row permutation.
/// Matrices whose rows are not a whole number of quantisation blocks fall back as llama.cpp's
/// do (Q4_K to Q5_0, Q6_K to Q8_0, ...; F16 when nothing else fits).
pub fn export_tensor(
    cfg: &ModelConfig,
    kiln: &str,
    t: &Tensor,
    types: GgufExportTypes,
) -> Result<(String, QTensor), ModelError> {
    let g = gguf_name(kiln).ok_or_else(|| ModelError::Weights {
        path: kiln.into(),
        msg: "no GGUF name for this tensor".into(),
    })?;
    // A compact copy: candle's quantize reads the whole storage, not the view into a flat
    // parameter buffer.
    let t = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .force_contiguous()?;
    let dtype = stored_type(cfg, kiln, t.dims(), types);
    let q = if dtype == GgmlDType::Q6K {
        // kiln's own quantiser: llama.cpp's algorithm, so the bytes match llama-quantize's.
        let x: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes = crate::quantize::quantize_q6k(&x);
        ggml_file::qtensor_from_ggml(dtype, &bytes, t.dims().to_vec(), &Device::Cpu)?
    } else {
        QTensor::quantize(&t, dtype)?
    };
    let q = match rope_heads(cfg, kiln) {
        Some(heads) => {
            let data = q.data()?;
            let rows = t.dim(0)?;
            let permuted = permute_rope_rows(&data, heads, data.len() / rows, false);
            ggml_file::qtensor_from_ggml(dtype, &permuted, t.dims().to_vec(), &Device::Cpu)?
        }
        None => q,
    };
    Ok((g, q))
}

/// Writes a GGUF: `metadata` (architecture, tokenizer, chat template...) and kiln's weights
/// under llama.cpp's names and layout.
pub fn write_gguf(
    path: &Path,
    cfg: &ModelConfig,
    params: &Params,
    metadata: &[(String, GgufValue)],
    types: GgufExportTypes,
) -> Result<(), ModelError> {
    write_gguf_streamed(path, cfg, |name| params.tensor(name), metadata, types)
}

/// [`write_gguf`] asking `get` for each kiln tensor (f32) one at a time and keeping only its
/// converted bytes, so an export from a memory-mapped checkpoint never holds the model in
/// f32: the peak is the written file's size plus one f32 tensor.
pub fn write_gguf_streamed(
    path: &Path,
    cfg: &ModelConfig,
    get: impl Fn(&str) -> Result<Tensor, ModelError>,
    metadata: &[(String, GgufValue)],
    types: GgufExportTypes,
) -> Result<(), ModelError> {
    let err = |msg: String| ModelError::Weights {
        path: path.display().to_string(),
        msg,
    };
    // (GGUF name, GGML type id, dims, bytes) of each tensor, in file order.
    let mut tensors: Vec<(String, u32, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut keep = |g: String, q: QTensor| -> Result<(), ModelError> {
        let record = (
            g,
            dtype_id(q.dtype()),
            q.shape().dims().to_vec(),
            q.data()?.into_owned(),
        );
        tensors.push(record);
        Ok(())
    };
    // Phi-3's fused tensors: their row blocks, gathered by file name.
    let mut fused: BTreeMap<String, Vec<(usize, String, Tensor)>> = BTreeMap::new();
    for (name, _, _) in layout(cfg) {
        let t = get(&name)?;
        match gguf_source(cfg, &name) {
            Some((g, Some((start, _)))) => fused.entry(g).or_default().push((start, name, t)),
            _ => {
                let (g, q) = export_tensor(cfg, &name, &t, types)?;
                keep(g, q)?;
            }
        }
    }
    for (g, mut parts) in fused {
        parts.sort_by_key(|(start, _, _)| *start);
        let first = parts[0].1.clone();
        let whole: Vec<Tensor> = parts.into_iter().map(|(_, _, t)| t).collect();
        let (_, q) = export_tensor(cfg, &first, &Tensor::cat(&whole, 0)?, types)?;
        keep(g, q)?;
    }
    if let Some(RopeScaling::Longrope {
        short_factor,
        long_factor,
        ..
    }) = &cfg.rope_scaling
    {
        for (name, f) in [
            ("rope_factors_long.weight", long_factor),
            ("rope_factors_short.weight", short_factor),
        ] {
            let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            let n = v.len();
            let t = Tensor::from_vec(v, n, &Device::Cpu)?;
            keep(name.into(), QTensor::quantize(&t, GgmlDType::F32)?)?;
        }
    }
    // Llama 3.1-style scaling (and factors read from a GGUF) go in llama.cpp's tensor.
    if let Some(rs @ (RopeScaling::Llama3 { .. } | RopeScaling::Factors { .. })) = &cfg.rope_scaling
    {
        let f: Vec<f32> = rs
            .factors(cfg.head_dim(), cfg.rope_theta)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let n = f.len();
        let t = Tensor::from_vec(f, n, &Device::Cpu)?;
        keep(
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        )?;
    }
    let md: Vec<(&str, &GgufValue)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<kiln_gguf::TensorData> = tensors
        .iter()
        .map(|(name, ggml_type, dims, data)| kiln_gguf::TensorData {
            name,
            ggml_type: *ggml_type,
            dims,
            data,
        })
        .collect();
    let tmp = path.with_extension("gguf.part");
    let file = std::fs::File::create(&tmp).map_err(|e| err(format!("cannot create: {e}")))?;
    let mut w = std::io::BufWriter::new(file);
    kiln_gguf::write(&mut w, &md, &ts).map_err(|e| err(format!("writing: {e}")))?;
    use std::io::Write;
    w.flush().map_err(|e| err(format!("writing: {e}")))?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| err(format!("rename: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kiln's Q4_K_M on SmolLM2-135M's shapes picks what llama.cpp's `llama-quantize ...
    /// Q4_K_M` wrote for the same model: 16 Q4_K, 166 Q5_0, 14 Q6_K, 15 Q8_0 matrices.
    #[test]
    fn q4_k_m_mixture_matches_llama_cpp_on_smollm2_shapes() {
        let cfg = ModelConfig {
            vocab_size: 49152,
            dim: 576,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: Some(3),
            ffn_dim: Some(1536),
            tie_embeddings: true,
            ..ModelConfig::tiny()
        };
        let types = GgufExportTypes {
            more_bits: Some(GgmlDType::Q6K),
            ..GgufExportTypes::uniform(GgmlDType::Q4K)
        };
        let mut counts = std::collections::BTreeMap::new();
        for (name, dims, _) in layout(&cfg) {
            if dims.len() == 2 {
                *counts
                    .entry(dtype_name(stored_type(&cfg, &name, &dims, types)))
                    .or_insert(0) += 1;
            }
        }
        let want: std::collections::BTreeMap<&str, i32> =
            [("Q4_K", 16), ("Q5_0", 166), ("Q6_K", 14), ("Q8_0", 15)].into();
        assert_eq!(counts, want);
    }

    #[test]
    fn names_round_trip() {
        let cfg = ModelConfig::tiny();
        for (name, _, _) in layout(&ModelConfig {
            tie_embeddings: false,
            ..cfg
        }) {
            let g = gguf_name(&name).unwrap();
            assert_eq!(kiln_name(&g).as_deref(), Some(name.as_str()), "{g}");
        }
    }

    #[test]
    fn rope_permutation_matches_llama_cpp_and_inverts() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2).reshape(w.shape)
        let (heads, hd) = (2, 8);
        let rows: Vec<u8> = (0..(heads * hd) as u8).collect();
        let inter = permute_rope_rows(&rows, heads, 1, false);
        let mut want = Vec::new();
        for h in 0..heads {
            for i in 0..hd / 2 {
                for s in 0..2 {
                    want.push((h * hd + s * hd / 2 + i) as u8);
                }
            }
        }
        assert_eq!(inter, want);
        assert_eq!(permute_rope_rows(&inter, heads, 1, true), rows);
    }

    #[test]
    fn dtype_names_parse() {
        assert_eq!(parse_dtype("q8_0"), Some(GgmlDType::Q8_0));
        assert_eq!(parse_dtype("F16"), Some(GgmlDType::F16));
        assert_eq!(parse_dtype("q4_k"), Some(GgmlDType::Q4K));
        assert_eq!(parse_dtype("Q6K"), Some(GgmlDType::Q6K));
        assert_eq!(parse_dtype("iq2"), None);
    }
}
