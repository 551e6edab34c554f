//! Batched generation on the real SmolLM2-135M-Instruct (fetched by
//! scripts/fetch-test-assets.sh): prompts of different lengths decoded as one ragged batch give
//! exactly what each gives alone (greedy), for the quantised and the dequantised model, with
//! per-token log-probabilities that are those of the model's distribution.

use candle_core::Device;
use kiln_data::ModelTokenizer;
use kiln_infer::{generate, generate_batch, GenerateOptions, Sampler, SamplingParams};
use kiln_model::gguf::GgufFile;
use kiln_model::{CausalLm, Llama, QLlama};

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "<|im_start|>user\nName three primary colours.<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):",
];

fn check(model: &dyn CausalLm, tok: &ModelTokenizer) {
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_strings: vec![],
        stop_tokens: tok.stop_ids.clone(),
        truncate_prompt: false,
    };
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tok.tokenizer.encode(p).unwrap())
        .collect();
    assert!(prompts
        .iter()
        .map(Vec::len)
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] != w[1]));
    let mut samplers: Vec<Sampler> = (0..prompts.len())
        .map(|_| Sampler::new(SamplingParams::greedy()).unwrap())
        .collect();
    let batch = generate_batch(model, &tok.tokenizer, &prompts, &mut samplers, &opts).unwrap();
    for (p, got) in prompts.iter().zip(&batch) {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut streamed = String::new();
        let alone = generate(model, &tok.tokenizer, p, &mut s, &opts, |t| {
            streamed.push_str(t)
        })
        .unwrap();
        assert_eq!(got.token_ids, alone.token_ids);
        assert_eq!(got.text, alone.text);
        assert_eq!(streamed, alone.text);
        assert_eq!(got.finish_reason, alone.finish_reason);
        assert_eq!(got.logprobs.len(), got.token_ids.len());
        for (a, b) in got.logprobs.iter().zip(&alone.logprobs) {
            assert!((a - b).abs() < 1e-3, "log-probs {a} vs {b}");
            // Greedy tokens are the most likely ones: log p in (-ln v, 0].
            assert!(*a <= 0.0 && *a > -(49152f32).ln());
        }
    }
}

#[test]
fn a_ragged_batch_generates_what_each_prompt_generates_alone() {
    let path = kiln_testutil::smollm2_gguf();
    let file = GgufFile::open(&path).unwrap();
    let cfg = file.config().unwrap();
    let tok = ModelTokenizer::load(&path).unwrap();
    check(&QLlama::from_gguf(&file, &cfg).unwrap(), &tok);
    let params = file.load_params(&cfg, &Device::Cpu).unwrap();
    check(&Llama::new(&cfg, &params).unwrap(), &tok);
}
