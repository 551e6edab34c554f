//! Parameter counts and training FLOPs per token under each declared convention.
//!
//! Conventions change fitted exponents (published fits of the N_opt exponent range from about
//! 0.37 to 0.73 partly because of what N and C count), so every number here names its convention:
//!
//! - `kaplan_6n`: `6 N` with N the non-embedding parameters (Kaplan et al. 2020, §2.1).
//! - `six_n_total`: `6 N` with N all parameters (the `C ≈ 6 N D` of Hoffmann et al. 2022, used
//!   by the parametric-law planner).
//! - `chinchilla_full`: the full count of Hoffmann et al. 2022, Appendix F (embeddings,
//!   attention projections, logits, softmax and values, the output projection, the dense block,
//!   the output layer), adapted to this architecture; training = 3 × forward.
//! - `palm`: `6 N + 12 L d T` (Chowdhery et al. 2022, App. B) with N the matmul weights
//!   (output head included): what `kiln` reports for MFU and what `kiln scaling sweep` uses
//!   for D = C / (FLOPs per token).
//!
//! Adaptation of Appendix F to a LLaMA block: the Q projection counts `n_heads * head_dim`
//! outputs and the K and V projections `n_kv_heads * head_dim` each (grouped-query attention);
//! the dense block is SwiGLU's three `d x ffn_dim` matrices (`2 * 3 * d * ffn_dim` per token)
//! instead of two; RMSNorm, RoPE and the SwiGLU gate product are not counted (neither were
//! LayerNorm and GELU in Appendix F). Like Appendix F, the attention terms count the full
//! `seq x seq` square, not the causal half.

use kiln_model::ModelConfig;
use serde::Serialize;

/// Parameter counts. `embedding` is the token table plus, when untied, the output head.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamCounts {
    pub total: usize,
    pub non_embedding: usize,
    pub embedding: usize,
    /// Weights used in a matmul (every layer matrix plus the output head).
    pub matmul: usize,
}

pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    let (total, non_embedding) = cfg.param_counts();
    ParamCounts {
        total,
        non_embedding,
        embedding: total - non_embedding,
        matmul: cfg.matmul_params(),
    }
}

/// The Appendix F terms, forward FLOPs per sequence of `seq_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChinchillaCount {
    pub seq_len: usize,
    /// `2 * seq * vocab * d_model`.
    pub embeddings: f64,
    /// Per layer: `2 * seq * d_model * (n_heads + 2 * n_kv_heads) * head_dim`.
    pub attention_qkv: f64,
    /// Per layer: `2 * seq * seq * n_heads * head_dim`.
    pub attention_logits: f64,
    /// Per layer: `3 * n_heads * seq * seq`.
    pub attention_softmax: f64,
    /// Per layer: `2 * seq * seq * n_heads * head_dim` (softmax @ values).
    pub attention_reduce: f64,
    /// Per layer: `2 * seq * n_heads * head_dim * d_model`.
    pub attention_out: f64,
    /// Per layer: `2 * seq * 3 * d_model * ffn_dim` (SwiGLU).
    pub dense: f64,
    /// `2 * seq * d_model * vocab`.
    pub logits: f64,
    /// `embeddings + n_layers * (attention + dense) + logits`.
    pub forward_per_sequence: f64,
    /// `3 * forward_per_sequence / seq`.
    pub train_per_token: f64,
}

pub fn chinchilla_count(cfg: &ModelConfig, seq_len: usize) -> ChinchillaCount {
    let s = seq_len as f64;
    let d = cfg.dim as f64;
    let v = cfg.vocab_size as f64;
    let h = cfg.n_heads as f64;
    let hkv = cfg.n_kv_heads() as f64;
    let hd = cfg.head_dim() as f64;
    let f = cfg.ffn_dim() as f64;
    let embeddings = 2.0 * s * v * d;
    let attention_qkv = 2.0 * s * d * (h + 2.0 * hkv) * hd;
    let attention_logits = 2.0 * s * s * h * hd;
    let attention_softmax = 3.0 * h * s * s;
    let attention_reduce = 2.0 * s * s * h * hd;
    let attention_out = 2.0 * s * h * hd * d;
    let dense = 2.0 * s * 3.0 * d * f;
    let logits = 2.0 * s * d * v;
    let per_layer = attention_qkv
        + attention_logits
        + attention_softmax
        + attention_reduce
        + attention_out
        + dense;
    let forward = embeddings + cfg.n_layers as f64 * per_layer + logits;
    ChinchillaCount {
        seq_len,
        embeddings,
        attention_qkv,
        attention_logits,
        attention_softmax,
        attention_reduce,
        attention_out,
        dense,
        logits,
        forward_per_sequence: forward,
        train_per_token: 3.0 * forward / s,
    }
}

