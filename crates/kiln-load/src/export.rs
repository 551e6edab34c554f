//! Export policy: writes any loadable model (kiln run/checkpoint, HF directory, GGUF file) as an
//! HF directory that transformers loads (weights, config, tokenizer files and a
//! `generation_config.json` with every stop id) or as a GGUF file that llama.cpp reads (the
//! architecture's metadata, `general.file_type`, the tokenizer, llama.cpp's `_M` mixtures).

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use kiln_data::gguf_tokenizer::{vocab_from_tokenizer, GgufVocab};
use kiln_data::ModelTokenizer;
use kiln_model::gguf::{self, GgufExportTypes, GgufFile, GgufValue};
use kiln_model::hf;

use crate::{check_vocab, load_tokenizer, load_weights, LoadError, ModelFormat};

/// What an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A transformers directory (config.json, model.safetensors, tokenizer files).
    Hf,
    /// One GGUF file (llama.cpp).
    Gguf,
}

/// One export: the model, where it goes, its weight type (`f32`, `bf16`, `f16` for HF; any
/// GGML type kiln writes or `q4_k_m`/`q5_k_m` for GGUF; None for the default), and a PEFT
/// adapter to merge first.
pub struct ExportRequest<'a> {
    pub model: &'a Path,
    pub format: ExportFormat,
    pub out: &'a Path,
    pub type_name: Option<&'a str>,
    pub adapter: Option<crate::AdapterChoice<'a>>,
}

/// What was exported, for the caller's log.
pub struct ExportSummary {
    pub out: PathBuf,
    /// The merged adapter: its directory, rank and targets.
    pub merged_adapter: Option<(PathBuf, usize, Vec<String>)>,
    /// Things the caller should tell the user (an adapter forced onto another base).
    pub warnings: Vec<String>,
}

/// The weight type of an HF export.
pub fn hf_dtype(name: Option<&str>) -> Result<DType, LoadError> {
    match name.unwrap_or("f32") {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(LoadError::Export(format!(
            "--type {other:?}: an HF export is f32, bf16 or f16"
        ))),
    }
}

/// Writes `req.model` as `req.format` at `req.out`.
pub fn export_model(req: &ExportRequest, device: &Device) -> Result<ExportSummary, LoadError> {
    let tok = load_tokenizer(req.model)?;
    // A GGUF from an HF checkpoint or another GGUF is written tensor by tensor: never the
    // whole model in f32 (a 7B would need 28 GB).
    let format = ModelFormat::detect(req.model)?;
    if req.format == ExportFormat::Gguf && req.adapter.is_none() {
        let summary = ExportSummary {
            out: req.out.to_path_buf(),
            merged_adapter: None,
            warnings: Vec::new(),
        };
        match format {
            ModelFormat::HfDir => {
                let config = hf::HfConfig::load(req.model)?.to_model_config(req.model)?;
                check_vocab(&tok, &config)?;
                let weights = hf::HfWeights::open(req.model, &config)?;
                write_gguf_export(req, &config, format, &tok, |name| {
                    weights.tensor(name, &Device::Cpu)
                })?;
                return Ok(summary);
            }
            ModelFormat::Gguf => {
                let file = GgufFile::open(req.model)?;
                let config = file.config()?;
                check_vocab(&tok, &config)?;
                file.check_tensors(&config)?;
                write_gguf_export(req, &config, format, &tok, |name| {
                    Ok(file
                        .qtensor(&config, name)?
                        .dequantize(&Device::Cpu)?
                        .to_dtype(DType::F32)?)
                })?;
                return Ok(summary);
            }
            _ => {}
        }
    }
    let w = load_weights(req.model, device)?;
    check_vocab(&tok, &w.config)?;
    let (mut merged_adapter, mut warnings) = (None, Vec::new());
    if let Some(crate::AdapterChoice { dir, force }) = req.adapter {
        let adapter = crate::load_adapter(dir, &w.config, device)?;
        let fingerprint = kiln_model::norm_fingerprint([
            &w.params.tensor("norm.weight")?,
            &w.params.tensor("layers.0.attention_norm.weight")?,
        ])?;
        warnings.extend(adapter.check_base(req.model, &fingerprint, force)?);
        crate::merge_adapter(&w.params, &adapter)?;
        merged_adapter = Some((
            dir.to_path_buf(),
            adapter.spec.rank,
            adapter.spec.targets.clone(),
        ));
    }
    match req.format {
        ExportFormat::Hf => {
            let dtype = hf_dtype(req.type_name)?;
            hf::save_hf_weights(
                req.out,
                &w.config,
                &w.params,
                dtype,
                tok.bos.as_ref().map(|b| b.0),
                tok.eos.as_ref().map(|e| e.0),
            )?;
            tok.save_hf(req.out, w.config.max_seq_len)?;
            let gen = serde_json::json!({
                "bos_token_id": tok.bos.as_ref().map(|b| b.0),
                "eos_token_id": if tok.stop_ids.len() == 1 {
                    serde_json::json!(tok.stop_ids[0])
                } else {
                    serde_json::json!(tok.stop_ids)
                },
                "do_sample": true,
                "temperature": 0.7,
                "top_p": 0.9,
            });
            let p = req.out.join("generation_config.json");
            let text = serde_json::to_string_pretty(&gen).expect("a JSON value") + "\n";
            std::fs::write(&p, text).map_err(|e| LoadError::io(&p, e))?;
        }
        ExportFormat::Gguf => {
            write_gguf_export(req, &w.config, w.format, &tok, |name| w.params.tensor(name))?
        }
    }
    Ok(ExportSummary {
        out: req.out.to_path_buf(),
        merged_adapter,
        warnings,
    })
}

