//! Fused attention vs `reference_attention` (forward, and backward through candle autograd),
//! finite-difference checks of the fused backward, segment isolation, and input validation.

use candle_core::{DType, Device, Result, Tensor, Var};
use kiln_kernels::{attention, attention_backward, reference_attention, AttentionMask};
use kiln_testutil::{assert_close, gradcheck, uniform_tensor, uniform_vec, Tol};

const TIGHT_F64: Tol = Tol {
    rel: 1e-10,
    abs: 1e-12,
};
/// f32 forward: the fused kernel sums in a different order and uses its own `exp`.
const LOOSE_F32: Tol = Tol {
    rel: 1e-4,
    abs: 2e-6,
};

#[derive(Clone)]
struct Case {
    name: &'static str,
    b: usize,
    h: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    hd: usize,
    causal: bool,
    /// (b, tk) segment ids.
    seg: Option<Vec<u32>>,
    /// Sliding window (keys `j > p - window`).
    window: Option<usize>,
    /// Score soft cap (Gemma 2).
    softcap: Option<f64>,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        b: usize,
        h: usize,
        hkv: usize,
        tq: usize,
        tk: usize,
        hd: usize,
        causal: bool,
    ) -> Case {
        Case {
            name,
            b,
            h,
            hkv,
            tq,
            tk,
            hd,
            causal,
            seg: None,
            window: None,
            softcap: None,
        }
    }

    fn window(mut self, w: usize) -> Case {
        self.window = Some(w);
        self
    }

    /// A cap small enough that it bends most scores (q is scaled up in `inputs`).
    fn softcap(mut self, c: f64) -> Case {
        self.softcap = Some(c);
        self
    }

    fn seg(mut self, seg: Vec<u32>) -> Case {
        assert_eq!(seg.len(), self.b * self.tk, "{}: segment ids", self.name);
        self.seg = Some(seg);
        self
    }

    fn seg_tensor(&self) -> Option<Tensor> {
        self.seg
            .as_ref()
            .map(|s| Tensor::from_vec(s.clone(), (self.b, self.tk), &Device::Cpu).unwrap())
    }

    fn scale(&self) -> f64 {
        1.0 / (self.hd as f64).sqrt()
    }

    /// q, k, v, dout in f64; q is scaled up so that the softmax is far from uniform.
    fn inputs(&self, seed: u64) -> [Tensor; 4] {
        let q = (uniform_tensor(seed, &[self.b, self.h, self.tq, self.hd], DType::F64).unwrap()
            * 3.0)
            .unwrap();
        let kv = [self.b, self.hkv, self.tk, self.hd];
        let k = uniform_tensor(seed + 1, &kv, DType::F64).unwrap();
        let v = uniform_tensor(seed + 2, &kv, DType::F64).unwrap();
        let dout = uniform_tensor(seed + 3, q.dims(), DType::F64).unwrap();
        [q, k, v, dout]
    }
}

/// Lengths -> one row of segment ids 0, 1, 2, ...
fn packed(lens: &[usize]) -> Vec<u32> {
    lens.iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i as u32, n))
        .collect()
}

