//! Every architecture switch through every path of the one decoder, against transformers.
//!
//! `tests/fixtures/arch_tiny/<family>/` holds a tiny random `*ForCausalLM` saved by transformers
//! and what transformers computes with it (`make_arch_tiny.py`). For each family: kiln loads the
//! HF directory, and its training forward, prefill, single-row and batched decoding (f32 and
//! quantised) all give transformers' logits and greedy tokens; the hand-written backward
//! matches finite differences on every switch's weights; LoRA unmerged equals merged; the HF
//! export reads back to the same logits.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use kiln_model::hf::{load_hf_dir, save_hf_weights, Family, HfConfig};
use kiln_model::{CausalLm, KvCache, Llama, LoraSpec, ModelConfig, Params};
use serde::Deserialize;

const FAMILIES: [&str; 8] = [
    "qwen2",
    "qwen3",
    "qwen3_yarn",
    "gemma2",
    "gemma3",
    "mistral",
    "phi3",
    "smollm3",
];

#[derive(Deserialize)]
struct Reference {
    prompt_ids: Vec<u32>,
    logits_last: Vec<f32>,
    logits_rows_positions: Vec<usize>,
    logits_rows: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
    greedy_logprobs: Vec<f32>,
}

fn dir(family: &str) -> PathBuf {
    kiln_testutil::repo_root().join(format!("tests/fixtures/arch_tiny/{family}"))
}

