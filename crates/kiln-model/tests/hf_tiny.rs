//! An HF directory written by transformers itself (tests/fixtures/hf_tiny/make_hf_tiny.py):
//! sharded bf16 safetensors, GQA, explicit head_dim, llama3 RoPE scaling, untied head; and the
//! errors for broken HF and GGUF checkpoints.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use kiln_model::gguf::{self, GgufExportTypes, GgufFile};
use kiln_model::{hf, Llama, ModelConfig, Params, RopeScaling};
use kiln_testutil::{assert_close, Tol};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_tiny")
}

/// The message of an error that must happen.
fn err<T>(r: Result<T, kiln_model::ModelError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn transformers_saved_sharded_bf16_llama_matches_its_logits() {
    let dir = fixture_dir().join("model");
    assert!(dir.join("model.safetensors.index.json").is_file());
    let (cfg, params) = hf::load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(cfg.head_dim(), 24);
    assert_ne!(cfg.head_dim(), cfg.dim / cfg.n_heads);
    assert_eq!((cfg.n_heads, cfg.n_kv_heads()), (4, 2));
    assert!(!cfg.tie_embeddings);
    assert_eq!(cfg.rope_theta, 50_000.0);
    assert!(matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 4.0));
    let model = Llama::new(&cfg, &params).unwrap();
    let reference =
        candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    for i in 0..2 {
        let ids = reference[&format!("t{i}.input_ids")]
            .to_dtype(DType::U32)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.logits(&ids).unwrap().squeeze(0).unwrap();
        assert_close(
            &format!("text {i}"),
            &logits,
            &reference[&format!("t{i}.logits")],
            Tol::MODEL_F32,
        );
    }
}

#[test]
fn broken_hf_directories_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture_dir().join("model");

    // A truncated shard.
    let d = tmp.path().join("truncated");
    copy_dir(&src, &d);
    let shard = d.join("model-00002-of-00005.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let e = err(hf::load_hf_dir(&d, &Device::Cpu));
    assert!(e.contains("model-00002-of-00005.safetensors"), "{e}");

    // A config that disagrees with the weights: a missing layer, a wrong width.
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| -> String {
        let d = tmp.path().join(name);
        copy_dir(&src, &d);
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        f(&mut cfg);
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        err(hf::load_hf_dir(&d, &Device::Cpu))
    };
    let e = edit("layers", &|c| c["num_hidden_layers"] = 3.into());
    assert!(
        e.contains("missing tensor") && e.contains("model.layers.2."),
        "{e}"
    );
    let e = edit("width", &|c| c["intermediate_size"] = 128.into());
    assert!(
        e.contains("model.layers.0.mlp") && e.contains("shape"),
        "{e}"
    );
    let e = edit("arch", &|c| {
        c["architectures"] = serde_json::json!(["FalconForCausalLM"])
    });
    assert!(
        e.contains("FalconForCausalLM") && e.contains("config.json"),
        "{e}"
    );

    // A shard listed in the index but absent.
    let d = tmp.path().join("missing");
    copy_dir(&src, &d);
    std::fs::remove_file(d.join("model-00003-of-00005.safetensors")).unwrap();
    let e = err(hf::load_hf_dir(&d, &Device::Cpu));
    assert!(e.contains("model-00003-of-00005.safetensors"), "{e}");
}

