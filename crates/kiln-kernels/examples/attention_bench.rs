//! Fused attention vs today's composition (candle matmul q.kT -> masked_softmax -> matmul .v,
//! backward via masked_softmax_backward + matmuls), causal f32 on the training shapes
//! b=8, h=6, hkv=2, hd=64. Prints the median of several runs (forward, forward+backward).
//!
//! `cargo run --release -p kiln-kernels --example attention_bench [t ...]` (default t = 256 1024);
//! threads follow `RAYON_NUM_THREADS`.

use candle_core::{DType, Device, Result, Tensor};
use kiln_kernels::{
    attention, attention_backward, masked_softmax, masked_softmax_backward, AttentionMask,
};
use std::time::Instant;

const B: usize = 8;
const H: usize = 6;
const HKV: usize = 2;
const HD: usize = 64;
const G: usize = H / HKV;

struct Inputs {
    t: usize,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    scale: f64,
}

/// The model's path (`kiln_model` attention and its hand-written backward).
fn composition(x: &Inputs, backward: bool) -> Result<Vec<Tensor>> {
    let t = x.t;
    let qg = x.q.reshape((B, HKV, G * t, HD))?;
    let scores = qg.matmul(&x.k.t()?)?.reshape((B, H, t, t))?;
    let probs = masked_softmax(&scores, x.scale, true)?;
    drop(scores);
    let probs_g = probs.reshape((B, HKV, G * t, t))?;
    let out = probs_g.matmul(&x.v)?.reshape((B, H, t, HD))?;
    if !backward {
        return Ok(vec![out]);
    }
    let dattn = x.dout.reshape((B, HKV, G * t, HD))?;
    let dprobs = dattn.matmul(&x.v.t()?)?.reshape((B, H, t, t))?;
    let dv = probs_g.t()?.matmul(&dattn)?;
    let dscores = masked_softmax_backward(&probs, &dprobs, x.scale)?.reshape((B, HKV, G * t, t))?;
    drop(dprobs);
    let dq = dscores.matmul(&x.k)?.reshape((B, H, t, HD))?;
    let dk = dscores.t()?.matmul(&qg)?;
    Ok(vec![out, dq, dk, dv])
}

fn fused(x: &Inputs, backward: bool) -> Result<Vec<Tensor>> {
    let mask = AttentionMask {
        causal: true,
        segment_ids: None,
        window: None,
        softcap: None,
    };
    let (out, lse) = attention(&x.q, &x.k, &x.v, x.scale, mask)?;
    if !backward {
        return Ok(vec![out]);
    }
    let (dq, dk, dv) = attention_backward(&x.q, &x.k, &x.v, &out, &lse, &x.dout, x.scale, mask)?;
    Ok(vec![out, dq, dk, dv])
}

fn ms(f: impl Fn() -> Result<Vec<Tensor>>) -> Result<f64> {
    let start = Instant::now();
    let r = f()?;
    let dt = start.elapsed().as_secs_f64() * 1e3;
    drop(r);
    Ok(dt)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let ts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("t must be an integer"))
        .collect();
    let ts = if ts.is_empty() { vec![256, 1024] } else { ts };
    println!(
        "causal f32 attention, b={B} h={H} hkv={HKV} hd={HD}, {} rayon threads; median ms",
        rayon::current_num_threads()
    );
    println!(
        "{:>5} | {:>9} {:>9} {:>7} | {:>11} {:>11} {:>7}",
        "t", "comp fwd", "fused fwd", "speedup", "comp fwd+bwd", "fused f+b", "speedup"
    );
    for t in ts {
        let rand = |seed: u64, heads: usize| -> Result<Tensor> {
            let n = B * heads * t * HD;
            let vals = kiln_testutil::uniform_vec(seed, n);
            Tensor::from_vec(vals, (B, heads, t, HD), &Device::Cpu)?.to_dtype(DType::F32)
        };
        let x = Inputs {
            t,
            q: rand(1, H)?,
            k: rand(2, HKV)?,
            v: rand(3, HKV)?,
            dout: rand(4, H)?,
            scale: 1.0 / (HD as f64).sqrt(),
        };
        let runs = if t <= 512 { 15 } else { 7 };
        let mut times = [vec![], vec![], vec![], vec![]];
        // Warm up, then interleave the four variants so machine noise hits them alike.
        for i in 0..runs + 1 {
            let r = [
                ms(|| composition(&x, false))?,
                ms(|| fused(&x, false))?,
                ms(|| composition(&x, true))?,
                ms(|| fused(&x, true))?,
            ];
            if i > 0 {
                for (v, r) in times.iter_mut().zip(r) {
                    v.push(r);
                }
            }
        }
        let [cf, ff, cb, fb] = times.map(median);
        println!(
            "{t:>5} | {cf:>9.1} {ff:>9.1} {:>6.2}x | {cb:>11.1} {fb:>11.1} {:>6.2}x",
            cf / ff,
            cb / fb
        );
    }
    Ok(())
}
