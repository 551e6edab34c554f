//! The tokenizer kiln builds from the SmolLM2 GGUF's vocabulary (`tokenizer.ggml.pre =
//! smollm`) against the references in tests/fixtures/smollm2/tokenizer_cases.json: llama.cpp
//! itself (llama-cpp-python), SmolLM2's own `tokenizer.json` pipeline, and transformers'
//! GGUF conversion (which ignores the pre-tokenizer name and so differs on some digits).
//!
//! The model is fetched by scripts/fetch-test-assets.sh into .cache/assets (or $KILN_ASSETS).

use std::path::PathBuf;

use kiln_data::ModelTokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> PathBuf {
    kiln_testutil::smollm2_gguf()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_tokenizer_matches_llama_cpp_and_round_trips() {
    let tok = ModelTokenizer::from_gguf(&smollm2()).unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2/tokenizer_cases.json"))
            .unwrap(),
    )
    .unwrap();
    let mut transformers_differs = 0;
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.tokenizer.encode(text).unwrap();
        let llama_cpp = ids(&case["llama_cpp"]);
        let original = ids(&case["smollm2_tokenizer_json"]);
        assert_eq!(got, llama_cpp, "{text:?}: kiln vs llama.cpp");
        assert_eq!(got, original, "{text:?}: kiln vs SmolLM2's tokenizer.json");
        if ids(&case["transformers_gguf"]) != got {
            transformers_differs += 1;
        }
        assert_eq!(
            tok.tokenizer.decode(&got).unwrap(),
            text,
            "{text:?}: decode"
        );
    }
    // The corner case where transformers' GGUF conversion splits differently (full-width and
    // Arabic-Indic digits are \p{N}, which smollm splits one by one).
    assert_eq!(transformers_differs, 1);
}

/// tests/fixtures/smollm2/token_ids.json: the special tokens and reference ids, read from the
/// GGUF by tests/fixtures/smollm2/make_token_ids.py (the `gguf` package and `tokenizers`).
fn token_ids() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/smollm2/token_ids.json")).unwrap(),
    )
    .unwrap()
}

fn special(v: &serde_json::Value) -> Option<(u32, String)> {
    Some((v[0].as_u64()? as u32, v[1].as_str()?.to_string()))
}

#[test]
fn special_tokens_template_and_bos() {
    let tok = ModelTokenizer::from_gguf(&smollm2()).unwrap();
    let want = token_ids();
    assert_eq!(
        tok.tokenizer.vocab_size() as u64,
        want["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(tok.bos, special(&want["bos"]));
    assert_eq!(tok.eos, special(&want["eos"]));
    assert_eq!(tok.add_bos, want["add_bos"].as_bool().unwrap());
    assert!(!tok.add_bos, "no BOS for plain text");
    assert_eq!(
        tok.encode_prompt("Hello").unwrap(),
        ids(&want["texts"]["Hello"])
    );
    assert_eq!(tok.stop_ids, ids(&want["stop_ids"]));
    let t = tok.chat_template.as_deref().unwrap();
    assert!(
        t.contains("<|im_start|>") && t.contains("add_generation_prompt"),
        "{t}"
    );
    // Control tokens are atomic.
    let (bos, _) = tok.bos.clone().unwrap();
    assert_eq!(
        tok.tokenizer.encode("<|im_start|>user").unwrap(),
        vec![bos, tok.tokenizer.token_id("user").unwrap()]
    );
    assert_eq!(
        tok.tokenizer.encode("<|im_start|>user").unwrap(),
        ids(&want["texts"]["<|im_start|>user"])
    );
}

#[test]
fn the_tokenizer_is_read_from_the_header_alone() {
    // Reading the tokenizer needs only the header (about 2 MB of strings), never the 98 MB of
    // tensors: the first 8 MiB of the file give the same tokenizer.
    let path = smollm2();
    let bytes = std::fs::read(&path).unwrap();
    let head = 8 << 20;
    assert!(
        head * 10 < bytes.len(),
        "the prefix is under a tenth of the file"
    );
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("head.gguf");
    std::fs::write(&cut, &bytes[..head]).unwrap();
    let full = ModelTokenizer::from_gguf(&path).unwrap();
    let t0 = std::time::Instant::now();
    let tok = ModelTokenizer::from_gguf(&cut).unwrap();
    eprintln!("tokenizer from the first 8 MiB in {:?}", t0.elapsed());
    assert_eq!(tok.tokenizer.vocab_size(), full.tokenizer.vocab_size());
    assert_eq!(
        (&tok.bos, &tok.eos, &tok.stop_ids, tok.add_bos),
        (&full.bos, &full.eos, &full.stop_ids, full.add_bos)
    );
    assert_eq!(tok.chat_template, full.chat_template);
    let text = "Hello world, 2024! Café 日本語 🦀";
    assert_eq!(
        tok.tokenizer.encode(text).unwrap(),
        full.tokenizer.encode(text).unwrap()
    );
}
