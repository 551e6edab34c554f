//! Format detection and resolution on hand-built runs, checkpoints, weights files, HF and GGUF
//! stand-ins: run dir → newest complete checkpoint, verification errors naming the file, clear
//! errors for a missing config or tokenizer.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kiln_load::{
    check_init_compatible, file_digest, latest_checkpoint, list_checkpoints, load_model,
    load_tokenizer, load_weights, resolve_kiln, verify_checkpoint, LoadError, ModelFormat, Weights,
};
use kiln_model::{ModelConfig, Params};

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 300,
        max_seq_len: 32,
        ..ModelConfig::tiny()
    }
}

fn run_toml(dataset: &str) -> String {
    format!(
        "[model]\npreset = \"tiny\"\nvocab_size = 300\nmax_seq_len = 32\n[data]\ndataset = \"{dataset}\"\n[train]\nsteps = 10\nbatch_size = 1\nseq_len = 16\n"
    )
}

/// A complete checkpoint `RUN/checkpoints/step-N` with weights drawn from `seed`, its
/// `config.toml` and a `state.json` recording sizes and CRC32s (plus trainer fields loading
/// ignores).
fn write_checkpoint(run: &Path, step: u64, seed: u64, dataset: &str) -> PathBuf {
    let dir = run.join("checkpoints").join(format!("step-{step:08}"));
    std::fs::create_dir_all(&dir).unwrap();
    Params::init(&cfg(), seed, &Device::Cpu, DType::F32)
        .unwrap()
        .save(&dir.join("model.safetensors"))
        .unwrap();
    std::fs::write(dir.join("optimizer.safetensors"), b"moments").unwrap();
    std::fs::write(dir.join("config.toml"), run_toml(dataset)).unwrap();
    let mut files = serde_json::Map::new();
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let d = file_digest(&dir.join(f)).unwrap();
        files.insert(
            f.into(),
            serde_json::json!({"bytes": d.bytes, "crc32": d.crc32}),
        );
    }
    let state = serde_json::json!({
        "format_version": 1, "step": step, "tokens_seen": step * 16,
        "sampler": {"seed": 1}, "dropout_rng": {"state": 2}, "files": files,
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    dir
}

fn tokenizer_json(path: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "To be, or not to be, that is the question.\n".repeat(50),
    )
    .unwrap();
    let opts = kiln_data::BpeTrainOptions {
        vocab_size: 280,
        ..Default::default()
    };
    kiln_data::train_bpe(&[text], &opts)
        .unwrap()
        .save(path)
        .unwrap();
}

fn params_equal(a: &Params, b: &Params) -> bool {
    a.iter().all(|(name, v)| {
        let x: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b
            .tensor(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        x == y
    })
}

#[test]
fn format_detection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("nowhere");
    let e = ModelFormat::detect(&missing).unwrap_err();
    assert!(matches!(e, LoadError::NotFound(_)));
    assert!(e.to_string().contains("nowhere"), "{e}");

    let gguf = d.join("m.bin");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00rest").unwrap();
    assert_eq!(ModelFormat::detect(&gguf).unwrap(), ModelFormat::Gguf);

    let hf = d.join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{}").unwrap();
    std::fs::write(hf.join("model.safetensors"), b"x").unwrap();
    assert_eq!(ModelFormat::detect(&hf).unwrap(), ModelFormat::HfDir);

    let run = d.join("run");
    let ckpt = write_checkpoint(&run, 5, 1, "data");
    std::fs::write(run.join("config.toml"), run_toml("data")).unwrap();
    assert_eq!(ModelFormat::detect(&run).unwrap(), ModelFormat::KilnRun);
    assert_eq!(
        ModelFormat::detect(&ckpt).unwrap(),
        ModelFormat::KilnCheckpoint
    );
    assert_eq!(
        ModelFormat::detect(&ckpt.join("model.safetensors")).unwrap(),
        ModelFormat::KilnWeights
    );
    // A run directory is recognised by its checkpoints/ alone too.
    std::fs::remove_file(run.join("config.toml")).unwrap();
    assert_eq!(ModelFormat::detect(&run).unwrap(), ModelFormat::KilnRun);

    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = ModelFormat::detect(&empty).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("not a model"), "{e}");

    assert_eq!(Weights::parse("native"), Some(Weights::Native));
    assert_eq!(Weights::parse("f32"), Some(Weights::Dense));
    assert_eq!(
        Weights::parse("q8_0"),
        Some(Weights::Quantized(candle_core::quantized::GgmlDType::Q8_0))
    );
    assert_eq!(Weights::parse("q9_9"), None);
}

