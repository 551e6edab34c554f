//! `Linear`: every projection of the model, `y = x W^T (+ LoRA)`.
//!
//! The weight is dense (f32, what training updates) or GGML blocks (inference, and a frozen
//! base under LoRA). An optional LoRA adapter (Hu et al. 2021, in PEFT's layout) adds a
//! low-rank update without touching W:
//!
//! ```text
//! y = x W^T + s · (drop(x) A^T) B^T        A (r, in), B (out, r), s = alpha / r
//! ```
//!
//! [`Linear::forward_saving`] keeps what [`Linear::backward`] needs; the backward returns `dx`
//! and adds the gradients of whatever is trainable into the gradient buffer ([`Grads`]): W when
//! it is trainable, A and B when there is an adapter. A frozen weight gets no gradient at all
//! (and therefore no optimizer state). Gradient names follow PEFT: `<prefix>.weight`,
//! `<prefix>.lora_A.weight`, `<prefix>.lora_B.weight`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;

use crate::{Grads, ModelError, SplitMix64};
use kiln_kernels::qkernels::{RawKind, RawQ};

/// The weight of a projection, `(out, in)`.
#[derive(Clone)]
pub enum LinearWeight {
    /// f32 (or f64 in gradient checks), on any device.
    Dense(Tensor),
    /// GGML blocks with one of kiln's exact kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16,
    /// Q2_K ... Q6_K), owned or in a memory-mapped file.
    Raw(Arc<RawQ>),
    /// Other GGML types, through candle's quantised matmul (8-bit activations).
    Quant(Arc<QTensor>),
}

