//! Preference tuning end to end on the tiny HF fixture model: the objectives against PyTorch,
//! last-token pooling under both paddings, KL and clipping at the rollout policy, tiny
//! models learning a reward model, DPO, GRPO and PPO, exact resume, the reward-model export,
//! and bad input.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use kiln_model::{Llama, ScalarHead};
use kiln_rlhf::losses::{bradley_terry, dpo, DpoLoss};
use kiln_rlhf::seqs::{last_real_token, last_token_scores, Padding, Seq, SeqBatch};
use kiln_rlhf::{
    Method, OnlineSource, OnlineTrainer, PairSource, PairTrainer, Quiet, RewardModel, RewardSpec,
};
use kiln_testutil::{assert_close, repo_root, Tol};

fn hf_tiny() -> PathBuf {
    repo_root().join("tests/fixtures/hf_tiny/model")
}

fn fixture(name: &str) -> serde_json::Value {
    let p = repo_root()
        .join("crates/kiln-rlhf/tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}: {a:?} vs {b:?}"
        );
    }
}

#[test]
fn objectives_match_pytorch() {
    let f = fixture("losses.json");
    let bt = &f["bradley_terry"];
    let l = bradley_terry(
        &floats(&bt["chosen"]),
        &floats(&bt["rejected"]),
        &floats(&bt["margin"]),
        bt["center_coef"].as_f64().unwrap(),
    );
    close(&[l.loss], &[bt["loss"].as_f64().unwrap()], 1e-12, "BT loss");
    close(&l.d_chosen, &floats(&bt["d_chosen"]), 1e-12, "BT d_chosen");
    close(
        &l.d_rejected,
        &floats(&bt["d_rejected"]),
        1e-12,
        "BT d_rejected",
    );
    let d = &f["dpo"];
    let (pc, pr, rc, rr) = (
        floats(&d["policy_chosen"]),
        floats(&d["policy_rejected"]),
        floats(&d["ref_chosen"]),
        floats(&d["ref_rejected"]),
    );
    let cases = d["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let kind = DpoLoss::parse(c["loss_type"].as_str().unwrap()).unwrap();
        let beta = c["beta"].as_f64().unwrap();
        let l = dpo(
            kind,
            beta,
            c["label_smoothing"].as_f64().unwrap(),
            &pc,
            &pr,
            &rc,
            &rr,
        );
        let what = format!("{kind:?} beta {beta}");
        close(&[l.loss], &[c["loss"].as_f64().unwrap()], 1e-12, &what);
        close(&l.d_chosen, &floats(&c["d_chosen"]), 1e-12, &what);
        close(&l.d_rejected, &floats(&c["d_rejected"]), 1e-12, &what);
        let rewards: Vec<f64> = pc.iter().zip(&rc).map(|(p, q)| beta * (p - q)).collect();
        close(&rewards, &floats(&c["chosen_rewards"]), 1e-12, &what);
    }
}

fn tiny_model() -> (Llama, kiln_model::ModelConfig) {
    let w = kiln_load::load_weights(&hf_tiny(), &Device::Cpu).unwrap();
    (Llama::new(&w.config, &w.params).unwrap(), w.config)
}

#[test]
fn last_token_pooling_is_the_same_under_left_and_right_padding() {
    let (model, cfg) = tiny_model();
    let head = ScalarHead::init(cfg.dim, 7, &Device::Cpu).unwrap();
    let seqs = [
        Seq {
            ids: vec![5, 17, 40, 33, 2],
            prompt_len: 2,
        },
        Seq {
            ids: vec![9, 12, 80, 81, 82, 83, 84, 2],
            prompt_len: 3,
        },
        Seq {
            ids: vec![100, 2],
            prompt_len: 1,
        },
    ];
    let refs: Vec<&Seq> = seqs.iter().collect();
    let right = SeqBatch::new(&refs, Padding::Right, &Device::Cpu).unwrap();
    let left = SeqBatch::new(&refs, Padding::Left, &Device::Cpu).unwrap();
    assert_eq!(right.last, vec![4, 15, 17]);
    assert_eq!(left.last, vec![7, 15, 23]);
    let r = last_token_scores(&model, &head, &right).unwrap();
    let l = last_token_scores(&model, &head, &left).unwrap();
    let alone: Vec<f64> = refs
        .iter()
        .map(|s| {
            let b = SeqBatch::new(&[*s], Padding::Right, &Device::Cpu).unwrap();
            last_token_scores(&model, &head, &b).unwrap()[0]
        })
        .collect();
    close(&r, &alone, 1e-5, "right padding vs alone");
    close(&l, &alone, 1e-5, "left padding vs alone");
    assert_eq!(last_real_token(&[false, false, true, true]), Some(3));
    assert_eq!(last_real_token(&[true, true, false]), Some(1));
    // The completion log-probabilities do not depend on the padding either.
    let (lr, _) = kiln_rlhf::seqs::completion_logprobs(&model, &right, 1.0).unwrap();
    let (ll, _) = kiln_rlhf::seqs::completion_logprobs(&model, &left, 1.0).unwrap();
    close(&lr, &ll, 1e-5, "completion logprobs");
}

