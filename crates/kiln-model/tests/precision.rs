//! bf16 mixed precision (`Llama::set_precision`): the gradients of a step with bf16 products
//! are the f32 gradients to within bf16's rounding, and differ from them (the path runs);
//! a CPU (or forced ISA level) without AVX512-BF16 keeps f32 products.
//!
//! One test per binary: forcing an ISA level is process-wide.

use candle_core::{DType, Device, Tensor};
use kiln_model::{Llama, LoraSpec, ModelConfig, Params, Precision};

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 96,
        dim: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_dim: Some(160),
        max_seq_len: 64,
        ..ModelConfig::tiny()
    }
}

/// Loss sum and flat gradients of one batch.
fn step(model: &Llama, params: &Params) -> (f64, Vec<f32>) {
    let (b, t) = (3, 48);
    let tokens: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 96) as u32).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 5 + 1) % 96) as i64).collect();
    let tokens = Tensor::from_vec(tokens, (b, t), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(targets, b * t, &Device::Cpu).unwrap();
    let mut grads = model.grads(params).unwrap();
    let loss = model
        .forward_backward(&tokens, &targets, 1.0, &mut grads, None)
        .unwrap();
    let flat = grads
        .flat()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (loss, flat)
}

/// Largest |a - b| relative to the largest |a|.
fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    worst / a.iter().map(|x| x.abs()).fold(0f32, f32::max)
}

#[test]
fn bf16_products_give_the_f32_gradients_within_rounding() {
    let cfg = cfg();
    let lora = LoraSpec::all_projections(4, 8.0);
    for with_lora in [false, true] {
        let mut params = Params::init(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
        let mut model = if with_lora {
            params.add_lora(&cfg, &lora, 5).unwrap();
            // A fresh adapter's B is zero, so A would get no gradient: give B values.
            for (name, t) in params.iter() {
                if name.ends_with("lora_B.weight") {
                    let v = Tensor::full(0.01f32, t.dims(), &Device::Cpu).unwrap();
                    kiln_kernels::add_in_place(t, &v).unwrap();
                }
            }
            Llama::new_with_lora(&cfg, &params, &lora).unwrap()
        } else {
            Llama::new(&cfg, &params).unwrap()
        };
        let (loss32, g32) = step(&model, &params);
        let effective = model.set_precision(Precision::Bf16);
        let (loss16, g16) = step(&model, &params);
        let gap = relative_gap(&g32, &g16);
        if effective == Precision::Bf16 {
            assert!(gap > 0.0, "lora {with_lora}: bf16 products changed nothing");
            // bf16 keeps 8 significant bits (relative rounding 2^-9 per input).
            assert!(
                gap < 0.03,
                "lora {with_lora}: gradients differ by {gap} of the largest"
            );
            let rel_loss = ((loss16 - loss32) / loss32).abs();
            assert!(
                rel_loss < 1e-3,
                "lora {with_lora}: loss {loss32} → {loss16}"
            );
            eprintln!("lora {with_lora}: loss {loss32} → {loss16}, gradient gap {gap}");
        } else {
            assert_eq!(gap, 0.0, "without AVX512-BF16 the products stay f32");
        }
        // Back to f32: the f32 gradients again, bit for bit.
        model.set_precision(Precision::F32);
        assert_eq!(step(&model, &params).1, g32, "lora {with_lora}");
    }
    // A forced level below AVX-512 has no bf16 products.
    kiln_kernels::set_isa(Some(kiln_kernels::Isa::Scalar)).unwrap();
    assert_eq!(Precision::Bf16.effective(), Precision::F32);
    kiln_kernels::set_isa(None).unwrap();
}
