//! Chat templates and generation on pretrained models: the transformers-saved tiny fixture's
//! template and tokenizer against transformers' own output, and SmolLM2-135M-Instruct (fetched
//! by scripts/fetch-test-assets.sh) answering "What is the capital of France?".

use std::path::PathBuf;

use candle_core::Device;
use kiln_data::ModelTokenizer;
use kiln_infer::{
    generate, ChatTemplate, Conversation, GenerateOptions, Message, Sampler, SamplingParams,
};
use kiln_model::gguf::GgufFile;
use kiln_model::{CausalLm, Llama, QLlama};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> PathBuf {
    kiln_testutil::smollm2_gguf()
}

fn template(tok: &ModelTokenizer) -> ChatTemplate {
    ChatTemplate::new(
        tok.chat_template.as_deref().expect("a chat template"),
        tok.bos.as_ref().map(|b| b.1.as_str()),
        tok.eos.as_ref().map(|e| e.1.as_str()),
    )
    .unwrap()
}

#[test]
fn hf_tokenizer_and_template_match_transformers() {
    let dir = root().join("tests/fixtures/hf_tiny");
    let tok = ModelTokenizer::from_hf_dir(&dir.join("model")).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    for (text, ids) in reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["ids"].as_array().unwrap())
    {
        let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
        assert_eq!(tok.tokenizer.encode(text.as_str().unwrap()).unwrap(), want);
    }
    assert_eq!(tok.bos.as_ref().unwrap().1, "<|im_start|>");
    assert_eq!(tok.eos.as_ref().unwrap().1, "<|im_end|>");
    assert!(tok.stop_ids.contains(&2));
    let chat = template(&tok)
        .render(&[Message::new("user", "To be?")], true)
        .unwrap();
    assert_eq!(chat, reference["chat"].as_str().unwrap());
    let want: Vec<u32> = serde_json::from_value(reference["chat_ids"].clone()).unwrap();
    assert_eq!(tok.tokenizer.encode(&chat).unwrap(), want);
}

fn ask(model: &dyn CausalLm, tok: &ModelTokenizer, question: &str) -> String {
    let mut convo = Conversation::new(None);
    convo.turns.push(Message::new("user", question));
    let (prompt, dropped) = convo
        .prompt_ids(&template(tok), &tok.tokenizer, None, 512, 32)
        .unwrap();
    assert_eq!(dropped, 0);
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        stop_strings: vec![],
        stop_tokens: tok.stop_ids.clone(),
        truncate_prompt: false,
    };
    generate(model, &tok.tokenizer, &prompt, &mut sampler, &opts, |_| {})
        .unwrap()
        .text
}

#[test]
fn smollm2_chat_answers_paris() {
    let path = smollm2();
    let tok = ModelTokenizer::from_gguf(&path).unwrap();
    // The rendered prompt is SmolLM2's ChatML with its default system prompt.
    let mut convo = Conversation::new(None);
    convo
        .turns
        .push(Message::new("user", "What is the capital of France?"));
    let text = template(&tok).render(&convo.turns, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let f = GgufFile::open(&path).unwrap();
    let cfg = f.config().unwrap();
    let dense = Llama::new(&cfg, &f.load_params(&cfg, &Device::Cpu).unwrap()).unwrap();
    let answer = ask(&dense, &tok, "What is the capital of France?");
    assert!(
        answer.contains("Paris"),
        "dequantised model answered {answer:?}"
    );
    let q = QLlama::from_gguf(&f, &cfg).unwrap();
    let answer_q = ask(&q, &tok, "What is the capital of France?");
    assert!(
        answer_q.contains("Paris"),
        "quantised model answered {answer_q:?}"
    );
    eprintln!("dequantised: {answer:?}\nquantised:   {answer_q:?}");
}

#[test]
fn history_is_trimmed_to_the_context_window() {
    let tok = ModelTokenizer::from_gguf(&smollm2()).unwrap();
    let t = template(&tok);
    let mut convo = Conversation::new(Some("Be brief.".into()));
    for i in 0..20 {
        convo.turns.push(Message::new(
            "user",
            &format!("Question number {i} about something long enough"),
        ));
        convo.turns.push(Message::new(
            "assistant",
            &format!("Answer number {i}, also of some length"),
        ));
    }
    convo.turns.push(Message::new("user", "Last question?"));
    let (full, none) = convo
        .prompt_ids(&t, &tok.tokenizer, None, 100_000, 10)
        .unwrap();
    assert_eq!(none, 0);
    let (ids, dropped) = convo.prompt_ids(&t, &tok.tokenizer, None, 200, 50).unwrap();
    assert!(ids.len() <= 150 && ids.len() < full.len(), "{}", ids.len());
    assert!(
        dropped > 0 && dropped % 2 == 0,
        "whole exchanges are dropped: {dropped}"
    );
    let text = tok.tokenizer.decode(&ids).unwrap();
    assert!(
        text.contains("Be brief.") && text.contains("Last question?"),
        "{text}"
    );
    // A single turn that cannot fit is an error, not a silent truncation.
    let mut long = Conversation::new(None);
    long.turns.push(Message::new("user", &"word ".repeat(500)));
    assert!(long.prompt_ids(&t, &tok.tokenizer, None, 200, 50).is_err());
}
