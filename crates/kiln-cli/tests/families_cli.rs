//! The `kiln` binary on the families beyond Llama: Qwen2.5-Coder-0.5B-Instruct chats with its
//! own ChatML template and gives transformers' greedy answer, Gemma 3 270M continues a prompt as
//! transformers does, EmbeddingGemma embeds sentences, and models kiln cannot run are named
//! before anything else is read (`scripts/fetch-test-assets.sh`, `fetch-embeddinggemma.sh`).

use std::process::Output;

mod common;
use common::kiln_in;
use kiln_testutil::{repo_root as root, test_asset};

fn run(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let o: Output = kiln_in(args, &root(), stdin);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn reference(model: &str) -> serde_json::Value {
    let p = root().join(format!("tests/fixtures/real_models/{model}_reference.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn qwen_chats_with_its_template_as_transformers_does() {
    let m = test_asset("qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let r = reference("qwen2.5-0.5b");
    let (ok, out, err) = run(
        &[
            "chat",
            "--model",
            m.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ],
        Some("Write a haiku about rust.\n"),
    );
    assert!(ok, "{err}");
    let want = r["chat"]["greedy_text"].as_str().unwrap();
    assert!(
        out.contains(want),
        "chat answered {out:?}, transformers {want:?}"
    );
}

#[test]
fn gemma3_continues_a_prompt_as_transformers_does() {
    let m = test_asset("gemma3-270m/gemma-3-270m-q4_k_m.gguf");
    let r = reference("gemma3-270m");
    let p = &r["prompts"][1];
    let (ok, out, err) = run(
        &[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            p["text"].as_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out, p["greedy_text"].as_str().unwrap());
}

#[test]
fn embed_gives_sentence_transformers_similarities() {
    let cfg = test_asset("embeddinggemma-300m/config.json");
    let dir = cfg.parent().unwrap().to_str().unwrap().to_string();
    let (ok, out, err) = run(
        &[
            "embed",
            "--model",
            &dir,
            "--json",
            "--text",
            "What is the capital of France?",
            "--text",
            "Paris is the capital of France.",
        ],
        None,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e: Vec<Vec<f64>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    assert_eq!(v["dim"], 768);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!((dot(&e[0], &e[0]) - 1.0).abs() < 1e-4, "normalised");
    // sentence-transformers: 0.894234 (tests/fixtures/embeddinggemma/reference.json).
    assert!(
        (dot(&e[0], &e[1]) - 0.894234).abs() < 1e-4,
        "{}",
        dot(&e[0], &e[1])
    );
    let (ok, _, err) = run(
        &[
            "embed",
            "--model",
            "tests/fixtures/arch_tiny/qwen2",
            "--text",
            "x",
        ],
        None,
    );
    assert!(
        !ok && err.contains("not a sentence-transformers directory"),
        "{err}"
    );
}

#[test]
fn models_kiln_cannot_run_are_named_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("moe");
    std::fs::create_dir(&dir).unwrap();
    let config = std::fs::read_to_string(root().join("tests/fixtures/arch_tiny/qwen2/config.json"))
        .unwrap()
        .replace("Qwen2ForCausalLM", "Qwen3MoeForCausalLM");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let d = dir.to_str().unwrap();
    let (ok, _, err) = run(&["generate", "--model", d, "--prompt", "hi"], None);
    assert!(!ok);
    assert!(
        err.contains("Qwen3MoeForCausalLM") && err.contains("mixture-of-experts"),
        "{err}"
    );
    assert!(
        err.contains("Qwen2ForCausalLM") && err.contains("Gemma3ForCausalLM"),
        "{err}"
    );

    // A supported architecture without its weights says so.
    let qwen = tmp.path().join("qwen");
    std::fs::create_dir(&qwen).unwrap();
    std::fs::copy(
        root().join("tests/fixtures/arch_tiny/qwen2/config.json"),
        qwen.join("config.json"),
    )
    .unwrap();
    let (ok, _, err) = run(
        &[
            "generate",
            "--model",
            qwen.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        None,
    );
    assert!(!ok && err.contains("without its weights"), "{err}");

    // An empty .gguf and one cut short: named as such, once.
    let empty = tmp.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let (ok, _, err) = run(
        &[
            "generate",
            "--model",
            empty.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        None,
    );
    assert!(!ok && err.contains("empty"), "{err}");
    let real = std::fs::read(test_asset("gemma3-270m/gemma-3-270m-q4_k_m.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &real[..3_000_000]).unwrap();
    let (ok, _, err) = run(
        &[
            "generate",
            "--model",
            cut.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        None,
    );
    assert!(!ok && err.contains("truncated"), "{err}");
    assert_eq!(err.matches("truncated").count(), 1, "said once: {err}");
}
