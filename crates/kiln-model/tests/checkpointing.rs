//! Activation checkpointing (`Llama::set_activation_checkpointing`): the same gradients as
//! keeping every activation, with dropout on (the recomputed forward draws the same masks),
//! for full training and for LoRA, and a lower peak of live heap memory.
//!
//! One test per binary: the peak is read from this binary's global allocator, which other
//! tests running beside it would disturb.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use kiln_model::{Llama, LoraSpec, ModelConfig, Params, SplitMix64};

/// The system allocator, counting live bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        dim: 64,
        n_layers: 6,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_dim: Some(192),
        max_seq_len: 128,
        dropout: 0.1,
        ..ModelConfig::tiny()
    }
}

/// The gradients of one micro-batch (dropout on, seeded) and the step's peak live heap
/// above what was live before it.
fn grads_and_peak(model: &Llama, params: &Params) -> (Vec<f32>, usize) {
    let (b, t) = (4, 96);
    let tokens: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 64) as u32).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 5 + 1) % 64) as i64).collect();
    let tokens = Tensor::from_vec(tokens, (b, t), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(targets, b * t, &Device::Cpu).unwrap();
    let mut grads = model.grads(params).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut rng = SplitMix64::new(17);
    model
        .forward_backward(&tokens, &targets, 1.0, &mut grads, Some(&mut rng))
        .unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let flat = grads
        .flat()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (flat, peak)
}

#[test]
fn checkpointed_blocks_give_the_same_gradients_with_a_lower_peak() {
    let cfg = cfg();
    let lora = LoraSpec {
        dropout: 0.1,
        ..LoraSpec::all_projections(4, 8.0)
    };
    for with_lora in [false, true] {
        let mut params = Params::init(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
        let mut model = if with_lora {
            params.add_lora(&cfg, &lora, 5).unwrap();
            Llama::new_with_lora(&cfg, &params, &lora).unwrap()
        } else {
            Llama::new(&cfg, &params).unwrap()
        };
        let (plain, plain_peak) = grads_and_peak(&model, &params);
        model.set_activation_checkpointing(true);
        let (ckpt, ckpt_peak) = grads_and_peak(&model, &params);
        let worst = plain
            .iter()
            .zip(&ckpt)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = plain.iter().map(|a| a.abs()).fold(0f32, f32::max);
        assert!(scale > 0.0, "lora {with_lora}: no gradient at all");
        assert!(
            worst <= 1e-6,
            "lora {with_lora}: gradients differ by {worst} (largest {scale})"
        );
        // Six blocks' activations against one block's (plus the block inputs).
        assert!(
            (ckpt_peak as f64) < 0.6 * plain_peak as f64,
            "lora {with_lora}: peak {ckpt_peak} B with checkpointing, {plain_peak} B without"
        );
        eprintln!("lora {with_lora}: peak {plain_peak} B → {ckpt_peak} B, max |Δgrad| {worst}");
    }
}
