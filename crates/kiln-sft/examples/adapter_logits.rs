//! Writes the logits of a base model with a PEFT LoRA adapter applied (unmerged), for the
//! Python side of the PEFT round trip (tests/fixtures/peft/check_kiln_adapter.py):
//!
//!   cargo run --release -p kiln-sft --example adapter_logits -- BASE ADAPTER OUT.safetensors [IDS]
//!
//! BASE: any model kiln loads (an HF directory for the Python check); ADAPTER: a PEFT adapter
//! directory, or `none` for the base alone; IDS: comma-separated
//! token ids (default: a fixed 12-token sequence). OUT holds `input_ids (1, t)` i64 and
//! `logits (1, t, v)` f32.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: adapter_logits BASE ADAPTER OUT.safetensors [IDS]".into());
    }
    let (base, adapter, out) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let ids: Vec<u32> = match args.get(3) {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()?,
        None => vec![1, 28, 6, 65, 116, 64, 132, 225, 175, 129, 243, 241],
    };
    let w = kiln_load::load_weights(&base, &Device::Cpu)?;
    let mut model = kiln_model::Llama::new(&w.config, &w.params)?;
    // `none`: the base alone (how far kiln and transformers differ without any adapter).
    if adapter.as_os_str() != "none" {
        let a = kiln_load::load_adapter(&adapter, &w.config, &Device::Cpu)?;
        model.attach_lora(&a.params, &a.spec)?;
    }
    let t = ids.len();
    let x = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu)?;
    let logits = model.logits(&x)?.to_dtype(DType::F32)?;
    let mut map = HashMap::new();
    map.insert(
        "input_ids".to_string(),
        Tensor::from_vec(
            ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
            (1, t),
            &Device::Cpu,
        )?,
    );
    map.insert("logits".to_string(), logits);
    candle_core::safetensors::save(&map, &out)?;
    eprintln!("wrote {} ({} tokens)", out.display(), t);
    Ok(())
}
