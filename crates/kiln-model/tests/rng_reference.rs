//! kiln's seedable generator (`SplitMix64`: init, dropout and sampling draws) against an
//! independent Python port of SplitMix64: tests/fixtures/sampler/sampler_reference.json, made
//! by tests/fixtures/sampler/make_sampler_reference.py (standard library only).

use std::path::PathBuf;

use kiln_model::SplitMix64;
use serde_json::Value;

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not a u64: {x}")))
        .collect()
}

#[test]
fn generator_streams_match_the_python_port() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sampler/sampler_reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (make_sampler_reference.py)", path.display()));
    let r: Value = serde_json::from_str(&text).unwrap();
    let gens = r["generator"].as_array().unwrap();
    assert!(!gens.is_empty());
    for g in gens {
        let seed = g["seed"].as_u64().unwrap();
        let mut rng = SplitMix64::new(seed);
        let want = u64s(&g["u64"]);
        let got: Vec<u64> = want.iter().map(|_| rng.next_u64()).collect();
        assert_eq!(got, want, "seed {seed}: next_u64");
        // Each mantissa m is exact in f64, and so is m / 2^53.
        let want: Vec<f64> = u64s(&g["f64_mantissa"])
            .into_iter()
            .map(|m| m as f64 / (1u64 << 53) as f64)
            .collect();
        let got: Vec<f64> = want.iter().map(|_| rng.next_f64()).collect();
        assert_eq!(got, want, "seed {seed}: next_f64");
    }
}
