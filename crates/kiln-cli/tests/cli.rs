//! The `kiln` binary end to end on a tiny run: pretrain, resume, generate, eval, plot,
//! tokenizer/data verbs, and the errors users hit.

use std::path::{Path, PathBuf};

mod common;
use common::{kiln, text};

fn write_config(dir: &Path) -> PathBuf {
    let cfg = format!(
        r#"
[model]
preset = "tiny"
vocab_size = 512
max_seq_len = 64
[data]
dataset = "data"
sources = ["{}"]
val_fraction = 0.1
[optim]
lr = 3e-3
warmup_steps = 5
[train]
steps = 30
batch_size = 4
seq_len = 64
log_every = 10
eval_every = 15
eval_batches = 2
checkpoint_every = 15
run_dir = "run"
"#,
        kiln_testutil::tempest_corpus().display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

#[test]
fn pretrain_then_generate_eval_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d);
    let o = kiln(&["pretrain", "--config", "run.toml"], d);
    let (out, err) = text(&o);
    assert!(o.status.success(), "pretrain failed: {err}");
    assert!(out.is_empty(), "pretrain writes logs to stderr only: {out}");
    assert!(
        err.contains("non_embedding_params") && err.contains("flops_per_token"),
        "{err}"
    );
    for f in [
        "config.toml",
        "metrics.jsonl",
        "loss.png",
        "tokenizer.json",
        "checkpoints/step-00000030/state.json",
    ] {
        assert!(d.join("run").join(f).exists(), "missing run/{f}");
    }
    let metrics = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "tokens",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
    ] {
        assert!(first.get(key).is_some(), "metrics row lacks {key}: {first}");
    }
    assert!(metrics.contains("val_loss"));

    // Greedy generation is deterministic and stdout holds only the continuation.
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "run",
            "--prompt",
            "Enter PROSPERO",
            "--max-new-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        let o = kiln(&args, d);
        assert!(o.status.success(), "{}", text(&o).1);
        text(&o).0
    };
    let greedy = gen(&["--temperature", "0"]);
    // (after 30 steps the continuation may well be whitespace, but 12 tokens were generated;
    // stdout is exactly the continuation, with no newline added)
    assert!(!greedy.is_empty(), "{greedy:?}");
    assert!(
        !greedy.contains("Enter PROSPERO"),
        "stdout must not echo the prompt: {greedy}"
    );
    assert_eq!(greedy, gen(&["--temperature", "0"]));
    assert_eq!(
        greedy,
        gen(&["--temperature", "1.5", "--top-k", "1", "--seed", "7"]),
        "greedy == top-k 1"
    );
    let sampled = gen(&["--seed", "1"]);
    assert_eq!(sampled, gen(&["--seed", "1"]), "seeded sampling repeats");

    // A prompt longer than the context is a clear error, or truncated on request.
    let long = "word ".repeat(200);
    let o = kiln(&["generate", "--model", "run", "--prompt", &long], d);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("context window"), "{}", text(&o).1);
    let o = kiln(
        &[
            "generate",
            "--model",
            "run",
            "--prompt",
            &long,
            "--truncate-prompt",
            "--max-new-tokens",
            "3",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o).1);

    let o = kiln(
        &[
            "eval",
            "--model",
            "run",
            "--json",
            "--batch-size",
            "2",
            "--batches",
            "2",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_str(text(&o).0.trim()).unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - v["loss"].as_f64().unwrap().exp()).abs() < 1e-6);

    let o = kiln(&["plot", "run", "run", "--out", "both.png"], d);
    assert!(
        o.status.success() && d.join("both.png").exists(),
        "{}",
        text(&o).1
    );

    // Resuming a finished run is a no-op that keeps its metrics, and says so.
    let o = kiln(&["pretrain", "--config", "run.toml", "--resume"], d);
    let err = text(&o).1;
    assert!(
        o.status.success() && err.contains("nothing to train") && !err.contains("final_loss=\"\""),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap(),
        metrics
    );
}

