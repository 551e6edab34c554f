//! The `kiln` binary on pretrained models: `tokenize`, `generate` and `chat` on the real
//! SmolLM2-135M-Instruct GGUF (fetched by scripts/fetch-test-assets.sh), and `export`, `eval`,
//! `data prepare` and `pretrain --init-from` on the transformers-saved tiny HF fixture.

use std::path::PathBuf;
use std::process::Output;

mod common;
use common::kiln_in;
use kiln_testutil::repo_root as root;

fn smollm2() -> PathBuf {
    kiln_testutil::smollm2_gguf()
}

fn hf_tiny() -> PathBuf {
    root().join("tests/fixtures/hf_tiny/model")
}

fn ok(o: &Output) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "kiln failed\nstdout: {out}\nstderr: {err}"
    );
    out
}

fn kiln(args: &[&str]) -> String {
    ok(&kiln_in(args, &root(), None))
}

#[test]
fn tokenize_reads_only_the_vocabulary_and_round_trips() {
    let m = smollm2();
    let m = m.to_str().unwrap();
    let out = kiln(&["tokenize", "--model", m, "--text", "Hello world, 2024!"]);
    let ids: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    // The reference ids (SmolLM2's tokenizer rebuilt with `tokenizers`, checked against
    // transformers): tests/fixtures/smollm2/token_ids.json, from make_token_ids.py.
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2/token_ids.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u32> =
        serde_json::from_value(reference["texts"]["Hello world, 2024!"].clone()).unwrap();
    assert_eq!(ids, want);
    let out = kiln(&[
        "tokenize",
        "--model",
        m,
        "--decode",
        "--json",
        "--text",
        &serde_json::to_string(&ids).unwrap(),
    ]);
    assert_eq!(
        serde_json::from_str::<String>(out.trim()).unwrap(),
        "Hello world, 2024!"
    );
    // A vocabulary-only GGUF (no tensors) is enough.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(m).unwrap();
    let vocab_only = dir.path().join("vocab.gguf");
    std::fs::write(&vocab_only, vocab_only_gguf(&bytes)).unwrap();
    let out = kiln(&[
        "tokenize",
        "--model",
        vocab_only.to_str().unwrap(),
        "--text",
        "Hello world, 2024!",
    ]);
    assert_eq!(serde_json::from_str::<Vec<u32>>(out.trim()).unwrap(), ids);
}

/// The same GGUF with its tensor table and data cut off (tensor count 0).
fn vocab_only_gguf(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes[..24].to_vec();
    out[8..16].copy_from_slice(&0u64.to_le_bytes());
    let n_kv = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    // Walk the metadata to find where it ends.
    let mut pos = 24usize;
    fn skip(b: &[u8], pos: &mut usize, ty: u32) {
        let rd = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => *pos += 1,
            2 | 3 => *pos += 2,
            4..=6 => *pos += 4,
            10..=12 => *pos += 8,
            8 => *pos += 8 + rd(*pos),
            9 => {
                let et = u32::from_le_bytes(b[*pos..*pos + 4].try_into().unwrap());
                let n = rd(*pos + 4);
                *pos += 12;
                for _ in 0..n {
                    skip(b, pos, et);
                }
            }
            _ => panic!("bad type"),
        }
    }
    for _ in 0..n_kv {
        let klen = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
        pos += 8 + klen;
        let ty = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap());
        pos += 4;
        skip(bytes, &mut pos, ty);
    }
    out.extend_from_slice(&bytes[24..pos]);
    out
}

