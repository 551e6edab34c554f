//! Concrete model shapes near a parameter count, with fixed aspect rules so a family of sizes
//! is reproducible:
//!
//! - the head size is 32 below `dim` 512, 64 up to 2048 and 128 above; `n_heads = dim /
//!   head_dim`; `dim` is a multiple of 32 below 512 and of four heads above (256, then 512);
//! - `n_kv_heads` is the largest divisor of `n_heads` not above `max(1, n_heads / 4)` (the
//!   LLaMA-2-70B grouping ratio, like `ModelConfig`'s default);
//! - the FFN width follows the base config's `mlp_ratio` and `multiple_of` (any explicit
//!   `ffn_dim` of the base is dropped so it scales with `dim`);
//! - the aspect ratio `dim / n_layers` aims at 32 up to `dim` 512 and grows as `sqrt(dim)` above
//!   (about 90 at 4096, 128 at 8192; Kaplan et al. found loss flat over a wide aspect band);
//! - among shapes with an aspect from a quarter to twice that target, the one whose parameter
//!   count is closest in log to the target wins, with a small penalty (0.1 per e-fold) for
//!   leaving the target aspect.
//!
//! Everything else (vocabulary, context, tying, norms) comes from the base config.

use kiln_model::ModelConfig;
use serde::{Deserialize, Serialize};

/// Which parameter count a size target refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SizeBy {
    /// All parameters, embeddings included (Hoffmann et al. 2022).
    Total,
    /// Without the token table and output head (Kaplan et al. 2020).
    #[default]
    NonEmbedding,
}

impl SizeBy {
    pub fn count(self, cfg: &ModelConfig) -> usize {
        let (total, non_emb) = cfg.param_counts();
        match self {
            SizeBy::Total => total,
            SizeBy::NonEmbedding => non_emb,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SizeBy::Total => "total",
            SizeBy::NonEmbedding => "non_embedding",
        }
    }
}

/// Head size used for a width.
pub fn head_dim_for(dim: usize) -> usize {
    if dim < 512 {
        32
    } else if dim <= 2048 {
        64
    } else {
        128
    }
}

/// Widths are multiples of this: 32 below 512 (fine steps for small models), else 4 heads'
/// worth (256 up to 2048, 512 above) so the head count divides by the K/V grouping of 4.
pub fn dim_step(dim: usize) -> usize {
    if dim < 512 {
        32
    } else {
        4 * head_dim_for(dim)
    }
}

/// Target `dim / n_layers` for a width.
pub fn target_aspect(dim: usize) -> f64 {
    32.0 * (dim as f64 / 512.0).max(1.0).sqrt()
}

/// Largest divisor of `n_heads` that is at most `max(1, n_heads / 4)`.
pub fn kv_heads_for(n_heads: usize) -> usize {
    let cap = (n_heads / 4).max(1);
    (1..=cap)
        .rev()
        .find(|k| n_heads.is_multiple_of(*k))
        .unwrap_or(1)
}

/// `base` with a new width and depth; heads from `n_heads` or the head-size rule, K/V heads from
/// `n_kv_heads` or the grouping rule, FFN from the base's ratio.
pub fn with_shape(
    base: &ModelConfig,
    dim: usize,
    n_layers: usize,
    n_heads: Option<usize>,
    n_kv_heads: Option<usize>,
) -> ModelConfig {
    let n_heads = n_heads.unwrap_or_else(|| (dim / head_dim_for(dim)).max(1));
    let mut cfg = base.clone();
    cfg.dim = dim;
    cfg.n_layers = n_layers;
    cfg.n_heads = n_heads;
    cfg.n_kv_heads = Some(n_kv_heads.unwrap_or_else(|| kv_heads_for(n_heads)));
    cfg.ffn_dim = None;
    cfg
}

/// The shape (per the rules above) whose `by` parameter count is closest to `target`.
pub fn shape_for_params(base: &ModelConfig, target: f64, by: SizeBy) -> ModelConfig {
    let target = target.max(1.0);
    let mut best: Option<(f64, ModelConfig)> = None;
    let mut dim = 32;
    while dim <= 65_536 {
        if dim % dim_step(dim) == 0 {
            let aspect = target_aspect(dim);
            let l_star = dim as f64 / aspect;
            let lo = ((l_star / 2.0).floor() as usize).max(1);
            let hi = ((l_star * 4.0).ceil() as usize).max(1);
            for n_layers in lo..=hi {
                let cfg = with_shape(base, dim, n_layers, None, None);
                let p = by.count(&cfg) as f64;
                let score = (p / target).ln().abs()
                    + 0.1 * ((dim as f64 / n_layers as f64) / aspect).ln().abs();
                if best.as_ref().is_none_or(|(s, _)| score < *s) {
                    best = Some((score, cfg));
                }
            }
            // Past 4x the target even at the shallowest depth: wider shapes only get further.
            let shallow = with_shape(base, dim, lo, None, None);
            if by.count(&shallow) as f64 > 4.0 * target {
                break;
            }
        }
        dim += 32;
    }
    best.expect("invariant: at least one shape is scored").1
}

/// A one-line description of a shape.
pub fn describe(cfg: &ModelConfig) -> String {
    let (total, non_emb) = cfg.param_counts();
    format!(
        "dim {} layers {} heads {} kv_heads {} ffn {} ({} params, {} non-embedding)",
        cfg.dim,
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_kv_heads(),
        cfg.ffn_dim(),
        total,
        non_emb
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_valid_and_near_the_target() {
        let base = ModelConfig::tiny();
        for target in [3e4, 1e5, 3e5, 1e6, 3e6, 1e7] {
            let cfg = shape_for_params(&base, target, SizeBy::NonEmbedding);
            cfg.validate().unwrap();
            let p = SizeBy::NonEmbedding.count(&cfg) as f64;
            assert!(
                (p / target).ln().abs() < 0.3,
                "{target}: {}",
                describe(&cfg)
            );
        }
        let big = shape_for_params(&ModelConfig::m10(), 7e10, SizeBy::Total);
        big.validate().unwrap();
        let p = SizeBy::Total.count(&big) as f64;
        assert!((p / 7e10).ln().abs() < 0.1, "{}", describe(&big));
        assert_eq!(big.head_dim(), 128);
    }

    #[test]
    fn kv_grouping() {
        assert_eq!(kv_heads_for(1), 1);
        assert_eq!(kv_heads_for(2), 1);
        assert_eq!(kv_heads_for(8), 2);
        assert_eq!(kv_heads_for(9), 1);
        assert_eq!(kv_heads_for(12), 3);
        assert_eq!(kv_heads_for(64), 16);
    }
}
