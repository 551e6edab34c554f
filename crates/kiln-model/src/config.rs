//! Model configuration and named presets.
//!
//! Dimension letters used across the model code: `b` batch, `t` time (sequence), `d` model
//! width (`dim`), `h` query heads, `hkv` key/value heads, `hd` head dim, `f` FFN hidden size,
//! `v` vocabulary.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Which positions a token may attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMode {
    /// Decoder: position i sees positions <= i.
    #[default]
    Causal,
    /// Encoder: every position sees every position.
    Bidirectional,
}

/// The gated MLP's activation: `act(W1 x) ⊙ W3 x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU (LLaMA, Qwen, Mistral, Phi, SmolLM).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// The blueprint of a LLaMA-style decoder. Derived sizes (`head_dim`, `ffn_dim` when not set) are
/// methods, never stored twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Grouped-query attention: heads that share one K/V projection. Default `n_heads / 4`
    /// (at least 1), the classic LLaMA-2-70B ratio.
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// SwiGLU hidden size. When unset: `dim * mlp_ratio * 2/3` rounded up to `multiple_of`.
    #[serde(default)]
    pub ffn_dim: Option<usize>,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_multiple_of")]
    pub multiple_of: usize,
    /// Longest context the RoPE tables are built for.
    pub max_seq_len: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Share the token embedding with the LM head (`logits = h E^T`).
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Dropout on the residual branches during training (0 = off).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub attention: AttentionMode,
    /// Std of the normal init of embeddings and linears; the residual output projections
    /// (`wo`, `w2`) use `init_std / sqrt(2 * n_layers)` (GPT-2).
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// Per-head size when it is not `dim / n_heads` (some pretrained checkpoints set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RoPE frequency scaling of a pretrained checkpoint (`rope_scaling` in HF configs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,

    // Architecture switches. Each defaults to LLaMA's behaviour; the families that set them
    // are named on each (see docs/pretrained.md for the table).
    /// Biases on the Q, K and V projections (Qwen2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
    /// RMSNorm over each query and key head before RoPE, one `head_dim` weight each (Qwen3,
    /// Gemma 3).
    #[serde(default, skip_serializing_if = "is_false")]
    pub qk_norm: bool,
    /// Embeddings multiplied by `sqrt(dim)` (Gemma).
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_embeddings: bool,
    /// RMSNorms after attention and after the MLP, before each residual add (Gemma 2/3's
    /// "sandwich" norms).
    #[serde(default, skip_serializing_if = "is_false")]
    pub post_norms: bool,
    /// The gated MLP's activation.
    #[serde(default, skip_serializing_if = "is_default")]
    pub activation: Activation,
    /// Attention scores scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2`
    /// (Gemma).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Sliding-window attention: a query sees itself and the `sliding_window - 1` keys before
    /// it (Mistral; Gemma's local layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// With a sliding window: every `n`-th layer (`i % n == n - 1`) is global and the others
    /// slide (Gemma 2: 2, Gemma 3: 6). Unset: every layer slides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// RoPE base of the sliding layers, when it differs from `rope_theta` (Gemma 3: 10k local,
    /// 1M global); those layers take no `rope_scaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_theta: Option<f64>,
    /// Leading dimensions of each head that RoPE rotates (Phi-3's `partial_rotary_factor`);
    /// the rest pass through. Unset: the whole head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_dim: Option<usize>,
    /// Layers that use no positional encoding at all (SmolLM3's "NoPE" layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nope_layers: Vec<usize>,
    /// Attention scores soft-capped to `c tanh(s / c)` before the softmax (Gemma 2: 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Output logits soft-capped to `c tanh(z / c)` (Gemma 2: 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

/// How one layer attends: its window and its positional encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerAttention {
    /// Sliding window (None = every earlier position).
    pub window: Option<usize>,
    pub rope: LayerRope,
}

