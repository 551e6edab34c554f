//! Benchmark scoring against transformers (tests/fixtures/make_scores.py), shared-prefix
//! scoring against scoring alone, the metrics, the task readers and their errors.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_data::ModelTokenizer;
use kiln_eval::{
    encode_request, evaluate, load_task, load_task_file, read_request_file, score_alone, Doc,
    EvalError, Request, Scorer, TaskKind,
};
use kiln_model::Llama;
use serde_json::Value;

fn hf_tiny() -> PathBuf {
    kiln_testutil::repo_root().join("tests/fixtures/hf_tiny/model")
}

fn tiny() -> (Llama, ModelTokenizer) {
    let w = kiln_load::load_weights(&hf_tiny(), &candle_core::Device::Cpu).unwrap();
    let model = Llama::new(&w.config, &w.params).unwrap();
    (model, kiln_load::load_tokenizer(&hf_tiny()).unwrap())
}

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scores.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn request(case: &Value) -> Request {
    Request {
        context: case["context"].as_str().unwrap().into(),
        continuation: case["continuation"].as_str().unwrap().into(),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokens_and_scores_match_transformers() {
    let (model, tok) = tiny();
    let fx = fixture();
    assert_eq!(
        fx["window"].as_u64().unwrap() as usize,
        model.config().max_seq_len
    );
    let scorer = Scorer::new(&model, &tok);
    let cases = fx["cases"].as_array().unwrap();
    let (mut truncated, mut greedy) = (0, 0);
    for case in cases {
        let what = format!("{:?} + {:?}", case["context"], case["continuation"]);
        let e = encode_request(&tok, &request(case), scorer.window()).unwrap();
        assert_eq!(e.input, ids(&case["input"]), "{what}: input tokens");
        assert_eq!(
            e.targets,
            ids(&case["targets"]),
            "{what}: continuation tokens"
        );
        assert_eq!(e.truncated, case["truncated"].as_bool().unwrap(), "{what}");
        let want = case["logprob"].as_f64().unwrap();
        for got in [
            scorer.score_doc(std::slice::from_ref(&e)).unwrap()[0],
            score_alone(&model, &e).unwrap(),
        ] {
            assert!(
                (got.logprob - want).abs() < 1e-4,
                "{what}: {} vs transformers {want}",
                got.logprob
            );
            assert_eq!(
                got.greedy,
                case["greedy"].as_bool().unwrap(),
                "{what}: greedy"
            );
            assert_eq!(got.n_tokens, e.targets.len());
        }
        truncated += usize::from(e.truncated);
        greedy += usize::from(case["greedy"].as_bool().unwrap());
    }
    // The fixture covers both branches of each.
    assert!(truncated > 0 && truncated < cases.len());
    assert!(greedy > 0);
}

#[test]
fn shared_prefix_scoring_equals_scoring_each_request_alone() {
    let (model, tok) = tiny();
    let scorer = Scorer::new(&model, &tok);
    let cases: Vec<Request> = fixture()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(request)
        .collect();
    // Groups as documents present them: one context and several continuations (HellaSwag),
    // contexts that differ only at their end (WinoGrande), and everything at once (ragged,
    // some truncated, an empty context).
    let groups: Vec<Vec<Request>> = vec![
        cases[2..5].to_vec(),
        cases[6..8].to_vec(),
        vec![cases[0].clone(), cases[9].clone(), cases[10].clone()],
        cases.clone(),
    ];
    for group in groups {
        let enc = scorer.encode(&group).unwrap();
        let shared = scorer.score_doc(&enc).unwrap();
        for (e, s) in enc.iter().zip(&shared) {
            let alone = score_alone(&model, e).unwrap();
            assert!(
                (s.logprob - alone.logprob).abs() < 1e-4,
                "{} vs {}",
                s.logprob,
                alone.logprob
            );
            assert_eq!(s.greedy, alone.greedy);
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn accuracy_and_normalised_accuracy_of_a_task_file() {
    let (model, tok) = tiny();
    let scorer = Scorer::new(&model, &tok);
    let dir = tempfile::tempdir().unwrap();
    // Two documents, each choice written exactly as it is scored.
    let text = [
        r#"{"context": "Question: Who is the prince?\nAnswer:", "choices": [" Hamlet", " Claudius"], "gold": 0}"#,
        r#"{"context": "To be, or not to be", "choices": [" that is the question", " a"], "gold": 1}"#,
    ]
    .join("\n");
    let file = write(dir.path(), "mine.jsonl", &text);
    let task = load_task_file(&file, None).unwrap();
    assert_eq!(task.kind, TaskKind::MultipleChoice);
    let mut seen = Vec::new();
    let r = evaluate(&scorer, &task, &mut |d| seen.push(d)).unwrap();
    assert_eq!(seen, [1, 2]);
    assert_eq!(r.n, 2);
    // By hand from each choice's score.
    let (mut acc, mut norm) = (0.0, 0.0);
    for doc in &task.docs {
        let s: Vec<f64> = doc
            .choices
            .iter()
            .map(|c| {
                score_alone(&model, &encode_request(&tok, c, 64).unwrap())
                    .unwrap()
                    .logprob
            })
            .collect();
        let len = |c: &Request| c.continuation.trim_start_matches(' ').chars().count() as f64;
        let best = if s[1] > s[0] { 1 } else { 0 };
        let best_norm = if s[1] / len(&doc.choices[1]) > s[0] / len(&doc.choices[0]) {
            1
        } else {
            0
        };
        acc += f64::from(u8::from(best == doc.gold.unwrap())) / 2.0;
        norm += f64::from(u8::from(best_norm == doc.gold.unwrap())) / 2.0;
    }
    assert_eq!(r.acc, acc);
    assert_eq!(r.acc_norm, Some(norm));
    assert!(r.acc_stderr.is_finite());
    assert_eq!(r.truncated, 0);
}

#[test]
fn olmo_request_files_group_by_document_and_skip_unconditioned_copies() {
    let dir = tempfile::tempdir().unwrap();
    let line = |doc: u64, idx: usize, ctx: &str, cont: &str, label: usize| {
        serde_json::json!({"request_type": "loglikelihood", "doc": {}, "request": {"context": ctx, "continuation": cont},
            "idx": idx, "task_name": "t", "doc_id": doc, "native_id": doc, "label": label})
        .to_string()
    };
    let lines = [
        line(1, 1, "Q1", " b", 1),
        line(1, 0, "Q1", " a", 1),
        line(0, 0, "Q0", " x", 0),
        line(1_000_000, 0, "Answer:", " x", 0),
        line(0, 1, "Q0", " y", 0),
        line(2, 0, "Q2", " z", 0),
        line(2, 1, "Q2", " w", 0),
    ];
    let p = dir.path().join("requests.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&p).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(lines.join("\n").as_bytes()).unwrap();
    gz.finish().unwrap();
    let docs = read_request_file(&p, Some(2), true).unwrap();
    assert_eq!(
        docs,
        vec![
            Doc {
                doc_id: 0,
                choices: vec![
                    Request {
                        context: "Q0".into(),
                        continuation: " x".into()
                    },
                    Request {
                        context: "Q0".into(),
                        continuation: " y".into()
                    },
                ],
                gold: Some(0)
            },
            Doc {
                doc_id: 1,
                choices: vec![
                    Request {
                        context: "Q1".into(),
                        continuation: " a".into()
                    },
                    Request {
                        context: "Q1".into(),
                        continuation: " b".into()
                    },
                ],
                gold: Some(1)
            },
        ]
    );
    assert_eq!(read_request_file(&p, None, true).unwrap().len(), 3);
}

#[test]
fn mmlu_prompts_follow_lm_evaluation_harness() {
    let dir = tempfile::tempdir().unwrap();
    let q = |question: &str, answer: usize| {
        serde_json::json!({"question": question, "subject": "abstract_algebra",
            "choices": ["0", "4", "2", "6"], "answer": answer})
        .to_string()
    };
    write(
        dir.path(),
        "mmlu/abstract_algebra/dev.jsonl",
        &[q("Shot one?", 2), q("Shot two?", 0)].join("\n"),
    );
    write(
        dir.path(),
        "mmlu/abstract_algebra/test.jsonl",
        &[q(" Find it. ", 1), q("Next?", 3)].join("\n"),
    );
    let task = load_task(dir.path(), "mmlu", 0, Some(1)).unwrap();
    assert_eq!(task.docs.len(), 1, "--limit applies per subject");
    let doc = &task.docs[0];
    assert_eq!(
        doc.choices[0].context,
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n\
         Find it.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    );
    let conts: Vec<&str> = doc
        .choices
        .iter()
        .map(|c| c.continuation.as_str())
        .collect();
    assert_eq!(conts, [" A", " B", " C", " D"]);
    assert_eq!(doc.gold, Some(1));
    // Five shots asked, two in the dev split: a clear error.
    let e = load_task(dir.path(), "mmlu", 5, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dev split has 2"), "{e}");
    write(
        dir.path(),
        "mmlu/abstract_algebra/dev.jsonl",
        &(0..5)
            .map(|i| q(&format!("Shot {i}?"), i % 4))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let task = load_task(dir.path(), "mmlu", 5, None).unwrap();
    let ctx = &task.docs[1].choices[0].context;
    assert!(
        ctx.contains("Shot 0?\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer: A\n\nShot 1?"),
        "{ctx}"
    );
    assert!(
        ctx.ends_with(
            "Shot 4?\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer: A\n\nNext?\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
        ),
        "{ctx}"
    );
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_task(dir.path(), "hellaswagg", 0, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown task \"hellaswagg\"")
            && e.contains("arc_challenge")
            && e.contains("mmlu"),
        "{e}"
    );
    let e = load_task(dir.path(), "piqa", 0, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scripts/fetch-eval-data.sh"), "{e}");
    let e = load_task(dir.path(), "lambada", 5, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zero-shot"), "{e}");
    let f = write(
        dir.path(),
        "bad.jsonl",
        "{\"context\": \"a\", \"choices\": [\" b\"], \"gold\": 0}\n{\"context\": \"a\", \"gold\": 0}\n",
    );
    match load_task_file(&f, None).unwrap_err() {
        EvalError::Record { line, msg, .. } => {
            // Line 2 lacks `choices`: it is read as OLMo's form, which mixes the two forms.
            assert_eq!(line, 2, "{msg}");
        }
        e => panic!("{e}"),
    }
    let f = write(
        dir.path(),
        "bad2.jsonl",
        &[
            r#"{"request": {"context": "a", "continuation": " b"}, "doc_id": 0, "idx": 0, "label": 0}"#,
            r#"{"request": {"context": "a"}, "doc_id": 0, "idx": 1, "label": 0}"#,
        ]
        .join("\n"),
    );
    let e = load_task_file(&f, None).unwrap_err().to_string();
    assert!(
        e.contains("line 2") && e.contains("`request.continuation`"),
        "{e}"
    );
    let f = write(
        dir.path(),
        "bad3.jsonl",
        r#"{"context": "a", "choices": [" b", " c"], "gold": 2}"#,
    );
    let e = load_task_file(&f, None).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("2 choices"), "{e}");
}

#[test]
fn a_context_longer_than_the_window_is_cut_from_the_left_and_counted() {
    let (model, tok) = tiny();
    let scorer = Scorer::new(&model, &tok);
    let dir = tempfile::tempdir().unwrap();
    let long = "To be, or not to be, that is the question. ".repeat(20);
    let line =
        serde_json::json!({"context": long, "choices": [" Whether", " Or"], "gold": 0}).to_string();
    let task = load_task_file(&write(dir.path(), "long.jsonl", &line), None).unwrap();
    let r = evaluate(&scorer, &task, &mut |_| {}).unwrap();
    assert_eq!(r.truncated, 2);
    let e = encode_request(&tok, &task.docs[0].choices[0], 64).unwrap();
    assert_eq!(e.input.len(), 64);
    // A continuation longer than the window: scored on its last 64 tokens, never an error.
    let req = Request {
        context: "To be".into(),
        continuation: long.clone(),
    };
    let e = encode_request(&tok, &req, 64).unwrap();
    let whole = tok.tokenizer.encode(&format!("To be{long}")).unwrap();
    assert!(e.truncated);
    assert_eq!((e.input.len(), e.targets.len()), (64, 64));
    assert_eq!(e.targets[..], whole[whole.len() - 64..]);
    assert_eq!(e.input[..], whole[whole.len() - 65..whole.len() - 1]);
    let s = scorer.score_doc(std::slice::from_ref(&e)).unwrap()[0];
    assert_eq!(s.n_tokens, 64);
    assert!((s.logprob - score_alone(&model, &e).unwrap().logprob).abs() < 1e-4);
}