/// One convention's training FLOPs per token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Convention {
    /// Stable key: `kaplan_6n`, `six_n_total`, `chinchilla_full`, `palm`.
    pub key: &'static str,
    pub name: &'static str,
    pub formula: &'static str,
    pub train_flops_per_token: f64,
}

/// Everything `kiln scaling flops` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlopReport {
    pub params: ParamCounts,
    pub seq_len: usize,
    pub conventions: Vec<Convention>,
    pub chinchilla: ChinchillaCount,
}

pub fn flop_report(cfg: &ModelConfig, seq_len: usize) -> FlopReport {
    let params = param_counts(cfg);
    let chinchilla = chinchilla_count(cfg, seq_len);
    let conventions = vec![
        Convention {
            key: "kaplan_6n",
            name: "Kaplan et al. 2020",
            formula: "6 * N_non_embedding",
            train_flops_per_token: 6.0 * params.non_embedding as f64,
        },
        Convention {
            key: "six_n_total",
            name: "Hoffmann et al. 2022 approximation (C = 6ND)",
            formula: "6 * N_total",
            train_flops_per_token: 6.0 * params.total as f64,
        },
        Convention {
            key: "chinchilla_full",
            name: "Hoffmann et al. 2022 Appendix F, full count (SwiGLU + GQA adaptation)",
            formula: "3 * (embeddings + L * (qkv + logits + softmax + reduce + out + dense) + output logits) / seq",
            train_flops_per_token: chinchilla.train_per_token,
        },
        Convention {
            key: "palm",
            name: "PaLM (Chowdhery et al. 2022); kiln's MFU and sweep convention",
            formula: "6 * N_matmul + 12 * L * d * T",
            train_flops_per_token: cfg.train_flops_per_token(seq_len),
        },
    ];
    FlopReport {
        params,
        seq_len,
        conventions,
        chinchilla,
    }
}

impl FlopReport {
    /// The human-readable table.
    pub fn summary(&self, cfg: &ModelConfig) -> String {
        use std::fmt::Write;
        let p = &self.params;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model: vocab {} dim {} layers {} heads {} kv_heads {} head_dim {} ffn {} tie_embeddings {}",
            cfg.vocab_size,
            cfg.dim,
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads(),
            cfg.head_dim(),
            cfg.ffn_dim(),
            cfg.tie_embeddings
        );
        let _ = writeln!(s, "parameters:");
        let _ = writeln!(s, "  total          {:>14}", p.total);
        let _ = writeln!(s, "  non-embedding  {:>14}", p.non_embedding);
        let _ = writeln!(
            s,
            "  embedding      {:>14}  (token table{})",
            p.embedding,
            if cfg.tie_embeddings {
                ", tied with the output head"
            } else {
                " + output head"
            }
        );
        let _ = writeln!(
            s,
            "  matmul weights {:>14}  (layers + output head)",
            p.matmul
        );
        let _ = writeln!(
            s,
            "training FLOPs per token (seq_len {}), by convention:",
            self.seq_len
        );
        for c in &self.conventions {
            let _ = writeln!(
                s,
                "  {:<16} {:>12.4e}  {}  [{}]",
                c.key, c.train_flops_per_token, c.formula, c.name
            );
        }
        let c = &self.chinchilla;
        let l = cfg.n_layers as f64;
        let _ = writeln!(
            s,
            "Chinchilla Appendix F terms (forward FLOPs per sequence of {} tokens):",
            c.seq_len
        );
        for (name, v) in [
            ("embeddings", c.embeddings),
            ("attention qkv (x L)", c.attention_qkv * l),
            ("attention logits (x L)", c.attention_logits * l),
            ("attention softmax (x L)", c.attention_softmax * l),
            ("attention reduce (x L)", c.attention_reduce * l),
            ("attention out (x L)", c.attention_out * l),
            ("dense SwiGLU (x L)", c.dense * l),
            ("output logits", c.logits),
            ("forward total", c.forward_per_sequence),
        ] {
            let _ = writeln!(s, "  {name:<24} {v:>12.4e}");
        }
        s
    }
}
