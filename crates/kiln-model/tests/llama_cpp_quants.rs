//! kiln's reading of blocks llama.cpp wrote: the first rows of one tensor of each GGML type in
//! SmolLM2-135M requantised by `llama-quantize` (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M), with the values
//! gguf-py dequantises them to (`tests/fixtures/llama_cpp_quants/make_blocks.py`). kiln's
//! dequantisation must equal gguf-py's, and each kernel path's matmul the dequantised one.

use kiln_model::qkernels::{RawKind, RawQ};
use kiln_model::{set_simd_choice, SimdChoice};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn kind(name: &str) -> Option<RawKind> {
    Some(match name {
        "Q4_0" => RawKind::Q4_0,
        "Q4_1" => RawKind::Q4_1,
        "Q5_0" => RawKind::Q5_0,
        "Q5_1" => RawKind::Q5_1,
        "Q8_0" => RawKind::Q8_0,
        "Q4_K" => RawKind::Q4K,
        "Q5_K" => RawKind::Q5K,
        "Q6_K" => RawKind::Q6K,
        _ => return None,
    })
}

#[test]
fn llama_cpp_blocks_dequantise_as_gguf_py_does_and_every_kernel_agrees() {
    let path = kiln_testutil::repo_root().join("tests/fixtures/llama_cpp_quants/blocks.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut checked = Vec::new();
    for b in fixture["blocks"].as_array().unwrap() {
        let name = b["type"].as_str().unwrap();
        let Some(kind) = kind(name) else {
            continue; // Q2_K, Q3_K: no kiln kernel, candle reads them
        };
        let (rows, cols) = (
            b["rows"].as_u64().unwrap() as usize,
            b["cols"].as_u64().unwrap() as usize,
        );
        let want: Vec<f32> = hex(b["values"].as_str().unwrap())
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let r = RawQ::new(kind, rows, cols, hex(b["data"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{name}: blocks of the wrong size"));
        let got = r.dequantize();
        // gguf-py computes in f32 with the same association as kiln's scalar decoder (the
        // reference `dequantize_row_*`): equal, except that numpy may fuse `d * q - m`.
        let row_max = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-6 * row_max,
            "{name} ({}): kiln's dequantisation differs from gguf-py's by {worst}",
            b["tensor"]
        );
        // 3 rows: the register kernels; 18: the decoded-panel prefill kernel (AVX-512).
        for (m, choice) in [
            (3, SimdChoice::Auto),
            (18, SimdChoice::Auto),
            (3, SimdChoice::Avx2),
            (3, SimdChoice::Scalar),
        ] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
                .collect();
            set_simd_choice(choice);
            let y = r.matmul(&x, m);
            set_simd_choice(SimdChoice::Auto);
            for i in 0..m {
                for j in 0..rows {
                    let row = &want[j * cols..(j + 1) * cols];
                    let xi = &x[i * cols..(i + 1) * cols];
                    let exact: f64 = row.iter().zip(xi).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let size: f64 = row.iter().zip(xi).map(|(a, b)| (a * b).abs() as f64).sum();
                    let g = y[i * rows + j] as f64;
                    assert!(
                        (g - exact).abs() <= 1e-5 * (1.0 + size),
                        "{name} {choice:?} ({i},{j}): {g} vs {exact}"
                    );
                }
            }
        }
        checked.push(name);
    }
    checked.sort();
    assert_eq!(
        checked,
        ["Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"],
        "the fixture should hold every type llama.cpp's K-quant mixtures use"
    );
}
