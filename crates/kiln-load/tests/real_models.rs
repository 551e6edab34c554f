//! The small open models people use, as llama.cpp users have them: Qwen2.5-Coder-0.5B-Instruct
//! and Gemma 3 270M, Q4_K_M GGUF files (`scripts/fetch-test-assets.sh`). Against transformers
//! on the same dequantised weights (`tests/fixtures/real_models/make_real_references.py`):
//! tokenizer ids, last-position logits within 1e-3, and greedy continuations through kiln's
//! quantised decoder.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use kiln_model::gguf::GgufFile;
use kiln_model::{CausalLm, KvCache, Llama};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    gguf: String,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    text: String,
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct TokenizerCases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn fixture(name: &str) -> std::path::PathBuf {
    kiln_testutil::repo_root()
        .join("tests/fixtures/real_models")
        .join(name)
}

fn reference(model: &str) -> (Reference, HashMap<String, Tensor>, TokenizerCases) {
    let read = |f: String| std::fs::read_to_string(fixture(&f)).unwrap();
    let r: Reference = serde_json::from_str(&read(format!("{model}_reference.json"))).unwrap();
    let logits = candle_core::safetensors::load(
        fixture(&format!("{model}_logits.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let cases = serde_json::from_str(&read(format!("{model}_tokenizer_cases.json"))).unwrap();
    (r, logits, cases)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn check_model(model: &str) {
    let (r, logits, cases) = reference(model);
    let path = kiln_testutil::test_asset(&r.gguf);

    // Tokenizer: plain text without special tokens, and prompts as generate encodes them.
    let tok = kiln_load::load_tokenizer(&path).unwrap();
    for c in &cases.cases {
        let ids = tok.tokenizer.encode(&c.text).unwrap();
        assert_eq!(ids, c.ids, "{model}: tokenizing {:?}", c.text);
    }
    for p in &r.prompts {
        assert_eq!(
            tok.encode_prompt(&p.text).unwrap(),
            p.input_ids,
            "{model}: {:?}",
            p.text
        );
    }

    let file = GgufFile::open(&path).unwrap();
    let cfg = file.config().unwrap();
    // Dequantised weights through the training forward: transformers' logits.
    {
        let params = file.load_params(&cfg, &Device::Cpu).unwrap();
        let dense = Llama::new(&cfg, &params).unwrap();
        for (i, p) in r.prompts.iter().enumerate() {
            let t = p.input_ids.len();
            let x = Tensor::from_slice(&p.input_ids, (1, t), &Device::Cpu).unwrap();
            let h = dense
                .hidden_states(&kiln_model::TokenBatch::new(x), None)
                .unwrap();
            let last = h.narrow(0, t - 1, 1).unwrap();
            let got = dense.lm_logits(&last).unwrap().flatten_all().unwrap();
            let want = logits[&format!("p{i}.logits_last")]
                .to_dtype(DType::F32)
                .unwrap();
            let worst = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(worst < 1e-3, "{model} prompt {i}: logits differ by {worst}");
        }
    }
    // The quantised model (kiln's block kernels) decodes transformers' greedy tokens.
    let q = Llama::from_gguf(&file, &cfg).unwrap();
    for p in &r.prompts {
        let mut cache = KvCache::new();
        let mut l: Vec<f32> = q
            .prefill_row(0, &p.input_ids, &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut got = Vec::new();
        while got.len() < p.greedy_ids.len() {
            let id = argmax(&l);
            got.push(id);
            if tok.stop_ids.contains(&id) {
                break;
            }
            l = q
                .decode_step(&[0], &[id], &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        assert_eq!(got, p.greedy_ids, "{model}: greedy after {:?}", p.text);
    }
}

#[test]
fn qwen2_5_coder_0_5b_matches_transformers() {
    check_model("qwen2.5-0.5b");
}

#[test]
fn gemma3_270m_matches_transformers() {
    check_model("gemma3-270m");
}