#[test]
fn generate_and_chat_on_smollm2_name_paris() {
    let m = smollm2();
    let m = m.to_str().unwrap();
    let out = kiln(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ]);
    assert!(out.starts_with(" Paris"), "{out:?}");
    // Non-interactive chat: one user turn per stdin line, one reply per turn.
    let o = kiln_in(
        &[
            "chat",
            "--model",
            m,
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
        ],
        &root(),
        Some("What is the capital of France?\nAnd of Italy?\n"),
    );
    let out = ok(&o);
    let replies: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(replies[0].contains("Paris"), "{out:?}");
    assert!(
        out.contains("Rome"),
        "the second turn sees the first: {out:?}"
    );
    // --system replaces the template's default system prompt; --dequantize runs f32 weights.
    let o = kiln_in(
        &[
            "chat",
            "--model",
            m,
            "--dequantize",
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
            "--system",
            "You are a helpful assistant.",
        ],
        &root(),
        Some("What is the capital of France?\n"),
    );
    assert!(ok(&o).contains("Paris"));
}

#[test]
fn hf_export_eval_prepare_and_init_from() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = hf_tiny();
    let src_s = src.to_str().unwrap();
    let text = "To be, or not to be";
    let ids = kiln(&["tokenize", "--model", src_s, "--text", text]);

    // HF -> GGUF (F32) and HF -> HF (bf16 is what the fixture holds, so lossless): the same
    // tokenizer, and the same greedy continuation as the source.
    let gguf = d.join("tiny.gguf");
    kiln(&[
        "export",
        "--model",
        src_s,
        "--format",
        "gguf",
        "--type",
        "f32",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    let hf = d.join("hf");
    kiln(&[
        "export",
        "--model",
        src_s,
        "--format",
        "hf",
        "--type",
        "bf16",
        "--out",
        hf.to_str().unwrap(),
    ]);
    for p in [&gguf, &hf] {
        assert_eq!(
            kiln(&["tokenize", "--model", p.to_str().unwrap(), "--text", text]),
            ids,
            "{}",
            p.display()
        );
    }
    let gen = |m: &str| {
        kiln(&[
            "generate",
            "--model",
            m,
            "--prompt",
            text,
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ])
    };
    let want = gen(src_s);
    assert_eq!(gen(gguf.to_str().unwrap()), want);
    assert_eq!(gen(hf.to_str().unwrap()), want);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f}");
    }

    // A dataset tokenized with the model's tokenizer, eval of the HF model on it, and a short
    // continued pretraining from it.
    let data = d.join("data");
    kiln(&[
        "data",
        "prepare",
        "--input",
        root()
            .join("data/shakespeare/tempest_gut.txt")
            .to_str()
            .unwrap(),
        "--tokenizer",
        src_s,
        "--out",
        data.to_str().unwrap(),
    ]);
    let out = kiln(&[
        "eval",
        "--model",
        src_s,
        "--data",
        data.to_str().unwrap(),
        "--batches",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 1.0, "{v}");
    let cfg = format!(
        r#"
[model]
vocab_size = 300
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
head_dim = 24
ffn_dim = 96
max_seq_len = 64
rope_theta = 50000.0
norm_eps = 1e-6
rope_scaling = {{ rope_type = "llama3", factor = 4.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_position_embeddings = 16 }}
[data]
dataset = "{}"
[train]
steps = 3
batch_size = 2
seq_len = 32
log_every = 1
eval_every = 3
eval_batches = 1
peak_flops = 1e10
run_dir = "run"
"#,
        data.display()
    );
    std::fs::write(d.join("run.toml"), cfg).unwrap();
    let o = kiln_in(
        &["pretrain", "--config", "run.toml", "--init-from", src_s],
        d,
        None,
    );
    let out = ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("initialising from"), "{out}{err}");
    let metrics = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let l = first["loss"].as_f64().unwrap();
    assert!(
        (l - loss).abs() < 1.0,
        "continued pretraining starts near the model's loss: {l} vs {loss}"
    );

    // A run config that does not match the weights is refused, naming the fields.
    let bad = std::fs::read_to_string(d.join("run.toml"))
        .unwrap()
        .replace("norm_eps = 1e-6", "norm_eps = 1e-5");
    std::fs::write(d.join("bad.toml"), bad).unwrap();
    let o = kiln_in(
        &[
            "pretrain",
            "--config",
            "bad.toml",
            "--init-from",
            src_s,
            "--set",
            "train.run_dir=\"run2\"",
        ],
        d,
        None,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("norm_eps"), "{err}");
}

