//! Assistant-only labels against transformers: tests/fixtures/sft/smollm2_masks.json (made by
//! make_sft_masks.py) holds, for single-turn, system-prompt, multi-turn and code/unicode
//! conversations, the ids of SmolLM2's real chat template and transformers'
//! `return_assistant_tokens_mask` (from a copy of the template with `{% generation %}` around
//! each assistant reply and its `<|im_end|>`). kiln must find exactly those tokens, from the
//! original template (turn by turn) and from the tagged one (generation tags), and the packed
//! rows must carry exactly those targets.

use std::path::PathBuf;

use kiln_chat::{ChatFormat, Conversation};
use kiln_data::ModelTokenizer;
use kiln_infer::Message;
use kiln_sft::pack;
use kiln_train::Truncation;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sft")
        .join(name)
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture("smollm2_masks.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn conversation(case: &Value) -> Conversation {
    let mut system = None;
    let mut turns = Vec::new();
    for m in case["messages"].as_array().unwrap() {
        let (role, content) = (m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
        if role == "system" {
            system = Some(content.to_string());
        } else {
            turns.push(Message::new(role, content));
        }
    }
    Conversation {
        system,
        turns,
        tools: None,
        origin: case["name"].as_str().unwrap().to_string(),
    }
}

fn smollm2_tokenizer() -> ModelTokenizer {
    ModelTokenizer::from_gguf(&kiln_testutil::smollm2_gguf()).unwrap()
}

fn check_all(format: &ChatFormat, what: &str) {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let ex = format.encode(&conversation(&case), false).unwrap();
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let mask: Vec<bool> = case["assistant_masks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() == 1)
            .collect();
        assert_eq!(ex.ids, ids, "{what} {name}: token ids");
        assert_eq!(ex.labels, mask, "{what} {name}: assistant labels");
        assert!(ex.n_labels() > 0);
    }
}

#[test]
fn labels_match_transformers_turn_by_turn_with_the_real_template() {
    let tok = smollm2_tokenizer();
    let real = std::fs::read_to_string(fixture("smollm2_template.jinja")).unwrap();
    assert_eq!(tok.chat_template.as_deref(), Some(real.as_str()));
    check_all(&ChatFormat::new(tok, None).unwrap(), "turn by turn");
}

#[test]
fn labels_match_transformers_from_generation_tags() {
    let tagged = std::fs::read_to_string(fixture("smollm2_template_generation.jinja")).unwrap();
    let format = ChatFormat::new(smollm2_tokenizer(), Some(tagged)).unwrap();
    assert!(format.template.has_generation_tags());
    check_all(&format, "generation tags");
}

#[test]
fn truncated_and_packed_rows_target_exactly_the_labelled_tokens() {
    let format = ChatFormat::new(smollm2_tokenizer(), None).unwrap();
    let examples: Vec<_> = cases()
        .iter()
        .map(|c| format.encode(&conversation(c), false).unwrap())
        .collect();
    // Long enough for all: every labelled token (after position 0) is a target once.
    let longest = examples.iter().map(|e| e.ids.len()).max().unwrap();
    let packed = pack(&examples, longest + 60, true, Truncation::KeepStart);
    assert!(
        packed.rows.len() < examples.len(),
        "packing put nothing together"
    );
    let want: usize = examples.iter().map(|e| e.n_labels()).sum();
    assert_eq!(packed.n_label_tokens, want);
    let got: usize = packed.rows.iter().map(|r| r.n_targets()).sum();
    assert_eq!(got, want);
    for r in &packed.rows {
        for j in 0..r.len() {
            if r.targets[j] != -100 {
                // A target is the next token of the same segment.
                assert!(j + 1 < r.len() && r.segments[j + 1] == r.segments[j]);
                assert_eq!(r.targets[j], i64::from(r.tokens[j + 1]));
            }
        }
    }
    // Truncated to 40 tokens (keep the start): the multi-turn case keeps its first reply's
    // labels only; the code case (first reply starts at 36) keeps 4; none is dropped.
    let short = pack(&examples, 40, false, Truncation::KeepStart);
    assert_eq!(
        short.truncated,
        examples.iter().filter(|e| e.ids.len() > 40).count()
    );
    for (r, e) in short.rows.iter().zip(&examples) {
        let want = e.labels[1..40.min(e.ids.len())]
            .iter()
            .filter(|&&l| l)
            .count();
        assert_eq!(r.n_targets(), want);
    }
    // At 30 tokens no reply starts inside the window: every example is dropped and counted.
    let none = pack(&examples, 30, true, Truncation::KeepStart);
    assert_eq!(
        (none.rows.len(), none.dropped_no_labels),
        (0, examples.len())
    );
}

#[test]
fn train_on_prompt_labels_every_token_but_the_first() {
    let format = ChatFormat::new(smollm2_tokenizer(), None).unwrap();
    let ex = format.encode(&conversation(&cases()[0]), true).unwrap();
    assert!(!ex.labels[0] && ex.labels[1..].iter().all(|&l| l));
}

#[test]
fn the_plain_template_ends_assistant_turns_with_eos() {
    // A kiln-style tokenizer without a chat template gets kiln's plain template.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let opts = kiln_data::BpeTrainOptions {
        vocab_size: 400,
        ..Default::default()
    };
    kiln_data::train_bpe(&[kiln_testutil::tempest_corpus()], &opts)
        .unwrap()
        .save(&path)
        .unwrap();
    let tok = ModelTokenizer::from_tokenizer_json(&path).unwrap();
    assert!(tok.chat_template.is_none());
    let eos = tok.eos.clone().unwrap();
    let format = ChatFormat::new(tok, None).unwrap();
    let convo = Conversation {
        system: None,
        turns: vec![
            Message::new("user", "Say hi."),
            Message::new("assistant", "Hi there."),
            Message::new("user", "Again."),
            Message::new("assistant", "Hi."),
        ],
        tools: None,
        origin: "test".into(),
    };
    let text = format.template.render(&convo.messages(), false).unwrap();
    assert_eq!(
        text,
        format!(
            "<|system|>\nYou are a helpful assistant.\n<|user|>\nSay hi.\n<|assistant|>\nHi there.{e}\n<|user|>\nAgain.\n<|assistant|>\nHi.{e}\n",
            e = eos.1
        )
    );
    let ex = format.encode(&convo, false).unwrap();
    let labelled: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l)
        .map(|(&i, _)| i)
        .collect();
    let decoded = format.tokenizer.tokenizer.decode(&labelled).unwrap();
    assert_eq!(decoded, format!("Hi there.{e}Hi.{e}", e = eos.1));
    let prompt = format
        .template
        .render(&convo.messages()[..1], true)
        .unwrap();
    assert!(prompt.ends_with("<|assistant|>\n"), "{prompt:?}");
}

