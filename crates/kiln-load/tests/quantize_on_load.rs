//! Quantise on load (`--quantize TYPE`): an HF checkpoint (bf16 shards, a fused Phi-3, Gemma's
//! `1 + w` norms) or a GGUF read and quantised one tensor at a time gives exactly the model
//! that loading everything in f32 and then quantising gives.

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use kiln_load::{load_llama, load_weights, Weights};
use kiln_model::QLlama;

fn fixture(rel: &str) -> PathBuf {
    kiln_testutil::repo_root().join(rel)
}

fn logits_bits(m: &kiln_model::Llama, vocab: usize) -> Vec<u32> {
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let t = Tensor::from_vec(ids, (1, 12), &Device::Cpu).unwrap();
    m.logits(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn quantising_on_load_equals_loading_then_quantising() {
    for (dir, dtype) in [
        ("tests/fixtures/hf_tiny/model", GgmlDType::Q8_0),
        ("tests/fixtures/hf_tiny/model", GgmlDType::Q4_0),
        ("tests/fixtures/arch_tiny/phi3", GgmlDType::Q8_0),
        ("tests/fixtures/arch_tiny/gemma2", GgmlDType::Q5_1),
        ("tests/fixtures/arch_tiny/qwen2", GgmlDType::F16),
    ] {
        let path = fixture(dir);
        let (streamed, cfg, desc) =
            load_llama(&path, Weights::Quantized(dtype), &Device::Cpu).unwrap();
        assert!(desc.contains("quantised on load"), "{dir}: {desc}");
        let w = load_weights(&path, &Device::Cpu).unwrap();
        let whole = QLlama::from_params(&w.config, &w.params, dtype).unwrap();
        assert_eq!(streamed.weight_types(), whole.weight_types(), "{dir}");
        assert_eq!(
            logits_bits(&streamed, cfg.vocab_size),
            logits_bits(&whole, cfg.vocab_size),
            "{dir} {dtype:?}: quantised on load differs from load-then-quantise"
        );
    }
}

#[test]
fn a_gguf_requantised_on_load_equals_its_dequantised_weights_requantised() {
    let path = kiln_testutil::smollm2_gguf();
    let (streamed, cfg, desc) =
        load_llama(&path, Weights::Quantized(GgmlDType::Q8_0), &Device::Cpu).unwrap();
    assert!(desc.contains("requantised on load"), "{desc}");
    let w = load_weights(&path, &Device::Cpu).unwrap();
    let whole = QLlama::from_params(&w.config, &w.params, GgmlDType::Q8_0).unwrap();
    assert_eq!(
        logits_bits(&streamed, cfg.vocab_size),
        logits_bits(&whole, cfg.vocab_size)
    );
}
