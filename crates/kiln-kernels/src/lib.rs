//! Fused CPU kernels for LLaMA training, as candle custom ops with hand-written backward passes.
//!
//! Every public op runs a fused, rayon-parallel kernel when its inputs live on the CPU in f32 or
//! f64, and otherwise (GPU devices, other dtypes) falls back to an equivalent composition of
//! ordinary differentiable candle ops (`reference_*`), so models stay device-generic. The
//! reference compositions double as the naive oracle in tests.
//!
//! | op | shapes |
//! |----|--------|
//! | [`rms_norm`] | x (..., d), weight (d) -> (..., d) |
//! | [`rope`] | x (b, h, t, hd), cos/sin (t, hd/2) -> (b, h, t, hd) |
//! | [`masked_softmax`] | scores (b, h, tq, tk) -> same |
//! | [`attention`] | q (b, h, tq, hd), k/v (b, hkv, tk, hd) -> out (b, h, tq, hd), lse (b, h, tq) |
//! | [`swiglu`] | gate, up (any, equal) -> same |
//! | [`gelu_tanh_gate`] | gate, up (any, equal) -> same (Gemma's GeGLU) |
//! | [`cross_entropy_sum`] | logits (n, v), targets (n) i64 -> () |
//! | [`token_logprobs_entropy`] | logits (n, v), targets (n) -> log p (n), entropy (n) |
//! | [`adamw_step`] | in place on param / m / v (tensors or views of flat buffers) |
//! | [`add_in_place`] | dst += src, in place (gradient accumulation into a view) |
//! | [`index_add_rows`] | dst (r, d)[ids[i]] += src (n, d)[i], in place (embedding backward) |
//!
//! [`qkernels`] multiplies f32 activations by GGML-quantised weights (Q4_0 ... Q6_K, F16)
//! with exact arithmetic on the dequantised values, per ISA ([`Isa`]: chosen at run time,
//! or forced with [`set_isa`]).
//!
//! [`bf16_gemm`] is the mixed-precision matrix product (`train.precision = "bf16"`): inputs
//! rounded to bf16, products summed in f32, with AVX512-BF16's `vdpbf16ps` where the CPU has it.
//!
//! [`rows`] holds the same ops on plain `f32` rows for the single-token decode fast path.
//!
//! Each differentiable op also has an explicit `*_backward` function, for the model's
//! hand-written backward pass (`kiln_model::Llama::forward_backward`), which avoids candle's
//! per-node gradient bookkeeping on the training hot path.

mod adamw;
mod attention;
pub mod bandwidth;
pub mod bf16_gemm;
mod cross_entropy;
mod geglu;
mod inplace;
mod isa;
mod logprobs;
pub mod qkernels;
mod rms_norm;
mod rope;
pub mod rows;
mod softmax;
mod swiglu;
mod util;

pub use adamw::{
    adamw_step, reference_adamw_step, reference_sum_of_squares, sum_of_squares, AdamWParams,
};
pub use attention::{attention, attention_backward, reference_attention, AttentionMask};
pub use cross_entropy::{
    count_valid_targets, cross_entropy_backward, cross_entropy_sum, reference_cross_entropy_sum,
    IGNORE_INDEX,
};
pub use geglu::{gelu_tanh, gelu_tanh_gate, gelu_tanh_gate_backward};
pub use inplace::{add_in_place, index_add_rows, widen_into};
pub use isa::{active_isa, cpu_features, set_isa, Isa, IsaError};
pub use logprobs::{
    reference_token_logprobs_entropy, token_logprobs_backward, token_logprobs_entropy,
};
pub use qkernels::{q8_activations, set_q8_activations, RawKind, RawQ};
pub use rms_norm::{reference_rms_norm, rms_norm, rms_norm_backward};
pub use rope::{reference_rope, rope, rope_backward, rope_tables};
pub use softmax::{masked_softmax, masked_softmax_backward, reference_masked_softmax};
pub use swiglu::{reference_swiglu, swiglu, swiglu_backward};