/// `kiln generate` (greedy, from "To be, or not to be") on `model`: (stdout, stderr).
fn generate_greedy(model: &std::path::Path, max_new_tokens: &str) -> (String, String) {
    let o = kiln_in(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "To be, or not to be",
            "--temperature",
            "0",
            "--max-new-tokens",
            max_new_tokens,
        ],
        &root(),
        None,
    );
    let out = ok(&o);
    (out, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn generate_prints_the_continuation_exactly_and_stops_at_every_declared_stop_id() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("model");
    std::fs::create_dir(&src).unwrap();
    for e in std::fs::read_dir(hf_tiny()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
    }
    let src_s = src.to_str().unwrap();

    // stdout is the continuation byte for byte: one token is exactly that token's text, with
    // no newline after it.
    let (first, err) = generate_greedy(&src, "1");
    assert!(err.contains("MaxTokens"), "{err}");
    let ids: Vec<u32> =
        serde_json::from_str(kiln(&["tokenize", "--model", src_s, "--text", &first]).trim())
            .unwrap();
    assert_eq!(ids.len(), 1, "one token: {first:?} -> {ids:?}");
    let decoded = kiln(&[
        "tokenize",
        "--model",
        src_s,
        "--decode",
        "--json",
        "--text",
        &serde_json::to_string(&ids).unwrap(),
    ]);
    assert_eq!(
        serde_json::from_str::<String>(decoded.trim()).unwrap(),
        first
    );
    let (longer, _) = generate_greedy(&src, "8");
    assert!(
        longer.starts_with(&first) && longer.len() > first.len(),
        "{longer:?}"
    );

    // A model that declares that token an end token too (as Llama 3 lists several EOS ids in
    // generation_config.json) stops right before it.
    let stop = ids[0];
    std::fs::write(
        src.join("generation_config.json"),
        serde_json::json!({"bos_token_id": 1, "eos_token_id": [2, stop]}).to_string(),
    )
    .unwrap();
    let (out, err) = generate_greedy(&src, "8");
    assert_eq!(out, "", "{err}");
    assert!(err.contains("StopToken"), "{err}");

    // The HF export writes the same stop set, and the GGUF export keeps it (as EOS + EOT):
    // both stop there too.
    let hf = d.join("hf");
    let gguf = d.join("m.gguf");
    kiln(&[
        "export",
        "--model",
        src_s,
        "--format",
        "hf",
        "--out",
        hf.to_str().unwrap(),
    ]);
    kiln(&[
        "export",
        "--model",
        src_s,
        "--format",
        "gguf",
        "--type",
        "f32",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    let gen_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("generation_config.json")).unwrap())
            .unwrap();
    let declared: Vec<u32> = serde_json::from_value(gen_cfg["eos_token_id"].clone()).unwrap();
    assert!(
        declared.contains(&2) && declared.contains(&stop),
        "{gen_cfg}"
    );
    for m in [&hf, &gguf] {
        let (out, err) = generate_greedy(m, "8");
        assert_eq!(out, "", "{}: {err}", m.display());
        assert!(err.contains("StopToken"), "{}: {err}", m.display());
    }
}

