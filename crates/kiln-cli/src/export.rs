//! `kiln export`: writes any loadable model (kiln run/checkpoint, HF directory, GGUF file) as
//! an HF directory that `transformers.AutoModelForCausalLM` / `AutoTokenizer` load, or as a
//! GGUF file that llama.cpp (and kiln) read, in F32, F16, BF16 or a GGML quantisation.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::DType;
use clap::{Args, ValueEnum};
use kiln_data::gguf_tokenizer::{vocab_from_tokenizer, GgufVocab};
use kiln_data::ModelTokenizer;
use kiln_load::{check_vocab, load_tokenizer, load_weights, ModelFormat};
use kiln_model::gguf::{self, GgufExportTypes, GgufFile, GgufValue};
use kiln_model::hf;
use tracing::info;

use crate::commands::device;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A transformers directory (config.json, model.safetensors, tokenizer files).
    Hf,
    /// One GGUF file (llama.cpp).
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A kiln run/checkpoint, an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output: a directory for hf, a .gguf file for gguf.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight type. hf: f32 (default), bf16, f16. gguf: f32, f16 (default), bf16, q8_0,
    /// q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, or llama.cpp's mixtures q4_k_m, q5_k_m.
    /// Matrices whose rows are not whole blocks fall back as in llama.cpp (Q4_K to Q5_0, Q5_K
    /// to Q5_1, Q6_K to Q8_0; F16 when nothing fits).
    #[arg(long = "type")]
    pub dtype: Option<String>,
    /// Merge this PEFT LoRA adapter into the weights first (same as `kiln lora merge`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    if kiln_rlhf::reward_checkpoint(&a.model)?.is_some() {
        // A reward model: transformers' LlamaForSequenceClassification (one label).
        if a.format != ExportFormat::Hf || a.adapter.is_some() {
            bail!("a reward model exports as --format hf (its LoRA adapter, if any, is merged), nothing else");
        }
        let dtype = match a.dtype.as_deref().unwrap_or("f32") {
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => bail!("--type {other:?}: an HF export is f32, bf16 or f16"),
        };
        kiln_rlhf::export_reward_hf(&a.model, &a.out, dtype)?;
        info!(from = %a.model.display(), out = %a.out.display(), "exported the reward model (LlamaForSequenceClassification)");
        return Ok(());
    }
    let tok = load_tokenizer(&a.model)?;
    let w = load_weights(&a.model, &device())?;
    check_vocab(&tok, &w.config)?;
    if let Some(dir) = &a.adapter {
        let adapter = kiln_load::load_adapter(dir, &w.config, &device())?;
        kiln_load::merge_adapter(&w.params, &adapter)?;
        info!(
            adapter = %dir.display(),
            rank = adapter.spec.rank,
            targets = adapter.spec.targets.join(","),
            "merged the LoRA adapter into the weights"
        );
    }
    match a.format {
        ExportFormat::Hf => {
            let dtype = match a.dtype.as_deref().unwrap_or("f32") {
                "f32" | "float32" => DType::F32,
                "bf16" | "bfloat16" => DType::BF16,
                "f16" | "float16" => DType::F16,
                other => bail!("--type {other:?}: an HF export is f32, bf16 or f16"),
            };
            hf::save_hf_weights(
                &a.out,
                &w.config,
                &w.params,
                dtype,
                tok.bos.as_ref().map(|b| b.0),
                tok.eos.as_ref().map(|e| e.0),
            )?;
            tok.save_hf(&a.out, w.config.max_seq_len)?;
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
            let p = a.out.join("generation_config.json");
            std::fs::write(&p, serde_json::to_string_pretty(&gen)? + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
        }
        ExportFormat::Gguf => {
            let name = a.dtype.as_deref().unwrap_or("f16");
            // llama.cpp's mixtures: the K-quant, with Q6_K where `use_more_bits` says.
            let (types, ftype) = match name.to_ascii_lowercase().as_str() {
                "q4_k_m" => (mixture(GgmlDType::Q4K), 15),
                "q5_k_m" => (mixture(GgmlDType::Q5K), 17),
                _ => {
                    let Some(matrices) = gguf::parse_dtype(name) else {
                        bail!("--type {name:?} is not a GGML type kiln can write (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m, q5_k_m)");
                    };
                    (GgufExportTypes::uniform(matrices), file_type(matrices))
                }
            };
            let model_name = a
                .model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "kiln".into());
            let mut md = gguf::model_metadata(&w.config, &model_name)?;
            md.push(("general.file_type".into(), GgufValue::U32(ftype)));
            md.push(("general.quantization_version".into(), GgufValue::U32(2)));
            md.extend(tokenizer_metadata(
                &a.model,
                w.format,
                &tok,
                w.config.vocab_size,
            )?);
            if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            gguf::write_gguf(&a.out, &w.config, &w.params, &md, types)?;
        }
    }
    info!(
        from = %a.model.display(),
        out = %a.out.display(),
        secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "exported"
    );
    Ok(())
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
    src: &std::path::Path,
    format: ModelFormat,
    tok: &ModelTokenizer,
    vocab_size: usize,
) -> Result<Vec<(String, GgufValue)>> {
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
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok.source.display()))?;
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
