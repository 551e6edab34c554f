//! The model core: heads with finite-difference gradient checks, packed == unpacked, LoRA
//! (B = 0 is the base model, only A and B get gradients, unmerged == merged), and batched
//! ragged decoding equal to each row alone, for dense and quantised weights.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use kiln_model::{
    last_token_rows, CausalLm, Grads, KvCache, Llama, LoraSpec, ModelConfig, Params, ScalarHead,
    TokenBatch,
};
use kiln_testutil::{assert_close, uniform_vec, Tol};

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        dim: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_dim: Some(64),
        max_seq_len: 32,
        ..ModelConfig::tiny()
    }
}

fn ids(n: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 13 + 3) % vocab) as u32)
        .collect()
}

fn params(cfg: &ModelConfig, dtype: DType) -> Params {
    Params::init(cfg, 11, &Device::Cpu, dtype).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Central differences of `loss` at a few elements of parameter `name`, compared with the
/// analytic gradient `grads[name]`. Returns the worst symmetric relative error.
fn fd_check(
    params: &Params,
    name: &str,
    grads: &Grads,
    loss: &dyn Fn() -> f64,
    elements: &[usize],
) -> f64 {
    let g = grads
        .get(name)
        .unwrap_or_else(|| panic!("no gradient for {name}"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let value = params.tensor(name).unwrap();
    let orig = value.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let set = |v: &[f64]| {
        params
            .set(
                name,
                &Tensor::from_slice(v, value.shape(), &Device::Cpu).unwrap(),
            )
            .unwrap()
    };
    kiln_testutil::finite_difference_error(&orig, &g, &set, loss, elements)
}

const CHECKED: [&str; 6] = [
    "tok_embeddings.weight",
    "layers.0.attention.wq.weight",
    "layers.0.attention.wk.weight",
    "layers.1.feed_forward.w2.weight",
    "layers.1.attention_norm.weight",
    "norm.weight",
];

#[test]
fn lm_head_cross_entropy_gradients_match_finite_differences() {
    let cfg = cfg();
    let p = params(&cfg, DType::F64);
    let x = Tensor::from_vec(ids(20, 1, 64), (2, 10), &Device::Cpu).unwrap();
    let mut tv: Vec<i64> = ids(20, 2, 64).into_iter().map(i64::from).collect();
    tv[3] = -100;
    let targets = Tensor::from_vec(tv, 20, &Device::Cpu).unwrap();
    let model = Llama::new(&cfg, &p).unwrap();
    let mut grads = model.grads(&p).unwrap();
    model
        .forward_backward(&x, &targets, 0.5, &mut grads, None)
        .unwrap();
    let loss = || {
        let m = Llama::new(&cfg, &p).unwrap();
        let (s, _) = kiln_model::loss_sum(&m.forward_train(&x, None).unwrap(), &targets).unwrap();
        0.5 * scalar(&s)
    };
    for name in CHECKED {
        let e = fd_check(&p, name, &grads, &loss, &[0, 5, 77, 301]);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
}

#[test]
fn token_logprob_head_gradients_match_finite_differences() {
    let cfg = cfg();
    let p = params(&cfg, DType::F64);
    let x = Tensor::from_vec(ids(16, 3, 64), (2, 8), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(ids(16, 4, 64), 16, &Device::Cpu).unwrap();
    let weights = Tensor::from_vec(uniform_vec(9, 16), 16, &Device::Cpu).unwrap();
    let model = Llama::new(&cfg, &p).unwrap();
    let (hidden, trunk) = model
        .forward_hidden(&TokenBatch::new(x.clone()), None)
        .unwrap();
    let mut grads = model.grads(&p).unwrap();
    let dh = model
        .token_logprobs_backward(&hidden, &targets, &weights, 0.7, &mut grads)
        .unwrap();
    model.backward_hidden(trunk, &dh, &mut grads).unwrap();
    let loss = || {
        let m = Llama::new(&cfg, &p).unwrap();
        let (h, _) = m.forward_hidden(&TokenBatch::new(x.clone()), None).unwrap();
        scalar(
            &(m.token_logprobs(&h, &targets, 0.7).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap(),
        )
    };
    for name in CHECKED {
        let e = fd_check(&p, name, &grads, &loss, &[1, 9, 123]);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
    // The log-probabilities are those of the LM logits.
    let lp = model.token_logprobs(&hidden, &targets, 0.7).unwrap();
    let logits = (model.lm_logits(&hidden).unwrap() / 0.7).unwrap();
    let want = kiln_model::logprobs_of(&logits, &targets).unwrap();
    assert_close("logprobs", &lp, &want, Tol::OP_F32);
    let total: f64 = scalar(&lp.exp().unwrap().sum_all().unwrap());
    assert!(total > 0.0 && total < 16.0);
    // The entropy is -sum_v p_v log p_v of the same tempered distribution.
    let (_, entropy) = model
        .token_logprobs_entropy(&hidden, &targets, 0.7)
        .unwrap();
    let entropy: Vec<f64> = entropy.to_vec1().unwrap();
    let vocab = cfg.vocab_size;
    for (row, &got) in entropy.iter().enumerate() {
        let h = hidden.narrow(0, row, 1).unwrap();
        let all = Tensor::arange(0u32, vocab as u32, &Device::Cpu).unwrap();
        let lp_all: Vec<f64> = model
            .token_logprobs(&h.repeat((vocab, 1)).unwrap(), &all, 0.7)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: f64 = -lp_all.iter().map(|l| l.exp() * l).sum::<f64>();
        assert!((got - want).abs() < 1e-9, "row {row}: {got} vs {want}");
    }
}

#[test]
fn scalar_head_gradients_match_finite_differences() {
    let cfg = cfg();
    let p = params(&cfg, DType::F64);
    let x = Tensor::from_vec(ids(16, 5, 64), (2, 8), &Device::Cpu).unwrap();
    // Right-padded rows of 5 and 8 real tokens: the head reads positions 4 and 15.
    let rows = last_token_rows(&[5, 8], 8).unwrap();
    assert_eq!(rows, vec![4, 15]);
    let head = ScalarHead::init(cfg.dim, 3, &Device::Cpu).unwrap();
    let w = head
        .linear
        .weight
        .dequantize()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let head = ScalarHead::from_weight(w);
    let dscore = Tensor::new(&[0.7f64, -1.3], &Device::Cpu).unwrap();
    let model = Llama::new(&cfg, &p).unwrap();
    let (hidden, trunk) = model
        .forward_hidden(&TokenBatch::new(x.clone()), None)
        .unwrap();
    // The model's gradient layout plus the head's weight.
    let mut layout = model.grad_layout(&p).unwrap();
    layout
        .push(format!("{}.weight", ScalarHead::NAME), vec![1, cfg.dim])
        .unwrap();
    let mut grads = Grads::new(Arc::new(layout), DType::F64, &Device::Cpu).unwrap();
    let dh = head.backward(&hidden, &rows, &dscore, &mut grads).unwrap();
    model.backward_hidden(trunk, &dh, &mut grads).unwrap();
    let loss = || {
        let m = Llama::new(&cfg, &p).unwrap();
        let (h, _) = m.forward_hidden(&TokenBatch::new(x.clone()), None).unwrap();
        scalar(
            &(head.forward(&h, &rows).unwrap() * &dscore)
                .unwrap()
                .sum_all()
                .unwrap(),
        )
    };
    for name in CHECKED {
        let e = fd_check(&p, name, &grads, &loss, &[2, 40, 200]);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
    // The head's own weight, by finite differences on a copy.
    let g = grads["score.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let (h, _) = model.forward_hidden(&TokenBatch::new(x), None).unwrap();
    let w0 = head
        .linear
        .weight
        .dequantize()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for i in [0, 7, 31] {
        let at = |delta: f64| {
            let mut w = w0.clone();
            w[i] += delta;
            let hd =
                ScalarHead::from_weight(Tensor::from_vec(w, (1, cfg.dim), &Device::Cpu).unwrap());
            scalar(
                &(hd.forward(&h, &rows).unwrap() * &dscore)
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
        };
        let num = (at(1e-5) - at(-1e-5)) / 2e-5;
        assert!(
            (num - g[i]).abs() < 1e-7 * (1.0 + num.abs()),
            "score.weight[{i}]: {num} vs {}",
            g[i]
        );
    }
}

/// Three documents packed in one row (segment ids, positions restarting per document) give
/// the same per-token losses and the same gradients as the documents run one by one.
#[test]
fn a_packed_row_equals_its_documents_run_alone() {
    let cfg = cfg();
    let p = params(&cfg, DType::F64);
    let model = Llama::new(&cfg, &p).unwrap();
    let docs: Vec<Vec<u32>> = vec![ids(7, 1, 64), ids(5, 2, 64), ids(9, 3, 64)];
    // Targets: next token within the document, -100 at each document's end.
    let targets_of = |d: &[u32]| -> Vec<i64> {
        let mut t: Vec<i64> = d[1..].iter().map(|&x| x as i64).collect();
        t.push(-100);
        t
    };
    let packed_ids: Vec<u32> = docs.concat();
    let n = packed_ids.len();
    let segs: Vec<u32> = docs
        .iter()
        .enumerate()
        .flat_map(|(i, d)| std::iter::repeat_n(i as u32, d.len()))
        .collect();
    let packed_targets: Vec<i64> = docs.iter().flat_map(|d| targets_of(d)).collect();
    let batch = TokenBatch::packed(
        Tensor::from_vec(packed_ids, (1, n), &Device::Cpu).unwrap(),
        &[segs],
    )
    .unwrap();
    let packed_logits = model.forward_batch(&batch, None).unwrap(); // (n, v)
    let mut packed_grads = model.grads(&p).unwrap();
    let tgt = Tensor::from_vec(packed_targets, n, &Device::Cpu).unwrap();
    let packed_loss = model
        .forward_backward_batch(&batch, &tgt, 1.0, &mut packed_grads, None)
        .unwrap();

    let mut alone_grads = model.grads(&p).unwrap();
    let mut alone_loss = 0.0;
    let mut offset = 0;
    for d in &docs {
        let x = Tensor::from_vec(d.clone(), (1, d.len()), &Device::Cpu).unwrap();
        let logits = model.forward_train(&x, None).unwrap();
        assert_close(
            "per-token logits",
            &packed_logits.narrow(0, offset, d.len()).unwrap(),
            &logits,
            Tol::OP_F32,
        );
        let t = Tensor::from_vec(targets_of(d), d.len(), &Device::Cpu).unwrap();
        alone_loss += model
            .forward_backward(&x, &t, 1.0, &mut alone_grads, None)
            .unwrap();
        offset += d.len();
    }
    assert!((packed_loss - alone_loss).abs() < 1e-9 * alone_loss.abs());
    assert_eq!(packed_grads.len(), alone_grads.len());
    for (name, g) in alone_grads.iter() {
        assert_close(name, &packed_grads[name], g, Tol::OP_F32);
    }
}

fn lora_spec() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["wq", "wv", "w2"].map(String::from).to_vec(),
        rslora: false,
    }
}

#[test]
fn lora_with_zero_b_is_the_base_model_and_only_adapters_get_gradients() {
    let cfg = cfg();
    let base = params(&cfg, DType::F64);
    let mut p = params(&cfg, DType::F64);
    p.add_lora(&cfg, &lora_spec(), 5).unwrap();
    assert_eq!(p.adapter_names().len(), 2 * 3 * cfg.n_layers);
    let x = Tensor::from_vec(ids(12, 6, 64), (1, 12), &Device::Cpu).unwrap();
    let want = Llama::new(&cfg, &base).unwrap().logits(&x).unwrap();
    let with = Llama::new_with_lora(&cfg, &p, &lora_spec()).unwrap();
    assert_close("B = 0", &with.logits(&x).unwrap(), &want, Tol::OP_F32);

    let targets = Tensor::from_vec(
        ids(12, 7, 64)
            .into_iter()
            .map(i64::from)
            .collect::<Vec<_>>(),
        12,
        &Device::Cpu,
    )
    .unwrap();
    // The gradient buffer has entries for the adapters alone: frozen weights get none.
    let mut grads = with.grads(&p).unwrap();
    let mut adapters = p.adapter_names();
    adapters.sort();
    let mut slots: Vec<&str> = grads
        .layout()
        .entries()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    slots.sort();
    assert_eq!(slots, adapters, "only A and B have gradient entries");
    let adapter_elems: usize = adapters
        .iter()
        .map(|n| p.tensor(n).unwrap().elem_count())
        .sum();
    assert_eq!(grads.layout().total(), adapter_elems);
    with.forward_backward(&x, &targets, 1.0, &mut grads, None)
        .unwrap();
    let mut names: Vec<&str> = grads.names().collect();
    names.sort();
    assert_eq!(names, adapters, "only A and B train");
    // With B = 0 the gradient of A is zero and that of B is not.
    let norm = |n: &str| scalar(&grads[n].sqr().unwrap().sum_all().unwrap());
    assert_eq!(norm("layers.0.attention.wq.lora_A.weight"), 0.0);
    assert!(norm("layers.0.attention.wq.lora_B.weight") > 0.0);
}

#[test]
fn lora_gradients_match_finite_differences_and_merging_changes_nothing() {
    let cfg = cfg();
    let mut p = params(&cfg, DType::F64);
    p.add_lora(&cfg, &lora_spec(), 5).unwrap();
    // Non-zero B so both factors matter.
    for name in p.adapter_names() {
        if name.contains("lora_B") {
            let v = p.tensor(&name).unwrap();
            let r =
                Tensor::from_vec(uniform_vec(3, v.elem_count()), v.shape(), &Device::Cpu).unwrap();
            p.set(&name, &(r * 0.1).unwrap()).unwrap();
        }
    }
    let x = Tensor::from_vec(ids(10, 8, 64), (1, 10), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(
        ids(10, 9, 64)
            .into_iter()
            .map(i64::from)
            .collect::<Vec<_>>(),
        10,
        &Device::Cpu,
    )
    .unwrap();
    let model = Llama::new_with_lora(&cfg, &p, &lora_spec()).unwrap();
    let mut grads = model.grads(&p).unwrap();
    model
        .forward_backward(&x, &targets, 1.0, &mut grads, None)
        .unwrap();
    let loss = || {
        let m = Llama::new_with_lora(&cfg, &p, &lora_spec()).unwrap();
        let (s, _) = kiln_model::loss_sum(&m.forward_train(&x, None).unwrap(), &targets).unwrap();
        scalar(&s)
    };
    for name in [
        "layers.0.attention.wq.lora_A.weight",
        "layers.0.attention.wq.lora_B.weight",
        "layers.1.feed_forward.w2.lora_A.weight",
        "layers.1.attention.wv.lora_B.weight",
    ] {
        let e = fd_check(&p, name, &grads, &loss, &[0, 3, 50]);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
    // Merged weights W + s B A give the same logits as the unmerged adapter.
    let merged = model.merge_lora().unwrap();
    assert_close(
        "merged == unmerged",
        &merged.logits(&x).unwrap(),
        &model.logits(&x).unwrap(),
        Tol::OP_F32,
    );
}

/// Prompts of different lengths, prefilled row by row, then decoded together one token per
/// row per step, give the logits each prompt gets alone.
fn check_ragged_batch(model: &Llama, tol: Tol) {
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<u32>> = vec![ids(3, 1, vocab), ids(9, 2, vocab), ids(6, 3, vocab)];
    let steps = 5;
    // Each prompt alone: the greedy continuation and the logits at every step.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut cache = KvCache::new();
        let mut seq = p.clone();
        let mut rows = Vec::new();
        let mut logits = model
            .forward_decode(
                &Tensor::from_slice(p, (1, p.len()), &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        for _ in 0..steps {
            rows.push(logits.clone());
            let next = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
            seq.push(next);
            logits = model
                .forward_decode(
                    &Tensor::from_slice(&[next], (1, 1), &Device::Cpu).unwrap(),
                    &mut cache,
                )
                .unwrap();
        }
        alone.push((seq, rows));
    }
    // All rows together.
    let mut cache = KvCache::new();
    let mut last: Vec<Tensor> = prompts
        .iter()
        .enumerate()
        .map(|(r, p)| model.prefill_row(r, p, &mut cache).unwrap())
        .collect();
    for (r, p) in prompts.iter().enumerate() {
        assert_eq!(cache.row_len(r), p.len());
    }
    let rows: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..steps {
        let mut next = Vec::new();
        for r in 0..prompts.len() {
            assert_close(
                &format!("row {r} step {step}"),
                &last[r],
                &alone[r].1[step],
                tol,
            );
            next.push(alone[r].0[prompts[r].len() + step]);
        }
        let out = model.decode_step(&rows, &next, &mut cache).unwrap(); // (3, v)
        last = (0..prompts.len())
            .map(|r| out.narrow(0, r, 1).unwrap())
            .collect();
    }
}

#[test]
fn a_ragged_batch_decodes_like_each_prompt_alone_dense() {
    let cfg = cfg();
    let p = params(&cfg, DType::F32);
    check_ragged_batch(&Llama::new(&cfg, &p).unwrap(), Tol::OP_F32);
}

#[test]
fn a_ragged_batch_decodes_like_each_prompt_alone_quantised() {
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K] {
        let mut c = cfg();
        if dtype == GgmlDType::Q4K {
            // K-quants need rows of 256 values.
            c.dim = 256;
            c.ffn_dim = Some(256);
        }
        let p = params(&c, DType::F32);
        let m = Llama::from_params(&c, &p, dtype).unwrap();
        check_ragged_batch(&m, Tol::OP_F32);
    }
}

/// The decode fast path computes what the shared tensor path computes, position by position.
#[test]
fn the_decode_fast_path_equals_the_full_forward() {
    let cfg = cfg();
    let p = params(&cfg, DType::F32);
    for m in [
        Llama::new(&cfg, &p).unwrap(),
        Llama::from_params(&cfg, &p, GgmlDType::Q8_0).unwrap(),
    ] {
        let x = ids(12, 4, 64);
        let full = m
            .forward_train(
                &Tensor::from_slice(&x, (1, 12), &Device::Cpu).unwrap(),
                None,
            )
            .unwrap(); // (12, v)
        let mut cache = KvCache::new();
        for (pos, &id) in x.iter().enumerate() {
            let step = m.decode_step(&[0], &[id], &mut cache).unwrap();
            assert_close(
                &format!("position {pos}"),
                &step,
                &full.narrow(0, pos, 1).unwrap(),
                Tol::OP_F32,
            );
        }
    }
}

#[test]
fn bad_batches_rows_and_head_positions_are_clear_errors() {
    let cfg = cfg();
    let m = Llama::new(&cfg, &params(&cfg, DType::F32)).unwrap();
    let x = Tensor::from_vec(ids(8, 1, 64), (2, 4), &Device::Cpu).unwrap();
    let e = TokenBatch::packed(x, &[vec![0; 4]])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("segment ids must be 2 rows of 4"), "{e}");
    let e = last_token_rows(&[3, 0], 4).unwrap_err().to_string();
    assert!(e.contains("row 1 has 0 tokens"), "{e}");
    let mut cache = KvCache::new();
    let e = m
        .decode_step(&[0, 0], &[1, 2], &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a row appears twice"), "{e}");
    let e = m
        .decode_step(&[0], &[1, 2], &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("one token per row"), "{e}");
    let (h, _) = m
        .forward_hidden(
            &TokenBatch::new(Tensor::from_vec(ids(4, 2, 64), (1, 4), &Device::Cpu).unwrap()),
            None,
        )
        .unwrap();
    let head = ScalarHead::init(cfg.dim, 1, &Device::Cpu).unwrap();
    let e = head.forward(&h, &[4]).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
}

/// The LM head with a vocabulary large enough to be chunked (more than
/// `LOGITS_CHUNK_ELEMENTS` logits) and most targets ignored (rows gathered and padded):
/// the loss and the gradients equal candle's autograd through the whole `(n, v)` logits.
#[test]
fn a_chunked_gathered_lm_head_equals_autograd() {
    let cfg = ModelConfig {
        vocab_size: 65_536,
        dim: 16,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: Some(1),
        ffn_dim: Some(32),
        max_seq_len: 1_200,
        ..ModelConfig::tiny()
    };
    let n = 1_100; // > 64 Mi / 65,536 = 1,024 rows: two chunks
    assert!(n * cfg.vocab_size > kiln_model::LOGITS_CHUNK_ELEMENTS);
    let p = params(&cfg, DType::F32);
    let x = Tensor::from_vec(ids(n, 3, cfg.vocab_size), (1, n), &Device::Cpu).unwrap();
    // A third of the targets ignored, in runs (as prompts are).
    let tv: Vec<i64> = ids(n, 5, cfg.vocab_size)
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if (i / 50) % 3 == 0 {
                -100
            } else {
                i64::from(t)
            }
        })
        .collect();
    let targets = Tensor::from_vec(tv, n, &Device::Cpu).unwrap();
    let model = Llama::new(&cfg, &p).unwrap();
    let mut grads = model.grads(&p).unwrap();
    let loss = model
        .forward_backward(&x, &targets, 1.0, &mut grads, None)
        .unwrap();
    let (sum, _) = kiln_model::loss_sum(&model.forward_train(&x, None).unwrap(), &targets).unwrap();
    assert!(
        (loss - scalar(&sum)).abs() <= 1e-4 * loss.abs(),
        "{loss} vs {}",
        scalar(&sum)
    );
    let store = sum.backward().unwrap();
    let reference = p.autograd_grads(&store).unwrap().unwrap();
    for name in [
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "norm.weight",
    ] {
        kiln_testutil::assert_close(
            name,
            grads.get(name).unwrap(),
            reference.get(name).unwrap(),
            Tol::GRAD_F32,
        );
    }
}

/// The log-prob head works in chunks of `LOGPROB_CHUNK_ELEMENTS` logits: across chunk
/// boundaries its values, entropies and gradients equal the whole `(n, v)` composition.
#[test]
fn a_chunked_logprob_head_equals_the_whole_composition() {
    let cfg = ModelConfig {
        vocab_size: 65_536,
        dim: 16,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: Some(1),
        ffn_dim: Some(32),
        max_seq_len: 400,
        ..ModelConfig::tiny()
    };
    let n = 300; // 8 Mi / 65,536 = 128 rows a chunk: three chunks, the last one short
    assert!(n * cfg.vocab_size > 2 * kiln_model::LOGPROB_CHUNK_ELEMENTS);
    let p = params(&cfg, DType::F32);
    let x = Tensor::from_vec(ids(n, 3, cfg.vocab_size), (1, n), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(ids(n, 5, cfg.vocab_size), n, &Device::Cpu).unwrap();
    let g = Tensor::from_vec(uniform_vec(4, n), n, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let model = Llama::new(&cfg, &p).unwrap();
    let (hidden, _) = model
        .forward_hidden(&TokenBatch::new(x.clone()), None)
        .unwrap();
    let hidden = hidden.detach();
    let t = 0.8;
    let (lp, entropy) = model.token_logprobs_entropy(&hidden, &targets, t).unwrap();

    // The whole composition, differentiated by candle's autograd.
    let h_var = candle_core::Var::from_tensor(&hidden).unwrap();
    let logits = (model.lm_logits(h_var.as_tensor()).unwrap() / t).unwrap();
    let want = kiln_model::logprobs_of(&logits, &targets).unwrap();
    assert_close("logprobs", &lp, &want, Tol::OP_F32);
    let probs = candle_nn_free_softmax(&logits);
    let want_entropy = (probs.clone() * probs.log().unwrap())
        .unwrap()
        .sum(1)
        .unwrap()
        .neg()
        .unwrap();
    assert_close("entropy", &entropy, &want_entropy, Tol::OP_F32);

    let store = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let mut grads = model.grads(&p).unwrap();
    let dh = model
        .token_logprobs_backward(&hidden, &targets, &g, t, &mut grads)
        .unwrap();
    assert_close(
        "d_hidden",
        &dh,
        store.get(h_var.as_tensor()).unwrap(),
        Tol::GRAD_F32,
    );
    let reference = p.autograd_grads(&store).unwrap().unwrap();
    let name = if cfg.tie_embeddings {
        "tok_embeddings.weight"
    } else {
        "output.weight"
    };
    assert_close(
        name,
        grads.get(name).unwrap(),
        reference.get(name).unwrap(),
        Tol::GRAD_F32,
    );
}

fn candle_nn_free_softmax(logits: &Tensor) -> Tensor {
    let m = logits.max_keepdim(1).unwrap();
    let e = logits.broadcast_sub(&m).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap()
}
