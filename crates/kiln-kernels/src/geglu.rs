//! GeGLU with the tanh approximation of GELU (Gemma's MLP gate), elementwise over two
//! same-shaped tensors.
//!
//! ```text
//! u         = c (g + 0.044715 g^3),   c = sqrt(2 / pi)
//! gelu(g)   = g/2 (1 + tanh u)
//! out       = gelu(gate) * up
//! gelu'(g)  = (1 + tanh u)/2 + g/2 (1 - tanh^2 u) c (1 + 3 * 0.044715 g^2)
//! d gate    = dy * up * gelu'(gate)
//! d up      = dy * gelu(gate)
//! ```
//!
//! Written as compositions of candle ops (any device and dtype); the MLP's matmuls dominate.

use candle_core::{bail, Result, Tensor};

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
const GELU_A: f64 = 0.044_715;

fn check(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        bail!(
            "gelu_tanh_gate: gate {:?} {:?} and up {:?} {:?} must match",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        )
    }
    Ok(())
}

/// `tanh(u)` of the approximation.
fn tanh_u(g: &Tensor) -> Result<Tensor> {
    ((g + (g.powf(3.0)? * GELU_A)?)? * GELU_C)?.tanh()
}

/// `gelu_tanh(g)` alone.
pub fn gelu_tanh(g: &Tensor) -> Result<Tensor> {
    ((tanh_u(g)? + 1.0)? * g)? * 0.5
}

/// `gelu_tanh(gate) * up`.
pub fn gelu_tanh_gate(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check(gate, up)?;
    gelu_tanh(gate)? * up
}

/// Explicit backward of [`gelu_tanh_gate`]: `(dgate, dup)`.
pub fn gelu_tanh_gate_backward(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    check(gate, up)?;
    let t = tanh_u(gate)?;
    let gelu = (((&t + 1.0)? * gate)? * 0.5)?;
    let sech2 = (1.0 - t.sqr()?)?;
    let du_dg = ((gate.sqr()? * (3.0 * GELU_A))? + 1.0)? * GELU_C;
    let dgelu = (((&t + 1.0)? * 0.5)? + ((gate * sech2)? * du_dg)?.affine(0.5, 0.0)?)?;
    Ok(((dy * up)?.mul(&dgelu)?, dy.mul(&gelu)?))
}
