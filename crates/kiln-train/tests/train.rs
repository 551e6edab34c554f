//! End-to-end properties of the training loop on tiny configs: overfitting, gradient
//! accumulation equivalence, exact resume, atomic checkpoints and clear errors on bad input.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use kiln_model::{Llama, LoraSpec, ModelConfig, Params, Precision, SplitMix64};
use kiln_train::metrics::read_rows;
use kiln_train::optim::AdamW;
use kiln_train::{checkpoint, optimizer_step, OptimConfig, RunConfig, Silent, Trainer};

fn tiny_model(vocab: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        dim: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        max_seq_len: 32,
        ..ModelConfig::tiny()
    }
}

/// A run config over a dataset prepared (once per directory) from one play.
fn run_config(dir: &Path, extra: &[&str]) -> RunConfig {
    let toml = format!(
        r#"
[model]
preset = "tiny"
vocab_size = 384
dim = 32
n_heads = 4
n_kv_heads = 2
max_seq_len = 32
[data]
dataset = "{data}"
sources = ["{src}"]
val_fraction = 0.1
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
[train]
steps = 8
batch_size = 4
seq_len = 32
log_every = 1
eval_every = 4
eval_batches = 2
checkpoint_every = 4
keep_checkpoints = 2
peak_flops = 1e11
run_dir = "{run}"
"#,
        data = dir.join("data").display(),
        src = kiln_testutil::tempest_corpus().display(),
        run = dir.join("run").display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml_str(&toml, &overrides).unwrap()
}

fn train(cfg: RunConfig, resume: bool) -> Result<Trainer, kiln_train::TrainError> {
    let run_dir = cfg.run_dir(None);
    let mut t = Trainer::new(cfg, &run_dir, resume, &Device::Cpu, &mut Silent)?;
    t.run(&mut Silent, &AtomicBool::new(false))?;
    Ok(t)
}

/// Sets the stop flag after a given step, like Ctrl-C.
struct StopAt<'a> {
    step: u64,
    flag: &'a AtomicBool,
}

