//! SFT and LoRA training: packed == unpacked, gradient accumulation 4 x 2 == 8 under LoRA with
//! assistant masks of different lengths, PEFT adapters both ways (fixtures made by the real
//! `peft`, tests/fixtures/peft), a tiny model learning a toy instruction set, exact resume,
//! and bad input.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use kiln_chat::{read_records, Example};
use kiln_model::{Llama, LoraSpec, ModelConfig, Params, SplitMix64, TokenBatch};
use kiln_sft::{pack, SftSource, SftTrainer};
use kiln_testutil::{assert_close, repo_root, Tol};
use kiln_train::Truncation;
use kiln_train::{optim::AdamW, OptimConfig};

fn hf_tiny() -> PathBuf {
    repo_root().join("tests/fixtures/hf_tiny/model")
}

fn peft_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/peft").join(name)
}

fn tiny_cfg() -> ModelConfig {
    let mut c = ModelConfig::tiny();
    c.vocab_size = 64;
    c.max_seq_len = 64;
    c
}

/// Random examples with assistant labels on a tail of each (different lengths).
fn examples(n: usize, seed: u64, vocab: u32) -> Vec<Example> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let len = 6 + (rng.next_f64() * 14.0) as usize;
            let prompt = 2 + (rng.next_f64() * (len as f64 - 3.0)) as usize;
            Example {
                ids: (0..len)
                    .map(|_| (rng.next_f64() * vocab as f64) as u32)
                    .collect(),
                labels: (0..len).map(|j| j >= prompt).collect(),
            }
        })
        .collect()
}

fn batch(rows: &[&kiln_sft::Row]) -> (TokenBatch, Tensor) {
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    let (mut tok, mut tgt, mut segs) = (vec![], vec![], vec![]);
    for r in rows {
        let pad = t - r.len();
        tok.extend(r.tokens.iter().copied().chain(std::iter::repeat_n(0, pad)));
        tgt.extend(
            r.targets
                .iter()
                .copied()
                .chain(std::iter::repeat_n(-100, pad)),
        );
        let last = *r.segments.last().unwrap();
        segs.push(
            r.segments
                .iter()
                .copied()
                .chain(std::iter::repeat_n(last + 1, pad))
                .collect::<Vec<u32>>(),
        );
    }
    let tokens = Tensor::from_vec(tok, (rows.len(), t), &Device::Cpu).unwrap();
    (
        TokenBatch::packed(tokens, &segs).unwrap(),
        Tensor::from_vec(tgt, rows.len() * t, &Device::Cpu).unwrap(),
    )
}

/// Per-example loss sums of rows (one entry per (row, segment)), in example-length order.
fn segment_losses(model: &Llama, rows: &[kiln_sft::Row]) -> Vec<f64> {
    let mut out = vec![];
    for r in rows {
        let (b, targets) = batch(&[r]);
        let logits = model.forward_batch(&b, None).unwrap();
        let logp = kiln_model::logprobs_of(&logits, &targets.clamp(0i64, 1_000_000i64).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let tg = targets.to_vec1::<i64>().unwrap();
        let mut per: std::collections::BTreeMap<u32, f64> = Default::default();
        for j in 0..r.len() {
            if tg[j] != -100 {
                *per.entry(r.segments[j]).or_default() -= f64::from(logp[j]);
            }
        }
        out.extend(per.values());
    }
    out.sort_by(f64::total_cmp);
    out
}

#[test]
fn packed_rows_give_each_example_its_unpacked_loss() {
    let cfg = tiny_cfg();
    let params = Params::init(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let ex = examples(9, 1, 64);
    let packed = pack(&ex, 40, true, Truncation::KeepStart);
    let unpacked = pack(&ex, 40, false, Truncation::KeepStart);
    assert!(packed.rows.len() < unpacked.rows.len());
    let a = segment_losses(&model, &packed.rows);
    let b = segment_losses(&model, &unpacked.rows);
    assert_eq!(a.len(), 9);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{x} vs {y}");
    }
}

#[test]
fn lora_accumulation_4x2_equals_batch_8_with_uneven_masks() {
    let cfg = tiny_cfg();
    let base = Params::init(&cfg, 5, &Device::Cpu, DType::F32).unwrap();
    let spec = LoraSpec::all_projections(4, 8.0);
    let rows = pack(&examples(8, 9, 64), 40, false, Truncation::KeepStart).rows;
    let run = |micro: usize| -> Vec<(String, Tensor)> {
        let adapters = Params::lora_adapters(&cfg, &spec, 7, &Device::Cpu, DType::F32).unwrap();
        // Non-zero B so A gets gradients too.
        for (name, t) in adapters.iter() {
            if name.contains("lora_B") {
                let v = kiln_testutil::uniform_tensor(11, t.dims(), DType::F32).unwrap();
                adapters.set(name, &(v * 0.1).unwrap()).unwrap();
            }
        }
        let mut model = Llama::new(&cfg, &base).unwrap();
        model.attach_lora(&adapters, &spec).unwrap();
        let ocfg = OptimConfig {
            warmup_steps: 0,
            ..Default::default()
        };
        let mut opt = AdamW::for_model(&model, &adapters, &ocfg).unwrap();
        let refs: Vec<&kiln_sft::Row> = rows.iter().collect();
        let batches: Vec<_> = refs.chunks(micro).map(batch).collect();
        kiln_train::optimizer_step_batches(&model, &adapters, &mut opt, &batches, 1e-2, 1.0, None)
            .unwrap();
        adapters
            .iter()
            .map(|(n, t)| (n.to_string(), t.copy().unwrap()))
            .collect()
    };
    let (a, b) = (run(2), run(8));
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert_close(n, x, y, Tol::GRAD_F32);
    }
    // The base is untouched and has no optimizer state: only adapters are in the layout.
    assert!(a.iter().all(|(n, _)| n.contains(".lora_")));
}