/// Writes the GGUF of `req` from `get` (each kiln tensor in f32, asked for one at a time).
fn write_gguf_export(
    req: &ExportRequest,
    config: &kiln_model::ModelConfig,
    format: ModelFormat,
    tok: &ModelTokenizer,
    get: impl Fn(&str) -> Result<candle_core::Tensor, kiln_model::ModelError>,
) -> Result<(), LoadError> {
    let name = req.type_name.unwrap_or("f16");
    let (types, ftype) = gguf_types(name)?;
    let model_name = req
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kiln".into());
    let mut md = gguf::model_metadata(config, &model_name)?;
    md.push(("general.file_type".into(), GgufValue::U32(ftype)));
    md.push(("general.quantization_version".into(), GgufValue::U32(2)));
    md.extend(tokenizer_metadata(
        req.model,
        format,
        tok,
        config.vocab_size,
    )?);
    if let Some(parent) = req.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| LoadError::io(parent, e))?;
    }
    gguf::write_gguf_streamed(req.out, config, get, &md, types)?;
    Ok(())
}

/// The tensor types and llama.cpp's `general.file_type` for a `--type` name.
pub fn gguf_types(name: &str) -> Result<(GgufExportTypes, u32), LoadError> {
    // llama.cpp's mixtures: the K-quant, with Q6_K where `use_more_bits` says.
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_k_m" => (mixture(GgmlDType::Q4K), 15),
        "q5_k_m" => (mixture(GgmlDType::Q5K), 17),
        _ => {
            let Some(matrices) = gguf::parse_dtype(name) else {
                return Err(LoadError::Export(format!(
                    "--type {name:?} is not a GGML type kiln can write (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m, q5_k_m)"
                )));
            };
            (GgufExportTypes::uniform(matrices), file_type(matrices))
        }
    })
}

/// A `_M` mixture on `base` (see [`GgufExportTypes::more_bits`]).
fn mixture(base: GgmlDType) -> GgufExportTypes {
    GgufExportTypes {
        more_bits: Some(GgmlDType::Q6K),
        ..GgufExportTypes::uniform(base)
    }
}

/// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`) for the matrices' type.
fn file_type(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        _ => 0,
    }
}

/// `tokenizer.*` metadata: copied from a GGUF source as it is, built from `tokenizer.json`
/// otherwise (byte-level BPE only).
fn tokenizer_metadata(
    src: &Path,
    format: ModelFormat,
    tok: &ModelTokenizer,
    vocab_size: usize,
) -> Result<Vec<(String, GgufValue)>, LoadError> {
    if format == ModelFormat::Gguf {
        let file = GgufFile::open(src)?;
        let mut kv: Vec<(String, GgufValue)> = file
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") || k.as_str() == "general.license")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        kv.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(kv);
    }
    let mut v: GgufVocab = vocab_from_tokenizer(&tok.tokenizer)
        .map_err(|e| LoadError::Export(format!("{}: {e}", tok.source.display())))?;
    // llama.cpp wants one token per embedding row: pad a smaller vocabulary with unused ones.
    for i in v.tokens.len()..vocab_size {
        v.tokens.push(format!("[PAD{i}]"));
        v.token_types.push(5); // UNUSED
    }
    let strs =
        |xs: &[String]| GgufValue::Array(xs.iter().map(|s| GgufValue::String(s.clone())).collect());
    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GgufValue::String(v.model.clone()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            GgufValue::String(v.pre.clone().unwrap_or_else(|| "gpt2".into())),
        ),
        ("tokenizer.ggml.tokens".to_string(), strs(&v.tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(v.token_types.iter().map(|&t| GgufValue::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), strs(&v.merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            GgufValue::Bool(tok.add_bos),
        ),
        (
            "tokenizer.ggml.add_space_prefix".to_string(),
            GgufValue::Bool(false),
        ),
    ];
    if let Some((id, _)) = &tok.bos {
        kv.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(*id)));
    }
    if let Some((id, _)) = &tok.eos {
        kv.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(*id)));
    }
    // llama.cpp has one more end-of-generation slot (end of turn): the first other stop id
    // that `<|endoftext|>` does not already cover on reading.
    let eos = tok.eos.as_ref().map(|e| e.0);
    let endoftext = tok.tokenizer.eos_id();
    if let Some(&id) = tok
        .stop_ids
        .iter()
        .find(|&&id| Some(id) != eos && Some(id) != endoftext)
    {
        kv.push(("tokenizer.ggml.eot_token_id".into(), GgufValue::U32(id)));
    }
    if let Some(t) = &tok.chat_template {
        kv.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(t.clone()),
        ));
    }
    Ok(kv)
}