/// A LoRA adapter: `A (r, in)`, `B (out, r)`, scale `alpha / r`, dropout on the adapter's input.
#[derive(Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// PEFT's default init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)),
    /// B = 0, so a fresh adapter leaves the model unchanged.
    #[allow(clippy::too_many_arguments)] // shape, hyper-parameters, RNG and placement
    pub fn init(
        out_dim: usize,
        in_dim: usize,
        rank: usize,
        alpha: f64,
        dropout: f64,
        rng: &mut SplitMix64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        if rank == 0 {
            return Err(ModelError::Config("LoRA rank must be at least 1".into()));
        }
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..rank * in_dim)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        Ok(Self {
            a: Tensor::from_vec(a, (rank, in_dim), device)?.to_dtype(dtype)?,
            b: Tensor::zeros((out_dim, rank), dtype, device)?,
            scale: alpha / rank as f64,
            dropout,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// One of several adapters served side by side (a server picks one per row of a batch): `A
/// (r, in)` and `B (out, r)` as tensors for the prefill and as plain row-major values for the
/// decode rows, and the scale.
#[derive(Clone)]
pub struct ServedLora {
    a: Tensor,
    b: Tensor,
    a_vals: Arc<[f32]>,
    /// `B^T (r, out)`: each of the rank's columns of B contiguous, so adding `u_j B[:, j]`
    /// is one vectorised pass over the output.
    bt_vals: Arc<[f32]>,
    rank: usize,
    scale: f32,
}

impl ServedLora {
    pub fn new(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self, ModelError> {
        let to_vals = |t: &Tensor| -> Result<Arc<[f32]>, ModelError> {
            Ok(t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into())
        };
        Ok(Self {
            a: a.to_dtype(DType::F32)?,
            b: b.to_dtype(DType::F32)?,
            a_vals: to_vals(a)?,
            bt_vals: to_vals(&b.t()?.contiguous()?)?,
            rank: a.dims()[0],
            scale: scale as f32,
        })
    }

    /// `y += scale · B (A x)` for one row: the rank's `u = scale · A x` as dot products
    /// over the input, then `u_j` times each column of B added along the output.
    fn add_row(&self, x: &[f32], y: &mut [f32]) {
        let (k, n) = (x.len(), y.len());
        for j in 0..self.rank {
            let uj = self.scale * dot(&self.a_vals[j * k..(j + 1) * k], x);
            for (yo, b) in y.iter_mut().zip(&self.bt_vals[j * n..(j + 1) * n]) {
                *yo += uj * b;
            }
        }
    }
}

/// `y += scale · B (A x)` for one row, on plain values (`a (r, k)`, `b (n, r)` row-major).
fn add_lora_row(x: &[f32], a: &[f32], b: &[f32], rank: usize, scale: f32, y: &mut [f32]) {
    let k = x.len();
    let mut u = [0f32; 256];
    let u = if rank <= u.len() {
        &mut u[..rank]
    } else {
        return add_lora_row_wide(x, a, b, rank, scale, y);
    };
    for (j, uj) in u.iter_mut().enumerate() {
        *uj = scale * dot(&a[j * k..(j + 1) * k], x);
    }
    for (o, yo) in y.iter_mut().enumerate() {
        *yo += dot(&b[o * rank..(o + 1) * rank], u);
    }
}

/// [`add_lora_row`] for ranks past 256 (a heap buffer).
fn add_lora_row_wide(x: &[f32], a: &[f32], b: &[f32], rank: usize, scale: f32, y: &mut [f32]) {
    let k = x.len();
    let u: Vec<f32> = (0..rank)
        .map(|j| scale * dot(&a[j * k..(j + 1) * k], x))
        .collect();
    for (o, yo) in y.iter_mut().enumerate() {
        *yo += dot(&b[o * rank..(o + 1) * rank], &u);
    }
}

/// A dot product with eight partial sums, which the compiler keeps in one vector register.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// A projection `y = x W^T (+ LoRA)`; see the module docs.
#[derive(Clone)]
pub struct Linear {
    /// Parameter name prefix (`layers.0.attention.wq`), for gradient names.
    pub name: String,
    pub weight: LinearWeight,
    /// Whether W gets a gradient (false for a frozen base under LoRA).
    pub trainable: bool,
    pub lora: Option<Lora>,
    /// `(out)` bias added after the product (Qwen2's Q/K/V); it trains when W does.
    pub bias: Option<Tensor>,
    /// Adapters served side by side, by id - 1 (`None` where adapter `id` leaves this
    /// projection alone); rows pick one per decode step, see [`Linear::add_served_rows`].
    pub served: Vec<Option<ServedLora>>,
    /// Where the weight's gradient goes (the embedding's name for a tied output head).
    weight_grad_name: String,
    /// Mixed precision (`train.precision = "bf16"`): the dense weight's three training
    /// products (`x W^T`, `dy W`, `dy^T x`) round their inputs to bf16 and sum in f32.
    bf16_products: bool,
}

/// The arithmetic of the projections' matrix products in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 inputs, f32 sums.
    #[default]
    F32,
    /// Inputs rounded to bf16, products summed in f32 (`torch.autocast`'s bf16 matmuls, with
    /// f32 outputs); weights, gradients and the optimizer stay f32. Needs a CPU with
    /// AVX512-BF16: elsewhere there is no fast bf16 arithmetic, and the products stay f32.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// What this machine computes when asked for `self`: bf16 only where the CPU multiplies
    /// bf16 natively.
    pub fn effective(self) -> Precision {
        match self {
            Precision::Bf16 if kiln_kernels::bf16_gemm::bf16_products_available() => {
                Precision::Bf16
            }
            _ => Precision::F32,
        }
    }
}

/// `op(a) · op(b)` for 2-D f32 CPU tensors with bf16 products (`op` transposes where asked);
/// None when the tensors are elsewhere, in another dtype or not 2-D, or the CPU lacks
/// AVX512-BF16, and the caller computes the f32 product.
fn bf16_matmul(
    a: &Tensor,
    a_transposed: bool,
    b: &Tensor,
    b_transposed: bool,
) -> Result<Option<Tensor>, ModelError> {
    use kiln_kernels::bf16_gemm::{bf16_products_available, gemm_bf16, MatView};
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2;
    if !(on_cpu_f32(a) && on_cpu_f32(b) && bf16_products_available()) {
        return Ok(None);
    }
    let ((ar, ac), (br, bc)) = (a.dims2()?, b.dims2()?);
    fn view(data: &[f32], rows: usize, cols: usize, transposed: bool) -> MatView<'_> {
        if transposed {
            MatView::transposed(data, rows, cols)
        } else {
            MatView::row_major(data, rows, cols)
        }
    }
    let (m, n) = (
        if a_transposed { ac } else { ar },
        if b_transposed { br } else { bc },
    );
    let c = kiln_kernels::rows::with_values(a, |av| {
        kiln_kernels::rows::with_values(b, |bv| {
            gemm_bf16(
                &view(av, ar, ac, a_transposed),
                &view(bv, br, bc, b_transposed),
            )
        })
    })??;
    Ok(Some(Tensor::from_vec(c, (m, n), a.device())?))
}

/// What [`Linear::backward`] needs from the forward.
pub struct LinearCtx {
    x: Tensor,
    /// `drop(x)` for the adapter, `drop(x) A^T` and the dropout mask, when there is an adapter.
    lora: Option<(Tensor, Tensor, Option<Tensor>)>,
}

impl LinearWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize), ModelError> {
        Ok(match self {
            LinearWeight::Dense(w) => w.dims2()?,
            LinearWeight::Raw(r) => (r.n, r.k),
            LinearWeight::Quant(q) => q.shape().dims2()?,
        })
    }

    /// The GGML type of the weight (F32 for dense ones).
    pub fn ggml_dtype(&self) -> GgmlDType {
        match self {
            LinearWeight::Dense(_) => GgmlDType::F32,
            LinearWeight::Raw(r) => match r.kind {
                RawKind::Q4_0 => GgmlDType::Q4_0,
                RawKind::Q4_1 => GgmlDType::Q4_1,
                RawKind::Q8_0 => GgmlDType::Q8_0,
                RawKind::F16 => GgmlDType::F16,
                RawKind::Q5_0 => GgmlDType::Q5_0,
                RawKind::Q5_1 => GgmlDType::Q5_1,
                RawKind::Q4K => GgmlDType::Q4K,
                RawKind::Q5K => GgmlDType::Q5K,
                RawKind::Q6K => GgmlDType::Q6K,
                RawKind::Q2K => GgmlDType::Q2K,
                RawKind::Q3K => GgmlDType::Q3K,
                RawKind::BF16 => GgmlDType::BF16,
            },
            LinearWeight::Quant(q) => q.dtype(),
        }
    }

    /// Dequantised `(out, in)` f32 (the dense tensor itself when dense).
    pub fn dequantize(&self) -> Result<Tensor, ModelError> {
        Ok(match self {
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Raw(r) => Tensor::from_vec(r.dequantize(), (r.n, r.k), &Device::Cpu)?,
            LinearWeight::Quant(q) => q.dequantize(&Device::Cpu)?,
        })
    }

    /// `x (m, in)` → `x W^T (m, out)`.
    fn matmul(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            LinearWeight::Dense(w) => Ok(x.matmul(&w.t()?)?),
            LinearWeight::Raw(r) => {
                let m = x.dims2()?.0;
                let xs = x
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok(Tensor::from_vec(r.matmul(&xs, m), (m, r.n), x.device())?)
            }
            LinearWeight::Quant(q) => Ok(QMatMul::QTensor(q.clone()).forward(x)?),
        }
    }

    /// `x (m, in)` row-major values → `(m, out)` row-major, without tensor ops for kiln's
    /// block kernels (the decode fast path).
    pub(crate) fn matmul_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>, ModelError> {
        match self {
            LinearWeight::Raw(r) => Ok(r.matmul(x, m)),
            _ => {
                let (_, k) = self.dims()?;
                let xt = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
                let xt = match self {
                    LinearWeight::Dense(w) => xt.to_device(w.device())?.to_dtype(w.dtype())?,
                    _ => xt,
                };
                Ok(self
                    .matmul(&xt)?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1()?)
            }
        }
    }
}