fn load(family: &str) -> (ModelConfig, Params, Reference) {
    let d = dir(family);
    let (cfg, params) = load_hf_dir(&d, &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(d.join("reference.json")).unwrap();
    (cfg, params, serde_json::from_str(&text).unwrap())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The training forward's logits at every position of `ids`.
fn prompt_logits(cfg: &ModelConfig, params: &Params, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let model = Llama::new(cfg, params).unwrap();
    rows_of(&model.forward_train(&x, None).unwrap())
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn log_softmax_at(logits: &[f32], id: u32) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
    (logits[id as usize] - m) - z.ln() as f32
}

/// Greedy decoding through `prefill_row` + the single-row fast path: ids and log-probs.
fn greedy(model: &Llama, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut cache = KvCache::new();
    let mut logits = rows_of(&model.prefill_row(0, prompt, &mut cache).unwrap()).remove(0);
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let id = argmax(&logits);
        ids.push(id);
        lps.push(log_softmax_at(&logits, id));
        logits = rows_of(&model.decode_step(&[0], &[id], &mut cache).unwrap()).remove(0);
    }
    (ids, lps)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

#[test]
fn each_family_loads_with_its_switches() {
    let want = |f: &str| load(f).0;
    let q2 = want("qwen2");
    assert!(q2.qkv_bias && !q2.qk_norm && q2.sliding_window.is_none());
    let q3 = want("qwen3");
    assert!(q3.qk_norm && q3.head_dim() == 32 && q3.tie_embeddings);
    let g = want("gemma3");
    assert!(g.qk_norm && g.post_norms && g.scale_embeddings);
    assert_eq!(g.sliding_window, Some(6));
    assert_eq!(g.sliding_window_pattern, Some(6));
    assert_eq!((g.rope_theta, g.rope_local_theta), (1e6, Some(1e4)));
    assert_eq!(g.query_pre_attn_scalar, Some(24.0));
    assert!(g.is_sliding(4) && !g.is_sliding(5));
    assert_eq!(
        (g.attn_logit_softcapping, g.final_logit_softcapping),
        (None, None)
    );
    let g2 = want("gemma2");
    assert!(g2.post_norms && g2.scale_embeddings && !g2.qk_norm);
    assert_eq!(
        (g2.attn_logit_softcapping, g2.final_logit_softcapping),
        (Some(3.0), Some(8.0))
    );
    assert_eq!(
        (g2.sliding_window, g2.sliding_window_pattern),
        (Some(6), Some(2))
    );
    assert!(g2.is_sliding(0) && !g2.is_sliding(1) && g2.is_sliding(2));
    assert_eq!(g2.rope_local_theta, None);
    let m = want("mistral");
    assert!(m.sliding_window == Some(6) && (0..4).all(|i| m.is_sliding(i)));
    assert_eq!(want("phi3").rotary_dim, Some(8));
    assert_eq!(want("smollm3").nope_layers, vec![3]);
    for f in FAMILIES {
        let cfg = want(f);
        let family = HfConfig::load(&dir(f)).unwrap().family(&dir(f)).unwrap();
        assert_eq!(
            Family::of(&cfg),
            family,
            "{f}: the family its switches name"
        );
    }
}

#[test]
fn training_forward_matches_transformers_logits() {
    for f in FAMILIES {
        let (cfg, params, r) = load(f);
        let model = Llama::new(&cfg, &params).unwrap();
        let t = r.prompt_ids.len();
        let x = Tensor::from_slice(&r.prompt_ids, (1, t), &Device::Cpu).unwrap();
        let logits = rows_of(&model.forward_train(&x, None).unwrap());
        let mut worst = max_diff(&logits[t - 1], &r.logits_last);
        for (&p, want) in r.logits_rows_positions.iter().zip(&r.logits_rows) {
            worst = worst.max(max_diff(&logits[p], want));
        }
        assert!(
            worst < 1e-4,
            "{f}: logits differ from transformers by {worst}"
        );
    }
}

#[test]
fn greedy_decoding_matches_transformers_dense_and_quantised() {
    for f in FAMILIES {
        let (cfg, params, r) = load(f);
        let dense = Llama::new(&cfg, &params).unwrap();
        let (ids, lps) = greedy(&dense, &r.prompt_ids, r.greedy_ids.len());
        assert_eq!(ids, r.greedy_ids, "{f}: greedy tokens");
        let worst = max_diff(&lps, &r.greedy_logprobs);
        assert!(worst < 1e-4, "{f}: greedy log-probs differ by {worst}");

        // Kiln's F16 block kernels (fused Q|K|V with stacked biases on Qwen2): the cached
        // paths equal the same weights' full forward.
        let q = Llama::from_params(&cfg, &params, GgmlDType::F16).unwrap();
        let all: Vec<u32> = r.prompt_ids.iter().chain(&r.greedy_ids).copied().collect();
        let x = Tensor::from_slice(&all, (1, all.len()), &Device::Cpu).unwrap();
        let full = rows_of(&q.forward_train(&x, None).unwrap());
        let mut cache = KvCache::new();
        let t = r.prompt_ids.len();
        let first = rows_of(&q.prefill_row(0, &all[..t], &mut cache).unwrap()).remove(0);
        let mut worst = max_diff(&first, &full[t - 1]);
        for (i, &id) in all[t..].iter().enumerate() {
            let step = rows_of(&q.decode_step(&[0], &[id], &mut cache).unwrap()).remove(0);
            worst = worst.max(max_diff(&step, &full[t + i]));
        }
        assert!(worst < 1e-4, "{f}: quantised decode vs forward: {worst}");
        let (qids, _) = greedy(&q, &r.prompt_ids, 8);
        let same = qids
            .iter()
            .zip(&r.greedy_ids)
            .filter(|(a, b)| a == b)
            .count();
        assert!(same >= 4, "{f}: f16 greedy {qids:?} vs {:?}", r.greedy_ids);
    }
}

#[test]
fn a_ragged_batch_decodes_like_each_row_alone() {
    for f in FAMILIES {
        let (cfg, params, r) = load(f);
        let model = Llama::new(&cfg, &params).unwrap();
        let prompts: [&[u32]; 3] = [&r.prompt_ids, &r.prompt_ids[3..12], &r.prompt_ids[..2]];
        let mut cache = KvCache::new();
        let mut next: Vec<u32> = prompts
            .iter()
            .enumerate()
            .map(|(row, p)| argmax(&rows_of(&model.prefill_row(row, p, &mut cache).unwrap())[0]))
            .collect();
        let mut batched: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        for _ in 0..9 {
            let logits = rows_of(&model.decode_step(&[0, 1, 2], &next, &mut cache).unwrap());
            next = logits.iter().map(|l| argmax(l)).collect();
            for (b, &t) in batched.iter_mut().zip(&next) {
                b.push(t);
            }
        }
        for (p, got) in prompts.iter().zip(&batched) {
            let mut alone = KvCache::new();
            let mut l = rows_of(&model.prefill_row(0, p, &mut alone).unwrap()).remove(0);
            let mut want = Vec::new();
            for _ in 0..10 {
                let t = argmax(&l);
                want.push(t);
                l = rows_of(&model.decode_step(&[0], &[t], &mut alone).unwrap()).remove(0);
            }
            assert_eq!(got, &want, "{f}: batched row vs alone");
        }
    }
}

/// The family's weights in f64, for finite differences.
fn params_f64(cfg: &ModelConfig, params: &Params) -> Params {
    let tensors: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_dtype(DType::F64).unwrap()))
        .collect();
    Params::from_tensors(cfg, tensors, "f64 copy").unwrap()
}

