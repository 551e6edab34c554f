//! The SplitMix64 finaliser and the training-window sampler against an independent Python
//! port of their published definitions: tests/fixtures/sampler/sampler_reference.json, made by
//! tests/fixtures/sampler/make_sampler_reference.py (standard library only).

use std::io::Write;
use std::path::PathBuf;

use kiln_data::{splitmix64, window_start, Dtype, TokenShard, WindowSampler};
use serde_json::Value;

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sampler/sampler_reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (make_sampler_reference.py)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(u64_of).collect()
}

/// A u16 shard holding 0, 1, 2, ..., so a token is its own position.
fn iota_shard(n: usize) -> (tempfile::TempDir, TokenShard) {
    assert!(n <= 1 << 16);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iota.bin");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..n {
        f.write_all(&(i as u16).to_le_bytes()).unwrap();
    }
    drop(f);
    let shard = TokenShard::open(&path, Dtype::U16).unwrap();
    (dir, shard)
}

#[test]
fn splitmix64_matches_the_python_port() {
    let r = reference();
    let cases = r["splitmix64"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let x = u64_of(&c["x"]);
        assert_eq!(splitmix64(x), u64_of(&c["out"]), "splitmix64({x:#x})");
    }
}

#[test]
fn window_starts_match_the_python_port() {
    let r = reference();
    for c in r["window_starts"].as_array().unwrap() {
        let (seed, n, ctx) = (
            u64_of(&c["seed"]),
            u64_of(&c["n_tokens"]),
            u64_of(&c["ctx"]),
        );
        let want = u64s(&c["starts"]);
        let got: Vec<u64> = (0..want.len() as u64)
            .map(|row| window_start(seed, row, n, ctx))
            .collect();
        assert_eq!(got, want, "seed {seed}, n_tokens {n}, ctx {ctx}");
    }
}

#[test]
fn sampler_batches_match_the_python_port() {
    let r = reference();
    for c in r["batches"].as_array().unwrap() {
        let seed = u64_of(&c["seed"]);
        let bs = u64_of(&c["batch_size"]) as usize;
        let ctx = u64_of(&c["ctx"]) as usize;
        let n = u64_of(&c["n_tokens"]) as usize;
        let (_dir, shard) = iota_shard(n);
        let mut sampler = WindowSampler::new(seed, bs, ctx);
        for (b, starts) in c["starts"].as_array().unwrap().iter().enumerate() {
            let starts = u64s(starts);
            assert_eq!(starts.len(), bs);
            let batch = sampler.next_batch(&shard).unwrap();
            assert_eq!(batch, sampler.batch_at(&shard, b as u64).unwrap());
            for (row, &start) in starts.iter().enumerate() {
                let inputs: Vec<u32> = (start..start + ctx as u64).map(|t| t as u32).collect();
                let targets: Vec<i64> = (start + 1..start + 1 + ctx as u64)
                    .map(|t| t as i64)
                    .collect();
                let span = row * ctx..(row + 1) * ctx;
                assert_eq!(
                    batch.inputs[span.clone()],
                    inputs[..],
                    "seed {seed}, batch {b}, row {row}: inputs"
                );
                assert_eq!(
                    batch.targets[span],
                    targets[..],
                    "seed {seed}, batch {b}, row {row}: targets"
                );
            }
        }
    }
}