/// Which RoPE tables a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRope {
    /// `rope_theta` with `rope_scaling`.
    Global,
    /// `rope_local_theta`, unscaled (sliding layers of Gemma 3).
    Local,
    /// No positional encoding.
    None,
}

/// RoPE frequency scaling, as transformers' `rope_scaling` (only the types that keep the
/// attention math unchanged, i.e. rescale the inverse frequencies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Inverse frequency `i` divided by `factors[i]` (llama.cpp's `rope_freqs.weight`, how
    /// GGUF files store Llama 3.1's scaling).
    Factors { factors: Vec<f64> },
    /// Phi-3's LongRoPE: inverse frequency `i` divided by `short_factor[i]` at positions below
    /// `original_max_position_embeddings` and by `long_factor[i]` from there on, cos and sin
    /// multiplied by `attention_factor`.
    Longrope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
    /// YaRN (Peng et al. 2023, transformers' `_compute_yarn_parameters`): low frequencies
    /// interpolated (divided by `factor`), high ones kept, a linear ramp between the dimensions
    /// that turn `beta_fast` and `beta_slow` times over the original context; cos and sin
    /// multiplied by `attention_factor` (`0.1 ln(factor) + 1` by default).
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        /// Round the ramp's ends to whole dimensions (transformers' default).
        truncate: bool,
    },
}

