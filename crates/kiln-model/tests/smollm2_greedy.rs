//! Byte-exact greedy decoding of the real SmolLM2-135M-Instruct against transformers:
//! tests/fixtures/smollm2/greedy.json (made by tests/fixtures/smollm2/make_greedy.py) holds,
//! for three prompts (plain text, ChatML chat, code), the prompt ids and the first 32 greedy
//! tokens of transformers' float32 forward of the dequantised GGUF. The prompts were chosen so
//! that the top-1/top-2 logit margin stays large at every step, far above the float
//! differences between implementations, so any differing token is a real bug.
//!
//! kiln decodes with its KV cache (one prefill call, then one token at a time) and takes the
//! argmax of each step's logits, for the quantised `QLlama` and the dequantised `Llama`.
//! The prompt ids come from the fixture: the tokenizer is not under test here.
//!
//! The model is fetched by scripts/fetch-test-assets.sh into .cache/assets (or $KILN_ASSETS).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use kiln_model::gguf::GgufFile;
use kiln_model::{CausalLm, KvCache, Llama, QLlama};
use serde_json::Value;

fn golden() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2/greedy.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (made by make_greedy.py)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The argmax of a logits row and its margin over the runner-up.
fn top1(logits: &Tensor) -> (u32, f32) {
    let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
    let (mut best, mut second) = ((0usize, f32::NEG_INFINITY), f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        assert!(!x.is_nan(), "NaN logit at {i}");
        if x > best.1 {
            second = best.1;
            best = (i, x);
        } else if x > second {
            second = x;
        }
    }
    (best.0 as u32, best.1 - second)
}

/// `n` greedy tokens after `prompt`: one prefill call, then one token at a time through the
/// KV cache. Returns the tokens and kiln's top-1/top-2 margin at each step.
fn greedy(model: &dyn CausalLm, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let dev = Device::Cpu;
    let mut cache = KvCache::new();
    let x = Tensor::from_slice(prompt, (1, prompt.len()), &dev).unwrap();
    let mut logits = model.forward_decode(&x, &mut cache).unwrap();
    let (mut out, mut margins) = (Vec::with_capacity(n), Vec::with_capacity(n));
    loop {
        let (id, margin) = top1(&logits);
        out.push(id);
        margins.push(margin);
        if out.len() == n {
            break;
        }
        let x = Tensor::from_slice(&[id], (1, 1), &dev).unwrap();
        logits = model.forward_decode(&x, &mut cache).unwrap();
    }
    assert_eq!(cache.len(), prompt.len() + n - 1);
    (out, margins)
}

fn check(name: &str, model: &dyn CausalLm) {
    let g = golden();
    let n = g["n_new_tokens"].as_u64().unwrap() as usize;
    let required = g["generator"]["min_margin_required"].as_f64().unwrap();
    let prompts = g["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 3, "plain text, chat and code");
    for p in prompts {
        let kind = p["kind"].as_str().unwrap();
        let prompt = ids(&p["input_ids"]);
        let want = ids(&p["greedy_ids"]);
        let ref_margins: Vec<f64> = p["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        assert_eq!(want.len(), n);
        assert!(
            p["min_margin"].as_f64().unwrap() >= required,
            "{kind}: the fixture's prompt is not well separated"
        );
        let (got, margins) = greedy(model, &prompt, n);
        if let Some(step) = (0..n).find(|&i| got[i] != want[i]) {
            panic!(
                "{name}, {kind} prompt {:?}: greedy token {step} is {} but transformers gives {} \
                 (transformers' top-1/top-2 margin there {:.4}, kiln's {:.4})\n  kiln:         \
                 {got:?}\n  transformers: {want:?}",
                p["text"].as_str().unwrap(),
                got[step],
                want[step],
                ref_margins[step],
                margins[step],
            );
        }
        // Same tokens: how far apart are the two implementations' margins (rounded to 1e-4
        // in the fixture)?
        let min = margins.iter().copied().fold(f32::INFINITY, f32::min);
        let dev = margins
            .iter()
            .zip(&ref_margins)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{name}, {kind}: {} prompt + {n} tokens match; smallest margin {min:.4} \
             (transformers {:.4}), largest margin difference {dev:.1e}",
            prompt.len(),
            p["min_margin"].as_f64().unwrap()
        );
    }
}

#[test]
fn quantised_greedy_decoding_matches_transformers() {
    let f = GgufFile::open(&kiln_testutil::smollm2_gguf()).unwrap();
    let cfg = f.config().unwrap();
    let q = QLlama::from_gguf(&f, &cfg).unwrap();
    check("quantised QLlama", &q);
}

#[test]
fn dequantised_greedy_decoding_matches_transformers() {
    let f = GgufFile::open(&kiln_testutil::smollm2_gguf()).unwrap();
    let cfg = f.config().unwrap();
    let dense = Llama::new(&cfg, &f.load_params(&cfg, &Device::Cpu).unwrap()).unwrap();
    check("dequantised Llama", &dense);
}
