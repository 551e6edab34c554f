//! The preference-tuning verbs end to end on the tiny HF model: `reward train` then
//! `reward score --json` and `export --format hf` of the reward model, `dpo` with LoRA and
//! resume, `grpo` and `ppo` (against the reward model, a built-in reward and a reward
//! program), and the flags' errors.

mod common;

use std::path::{Path, PathBuf};

use common::{kiln, text};

fn hf_tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_tiny/model")
}

fn ok(o: &std::process::Output) -> (String, String) {
    let (out, err) = text(o);
    assert!(o.status.success(), "kiln failed:\n{err}");
    (out, err)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn data(dir: &Path) -> (PathBuf, PathBuf) {
    let prefs: String = (0..24)
        .map(|i| {
            serde_json::json!({
                "conversations": [{"from": "human", "value": format!("Question {i}?")}],
                "chosen": {"from": "gpt", "value": "yes indeed"},
                "rejected": {"from": "gpt", "value": "no way"},
            })
            .to_string()
                + "\n"
        })
        .collect();
    let prompts: String = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Say something {i}")}).to_string() + "\n")
        .collect();
    let (a, b) = (dir.join("prefs.jsonl"), dir.join("prompts.jsonl"));
    std::fs::write(&a, prefs).unwrap();
    std::fs::write(&b, prompts).unwrap();
    (a, b)
}

#[test]
fn reward_dpo_grpo_and_ppo_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (prefs, prompts) = data(d);
    let rm = d.join("rm");
    ok(&kiln(
        &[
            "reward",
            "train",
            "--model",
            s(&hf_tiny()),
            "--data",
            s(&prefs),
            "--out",
            s(&rm),
            "--set",
            "train.steps=12",
            "--set",
            "optim.lr=3e-3",
            "--set",
            "train.batch_size=4",
        ],
        d,
    ));
    for f in [
        "metrics.jsonl",
        "loss.png",
        "accuracy.png",
        "config.toml",
        "tokenizer.json",
    ] {
        assert!(rm.join(f).is_file(), "{f}");
    }
    let score = |resp: &str| -> f64 {
        let (out, _) = ok(&kiln(
            &[
                "reward",
                "score",
                "--model",
                s(&rm),
                "--prompt",
                "Question 30?",
                "--response",
                resp,
                "--json",
            ],
            d,
        ));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["score"].as_f64().unwrap()
    };
    assert!(score("yes indeed") > score("no way"));
    let hf = d.join("rm-hf");
    ok(&kiln(
        &[
            "export",
            "--model",
            s(&rm),
            "--format",
            "hf",
            "--out",
            s(&hf),
        ],
        d,
    ));
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    assert!(cfg.contains("LlamaForSequenceClassification"), "{cfg}");

    // DPO with LoRA, stopped after 2 steps and resumed to 4.
    let dpo = d.join("dpo");
    let tiny = hf_tiny();
    let dpo_args = |steps: &str, resume: bool| {
        let mut a = vec![
            "dpo",
            "--model",
            s(&tiny),
            "--data",
            s(&prefs),
            "--out",
            s(&dpo),
            "--lora-rank",
            "4",
            "--beta",
            "0.2",
            "--loss",
            "sigmoid",
            "--set",
        ];
        a.push(steps);
        if resume {
            a.push("--resume");
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        kiln(&refs, d)
    };
    ok(&run(dpo_args("train.steps=2", false)));
    let (_, err) = ok(&run(dpo_args("train.steps=4", true)));
    assert!(err.contains("resumed from"), "{err}");
    assert!(dpo.join("adapter/adapter_config.json").is_file());
    let rows = std::fs::read_to_string(dpo.join("metrics.jsonl")).unwrap();
    assert!(rows.lines().any(|l| l.contains("\"step\":4")), "{rows}");

    // Pairs longer than train.seq_len are cut (prompt start first, EOS kept last), not
    // dropped: a window of 8 tokens still trains on every pair.
    let (_, err) = ok(&kiln(
        &[
            "reward",
            "train",
            "--model",
            s(&hf_tiny()),
            "--data",
            s(&prefs),
            "--out",
            s(&d.join("rm-short")),
            "--set",
            "train.steps=1",
            "--set",
            "train.seq_len=8",
        ],
        d,
    ));
    assert!(
        err.contains("sequences cut to train.seq_len") && !err.contains(" 0 sequences cut"),
        "{err}"
    );

    // GRPO with a reward program, PPO against the reward model.
    let (_, err) = ok(&kiln(
        &[
            "grpo",
            "--model",
            s(&hf_tiny()),
            "--prompts",
            s(&prompts),
            "--reward-cmd",
            "while read l; do echo 1; done",
            "--group-size",
            "2",
            "--max-new-tokens",
            "3",
            "--out",
            s(&d.join("grpo")),
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=2",
        ],
        d,
    ));
    assert!(err.contains("reward 1.0000"), "{err}");
    // A constant reward cannot teach GRPO anything: said, and counted in the metrics.
    let (_, err) = ok(&kiln(
        &[
            "grpo",
            "--model",
            s(&hf_tiny()),
            "--prompts",
            s(&prompts),
            "--reward-cmd",
            "while read l; do echo 1; done",
            "--group-size",
            "2",
            "--max-new-tokens",
            "2",
            "--out",
            s(&d.join("grpo-flat")),
            "--set",
            "train.steps=1",
            "--set",
            "train.batch_size=2",
            "--set",
            "grpo.penalize_missing_eos=false",
        ],
        d,
    ));
    assert!(
        err.contains("cannot learn") && err.contains("every group's scores are equal"),
        "{err}"
    );
    let rows = std::fs::read_to_string(d.join("grpo-flat/metrics.jsonl")).unwrap();
    assert!(rows.contains("\"zero_variance_groups\":1"), "{rows}");
    ok(&kiln(
        &[
            "ppo",
            "--model",
            s(&hf_tiny()),
            "--prompts",
            s(&prompts),
            "--reward",
            s(&rm),
            "--max-new-tokens",
            "3",
            "--out",
            s(&d.join("ppo")),
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=2",
            "--lora-rank",
            "4",
        ],
        d,
    ));
    for f in [
        "reward.png",
        "kl.png",
        "entropy.png",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(d.join("ppo").join(f).is_file(), "{f}");
    }

    // Errors: two rewards, none, an unknown loss, an unknown reward function.
    for (args, want) in [
        (
            vec![
                "grpo",
                "--model",
                s(&hf_tiny()),
                "--prompts",
                s(&prompts),
                "--reward-fn",
                "json-valid",
                "--reward",
                s(&rm),
            ],
            "cannot be used with",
        ),
        (
            vec!["ppo", "--model", s(&hf_tiny()), "--prompts", s(&prompts)],
            "give one reward",
        ),
        (
            vec![
                "dpo",
                "--model",
                s(&hf_tiny()),
                "--data",
                s(&prefs),
                "--loss",
                "kto",
            ],
            "sigmoid, ipo or hinge",
        ),
        (
            vec![
                "grpo",
                "--model",
                s(&hf_tiny()),
                "--prompts",
                s(&prompts),
                "--reward-fn",
                "len:3",
                "--max-new-tokens",
                "3",
            ],
            "contains:WORD",
        ),
        (
            vec![
                "reward",
                "score",
                "--model",
                s(&hf_tiny()),
                "--prompt",
                "a",
                "--response",
                "b",
            ],
            "not a kiln reward model",
        ),
    ] {
        let o = kiln(&args, d);
        let (_, err) = text(&o);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}

/// Started by a launcher as one of several ranks, a command that runs in one process refuses
/// to start, naming itself (it would run the whole job once per rank); the launcher's
/// environment is what `kiln` reads, so setting it here is what `mpirun -np 2` does.
#[test]
fn single_process_commands_refuse_to_run_as_one_of_several_ranks() {
    let dir = tempfile::tempdir().unwrap();
    for (args, name) in [
        (vec!["dpo", "--model", "m", "--data", "d.json"], "kiln dpo"),
        (
            vec!["reward", "train", "--model", "m", "--data", "d.json"],
            "kiln reward",
        ),
        (
            vec![
                "grpo",
                "--model",
                "m",
                "--prompts",
                "p.json",
                "--reward-fn",
                "len",
            ],
            "kiln grpo",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .env("OMPI_COMM_WORLD_RANK", "0")
            .current_dir(dir.path())
            .output()
            .unwrap();
        let (_, err) = text(&out);
        assert!(!out.status.success(), "{args:?} ran: {err}");
        assert!(
            err.contains(name) && err.contains("runs in one process") && err.contains("kiln sft"),
            "{args:?}: {err}"
        );
    }
    // Alone (a launcher of one rank counts as alone), the same command gets to its own checks.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["dpo", "--model", "m", "--data", "d.json"])
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert!(
        !out.status.success() && !err.contains("runs in one process"),
        "{err}"
    );
}