fn cases() -> Vec<Case> {
    let mut rows3 = packed(&[100]); // one segment
    rows3.extend(packed(&[37, 63])); // two, unequal
                                     // Ids reused by non-adjacent runs: visibility follows the id, not the run.
    rows3.extend((0..100).map(|j| ((j / 10) % 3) as u32));
    vec![
        Case::new("causal", 2, 2, 2, 130, 130, 32, true),
        Case::new("bidirectional", 2, 2, 2, 130, 130, 32, false),
        Case::new("gqa 6/2 causal", 1, 6, 2, 70, 70, 64, true),
        Case::new("gqa 6/2 bidirectional", 1, 6, 2, 70, 70, 64, false),
        Case::new("mha 4/4", 1, 4, 4, 66, 66, 16, true),
        Case::new("decode after cache", 2, 4, 2, 5, 150, 32, true),
        Case::new("decode one token", 1, 2, 1, 1, 77, 16, true),
        Case::new("tq < tk bidirectional", 1, 2, 1, 9, 40, 16, false),
        Case::new("t=1", 2, 2, 1, 1, 1, 16, true),
        Case::new("t=37", 1, 2, 2, 37, 37, 16, true),
        Case::new("hd=20 (padded)", 1, 3, 1, 45, 45, 20, true),
        Case::new("packed 3 docs causal", 1, 2, 1, 150, 150, 32, true).seg(packed(&[40, 70, 40])),
        Case::new("packed 3 docs bidirectional", 1, 2, 1, 150, 150, 32, false)
            .seg(packed(&[40, 70, 40])),
        Case::new("rows segmented differently", 3, 4, 2, 100, 100, 16, true).seg(rows3.clone()),
        Case::new(
            "rows segmented differently, bidir",
            3,
            2,
            1,
            100,
            100,
            16,
            false,
        )
        .seg(rows3),
        Case::new("decode with segments", 1, 2, 2, 3, 90, 16, true).seg(packed(&[50, 40])),
        // Sliding windows narrower and wider than a key tile, and across documents.
        Case::new("window 5", 1, 2, 1, 130, 130, 16, true).window(5),
        Case::new("window 70 gqa", 2, 4, 2, 150, 150, 32, true).window(70),
        Case::new("window after cache", 1, 2, 1, 4, 100, 16, true).window(9),
        Case::new("window 20 bidirectional", 1, 2, 1, 130, 130, 16, false).window(20),
        Case::new(
            "window 100 bidirectional long",
            1,
            3,
            1,
            350,
            350,
            32,
            false,
        )
        .window(100),
        Case::new("window 30 packed", 1, 2, 1, 150, 150, 32, true)
            .seg(packed(&[40, 70, 40]))
            .window(30),
        Case::new("softcap causal gqa multi-tile", 2, 4, 2, 130, 130, 24, true).softcap(1.5),
        Case::new("softcap window 20 decode", 1, 2, 1, 3, 90, 16, true)
            .window(20)
            .softcap(2.0),
        Case::new("softcap bidirectional packed", 1, 2, 2, 80, 80, 8, false)
            .seg(packed(&[30, 50]))
            .softcap(1.0),
    ]
}

fn mask<'a>(c: &Case, seg: Option<&'a Tensor>) -> AttentionMask<'a> {
    AttentionMask {
        causal: c.causal,
        segment_ids: seg,
        window: c.window,
        softcap: c.softcap,
    }
}