/// Tool-calling records (LLaMA-Factory's ShareGPT `function_call`/`observation` with `tools` as
/// JSON text, and OpenAI's `tool_calls`/`tool` messages with parallel calls) render with
/// Qwen2.5's template exactly as transformers renders the same conversation
/// (tests/fixtures/sft/make_toolcall_golden.py); the calls are labelled, the tool results not.
/// A template that cannot render tools is refused rather than dropping them.
#[test]
fn tool_calling_records_render_as_transformers_does() {
    let records = kiln_chat::read_records(&[fixture("toolcall_records.json")], false).unwrap();
    let golden: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixture("toolcall_golden.json")).unwrap())
            .unwrap();
    assert_eq!(records.conversations.len(), golden.len());
    let qwen = ModelTokenizer::from_gguf(&kiln_testutil::test_asset(
        "qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ))
    .unwrap();
    let format = ChatFormat::new(qwen, None).unwrap();
    for (convo, want) in records.conversations.iter().zip(&golden) {
        let text = format
            .template
            .render_with_tools(&convo.messages(), convo.tools.as_ref(), false, false)
            .unwrap();
        assert_eq!(&text, want, "{}", convo.origin);
        let ex = format.encode(convo, false).unwrap();
        let labelled: Vec<u32> = ex
            .ids
            .iter()
            .zip(&ex.labels)
            .filter(|(_, &l)| l)
            .map(|(&id, _)| id)
            .collect();
        let labelled = format.tokenizer.tokenizer.decode(&labelled).unwrap();
        assert!(
            labelled.contains("<tool_call>") && labelled.contains("\"arguments\""),
            "the call is trained on: {labelled}"
        );
        assert!(
            !labelled.contains("tool_response") && !labelled.contains("# Tools"),
            "results and definitions are not: {labelled}"
        );
    }

    let smollm2 = ChatFormat::new(smollm2_tokenizer(), None).unwrap();
    let err = smollm2
        .encode(&records.conversations[0], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("never renders `tools`") && err.contains("--template"),
        "{err}"
    );
}
