//! The real SmolLM2-135M-Instruct (Q4_1 GGUF): facts about the file, dequantised logits
//! against transformers' (tests/fixtures/smollm2/make_smollm2_reference.py), the quantised
//! model against the dequantised one, and export to HF and GGUF and back.
//!
//! The model is fetched by scripts/fetch-test-assets.sh into .cache/assets (or $KILN_ASSETS).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use kiln_model::gguf::{self, GgufExportTypes, GgufFile};
use kiln_model::{hf, CausalLm, KvCache, Llama, QLlama};
use kiln_testutil::{assert_close, Tol};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> PathBuf {
    kiln_testutil::smollm2_gguf()
}

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        root().join("tests/fixtures/smollm2/logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// A field of tests/fixtures/smollm2/token_ids.json (reference ids, make_token_ids.py).
fn token_ids(key: &str) -> serde_json::Value {
    let path = root().join("tests/fixtures/smollm2/token_ids.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key].clone()
}

fn ids(fx: &HashMap<String, Tensor>, p: usize) -> Tensor {
    let ids = &fx[&format!("p{p}.input_ids")];
    ids.to_dtype(DType::U32).unwrap().unsqueeze(0).unwrap()
}

/// Tolerance for the dequantised model against transformers' float32 forward of the same
/// weights (30 layers, logits of magnitude ~20): the only difference is summation order.
const PARITY: Tol = Tol {
    rel: 1e-5,
    abs: 1e-3,
};

#[test]
fn the_file_is_what_the_issue_says() {
    let f = GgufFile::open(&smollm2()).unwrap();
    let cfg = f.config().unwrap();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.dim,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads()
        ),
        (49152, 576, 30, 9, 3)
    );
    assert_eq!(
        (cfg.ffn_dim(), cfg.max_seq_len, cfg.head_dim()),
        (1536, 8192, 64)
    );
    assert_eq!(cfg.rope_theta, 1e5);
    assert!((cfg.norm_eps - 1e-5).abs() < 1e-9);
    assert!(
        cfg.tie_embeddings,
        "no output.weight: the head is the embedding"
    );
    let t = f.tensors();
    assert_eq!(t["token_embd.weight"].dtype, GgmlDType::Q8_0);
    for (name, info) in t {
        if name == "token_embd.weight" {
            continue;
        }
        let want = if info.shape.len() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::Q4_1
        };
        assert_eq!(info.dtype, want, "{name}");
    }
    assert_eq!(
        f.type_counts().into_iter().collect::<Vec<_>>(),
        vec![("F32", 61), ("Q4_1", 210), ("Q8_0", 1)]
    );
    // The config kiln derives matches its own preset of this shape.
    let mut preset = kiln_model::ModelConfig::smollm2_135m();
    preset.norm_eps = cfg.norm_eps;
    assert_eq!(cfg.resolved(), preset.resolved());
}

#[test]
fn dequantised_logits_match_transformers() {
    let f = GgufFile::open(&smollm2()).unwrap();
    let cfg = f.config().unwrap();
    let params = f.load_params(&cfg, &Device::Cpu).unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let fx = fixture();
    let sampled = fx["sampled_ids"].to_dtype(DType::U32).unwrap();
    for p in 0..4 {
        let x = ids(&fx, p);
        let logits = model.logits(&x).unwrap().squeeze(0).unwrap(); // (t, v)
        let t = logits.dim(0).unwrap();
        let max_diff = (logits.index_select(&sampled, 1).unwrap()
            - &fx[&format!("p{p}.sampled_logits")])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!(
            "prompt {p}: {t} tokens, max |kiln - transformers| at sampled ids = {max_diff:.2e}"
        );
        assert_close(
            &format!("prompt {p}: logits at 512 sampled ids, every position"),
            &logits.index_select(&sampled, 1).unwrap(),
            &fx[&format!("p{p}.sampled_logits")],
            PARITY,
        );
        if let Some(full) = fx.get(&format!("p{p}.last_logits")) {
            assert_close(
                &format!("prompt {p}: full last row"),
                &logits.i(t - 1).unwrap(),
                full,
                PARITY,
            );
        }
        let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        let want: Vec<u32> = fx[&format!("p{p}.argmax")]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(argmax, want, "prompt {p}: greedy next tokens");
    }
    // " Paris" after "The capital of France is": its id from the reference tokenizer
    // (tests/fixtures/smollm2/make_token_ids.py).
    let paris = token_ids("texts")[" Paris"].as_array().unwrap().clone();
    assert_eq!(paris.len(), 1, "\" Paris\" is one token: {paris:?}");
    let paris = paris[0].as_u64().unwrap() as u32;
    let last: Vec<u32> = model
        .logits(&ids(&fx, 0))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(*last.last().unwrap(), paris, "token {paris} is \" Paris\"");
}

