//! KV-cache decoding must reproduce the full-sequence forward.

use candle_core::{DType, Device, Tensor};
use kiln_model::{KvCache, Llama, ModelConfig, ModelError, Params};
use kiln_testutil::{assert_close, Tol};

fn model(cfg: &ModelConfig) -> Llama {
    let params = Params::init(cfg, 5, &Device::Cpu, DType::F32).unwrap();
    // Params are dropped here on purpose: the model keeps the tensors alive.
    Llama::new(cfg, &params).unwrap()
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + 3) % vocab) as u32).collect()
}

#[test]
fn cached_decode_equals_the_full_forward_at_every_position() {
    let cfg = ModelConfig {
        max_seq_len: 24,
        ..ModelConfig::tiny()
    };
    let m = model(&cfg);
    let ids = tokens(20, cfg.vocab_size);
    let full = m
        .logits(&Tensor::from_slice(&ids, (1, 20), &Device::Cpu).unwrap())
        .unwrap(); // (1, t, v)
    let mut cache = KvCache::new();
    // A prefill of 5 tokens, then one token at a time.
    let first = m
        .forward_decode(
            &Tensor::from_slice(&ids[..5], (1, 5), &Device::Cpu).unwrap(),
            &mut cache,
        )
        .unwrap();
    assert_close(
        "prefill last row",
        &first,
        &full.narrow(1, 4, 1).unwrap().squeeze(1).unwrap(),
        Tol::MODEL_F32,
    );
    for pos in 5..20 {
        let step = m
            .forward_decode(
                &Tensor::from_slice(&ids[pos..pos + 1], (1, 1), &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        let want = full.narrow(1, pos, 1).unwrap().squeeze(1).unwrap();
        assert_close(
            &format!("decode position {pos}"),
            &step,
            &want,
            Tol::MODEL_F32,
        );
    }
    assert_eq!(cache.len(), 20);
}

#[test]
fn batched_rows_are_independent() {
    let cfg = ModelConfig {
        max_seq_len: 16,
        ..ModelConfig::tiny()
    };
    let m = model(&cfg);
    let a = tokens(16, cfg.vocab_size);
    let b: Vec<u32> = a.iter().rev().copied().collect();
    let both: Vec<u32> = a.iter().chain(&b).copied().collect();
    let batched = m
        .logits(&Tensor::from_slice(&both, (2, 16), &Device::Cpu).unwrap())
        .unwrap();
    let single = m
        .logits(&Tensor::from_slice(&b, (1, 16), &Device::Cpu).unwrap())
        .unwrap();
    assert_close(
        "row 1 alone vs in a batch",
        &batched.narrow(0, 1, 1).unwrap(),
        &single,
        Tol::MODEL_F32,
    );
}

#[test]
fn the_causal_mask_hides_the_future_and_bidirectional_does_not() {
    let cfg = ModelConfig {
        max_seq_len: 16,
        ..ModelConfig::tiny()
    };
    let m = model(&cfg);
    let mut ids = tokens(16, cfg.vocab_size);
    let before = m
        .logits(&Tensor::from_slice(&ids, (1, 16), &Device::Cpu).unwrap())
        .unwrap();
    ids[15] = (ids[15] + 1) % cfg.vocab_size as u32; // change only the last token
    let after = m
        .logits(&Tensor::from_slice(&ids, (1, 16), &Device::Cpu).unwrap())
        .unwrap();
    assert_close(
        "positions before the change",
        &after.narrow(1, 0, 15).unwrap(),
        &before.narrow(1, 0, 15).unwrap(),
        Tol::OP_F32,
    );

    let enc = model(&ModelConfig {
        attention: kiln_model::AttentionMode::Bidirectional,
        ..cfg.clone()
    });
    let e1 = enc
        .logits(&Tensor::from_slice(&tokens(16, cfg.vocab_size), (1, 16), &Device::Cpu).unwrap())
        .unwrap();
    let e2 = enc
        .logits(&Tensor::from_slice(&ids, (1, 16), &Device::Cpu).unwrap())
        .unwrap();
    let diff = (e1.narrow(1, 0, 1).unwrap() - e2.narrow(1, 0, 1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff > 1e-6,
        "an encoder's first position must see the last token"
    );
}

#[test]
fn too_long_and_out_of_vocab_inputs_are_errors() {
    let cfg = ModelConfig {
        max_seq_len: 8,
        ..ModelConfig::tiny()
    };
    let m = model(&cfg);
    let long = Tensor::from_slice(&tokens(9, cfg.vocab_size), (1, 9), &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward_train(&long, None),
        Err(ModelError::ContextOverflow {
            needed: 9,
            max_seq_len: 8
        })
    ));
    let bad = Tensor::from_slice(&[1u32, cfg.vocab_size as u32], (1, 2), &Device::Cpu).unwrap();
    let err = m.forward_train(&bad, None).err().unwrap().to_string();
    assert!(err.contains("out of range"), "{err}");
    let mut cache = KvCache::new();
    m.forward_decode(
        &Tensor::from_slice(&tokens(8, cfg.vocab_size), (1, 8), &Device::Cpu).unwrap(),
        &mut cache,
    )
    .unwrap();
    let one = Tensor::from_slice(&[1u32], (1, 1), &Device::Cpu).unwrap();
    assert!(matches!(
        m.forward_decode(&one, &mut cache),
        Err(ModelError::ContextOverflow { .. })
    ));
}

#[test]
fn a_copied_cache_row_decodes_like_its_own_prefill() {
    use kiln_model::CausalLm;
    let cfg = ModelConfig {
        max_seq_len: 24,
        ..ModelConfig::tiny()
    };
    let m = model(&cfg);
    let ids = tokens(9, cfg.vocab_size);
    // Rows 0 and 2 share row 0's prefill; row 1 prefills the same prompt itself.
    let mut shared = KvCache::new();
    m.prefill_row(0, &ids, &mut shared).unwrap();
    shared.copy_row(0, 2);
    m.prefill_row(1, &ids, &mut shared).unwrap();
    assert_eq!((shared.row_len(1), shared.row_len(2)), (9, 9));
    let out = m.decode_step(&[0, 1, 2], &[4, 7, 7], &mut shared).unwrap();
    let row = |i: usize| out.get(i).unwrap();
    assert_close(
        "copy vs own prefill",
        &row(2),
        &row(1),
        Tol { rel: 0.0, abs: 0.0 },
    );
    // Writing to the copy leaves the original alone: row 0 took token 4, row 2 token 7.
    assert_eq!(shared.row_len(0), 10);
    let diff = (row(0) - row(2)).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 0.0);
}

/// Rows of one batch that each pick a served adapter (or none) decode exactly as the model
/// with that adapter attached decodes alone: prefill and every decode step.
#[test]
fn served_adapters_per_row_equal_each_adapter_attached_alone() {
    use kiln_model::{CausalLm, LoraSpec};
    let cfg = ModelConfig {
        max_seq_len: 32,
        ..ModelConfig::tiny()
    };
    let cpu = Device::Cpu;
    let params = Params::init(&cfg, 5, &cpu, DType::F32).unwrap();
    let adapter = |seed: u64, rank: usize, targets: &[&str]| {
        let spec = LoraSpec {
            rank,
            alpha: 2.0 * rank as f64,
            dropout: 0.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            rslora: false,
        };
        let a = Params::lora_adapters(&cfg, &spec, seed, &cpu, DType::F32).unwrap();
        // PEFT starts B at zero; a trained adapter's B is not.
        for (i, name) in a.adapter_names().into_iter().enumerate() {
            if name.ends_with("lora_B.weight") {
                let t = a.tensor(&name).unwrap();
                let b = kiln_testutil::uniform_tensor(seed * 100 + i as u64, t.dims(), DType::F32)
                    .unwrap();
                a.set(&name, &(b * 0.3).unwrap()).unwrap();
            }
        }
        (a, spec)
    };
    let (a1, s1) = adapter(1, 4, &kiln_model::LORA_TARGETS);
    let (a2, s2) = adapter(2, 2, &["wq", "wv", "w2"]);
    let mut served = Llama::new(&cfg, &params).unwrap();
    assert_eq!(served.add_served_adapter(&a1, &s1).unwrap(), 1);
    assert_eq!(served.add_served_adapter(&a2, &s2).unwrap(), 2);
    let alone = |a: Option<(&Params, &LoraSpec)>| {
        let mut m = Llama::new(&cfg, &params).unwrap();
        if let Some((p, s)) = a {
            m.attach_lora(p, s).unwrap();
        }
        m
    };
    let singles = [
        alone(None),
        alone(Some((&a1, &s1))),
        alone(Some((&a2, &s2))),
    ];
    // Four rows: base, adapter 1, adapter 2, adapter 1 again, with prompts of 3 to 6 tokens.
    let ids: [u16; 4] = [0, 1, 2, 1];
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|r| {
            tokens(3 + r, cfg.vocab_size)
                .iter()
                .map(|t| t + r as u32)
                .collect()
        })
        .collect();
    let mut cache = KvCache::new();
    let mut want_caches: Vec<KvCache> = (0..4).map(|_| KvCache::new()).collect();
    let mut next = Vec::new();
    for r in 0..4 {
        let got = served
            .prefill_row_adapter(r, &prompts[r], ids[r], &mut cache)
            .unwrap();
        let want = singles[ids[r] as usize]
            .prefill_row(0, &prompts[r], &mut want_caches[r])
            .unwrap();
        assert_close(&format!("prefill row {r}"), &got, &want, Tol::MODEL_F32);
        next.push(argmax(&got));
    }
    let rows = [0usize, 1, 2, 3];
    for step in 0..5 {
        let got = served
            .decode_step_adapters(&rows, &next, &ids, &mut cache)
            .unwrap();
        for r in 0..4 {
            let want = singles[ids[r] as usize]
                .decode_step(&[0], &next[r..r + 1], &mut want_caches[r])
                .unwrap();
            assert_close(
                &format!("step {step} row {r}"),
                &got.narrow(0, r, 1).unwrap(),
                &want,
                Tol::MODEL_F32,
            );
        }
        next = (0..4)
            .map(|r| argmax(&got.narrow(0, r, 1).unwrap()))
            .collect();
    }
    // The adapters change the logits (the test would pass vacuously otherwise).
    let base = singles[0]
        .prefill_row(0, &prompts[1], &mut KvCache::new())
        .unwrap();
    let adapted = singles[1]
        .prefill_row(0, &prompts[1], &mut KvCache::new())
        .unwrap();
    let diff = (base - adapted)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-2, "{diff}");
    // An id past the served ones is an error, not a silent base row.
    assert!(served
        .decode_step_adapters(&[0], &next[..1], &[3], &mut cache)
        .is_err());
}

fn argmax(logits: &Tensor) -> u32 {
    logits
        .flatten_all()
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}