#[test]
fn run_dir_resolves_to_its_newest_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    write_checkpoint(&run, 10, 1, "data");
    let newest = write_checkpoint(&run, 200, 2, "data");
    write_checkpoint(&run, 30, 3, "data");
    // Incomplete: a checkpoint without state.json and the temp directory of a crashed save.
    let partial = write_checkpoint(&run, 300, 4, "data");
    std::fs::remove_file(partial.join("state.json")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/.tmp-step-00000400")).unwrap();
    std::fs::write(run.join("config.toml"), run_toml("data")).unwrap();
    tokenizer_json(&run.join("tokenizer.json"));

    let steps: Vec<u64> = list_checkpoints(&run)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![10, 30, 200]);
    assert_eq!(
        latest_checkpoint(&run).unwrap(),
        Some((200, newest.clone()))
    );

    let r = resolve_kiln(&run).unwrap();
    assert_eq!(r.format, ModelFormat::KilnRun);
    assert_eq!(r.weights, newest.join("model.safetensors"));
    assert_eq!(r.config, cfg());
    assert_eq!(r.run.checkpoint, Some((200, newest.clone())));
    assert_eq!(r.run.config_file, newest.join("config.toml"));
    assert_eq!(r.run.dataset, Some(PathBuf::from("data")));
    assert_eq!(r.tokenizer, Some(run.join("tokenizer.json")));

    // The weights are the newest checkpoint's, whether named by the run, the checkpoint or
    // the weights file.
    let want = Params::init(&cfg(), 2, &Device::Cpu, DType::F32).unwrap();
    for p in [
        run.clone(),
        newest.clone(),
        newest.join("model.safetensors"),
    ] {
        let w = load_weights(&p, &Device::Cpu).unwrap();
        assert!(params_equal(&w.params, &want), "{}", p.display());
        assert_eq!(w.config, cfg());
        assert_eq!(w.weights, newest.join("model.safetensors"));
    }
    // The checkpoint has no tokenizer of its own: the run's is used.
    let tok = load_tokenizer(&newest).unwrap();
    assert_eq!(tok.source, run.join("tokenizer.json"));
    assert_eq!(tok.stop_ids, vec![tok.tokenizer.eos_id().unwrap()]);

    // Dense and requantised inference models of the same weights.
    let m = load_model(&run, Weights::Native, &Device::Cpu).unwrap();
    assert_eq!(
        (m.format, m.weights.as_str()),
        (ModelFormat::KilnRun, "f32")
    );
    let m = load_model(
        &run,
        Weights::Quantized(candle_core::quantized::GgmlDType::Q8_0),
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        m.weights.contains("Q8_0") && m.weights.contains("requantised"),
        "{}",
        m.weights
    );
}

