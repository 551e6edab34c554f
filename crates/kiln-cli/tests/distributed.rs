//! Distributed pretraining end to end: `mpirun -np 2 kiln pretrain` with each strategy gives
//! the loss curve and the weights of one process training on the same global batch; a 2-rank
//! checkpoint resumes on one process; FSDP's memory per rank; a killed or stalled rank ends the
//! run with an error naming it. Needs OpenMPI (scripts/install-mpi.sh).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::text;

/// `kiln --threads 1 ARGS` in `cwd`: one process with the thread count of one rank.
fn kiln(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--threads", "1"])
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn write_config(dir: &Path, n_layers: usize) -> PathBuf {
    let cfg = format!(
        r#"
[model]
preset = "tiny"
vocab_size = 512
max_seq_len = 64
n_layers = {n_layers}
[data]
dataset = "data"
sources = ["{}"]
val_fraction = 0.1
[optim]
lr = 3e-3
warmup_steps = 3
[train]
steps = 12
batch_size = 4
grad_accum = 2
seq_len = 64
log_every = 1
eval_every = 6
eval_batches = 2
checkpoint_every = 6
peak_flops = 1e9
run_dir = "run"
"#,
        kiln_testutil::tempest_corpus().display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn mpirun(np: usize, args: &[&str], cwd: &Path) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(["--threads", "1"])
        .args(args)
        .current_dir(cwd)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run_mpi(np: usize, args: &[&str], cwd: &Path) -> Output {
    mpirun(np, args, cwd)
        .output()
        .expect("mpirun (scripts/install-mpi.sh)")
}

/// `(step, loss)` pairs.
type Curve = Vec<(u64, f64)>;

/// `(step, loss)` of every train row and `(step, val_loss)` of every eval row.
fn curve(run: &Path) -> (Curve, Curve) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("val_loss").and_then(|l| l.as_f64()) {
            eval.push((step, l));
        }
    }
    (train, eval)
}

fn assert_same_curve(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb, "{what}");
        assert!((la - lb).abs() < 1e-5, "{what} step {sa}: {la} vs {lb}");
    }
}

