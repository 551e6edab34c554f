//! The decode fast path's row ops equal the tensor ops they stand for.

use candle_core::{DType, Device, Tensor};
use kiln_kernels::rows;
use kiln_testutil::uniform_vec;

fn vals(seed: u64, n: usize) -> Vec<f32> {
    uniform_vec(seed, n).into_iter().map(|v| v as f32).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst < tol, "{what}: max difference {worst}");
}

fn tensor_values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn rms_norm_rows_equals_the_tensor_kernel() {
    let (m, d) = (3, 40);
    let x = vals(1, m * d);
    let w = vals(2, d);
    let mut got = x.clone();
    rows::rms_norm_rows(&mut got, &w, 1e-6);
    let xt = Tensor::from_slice(&x, (m, d), &Device::Cpu).unwrap();
    let wt = Tensor::from_slice(&w, d, &Device::Cpu).unwrap();
    close(
        &got,
        &tensor_values(&kiln_kernels::rms_norm(&xt, &wt, 1e-6).unwrap()),
        1e-5,
        "rms_norm",
    );
}

#[test]
fn rope_row_equals_the_tensor_kernel_including_partial_rotary() {
    let (n, hd, t) = (3, 16, 7);
    for rot in [16, 8] {
        let (cos, sin) =
            kiln_kernels::rope_tables(rot, t, 10_000.0, &Device::Cpu, DType::F32).unwrap();
        let x = vals(3, n * hd);
        // (1, n, 1, hd) at position t - 1.
        let xt = Tensor::from_slice(&x, (1, n, 1, hd), &Device::Cpu).unwrap();
        let (c, s) = (
            cos.narrow(0, t - 1, 1).unwrap(),
            sin.narrow(0, t - 1, 1).unwrap(),
        );
        let turned = kiln_kernels::rope(&xt.narrow(3, 0, rot).unwrap(), &c, &s).unwrap();
        let want = Tensor::cat(&[&turned, &xt.narrow(3, rot, hd - rot).unwrap()], 3).unwrap();
        let mut got = x.clone();
        rows::rope_row(&mut got, n, hd, &tensor_values(&c), &tensor_values(&s));
        close(
            &got,
            &tensor_values(&want),
            1e-6,
            &format!("rope rot {rot}"),
        );
    }
}

#[test]
fn attend_cached_equals_the_attention_kernel_with_windows_and_a_soft_cap() {
    let (t, hd) = (23, 16);
    let q = vals(4, hd);
    let keys = vals(5, t * hd);
    let values = vals(6, t * hd);
    let masks = [None, Some(5), Some(40)]
        .into_iter()
        .map(|window| rows::CachedMask {
            window,
            softcap: None,
        })
        .chain([rows::CachedMask {
            window: Some(7),
            softcap: Some(0.5),
        }]);
    for m in masks {
        let (window, softcap) = (m.window, m.softcap);
        let mut got = vec![0f32; hd];
        rows::attend_cached(&q, &keys, &values, 0.25, m, &mut got);
        let qt = Tensor::from_slice(&q, (1, 1, 1, hd), &Device::Cpu).unwrap();
        let kt = Tensor::from_slice(&keys, (1, 1, t, hd), &Device::Cpu).unwrap();
        let vt = Tensor::from_slice(&values, (1, 1, t, hd), &Device::Cpu).unwrap();
        let mask = kiln_kernels::AttentionMask {
            causal: true,
            segment_ids: None,
            window,
            softcap: softcap.map(f64::from),
        };
        let (want, _) = kiln_kernels::attention(&qt, &kt, &vt, 0.25, mask).unwrap();
        close(
            &got,
            &tensor_values(&want),
            1e-5,
            &format!("window {window:?} softcap {softcap:?}"),
        );
    }
}

#[test]
fn gated_activations_equal_the_tensor_ops() {
    let (g, u) = (vals(7, 50), vals(8, 50));
    let gt = (Tensor::from_slice(&g, 50, &Device::Cpu).unwrap() * 4.0).unwrap();
    let g4 = tensor_values(&gt);
    let ut = Tensor::from_slice(&u, 50, &Device::Cpu).unwrap();
    let swiglu = tensor_values(&kiln_kernels::swiglu(&gt, &ut).unwrap());
    close(&rows::swiglu_rows(&g4, &u), &swiglu, 1e-5, "swiglu");
    let geglu = tensor_values(&kiln_kernels::gelu_tanh_gate(&gt, &ut).unwrap());
    close(
        &rows::gelu_tanh_gate_rows(&g4, &u),
        &geglu,
        1e-5,
        "gelu_tanh_gate",
    );
}

#[test]
fn gelu_tanh_gate_backward_matches_finite_differences() {
    let g = (kiln_testutil::uniform_tensor(9, &[4, 6], DType::F64).unwrap() * 3.0).unwrap();
    let u = kiln_testutil::uniform_tensor(10, &[4, 6], DType::F64).unwrap();
    let dy = kiln_testutil::uniform_tensor(11, &[4, 6], DType::F64).unwrap();
    let (dg, du) = kiln_kernels::gelu_tanh_gate_backward(&g, &u, &dy).unwrap();
    let loss = |g: &Tensor, u: &Tensor| -> f64 {
        (kiln_kernels::gelu_tanh_gate(g, u).unwrap() * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    for (which, analytic) in [(0, &dg), (1, &du)] {
        let a: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
        let base = [g.clone(), u.clone()];
        let orig: Vec<f64> = base[which].flatten_all().unwrap().to_vec1().unwrap();
        let cell = std::cell::RefCell::new(base.clone());
        let set = |v: &[f64]| {
            cell.borrow_mut()[which] = Tensor::from_slice(v, (4, 6), &Device::Cpu).unwrap();
        };
        let f = || {
            let b = cell.borrow();
            loss(&b[0], &b[1])
        };
        let e = kiln_testutil::finite_difference_error(&orig, &a, &set, &f, &[0, 3, 7, 11, 19, 23]);
        assert!(e < 1e-6, "input {which}: relative error {e}");
    }
}
