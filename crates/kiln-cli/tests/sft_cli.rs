//! `kiln sft` end to end on the tiny HF model (tests/fixtures/hf_tiny): a LoRA run writes a
//! PEFT adapter; `generate --adapter` applies it unmerged; `lora merge` writes HF and GGUF
//! (f16, q8_0) models whose logits equal the unmerged model's within each format's precision
//! (merged GGUFs are where fine-tunes silently vanish in other tools); full fine-tuning writes
//! a run that `generate` loads with the template it trained with; bad input fails cleanly.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{kiln, text};
use kiln_model::{CausalLm, Llama};

fn hf_tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_tiny/model")
}

fn toy_data(dir: &Path) -> PathBuf {
    let rows = [
        ("color of sky", "blue"),
        ("color of grass", "green"),
        ("sound of cat", "meow"),
        ("sound of dog", "woof"),
    ];
    let text: String = rows
        .iter()
        .map(|(q, a)| format!("{{\"instruction\": \"{q}\", \"output\": \"{a}\"}}\n"))
        .collect();
    let p = dir.join("toy.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn ok(o: &std::process::Output) -> (String, String) {
    let (out, err) = text(o);
    assert!(o.status.success(), "kiln failed:\n{err}");
    (out, err)
}

/// Last-position logits of `ids` under `model`.
fn logits(model: &dyn CausalLm, ids: &[u32]) -> Tensor {
    let mut cache = kiln_model::KvCache::new();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward_decode(&x, &mut cache)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn lora_sft_adapter_generate_and_merged_exports() {
    let dir = tempfile::tempdir().unwrap();
    let data = toy_data(dir.path());
    let run = dir.path().join("run");
    let (_, err) = ok(&kiln(
        &[
            "sft",
            "--model",
            hf_tiny().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--lora-rank",
            "4",
            "--lora-targets",
            "q,v,down",
            "--set",
            "train.steps=30",
            "--set",
            "optim.lr=1e-2",
            "--set",
            "train.seq_len=32",
            "--set",
            "sft.val_fraction=0.25",
            "--set",
            "train.peak_flops=1e11",
        ],
        dir.path(),
    ));
    assert!(err.contains("parameters train"), "{err}");
    assert!(err.contains("held_out_loss_after"), "{err}");
    let adapter = run.join("adapter");
    let cfg_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg_json["r"], 4);
    assert!(run
        .join("checkpoints/step-00000030/adapter/adapter_model.safetensors")
        .is_file());

    // The run itself is adapters, not a model: loading it says how to.
    let o = kiln(
        &[
            "generate",
            "--model",
            run.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--adapter"), "{err}");

    // The base with the adapter applied unmerged (the reference below).
    let w = kiln_load::load_weights(&hf_tiny(), &Device::Cpu).unwrap();
    let a = kiln_load::load_adapter(&adapter, &w.config, &Device::Cpu).unwrap();
    let mut unmerged = Llama::new(&w.config, &w.params).unwrap();
    let base = logits(&unmerged, &[5, 17, 42, 9, 77]);
    unmerged.attach_lora(&a.params, &a.spec).unwrap();
    let want = logits(&unmerged, &[5, 17, 42, 9, 77]);
    assert!(max_diff(&want, &base) > 1e-3, "the adapter changed nothing");

    // generate --adapter runs it (greedy, a few tokens).
    let (out, _) = ok(&kiln(
        &[
            "generate",
            "--model",
            hf_tiny().to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "color of sky",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        dir.path(),
    ));
    let _ = out;

    // The same adapter on another model with the same shapes (a copy of the base with its
    // final norm changed) is refused, naming --force; forced, it runs with a warning.
    let other = dir.path().join("other-base");
    std::fs::create_dir(&other).unwrap();
    for e in std::fs::read_dir(hf_tiny()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(other.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shard = other.join(index["weight_map"]["model.norm.weight"].as_str().unwrap());
    let mut tensors = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    let norm = tensors["model.norm.weight"].affine(1.5, 0.0).unwrap();
    tensors.insert("model.norm.weight".into(), norm);
    candle_core::safetensors::save(&tensors, &shard).unwrap();
    let on_other = |verb: &[&str], extra: &[&str]| {
        let mut args = verb.to_vec();
        args.extend([
            "--model",
            other.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ]);
        args.extend_from_slice(extra);
        kiln(&args, dir.path())
    };
    let short = ["--prompt", "hi", "--max-new-tokens", "2"];
    let merged_other = dir.path().join("merged-other");
    let merge_out = ["--out", merged_other.to_str().unwrap()];
    for (verb, extra) in [
        (&["generate"][..], &short[..]),
        (&["lora", "merge"][..], &merge_out[..]),
    ] {
        let o = on_other(verb, extra);
        let (_, err) = text(&o);
        assert!(
            !o.status.success()
                && err.contains("different model with the same shapes")
                && err.contains("pass --force"),
            "{verb:?}: {err}"
        );
        let forced: Vec<&str> = extra.iter().copied().chain(["--force"]).collect();
        let (_, err) = ok(&on_other(verb, &forced));
        assert!(err.contains("applied anyway (--force)"), "{verb:?}: {err}");
    }

    // lora merge: HF f32, GGUF f16 and q8_0, each against the unmerged model. A quantised
    // format's tolerance is what that quantisation costs the merged weights themselves (the
    // merged f32 weights quantised in memory, twice that), so the check is as tight as the
    // format allows while a lost or misplaced fine-tune still fails.
    let merged = kiln_load::load_weights(&hf_tiny(), &Device::Cpu).unwrap();
    kiln_load::merge_adapter(&merged.params, &a).unwrap();
    let in_memory = |ty: GgmlDType| {
        let m = Llama::from_params(&merged.config, &merged.params, ty).unwrap();
        logits(&m, &[5, 17, 42, 9, 77])
    };
    for (format, ty, name, qtype) in [
        ("hf", "f32", "merged-hf", GgmlDType::F32),
        ("gguf", "f16", "merged-f16.gguf", GgmlDType::F16),
        ("gguf", "q8_0", "merged-q8.gguf", GgmlDType::Q8_0),
    ] {
        let out = dir.path().join(name);
        ok(&kiln(
            &[
                "lora",
                "merge",
                "--model",
                hf_tiny().to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--format",
                format,
                "--type",
                ty,
            ],
            dir.path(),
        ));
        let m = kiln_load::load_model(&out, kiln_load::Weights::Native, &Device::Cpu).unwrap();
        let got = logits(m.model.as_ref(), &[5, 17, 42, 9, 77]);
        let d = max_diff(&got, &want);
        let cost = max_diff(&in_memory(qtype), &want);
        assert!(
            d <= 2.0 * cost + 1e-4,
            "{format} {ty}: max |merged - unmerged| = {d}; quantising the merged weights costs {cost}"
        );
        // Far closer to the fine-tuned model than the base is: the fine-tune did not vanish.
        assert!(
            d < max_diff(&base, &want) / 2.0,
            "{format} {ty}: merged is no closer than the base"
        );
    }
}

#[test]
fn full_fine_tuning_writes_a_run_that_generate_loads_with_its_template() {
    let dir = tempfile::tempdir().unwrap();
    let data = toy_data(dir.path());
    let run = dir.path().join("full");
    ok(&kiln(
        &[
            "sft",
            "--model",
            hf_tiny().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--set",
            "train.steps=4",
            "--set",
            "train.seq_len=32",
            "--set",
            "train.peak_flops=1e11",
        ],
        dir.path(),
    ));
    assert!(run.join("chat_template.jinja").is_file());
    let tok = kiln_load::load_tokenizer(&run).unwrap();
    assert_eq!(
        tok.chat_template.as_deref(),
        Some(
            std::fs::read_to_string(hf_tiny().join("chat_template.jinja"))
                .unwrap()
                .as_str()
        )
    );
    ok(&kiln(
        &[
            "generate",
            "--model",
            run.to_str().unwrap(),
            "--prompt",
            "sound of",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
        ],
        dir.path(),
    ));
}

#[test]
fn sft_input_errors_are_clear_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"instruction": "a", "output": "b"}, {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}]"#).unwrap();
    let run = dir.path().join("run");
    let o = kiln(
        &[
            "sft",
            "--model",
            hf_tiny().to_str().unwrap(),
            "--data",
            bad.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.json: record 2") && err.contains("\"bot\""),
        "{err}"
    );
    assert!(!run.exists(), "a failed start wrote {}", run.display());
    // --base-quantized needs a GGUF base; a missing --template file is named.
    let good = toy_data(dir.path());
    for (extra, want) in [
        (
            vec!["--lora-rank", "4", "--base-quantized"],
            "not a GGUF file",
        ),
        (
            vec!["--template", "/nonexistent/chat.jinja"],
            "/nonexistent/chat.jinja",
        ),
    ] {
        let model = hf_tiny().to_str().unwrap().to_string();
        let mut args = vec![
            "sft",
            "--model",
            &model,
            "--data",
            good.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = kiln(&args, dir.path());
        let (_, err) = text(&o);
        assert!(!o.status.success() && err.contains(want), "{err}");
        assert!(!run.exists(), "a failed start wrote {}", run.display());
    }
    // An adapter for another base.
    let o = kiln(
        &[
            "generate",
            "--model",
            kiln_testutil::smollm2_gguf().to_str().unwrap(),
            "--adapter",
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/peft/adapter_all")
                .to_str()
                .unwrap(),
            "--prompt",
            "hi",
        ],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("shape"),
        "{err}"
    );
}

/// `train.activation_checkpointing = true` recomputes each block in the backward: the run's
/// losses and gradient norms equal the run without it (LoRA dropout on, so the recomputed
/// forward must draw the same masks).
#[test]
fn activation_checkpointing_gives_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = toy_data(dir.path());
    let rows = |checkpointing: bool| -> Vec<(f64, f64)> {
        let run = dir.path().join(format!("run-{checkpointing}"));
        ok(&kiln(
            &[
                "sft",
                "--model",
                hf_tiny().to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                run.to_str().unwrap(),
                "--lora-rank",
                "4",
                "--lora-dropout",
                "0.1",
                "--set",
                "train.steps=6",
                "--set",
                "train.log_every=1",
                "--set",
                "train.seq_len=32",
                "--set",
                "sft.val_fraction=0",
                "--set",
                "train.peak_flops=1e11",
                "--set",
                &format!("train.activation_checkpointing={checkpointing}"),
            ],
            dir.path(),
        ));
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r.get("grad_norm").is_some())
            .map(|r| {
                (
                    r["loss"].as_f64().unwrap(),
                    r["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (plain, ckpt) = (rows(false), rows(true));
    assert_eq!(plain.len(), 6);
    for (step, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
        assert!(
            (a.0 - b.0).abs() <= 1e-6 * a.0.abs() && (a.1 - b.1).abs() <= 1e-6 * a.1.abs(),
            "step {}: (loss, grad_norm) {a:?} without checkpointing, {b:?} with",
            step + 1
        );
    }
}