/// Writes lines to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// Prompts asking for a word; the tiny model answers with random tokens.
fn prompts(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"prompt": format!("Say a word {i}")}).to_string())
        .collect();
    write(dir, "prompts.jsonl", &lines)
}

fn online(
    method: Method,
    dir: &Path,
    run: &str,
    reward: RewardSpec,
    sets: &[&str],
    resume: bool,
) -> OnlineTrainer {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    OnlineTrainer::new(
        method,
        OnlineSource {
            model: hf_tiny(),
            prompts: vec![prompts(dir)],
            reward,
        },
        None,
        &sets,
        &dir.join(run),
        resume,
        &mut Quiet,
    )
    .unwrap()
}

#[test]
fn at_the_rollout_policy_kl_is_zero_and_nothing_clips() {
    let dir = tempfile::tempdir().unwrap();
    for (method, lora) in [
        (Method::Ppo, true),
        (Method::Ppo, false),
        (Method::Grpo, true),
    ] {
        let s = method.section();
        let mut sets = vec![
            "train.steps=1".to_string(),
            "train.batch_size=2".into(),
            format!("{s}.max_new_tokens=6"),
            format!("{s}.epochs=1"),
            format!("{s}.group_size=4"),
        ];
        if method == Method::Ppo {
            sets.pop();
        }
        if lora {
            sets.push("lora.rank=4".into());
        }
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let run = format!("{s}-{lora}");
        let mut t = online(
            method,
            dir.path(),
            &run,
            RewardSpec::Fn("contains:e".into()),
            &sets,
            false,
        );
        let m = t.train_step(&mut Quiet).unwrap();
        // The reference is the starting policy (its base under LoRA, whose adapter is zero).
        assert_eq!(m["kl"], 0.0, "{run}: {m:?}");
        assert_eq!(m["clip_fraction"], 0.0, "{run}: {m:?}");
        assert!(m["approx_kl"] < 1e-10, "{run}: {m:?}");
        if method == Method::Ppo {
            assert_eq!(m["value_clip_fraction"], 0.0, "{run}: {m:?}");
        }
        // The update moved the policy: the next rollout's KL is no longer zero.
        let m2 = t.train_step(&mut Quiet).unwrap();
        assert!(m2["kl"] != 0.0, "{run}: {m2:?}");
    }
}

#[test]
fn a_tiny_policy_learns_a_programmatic_reward_with_grpo_and_ppo() {
    let dir = tempfile::tempdir().unwrap();
    // "contains:e": about 1 token in 20 of the tiny vocabulary has an "e"; two tokens
    // contain one about 9% of the time at the start.
    for (method, extra) in [
        (
            Method::Grpo,
            vec![
                "grpo.group_size=8",
                "grpo.penalize_missing_eos=false",
                "grpo.kl_coef=0.2",
            ],
        ),
        (
            Method::Ppo,
            vec![
                "ppo.penalize_missing_eos=false",
                "train.batch_size=8",
                "optim.lr=1e-2",
            ],
        ),
    ] {
        let s = method.section();
        let mut sets = vec![
            "train.steps=40".to_string(),
            "train.batch_size=4".into(),
            "optim.lr=2e-2".into(),
            "lora.rank=8".into(),
            "optim.warmup_steps=0".into(),
            format!("{s}.max_new_tokens=2"),
        ];
        sets.extend(extra.iter().map(|x| x.to_string()));
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let mut t = online(
            method,
            dir.path(),
            s,
            RewardSpec::Fn("contains:e".into()),
            &sets,
            false,
        );
        let sum = t.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
        let log: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join(s).join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        assert_eq!(log.len(), 40, "{s}: a metrics row every step");
        let reward = |rows: &[serde_json::Value]| {
            rows.iter()
                .map(|r| r["reward"].as_f64().unwrap())
                .sum::<f64>()
                / rows.len() as f64
        };
        let (first, last) = (reward(&log[..1]), reward(&log[35..]));
        assert!(first < 0.3 && last > 0.7, "{s}: reward {first} -> {last}");
        let max_kl = log
            .iter()
            .map(|r| r["kl"].as_f64().unwrap())
            .fold(0.0, f64::max);
        eprintln!("{s}: reward {first} -> {last}, KL at most {max_kl}");
        assert!(max_kl < 10.0, "{s}: KL reached {max_kl}");
        assert!(sum.last["kl"] > 0.0);
        for png in ["reward.png", "kl.png", "entropy.png"] {
            assert!(dir.path().join(s).join(png).is_file(), "{png}");
        }
    }
}