impl Linear {
    /// A trainable dense projection named `name` (`layers.0.attention.wq`).
    pub fn dense(name: &str, w: Tensor) -> Self {
        Self::new(name, LinearWeight::Dense(w), true)
    }

    pub fn new(name: &str, weight: LinearWeight, trainable: bool) -> Self {
        Self {
            name: name.to_string(),
            weight,
            trainable,
            lora: None,
            bias: None,
            served: Vec::new(),
            weight_grad_name: format!("{name}.weight"),
            bf16_products: false,
        }
    }

    /// Sets the arithmetic of the dense weight's training products (see [`Precision`]).
    pub fn set_precision(&mut self, precision: Precision) {
        self.bf16_products = precision == Precision::Bf16;
    }

    /// `x W^T`: with bf16 products when asked and possible, else the weight's own product.
    fn weight_product(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        if let (true, LinearWeight::Dense(w)) = (self.bf16_products, &self.weight) {
            if let Some(y) = bf16_matmul(x, false, w, true)? {
                return Ok(y);
            }
        }
        self.weight.matmul(x)
    }

    /// The same projection with a bias `(out)`.
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    pub fn bias_name(&self) -> String {
        format!("{}.bias", self.name)
    }

    /// `y + b` (rows of `y (m, out)`), when there is a bias.
    fn add_bias(&self, y: Tensor) -> Result<Tensor, ModelError> {
        match &self.bias {
            None => Ok(y),
            Some(b) => Ok(y.broadcast_add(b)?),
        }
    }

