//! End-to-end check on the bundled Shakespeare corpus (`data/shakespeare`): train a BPE,
//! prepare a dataset, open it and sample from it. The durations are printed, not asserted
//! (timing belongs in benchmarks).

use std::path::PathBuf;
use std::time::Instant;

use kiln_data::{
    eval_batches, prepare_dataset, train_bpe, BpeTrainOptions, Dataset, IncrementalDecoder,
    PrepareOptions, WindowSampler,
};

fn corpus_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("bundled corpus {} missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_gut.txt"))
        .collect();
    files.sort();
    files
}

#[test]
fn shakespeare_end_to_end() {
    let files = corpus_files();
    assert_eq!(files.len(), 42);

    let t0 = Instant::now();
    let tok = train_bpe(
        &files,
        &BpeTrainOptions {
            vocab_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let train_secs = t0.elapsed().as_secs_f64();
    assert_eq!(tok.vocab_size(), 4096);
    assert_eq!(tok.eos_id(), Some(0));

    // Same corpus, same options -> same tokenizer (parallel word counting must not leak
    // into merge order).
    let again = train_bpe(
        &files,
        &BpeTrainOptions {
            vocab_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        again.inner().to_string(false).unwrap(),
        tok.inner().to_string(false).unwrap()
    );

    let line = "O Romeo, Romeo! wherefore art thou Romeo?";
    let ids = tok.encode(line).unwrap();
    assert!(ids.len() < 20, "{} tokens", ids.len());
    assert_eq!(tok.decode(&ids).unwrap(), line);

    let out = tempfile::tempdir().unwrap();
    let t1 = Instant::now();
    let meta = prepare_dataset(&files, &tok, out.path(), &PrepareOptions::default()).unwrap();
    let prep_secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "train_bpe {train_secs:.2}s, prepare {prep_secs:.2}s: {} train / {} val tokens",
        meta.n_train_tokens, meta.n_val_tokens
    );
    assert_eq!(meta.n_documents, 42);
    // Roughly 5 % of the blocks land in validation.
    let frac = meta.n_val_tokens as f64 / (meta.n_train_tokens + meta.n_val_tokens) as f64;
    assert!((0.02..0.09).contains(&frac), "val fraction {frac}");

    let ds = Dataset::open(out.path()).unwrap();
    let mut sampler = WindowSampler::new(1337, 4, 64);
    let batch = sampler.next_batch(&ds.train).unwrap();
    assert_eq!(batch.inputs.len(), 256);
    let mut dec = IncrementalDecoder::new();
    let mut text = String::new();
    for &id in &batch.inputs[..64] {
        text.push_str(&dec.push(&tok, id).unwrap());
    }
    text.push_str(&dec.finish(&tok).unwrap());
    assert_eq!(text, tok.decode_skip_special(&batch.inputs[..64]).unwrap());
    assert!(eval_batches(&ds.val, 4, 64, 10).count() == 10);
}
