//! The fused attention's extra heap grows linearly in t: a counting global allocator records
//! the peak during forward + backward. One test in this binary, so nothing else allocates
//! while it measures (rayon workers do allocate, and that is part of what is measured).

use candle_core::{DType, Device, Tensor};
use kiln_kernels::{attention, attention_backward, AttentionMask};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call forwards to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const H: usize = 2;
const HKV: usize = 2;
const HD: usize = 64;

/// Peak heap above the inputs during forward + backward (outputs included), in bytes.
fn peak_extra(t: usize) -> usize {
    let rand = |seed: u64, heads: usize| {
        let vals = kiln_testutil::uniform_vec(seed, heads * t * HD);
        Tensor::from_vec(vals, (1, heads, t, HD), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (q, k, v, dout) = (rand(1, H), rand(2, HKV), rand(3, HKV), rand(4, H));
    let mask = AttentionMask {
        causal: true,
        segment_ids: None,
        window: None,
        softcap: None,
    };
    let scale = 1.0 / (HD as f64).sqrt();
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let (out, lse) = attention(&q, &k, &v, scale, mask).unwrap();
    let grads = attention_backward(&q, &k, &v, &out, &lse, &dout, scale, mask).unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - base;
    drop((out, lse, grads));
    peak
}

#[test]
fn attention_memory_is_linear_in_t() {
    peak_extra(64); // warm up rayon's pool and other one-time allocations
    let ts = [256usize, 512, 1024, 2048];
    let peaks: Vec<usize> = ts.iter().map(|&t| peak_extra(t)).collect();
    // q, k, v, out, dq, dk, dv, dout: all (1, 2, t, 64) f32 here.
    let io = |t: usize| 8 * H * t * HD * std::mem::size_of::<f32>();
    println!("     t | peak extra (KiB) | / io tensors | / t^2 scores (f32, one head)");
    for (&t, &p) in ts.iter().zip(&peaks) {
        println!(
            "{t:>6} | {:>16.1} | {:>12.2} | {:>10.3}",
            p as f64 / 1024.0,
            p as f64 / io(t) as f64,
            p as f64 / (t * t * 4) as f64
        );
    }
    let ratio = peaks[3] as f64 / peaks[2] as f64;
    assert!(
        ratio < 2.6,
        "peak(2048) / peak(1024) = {ratio:.2}: not linear"
    );
    assert!(
        peaks[3] < 3 * io(2048),
        "peak(2048) = {} bytes >= 3 x q+k+v+out+dq+dk+dv+dout = {}",
        peaks[3],
        3 * io(2048)
    );
}
