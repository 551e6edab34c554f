//! The MLM verbs end to end: `kiln tokenizer train --mlm`, `kiln pretrain` with
//! `objective = "mlm"`, `kiln fill-mask` (text and JSON), and the errors users hit.

use std::path::{Path, PathBuf};

mod common;
use common::{kiln, text};

fn write_config(dir: &Path, name: &str, objective: &str, attention: &str) -> PathBuf {
    let cfg = format!(
        r#"
[model]
preset = "tiny"
vocab_size = 512
max_seq_len = 64
attention = "{attention}"
[data]
dataset = "data-{name}"
sources = ["{src}"]
val_fraction = 0.1
[optim]
lr = 3e-3
warmup_steps = 5
[train]
objective = "{objective}"
steps = 20
batch_size = 4
seq_len = 64
log_every = 10
eval_every = 10
eval_batches = 2
checkpoint_every = 20
peak_flops = 1e11
run_dir = "run-{name}"
"#,
        src = kiln_testutil::tempest_corpus().display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    path
}

#[test]
fn tokenizer_train_mlm_adds_the_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let src = kiln_testutil::tempest_corpus();
    let out = kiln(
        &[
            "tokenizer",
            "train",
            "--input",
            src.to_str().unwrap(),
            "--vocab-size",
            "400",
            "--mlm",
            "--out",
            "tok.json",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let tok = kiln_data::KilnTokenizer::load(dir.path().join("tok.json")).unwrap();
    assert_eq!(tok.eos_id(), Some(0));
    for (i, t) in kiln_data::MLM_SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_id(t), Some(i as u32 + 1), "{t}");
    }
}

#[test]
fn mlm_pretrain_then_fill_mask() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "mlm", "mlm", "bidirectional");
    let out = kiln(&["pretrain", "--config", cfg.to_str().unwrap()], dir.path());
    let (_, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("val_accuracy"), "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("run-mlm/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"val_accuracy\""), "{metrics}");
    assert!(dir.path().join("run-mlm/accuracy.png").exists());

    // Text output: every mask, k candidates with probabilities, and the filled text.
    let out = kiln(
        &[
            "fill-mask",
            "--model",
            "run-mlm",
            "--text",
            "To be, or [MASK] to be: that is the [MASK].",
            "--top-k",
            "3",
        ],
        dir.path(),
    );
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        stdout.contains("[MASK] 1 of 2") && stdout.contains("[MASK] 2 of 2"),
        "{stdout}"
    );
    assert!(stdout.contains("filled: To be, or"), "{stdout}");

    let out = kiln(
        &[
            "fill-mask",
            "--model",
            "run-mlm",
            "--text",
            "What [MASK] is this?",
            "--json",
        ],
        dir.path(),
    );
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let cands = v["masks"][0]["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 5);
    let total: f64 = cands.iter().map(|c| c["prob"].as_f64().unwrap()).sum();
    assert!(total > 0.0 && total <= 1.0 + 1e-9, "{total}");

    // `kiln eval` scores an encoder on its masked tokens.
    let out = kiln(
        &[
            "eval",
            "--model",
            "run-mlm",
            "--batches",
            "2",
            "--batch-size",
            "2",
            "--json",
        ],
        dir.path(),
    );
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["objective"], "mlm");
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{v}");

    // A text without [MASK].
    let out = kiln(
        &["fill-mask", "--model", "run-mlm", "--text", "no mask here"],
        dir.path(),
    );
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(err.contains("has no [MASK]"), "{err}");

    // A causal model is refused by fill-mask; its dataset (no [MASK]) is refused for MLM.
    let clm = write_config(dir.path(), "clm", "clm", "causal");
    let out = kiln(&["pretrain", "--config", clm.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{:?}", text(&out));
    let out = kiln(
        &["fill-mask", "--model", "run-clm", "--text", "to [MASK]"],
        dir.path(),
    );
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(err.contains("causal decoder"), "{err}");

    let bad = write_config(dir.path(), "clm", "mlm", "bidirectional");
    let out = kiln(
        &[
            "pretrain",
            "--config",
            bad.to_str().unwrap(),
            "--set",
            "train.run_dir=\"run-bad\"",
        ],
        dir.path(),
    );
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("kiln tokenizer train --mlm") && err.contains("data.dataset"),
        "{err}"
    );
}