#[test]
fn corrupt_checkpoint_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    write_checkpoint(&run, 1, 1, "data");
    let newest = write_checkpoint(&run, 2, 2, "data");
    let weights = newest.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();

    // One flipped byte: a CRC mismatch, reported for the newest checkpoint (never silently
    // replaced by the older one).
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&weights, &bad).unwrap();
    for p in [&run, &newest] {
        let e = resolve_kiln(p).unwrap_err();
        assert!(matches!(e, LoadError::Checkpoint { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&weights.display().to_string()) && msg.contains("CRC32"),
            "{msg}"
        );
    }
    let e = load_weights(&run, &Device::Cpu).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt"),
        "{e}"
    );

    // Truncated.
    std::fs::write(&weights, &good[..good.len() - 10]).unwrap();
    let e = verify_checkpoint(&newest).unwrap_err().to_string();
    assert!(
        e.contains(&weights.display().to_string()) && e.contains("truncated"),
        "{e}"
    );
    // Missing.
    std::fs::write(&weights, &good).unwrap();
    std::fs::remove_file(newest.join("optimizer.safetensors")).unwrap();
    let e = verify_checkpoint(&newest).unwrap_err().to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("missing"),
        "{e}"
    );
    // A state.json that is not one.
    std::fs::write(newest.join("state.json"), "{\"format_version\": 1").unwrap();
    let e = resolve_kiln(&run).unwrap_err().to_string();
    assert!(e.contains("state.json") && e.contains("corrupt"), "{e}");
}

#[test]
fn missing_config_checkpoints_or_tokenizer_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Weights with no config.toml next to them.
    let loose = d.join("loose");
    std::fs::create_dir(&loose).unwrap();
    let weights = loose.join("model.safetensors");
    Params::init(&cfg(), 1, &Device::Cpu, DType::F32)
        .unwrap()
        .save(&weights)
        .unwrap();
    let e = resolve_kiln(&weights).unwrap_err();
    assert!(matches!(e, LoadError::MissingConfig { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&weights.display().to_string())
            && msg.contains(&loose.join("config.toml").display().to_string()),
        "{msg}"
    );

    // With a config, the weights load; the tokenizer comes from the config's dataset.
    let data = d.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        loose.join("config.toml"),
        run_toml(&data.display().to_string()),
    )
    .unwrap();
    let r = resolve_kiln(&weights).unwrap();
    assert_eq!(
        (r.format, r.run.checkpoint.clone()),
        (ModelFormat::KilnWeights, None)
    );
    assert_eq!(r.tokenizer, None);
    let e = load_tokenizer(&weights).unwrap_err().to_string();
    assert!(
        e.contains("no tokenizer found")
            && e.contains(&data.join("tokenizer.json").display().to_string()),
        "{e}"
    );
    tokenizer_json(&data.join("tokenizer.json"));
    assert_eq!(
        load_tokenizer(&weights).unwrap().source,
        data.join("tokenizer.json")
    );

    // A config whose [model] is not a model names the file.
    std::fs::write(loose.join("config.toml"), "[model]\npreset = \"huge\"\n").unwrap();
    let e = resolve_kiln(&weights).unwrap_err().to_string();
    assert!(e.contains("config.toml") && e.contains("huge"), "{e}");

    // A run that has not saved a checkpoint yet.
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("config.toml"), run_toml("data")).unwrap();
    let e = resolve_kiln(&run).unwrap_err();
    assert!(matches!(e, LoadError::NoCheckpoint { .. }), "{e}");
    assert!(e.to_string().contains("run"), "{e}");

    // HF and GGUF are not kiln models.
    let gguf = d.join("m.gguf");
    std::fs::write(&gguf, b"GGUF....").unwrap();
    assert!(resolve_kiln(&gguf).is_err());
}

#[test]
fn init_compatibility_lists_every_differing_field() {
    let a = cfg();
    let mut b = a.clone();
    assert!(check_init_compatible(&a, &b, Path::new("w")).is_ok());
    b.max_seq_len = 16; // a shorter context is fine
    b.dropout = 0.1;
    assert!(check_init_compatible(&a, &b, Path::new("w")).is_ok());
    b.norm_eps = 1e-3;
    b.max_seq_len = 64;
    let e = check_init_compatible(&a, &b, Path::new("src/w"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("src/w") && e.contains("norm_eps") && e.contains("max_seq_len"),
        "{e}"
    );
}
