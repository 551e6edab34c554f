//! EmbeddingGemma-300m (`scripts/fetch-embeddinggemma.sh`): kiln's sentence embeddings equal
//! sentence-transformers' (`tests/fixtures/embeddinggemma/make_reference.py`), for short texts
//! and for one longer than the bidirectional sliding window (256 tokens each side).

use kiln_model::sentence::SentenceEncoder;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
    long_text: LongText,
}

#[derive(Deserialize)]
struct LongText {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn embeddings_equal_sentence_transformers() {
    let dir = kiln_testutil::test_asset("embeddinggemma-300m/config.json")
        .parent()
        .unwrap()
        .to_path_buf();
    let path = kiln_testutil::repo_root().join("tests/fixtures/embeddinggemma/reference.json");
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = kiln_load::load_tokenizer(&dir).unwrap();
    let enc = SentenceEncoder::load(&dir).unwrap();
    assert_eq!(enc.dim(), 768);
    let mut cases: Vec<(&str, &[u32], &[f32])> = r
        .texts
        .iter()
        .zip(&r.ids)
        .zip(&r.embeddings)
        .map(|((t, i), e)| (t.as_str(), i.as_slice(), e.as_slice()))
        .collect();
    cases.push((&r.long_text.text, &r.long_text.ids, &r.long_text.embedding));
    for (text, ids, want) in cases {
        let got_ids = tok.tokenizer.encode_with_special_tokens(text).unwrap();
        assert_eq!(got_ids, ids, "token ids of {text:.40}");
        let got = enc.embed(ids).unwrap();
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let cos = cosine(&got, want);
        assert!(
            worst < 1e-4 && cos >= 0.9999,
            "{text:.40}: max difference {worst}, cosine {cos}"
        );
    }
}