/// Row log-sum-exp of the visible scaled scores, by plain loops in f64.
fn naive_lse(c: &Case, q: &Tensor, k: &Tensor) -> Vec<f64> {
    let q = q.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let k = k.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let g = c.h / c.hkv;
    let mut out = Vec::new();
    for b in 0..c.b {
        for h in 0..c.h {
            for i in 0..c.tq {
                let p = c.tk - c.tq + i;
                let qi = &q[((b * c.h + h) * c.tq + i) * c.hd..][..c.hd];
                let scores: Vec<f64> = (0..c.tk)
                    .filter(|&j| {
                        (!c.causal || j <= p)
                            && c.window.is_none_or(|w| p.abs_diff(j) < w)
                            && c.seg
                                .as_ref()
                                .is_none_or(|s| s[b * c.tk + j] == s[b * c.tk + p])
                    })
                    .map(|j| {
                        let kj = &k[((b * c.hkv + h / g) * c.tk + j) * c.hd..][..c.hd];
                        let s = c.scale() * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
                        c.softcap.map_or(s, |cap| cap * (s / cap).tanh())
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                out.push(m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln());
            }
        }
    }
    out
}

#[test]
fn forward_matches_reference() {
    for (n, c) in cases().iter().enumerate() {
        let seg = c.seg_tensor();
        let [q, k, v, _] = c.inputs(100 + 10 * n as u64);
        let lse_want = naive_lse(c, &q, &k);
        for dtype in [DType::F64, DType::F32] {
            let (q, k, v) = (
                q.to_dtype(dtype).unwrap(),
                k.to_dtype(dtype).unwrap(),
                v.to_dtype(dtype).unwrap(),
            );
            let m = mask(c, seg.as_ref());
            let (out, lse) = attention(&q, &k, &v, c.scale(), m).unwrap();
            let want = reference_attention(&q, &k, &v, c.scale(), m).unwrap();
            let name = format!("{} {dtype:?}", c.name);
            assert_eq!(out.dtype(), dtype, "{name}: out dtype");
            assert_eq!(out.dims(), q.dims(), "{name}: out shape");
            assert_eq!(lse.dtype(), DType::F32, "{name}: lse dtype");
            assert_eq!(lse.dims(), &[c.b, c.h, c.tq], "{name}: lse shape");
            let tol = if dtype == DType::F64 {
                TIGHT_F64
            } else {
                LOOSE_F32
            };
            assert_close(&format!("{name} out"), &out, &want, tol);
            let lse_want = Tensor::from_vec(lse_want.clone(), (c.b, c.h, c.tq), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_close(&format!("{name} lse"), &lse, &lse_want, LOOSE_F32);
        }
    }
}

/// Gradients of `sum(reference_attention(q, k, v) * dout)` by candle autograd.
fn reference_grads(c: &Case, xs: &[Tensor; 4], seg: Option<&Tensor>) -> Vec<Tensor> {
    let vars: Vec<Var> = xs[..3]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let out = reference_attention(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        c.scale(),
        mask(c, seg),
    )
    .unwrap();
    let grads = (out * &xs[3])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().clone())
        .collect()
}

#[test]
fn backward_matches_reference_autograd() {
    for (n, c) in cases().iter().enumerate() {
        let seg = c.seg_tensor();
        let xs64 = c.inputs(200 + 10 * n as u64);
        for (dtype, tol) in [(DType::F64, TIGHT_F64), (DType::F32, Tol::GRAD_F32)] {
            let xs = xs64.clone().map(|t| t.to_dtype(dtype).unwrap());
            let [q, k, v, dout] = &xs;
            let m = mask(c, seg.as_ref());
            let (out, lse) = attention(q, k, v, c.scale(), m).unwrap();
            let (dq, dk, dv) = attention_backward(q, k, v, &out, &lse, dout, c.scale(), m).unwrap();
            let want = reference_grads(c, &xs, seg.as_ref());
            for (name, got, want) in [
                ("dq", &dq, &want[0]),
                ("dk", &dk, &want[1]),
                ("dv", &dv, &want[2]),
            ] {
                assert_eq!(got.dtype(), dtype);
                assert_close(&format!("{} {dtype:?} {name}", c.name), got, want, tol);
            }
        }
    }
}

#[test]
fn autograd_through_fused_forward_uses_fused_backward() {
    let c = &cases()[2]; // GQA
    let xs = c.inputs(300);
    let vars: Vec<Var> = xs[..3]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let m = mask(c, None);
    let (out, _) = attention(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        c.scale(),
        m,
    )
    .unwrap();
    let grads = (out * &xs[3])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = reference_grads(c, &xs, None);
    for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let got = grads.get(vars[i].as_tensor()).expect("missing grad");
        assert_close(name, got, &want[i], TIGHT_F64);
    }
}

/// Finite differences of the fused forward vs the fused backward (reached through the candle
/// op's autograd hook, i.e. `attention_backward`).
#[test]
fn fused_backward_gradcheck() {
    let small = [
        Case::new("causal", 1, 2, 1, 5, 5, 4, true),
        Case::new("bidirectional gqa", 2, 4, 2, 4, 4, 3, false),
        Case::new("decode", 1, 2, 2, 2, 6, 4, true),
        Case::new("segments", 2, 2, 1, 7, 7, 4, true)
            .seg(vec![0, 0, 0, 1, 1, 2, 2, 5, 5, 5, 5, 5, 9, 9]),
        Case::new("segments bidirectional", 1, 2, 1, 7, 7, 4, false).seg(vec![0, 0, 1, 1, 1, 0, 2]),
        // Spans two key tiles and two query blocks (64), with a padded head dim.
        Case::new("multi-tile", 1, 2, 1, 67, 67, 3, true),
        Case::new("softcap multi-tile", 1, 2, 1, 67, 67, 3, true).softcap(1.2),
        Case::new("softcap gqa window decode", 1, 4, 2, 3, 9, 4, true)
            .window(4)
            .softcap(1.3),
    ];
    for c in &small {
        let seg = c.seg_tensor();
        let [q, k, v, _] = c.inputs(400);
        let f = |xs: &[Tensor]| -> Result<Tensor> {
            Ok(attention(&xs[0], &xs[1], &xs[2], c.scale(), mask(c, seg.as_ref()))?.0)
        };
        let err = gradcheck(f, &[q, k, v], &[0, 1, 2], 1e-6).unwrap();
        assert!(err < 1e-6, "{}: gradcheck max rel err {err:e}", c.name);
    }
}

/// A packed row of three documents: each document's outputs and gradients equal those of the
/// document run alone.
#[test]
fn segments_isolate_documents() {
    let lens = [23usize, 71, 36];
    let tk: usize = lens.iter().sum();
    for causal in [true, false] {
        let c = Case::new("packed", 1, 4, 2, tk, tk, 16, causal).seg(packed(&lens));
        let seg = c.seg_tensor();
        let [q, k, v, dout] = c.inputs(500);
        let m = mask(&c, seg.as_ref());
        let (out, lse) = attention(&q, &k, &v, c.scale(), m).unwrap();
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &out, &lse, &dout, c.scale(), m).unwrap();
        let mut start = 0;
        for (doc, &len) in lens.iter().enumerate() {
            let cut = |t: &Tensor| t.narrow(2, start, len).unwrap();
            let alone = AttentionMask {
                causal,
                segment_ids: None,
                window: None,
                softcap: None,
            };
            let (q1, k1, v1, do1) = (cut(&q), cut(&k), cut(&v), cut(&dout));
            let (out1, lse1) = attention(&q1, &k1, &v1, c.scale(), alone).unwrap();
            let (dq1, dk1, dv1) =
                attention_backward(&q1, &k1, &v1, &out1, &lse1, &do1, c.scale(), alone).unwrap();
            let name = |what: &str| format!("causal={causal} doc {doc} {what}");
            assert_close(&name("out"), &cut(&out), &out1, TIGHT_F64);
            assert_close(&name("lse"), &cut_lse(&lse, start, len), &lse1, Tol::OP_F32);
            assert_close(&name("dq"), &cut(&dq), &dq1, TIGHT_F64);
            assert_close(&name("dk"), &cut(&dk), &dk1, TIGHT_F64);
            assert_close(&name("dv"), &cut(&dv), &dv1, TIGHT_F64);
            start += len;
        }
    }
}

