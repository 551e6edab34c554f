//! Fused ops vs their reference compositions (forward and backward, f32 and f64) and
//! finite-difference gradient checks of the fused backward passes (f64).

use candle_core::{DType, Device, Result, Tensor, Var, D};
use kiln_kernels::*;
use kiln_testutil::{assert_close, gradcheck, uniform_tensor, Tol};

const EPS_FD: f64 = 1e-6;
const GRADCHECK_MAX: f64 = 1e-5;
/// Fused vs reference in f64: both are exact up to rounding.
const TIGHT_F64: Tol = Tol {
    rel: 1e-10,
    abs: 1e-12,
};

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Runs `fused` and `reference` on the same inputs (cast to `dtype`), and compares the outputs and
/// the gradients of `sum(out * r)` for the inputs listed in `wrt`.
fn compare(
    name: &str,
    fused: &OpFn,
    reference: &OpFn,
    inputs: &[Tensor],
    wrt: &[usize],
    dtype: DType,
) {
    let (fwd_tol, grad_tol) = match dtype {
        DType::F32 => (Tol::OP_F32, Tol::GRAD_F32),
        _ => (TIGHT_F64, TIGHT_F64),
    };
    let run = |f: &OpFn| -> (Tensor, Vec<Tensor>) {
        let mut vars = Vec::new();
        let xs: Vec<Tensor> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype).unwrap()
                } else {
                    t.clone()
                };
                if wrt.contains(&i) {
                    let v = Var::from_tensor(&t).unwrap();
                    vars.push(v.clone());
                    v.as_tensor().clone()
                } else {
                    t
                }
            })
            .collect();
        let out = f(&xs).unwrap();
        let r = uniform_tensor(99, out.dims(), dtype).unwrap();
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).expect("missing grad").clone())
            .collect();
        (out, gs)
    };
    let (out_f, grads_f) = run(fused);
    let (out_r, grads_r) = run(reference);
    assert_eq!(out_f.dtype(), dtype, "{name}: output dtype");
    assert!(
        out_f.is_contiguous(),
        "{name}: fused output must be contiguous"
    );
    assert_close(&format!("{name} fwd {dtype:?}"), &out_f, &out_r, fwd_tol);
    for (k, (gf, gr)) in grads_f.iter().zip(&grads_r).enumerate() {
        assert_close(
            &format!("{name} grad[{}] {dtype:?}", wrt[k]),
            gf,
            gr,
            grad_tol,
        );
    }
}

fn compare_both(name: &str, fused: &OpFn, reference: &OpFn, inputs: &[Tensor], wrt: &[usize]) {
    compare(name, fused, reference, inputs, wrt, DType::F32);
    compare(name, fused, reference, inputs, wrt, DType::F64);
}

fn rand(seed: u64, shape: &[usize]) -> Tensor {
    uniform_tensor(seed, shape, DType::F64).unwrap()
}

fn check_grad(
    name: &str,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    wrt: &[usize],
) {
    let err = gradcheck(f, inputs, wrt, EPS_FD).unwrap();
    assert!(err < GRADCHECK_MAX, "{name}: gradcheck max rel err {err:e}");
}

// ---------------------------------------------------------------- rms_norm

#[test]
fn rms_norm_matches_reference() {
    let f = |xs: &[Tensor]| rms_norm(&xs[0], &xs[1], 1e-5);
    let r = |xs: &[Tensor]| reference_rms_norm(&xs[0], &xs[1], 1e-5);
    compare_both(
        "rms_norm small",
        &f,
        &r,
        &[rand(1, &[2, 3, 8]), rand(2, &[8])],
        &[0, 1],
    );
    // Many rows and an odd width: exercises multiple dw partial-sum blocks and lane remainders.
    compare_both(
        "rms_norm big",
        &f,
        &r,
        &[rand(3, &[97, 131]), rand(4, &[131])],
        &[0, 1],
    );
}

#[test]
fn rms_norm_non_contiguous_input() {
    let x = rand(5, &[6, 4]).t().unwrap(); // (4, 6), strided
    let w = rand(6, &[6]);
    let f = |xs: &[Tensor]| rms_norm(&xs[0], &xs[1], 1e-6);
    let r = |xs: &[Tensor]| reference_rms_norm(&xs[0], &xs[1], 1e-6);
    compare_both("rms_norm strided", &f, &r, &[x, w], &[0, 1]);
}