/// Last-position logits of a model through the KV-cache path.
fn decode_logits(m: &dyn CausalLm, x: &Tensor) -> Tensor {
    let mut cache = KvCache::new();
    m.forward_decode(x, &mut cache).unwrap().squeeze(0).unwrap()
}

#[test]
fn quantised_inference_computes_the_dequantised_model() {
    // kiln's Q4_1/Q8_0 kernels expand each block to the dequantised f32 weights and keep the
    // activations in f32, so the quantised model matches transformers as tightly as the
    // dequantised one (through the KV-cache path, fused QKV and gate/up).
    let f = GgufFile::open(&smollm2()).unwrap();
    let cfg = f.config().unwrap();
    let dense = Llama::new(&cfg, &f.load_params(&cfg, &Device::Cpu).unwrap()).unwrap();
    let q = QLlama::from_gguf(&f, &cfg).unwrap();
    assert_eq!(
        q.weight_types().into_iter().collect::<Vec<_>>(),
        vec![("Q4_1", 210), ("Q8_0", 1)]
    );
    let fx = fixture();
    let sampled = fx["sampled_ids"].to_dtype(DType::U32).unwrap();
    for p in 0..4 {
        let x = ids(&fx, p);
        let t = x.dim(1).unwrap();
        let a = decode_logits(&q, &x);
        let b = decode_logits(&dense, &x);
        assert_close(
            &format!("prompt {p}: quantised vs dequantised"),
            &a,
            &b,
            PARITY,
        );
        let want = fx[&format!("p{p}.sampled_logits")].i(t - 1).unwrap();
        assert_close(
            &format!("prompt {p}: quantised vs transformers"),
            &a.index_select(&sampled, 0).unwrap(),
            &want,
            PARITY,
        );
    }
}

#[test]
fn quantised_token_by_token_decoding_matches_transformers() {
    // The single-token path (plain vectors, kiln's kernels) at every position of a prompt,
    // after a one-token prefill, against transformers' full forward.
    let f = GgufFile::open(&smollm2()).unwrap();
    let cfg = f.config().unwrap();
    let q = QLlama::from_gguf(&f, &cfg).unwrap();
    let fx = fixture();
    let sampled = fx["sampled_ids"].to_dtype(DType::U32).unwrap();
    let ids: Vec<u32> = ids(&fx, 1).squeeze(0).unwrap().to_vec1().unwrap();
    let mut cache = KvCache::new();
    for (p, &id) in ids.iter().enumerate() {
        let x = Tensor::from_slice(&[id], (1, 1), &Device::Cpu).unwrap();
        let logits = q
            .forward_decode(&x, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_close(
            &format!("position {p}"),
            &logits.index_select(&sampled, 0).unwrap(),
            &fx["p1.sampled_logits"].i(p).unwrap(),
            PARITY,
        );
    }
}

#[test]
fn export_to_hf_and_gguf_and_back_gives_the_same_logits() {
    let f = GgufFile::open(&smollm2()).unwrap();
    let cfg = f.config().unwrap();
    let params = f.load_params(&cfg, &Device::Cpu).unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let fx = fixture();
    let x = ids(&fx, 0);
    let want = model.logits(&x).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // HF: f32 safetensors with transformers' names; bit-identical weights.
    let hf_dir = dir.path().join("hf");
    hf::save_hf_weights(&hf_dir, &cfg, &params, DType::F32, Some(1), Some(2)).unwrap();
    let (cfg2, params2) = hf::load_hf_dir(&hf_dir, &Device::Cpu).unwrap();
    assert_eq!(cfg2.resolved(), cfg.resolved());
    let got = Llama::new(&cfg2, &params2).unwrap().logits(&x).unwrap();
    assert_close("HF round trip", &got, &want, Tol::OP_F32);

    // GGUF F32: kiln writes llama.cpp's Q/K layout and reads it back to the same weights.
    let path = dir.path().join("m.gguf");
    let md = gguf::model_metadata(&cfg, "test").unwrap();
    let types = GgufExportTypes::uniform(GgmlDType::F32);
    gguf::write_gguf(&path, &cfg, &params, &md, types).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let cfg3 = g.config().unwrap();
    assert_eq!(cfg3.resolved(), cfg.resolved());
    let got = Llama::new(&cfg3, &g.load_params(&cfg3, &Device::Cpu).unwrap())
        .unwrap()
        .logits(&x)
        .unwrap();
    assert_close("GGUF F32 round trip", &got, &want, Tol::OP_F32);
}