impl kiln_train::Observer for StopAt<'_> {
    fn on_step(&mut self, row: &kiln_train::metrics::MetricsRow, _logged: bool) {
        if row.step == self.step {
            self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    read_rows(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.loss.map(|l| (r.step, l)))
        .collect()
}

#[test]
fn tiny_model_overfits_one_batch() {
    let cfg = tiny_model(64);
    let params = Params::init(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let mut opt = AdamW::new(
        &params,
        &OptimConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = SplitMix64::new(5);
    let ids: Vec<u32> = (0..2 * 17).map(|_| (rng.next_u64() % 64) as u32).collect();
    let inputs: Vec<u32> = ids.chunks(17).flat_map(|c| c[..16].to_vec()).collect();
    let targets: Vec<i64> = ids
        .chunks(17)
        .flat_map(|c| c[1..].iter().map(|&x| x as i64).collect::<Vec<_>>())
        .collect();
    let batch = [(
        Tensor::from_vec(inputs, (2, 16), &Device::Cpu).unwrap(),
        Tensor::from_vec(targets, 32, &Device::Cpu).unwrap(),
    )];
    let mut last = f64::MAX;
    for _ in 0..150 {
        last = optimizer_step(&model, &params, &mut opt, &batch, 1e-2, 1.0, None)
            .unwrap()
            .loss;
    }
    assert!(last < 0.05, "final loss {last}");
}

#[test]
fn grad_accumulation_4x2_equals_batch_8_with_masked_tokens() {
    let cfg = tiny_model(64);
    let mut rng = SplitMix64::new(11);
    let (b, t) = (8, 16);
    let inputs: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 64) as u32).collect();
    // Variable-length examples: row r keeps only its first 4 + r targets.
    let targets: Vec<i64> = (0..b * t)
        .map(|i| {
            if i % t < 4 + i / t {
                (rng.next_u64() % 64) as i64
            } else {
                -100
            }
        })
        .collect();
    let run = |micro: usize| {
        let params = Params::init(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
        let model = Llama::new(&cfg, &params).unwrap();
        let mut opt = AdamW::new(&params, &OptimConfig::default()).unwrap();
        let rows = b / micro;
        let batches: Vec<(Tensor, Tensor)> = (0..micro)
            .map(|m| {
                let s = m * rows * t..(m + 1) * rows * t;
                (
                    Tensor::from_slice(&inputs[s.clone()], (rows, t), &Device::Cpu).unwrap(),
                    Tensor::from_slice(&targets[s], rows * t, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        let r = optimizer_step(&model, &params, &mut opt, &batches, 1e-3, 1.0, None).unwrap();
        (
            r.loss,
            r.grad_norm,
            params.tensor("layers.1.feed_forward.w2.weight").unwrap(),
        )
    };
    let (l1, n1, w1) = run(1);
    let (l4, n4, w4) = run(4);
    assert!((l1 - l4).abs() < 1e-6, "loss {l1} vs {l4}");
    assert!((n1 - n4).abs() < 1e-5 * n1, "grad norm {n1} vs {n4}");
    kiln_testutil::assert_close(
        "weights after one step",
        &w4,
        &w1,
        kiln_testutil::Tol::OP_F32,
    );
}

/// A random micro-batch of `b` rows of `t` tokens.
fn random_batch(seed: u64, b: usize, t: usize, vocab: u64) -> (Tensor, Tensor) {
    let mut rng = SplitMix64::new(seed);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let targets: Vec<i64> = (0..b * t)
        .map(|_| (rng.next_u64() % vocab) as i64)
        .collect();
    (
        Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        Tensor::from_vec(targets, b * t, &Device::Cpu).unwrap(),
    )
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// AdamW over flat buffers: one fused call per decay group (two for a full model, one when
/// everything decays or only LoRA adapters train), and the in-place update shows through
/// `Params::tensor` and through the model built before the step.
#[test]
fn adamw_updates_each_decay_group_in_one_call_visible_through_the_views() {
    let cfg = tiny_model(64);
    let batch = [random_batch(7, 2, 16, 64)];
    let x = batch[0].0.clone();
    for decay_all in [false, true] {
        let params = Params::init(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
        let model = Llama::new(&cfg, &params).unwrap();
        let optim = OptimConfig {
            decay_norms_and_embeddings: decay_all,
            ..Default::default()
        };
        let mut opt = AdamW::new(&params, &optim).unwrap();
        let before_w = values(&params.tensor("layers.0.attention.wq.weight").unwrap());
        let before_logits = values(&model.logits(&x).unwrap());
        optimizer_step(&model, &params, &mut opt, &batch, 1e-2, 1.0, None).unwrap();
        let ranges = opt.update_ranges(&params, opt.grads()).unwrap();
        let total = params.num_elements();
        if decay_all {
            assert_eq!(ranges.len(), 1, "{ranges:?}");
            assert!(ranges[0].decay);
        } else {
            assert_eq!(ranges.len(), 2, "{ranges:?}");
            assert!(ranges[0].decay && !ranges[1].decay);
            // The no-decay range is the embedding and the norms.
            let no_decay: usize = params
                .layout()
                .entries()
                .iter()
                .filter(|e| e.shape.len() == 1 || e.name == "tok_embeddings.weight")
                .map(|e| e.numel)
                .sum();
            assert_eq!(ranges[1].param.len(), no_decay);
        }
        assert_eq!(ranges.iter().map(|r| r.param.len()).sum::<usize>(), total);
        assert_ne!(
            values(&params.tensor("layers.0.attention.wq.weight").unwrap()),
            before_w
        );
        let after_logits = values(&model.logits(&x).unwrap());
        assert_ne!(after_logits, before_logits);
        assert_eq!(
            after_logits,
            values(&Llama::new(&cfg, &params).unwrap().logits(&x).unwrap()),
            "the model built before the step sees the updated weights"
        );
    }

    // LoRA: state for the adapters alone, one call, the base untouched.
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["wq", "wv", "w2"].map(String::from).to_vec(),
        rslora: false,
    };
    let mut params = Params::init(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
    params.add_lora(&cfg, &spec, 3).unwrap();
    let model = Llama::new_with_lora(&cfg, &params, &spec).unwrap();
    let mut opt = AdamW::for_model(&model, &params, &OptimConfig::default()).unwrap();
    let adapters = params.adapter_names();
    let state: Vec<&str> = opt
        .layout()
        .entries()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(state, adapters, "optimizer state for the adapters only");
    let base_before: Vec<(String, Vec<f32>)> = params
        .iter()
        .filter(|(n, _)| !kiln_model::is_lora_name(n))
        .map(|(n, t)| (n.to_string(), values(t)))
        .collect();
    let b_before = values(
        &params
            .tensor("layers.0.attention.wq.lora_B.weight")
            .unwrap(),
    );
    optimizer_step(&model, &params, &mut opt, &batch, 1e-2, 1.0, None).unwrap();
    assert_eq!(opt.grads().len(), adapters.len());
    let ranges = opt.update_ranges(&params, opt.grads()).unwrap();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert_eq!(ranges[0].param, 0..opt.layout().total());
    for (name, v) in base_before {
        assert_eq!(
            values(&params.tensor(&name).unwrap()),
            v,
            "{name} is frozen"
        );
    }
    assert_ne!(
        values(
            &params
                .tensor("layers.0.attention.wq.lora_B.weight")
                .unwrap()
        ),
        b_before
    );
}

#[test]
fn stopped_and_resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let full = run_config(dir.path(), &[]);
    let full_dir = full.run_dir(None);
    let uninterrupted = train(full, false).unwrap();

    // Same run, stopped (as Ctrl-C does) after step 3 and resumed for the rest.
    let half_dir = dir.path().join("half");
    let run = format!("train.run_dir=\"{}\"", half_dir.display());
    let stop = AtomicBool::new(false);
    let mut first = Trainer::new(
        run_config(dir.path(), &[&run]),
        &half_dir,
        false,
        &Device::Cpu,
        &mut Silent,
    )
    .unwrap();
    let summary = first
        .run(
            &mut StopAt {
                step: 3,
                flag: &stop,
            },
            &stop,
        )
        .unwrap();
    assert!(summary.stopped_early);
    assert_eq!(checkpoint::list(&half_dir).unwrap().last().unwrap().0, 3);
    drop(first);
    let resumed = train(run_config(dir.path(), &[&run]), true).unwrap();
    assert_eq!(resumed.step(), 8);
    let (a, b) = (losses(&full_dir), losses(&half_dir));
    assert_eq!(a.len(), 8);
    assert_eq!(a.len(), b.len(), "metrics rows after resume: {b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() < 1e-5, "step {sa}: {la} vs {lb}");
    }
    // The resumed run ends with exactly the weights of the uninterrupted one.
    let weights = |t: &Trainer| -> Vec<f32> {
        t.params()
            .unwrap()
            .flat()
            .as_detached_tensor()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (w_full, w_resumed) = (weights(&uninterrupted), weights(&resumed));
    assert_eq!(w_full.len(), resumed.params().unwrap().num_elements());
    let differing = w_full
        .iter()
        .zip(&w_resumed)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "{differing} weights differ after resume");
    for (name, w) in uninterrupted.params().unwrap().iter() {
        assert_eq!(
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            resumed
                .params()
                .unwrap()
                .tensor(name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "{name}"
        );
    }
    assert!(full_dir.join("loss.png").exists());
    assert!(full_dir.join("config.toml").exists() && full_dir.join("tokenizer.json").exists());
}

#[test]
fn corrupt_or_truncated_checkpoints_are_named_and_the_previous_one_survives() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path(), &[]);
    let run_dir = cfg.run_dir(None);
    train(cfg, false).unwrap();
    let ckpts = checkpoint::list(&run_dir).unwrap();
    assert_eq!(
        ckpts.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![4, 8],
        "keeps the last 2"
    );
    let newest = ckpts[1].1.join("model.safetensors");
    let bytes = std::fs::read(&newest).unwrap();

    // Flip one byte: CRC mismatch.
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    std::fs::write(&newest, &corrupt).unwrap();
    let err = Trainer::new(
        run_config(dir.path(), &[]),
        &run_dir,
        true,
        &Device::Cpu,
        &mut Silent,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt"),
        "{err}"
    );

    // Truncate it.
    std::fs::write(&newest, &bytes[..bytes.len() / 3]).unwrap();
    let err = Trainer::new(
        run_config(dir.path(), &[]),
        &run_dir,
        true,
        &Device::Cpu,
        &mut Silent,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // A save that fails half-way leaves no new checkpoint and the previous ones intact.
    std::fs::write(&newest, &bytes).unwrap();
    let state = checkpoint::load_state(&ckpts[1].1).unwrap();
    let failed = checkpoint::save(
        &run_dir,
        checkpoint::CheckpointState { step: 12, ..state },
        "",
        |d| {
            std::fs::write(d.join("model.safetensors"), b"partial").unwrap();
            Err(kiln_train::TrainError::Io("disk full (simulated)".into()))
        },
        &checkpoint::Retention {
            keep_last: 2,
            keep_best: None,
        },
    );
    assert!(failed.is_err());
    let after = checkpoint::list(&run_dir).unwrap();
    assert_eq!(after.iter().map(|c| c.0).collect::<Vec<_>>(), vec![4, 8]);
    checkpoint::load_state(&after[1].1).unwrap();
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Missing data source.
    let missing = dir.path().join("nope.txt");
    let cfg = run_config(
        dir.path(),
        &[&format!("data.sources=[\"{}\"]", missing.display())],
    );
    let err = Trainer::new(
        cfg.clone(),
        &cfg.run_dir(None),
        false,
        &Device::Cpu,
        &mut Silent,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("nope.txt"), "{err}");

    // Missing prepared dataset without sources.
    let cfg = run_config(
        dir.path(),
        &[
            "data.sources=[]",
            &format!("data.dataset=\"{}\"", dir.path().join("absent").display()),
        ],
    );
    let err = Trainer::new(
        cfg.clone(),
        &cfg.run_dir(None),
        false,
        &Device::Cpu,
        &mut Silent,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("absent"), "{err}");

    // Tokenizer/model vocab mismatch: the data has 384 tokens, the model 100.
    let cfg = run_config(dir.path(), &["model.vocab_size=100"]);
    let err = Trainer::new(
        cfg.clone(),
        &cfg.run_dir(None),
        false,
        &Device::Cpu,
        &mut Silent,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("vocab"), "{err}");
}

/// `train.precision = "bf16"` (bf16 products, f32 sums, weights and AdamW): the tiny run
/// follows the f32 run's loss curve. Where the CPU has AVX512-BF16 the curves must differ
/// (the bf16 path ran) by little; elsewhere the run falls back to f32 and equals it.
#[test]
fn bf16_mixed_precision_follows_the_f32_curve() {
    let dir = tempfile::tempdir().unwrap();
    let steps = [
        "train.steps=24",
        "train.eval_every=0",
        "train.checkpoint_every=0",
    ];
    let f32_cfg = run_config(&dir.path().join("f32"), &steps);
    let mut bf16_overrides = steps.to_vec();
    bf16_overrides.push("train.precision=\"bf16\"");
    let bf16_cfg = run_config(&dir.path().join("bf16"), &bf16_overrides);
    assert_eq!(bf16_cfg.train.precision, Precision::Bf16);
    let (f32_dir, bf16_dir) = (f32_cfg.run_dir(None), bf16_cfg.run_dir(None));
    train(f32_cfg, false).unwrap();
    train(bf16_cfg, false).unwrap();
    let (a, b) = (losses(&f32_dir), losses(&bf16_dir));
    assert_eq!(a.len(), 24);
    assert_eq!(
        a.iter().map(|r| r.0).collect::<Vec<_>>(),
        b.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let gaps: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (x.1 - y.1).abs()).collect();
    let worst = gaps.iter().cloned().fold(0.0, f64::max);
    if Precision::Bf16.effective() == Precision::Bf16 {
        assert!(worst > 0.0, "bf16 products changed nothing");
        assert!(
            worst < 0.05 && gaps.iter().sum::<f64>() / (gaps.len() as f64) < 0.02,
            "bf16 curve strays from f32: {a:?} vs {b:?}"
        );
        assert!(a[0].1 - a[23].1 > 0.5, "the run did not learn: {a:?}");
    } else {
        assert_eq!(worst, 0.0, "without AVX512-BF16 the run is the f32 run");
    }
    // The key is written back into the run's config (and f32, the default, is not).
    let written = std::fs::read_to_string(bf16_dir.join("config.toml")).unwrap();
    assert!(written.contains("precision = \"bf16\""), "{written}");
    let written = std::fs::read_to_string(f32_dir.join("config.toml")).unwrap();
    assert!(!written.contains("precision"), "{written}");
}

/// `--resume` continues a run under its own settings: more steps (and another logging or
/// checkpoint schedule) are fine, a changed learning rate, batch or precision is refused,
/// naming each changed key with both values, and the run's files are left as they were.
#[test]
fn resuming_with_changed_settings_is_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "train.steps=4",
        "train.eval_every=0",
        "train.checkpoint_every=2",
    ];
    let cfg = run_config(dir.path(), &base);
    let run_dir = cfg.run_dir(None);
    train(cfg, false).unwrap();
    let saved = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();

    let mut changed = base.to_vec();
    changed.extend(["optim.lr=0.5", "train.batch_size=2"]);
    let err = match train(run_config(dir.path(), &changed), true) {
        Ok(_) => panic!("a resume with another lr and batch ran"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("optim.lr: 0.01 → 0.5") && err.contains("train.batch_size: 4 → 2"),
        "{err}"
    );
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(
        std::fs::read_to_string(run_dir.join("config.toml")).unwrap(),
        saved,
        "a refused resume rewrote the run's config"
    );

    let mut longer = base.to_vec();
    longer.extend([
        "train.steps=6",
        "train.log_every=2",
        "train.checkpoint_every=3",
    ]);
    let t = train(run_config(dir.path(), &longer), true).unwrap();
    assert_eq!(t.step(), 6);
}