    /// Sends the weight's gradient to another parameter (a tied output head's gradient goes
    /// to the embedding table).
    pub(crate) fn with_weight_grad_name(mut self, name: &str) -> Self {
        self.weight_grad_name = name.to_string();
        self
    }

    pub fn weight_grad_name(&self) -> &str {
        &self.weight_grad_name
    }

    pub fn lora_a_name(&self) -> String {
        format!("{}.lora_A.weight", self.name)
    }

    pub fn lora_b_name(&self) -> String {
        format!("{}.lora_B.weight", self.name)
    }

    /// Inference forward (no dropout): `x (m, in)` → `(m, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let y = self.add_bias(self.weight_product(x)?)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                // Scale the (m, r) factor, not the (m, out) product: one pass less.
                let delta = (x.matmul(&l.a.t()?)? * l.scale)?.matmul(&l.b.t()?)?;
                Ok((y + delta)?)
            }
        }
    }

    /// Training forward: also returns what the backward needs. `dropout_rng` draws the
    /// adapter's dropout mask (inverted dropout) when the adapter has dropout.
    pub fn forward_saving(
        &self,
        x: &Tensor,
        dropout_rng: Option<&mut SplitMix64>,
    ) -> Result<(Tensor, LinearCtx), ModelError> {
        let y = self.add_bias(self.weight_product(x)?)?;
        let Some(l) = &self.lora else {
            return Ok((
                y,
                LinearCtx {
                    x: x.clone(),
                    lora: None,
                },
            ));
        };
        let mask = match dropout_rng {
            Some(rng) if l.dropout > 0.0 => Some(dropout_mask(x, l.dropout, rng)?),
            _ => None,
        };
        let xd = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let u = xd.matmul(&l.a.t()?)?; // (m, r)
                                       // The hand-written path (no autograd graph): scale the small (m, r) factor and add the
                                       // (m, out) update into y in place, so the adapter costs two skinny matmuls and one pass.
        let delta = (&u * l.scale)?.matmul(&l.b.t()?)?;
        kiln_kernels::add_in_place(&y, &delta)?;
        Ok((
            y,
            LinearCtx {
                x: x.clone(),
                lora: Some((xd, u, mask)),
            },
        ))
    }

    /// Backward of [`Linear::forward_saving`]: adds the trainable gradients into `grads`,
    /// returns `dx (m, in)`.
    pub fn backward(
        &self,
        ctx: LinearCtx,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor, ModelError> {
        let bf16_dense = self.bf16_products && matches!(self.weight, LinearWeight::Dense(_));
        if self.trainable {
            let dw = match bf16_dense {
                true => bf16_matmul(dy, true, &ctx.x, false)?,
                false => None,
            };
            let dw = match dw {
                Some(dw) => dw,
                None => dy.t()?.matmul(&ctx.x)?,
            };
            grads.accumulate(&self.weight_grad_name, &dw)?;
            if self.bias.is_some() {
                grads.accumulate(&self.bias_name(), &dy.sum(0)?)?;
            }
        }
        let w = match &self.weight {
            LinearWeight::Dense(w) => w.clone(),
            // A frozen quantised base (QLoRA): dx needs W, dequantised on the fly.
            other => other.dequantize()?.to_dtype(dy.dtype())?,
        };
        let dx = match bf16_dense {
            true => bf16_matmul(dy, false, &w, false)?,
            false => None,
        };
        let dx = match dx {
            Some(dx) => dx,
            None => dy.matmul(&w)?,
        };
        if let (Some(l), Some((xd, u, mask))) = (&self.lora, ctx.lora) {
            let du = (dy.matmul(&l.b)? * l.scale)?; // (m, r)
            grads.accumulate(&self.lora_b_name(), &(dy.t()?.matmul(&u)? * l.scale)?)?;
            grads.accumulate(&self.lora_a_name(), &du.t()?.matmul(&xd)?)?;
            // d(drop(x)) = du A; dropout's backward multiplies by the same mask.
            let dxd = du.matmul(&l.a)?;
            let dxd = match mask {
                Some(m) => (dxd * m)?,
                None => dxd,
            };
            kiln_kernels::add_in_place(&dx, &dxd)?;
        }
        Ok(dx)
    }

    /// Single-row or few-row forward on plain values (the decode fast path), adapter included.
    pub(crate) fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>, ModelError> {
        let mut y = self.weight.matmul_rows(x, m)?;
        if let Some(b) = &self.bias {
            kiln_kernels::rows::with_values(b, |b| {
                for row in y.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
            })?;
        }
        self.add_lora_rows(x, m, &mut y)?;
        Ok(y)
    }

    /// Adds the attached adapter's `s · B (A x)` to `y (m, out)` for rows `x (m, in)`: plain
    /// loops over the adapter's values, two skinny products per row, no tensor ops (which
    /// cost more than the products at decode sizes).
    pub(crate) fn add_lora_rows(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<(), ModelError> {
        let Some(l) = &self.lora else {
            return Ok(());
        };
        if m == 0 {
            return Ok(());
        }
        let (n, k) = (y.len() / m, x.len() / m);
        let rank = l.rank();
        kiln_kernels::rows::with_values(&l.a, |a| {
            kiln_kernels::rows::with_values(&l.b, |b| {
                for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                    add_lora_row(xr, a, b, rank, l.scale as f32, yr);
                }
            })
        })??;
        Ok(())
    }

    /// Adds each row's served adapter (`ids[i]`, 0 for none) to `y (m, out)`, computed from
    /// `x (m, in)`.
    pub(crate) fn add_served_rows(&self, x: &[f32], m: usize, ids: &[u16], y: &mut [f32]) {
        if self.served.is_empty() || m == 0 {
            return;
        }
        let (n, k) = (y.len() / m, x.len() / m);
        for (i, &id) in ids.iter().enumerate() {
            if let Some(Some(s)) = id.checked_sub(1).and_then(|j| self.served.get(j as usize)) {
                s.add_row(&x[i * k..(i + 1) * k], &mut y[i * n..(i + 1) * n]);
            }
        }
    }

    /// [`Linear::forward`] plus served adapter `id` (0: none), on the tensor path (prefill).
    pub(crate) fn forward_served(&self, x: &Tensor, id: u16) -> Result<Tensor, ModelError> {
        let y = self.forward(x)?;
        self.add_served(x, id, y)
    }

    /// `y` plus served adapter `id`'s `s · x A^T B^T` (0 or an adapter that leaves this
    /// projection alone: `y` as it is).
    pub(crate) fn add_served(&self, x: &Tensor, id: u16, y: Tensor) -> Result<Tensor, ModelError> {
        match id.checked_sub(1).and_then(|j| self.served.get(j as usize)) {
            Some(Some(s)) => {
                let xs = x.to_dtype(DType::F32)?;
                let delta = (xs.matmul(&s.a.t()?)? * s.scale as f64)?.matmul(&s.b.t()?)?;
                let delta = delta.to_dtype(y.dtype())?;
                Ok((y + delta)?)
            }
            _ => Ok(y),
        }
    }

    /// `W + s B A` as a dense weight, and no adapter: the merged projection.
    pub fn merged(&self) -> Result<Linear, ModelError> {
        let Some(l) = &self.lora else {
            return Ok(self.clone());
        };
        let w = self.weight.dequantize()?.to_device(l.a.device())?;
        let w = (w.to_dtype(l.a.dtype())? + (l.b.matmul(&l.a)? * l.scale)?)?;
        let mut out = Linear::new(&self.name, LinearWeight::Dense(w), self.trainable)
            .with_bias(self.bias.clone());
        out.weight_grad_name = self.weight_grad_name.clone();
        Ok(out)
    }
}