#[test]
fn online_resume_replays_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "train.steps=4",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "grpo.group_size=2",
        "grpo.max_new_tokens=4",
        "grpo.epochs=2",
        "optim.lr=1e-3",
    ];
    let reward = || RewardSpec::Fn("contains:e".into());
    let mut straight = online(Method::Grpo, dir.path(), "a", reward(), &sets, false);
    straight.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    let mut first = online(Method::Grpo, dir.path(), "b", reward(), &sets, false);
    first.train_step(&mut Quiet).unwrap();
    first.train_step(&mut Quiet).unwrap();
    first.save_checkpoint().unwrap();
    drop(first);
    let mut second = online(Method::Grpo, dir.path(), "b", reward(), &sets, true);
    assert_eq!(second.step(), 2);
    second.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    for (n, t) in straight.learner.params.iter() {
        assert_close(
            n,
            &second.learner.params.tensor(n).unwrap(),
            t,
            Tol { rel: 0.0, abs: 0.0 },
        );
    }
}

/// Toy preferences: the chosen answer says "yes", the rejected one "no".
fn preferences(dir: &Path, n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Question {i}?"),
                "chosen": format!("yes the answer {}", i % 7),
                "rejected": format!("no the answer {}", i % 7),
            })
            .to_string()
        })
        .collect();
    write(dir, "prefs.jsonl", &lines)
}

fn pairs(method: Method, dir: &Path, run: &str, sets: &[&str]) -> PairTrainer {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    PairTrainer::new(
        method,
        PairSource {
            model: hf_tiny(),
            data: vec![preferences(dir, 40)],
            reference: None,
        },
        None,
        &sets,
        &dir.join(run),
        false,
        &mut Quiet,
    )
    .unwrap()
}

#[test]
fn a_reward_model_and_dpo_learn_toy_preferences() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "train.steps=25",
        "train.batch_size=4",
        "sft.val_fraction=0.25",
        "optim.lr=3e-3",
        "train.eval_every=0",
    ];
    let mut rm = pairs(Method::Rm, dir.path(), "rm", &common);
    assert_eq!((rm.train.len(), rm.val.len()), (32, 8));
    let held = std::fs::read_to_string(dir.path().join("rm/held_out.jsonl")).unwrap();
    assert_eq!(held.lines().count(), 8);
    kiln_rlhf::parse_preference(
        &serde_json::from_str(held.lines().next().unwrap()).unwrap(),
        "x",
    )
    .unwrap();
    let s = rm.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    assert!(
        s.after["accuracy"] == 1.0 && s.after["margin"] > s.before["margin"] + 1.0,
        "{:?} -> {:?}",
        s.before,
        s.after
    );
    // Loaded back as a reward model, it prefers "yes".
    let model = RewardModel::load(&dir.path().join("rm"), &Device::Cpu).unwrap();
    let yes = model.score_text("Question 3?", "yes the answer 3").unwrap();
    let no = model.score_text("Question 3?", "no the answer 3").unwrap();
    assert!(yes > no + 1.0, "{yes} vs {no}");

    for (loss, lora) in [("sigmoid", true), ("ipo", false), ("hinge", true)] {
        let mut sets = common.to_vec();
        let l = format!("dpo.loss={loss:?}");
        sets.push(&l);
        if lora {
            sets.push("lora.rank=4");
        }
        let mut t = pairs(Method::Dpo, dir.path(), &format!("dpo-{loss}"), &sets);
        let s = t.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
        // Before training the policy is the reference: every implicit reward is 0.
        assert!(s.before["margin"].abs() < 1e-9, "{loss}: {:?}", s.before);
        assert!(
            s.after["accuracy"] == 1.0 && s.after["margin"] > 0.05,
            "{loss}: {:?}",
            s.after
        );
    }
}