fn reference(name: &str) -> Tensor {
    let r =
        candle_core::safetensors::load(peft_dir("reference.safetensors"), &Device::Cpu).unwrap();
    r[name].clone()
}

fn tiny_base() -> (ModelConfig, Params) {
    let w = kiln_load::load_weights(&hf_tiny(), &Device::Cpu).unwrap();
    (w.config, w.params)
}

fn logits_with(cfg: &ModelConfig, base: &Params, adapter: &Path) -> (Llama, Tensor) {
    let a = kiln_load::load_adapter(adapter, cfg, &Device::Cpu).unwrap();
    let mut m = Llama::new(cfg, base).unwrap();
    m.attach_lora(&a.params, &a.spec).unwrap();
    let ids = reference("input_ids").to_dtype(DType::U32).unwrap();
    let logits = m.logits(&ids).unwrap();
    (m, logits)
}

#[test]
fn peft_adapters_load_with_peft_logits_and_merge_to_the_same() {
    let (cfg, base) = tiny_base();
    let ids = reference("input_ids").to_dtype(DType::U32).unwrap();
    let plain = Llama::new(&cfg, &base).unwrap().logits(&ids).unwrap();
    let tol = Tol {
        rel: 0.0,
        abs: 1e-4,
    };
    assert_close("base", &plain, &reference("base.logits"), tol);
    let (m, all) = logits_with(&cfg, &base, &peft_dir("adapter_all"));
    assert_close("all targets", &all, &reference("all.logits"), tol);
    let merged = m.merge_lora().unwrap().logits(&ids).unwrap();
    assert_close("merged", &merged, &reference("all.merged_logits"), tol);
    let (_, rs) = logits_with(&cfg, &base, &peft_dir("adapter_rslora"));
    assert_close("rsLoRA subset", &rs, &reference("rslora.logits"), tol);
    // The adapter matters (a test that cannot pass by ignoring it).
    let diff = (all - plain).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 0.1);
}

