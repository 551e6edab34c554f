//! Masked language modelling: the encoder and its loss against PyTorch
//! (tests/fixtures/tiny_mlm/make_tiny_mlm.py), a tiny encoder learning to fill masks on a toy
//! corpus, exact resume of an MLM run, and the errors for a tokenizer without `[MASK]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use kiln_data::{KilnTokenizer, MASK_TOKEN, MLM_SPECIAL_TOKENS};
use kiln_model::{loss_sum, AttentionMode, Llama, ModelConfig, Params};
use kiln_testutil::{assert_close, Tol};
use kiln_train::metrics::read_rows;
use kiln_train::{checkpoint, Objective, RunConfig, Silent, Trainer};

fn fixture() -> (ModelConfig, HashMap<String, Tensor>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_mlm");
    let cfg: ModelConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("tiny_mlm.safetensors"), &Device::Cpu).unwrap();
    (cfg, tensors)
}

fn weights(all: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    all.iter()
        .filter(|(k, _)| !k.starts_with("fixture.") && !k.starts_with("grad."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn encoder_logits_loss_and_gradients_match_pytorch() {
    let (cfg, all) = fixture();
    assert_eq!(cfg.attention, AttentionMode::Bidirectional);
    let params = Params::from_tensors(&cfg, weights(&all), "tiny_mlm").unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let ids = all["fixture.input_ids"].to_dtype(DType::U32).unwrap();
    let labels = all["fixture.labels"].flatten_all().unwrap();
    let (b, t) = ids.dims2().unwrap();

    // The fixture's pattern holds all three BERT cases: [MASK], random and unchanged.
    let orig = all["fixture.original_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let inp = all["fixture.input_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let lab = labels.to_vec1::<i64>().unwrap();
    let selected: Vec<usize> = (0..lab.len()).filter(|&i| lab[i] != -100).collect();
    assert!(selected.iter().any(|&i| inp[i] == 1));
    assert!(selected.iter().any(|&i| inp[i] != 1 && inp[i] != orig[i]));
    assert!(selected.iter().any(|&i| inp[i] == orig[i]));

    let logits = model.forward_train(&ids, None).unwrap();
    assert_close(
        "logits",
        &logits.reshape((b, t, cfg.vocab_size)).unwrap(),
        &all["fixture.logits"],
        Tol::MODEL_F32,
    );
    let (sum, n) = loss_sum(&logits, &labels).unwrap();
    assert_eq!(n, selected.len());
    let loss = (sum / n as f64).unwrap();
    assert_close("loss", &loss, &all["fixture.loss"], Tol::MODEL_F32);

    // Autograd and the hand-written backward both give PyTorch's gradients.
    let auto = params
        .autograd_grads(&loss.backward().unwrap())
        .unwrap()
        .unwrap();
    let mut grads = model.grads(&params).unwrap();
    let hand_sum = model
        .forward_backward(&ids, &labels, 1.0 / n as f64, &mut grads, None)
        .unwrap();
    let want = all["fixture.loss"].to_scalar::<f32>().unwrap() as f64;
    assert!((hand_sum / n as f64 - want).abs() < 1e-5 * want);
    assert_eq!(grads.len(), params.layout().len());
    for (pname, g) in auto.iter() {
        let expected = &all[&format!("grad.{pname}")];
        assert_close(
            &format!("autograd grad.{pname}"),
            g,
            expected,
            Tol::GRAD_F32,
        );
        assert_close(
            &format!("hand-written grad.{pname}"),
            &grads[pname],
            expected,
            Tol::GRAD_F32,
        );
    }

    // The same weights with the causal mask: PyTorch's causal logits, which differ.
    let causal_cfg = ModelConfig {
        attention: AttentionMode::Causal,
        ..cfg.clone()
    };
    let causal = Llama::new(&causal_cfg, &params).unwrap();
    let causal_logits = causal.logits(&ids).unwrap();
    assert_close(
        "causal logits",
        &causal_logits,
        &all["fixture.causal_logits"],
        Tol::MODEL_F32,
    );
    let diff = (causal_logits - &all["fixture.logits"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-2, "the encoder must see the future: {diff}");
}

/// A toy corpus with strong regularities: every animal has one colour and one food, and the
/// verb goes with the article ("the ... eats", "a ... likes").
fn toy_corpus(path: &Path, lines: usize) {
    const ANIMALS: [(&str, &str, &str); 6] = [
        ("cat", "black", "milk"),
        ("dog", "brown", "bones"),
        ("cow", "white", "grass"),
        ("bird", "blue", "seeds"),
        ("fox", "red", "hens"),
        ("pig", "pink", "mud"),
    ];
    let mut rng = kiln_model::SplitMix64::new(42);
    let mut text = String::new();
    for _ in 0..lines {
        let (animal, colour, food) = ANIMALS[(rng.next_u64() % 6) as usize];
        if rng.next_u64() & 1 == 0 {
            text.push_str(&format!("the {colour} {animal} eats {food} .\n"));
        } else {
            text.push_str(&format!("a {colour} {animal} likes {food} .\n"));
        }
    }
    std::fs::write(path, text).unwrap();
}

/// An MLM run config over `data` (prepared from `source` on first use) in `run`.
fn mlm_config(source: &Path, data: &Path, run: &Path, extra: &[&str]) -> RunConfig {
    let toml = format!(
        r#"
[model]
preset = "tiny"
vocab_size = 384
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 32
attention = "bidirectional"
[data]
dataset = "{data}"
sources = ["{src}"]
val_fraction = 0.2
[optim]
lr = 5e-3
min_lr = 5e-4
warmup_steps = 20
weight_decay = 0.0
[train]
objective = "mlm"
steps = 250
batch_size = 16
seq_len = 32
log_every = 50
eval_every = 125
eval_batches = 8
checkpoint_every = 0
peak_flops = 1e11
run_dir = "{run}"
"#,
        data = data.display(),
        src = source.display(),
        run = run.display()
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

#[test]
fn tiny_encoder_learns_to_fill_masks_well_above_chance() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("toy.txt");
    toy_corpus(&src, 8000);
    let cfg = mlm_config(&src, &dir.path().join("data"), &dir.path().join("run"), &[]);
    let t0 = std::time::Instant::now();
    let mut trainer = train(cfg, false).unwrap();
    let secs = t0.elapsed().as_secs_f64();

    // kiln trained the tokenizer itself, with the MLM special tokens.
    let tok = KilnTokenizer::load(dir.path().join("run/tokenizer.json")).unwrap();
    for t in MLM_SPECIAL_TOKENS {
        assert!(tok.token_id(t).is_some(), "{t} missing");
    }
    let rows = read_rows(&dir.path().join("run/metrics.jsonl")).unwrap();
    let evals: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.val_loss?, r.val_accuracy?)))
        .collect();
    assert_eq!(evals.len(), 2, "{rows:?}");
    let (loss, acc) = *evals.last().unwrap();
    let chance = 1.0 / tok.vocab_size() as f64;
    println!(
        "vocab {}, val loss {loss:.3}, masked-token accuracy {acc:.3} (chance {chance:.4}), {secs:.1} s",
        tok.vocab_size()
    );
    assert!(acc > 0.5, "masked-token accuracy {acc} (chance {chance})");
    assert!(acc > 100.0 * chance);
    assert!(
        loss < (tok.vocab_size() as f64).ln() / 3.0,
        "val loss {loss}"
    );
    // Training rows carry no accuracy; eval rows do; both plots exist.
    assert!(rows
        .iter()
        .all(|r| r.loss.is_none() || r.val_accuracy.is_none()));
    assert!(dir.path().join("run/loss.png").exists());
    assert!(dir.path().join("run/accuracy.png").exists());
    assert_eq!(trainer.cfg.train.objective, Objective::Mlm);

    // The validation masking is fixed: evaluating again scores the same positions.
    let again = trainer.evaluate_metrics().unwrap();
    assert!((again.loss - loss).abs() < 1e-9 * loss, "{again:?}");
    assert_eq!(again.accuracy, Some(acc));

    // `[MASK]` in text is the mask token the model was trained with.
    let mask = tok.token_id(MASK_TOKEN).unwrap();
    let ids = tok.encode("the black cat eats [MASK] .").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == mask).count(), 1);
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

#[test]
fn stopped_and_resumed_mlm_run_masks_and_trains_identically() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("toy.txt");
    toy_corpus(&src, 3000);
    let data = dir.path().join("data");
    let short = [
        "train.steps=8",
        "train.log_every=1",
        "train.eval_every=4",
        "train.eval_batches=2",
        "train.checkpoint_every=4",
        "train.grad_accum=2",
        "train.batch_size=4",
        "model.dropout=0.1",
    ];
    let full_dir = dir.path().join("full");
    train(mlm_config(&src, &data, &full_dir, &short), false).unwrap();

    let half_dir = dir.path().join("half");
    let stop = AtomicBool::new(false);
    let mut first = Trainer::new(
        mlm_config(&src, &data, &half_dir, &short),
        &half_dir,
        false,
        &Device::Cpu,
        &mut Silent,
    )
    .unwrap();
    assert!(
        first
            .run(
                &mut StopAt {
                    step: 3,
                    flag: &stop
                },
                &stop
            )
            .unwrap()
            .stopped_early
    );
    assert_eq!(checkpoint::list(&half_dir).unwrap().last().unwrap().0, 3);
    drop(first);
    let resumed = train(mlm_config(&src, &data, &half_dir, &short), true).unwrap();
    assert_eq!(resumed.step(), 8);

    let rows = |d: &Path| read_rows(&d.join("metrics.jsonl")).unwrap();
    let (a, b) = (rows(&full_dir), rows(&half_dir));
    assert_eq!(a.len(), b.len(), "{b:?}");
    for (ra, rb) in a.iter().zip(&b) {
        assert_eq!(ra.step, rb.step);
        for (x, y) in [
            (ra.loss, rb.loss),
            (ra.val_loss, rb.val_loss),
            (ra.val_accuracy, rb.val_accuracy),
        ] {
            assert_eq!(x.is_some(), y.is_some(), "step {}", ra.step);
            if let (Some(x), Some(y)) = (x, y) {
                assert!((x - y).abs() < 1e-5, "step {}: {x} vs {y}", ra.step);
            }
        }
    }
    assert!(a.iter().any(|r| r.val_accuracy.is_some()));
}

#[test]
fn a_tokenizer_without_mask_is_refused_with_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("toy.txt");
    toy_corpus(&src, 500);
    let want = |err: &str| {
        assert!(
            err.contains("[MASK]")
                && err.contains("kiln tokenizer train --mlm")
                && err.contains("data.dataset"),
            "{err}"
        );
    };

    // An explicit data.tokenizer without [MASK]: refused before preparing anything.
    let plain = kiln_data::train_bpe(
        std::slice::from_ref(&src),
        &kiln_data::BpeTrainOptions {
            vocab_size: 300,
            ..Default::default()
        },
    )
    .unwrap();
    let tok_path = dir.path().join("plain.json");
    plain.save(&tok_path).unwrap();
    let data = dir.path().join("data");
    let tok_override = format!("data.tokenizer=\"{}\"", tok_path.display());
    let cfg = mlm_config(&src, &data, &dir.path().join("run"), &[&tok_override]);
    let err = Trainer::new(
        cfg,
        &dir.path().join("run"),
        false,
        &Device::Cpu,
        &mut Silent,
    )
    .err()
    .unwrap()
    .to_string();
    want(&err);
    assert!(!data.join("meta.json").exists());

    // A dataset already prepared for a causal run: refused, naming the dataset.
    kiln_data::prepare_dataset(
        std::slice::from_ref(&src),
        &plain,
        &data,
        &kiln_data::PrepareOptions {
            val_fraction: 0.2,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = mlm_config(&src, &data, &dir.path().join("run"), &[]);
    let err = Trainer::new(
        cfg,
        &dir.path().join("run"),
        false,
        &Device::Cpu,
        &mut Silent,
    )
    .err()
    .unwrap()
    .to_string();
    want(&err);
    assert!(err.contains(&data.display().to_string()), "{err}");
}
