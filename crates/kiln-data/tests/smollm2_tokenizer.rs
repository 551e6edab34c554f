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

#[test]
fn special_tokens_template_and_bos() {
    let tok = ModelTokenizer::from_gguf(&smollm2()).unwrap();
    assert_eq!(tok.tokenizer.vocab_size(), 49152);
    assert_eq!(tok.bos, Some((1, "<|im_start|>".to_string())));
    assert_eq!(tok.eos, Some((2, "<|im_end|>".to_string())));
    assert!(!tok.add_bos, "no BOS for plain text");
    assert_eq!(tok.encode_prompt("Hello").unwrap(), vec![19556]);
    assert_eq!(tok.stop_ids, vec![0, 2]);
    let t = tok.chat_template.as_deref().unwrap();
    assert!(
        t.contains("<|im_start|>") && t.contains("add_generation_prompt"),
        "{t}"
    );
    // Control tokens are atomic.
    assert_eq!(
        tok.tokenizer.encode("<|im_start|>user").unwrap(),
        vec![1, tok.tokenizer.token_id("user").unwrap()]
    );
}

#[test]
fn vocabulary_only_read_is_instant() {
    // Reading the tokenizer touches only the header (about 1.5 MB of strings), never the
    // 98 MB of tensors.
    let t0 = std::time::Instant::now();
    let tok = ModelTokenizer::from_gguf(&smollm2()).unwrap();
    assert!(tok.tokenizer.vocab_size() > 0);
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
}