#[test]
fn generated_special_tokens_are_never_printed() {
    // After a finished user turn SmolLM2 opens the assistant's turn itself: it generates
    // <|im_start|> (a special token, but not an end token), then "assistant\n" and the answer.
    let m = smollm2();
    let gen = |n: &str| {
        let o = kiln_in(
            &[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
                "--temperature",
                "0",
                "--max-new-tokens",
                n,
            ],
            &root(),
            None,
        );
        (ok(&o), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // The first token is generated (and is no end token) but prints nothing.
    let (out, err) = gen("1");
    assert_eq!(out, "");
    assert!(
        err.contains("new_tokens=1") && err.contains("MaxTokens"),
        "{err}"
    );
    let (out, _) = gen("12");
    assert!(out.starts_with("assistant\n"), "{out:?}");
    assert!(!out.contains("<|"), "{out:?}");
}

/// `generate --prompt-file`: every line decoded in one batch, JSONL on stdout in file order,
/// each `text` byte-identical to what `generate --prompt` prints alone with the same flags.
#[test]
fn generate_prompt_file_is_jsonl_equal_to_each_prompt_alone() {
    let m = smollm2();
    let m = m.to_str().unwrap();
    let prompts = [
        "The capital of France is",
        "<|im_start|>user What is 2+2? Answer with one number.<|im_end|><|im_start|>assistant",
        "Once upon a time",
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, prompts.join("\n") + "\n").unwrap();
    let flags = ["--temperature", "0", "--max-new-tokens", "16"];
    let mut args = vec![
        "generate",
        "--model",
        m,
        "--prompt-file",
        file.to_str().unwrap(),
    ];
    args.extend(flags);
    let out = kiln(&args);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect();
    assert_eq!(rows.len(), prompts.len());
    for (row, p) in rows.iter().zip(prompts) {
        assert_eq!(row["prompt"], p);
        let mut single = vec!["generate", "--model", m, "--prompt", p];
        single.extend(flags);
        assert_eq!(row["text"].as_str().unwrap(), kiln(&single), "prompt {p:?}");
        let tokens = row["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 16);
        assert_eq!(row["logprobs"].as_array().unwrap().len(), tokens.len());
        let finish = row["finish_reason"].as_str().unwrap();
        assert!(finish == "stop" || finish == "length", "{finish}");
        assert_eq!(finish == "length", tokens.len() == 16);
    }
}

#[test]
fn a_missing_or_empty_prompt_file_is_a_clear_error() {
    let m = smollm2();
    let m = m.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let missing = dir.path().join("absent.txt");
    for (file, want) in [(&empty, "no prompts"), (&missing, "absent.txt")] {
        let o = kiln_in(
            &[
                "generate",
                "--model",
                m,
                "--prompt-file",
                file.to_str().unwrap(),
            ],
            &root(),
            None,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{err}");
    }
}

/// `export --type q4_k_m` of SmolLM2 writes llama.cpp's mixture (Q4_K where rows are whole
/// super-blocks, Q6_K for the `use_more_bits` layers' ffn_down, the 32-weight fallbacks
/// elsewhere), and `bench quant-accuracy` on it finds kiln's kernels equal to the dequantised
/// model while 8-bit activations are not.
#[test]
fn q4_k_m_export_runs_on_kilns_kernels_with_the_dequantised_models_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4_k_m.gguf");
    let m = smollm2();
    kiln(&[
        "export",
        "--model",
        m.to_str().unwrap(),
        "--format",
        "gguf",
        "--type",
        "q4_k_m",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = kiln(&[
        "bench",
        "quant-accuracy",
        "--model",
        out.to_str().unwrap(),
        "--tokens",
        "64",
        "--window",
        "33",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let weights = r["weights"].as_str().unwrap();
    assert!(
        weights.contains(r#""Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15"#),
        "{weights}"
    );
    assert_eq!(r["positions"], 64);
    assert_eq!(r["kiln"]["top1_agreement"], 1.0, "{r}");
    assert!(r["kiln"]["mean_kl"].as_f64().unwrap() < 1e-6, "{r}");
    let q8 = r["candle_q8_activations"]["mean_kl"].as_f64().unwrap();
    assert!(
        q8 > 1e-4,
        "8-bit activations should move the predictions: {r}"
    );
    // kiln's own 8-bit activations (`--activations q8`) move them too, about as far as
    // candle's (measured here: top-1 92%, mean KL 0.0055 against candle's 89%, 0.0099).
    let kiln_q8 = &r["kiln_q8_activations"];
    let kl = kiln_q8["mean_kl"].as_f64().unwrap();
    assert!(kl > 1e-5 && kl < 0.02, "{r}");
    assert!(kiln_q8["top1_agreement"].as_f64().unwrap() >= 0.85, "{r}");
    // And decoding with them (the integer-dot kernels: fewer than 16 rows per matmul) keeps
    // the greedy start while its log-probs move.
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\n").unwrap();
    let generate = |extra: &[&str]| -> serde_json::Value {
        let mut args = extra.to_vec();
        args.extend([
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt-file",
            prompts.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ]);
        serde_json::from_str(kiln(&args).lines().next().unwrap()).unwrap()
    };
    let (exact, rounded) = (generate(&[]), generate(&["--activations", "q8"]));
    assert_eq!(
        exact["tokens"][0], rounded["tokens"][0],
        "{exact} {rounded}"
    );
    let (a, b) = (
        exact["logprobs"][0].as_f64().unwrap(),
        rounded["logprobs"][0].as_f64().unwrap(),
    );
    assert!(a != b && (a - b).abs() < 0.1, "first log-prob {a} vs {b}");

    // Bad input: a model that is not a GGUF, a text too short for the positions asked for.
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Too short.").unwrap();
    let hf = hf_tiny();
    for (model, extra, want) in [
        (hf.to_str().unwrap(), vec![], "is not a GGUF file"),
        (
            out.to_str().unwrap(),
            vec!["--text", short.to_str().unwrap()],
            "windows of 256 need",
        ),
    ] {
        let mut args = vec!["bench", "quant-accuracy", "--model", model];
        args.extend(extra);
        let o = kiln_in(&args, &root(), None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}

/// An HF checkpoint in bf16 runs as stored (its matrices read from the mapped file): the
/// process's own peak memory stays below the f32 weights' size, and greedy decoding equals
/// the f32 copy's (`--dequantize`), token for token, with the same log-probs up to
/// summation order (bf16 widens to f32 exactly, so the weights are the same numbers).
#[test]
fn a_bf16_checkpoint_runs_as_stored_below_its_f32_size() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf-bf16");
    kiln(&[
        "export",
        "--model",
        smollm2().to_str().unwrap(),
        "--format",
        "hf",
        "--type",
        "bf16",
        "--out",
        hf.to_str().unwrap(),
    ]);
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\nOnce upon a time\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            hf.to_str().unwrap(),
            "--prompt-file",
            prompts.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        let o = kiln_in(&args, dir.path(), None);
        let stdout = ok(&o);
        let log = String::from_utf8_lossy(&o.stderr).to_string();
        let rows: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let peak: f64 = log
            .split("peak_rss_mib=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no peak_rss_mib in the log: {log}"));
        (rows, peak, log)
    };
    let (mapped, mapped_peak, log) = run(&[]);
    assert!(
        log.contains("BF16") && log.contains("memory-mapped"),
        "{log}"
    );
    let (dense, dense_peak, _) = run(&["--dequantize"]);
    let params = 134_515_008f64;
    let f32_mib = params * 4.0 / (1 << 20) as f64;
    assert!(
        mapped_peak < f32_mib,
        "bf16 as stored peaked at {mapped_peak} MiB, the f32 weights alone are {f32_mib:.0} MiB"
    );
    assert!(
        dense_peak > f32_mib,
        "the f32 copy peaked at {dense_peak} MiB"
    );
    for (m, d) in mapped.iter().zip(&dense) {
        assert_eq!(m["tokens"], d["tokens"], "{}", m["prompt"]);
        let lp = |r: &serde_json::Value| -> Vec<f64> {
            r["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        for (a, b) in lp(m).iter().zip(lp(d)) {
            assert!((a - b).abs() < 1e-3, "{}: log-prob {a} vs {b}", m["prompt"]);
        }
    }
}