/// Ctrl-C (SIGINT) saves a checkpoint and exits 130, so `kiln pretrain ... && next` stops;
/// `--resume` then finishes the run.
#[test]
fn an_interrupted_run_saves_and_exits_130() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d);
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--threads", "2", "pretrain", "--config", "run.toml"])
        .args(["--set", "train.steps=100000", "--set", "train.log_every=1"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(d.join("run/metrics.jsonl"))
        .map(|t| t.lines().count() < 2)
        .unwrap_or(true)
    {
        assert!(started.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let o = child.wait_with_output().unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("--resume"),
        "{err}"
    );
    let saved = std::fs::read_dir(d.join("run/checkpoints"))
        .unwrap()
        .count();
    assert!(saved >= 1, "a checkpoint is saved on Ctrl-C");
    // Starting again without --resume would mix two runs in one directory: refused.
    let short = ["--set", "train.steps=20"];
    let again = kiln(
        &[&["pretrain", "--config", "run.toml"][..], &short].concat(),
        d,
    );
    let (_, err) = text(&again);
    assert!(!again.status.success());
    assert!(
        err.contains("already holds a run") && err.contains("--overwrite"),
        "{err}"
    );
    let o = kiln(
        &[
            "pretrain",
            "--config",
            "run.toml",
            "--resume",
            "--set",
            "train.steps=20",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    // --overwrite starts over: the old rows are gone.
    let o = kiln(
        &[
            &["pretrain", "--config", "run.toml", "--overwrite"][..],
            &short,
        ]
        .concat(),
        d,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let metrics = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 20, "{metrics}");
    assert!(metrics.lines().count() <= 20, "no stale rows: {metrics}");
}

#[test]
fn tokenizer_and_data_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = kiln_testutil::tempest_corpus();
    let o = kiln(
        &[
            "tokenizer",
            "train",
            "--input",
            src.to_str().unwrap(),
            "--vocab-size",
            "300",
            "--out",
            "tok.json",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let o = kiln(
        &[
            "data",
            "prepare",
            "--input",
            src.to_str().unwrap(),
            "--tokenizer",
            "tok.json",
            "--out",
            "ds",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o).1);
    for f in ["train.bin", "val.bin", "meta.json", "tokenizer.json"] {
        assert!(d.join("ds").join(f).exists(), "missing ds/{f}");
    }
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n",
    )
    .unwrap();
    let o = kiln(
        &[
            "data",
            "prepare",
            "--input",
            "bad.jsonl",
            "--tokenizer",
            "tok.json",
            "--out",
            "ds2",
        ],
        d,
    );
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(
        err.contains("bad.jsonl") && err.contains('2') && err.contains("text"),
        "{err}"
    );
}

#[test]
fn config_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d);
    let o = kiln(
        &[
            "pretrain",
            "--config",
            "run.toml",
            "--set",
            "train.batch_sise=3",
        ],
        d,
    );
    assert!(!o.status.success());
    assert!(text(&o).1.contains("batch_sise"), "{}", text(&o).1);
    let o = kiln(&["pretrain", "--config", "missing.toml"], d);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("missing.toml"), "{}", text(&o).1);
    let o = kiln(&["generate", "--model", "nowhere"], d);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("nowhere"), "{}", text(&o).1);
    // Flag values kiln cannot use are named before any model is read.
    let fails_with = |args: &[&str], want: &[&str]| {
        let o = kiln(args, d);
        let err = text(&o).1;
        assert!(!o.status.success(), "{args:?}");
        assert!(want.iter().all(|w| err.contains(w)), "{args:?}: {err}");
    };
    let gen = ["generate", "--model", "nowhere", "--prompt", "x"];
    fails_with(
        &[&["--isa", "sse9"][..], &gen].concat(),
        &["unknown instruction set", "sse9"],
    );
    // A level this CPU lacks (every CPU lacks one of the x86 and ARM levels).
    let lacking = if cfg!(target_arch = "x86_64") {
        "neon"
    } else {
        "avx2"
    };
    fails_with(
        &[&["--isa", lacking][..], &gen].concat(),
        &["cannot run", lacking, "the best it runs is"],
    );
    fails_with(
        &[&gen[..], &["--quantize", "q9_9"]].concat(),
        &["--quantize", "q9_9", "q8_0"],
    );
    fails_with(
        &[&["--activations", "q4"][..], &gen].concat(),
        &["--activations", "q4", "f32", "q8"],
    );
}

/// `--device` names what is missing instead of falling back: a GPU on a build without CUDA,
/// a malformed index, an unknown device; `--device cpu` runs.
#[test]
fn a_device_the_build_lacks_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let info = |device: &str| {
        kiln(
            &["--device", device, "info", "--preset", "tiny"],
            dir.path(),
        )
    };
    let o = info("cpu");
    assert!(o.status.success(), "{}", text(&o).1);
    for (device, says) in [
        ("cuda:x", "the GPU index must be a number"),
        ("gpu", "use auto, cpu, cuda or cuda:N"),
    ] {
        let o = info(device);
        let err = text(&o).1;
        assert!(!o.status.success() && err.contains(says), "{device}: {err}");
    }
    if !cfg!(feature = "cuda") {
        let o = info("cuda:1");
        let err = text(&o).1;
        assert!(
            !o.status.success()
                && err.contains("--device cuda:1")
                && err.contains("built without CUDA")
                && err.contains("--features cuda"),
            "{err}"
        );
    }
}