fn weights(checkpoint: &Path) -> kiln_model::Params {
    let cfg_text = std::fs::read_to_string(checkpoint.join("config.toml")).unwrap();
    let cfg = kiln_train::RunConfig::from_toml_str(&cfg_text, &[]).unwrap();
    let file = if checkpoint.join("model.safetensors").exists() {
        checkpoint.join("model.safetensors")
    } else {
        checkpoint.join("shards.json")
    };
    kiln_model::Params::load(&file, &cfg.model, &candle_core::Device::Cpu).unwrap()
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_weight_diff(a: &kiln_model::Params, b: &kiln_model::Params) -> f32 {
    max_abs_diff(
        &a.flat().as_detached_tensor(),
        &b.flat().as_detached_tensor(),
    )
}

#[test]
fn two_ranks_match_one_process_for_every_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d, 2);
    let o = kiln(&["pretrain", "--config", "run.toml"], d);
    assert!(o.status.success(), "{}", text(&o).1);
    let (one_train, one_eval) = curve(&d.join("run"));
    assert_eq!(one_train.len(), 12);
    let one_final = weights(&d.join("run/checkpoints/step-00000012"));

    for strategy in ["ddp", "zero1", "fsdp"] {
        let run = format!("run-{strategy}");
        let o = run_mpi(
            2,
            &[
                "pretrain",
                "--config",
                "run.toml",
                "--set",
                &format!("train.run_dir={run}"),
                "--set",
                &format!("dist.strategy={strategy}"),
            ],
            d,
        );
        let (_, err) = text(&o);
        assert!(o.status.success(), "{strategy}: {err}");
        assert!(err.contains("rank 1 of 2"), "{strategy}: {err}");
        let (train, eval) = curve(&d.join(&run));
        assert_same_curve(&one_train, &train, strategy);
        assert_same_curve(&one_eval, &eval, strategy);
        let ckpt = d.join(&run).join("checkpoints/step-00000012");
        for f in [
            "shards.json",
            "model-00000-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "optimizer-00001-of-00002.safetensors",
        ] {
            assert!(ckpt.join(f).exists(), "{strategy}: no {f}");
        }
        // Each rank sealed (fsynced and digested) its own shards; rank 0 folded their digests
        // into state.json, which resume and --model verify, and removed the hand-over files.
        let state = std::fs::read_to_string(ckpt.join("state.json")).unwrap();
        assert!(
            state.contains("optimizer-00001-of-00002.safetensors"),
            "{state}"
        );
        for e in std::fs::read_dir(&ckpt).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "{strategy}: {name} left behind");
        }
        // Float tolerance: summation order differs, and AdamW's m / sqrt(v) magnifies tiny
        // gradient differences where v is small. One process at batch 8 x 1 against 4 x 2
        // (the same global batch) ends 3.9e-5 apart on this run.
        let diff = max_weight_diff(&one_final, &weights(&ckpt));
        assert!(diff < 2e-4, "{strategy}: final weights differ by {diff}");
        eprintln!("{strategy}: final weights within {diff:e} of one process's");
    }

    // bf16 compute parameters (f32 masters and reduction): the curve of the f32 run within
    // bf16's rounding (4.9e-4 measured), and visibly not equal to it.
    let o = run_mpi(
        2,
        &[
            "pretrain",
            "--config",
            "run.toml",
            "--set",
            "train.run_dir=run-fsdp-bf16",
            "--set",
            "dist.strategy=fsdp",
            "--set",
            "dist.param_dtype=bf16",
        ],
        d,
    );
    assert!(o.status.success(), "fsdp bf16: {}", text(&o).1);
    let (train, _) = curve(&d.join("run-fsdp-bf16"));
    assert_eq!(train.len(), one_train.len());
    let gaps: Vec<f64> = one_train
        .iter()
        .zip(&train)
        .map(|((_, a), (_, b))| (a - b).abs())
        .collect();
    let widest = gaps.iter().cloned().fold(0.0, f64::max);
    eprintln!("fsdp bf16: train losses within {widest:e} of one f32 process's");
    assert!(widest < 5e-3, "bf16 curve off by {widest}: {gaps:?}");
    assert!(widest > 1e-5, "bf16 rounding left no trace: {gaps:?}");
    let masters = weights(&d.join("run-fsdp-bf16/checkpoints/step-00000012"));
    let flat = masters.flat().as_detached_tensor();
    let regridded = flat
        .to_dtype(candle_core::DType::BF16)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let off_grid = max_abs_diff(&flat, &regridded);
    assert!(off_grid > 0.0, "the checkpoint keeps f32 master weights");

    // The 2-rank FSDP checkpoint of step 6 continues on one process along the same curve.
    let resumed = d.join("run-resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    let src = d.join("run-fsdp/checkpoints/step-00000006");
    let dst = resumed.join("checkpoints/step-00000006");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let o = kiln(
        &[
            "pretrain",
            "--config",
            "run.toml",
            "--set",
            "train.run_dir=run-resumed",
            "--resume",
        ],
        d,
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resumed from"), "{err}");
    let (train, _) = curve(&resumed);
    assert_same_curve(&one_train[6..], &train, "2 ranks -> 1 process");

    // A sharded run is a model like any other.
    let gen = |model: &str| {
        let o = kiln(
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
            ],
            d,
        );
        assert!(o.status.success(), "{}", text(&o).1);
        text(&o).0
    };
    assert_eq!(gen("run-fsdp"), gen("run"));
}

#[test]
fn fsdp_memory_per_rank_is_at_most_0_6x_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Parameters + gradients + AdamW state: shards (1/2 at N = 2) plus one unsharded copy of
    // the largest unit (embedding, head or block), for parameters and gradients. The bound
    // holds once no unit is more than a fifth of the model: 24 layers here (0.520x).
    write_config(d, 24);
    let o = run_mpi(
        2,
        &[
            "pretrain",
            "--config",
            "run.toml",
            "--set",
            "train.steps=1",
            "--set",
            "dist.strategy=fsdp",
        ],
        d,
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("fsdp: parameters + gradients + optimizer state per rank"))
        .unwrap_or_else(|| panic!("no memory line: {err}"));
    let ratio: f64 = line
        .split(" = ")
        .nth(1)
        .and_then(|r| r.split('x').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no ratio in {line}"));
    eprintln!("{line}");
    assert!(ratio <= 0.6, "{line}");
    assert!(ratio > 0.5, "the shards alone are half: {line}");
}

/// Mistakes in `[dist]` end the run before it starts, saying what to change.
#[test]
fn dist_config_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d, 2);
    let fails = |o: Output, want: &str| {
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{want}: {err}");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
    };
    let args = |kv: &'static str| ["pretrain", "--config", "run.toml", "--set", kv];
    fails(
        kiln(&args("dist.param_dtype=bf16"), d),
        "dist.param_dtype = \"bf16\" applies to dist.strategy = \"fsdp\"",
    );
    fails(kiln(&args("dist.bucket=4"), d), "unknown field `bucket`");
    fails(
        kiln(&args("dist.timeout_s=0"), d),
        "dist.timeout_s must be a positive number",
    );
    fails(
        run_mpi(2, &args("train.batch_size=3"), d),
        "train.batch_size = 3 is the global batch and must split evenly over the 2 ranks",
    );
}