#[test]
fn rms_norm_gradcheck() {
    let f = |xs: &[Tensor]| rms_norm(&xs[0], &xs[1], 1e-5);
    check_grad("rms_norm", f, &[rand(7, &[3, 5]), rand(8, &[5])], &[0, 1]);
}

#[test]
fn rms_norm_rejects_bad_weight() {
    let e = rms_norm(&rand(1, &[2, 4]), &rand(2, &[3]), 1e-5).unwrap_err();
    assert!(e.to_string().contains("weight"), "{e}");
}

// ---------------------------------------------------------------- rope

fn tables(hd: usize, t: usize) -> (Tensor, Tensor) {
    rope_tables(hd, t, 10_000.0, &Device::Cpu, DType::F64).unwrap()
}

#[test]
fn rope_tables_values() {
    let (cos, sin) = rope_tables(8, 5, 500.0, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(cos.dims(), [5, 4]);
    let cos = cos.to_vec2::<f32>().unwrap();
    let sin = sin.to_vec2::<f32>().unwrap();
    for p in 0..5 {
        for i in 0..4 {
            let a = p as f64 * 500f64.powf(-(2.0 * i as f64) / 8.0);
            assert!((cos[p][i] as f64 - a.cos()).abs() < 1e-6);
            assert!((sin[p][i] as f64 - a.sin()).abs() < 1e-6);
        }
    }
}

#[test]
fn rope_matches_reference() {
    let (cos, sin) = tables(8, 3);
    let f = |xs: &[Tensor]| rope(&xs[0], &xs[1], &xs[2]);
    let r = |xs: &[Tensor]| reference_rope(&xs[0], &xs[1], &xs[2]);
    compare_both("rope", &f, &r, &[rand(10, &[2, 3, 3, 8]), cos, sin], &[0]);
    // Decode step: t = 1 at position 6 of a longer table.
    let (cos, sin) = tables(6, 10);
    let (c1, s1) = (cos.narrow(0, 6, 1).unwrap(), sin.narrow(0, 6, 1).unwrap());
    compare_both("rope t=1", &f, &r, &[rand(11, &[1, 2, 1, 6]), c1, s1], &[0]);
    // Strided x (the usual q after a transpose from (b, t, h, hd)).
    let x = rand(12, &[2, 4, 3, 8]).transpose(1, 2).unwrap(); // (2, 3, 4, 8)
    let (cos, sin) = tables(8, 4);
    compare_both("rope strided", &f, &r, &[x, cos, sin], &[0]);
}

#[test]
fn rope_hand_value() {
    // hd = 2: a single pair rotated by angle p (theta^0 = 1).
    let x = Tensor::new(&[1.0f64, 2.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 1, 2))
        .unwrap();
    let (cos, sin) = tables(2, 4);
    let (c, s) = (cos.narrow(0, 3, 1).unwrap(), sin.narrow(0, 3, 1).unwrap());
    let y = rope(&x, &c, &s)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let (ca, sa) = (3f64.cos(), 3f64.sin());
    assert!((y[0] - (ca - 2.0 * sa)).abs() < 1e-12 && (y[1] - (2.0 * ca + sa)).abs() < 1e-12);
}

#[test]
fn rope_gradcheck() {
    let f = |xs: &[Tensor]| rope(&xs[0], &xs[1], &xs[2]);
    let (cos, sin) = tables(4, 3);
    check_grad("rope", f, &[rand(13, &[1, 2, 3, 4]), cos, sin], &[0]);
    let (cos, sin) = tables(6, 1);
    check_grad("rope t=1", f, &[rand(14, &[2, 1, 1, 6]), cos, sin], &[0]);
}

// ---------------------------------------------------------------- masked_softmax

#[test]
fn masked_softmax_matches_reference() {
    for (shape, causal) in [
        ([2, 2, 4, 4], true),
        ([1, 2, 3, 5], true), // KV-cache prefill of a chunk: tq < tk
        ([2, 1, 1, 6], true), // decode: tq = 1 sees everything
        ([1, 3, 3, 4], false),
        ([1, 1, 33, 33], true), // lane remainders
    ] {
        let f = move |xs: &[Tensor]| masked_softmax(&(&xs[0] * 3.0)?, 0.35, causal);
        let r = move |xs: &[Tensor]| reference_masked_softmax(&(&xs[0] * 3.0)?, 0.35, causal);
        compare_both(
            &format!("softmax {shape:?} causal={causal}"),
            &f,
            &r,
            &[rand(20, &shape)],
            &[0],
        );
    }
}

#[test]
fn masked_softmax_mask_is_exact() {
    let (tq, tk) = (3, 5);
    let y = masked_softmax(
        &rand(21, &[1, 1, tq, tk]).to_dtype(DType::F32).unwrap(),
        1.0,
        true,
    )
    .unwrap()
    .reshape((tq, tk))
    .unwrap()
    .to_vec2::<f32>()
    .unwrap();
    for (i, row) in y.iter().enumerate() {
        for (j, &p) in row.iter().enumerate() {
            if j > i + (tk - tq) {
                assert_eq!(p, 0.0, "masked ({i},{j})");
            } else {
                assert!(p > 0.0, "visible ({i},{j})");
            }
        }
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    let e = masked_softmax(&rand(1, &[1, 1, 4, 3]), 1.0, true).unwrap_err();
    assert!(e.to_string().contains("tq <= tk"), "{e}");
}

#[test]
fn masked_softmax_gradcheck() {
    for (shape, causal) in [
        ([1, 2, 3, 3], true),
        ([2, 1, 2, 4], true),
        ([1, 2, 1, 4], true),
        ([1, 1, 2, 3], false),
    ] {
        let f = move |xs: &[Tensor]| masked_softmax(&xs[0], 0.7, causal);
        check_grad(
            &format!("softmax {shape:?} causal={causal}"),
            f,
            &[rand(22, &shape)],
            &[0],
        );
    }
}

// ---------------------------------------------------------------- swiglu

#[test]
fn swiglu_matches_reference() {
    let f = |xs: &[Tensor]| swiglu(&(&xs[0] * 4.0)?, &xs[1]);
    let r = |xs: &[Tensor]| reference_swiglu(&(&xs[0] * 4.0)?, &xs[1]);
    compare_both(
        "swiglu",
        &f,
        &r,
        &[rand(30, &[3, 7]), rand(31, &[3, 7])],
        &[0, 1],
    );
    let big = [5, 7000]; // several elementwise chunks
    compare_both(
        "swiglu big",
        &f,
        &r,
        &[rand(32, &big), rand(33, &big)],
        &[0, 1],
    );
}

#[test]
fn swiglu_gradcheck() {
    let f = |xs: &[Tensor]| swiglu(&xs[0], &xs[1]);
    check_grad(
        "swiglu",
        f,
        &[(rand(34, &[2, 5]) * 3.0).unwrap(), rand(35, &[2, 5])],
        &[0, 1],
    );
}

// ---------------------------------------------------------------- cross_entropy

fn targets(t: &[i64]) -> Tensor {
    Tensor::new(t, &Device::Cpu).unwrap()
}

#[test]
fn cross_entropy_matches_reference() {
    let f = |xs: &[Tensor]| cross_entropy_sum(&(&xs[0] * 5.0)?, &xs[1]);
    let r = |xs: &[Tensor]| reference_cross_entropy_sum(&(&xs[0] * 5.0)?, &xs[1]);
    let t = targets(&[3, -100, 0, 6, -100]);
    compare_both("ce", &f, &r, &[rand(40, &[5, 7]), t], &[0]);
    let t = targets(&[-100, -100]);
    compare_both("ce all ignored", &f, &r, &[rand(41, &[2, 7]), t], &[0]);
}

#[test]
fn cross_entropy_hand_value() {
    let logits = Tensor::new(&[[1.0f64, 2.0, 3.0], [0.5, 0.5, 0.5]], &Device::Cpu).unwrap();
    let loss = cross_entropy_sum(&logits, &targets(&[2, 0])).unwrap();
    assert_eq!(loss.dims(), [] as [usize; 0]);
    let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    let want = (lse0 - 3.0) + 3f64.ln();
    assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    let none = cross_entropy_sum(&logits, &targets(&[-100, -100])).unwrap();
    assert_eq!(none.to_scalar::<f64>().unwrap(), 0.0);
    assert_eq!(
        count_valid_targets(&targets(&[1, -100, 0, -100, 4])).unwrap(),
        3
    );
}

#[test]
fn cross_entropy_gradcheck() {
    let f = |xs: &[Tensor]| cross_entropy_sum(&xs[0], &xs[1]);
    check_grad(
        "ce",
        f,
        &[rand(42, &[4, 5]), targets(&[4, -100, 0, 2])],
        &[0],
    );
    check_grad(
        "ce all ignored",
        f,
        &[rand(43, &[2, 5]), targets(&[-100, -100])],
        &[0],
    );
}

#[test]
fn cross_entropy_bad_target_names_row() {
    let logits = rand(44, &[5, 4]);
    for bad in [4i64, -1, 1000] {
        let t = targets(&[0, 1, -100, bad, 2]);
        for (which, res) in [
            ("fused", cross_entropy_sum(&logits, &t)),
            ("reference", reference_cross_entropy_sum(&logits, &t)),
        ] {
            let msg = res.expect_err(which).to_string();
            assert!(
                msg.contains("row 3") && msg.contains(&bad.to_string()),
                "{which}: {msg}"
            );
        }
    }
    let e = cross_entropy_sum(&logits, &rand(1, &[5])).unwrap_err();
    assert!(e.to_string().contains("i64"), "{e}");
}

// ---------------------------------------------------------------- adamw

/// Plain scalar AdamW, exactly as torch.optim.AdamW (plus grad_scale), for three steps.
fn hand_adamw(p0: &[f64], grads: &[Vec<f64>], hp: &AdamWParams) -> Vec<f64> {
    let mut p = p0.to_vec();
    let mut m = vec![0.0; p.len()];
    let mut v = vec![0.0; p.len()];
    for (k, g) in grads.iter().enumerate() {
        let t = (k + 1) as i32;
        for i in 0..p.len() {
            let g = g[i] * hp.grad_scale;
            p[i] *= 1.0 - hp.lr * hp.weight_decay;
            m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
            v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
            let mhat = m[i] / (1.0 - hp.beta1.powi(t));
            let vhat = v[i] / (1.0 - hp.beta2.powi(t));
            p[i] -= hp.lr * mhat / (vhat.sqrt() + hp.eps);
        }
    }
    p
}

#[test]
fn adamw_matches_hand_computation() {
    let n = 37;
    let p0 = kiln_testutil::uniform_vec(50, n);
    let grads: Vec<Vec<f64>> = (0..3)
        .map(|k| kiln_testutil::uniform_vec(51 + k, n))
        .collect();
    let base = AdamWParams {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 0.5,
    };
    let want = hand_adamw(&p0, &grads, &base);
    type StepFn = fn(&Tensor, &Tensor, &Tensor, &Tensor, &AdamWParams) -> Result<()>;
    let impls: [(&str, StepFn); 2] = [("fused", adamw_step), ("reference", reference_adamw_step)];
    for dtype in [DType::F32, DType::F64] {
        for (which, step_fn) in impls {
            let dev = Device::Cpu;
            let p = Var::from_tensor(
                &Tensor::new(p0.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let m = Var::zeros(n, dtype, &dev).unwrap();
            let v = Var::zeros(n, dtype, &dev).unwrap();
            for (k, g) in grads.iter().enumerate() {
                let g = Tensor::new(g.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let hp = AdamWParams {
                    step: k as u64 + 1,
                    ..base
                };
                step_fn(&p, &g, &m, &v, &hp).unwrap();
            }
            let got = p
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-6, "{which} {dtype:?} [{i}]: {g} vs {w}");
            }
        }
    }
}

/// AdamW over a range of flat buffers (views with a non-zero start offset) equals AdamW over
/// separate tensors, and leaves the rest of the buffers alone.
#[test]
fn adamw_on_views_of_flat_buffers_equals_separate_tensors() {
    let (n, off, total) = (40_000, 123, 40_300); // several rayon chunks
    let dev = Device::Cpu;
    let hp = AdamWParams {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 0.7,
    };
    type StepFn = fn(&Tensor, &Tensor, &Tensor, &Tensor, &AdamWParams) -> Result<()>;
    let impls: [(&str, StepFn); 2] = [("fused", adamw_step), ("reference", reference_adamw_step)];
    for dtype in [DType::F32, DType::F64] {
        for (which, step_fn) in impls {
            let flat_p = uniform_tensor(70, &[total], dtype).unwrap();
            let flat_g = uniform_tensor(71, &[total], dtype).unwrap();
            let flat_m = Tensor::zeros(total, dtype, &dev).unwrap();
            let flat_v = Tensor::zeros(total, dtype, &dev).unwrap();
            let view = |t: &Tensor| t.narrow(0, off, n).unwrap().reshape((200, 200)).unwrap();
            let (p, g, m, v) = (view(&flat_p), view(&flat_g), view(&flat_m), view(&flat_v));
            let (p2, m2, v2) = (p.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
            let before = flat_p
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for step in 1..=2 {
                let hp = AdamWParams { step, ..hp };
                step_fn(&p, &g, &m, &v, &hp).unwrap();
                step_fn(&p2, &g.copy().unwrap(), &m2, &v2, &hp).unwrap();
            }
            assert_close(&format!("{which} {dtype:?} param"), &p, &p2, TIGHT_F64);
            assert_close(&format!("{which} {dtype:?} m"), &m, &m2, TIGHT_F64);
            assert_close(&format!("{which} {dtype:?} v"), &v, &v2, TIGHT_F64);
            let after = flat_p
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert_eq!(before[..off], after[..off], "{which}: before the view");
            assert_eq!(
                before[off + n..],
                after[off + n..],
                "{which}: after the view"
            );
            assert_ne!(before[off], after[off]);
        }
    }
}

#[test]
fn adamw_rejects_bad_inputs() {
    let dev = Device::Cpu;
    let p = Var::zeros(4, DType::F32, &dev).unwrap();
    let m = Var::zeros(4, DType::F32, &dev).unwrap();
    let v = Var::zeros(4, DType::F32, &dev).unwrap();
    let hp = AdamWParams {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
        grad_scale: 1.0,
    };
    let g = Tensor::zeros(4, DType::F32, &dev).unwrap();
    assert!(adamw_step(&p, &g, &m, &v, &hp).is_err(), "step 0");
    let g5 = Tensor::zeros(5, DType::F32, &dev).unwrap();
    assert!(
        adamw_step(&p, &g5, &m, &v, &AdamWParams { step: 1, ..hp }).is_err(),
        "shape"
    );
}

// ---------------------------------------------------------------- in-place writes into views

/// A flat buffer of `total` values and a `(rows, cols)` view of it starting at `off`.
fn flat_and_view(
    seed: u64,
    total: usize,
    off: usize,
    rows: usize,
    cols: usize,
    dtype: DType,
) -> (Tensor, Tensor) {
    let flat = uniform_tensor(seed, &[total], dtype).unwrap();
    let view = flat
        .narrow(0, off, rows * cols)
        .unwrap()
        .reshape((rows, cols))
        .unwrap();
    (flat, view)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn add_in_place_adds_into_a_view_and_nothing_else() {
    // f32/f64 take the fused path, f16 the tensor-op fallback.
    for dtype in [DType::F32, DType::F64, DType::F16] {
        let (rows, cols, off) = (300, 70, 17);
        let total = off + rows * cols + 9;
        let (flat, view) = flat_and_view(80, total, off, rows, cols, dtype);
        let src = uniform_tensor(81, &[rows, cols], dtype).unwrap();
        let before = values(&flat);
        let want = (view.copy().unwrap() + &src).unwrap();
        add_in_place(&view, &src).unwrap();
        assert_eq!(
            values(&view),
            values(&want),
            "{dtype:?}: dst + src, bit for bit"
        );
        let after = values(&flat);
        assert_eq!(before[..off], after[..off], "{dtype:?}");
        assert_eq!(
            before[off + rows * cols..],
            after[off + rows * cols..],
            "{dtype:?}"
        );
        // A strided source is made contiguous first.
        let t = uniform_tensor(82, &[cols, rows], dtype).unwrap();
        let want = (view.copy().unwrap() + t.t().unwrap()).unwrap();
        add_in_place(&view, &t.t().unwrap()).unwrap();
        assert_eq!(values(&view), values(&want), "{dtype:?} strided src");
    }
    let dst = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(add_in_place(&dst, &bad).is_err(), "shape mismatch");
    assert!(
        add_in_place(&dst.t().unwrap(), &bad).is_err(),
        "strided destination"
    );
}

/// bf16 widened into an f32 view equals candle's `to_dtype`, bit for bit, and writes nothing
/// outside the view; other dtype pairs take the fallback.
#[test]
fn widen_into_converts_into_a_view_and_nothing_else() {
    let (rows, cols, off) = (300, 70, 17);
    let total = off + rows * cols + 9;
    for dst_dtype in [DType::F32, DType::F64] {
        let (flat, view) = flat_and_view(95, total, off, rows, cols, dst_dtype);
        let src = uniform_tensor(96, &[rows * cols], DType::F32)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let before = values(&flat);
        widen_into(&view, &src).unwrap();
        let want = src.to_dtype(dst_dtype).unwrap();
        assert_eq!(values(&view.flatten_all().unwrap()), values(&want));
        let after = values(&flat);
        assert_eq!(before[..off], after[..off], "{dst_dtype:?}");
        assert_eq!(before[off + rows * cols..], after[off + rows * cols..]);
    }
    let dst = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let short = Tensor::zeros(3, DType::BF16, &Device::Cpu).unwrap();
    assert!(widen_into(&dst, &short).is_err(), "element count mismatch");
}

/// The embedding backward written into a view equals candle's `zeros.index_add` (the
/// allocation it replaces), bit for bit, repeated ids included; and it accumulates.
#[test]
fn index_add_rows_equals_zeros_index_add() {
    let (vocab, d, n, off) = (50, 24, 200, 31);
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7 + i * i) % vocab) as u32).collect();
    for dtype in [DType::F32, DType::F64, DType::F16] {
        for id_dtype in [DType::U32, DType::I64] {
            let total = off + vocab * d + 5;
            let (flat, view) = flat_and_view(90, total, off, vocab, d, dtype);
            view.zero_set().unwrap();
            let before = values(&flat);
            let idx = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(id_dtype)
                .unwrap();
            let src = uniform_tensor(91, &[n, d], dtype).unwrap();
            let want = Tensor::zeros((vocab, d), dtype, &Device::Cpu)
                .unwrap()
                .index_add(&idx, &src, 0)
                .unwrap();
            index_add_rows(&view, &idx, &src).unwrap();
            assert_eq!(values(&view), values(&want), "{dtype:?} {id_dtype:?}");
            let after = values(&flat);
            assert_eq!(before[..off], after[..off]);
            assert_eq!(before[off + vocab * d..], after[off + vocab * d..]);
            // Accumulates: a second call adds the same rows again.
            index_add_rows(&view, &idx, &src).unwrap();
            let twice = want.index_add(&idx, &src, 0).unwrap();
            assert_eq!(
                values(&view),
                values(&twice),
                "{dtype:?} {id_dtype:?} twice"
            );
        }
    }
    let dst = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
    let src = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    let out_of_range = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
    assert!(index_add_rows(&dst, &out_of_range, &src).is_err());
    let wrong_width = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(index_add_rows(
        &dst,
        &Tensor::new(&[0u32, 1], &Device::Cpu).unwrap(),
        &wrong_width
    )
    .is_err());
}

#[test]
fn sum_of_squares_matches() {
    for dtype in [DType::F32, DType::F64] {
        let t = uniform_tensor(60, &[3, 50_000], dtype).unwrap(); // several chunks
        let want: f64 = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x * x)
            .sum();
        let got = sum_of_squares(&t).unwrap();
        assert!(
            (got - want).abs() <= 1e-10 * want,
            "{dtype:?}: {got} vs {want}"
        );
        let strided = sum_of_squares(&t.t().unwrap()).unwrap();
        assert!((strided - want).abs() <= 1e-10 * want);
        let reference = reference_sum_of_squares(&t).unwrap();
        assert!((reference - want).abs() <= 1e-5 * want);
    }
    let small = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
    assert_eq!(sum_of_squares(&small).unwrap(), 25.0);
    let _ = D::Minus1; // keep the import used in all cfgs
}