#[test]
fn hand_written_backward_matches_finite_differences_for_every_switch() {
    for f in FAMILIES {
        let (cfg, params, r) = load(f);
        let p = params_f64(&cfg, &params);
        // Prompts longer than the sliding window, two rows, one target ignored.
        let ids: Vec<u32> = r.prompt_ids[..16].to_vec();
        let x = Tensor::from_vec(ids.clone(), (2, 8), &Device::Cpu).unwrap();
        let mut tv: Vec<i64> = ids.iter().map(|&i| ((i * 7 + 3) % 160) as i64).collect();
        tv[5] = -100;
        let targets = Tensor::from_vec(tv, 16, &Device::Cpu).unwrap();
        let model = Llama::new(&cfg, &p).unwrap();
        let mut grads = model.grads(&p).unwrap();
        model
            .forward_backward(&x, &targets, 1.0, &mut grads, None)
            .unwrap();
        let loss = || {
            let m = Llama::new(&cfg, &p).unwrap();
            let (s, _) =
                kiln_model::loss_sum(&m.forward_train(&x, None).unwrap(), &targets).unwrap();
            s.to_scalar::<f64>().unwrap()
        };
        let mut names = vec![
            "tok_embeddings.weight",
            "layers.0.attention.wq.weight",
            "layers.0.attention.wk.weight",
            "layers.1.feed_forward.w1.weight",
            "layers.1.attention_norm.weight",
            "norm.weight",
        ];
        let last = format!("layers.{}.attention.wq.weight", cfg.n_layers - 1);
        names.push(&last);
        let optional = [
            "layers.0.attention.wq.bias",
            "layers.0.attention.wk.bias",
            "layers.0.attention.wv.bias",
            "layers.0.attention.q_norm.weight",
            "layers.1.attention.k_norm.weight",
            "layers.0.post_attention_norm.weight",
            "layers.1.post_ffn_norm.weight",
        ];
        names.extend(optional.iter().filter(|n| p.layout().contains(n)));
        for name in names {
            let g = grads
                .get(name)
                .unwrap_or_else(|| panic!("{f}: no gradient for {name}"));
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let value = p.tensor(name).unwrap();
            let orig = value.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let set = |v: &[f64]| {
                p.set(
                    name,
                    &Tensor::from_slice(v, value.shape(), &Device::Cpu).unwrap(),
                )
                .unwrap()
            };
            let e = kiln_testutil::finite_difference_error(&orig, &g, &set, &loss, &[0, 5, 31, 77]);
            assert!(e < 1e-5, "{f}: {name}: relative error {e}");
        }
    }
}

#[test]
fn lora_unmerged_equals_merged_on_every_family() {
    for f in FAMILIES {
        let (cfg, params, r) = load(f);
        let spec = LoraSpec::all_projections(4, 8.0);
        let adapters = Params::lora_adapters(&cfg, &spec, 3, &Device::Cpu, DType::F32).unwrap();
        // Non-zero B so the adapter changes the output.
        for name in adapters.adapter_names() {
            if name.contains("lora_B") {
                let t = adapters.tensor(&name).unwrap();
                let v = kiln_testutil::uniform_tensor(9, t.dims(), DType::F32).unwrap();
                adapters.set(&name, &(v * 0.1).unwrap()).unwrap();
            }
        }
        let mut model = Llama::new(&cfg, &params).unwrap();
        model.attach_lora(&adapters, &spec).unwrap();
        let x = Tensor::from_slice(&r.prompt_ids, (1, 20), &Device::Cpu).unwrap();
        let unmerged = rows_of(&model.forward_train(&x, None).unwrap());
        let merged = rows_of(&model.merge_lora().unwrap().forward_train(&x, None).unwrap());
        let base = rows_of(
            &Llama::new(&cfg, &params)
                .unwrap()
                .forward_train(&x, None)
                .unwrap(),
        );
        let worst = max_diff(&unmerged[19], &merged[19]);
        assert!(worst < 1e-4, "{f}: unmerged vs merged {worst}");
        assert!(
            max_diff(&unmerged[19], &base[19]) > 1e-2,
            "{f}: the adapter did nothing"
        );
        // The decode fast path carries the adapters too.
        let (ids, _) = greedy(&model, &r.prompt_ids, 1);
        assert_eq!(
            ids[0],
            argmax(&unmerged[19]),
            "{f}: adapter in the decode path"
        );
    }
}