/// Inverted dropout mask: 0 with probability p, 1/(1-p) otherwise, drawn from `rng` so a
/// resumed run draws the same masks.
pub(crate) fn dropout_mask(x: &Tensor, p: f64, rng: &mut SplitMix64) -> Result<Tensor, ModelError> {
    let keep_scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep_scale })
        .collect();
    Ok(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

static CANDLE_QMATMUL: AtomicBool = AtomicBool::new(false);

/// Process-wide choice for quantised matmuls: `true` sends every quantised weight through
/// candle's matmul (llama.cpp-style 8-bit activations) instead of kiln's exact kernels, for
/// comparisons. Takes effect for models built afterwards.
pub fn set_candle_qmatmul(on: bool) {
    CANDLE_QMATMUL.store(on, Ordering::Relaxed);
}

fn raw_kind(d: GgmlDType) -> Option<RawKind> {
    match d {
        GgmlDType::Q4_0 => Some(RawKind::Q4_0),
        GgmlDType::Q4_1 => Some(RawKind::Q4_1),
        GgmlDType::Q8_0 => Some(RawKind::Q8_0),
        GgmlDType::F16 => Some(RawKind::F16),
        GgmlDType::Q5_0 => Some(RawKind::Q5_0),
        GgmlDType::Q5_1 => Some(RawKind::Q5_1),
        GgmlDType::Q4K => Some(RawKind::Q4K),
        GgmlDType::Q5K => Some(RawKind::Q5K),
        GgmlDType::Q6K => Some(RawKind::Q6K),
        GgmlDType::Q2K => Some(RawKind::Q2K),
        GgmlDType::Q3K => Some(RawKind::Q3K),
        GgmlDType::BF16 => Some(RawKind::BF16),
        _ => None,
    }
}

/// Rows quantised at a time by [`LinearWeight::quantize`]: about 16 MB of f32.
const QUANTIZE_CHUNK_VALUES: usize = 4 << 20;

impl LinearWeight {
    /// `w (out, in)` in f32 quantised to `dtype` (a matrix whose rows are not whole blocks, or
    /// `F32`, stays dense). Types with a kiln kernel are quantised a few rows at a time into
    /// one buffer, so the only temporary is one chunk (blocks never cross rows, so this is
    /// byte for byte the whole-matrix result); the rest go through candle whole.
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<Self, ModelError> {
        let (n, k) = w.dims2()?;
        if dtype == GgmlDType::F32 || !k.is_multiple_of(dtype.block_size()) {
            // A compact copy, not a view into a larger buffer (the flat parameters).
            return Ok(LinearWeight::Dense(
                w.to_dtype(DType::F32)?.force_contiguous()?,
            ));
        }
        let kind = raw_kind(dtype).filter(|_| !CANDLE_QMATMUL.load(Ordering::Relaxed));
        let Some(kind) = kind else {
            // Candle's quantize reads the whole storage, not a view into it: compact first.
            return Self::from_qtensor(QTensor::quantize(&w.force_contiguous()?, dtype)?);
        };
        let rows = (QUANTIZE_CHUNK_VALUES / k).max(1);
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let mut bytes = vec![0u8; n * row_bytes];
        // Chunks in parallel, each into its own rows of the buffer.
        bytes
            .par_chunks_mut(rows * row_bytes)
            .enumerate()
            .try_for_each(|(i, dst)| -> Result<(), ModelError> {
                let chunk = w.narrow(0, i * rows, dst.len() / row_bytes)?;
                let q = QTensor::quantize(&chunk.force_contiguous()?, dtype)?;
                dst.copy_from_slice(&q.data()?);
                Ok(())
            })?;
        let raw = RawQ::new(kind, n, k, bytes).ok_or_else(|| {
            ModelError::Config(format!(
                "cannot hold {dtype:?} blocks of a ({n}, {k}) matrix"
            ))
        })?;
        Ok(LinearWeight::Raw(Arc::new(raw)))
    }

    /// A matrix `(n, k)` over GGML blocks that already lie in memory (a mapped file), for a
    /// type with a kiln kernel; `None` for other types (or when candle's matmul is forced).
    pub fn mapped(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        bytes: kiln_kernels::qkernels::SharedBytes,
    ) -> Option<Self> {
        let kind = raw_kind(dtype).filter(|_| !CANDLE_QMATMUL.load(Ordering::Relaxed))?;
        let raw = RawQ::from_shared(kind, n, k, bytes)?;
        Some(LinearWeight::Raw(Arc::new(raw)))
    }

    /// Wraps a GGML tensor `(out, in)`: types with a kiln kernel keep their blocks (copied
    /// out of the tensor); F32, and F16/BF16 rows that are not whole 32-value blocks, become
    /// dense f32; the rest go through candle.
    pub fn from_qtensor(q: QTensor) -> Result<Self, ModelError> {
        let (n, k) = q.shape().dims2()?;
        if let (Some(kind), false) = (raw_kind(q.dtype()), CANDLE_QMATMUL.load(Ordering::Relaxed)) {
            if let Some(r) = RawQ::new(kind, n, k, q.data()?.into_owned()) {
                return Ok(LinearWeight::Raw(Arc::new(r)));
            }
        }
        Ok(match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                LinearWeight::Dense(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
            }
            _ => LinearWeight::Quant(Arc::new(q)),
        })
    }
}