fn tiny_gguf(dir: &Path, matrices: GgmlDType) -> (PathBuf, ModelConfig, Params) {
    // Rows of 64: whole Q8_0/Q4_0 blocks (32) for the projections.
    let cfg = ModelConfig {
        n_kv_heads: Some(2),
        ..ModelConfig::tiny()
    };
    let params = Params::init(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let path = dir.join(format!("tiny-{matrices:?}.gguf"));
    let md = gguf::model_metadata(&cfg, "tiny").unwrap();
    let types = GgufExportTypes::uniform(matrices);
    gguf::write_gguf(&path, &cfg, &params, &md, types).unwrap();
    (path, cfg, params)
}

#[test]
fn gguf_types_round_trip_within_their_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let ids =
        candle_core::Tensor::from_slice(&[1u32, 5, 9, 200, 3, 77], (1, 6), &Device::Cpu).unwrap();
    let (_, cfg, params) = tiny_gguf(tmp.path(), GgmlDType::F32);
    let want = Llama::new(&cfg, &params).unwrap().logits(&ids).unwrap();
    // Relative L2 error of the logits: a wrong layout (e.g. a Q/K permutation applied twice)
    // would give ~1, quantisation gives its own precision.
    for (t, bound) in [
        (GgmlDType::F32, 1e-6),
        (GgmlDType::F16, 2e-3),
        (GgmlDType::BF16, 2e-2),
        (GgmlDType::Q8_0, 2e-2),
        (GgmlDType::Q4_0, 0.25),
        (GgmlDType::Q4_1, 0.25),
        (GgmlDType::Q4K, 0.25),
        (GgmlDType::Q6K, 0.05),
    ] {
        let (path, _, _) = tiny_gguf(tmp.path(), t);
        let f = GgufFile::open(&path).unwrap();
        let c = f.config().unwrap();
        let same = ModelConfig {
            multiple_of: cfg.multiple_of, // irrelevant once ffn_dim is explicit
            ..c.clone()
        };
        assert_eq!(same.resolved(), cfg.resolved(), "{t:?}");
        let p = f.load_params(&c, &Device::Cpu).unwrap();
        let got = Llama::new(&c, &p).unwrap().logits(&ids).unwrap();
        let norm = |x: &candle_core::Tensor| {
            x.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        let rel = norm(&(&got - &want).unwrap()) / norm(&want);
        assert!(rel < bound, "{t:?}: relative L2 error {rel} >= {bound}");
    }
}

#[test]
fn broken_gguf_files_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, cfg, _) = tiny_gguf(tmp.path(), GgmlDType::Q8_0);
    let bytes = std::fs::read(&path).unwrap();

    // Truncated: the error names the file and the first tensor that does not fit.
    let t = tmp.path().join("truncated.gguf");
    std::fs::write(&t, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err(GgufFile::open(&t));
    assert!(
        e.contains("truncated.gguf") && e.contains("truncated") && e.contains(".weight"),
        "{e}"
    );
    std::fs::write(&t, &bytes[..100]).unwrap();
    let e = err(GgufFile::open(&t));
    assert!(e.contains("truncated.gguf"), "{e}");

    // An unknown tensor type (IQ2_XXS, 16) in the tensor table.
    let name = b"blk.1.ffn_up.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    let ty = at + name.len() + 4 + 2 * 8; // n_dims u32, two u64 dims, then the type
    let mut bad = bytes.clone();
    bad[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    let u = tmp.path().join("unknown.gguf");
    std::fs::write(&u, &bad).unwrap();
    let e = err(GgufFile::open(&u));
    assert!(
        e.contains("unknown.gguf") && e.contains("blk.1.ffn_up.weight") && e.contains("IQ2_XXS"),
        "{e}"
    );

    // A config the tensors disagree with, and a missing tensor.
    let f = GgufFile::open(&path).unwrap();
    let wrong = ModelConfig {
        ffn_dim: Some(cfg.ffn_dim() + 32),
        ..cfg.clone()
    };
    let e = err(f.load_params(&wrong, &Device::Cpu));
    assert!(
        e.contains("blk.0.ffn_gate.weight") && e.contains("shape"),
        "{e}"
    );
    let deeper = ModelConfig {
        n_layers: cfg.n_layers + 1,
        ..cfg.clone()
    };
    let e = err(f.load_params(&deeper, &Device::Cpu));
    assert!(e.contains("missing tensor") && e.contains("blk.2."), "{e}");

    // An architecture kiln does not run.
    let mut md = gguf::model_metadata(&cfg, "x").unwrap();
    md[0].1 = gguf::GgufValue::String("gpt2".into());
    let g = tmp.path().join("arch.gguf");
    let params = Params::init(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
    let types = GgufExportTypes::uniform(GgmlDType::F32);
    gguf::write_gguf(&g, &cfg, &params, &md, types).unwrap();
    let e = err(GgufFile::open(&g).unwrap().config());
    assert!(e.contains("arch.gguf") && e.contains("gpt2"), "{e}");
}

#[test]
fn quantised_single_token_path_equals_the_full_forward() {
    // QLlama over F16 blocks (kiln's kernels): feeding the tokens one at a time (the plain-vector
    // single-token path) gives the full forward's logits at every position; a prefill followed
    // by single tokens too. GQA, head_dim 24 and llama3 RoPE included.
    let dir = fixture_dir().join("model");
    let (cfg, params) = hf::load_hf_dir(&dir, &Device::Cpu).unwrap();
    let dense = Llama::new(&cfg, &params).unwrap();
    let q = kiln_model::QLlama::from_params(&cfg, &params, GgmlDType::F16).unwrap();
    assert_eq!(
        q.weight_types().into_iter().collect::<Vec<_>>(),
        vec![("F16", 15)]
    );
    let ids: Vec<u32> = (0..20)
        .map(|i| (i * 37 + 11) % cfg.vocab_size as u32)
        .collect();
    let full = dense
        .logits(&candle_core::Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    for prefill in [1usize, 7] {
        let mut cache = kiln_model::KvCache::new();
        let x =
            candle_core::Tensor::from_slice(&ids[..prefill], (1, prefill), &Device::Cpu).unwrap();
        let first = q
            .forward_decode(&x, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_close(
            "prefill",
            &first,
            &full.get(prefill - 1).unwrap(),
            Tol::MODEL_F32,
        );
        for (p, &id) in ids.iter().enumerate().skip(prefill) {
            let x = candle_core::Tensor::from_slice(&[id], (1, 1), &Device::Cpu).unwrap();
            let step = q
                .forward_decode(&x, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap();
            assert_close(
                &format!("position {p}"),
                &step,
                &full.get(p).unwrap(),
                Tol::MODEL_F32,
            );
        }
    }
}