/// A family's fixture, or `phi3-longrope`: the Phi-3 fixture with LongRoPE scaling (short and
/// long factors, an original context of 8 so the 20-token prompt crosses it) for round trips.
fn load_variant(name: &str) -> (ModelConfig, Params, Reference) {
    if name != "phi3-longrope" {
        return load(name);
    }
    let (cfg, params, r) = load("phi3");
    let cfg = ModelConfig {
        rope_scaling: Some(kiln_model::RopeScaling::Longrope {
            short_factor: vec![1.0, 1.5, 2.0, 3.0],
            long_factor: vec![1.2, 2.5, 4.0, 9.0],
            original_max_position_embeddings: 8,
            attention_factor: 1.19,
        }),
        ..cfg
    };
    (cfg, params, r)
}

#[test]
fn hf_export_reads_back_to_the_same_model() {
    for f in FAMILIES.iter().copied().chain(["phi3-longrope"]) {
        let (cfg, params, r) = load_variant(f);
        let out = tempfile::tempdir().unwrap();
        save_hf_weights(out.path(), &cfg, &params, DType::F32, Some(1), Some(2)).unwrap();
        let (cfg2, params2) = load_hf_dir(out.path(), &Device::Cpu).unwrap();
        assert_eq!(cfg2, cfg, "{f}: config round trip");
        let a = prompt_logits(&cfg, &params, &r.prompt_ids);
        let b = prompt_logits(&cfg2, &params2, &r.prompt_ids);
        assert!(
            max_diff(&a[19], &b[19]) < 1e-5,
            "{f}: export changed the logits"
        );
    }
}

#[test]
fn unknown_architectures_are_named_with_what_is_supported() {
    let tmp = tempfile::tempdir().unwrap();
    // Only a config: the architecture is checked before weights or tokenizer are looked for.
    let config = std::fs::read_to_string(dir("qwen2").join("config.json"))
        .unwrap()
        .replace("Qwen2ForCausalLM", "Qwen3MoeForCausalLM");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let err = HfConfig::load(tmp.path())
        .unwrap()
        .to_model_config(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("Qwen3MoeForCausalLM"), "{err}");
    assert!(err.contains("mixture-of-experts"), "{err}");
    assert!(
        err.contains("Gemma3ForCausalLM") && err.contains("Qwen2ForCausalLM"),
        "{err}"
    );
}

#[test]
fn gguf_export_reads_back_to_the_same_logits() {
    use kiln_model::gguf::{self, GgufExportTypes, GgufFile};
    for f in [
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "mistral",
        "phi3",
        "phi3-longrope",
        "smollm3",
    ] {
        let (cfg, params, r) = load_variant(f);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.gguf");
        let md = gguf::model_metadata(&cfg, f).unwrap();
        let types = GgufExportTypes::uniform(GgmlDType::F32);
        gguf::write_gguf(&path, &cfg, &params, &md, types).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let cfg2 = g.config().unwrap();
        assert_eq!(Family::of(&cfg2), Family::of(&cfg), "{f}: family");
        let params2 = g.load_params(&cfg2, &Device::Cpu).unwrap();
        let a = prompt_logits(&cfg, &params, &r.prompt_ids);
        let b = prompt_logits(&cfg2, &params2, &r.prompt_ids);
        let worst = max_diff(&a[19], &b[19]);
        assert!(
            worst < 1e-4,
            "{f}: GGUF round trip changed the logits by {worst}"
        );
        // The quantised model straight from the file decodes like its dense weights.
        let q = Llama::from_gguf(&g, &cfg2).unwrap();
        let (ids, _) = greedy(&q, &r.prompt_ids, 16);
        let (want, _) = greedy(&Llama::new(&cfg, &params).unwrap(), &r.prompt_ids, 16);
        assert_eq!(ids, want, "{f}: greedy from the GGUF");
    }
    let (cfg, _, _) = load("qwen3_yarn");
    let err = gguf::model_metadata(&cfg, "x").unwrap_err().to_string();
    assert!(err.contains("YaRN") && err.contains("--format hf"), "{err}");
    // llama.cpp's gemma2 fixes the attention scale by size and always soft-caps: a Gemma 2
    // that differs is refused rather than written as a different model.
    let (g2, _, _) = load("gemma2");
    for (what, cfg) in [
        (
            "query_pre_attn_scalar",
            ModelConfig {
                query_pre_attn_scalar: Some(24.0),
                ..g2.clone()
            },
        ),
        (
            "final_logit_softcapping",
            ModelConfig {
                final_logit_softcapping: None,
                ..g2.clone()
            },
        ),
    ] {
        let err = gguf::model_metadata(&cfg, "x").unwrap_err().to_string();
        assert!(err.contains(what) && err.contains("--format hf"), "{err}");
    }
}

