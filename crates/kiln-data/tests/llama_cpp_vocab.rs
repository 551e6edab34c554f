//! kiln's GGUF tokenizers against llama.cpp's own tokenizer test vectors: the
//! `models/ggml-vocab-*.gguf` vocabularies of the llama.cpp copy in the `llama-cpp-python==0.3.36`
//! sdist, each with `.inp` texts (separated by `__ggml_vocab_test__` lines) and `.out` ids, which
//! llama.cpp's `test-tokenizer-0` checks (the ids the model's own HF tokenizer gives, no special
//! tokens). `scripts/fetch-test-assets.sh` extracts them into `.cache/assets/llama-cpp-vocab/`.

use kiln_data::gguf_tokenizer::GgufVocab;

/// The vocabularies of the families kiln runs (and the pre-tokenizers they share).
const VOCABS: &[&str] = &[
    "qwen2",     // Qwen2/2.5/3: byte-level BPE, qwen2 pre-tokenizer
    "llama-bpe", // Llama 3: byte-level BPE, llama3 pre-tokenizer, ignore_merges
    "llama-spm", // Llama 2, Mistral: SentencePiece
    "phi-3",     // Phi-3: SentencePiece
    "gpt-2",     // GPT-2 rule
    "starcoder", // digits split first (SmolLM's rule)
    "refact",    // the same rule
];

fn cases(name: &str) -> (std::path::PathBuf, Vec<(String, Vec<u32>)>) {
    let gguf = kiln_testutil::test_asset(&format!("llama-cpp-vocab/ggml-vocab-{name}.gguf"));
    let read =
        |ext: &str| std::fs::read_to_string(gguf.with_extension(format!("gguf.{ext}"))).unwrap();
    let inp = read("inp");
    let out = read("out");
    let texts: Vec<String> = inp
        .split("\n__ggml_vocab_test__\n")
        .map(str::to_string)
        .collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    // The .inp ends with a separator, so the last split is empty and has no .out line.
    let texts = &texts[..ids.len()];
    (gguf.clone(), texts.iter().cloned().zip(ids).collect())
}

#[test]
fn gguf_tokenizers_match_llama_cpp_test_vectors() {
    let mut report = Vec::new();
    for name in VOCABS {
        let (path, cases) = cases(name);
        assert!(cases.len() >= 30, "{name}: only {} cases read", cases.len());
        let tok = GgufVocab::read(&path).unwrap().to_tokenizer().unwrap();
        let mut wrong = Vec::new();
        for (text, want) in &cases {
            let got = tok.encode(text).unwrap();
            if &got != want {
                wrong.push(format!("{text:?}: kiln {got:?}, llama.cpp {want:?}"));
            }
        }
        report.push(format!(
            "{name}: {}/{} equal",
            cases.len() - wrong.len(),
            cases.len()
        ));
        assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
    }
    eprintln!("{}", report.join("\n"));
}
