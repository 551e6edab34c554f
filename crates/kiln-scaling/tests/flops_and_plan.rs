//! FLOP counts against a hand count; compute-optimal allocation against the law's first-order
//! condition.

use kiln_model::ModelConfig;
use kiln_scaling::flops::{chinchilla_count, flop_report};
use kiln_scaling::law::{compare_known_runs, ParametricLaw};

/// vocab 1024, dim 64, 2 layers, 4 heads of 16, 1 K/V head, SwiGLU 192, seq 128.
fn small() -> ModelConfig {
    let cfg = ModelConfig::tiny();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.dim,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads(),
            cfg.ffn_dim()
        ),
        (1024, 64, 2, 4, 1, 192)
    );
    cfg
}

#[test]
fn parameter_counts_match_a_hand_count() {
    let r = flop_report(&small(), 128);
    // Per layer: wq 64*64 + wk 64*16 + wv 64*16 + wo 64*64 + 3 * 64*192 + two norms 2*64.
    let layer = 4096 + 1024 + 1024 + 4096 + 36_864 + 128;
    let non_emb = 2 * layer + 64; // + final norm
    let emb = 2 * 1024 * 64; // token table + untied head
    assert_eq!(r.params.non_embedding, non_emb);
    assert_eq!(r.params.embedding, emb);
    assert_eq!(r.params.total, non_emb + emb);
}

#[test]
fn chinchilla_count_matches_a_hand_count() {
    let c = chinchilla_count(&small(), 128);
    let s = 128.0;
    let embeddings = 2.0 * s * 1024.0 * 64.0;
    let qkv = 2.0 * s * 64.0 * (64.0 + 2.0 * 16.0); // Q: 4 heads x 16, K and V: 1 head x 16
    let logits_att = 2.0 * s * s * 64.0;
    let softmax = 3.0 * 4.0 * s * s;
    let reduce = 2.0 * s * s * 64.0;
    let out = 2.0 * s * 64.0 * 64.0;
    let dense = 2.0 * s * 3.0 * 64.0 * 192.0;
    let logits = 2.0 * s * 64.0 * 1024.0;
    let forward = embeddings + 2.0 * (qkv + logits_att + softmax + reduce + out + dense) + logits;
    assert_eq!(c.attention_qkv, qkv);
    assert_eq!(c.dense, dense);
    assert_eq!(c.forward_per_sequence, forward);
    assert_eq!(c.train_per_token, 3.0 * forward / s);
    // 3 * 66,453,504 / 128
    assert_eq!(c.train_per_token, 1_557_504.0);
}

#[test]
fn every_convention_is_named_and_consistent() {
    let cfg = small();
    let r = flop_report(&cfg, 128);
    let get = |k: &str| {
        r.conventions
            .iter()
            .find(|c| c.key == k)
            .unwrap_or_else(|| panic!("{k}"))
            .train_flops_per_token
    };
    assert_eq!(get("kaplan_6n"), 6.0 * r.params.non_embedding as f64);
    assert_eq!(get("six_n_total"), 6.0 * r.params.total as f64);
    assert_eq!(get("palm"), cfg.train_flops_per_token(128));
    assert_eq!(get("chinchilla_full"), 1_557_504.0);
    let text = r.summary(&cfg);
    for k in [
        "kaplan_6n",
        "six_n_total",
        "chinchilla_full",
        "palm",
        "non-embedding",
    ] {
        assert!(text.contains(k), "{k} missing from\n{text}");
    }
}

#[test]
fn optimal_allocation_satisfies_the_first_order_condition() {
    for law in [ParametricLaw::CHINCHILLA, ParametricLaw::EPOCH] {
        for c in [1e12, 1e18, 5.76e23, 1e26] {
            let o = law.optimal(c);
            assert!((6.0 * o.params * o.tokens / c - 1.0).abs() < 1e-12);
            // dL/dN along C = 6ND vanishes: alpha A N^-alpha = beta B D^-beta.
            let lhs = law.alpha * law.a * o.params.powf(-law.alpha);
            let rhs = law.beta * law.b * o.tokens.powf(-law.beta);
            assert!((lhs / rhs - 1.0).abs() < 1e-9, "{lhs} vs {rhs}");
            // ... and numerically: dL/dlnN is zero at the optimum, not a few percent away.
            let l = |n: f64| law.loss(n, c / (6.0 * n));
            let dl = |n: f64| {
                let h = 1e-4;
                (l(n * f64::exp(h)) - l(n * f64::exp(-h))) / (2.0 * h)
            };
            assert!(dl(o.params).abs() < 1e-8, "{}", dl(o.params));
            assert!(dl(o.params * 1.05) > 1e-4 && dl(o.params / 1.05) < -1e-4);
            assert!((o.loss - l(o.params)).abs() < 1e-12);
        }
    }
}

#[test]
fn known_runs_compare_as_published() {
    let rows = compare_known_runs(&ParametricLaw::EPOCH);
    let ratios: Vec<f64> = rows.iter().map(|r| r.tokens_per_param).collect();
    assert!((ratios[0] - 1.714).abs() < 0.01 && (ratios[1] - 20.0).abs() < 1e-9);
    assert!((ratios[2] - 28.57).abs() < 0.01);
    // The Epoch refit puts Chinchilla itself near its own ~20 tokens per parameter.
    let chin = &rows[1].optimal;
    assert!((10.0..40.0).contains(&chin.tokens_per_param), "{chin:?}");
}