#[test]
fn the_reward_model_export_scores_like_transformers() {
    // A fixed reward model: the tiny base and a seeded head trained for 3 deterministic steps.
    let dir = tempfile::tempdir().unwrap();
    let mut rm = pairs(
        Method::Rm,
        dir.path(),
        "rm",
        &["train.steps=3", "train.batch_size=4", "optim.lr=1e-3"],
    );
    rm.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    let out = dir.path().join("hf");
    kiln_rlhf::export_reward_hf(&dir.path().join("rm"), &out, candle_core::DType::F32).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    assert!(cfg["pad_token_id"].is_number());
    let t = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(t.contains_key("score.weight") && !t.contains_key("lm_head.weight"));
    // transformers' scores of these texts on the export, committed by
    // tests/fixtures/check_reward_export.py (run on the same export).
    let model = RewardModel::load(&dir.path().join("rm"), &Device::Cpu).unwrap();
    let f = fixture("reward_export.json");
    for case in f["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = model
            .score_ids(&[Seq {
                ids: ids.clone(),
                prompt_len: 1,
            }])
            .unwrap()[0];
        let want = case["score"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "{ids:?}: kiln {got} vs transformers {want}"
        );
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A preference record without "rejected".
    let bad = write(
        dir.path(),
        "bad.jsonl",
        &[
            serde_json::json!({"prompt": "a", "chosen": "b", "rejected": "c"}).to_string(),
            serde_json::json!({"prompt": "a", "chosen": "b"}).to_string(),
        ],
    );
    let e = PairTrainer::new(
        Method::Dpo,
        PairSource {
            model: hf_tiny(),
            data: vec![bad.clone()],
            reference: None,
        },
        None,
        &[],
        &dir.path().join("x"),
        false,
        &mut Quiet,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("bad.jsonl: line 2") && e.contains("\"rejected\""),
        "{e}"
    );

    // Reward programs that fail or print no number.
    for (cmd, want) in [
        ("exit 3", "exited"),
        ("while read l; do echo hello; done", "not a number"),
    ] {
        let mut t = online(
            Method::Grpo,
            dir.path(),
            "cmd",
            RewardSpec::Cmd(cmd.into()),
            &[
                "train.steps=1",
                "train.batch_size=1",
                "grpo.group_size=2",
                "grpo.max_new_tokens=2",
            ],
            false,
        );
        let e = t.train_step(&mut Quiet).err().unwrap().to_string();
        assert!(e.contains("--reward-cmd") && e.contains(want), "{cmd}: {e}");
    }
    // A program that works: the record reaches it.
    let mut t = online(
        Method::Grpo,
        dir.path(),
        "cmd-ok",
        RewardSpec::Cmd(
            "while read l; do case \"$l\" in *'Say a word'*) echo 0.5;; *) echo 0;; esac; done"
                .into(),
        ),
        &[
            "train.steps=1",
            "train.batch_size=1",
            "grpo.group_size=2",
            "grpo.max_new_tokens=2",
            "grpo.penalize_missing_eos=false",
        ],
        false,
    );
    let m = t.train_step(&mut Quiet).unwrap();
    assert_eq!(m["reward"], 0.5);

    // A reward model whose tokenizer differs from the policy's.
    let mut rm = pairs(
        Method::Rm,
        dir.path(),
        "rm",
        &["train.steps=1", "train.batch_size=2"],
    );
    rm.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    let other = dir.path().join("other-model");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(hf_tiny()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let tok_path = other.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, e) = (vocab["a"].clone(), vocab["e"].clone());
    vocab.insert("a".into(), e);
    vocab.insert("e".into(), a);
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let e = OnlineTrainer::new(
        Method::Ppo,
        OnlineSource {
            model: other,
            prompts: vec![prompts(dir.path())],
            reward: RewardSpec::Model(dir.path().join("rm")),
        },
        None,
        &["ppo.max_new_tokens=8".to_string()],
        &dir.path().join("ppo"),
        false,
        &mut Quiet,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("different tokenizer"), "{e}");
    // A --reward-fn that does not exist.
    let e = kiln_rlhf::RewardFn::parse("longer:5")
        .unwrap_err()
        .to_string();
    assert!(e.contains("contains:WORD"), "{e}");
}

/// GRPO at β = 0 with `grpo.measure_kl = false` skips the reference pass: the same rollouts and
/// the same update (loss, gradient norm), and no `kl` in the metrics.
#[test]
fn grpo_without_the_kl_measurement_takes_the_same_steps() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "train.steps=2",
        "train.batch_size=2",
        "grpo.group_size=3",
        "grpo.max_new_tokens=5",
        "optim.lr=1e-3",
    ];
    let reward = || RewardSpec::Fn("contains:e".into());
    let mut with = online(Method::Grpo, dir.path(), "with", reward(), &sets, false);
    let mut sets_without = sets.to_vec();
    sets_without.push("grpo.measure_kl=false");
    let mut without = online(
        Method::Grpo,
        dir.path(),
        "without",
        reward(),
        &sets_without,
        false,
    );
    for _ in 0..2 {
        let (a, b) = (
            with.train_step(&mut Quiet).unwrap(),
            without.train_step(&mut Quiet).unwrap(),
        );
        assert!(a.contains_key("kl") && !b.contains_key("kl"), "{a:?} {b:?}");
        for key in ["loss", "reward", "grad_norm", "response_len", "entropy"] {
            assert_eq!(a[key], b[key], "{key}: {a:?} vs {b:?}");
        }
    }
}
