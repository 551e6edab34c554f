//! kiln's reading of blocks llama.cpp wrote: the first rows of one tensor of each GGML type in
//! SmolLM2-135M requantised by `llama-quantize` (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M), with the values
//! gguf-py dequantises them to (`tests/fixtures/llama_cpp_quants/make_blocks.py`). kiln's
//! dequantisation must equal gguf-py's, and each kernel path's matmul the dequantised one.

use kiln_kernels::qkernels::{RawKind, RawQ};
use kiln_kernels::Isa;

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
        "Q2_K" => RawKind::Q2K,
        "Q3_K" => RawKind::Q3K,
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
            continue; // a type kiln has no kernel for
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
        // 3 rows: the register kernels; 18: the decoded-panel prefill kernels; on every
        // level this CPU runs.
        let cases = Isa::all_available()
            .into_iter()
            .flat_map(|isa| [(3, isa), (18, isa)]);
        for (m, choice) in cases {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
                .collect();
            let y = r.matmul_isa(&x, m, choice);
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

/// The same weights quantised by kiln and by `llama-quantize` give the same bytes: the fixture's
/// rows came from SmolLM2's shipped Q4_1 (dequantised to f32 and requantised by llama.cpp), so
/// quantising those f32 rows here must reproduce them. Q6_K is kiln's port of llama.cpp's
/// quantiser; Q4_0, Q5_0, Q5_1 and Q8_0 are candle's. Q4_K and Q5_K (candle's, whose rounding
/// differs in rare ties) must dequantise within one level step of llama.cpp's.
#[test]
fn kiln_quantises_smollm2_rows_as_llama_quantize_does() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            kiln_testutil::repo_root().join("tests/fixtures/llama_cpp_quants/blocks.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let path = kiln_testutil::smollm2_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    for b in fixture["blocks"].as_array().unwrap() {
        let (name, tensor) = (b["type"].as_str().unwrap(), b["tensor"].as_str().unwrap());
        let (rows, cols) = (
            b["rows"].as_u64().unwrap() as usize,
            b["cols"].as_u64().unwrap() as usize,
        );
        // The source rows as stored (llama-quantize keeps the file's row order).
        let src = content
            .tensor(&mut file, tensor, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .narrow(0, 0, rows)
            .unwrap();
        let x: Vec<f32> = src.flatten_all().unwrap().to_vec1().unwrap();
        let want = hex(b["data"].as_str().unwrap());
        let dtype = match name {
            "Q4_0" => GgmlDType::Q4_0,
            "Q5_0" => GgmlDType::Q5_0,
            "Q5_1" => GgmlDType::Q5_1,
            "Q8_0" => GgmlDType::Q8_0,
            "Q4_K" => GgmlDType::Q4K,
            "Q5_K" => GgmlDType::Q5K,
            "Q6_K" => GgmlDType::Q6K,
            other => panic!("unexpected type {other}"),
        };
        let got = if dtype == GgmlDType::Q6K {
            kiln_model::quantize::quantize_q6k(&x)
        } else {
            let t = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
            QTensor::quantize(&t, dtype)
                .unwrap()
                .data()
                .unwrap()
                .to_vec()
        };
        if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K) {
            let k = kind(name).unwrap();
            let ours = RawQ::new(k, rows, cols, got).unwrap().dequantize();
            let theirs = RawQ::new(k, rows, cols, want).unwrap().dequantize();
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = ours
                .iter()
                .zip(&theirs)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(
                worst <= amax / 8.0,
                "{name}: {worst} (weights up to {amax})"
            );
        } else {
            let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
            assert_eq!(
                (same, got.len()),
                (want.len(), want.len()),
                "{name} ({tensor}): bytes differ from llama-quantize's"
            );
        }
    }
}