#[test]
fn kiln_writes_adapters_in_peft_layout_that_read_back_identically() {
    let (cfg, _) = tiny_base();
    let src = kiln_load::load_adapter(&peft_dir("adapter_rslora"), &cfg, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let base = kiln_load::AdapterBase {
        base_model: "tests/fixtures/hf_tiny/model".into(),
        norm_fingerprint: Llama::new(&cfg, &tiny_base().1)
            .unwrap()
            .norm_fingerprint()
            .unwrap(),
    };
    kiln_load::save_adapter(&out, &src.params, &src.spec, &base).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    for (k, v) in [
        ("peft_type", "LORA"),
        ("task_type", "CAUSAL_LM"),
        ("bias", "none"),
    ] {
        assert_eq!(written[k], v, "{k}");
    }
    assert_eq!(written["r"], 2);
    assert_eq!(written["use_rslora"], true);
    assert_eq!(written["fan_in_fan_out"], false);
    let names: Vec<String> =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    let theirs: Vec<String> = candle_core::safetensors::load(
        peft_dir("adapter_rslora/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_keys()
    .collect();
    let (mut a, mut b) = (names, theirs);
    a.sort();
    b.sort();
    assert_eq!(a, b, "tensor names differ from what peft writes");
    let back = kiln_load::load_adapter(&out, &cfg, &Device::Cpu).unwrap();
    assert_eq!(back.spec, src.spec);
    for (n, t) in src.params.iter() {
        assert_close(
            n,
            &back.params.tensor(n).unwrap(),
            t,
            Tol { rel: 0.0, abs: 0.0 },
        );
    }
}

#[test]
fn an_adapter_for_another_base_is_a_clear_error() {
    let mut cfg = tiny_base().0;
    cfg.dim = 32;
    let e = kiln_load::load_adapter(&peft_dir("adapter_all"), &cfg, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("shape"),
        "{e}"
    );
    // Always the same tensor, the model's first, whatever order the file lists them in.
    assert!(e.contains("layers.0."), "{e}");
    for _ in 0..5 {
        let again = kiln_load::load_adapter(&peft_dir("adapter_all"), &cfg, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(again, e);
    }
    let e = kiln_load::load_adapter(Path::new("/nonexistent/adapter"), &cfg, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/adapter"), "{e}");
}

#[test]
fn bad_records_name_file_record_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases = [
        (
            "no_reply.json",
            r#"[{"instruction": "a", "output": "b"}, {"instruction": "x", "input": ""}]"#,
            ["no_reply.json", "record 2", "output"],
        ),
        (
            "role.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"robot\", \"content\": \"b\"}]}\n",
            ["role.jsonl", "line 3", "robot"],
        ),
        (
            "sharegpt.json",
            r#"[{"conversations": [{"from": "human", "value": "hi"}]}]"#,
            ["sharegpt.json", "record 1", "no assistant turn"],
        ),
        (
            "field.json",
            r#"[{"messages": [{"role": "user", "content": 3}]}]"#,
            ["field.json", "messages[0]", "content"],
        ),
        // Tool calling: a call that is not JSON, a result without a call before it, a call
        // without definitions, definitions that are not a list.
        (
            "call.json",
            r#"[{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "search(q)"}], "tools": "[{\"name\": \"search\"}]"}]"#,
            ["call.json", "conversations[1].value", "JSON text"],
        ),
        (
            "result.json",
            r#"[{"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "42"}, {"from": "gpt", "value": "a"}]}]"#,
            ["result.json", "conversations[1]", "must follow the assistant's tool call"],
        ),
        (
            "notools.json",
            r#"[{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {}}"}, {"from": "observation", "value": "1"}, {"from": "gpt", "value": "a"}]}]"#,
            ["notools.json", "record 1", "without tool definitions"],
        ),
        (
            "tools.json",
            r#"[{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": {"name": "f"}}]"#,
            ["tools.json", "record 1", "\"tools\" must be a list"],
        ),
    ];
    for (name, text, want) in cases {
        let p = write(name, text);
        let e = read_records(std::slice::from_ref(&p), false)
            .unwrap_err()
            .to_string();
        for w in want {
            assert!(e.contains(w), "{name}: {e:?} lacks {w:?}");
        }
    }
    // Behind the flag the bad records are skipped and counted; the good ones kept.
    let p = dir.path().join("no_reply.json");
    let r = read_records(&[p], true).unwrap();
    assert_eq!((r.conversations.len(), r.skipped), (1, 1));
    // ShareGPT with a system turn, Alpaca with input and system.
    let p = write(
        "ok.json",
        r#"[{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"instruction": "Do", "input": "this", "output": "done", "system": "T"}]"#,
    );
    let r = read_records(&[p], false).unwrap();
    assert_eq!(r.conversations[0].system.as_deref(), Some("S"));
    assert_eq!(r.conversations[1].turns[0].content, "Do\nthis");
    assert_eq!(r.conversations[1].system.as_deref(), Some("T"));
    // TRL's prompt-completion records, as strings and as message lists.
    let p = write(
        "trl.jsonl",
        concat!(
            r#"{"prompt": "The sky is", "completion": " blue."}"#,
            "\n",
            r#"{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}"#,
            "\n"
        ),
    );
    let r = read_records(&[p], false).unwrap();
    let turns = |i: usize| -> Vec<(String, String)> {
        r.conversations[i]
            .turns
            .iter()
            .map(|m| (m.role.clone(), m.content.clone()))
            .collect()
    };
    assert_eq!(
        turns(0),
        vec![
            ("user".to_string(), "The sky is".to_string()),
            ("assistant".to_string(), " blue.".to_string())
        ]
    );
    assert_eq!(r.conversations[1].system.as_deref(), Some("S"));
    assert_eq!(
        turns(1),
        vec![
            ("user".to_string(), "Hi".to_string()),
            ("assistant".to_string(), "Hello".to_string())
        ]
    );
    let p = write("trl_bad.json", r#"[{"prompt": "x", "completion": [1]}]"#);
    let e = read_records(&[p], false).unwrap_err().to_string();
    assert!(
        e.contains("trl_bad.json") && e.contains("both strings"),
        "{e}"
    );
}

/// A toy instruction set: each question has one fixed answer.
fn toy_data(dir: &Path) -> PathBuf {
    let pairs = [
        ("color of sky", "blue"),
        ("color of grass", "green"),
        ("color of snow", "white"),
        ("color of coal", "black"),
        ("sound of cat", "meow"),
        ("sound of dog", "woof"),
    ];
    let text: String = pairs
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
                + "\n"
        })
        .collect();
    let p = dir.join("toy.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

struct Quiet;
impl kiln_train::Observer for Quiet {}
impl kiln_sft::SftObserver for Quiet {}

fn trainer(dir: &Path, run: &str, sets: &[&str], resume: bool) -> SftTrainer {
    let data = toy_data(dir);
    let source = SftSource {
        model: hf_tiny(),
        data: vec![data.clone()],
        eval_data: vec![data],
    };
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    SftTrainer::new(source, None, &sets, &dir.join(run), resume, &mut Quiet).unwrap()
}

#[test]
fn a_tiny_model_learns_a_toy_instruction_set() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "train.steps=120",
        "train.batch_size=2",
        "train.seq_len=48",
        "train.eval_every=0",
        "train.log_every=1000",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "lora.rank=8",
        "train.peak_flops=1e11",
    ];
    let mut t = trainer(dir.path(), "run", &sets, false);
    assert!(t.info.trainable_params < t.info.total_params / 4);
    let s = t.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    let before = s.val_loss_before.unwrap();
    let after = s.final_val_loss.unwrap();
    assert!(after < 0.05, "assistant loss {before} -> {after}");
    // The run wrote a PEFT adapter, and kiln reads it back onto the base with the same loss.
    let adapter = s.adapter_dir.unwrap();
    let (cfg, base) = tiny_base();
    let a = kiln_load::load_adapter(&adapter, &cfg, &Device::Cpu).unwrap();
    let mut m = Llama::new(&cfg, &base).unwrap();
    m.attach_lora(&a.params, &a.spec).unwrap();
    assert!(dir.path().join("run/chat_template.jinja").is_file());
    let held = std::fs::read_to_string(dir.path().join("run/held_out.jsonl")).unwrap();
    assert_eq!(held.lines().count(), 6); // --eval-data: the same six conversations
    assert!(dir.path().join("run/loss.png").is_file());
}

#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "train.steps=6",
        "train.batch_size=2",
        "train.seq_len=48",
        "train.eval_every=0",
        "train.checkpoint_every=3",
        "lora.rank=4",
        "lora.dropout=0.1",
        "train.peak_flops=1e11",
    ];
    let mut straight = trainer(dir.path(), "a", &common, false);
    straight.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    // Stop after 3 steps (a stop flag set by the observer at step 3), then resume.
    struct StopAt3<'a>(&'a AtomicBool);
    impl kiln_train::Observer for StopAt3<'_> {
        fn on_step(&mut self, row: &kiln_train::metrics::MetricsRow, _: bool) {
            if row.step == 3 {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    impl kiln_sft::SftObserver for StopAt3<'_> {}
    let stop = AtomicBool::new(false);
    let mut first = trainer(dir.path(), "b", &common, false);
    let s = first.run(&mut StopAt3(&stop), &stop).unwrap();
    assert!(s.stopped_early && s.steps == 3);
    // Resuming onto other data (here two conversations instead of six) is refused, not silently mixed.
    let mut fewer: Vec<&str> = common.to_vec();
    fewer.push("sft.max_records=2");
    let data = toy_data(dir.path());
    let source = SftSource {
        model: hf_tiny(),
        data: vec![data.clone()],
        eval_data: vec![data],
    };
    let sets: Vec<String> = fewer.iter().map(|s| s.to_string()).collect();
    let e = SftTrainer::new(source, None, &sets, &dir.path().join("b"), true, &mut Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rows") && e.contains("same --data"), "{e}");
    let mut second = trainer(dir.path(), "b", &common, true);
    assert_eq!(second.step(), 3);
    second.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
    for (n, t) in straight.params().unwrap().iter() {
        assert_close(
            n,
            &second.params().unwrap().tensor(n).unwrap(),
            t,
            Tol { rel: 0.0, abs: 0.0 },
        );
    }
}