impl RopeScaling {
    /// The factor on cos and sin (LongRoPE's and YaRN's attention factor; 1 otherwise).
    pub fn magnitude(&self) -> f64 {
        match *self {
            RopeScaling::Longrope {
                attention_factor, ..
            }
            | RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// The scaled inverse frequencies (transformers' `_compute_*_parameters`) of a RoPE with
    /// base `theta` over `2 * inv_freq.len()` dimensions.
    pub fn apply(&self, inv_freq: &mut [f64], theta: f64) {
        match *self {
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let dim = (2 * inv_freq.len()) as f64;
                let original = original_max_position_embeddings as f64;
                // The dimension whose wavelength turns `rotations` times over the context.
                let dim_of = |rotations: f64| {
                    dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (dim_of(beta_fast), dim_of(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp; // extrapolation: the frequency unchanged
                    *f = *f / factor * (1.0 - keep) + *f * keep;
                }
            }
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::Factors { ref factors }
            | RopeScaling::Longrope {
                short_factor: ref factors,
                ..
            } => {
                for (f, s) in inv_freq.iter_mut().zip(factors) {
                    *f /= s;
                }
            }
        }
    }

    /// The per-frequency divisors this scaling amounts to for `head_dim` and `theta` (what
    /// llama.cpp's `rope_freqs.weight` holds).
    pub fn factors(&self, head_dim: usize, theta: f64) -> Vec<f64> {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let mut scaled = base.clone();
        self.apply(&mut scaled, theta);
        base.iter().zip(&scaled).map(|(b, s)| b / s).collect()
    }
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_multiple_of() -> usize {
    64
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_init_std() -> f64 {
    0.02
}

impl ModelConfig {
    pub(crate) fn base(vocab_size: usize, dim: usize, n_layers: usize, n_heads: usize) -> Self {
        Self {
            vocab_size,
            dim,
            n_layers,
            n_heads,
            n_kv_heads: None,
            ffn_dim: None,
            mlp_ratio: default_mlp_ratio(),
            multiple_of: default_multiple_of(),
            max_seq_len: 256,
            rope_theta: default_rope_theta(),
            norm_eps: default_norm_eps(),
            tie_embeddings: false,
            dropout: 0.0,
            attention: AttentionMode::Causal,
            init_std: default_init_std(),
            head_dim: None,
            rope_scaling: None,
            qkv_bias: false,
            qk_norm: false,
            scale_embeddings: false,
            post_norms: false,
            activation: Activation::Silu,
            query_pre_attn_scalar: None,
            sliding_window: None,
            sliding_window_pattern: None,
            rope_local_theta: None,
            rotary_dim: None,
            nope_layers: Vec::new(),
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
        }
    }

    /// For tests and the README demo: well under 1M parameters.
    pub fn tiny() -> Self {
        Self {
            max_seq_len: 128,
            multiple_of: 32,
            ..Self::base(1024, 64, 2, 4)
        }
    }

    /// About 10M parameters: the CPU pretraining exercise (docs/pretrain-10m.md).
    pub fn m10() -> Self {
        Self {
            n_kv_heads: Some(2),
            ..Self::base(8192, 256, 8, 8)
        }
    }

    /// The benchmark reference config (docs/benchmarks.md).
    pub fn reference() -> Self {
        Self {
            n_kv_heads: Some(2),
            ffn_dim: Some(1024),
            ..Self::base(8192, 384, 6, 6)
        }
    }

    /// The shape of SmolLM2-135M.
    pub fn smollm2_135m() -> Self {
        Self {
            n_kv_heads: Some(3),
            ffn_dim: Some(1536),
            max_seq_len: 8192,
            rope_theta: 100_000.0,
            tie_embeddings: true,
            ..Self::base(49152, 576, 30, 9)
        }
    }

    pub fn preset(name: &str) -> Result<Self, ModelError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "10m" => Ok(Self::m10()),
            "reference" => Ok(Self::reference()),
            "smollm2-135m" => Ok(Self::smollm2_135m()),
            other => Err(ModelError::Config(format!(
                "unknown model preset {other:?}; known presets: {}",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    pub const PRESETS: &'static [&'static str] = &["tiny", "10m", "reference", "smollm2-135m"];

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.dim / self.n_heads)
    }

    /// The dimensions of each head RoPE rotates.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim())
    }

    /// The attention scale `1 / sqrt(query_pre_attn_scalar or head_dim)`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim() as f64)
            .sqrt()
    }

    /// Gemma 2's soft caps under the key names HF configs and GGUF metadata both use.
    pub fn softcaps(&self) -> [(&'static str, Option<f64>); 2] {
        [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ]
    }

    /// Whether layer `i` uses the sliding window.
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_window_pattern.is_none_or(|n| i % n != n - 1)
    }

    /// How layer `i` attends.
    pub fn layer_attention(&self, i: usize) -> LayerAttention {
        let sliding = self.is_sliding(i);
        let rope = if self.nope_layers.contains(&i) {
            LayerRope::None
        } else if sliding && self.rope_local_theta.is_some() {
            LayerRope::Local
        } else {
            LayerRope::Global
        };
        LayerAttention {
            window: if sliding { self.sliding_window } else { None },
            rope,
        }
    }

    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or((self.n_heads / 4).max(1))
    }

    pub fn ffn_dim(&self) -> usize {
        self.ffn_dim.unwrap_or_else(|| {
            let raw = (self.dim as f64 * self.mlp_ratio * 2.0 / 3.0).ceil() as usize;
            raw.div_ceil(self.multiple_of) * self.multiple_of
        })
    }

    /// The same config with every derived size written out (what a run directory records).
    pub fn resolved(&self) -> Self {
        Self {
            n_kv_heads: Some(self.n_kv_heads()),
            ffn_dim: Some(self.ffn_dim()),
            ..self.clone()
        }
    }

    /// Cross-field checks: each failure names the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::Config(msg));
        for (name, value) in [
            ("model.vocab_size", self.vocab_size),
            ("model.dim", self.dim),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.max_seq_len", self.max_seq_len),
            ("model.multiple_of", self.multiple_of),
        ] {
            if value == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        // Bounds far above any real model, so a corrupt file's sizes are an error here rather
        // than tables and layouts allocated from them.
        for (name, value, most) in [
            ("model.vocab_size", self.vocab_size, 1 << 24),
            ("model.dim", self.dim, 1 << 17),
            ("model.n_layers", self.n_layers, 1 << 12),
            ("model.n_heads", self.n_heads, 1 << 12),
            ("model.max_seq_len", self.max_seq_len, 1 << 21),
            ("model.head_dim", self.head_dim.unwrap_or(0), 1 << 14),
            ("model.ffn_dim", self.ffn_dim.unwrap_or(0), 1 << 20),
        ] {
            if value > most {
                return bad(format!(
                    "{name} = {value} is beyond any real model (at most {most}): a corrupt file?"
                ));
            }
        }
        if self.head_dim == Some(0) {
            return bad("model.head_dim must be positive".into());
        }
        if self.head_dim.is_none() && !self.dim.is_multiple_of(self.n_heads) {
            return bad(format!(
                "model.dim ({}) must be divisible by model.n_heads ({})",
                self.dim, self.n_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dim (model.head_dim or dim/n_heads) = {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.max_seq_len.saturating_mul(self.rotary_dim() / 2) > 1 << 27 {
            return bad(format!(
                "model.max_seq_len ({}) x rotary dim ({}) makes RoPE tables beyond any real model: a corrupt file?",
                self.max_seq_len,
                self.rotary_dim()
            ));
        }
        if let Some(r) = self.rotary_dim {
            if r == 0 || !r.is_multiple_of(2) || r > self.head_dim() {
                return bad(format!(
                    "model.rotary_dim ({r}) must be even, positive and at most the head dim ({})",
                    self.head_dim()
                ));
            }
        }
        for (key, cap) in self.softcaps() {
            if cap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                return bad(format!(
                    "model.{key} must be a positive number, got {}",
                    cap.unwrap_or_default()
                ));
            }
        }
        if self.sliding_window == Some(0) || self.sliding_window_pattern == Some(0) {
            return bad(
                "model.sliding_window and model.sliding_window_pattern must be positive".into(),
            );
        }
        if let Some(&i) = self.nope_layers.iter().find(|&&i| i >= self.n_layers) {
            return bad(format!(
                "model.nope_layers names layer {i}, but the model has {} layers",
                self.n_layers
            ));
        }
        for (name, v) in [
            ("model.query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("model.rope_local_theta", self.rope_local_theta),
        ] {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return bad(format!("{name} must be positive"));
            }
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return bad(format!(
                "model.n_heads ({}) must be divisible by model.n_kv_heads ({kv})",
                self.n_heads
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "model.dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if self.rope_theta <= 0.0 || self.norm_eps <= 0.0 || self.init_std <= 0.0 {
            return bad(
                "model.rope_theta, model.norm_eps and model.init_std must be positive".into(),
            );
        }
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) if *factor <= 0.0 => {
                return bad("model.rope_scaling.factor must be positive".into())
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                ..
            }) if *factor <= 0.0
                || *low_freq_factor <= 0.0
                || high_freq_factor <= low_freq_factor =>
            {
                return bad(
                    "model.rope_scaling: llama3 needs factor > 0 and high_freq_factor > low_freq_factor > 0"
                        .into(),
                )
            }
            Some(RopeScaling::Longrope {
                short_factor,
                long_factor,
                attention_factor,
                ..
            }) if short_factor.len() != self.rotary_dim() / 2
                || long_factor.len() != self.rotary_dim() / 2
                || !(attention_factor.is_finite() && *attention_factor > 0.0) =>
            {
                return bad(format!(
                    "model.rope_scaling: longrope needs {} short and long factors (rotary dim / 2) and a positive attention_factor",
                    self.rotary_dim() / 2
                ))
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            }) if *factor <= 0.0
                || *original_max_position_embeddings == 0
                || beta_fast <= beta_slow
                || *beta_slow <= 0.0
                || !(attention_factor.is_finite() && *attention_factor > 0.0) =>
            {
                return bad(
                    "model.rope_scaling: yarn needs factor > 0, an original context, beta_fast > beta_slow > 0 and a positive attention_factor"
                        .into(),
                )
            }
            Some(RopeScaling::Factors { factors })
                if factors.len() != self.rotary_dim() / 2
                    || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) =>
            {
                return bad(format!(
                    "model.rope_scaling: {} frequency factors for head dim {} (needs {} positive ones)",
                    factors.len(),
                    self.rotary_dim(),
                    self.rotary_dim() / 2
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Parameter counts: `(total, non_embedding)`. Non-embedding excludes the token embedding
    /// table and, when untied, the output head (Kaplan et al. convention).
    pub fn param_counts(&self) -> (usize, usize) {
        let per_layer = self.layer_matmul_params() + self.layer_vector_params();
        let non_embedding = self.n_layers * per_layer + self.dim;
        let embedding = self.vocab_size * self.dim * if self.tie_embeddings { 1 } else { 2 };
        (non_embedding + embedding, non_embedding)
    }

    /// Norm weights and biases of one layer.
    fn layer_vector_params(&self) -> usize {
        let (d, hd) = (self.dim, self.head_dim());
        let norms = if self.post_norms { 4 * d } else { 2 * d };
        let qk_norm = if self.qk_norm { 2 * hd } else { 0 };
        let bias = if self.qkv_bias {
            (self.n_heads + 2 * self.n_kv_heads()) * hd
        } else {
            0
        };
        norms + qk_norm + bias
    }

    fn layer_matmul_params(&self) -> usize {
        let (d, hd) = (self.dim, self.head_dim());
        let attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads() * hd * 2;
        let ffn = 3 * d * self.ffn_dim();
        attention + ffn
    }

    /// Weights used in a matmul: every layer matrix plus the output head (tied or not); the
    /// input embedding lookup is not a matmul.
    pub fn matmul_params(&self) -> usize {
        self.n_layers * self.layer_matmul_params() + self.vocab_size * self.dim
    }

    /// Training FLOPs per token, PaLM convention (Chowdhery et al. 2022, App. B):
    /// `6 N + 12 L d T` with N the matmul weights and T the context length.
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        6.0 * self.matmul_params() as f64 + 12.0 * (self.n_layers * self.dim * seq_len) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_flops_per_token_match_the_issue() {
        let cfg = ModelConfig::reference();
        let flops = cfg.train_flops_per_token(256);
        // 6 * (6 * (2*384*384 + 2*384*128 + 3*384*1024) + 8192*384) + 12*6*384*256
        let hand = 6.0 * (6.0 * (294_912.0 + 98_304.0 + 1_179_648.0) + 3_145_728.0) + 7_077_888.0;
        assert_eq!(flops, hand);
        assert!((flops / 1e6 - 82.6).abs() < 0.1, "{flops}");
    }

    #[test]
    fn presets_are_valid_and_sized_as_documented() {
        for name in ModelConfig::PRESETS {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        let (tiny, _) = ModelConfig::tiny().param_counts();
        assert!(tiny < 1_000_000, "tiny has {tiny} params");
        let (m10, _) = ModelConfig::m10().param_counts();
        assert!(
            (9_000_000..11_000_000).contains(&m10),
            "10m has {m10} params"
        );
        let (smol, _) = ModelConfig::smollm2_135m().param_counts();
        assert!(
            (134_000_000..136_000_000).contains(&smol),
            "smollm2 has {smol}"
        );
    }

    #[test]
    fn ffn_dim_rounds_up_to_multiple() {
        let cfg = ModelConfig::tiny(); // 64 * 4 * 2/3 = 170.7 -> 192
        assert_eq!(cfg.ffn_dim(), 192);
        assert_eq!(ModelConfig::m10().ffn_dim(), 704);
    }

    #[test]
    fn validation_names_the_field() {
        let mut cfg = ModelConfig::tiny();
        cfg.n_kv_heads = Some(3);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("n_kv_heads"), "{err}");
    }
}