fn cut_lse(lse: &Tensor, start: usize, len: usize) -> Tensor {
    lse.narrow(2, start, len).unwrap()
}

/// Decoding the last rows after a cache gives the rows of the full causal pass.
#[test]
fn decode_rows_equal_prefill_rows() {
    let c = Case::new("prefill", 2, 6, 2, 90, 90, 32, true);
    let [q, k, v, _] = c.inputs(600);
    let m = mask(&c, None);
    let (full, full_lse) = attention(&q, &k, &v, c.scale(), m).unwrap();
    for tq in [1, 7] {
        let qd = q.narrow(2, 90 - tq, tq).unwrap();
        let (out, lse) = attention(&qd, &k, &v, c.scale(), m).unwrap();
        assert_close(
            "decode out",
            &out,
            &full.narrow(2, 90 - tq, tq).unwrap(),
            TIGHT_F64,
        );
        assert_close(
            "decode lse",
            &lse,
            &full_lse.narrow(2, 90 - tq, tq).unwrap(),
            TIGHT_F64,
        );
    }
}

/// Views from `transpose(1, 2)` (the model's (b, t, h, hd) -> (b, h, t, hd)) are accepted.
#[test]
fn non_contiguous_inputs() {
    let (b, t, h, hkv, hd) = (2, 40, 4, 2, 16);
    let mk = |seed: u64, heads: usize| {
        Tensor::from_vec(
            uniform_vec(seed, b * t * heads * hd),
            (b, t, heads, hd),
            &Device::Cpu,
        )
        .unwrap()
        .transpose(1, 2)
        .unwrap()
    };
    let (q, k, v, dout) = (mk(1, h), mk(2, hkv), mk(3, hkv), mk(4, h));
    assert!(!q.is_contiguous());
    let m = AttentionMask {
        causal: true,
        segment_ids: None,
        window: None,
        softcap: None,
    };
    let (out, lse) = attention(&q, &k, &v, 0.25, m).unwrap();
    let c = |t: &Tensor| t.contiguous().unwrap();
    let (want, _) = attention(&c(&q), &c(&k), &c(&v), 0.25, m).unwrap();
    assert_close("out", &out, &want, TIGHT_F64);
    let got = attention_backward(&q, &k, &v, &out, &lse, &dout, 0.25, m).unwrap();
    let want = attention_backward(&c(&q), &c(&k), &c(&v), &want, &lse, &c(&dout), 0.25, m).unwrap();
    assert_close("dq", &got.0, &want.0, TIGHT_F64);
    assert_close("dk", &got.1, &want.1, TIGHT_F64);
    assert_close("dv", &got.2, &want.2, TIGHT_F64);
}