/// Starts a long 2-rank run, waits for its first steps, then does `act` to rank 1's process.
fn disrupt_rank_1(signal: &str, extra: &[&str]) -> (Output, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d, 2);
    let mut args = vec![
        "pretrain",
        "--config",
        "run.toml",
        "--set",
        "train.steps=1000000",
        // No checkpoints: a rank stopped while writing one is waited for dist.io_timeout_s
        // (docs/distributed.md), and this test is about the collectives' timeout.
        "--set",
        "train.checkpoint_every=0",
    ];
    args.extend_from_slice(extra);
    let child = mpirun(2, &args, d).spawn().unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(d.join("run/metrics.jsonl"))
        .map(|t| t.lines().count() < 3)
        .unwrap_or(true)
    {
        assert!(started.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rank1 = rank_pid(child.id(), 1).expect("rank 1's process");
    let t0 = Instant::now();
    let status = Command::new("kill")
        .args([signal, &rank1.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    (out, t0.elapsed())
}

/// The process of `rank` among mpirun's children (its OMPI_COMM_WORLD_RANK).
fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()? {
        let Ok(pid) = e.ok()?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let parent = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(mpirun) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_ends_the_run_naming_it() {
    let (out, took) = disrupt_rank_1("-KILL", &[]);
    let (o, e) = text(&out);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(
        format!("{o}{e}").contains("process rank 1"),
        "mpirun names the lost rank: {o}{e}"
    );
}

#[test]
fn a_stalled_rank_is_named_after_the_timeout() {
    let (out, took) = disrupt_rank_1("-STOP", &["--set", "dist.timeout_s=5"]);
    let (o, e) = text(&out);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(
        e.contains("did not complete within 5 s; rank 1 is not responding (dead or stalled)"),
        "{o}{e}"
    );
}

#[test]
fn sft_on_two_ranks_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qa = [
        ("color of sky", "blue"),
        ("color of grass", "green"),
        ("sound of cat", "meow"),
        ("sound of dog", "woof"),
        ("opposite of up", "down"),
        ("opposite of hot", "cold"),
        ("two plus two", "four"),
        ("capital of France", "Paris"),
        ("color of snow", "white"),
        ("sound of cow", "moo"),
        ("opposite of left", "right"),
        ("three plus one", "four"),
    ];
    let text_rows: String = qa
        .iter()
        .map(|(q, a)| format!("{{\"instruction\": \"{q}\", \"output\": \"{a}\"}}\n"))
        .collect();
    std::fs::write(d.join("toy.jsonl"), text_rows).unwrap();
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_tiny/model");
    let model = model.to_str().unwrap().to_string();
    // LoRA under ZeRO-1, full fine-tuning under DDP and FSDP, each against one process:
    // every micro-batch's rows are split between the ranks. Unpacked, the 9 training rows
    // make micro-batches of 4, 4 and 1 rows: in the last, rank 1 has none (under FSDP it runs
    // a row without targets, so that its gathers pair up with rank 0's).
    for (strategy, extra) in [
        ("zero1", vec!["--lora-rank", "4"]),
        ("ddp", vec![]),
        ("fsdp", vec![]),
    ] {
        let mut args: Vec<String> = [
            "sft",
            "--model",
            &model,
            "--data",
            "toy.jsonl",
            "--set",
            "train.steps=6",
            "--set",
            "optim.lr=1e-3",
            "--set",
            "train.seq_len=32",
            "--set",
            "sft.val_fraction=0.25",
            "--set",
            "train.peak_flops=1e11",
            "--set",
            "train.log_every=1",
            "--set",
            "train.eval_every=3",
            "--set",
            "train.batch_size=4",
            "--set",
            "sft.packing=false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let with = |out: &str, more: &[&str]| {
            let mut a = args.clone();
            a.extend(["--out".to_string(), out.to_string()]);
            a.extend(more.iter().map(|s| s.to_string()));
            a
        };
        let one = with(&format!("one-{strategy}"), &[]);
        let o = kiln(&one.iter().map(String::as_str).collect::<Vec<_>>(), d);
        assert!(o.status.success(), "{}", text(&o).1);
        let set = format!("dist.strategy={strategy}");
        let two = with(&format!("two-{strategy}"), &["--set", &set]);
        let o = run_mpi(2, &two.iter().map(String::as_str).collect::<Vec<_>>(), d);
        assert!(o.status.success(), "{strategy}: {}", text(&o).1);
        let (a_train, a_eval) = curve(&d.join(format!("one-{strategy}")));
        let (b_train, b_eval) = curve(&d.join(format!("two-{strategy}")));
        assert_eq!(a_train.len(), 6);
        assert_same_curve(&a_train, &b_train, strategy);
        assert_same_curve(&a_eval, &b_eval, strategy);
    }
}