#[test]
fn yarn_frequencies_and_attention_factor_are_transformers() {
    let d = dir("qwen3_yarn");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    let (cfg, _) = load_hf_dir(&d, &Device::Cpu).unwrap();
    let scaling = cfg.rope_scaling.clone().expect("yarn");
    let want: Vec<f64> = serde_json::from_value(r["rope_inv_freq"].clone()).unwrap();
    let half = cfg.rotary_dim() / 2;
    let mut inv: Vec<f64> = (0..half)
        .map(|i| {
            cfg.rope_theta
                .powf(-((2 * i) as f64) / cfg.rotary_dim() as f64)
        })
        .collect();
    scaling.apply(&mut inv, cfg.rope_theta);
    for (i, (a, b)) in inv.iter().zip(&want).enumerate() {
        // transformers computes in f32.
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "inv_freq[{i}]: kiln {a}, transformers {b}"
        );
    }
    let factor = r["rope_attention_scaling"].as_f64().unwrap();
    assert!((scaling.magnitude() - factor).abs() < 1e-12);
}

#[test]
fn config_mistakes_are_named() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("gemma3").join("config.json")).unwrap())
            .unwrap();
    let err_for = |edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = base.clone();
        edit(&mut c);
        std::fs::write(tmp.path().join("config.json"), c.to_string()).unwrap();
        HfConfig::load(tmp.path())
            .unwrap()
            .to_model_config(tmp.path())
            .unwrap_err()
            .to_string()
    };
    let e = err_for(&|c| c["hidden_activation"] = "relu".into());
    assert!(
        e.contains("\"relu\"") && e.contains("gelu_pytorch_tanh"),
        "{e}"
    );
    // Soft caps belong to Gemma; on another family they are a config kiln would misread.
    let tmp = tempfile::tempdir().unwrap();
    let mut qwen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("qwen2").join("config.json")).unwrap())
            .unwrap();
    qwen["attn_logit_softcapping"] = 50.0.into();
    std::fs::write(tmp.path().join("config.json"), qwen.to_string()).unwrap();
    let e = HfConfig::load(tmp.path())
        .unwrap()
        .to_model_config(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("attn_logit_softcapping") && e.contains("Gemma"),
        "{e}"
    );
    let e = err_for(&|c| {
        c["layer_types"].as_array_mut().unwrap().pop();
    });
    assert!(e.contains("layer_types has 5 entries for 6 layers"), "{e}");
    let e = err_for(&|c| c["layer_types"][1] = "full_attention".into());
    assert!(e.contains("one global layer every n layers"), "{e}");
    let e = err_for(&|c| c["rope_parameters"]["full_attention"]["rope_type"] = "dynamic".into());
    assert!(e.contains("\"dynamic\"") && e.contains("yarn"), "{e}");
}

#[test]
fn sentence_transformers_modules_kiln_cannot_run_are_named() {
    use kiln_model::sentence::SentenceEncoder;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir("gemma3").join(f), d.join(f)).unwrap();
    }
    let modules = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
        {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#;
    std::fs::write(d.join("modules.json"), modules).unwrap();
    std::fs::create_dir(d.join("1_Pooling")).unwrap();
    let pooling = |cls: bool| {
        format!(
            r#"{{"pooling_mode_mean_tokens": {}, "pooling_mode_cls_token": {cls}}}"#,
            !cls
        )
    };
    std::fs::write(d.join("1_Pooling/config.json"), pooling(true)).unwrap();
    let e = SentenceEncoder::load(d).err().unwrap().to_string();
    assert!(
        e.contains("1_Pooling") && e.contains("mean over tokens"),
        "{e}"
    );
    // Mean pooling loads, and embeds to the trunk's width.
    std::fs::write(d.join("1_Pooling/config.json"), pooling(false)).unwrap();
    let enc = SentenceEncoder::load(d).unwrap();
    assert_eq!(enc.embed(&[1, 5, 9]).unwrap().len(), 64);
    // A dense layer with a bias is refused, naming its folder.
    let modules = modules.replace(
        "]",
        r#",{"idx":2,"name":"2","path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
    );
    std::fs::write(d.join("modules.json"), modules).unwrap();
    std::fs::create_dir(d.join("2_Dense")).unwrap();
    std::fs::write(
        d.join("2_Dense/config.json"),
        r#"{"in_features": 64, "out_features": 8, "bias": true}"#,
    )
    .unwrap();
    let e = SentenceEncoder::load(d).err().unwrap().to_string();
    assert!(e.contains("2_Dense") && e.contains("bias = true"), "{e}");
}