/// The backward's dq reduction order depends on the shape only, not on the thread count.
#[test]
fn backward_is_thread_count_independent() {
    let c = Case::new("det", 1, 4, 2, 300, 300, 32, true);
    let [q, k, v, dout] = c.inputs(700).map(|t| t.to_dtype(DType::F32).unwrap());
    let m = mask(&c, None);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (out, lse) = attention(&q, &k, &v, c.scale(), m).unwrap();
            let (dq, dk, dv) =
                attention_backward(&q, &k, &v, &out, &lse, &dout, c.scale(), m).unwrap();
            [out, dq, dk, dv].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
    };
    assert!(run(1) == run(3), "results differ between 1 and 3 threads");
}

/// Other dtypes take the reference composition (forward and backward).
#[test]
fn bf16_falls_back_to_reference() {
    let c = Case::new("bf16", 1, 2, 1, 10, 10, 8, true);
    let xs = c.inputs(800);
    let m = mask(&c, None);
    let [q, k, v, dout] = xs.clone().map(|t| t.to_dtype(DType::BF16).unwrap());
    let (out, lse) = attention(&q, &k, &v, c.scale(), m).unwrap();
    assert_eq!((out.dtype(), lse.dtype()), (DType::BF16, DType::F32));
    let (dq, _, _) = attention_backward(&q, &k, &v, &out, &lse, &dout, c.scale(), m).unwrap();
    let (out64, lse64) = attention(&xs[0], &xs[1], &xs[2], c.scale(), m).unwrap();
    assert_close("bf16 out", &out, &out64, Tol::BF16);
    let dq64 = attention_backward(&xs[0], &xs[1], &xs[2], &out64, &lse64, &xs[3], c.scale(), m)
        .unwrap()
        .0;
    assert_close(
        "bf16 dq",
        &dq,
        &dq64,
        Tol {
            rel: 5e-2,
            abs: 5e-2,
        },
    );
}

#[test]
fn rejects_bad_inputs() {
    let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let no_mask = AttentionMask {
        causal: true,
        segment_ids: None,
        window: None,
        softcap: None,
    };
    let err = |r: Result<(Tensor, Tensor)>| r.expect_err("expected an error").to_string();
    let e = err(attention(
        &t(&[1, 3, 4, 8]),
        &t(&[1, 2, 4, 8]),
        &t(&[1, 2, 4, 8]),
        1.0,
        no_mask,
    ));
    assert!(e.contains("multiple of kv heads"), "{e}");
    let e = err(attention(
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 4, 8]),
        &t(&[1, 2, 4, 8]),
        1.0,
        no_mask,
    ));
    assert!(e.contains("tq <= tk"), "{e}");
    let e = err(attention(
        &t(&[1, 2, 4, 8]),
        &t(&[1, 2, 4, 8]),
        &t(&[1, 2, 3, 8]),
        1.0,
        no_mask,
    ));
    assert!(e.contains("v must be shaped like k"), "{e}");
    let e = err(attention(
        &t(&[1, 2, 4, 8]),
        &t(&[1, 2, 4, 6]),
        &t(&[1, 2, 4, 6]),
        1.0,
        no_mask,
    ));
    assert!(e.contains("head dim"), "{e}");
    let q = t(&[2, 2, 4, 8]);
    let kv = t(&[2, 1, 4, 8]);
    let seg_bad_shape = Tensor::zeros((2, 5), DType::U32, &Device::Cpu).unwrap();
    let m = AttentionMask {
        causal: false,
        segment_ids: Some(&seg_bad_shape),
        window: None,
        softcap: None,
    };
    let e = err(attention(&q, &kv, &kv, 1.0, m));
    assert!(e.contains("segment_ids must be (b, tk)"), "{e}");
    let seg_bad_dtype = Tensor::zeros((2, 4), DType::I64, &Device::Cpu).unwrap();
    let m = AttentionMask {
        causal: false,
        segment_ids: Some(&seg_bad_dtype),
        window: None,
        softcap: None,
    };
    let e = err(attention(&q, &kv, &kv, 1.0, m));
    assert!(e.contains("segment_ids must be u32"), "{e}");
    let (out, _) = attention(&q, &kv, &kv, 1.0, no_mask).unwrap();
    let e = attention_backward(&q, &kv, &kv, &out, &t(&[2, 2, 3]), &out, 1.0, no_mask)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lse must be"), "{e}");
}
