//! Flat storage: the buffer order makes the groups contiguous, named tensors are views that
//! alias the buffer (an in-place write shows through `Params::tensor` and through a model built
//! earlier), and the gradient buffer accumulates in place with lazy zeroing.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use kiln_model::{flat_group, FlatLayout, Grads, Llama, LoraSpec, ModelConfig, Params};

fn cfg(tied: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        dim: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_dim: Some(64),
        max_seq_len: 32,
        tie_embeddings: tied,
        ..ModelConfig::tiny()
    }
}

fn lora() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["wq", "wv", "w2"].map(String::from).to_vec(),
        rslora: false,
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Each distinct value of `key` over the entries covers one contiguous element range.
fn assert_groups_contiguous<K: PartialEq + std::fmt::Debug>(
    what: &str,
    layout: &FlatLayout,
    key: impl Fn(&str, &[usize]) -> K,
) {
    let runs = layout.runs(|e| key(&e.name, &e.shape));
    for (i, (k, _, _)) in runs.iter().enumerate() {
        assert!(
            runs[i + 1..].iter().all(|(other, _, _)| other != k),
            "{what}: group {k:?} is split: {runs:?}"
        );
    }
    assert_eq!(runs.first().map(|r| r.1.start), Some(0));
    assert_eq!(runs.last().map(|r| r.1.end), Some(layout.total()));
}

#[test]
fn the_buffer_order_puts_each_group_in_one_range() {
    for tied in [false, true] {
        let c = cfg(tied);
        let mut p = Params::init(&c, 1, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(p.flat().dims(), [c.param_counts().0]);
        // nanoGPT's decay rule: matrices but the embedding decay; norms and the embedding not.
        let decays = |n: &str, s: &[usize]| s.len() >= 2 && n != "tok_embeddings.weight";
        assert_groups_contiguous("decay", p.layout(), decays);
        assert_groups_contiguous("group", p.layout(), flat_group);
        p.add_lora(&c, &lora(), 2).unwrap();
        assert_groups_contiguous("decay with LoRA", p.layout(), decays);
        assert_groups_contiguous("adapters", p.layout(), |n, _| kiln_model::is_lora_name(n));
        // The adapters come first: what trains under LoRA is one prefix of the buffer.
        let adapters = p.adapter_names();
        let last = p.layout().entry(adapters.last().unwrap()).unwrap();
        assert_eq!(last.offset + last.numel, {
            let n: usize = adapters
                .iter()
                .map(|a| p.layout().entry(a).unwrap().numel)
                .sum();
            n
        });
        // The gradient layout of a LoRA model is the adapters alone, in the same order.
        let model = Llama::new_with_lora(&c, &p, &lora()).unwrap();
        let g = model.grad_layout(&p).unwrap();
        let names: Vec<&str> = g.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, adapters);
        // A full model trains everything: its gradient layout is the params' layout.
        let full = Params::init(&c, 1, &Device::Cpu, DType::F32).unwrap();
        let model = Llama::new(&c, &full).unwrap();
        assert_eq!(&model.grad_layout(&full).unwrap(), full.layout().as_ref());
    }
}

#[test]
fn named_tensors_are_views_that_alias_the_buffer() {
    let c = cfg(false);
    let p = Params::init(&c, 3, &Device::Cpu, DType::F32).unwrap();
    let x = Tensor::from_vec((0..12u32).collect::<Vec<_>>(), (1, 12), &Device::Cpu).unwrap();
    let model = Llama::new(&c, &p).unwrap();
    let before = model.logits(&x).unwrap();
    let name = "layers.1.attention.wq.weight";
    let e = p.layout().entry(name).unwrap().clone();
    assert!(e.offset > 0, "a view with a non-zero start offset");
    let old = values(&p.tensor(name).unwrap());

    // An in-place write into the flat buffer shows through the named view ...
    let flat = p.flat().as_detached_tensor();
    let delta = Tensor::full(0.25f32, e.numel, &Device::Cpu).unwrap();
    kiln_kernels::add_in_place(&flat.narrow(0, e.offset, e.numel).unwrap(), &delta).unwrap();
    let new = values(&p.tensor(name).unwrap());
    for (a, b) in old.iter().zip(&new) {
        assert_eq!(*b, *a + 0.25);
    }
    // ... and through the model built before it, which now computes what a fresh one does.
    let after = model.logits(&x).unwrap();
    let fresh = Llama::new(&c, &p).unwrap().logits(&x).unwrap();
    assert_eq!(values(&after), values(&fresh));
    assert_ne!(values(&after), values(&before));

    // `set` writes in place too; save/load round-trips the same names and values.
    let ones = Tensor::ones(e.shape.clone(), DType::F32, &Device::Cpu).unwrap();
    p.set(name, &ones).unwrap();
    assert!(values(&p.tensor(name).unwrap()).iter().all(|&v| v == 1.0));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    p.save(&path).unwrap();
    let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(stored.len(), p.layout().len());
    let back = Params::load(&path, &c, &Device::Cpu).unwrap();
    assert_eq!(values(back.flat()), values(p.flat()));
    let other = Params::init(&c, 9, &Device::Cpu, DType::F32).unwrap();
    other.copy_from(&back).unwrap();
    assert_eq!(values(other.flat()), values(p.flat()));
}

#[test]
fn grads_accumulate_in_place_with_lazy_zeroing() {
    let layout = FlatLayout::new([
        ("a".to_string(), vec![2, 3]),
        ("emb".to_string(), vec![5, 2]),
        ("b".to_string(), vec![4]),
    ])
    .unwrap();
    let mut g = Grads::new(Arc::new(layout), DType::F32, &Device::Cpu).unwrap();
    assert!(g.is_empty() && g.get("a").is_none());
    let a1 = Tensor::arange(0f32, 6., &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    g.accumulate("a", &a1).unwrap();
    g.accumulate("a", &a1).unwrap();
    assert_eq!(values(&g["a"]), [0., 2., 4., 6., 8., 10.]);
    assert_eq!(g.len(), 1);
    assert_eq!(g.names().collect::<Vec<_>>(), ["a"]);
    assert_eq!(g.sum_of_squares().unwrap(), 220.0);
    assert!(g.accumulate("nope", &a1).is_err(), "no entry");
    assert!(g.accumulate("b", &a1).is_err(), "wrong shape");

    // Stale values everywhere, then zero: the next writes overwrite them.
    let ones_b = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    g.accumulate("b", &ones_b).unwrap();
    let ids = Tensor::new(&[1u32, 3, 1], &Device::Cpu).unwrap();
    let rows = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
    g.index_add_rows("emb", &ids, &rows).unwrap();
    g.zero();
    assert!(g.is_empty());
    assert_eq!(
        g.sum_of_squares().unwrap(),
        0.0,
        "stale values are not read"
    );
    g.accumulate("a", &a1).unwrap();
    g.index_add_rows("emb", &ids, &rows).unwrap();
    assert_eq!(values(&g["a"]), values(&a1));
    let want = Tensor::zeros((5, 2), DType::F32, &Device::Cpu)
        .unwrap()
        .index_add(&ids, &rows, 0)
        .unwrap();
    assert_eq!(values(&g["emb"]), values(&want));
    assert_eq!(g.live_ranges(), vec![0..16], "a and emb are adjacent");
    assert!(g.get("b").is_none());
    // The flat buffer holds the live gradients where the layout says.
    let flat = values(g.flat());
    assert_eq!(flat[..6], values(&a1)[..]);
    assert_eq!(flat[6..16], values(&want)[..]);
}
