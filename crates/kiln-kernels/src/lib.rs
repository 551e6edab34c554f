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
//! | [`swiglu`] | gate, up (any, equal) -> same |
//! | [`cross_entropy_sum`] | logits (n, v), targets (n) i64 -> () |
//! | [`adamw_step`] | in place on param / m / v |

mod adamw;
mod cross_entropy;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;
mod util;

pub use adamw::{
    adamw_step, reference_adamw_step, reference_sum_of_squares, sum_of_squares, AdamWParams,
};
pub use cross_entropy::{
    count_valid_targets, cross_entropy_sum, reference_cross_entropy_sum, IGNORE_INDEX,
};
pub use rms_norm::{reference_rms_norm, rms_norm};
pub use rope::{reference_rope, rope, rope_tables};
pub use softmax::{masked_softmax, reference_masked_softmax};
pub use swiglu::{reference_swiglu, swiglu};
