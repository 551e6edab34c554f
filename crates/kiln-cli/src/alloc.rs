//! A global allocator that does not churn.
//!
//! candle allocates a fresh output buffer for every op. The large ones (activations, logits,
//! gradients: megabytes each) are mapped and unmapped by the system allocator, so every
//! training step page-faults its working set back in and the kernel zeroes each page: a
//! `perf` profile of the reference step showed 23% of the time in `clear_page_erms`. Training
//! repeats the same shapes every step, so this allocator keeps freed large blocks in a small
//! cache keyed by size class and hands them back on the next request of that class. Cached
//! plus live large blocks never exceed the most that was ever live, so the cache costs no
//! memory beyond the process's own high-water mark. Small blocks go straight to mimalloc.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use mimalloc::MiMalloc;

/// Blocks at least this big are cached.
const MIN_CACHED: usize = 256 << 10;
/// Cached blocks are page aligned and rounded to whole pages.
const PAGE: usize = 4096;
/// Most blocks held at once; the oldest is released first when full.
const SLOTS: usize = 512;
/// Most bytes held at once (the cache never holds more than this beyond live memory).
const MAX_CACHED_BYTES: usize = 4 << 30;

/// Size classes per doubling: a big block is rounded up to the next of `CLASSES_PER_DOUBLING`
/// evenly spaced sizes between two powers of two (at most 12.5% more address space, and the
/// pages past the request are never touched by it).
const CLASSES_PER_DOUBLING: usize = 8;

/// The size a big request is served with. Shapes that vary step by step (preference pairs of
/// different lengths, GRPO's responses) then reuse each other's blocks: with exact sizes a
/// freed block waited for its exact size, and the cache filled with sizes that never came back
/// (a DPO run held 3.9 GB of them, doubling its peak RSS).
fn size_class(size: usize) -> usize {
    let doubling = 1usize << (usize::BITS - 1 - size.leading_zeros());
    let step = (doubling / CLASSES_PER_DOUBLING).max(PAGE);
    size.div_ceil(step) * step
}

struct Cache {
    /// (rounded size, pointer, insertion stamp); size 0 marks a free slot.
    slots: [(usize, usize, u64); SLOTS],
    bytes: usize,
    stamp: u64,
}

pub struct CachingAlloc {
    inner: MiMalloc,
    cache: Mutex<Cache>,
    /// Off for a server: its buffers come in many sizes (one per batch size), which a
    /// size-keyed cache would keep one of each, so memory would creep up to the cache's limit.
    caching: AtomicBool,
    /// Bytes of big blocks handed out and not yet freed, and the most there ever were.
    live: AtomicUsize,
    peak_live: AtomicUsize,
}

impl CachingAlloc {
    pub const fn new() -> Self {
        Self {
            inner: MiMalloc,
            cache: Mutex::new(Cache {
                slots: [(0, 0, 0); SLOTS],
                bytes: 0,
                stamp: 0,
            }),
            caching: AtomicBool::new(true),
            live: AtomicUsize::new(0),
            peak_live: AtomicUsize::new(0),
        }
    }

    /// Runs `f` with caching off, then restores the previous setting: loading a model frees
    /// one-off conversion buffers of many sizes (a 7B's would pin gigabytes), which later
    /// requests never reuse.
    pub fn without_caching<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.caching.load(Ordering::Relaxed);
        self.set_caching(false);
        let out = f();
        if was {
            self.set_caching(true);
        }
        out
    }

    /// Stops (or resumes) keeping freed blocks; stopping releases every block held.
    pub fn set_caching(&self, on: bool) {
        self.caching.store(on, Ordering::Relaxed);
        if on {
            return;
        }
        let held: Vec<(usize, usize)> = match self.cache.lock() {
            Ok(mut c) => {
                c.bytes = 0;
                c.slots
                    .iter_mut()
                    .filter(|s| s.0 != 0)
                    .map(|s| {
                        let block = (s.0, s.1);
                        *s = (0, 0, 0);
                        block
                    })
                    .collect()
            }
            Err(_) => return,
        };
        for (size, ptr) in held {
            unsafe {
                self.inner.dealloc(
                    ptr as *mut u8,
                    Layout::from_size_align_unchecked(size, PAGE),
                )
            };
        }
    }

    fn big_layout(layout: Layout) -> Option<Layout> {
        if layout.size() < MIN_CACHED || layout.align() > PAGE {
            return None;
        }
        Layout::from_size_align(size_class(layout.size()), PAGE).ok()
    }

    /// A cached block of `size`, or null. On a miss, the oldest cached blocks are released
    /// first while the new block would take cached plus live past the high-water mark, so a
    /// new size is served from memory the cache gives back rather than on top of it.
    fn take(&self, size: usize) -> *mut u8 {
        if !self.caching.load(Ordering::Relaxed) {
            return null_mut();
        }
        loop {
            let Ok(mut c) = self.cache.lock() else {
                return null_mut();
            };
            if let Some(slot) = c.slots.iter_mut().find(|s| s.0 == size) {
                let ptr = slot.1 as *mut u8;
                *slot = (0, 0, 0);
                c.bytes -= size;
                return ptr;
            }
            let live = self.live.load(Ordering::Relaxed);
            if c.bytes == 0 || c.bytes + live + size <= self.peak_live.load(Ordering::Relaxed) {
                return null_mut();
            }
            let old = Self::evict_oldest(&mut c);
            drop(c);
            self.release(old);
        }
    }

    /// Removes the oldest cached block (the cache must hold one).
    fn evict_oldest(c: &mut Cache) -> (usize, usize) {
        let (i, _) = c
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.0 != 0)
            .min_by_key(|(_, s)| s.2)
            .expect("invariant: the cache holds a block");
        let old = c.slots[i];
        c.slots[i] = (0, 0, 0);
        c.bytes -= old.0;
        (old.0, old.1)
    }

    fn release(&self, (size, ptr): (usize, usize)) {
        unsafe {
            self.inner.dealloc(
                ptr as *mut u8,
                Layout::from_size_align_unchecked(size, PAGE),
            )
        };
    }

    /// Keeps a freed block (already counted out of `live`), within the cache's limits: at most
    /// [`MAX_CACHED_BYTES`], and never so much that cached plus live big blocks exceed the
    /// most that was ever live. The cache then only fills the room the process already
    /// needed: a run whose shapes repeat (pretraining) gets its whole step's blocks back, and
    /// one whose shapes drift (preference pairs of varying length) does not grow past its own
    /// high-water mark with blocks nobody asks for again. Returns the block when it cannot be
    /// kept; evicts the oldest blocks to make room.
    fn put(&self, size: usize, ptr: *mut u8) -> Option<(usize, *mut u8)> {
        if !self.caching.load(Ordering::Relaxed) || size > MAX_CACHED_BYTES {
            return Some((size, ptr));
        }
        loop {
            let Ok(mut c) = self.cache.lock() else {
                return Some((size, ptr));
            };
            let live = self.live.load(Ordering::Relaxed);
            let room = self
                .peak_live
                .load(Ordering::Relaxed)
                .saturating_sub(live)
                .min(MAX_CACHED_BYTES);
            let full = c.slots.iter().all(|s| s.0 != 0);
            if c.bytes + size <= room && !full {
                c.stamp += 1;
                let stamp = c.stamp;
                let slot = c
                    .slots
                    .iter_mut()
                    .find(|s| s.0 == 0)
                    .expect("invariant: a free slot");
                *slot = (size, ptr as usize, stamp);
                c.bytes += size;
                return None;
            }
            if size > room {
                // Not even an empty cache could keep it.
                return Some((size, ptr));
            }
            let old = Self::evict_oldest(&mut c);
            drop(c);
            self.release(old);
        }
    }

    /// Counts a big block handed out.
    fn count_in(&self, size: usize) {
        let live = self.live.fetch_add(size, Ordering::Relaxed) + size;
        self.peak_live.fetch_max(live, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::big_layout(layout) {
            Some(big) => {
                let mut p = self.take(big.size());
                if p.is_null() {
                    p = self.inner.alloc(big);
                }
                if !p.is_null() {
                    self.count_in(big.size());
                }
                p
            }
            None => self.inner.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::big_layout(layout) {
            Some(big) => {
                let mut p = self.take(big.size());
                if p.is_null() {
                    p = self.inner.alloc_zeroed(big);
                } else {
                    std::ptr::write_bytes(p, 0, layout.size());
                }
                if !p.is_null() {
                    self.count_in(big.size());
                }
                p
            }
            None => self.inner.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match Self::big_layout(layout) {
            Some(big) => {
                self.live.fetch_sub(big.size(), Ordering::Relaxed);
                if let Some((size, p)) = self.put(big.size(), ptr) {
                    self.inner
                        .dealloc(p, Layout::from_size_align_unchecked(size, PAGE));
                }
            }
            None => self.inner.dealloc(ptr, layout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_big_blocks_are_reused_and_small_ones_pass_through() {
        let a = CachingAlloc::new();
        unsafe {
            let big = Layout::from_size_align(1 << 20, 8).unwrap();
            let p = a.alloc(big);
            p.write_bytes(7, 1 << 20);
            a.dealloc(p, big);
            let q = a.alloc_zeroed(big);
            assert_eq!(p, q, "same-size request reuses the cached block");
            assert!(std::slice::from_raw_parts(q, 1 << 20)
                .iter()
                .all(|&b| b == 0));
            a.dealloc(q, big);
            let small = Layout::from_size_align(64, 8).unwrap();
            let s = a.alloc(small);
            a.dealloc(s, small);
            assert_eq!(a.cache.lock().unwrap().bytes, 1 << 20);
        }
    }

    #[test]
    fn sizes_round_up_to_eight_classes_per_doubling() {
        assert_eq!(size_class(MIN_CACHED), MIN_CACHED);
        assert_eq!(size_class(MIN_CACHED + 1), MIN_CACHED + MIN_CACHED / 8);
        for size in [300_001, 1 << 20, (1 << 20) + 1, 5_000_000, 123_456_789] {
            let class = size_class(size);
            assert!(
                class >= size && class.is_multiple_of(PAGE),
                "{size} -> {class}"
            );
            assert!(
                class - size <= size / 8,
                "{size} -> {class}: more than 12.5%"
            );
        }
        // A request a little smaller than a freed block reuses it.
        let a = CachingAlloc::new();
        unsafe {
            let freed = Layout::from_size_align(1_000_000, 8).unwrap();
            let p = a.alloc(freed);
            a.dealloc(p, freed);
            let near = Layout::from_size_align(990_000, 8).unwrap();
            let q = a.alloc(near);
            assert_eq!(p, q, "same class: reused");
            a.dealloc(q, near);
            assert_eq!(
                size_class(size_class(1_000_000) + 1),
                size_class(1_000_000) + (1 << 20) / 8,
                "a byte more is the next class"
            );
        }
    }

    #[test]
    fn cached_and_live_blocks_stay_within_the_live_high_water_mark() {
        let a = CachingAlloc::new();
        let mib = |n: usize| Layout::from_size_align(n << 20, 8).unwrap();
        unsafe {
            let p = a.alloc(mib(1));
            a.dealloc(p, mib(1));
            assert_eq!(
                a.cache.lock().unwrap().bytes,
                1 << 20,
                "kept below the mark"
            );
            // A new size does not stack on the cached block: that block goes back first.
            let q = a.alloc(mib(2));
            assert_eq!(a.cache.lock().unwrap().bytes, 0);
            let r = a.alloc(mib(1));
            a.dealloc(q, mib(2));
            // Live 1 MiB, mark 3 MiB: the 2 MiB block fits under it and is kept...
            assert_eq!(a.cache.lock().unwrap().bytes, 2 << 20);
            a.dealloc(r, mib(1));
            assert_eq!(a.cache.lock().unwrap().bytes, 3 << 20);
            // ...and reused by the next request of its size.
            let s = a.alloc(mib(2));
            assert_eq!(s, q);
            a.dealloc(s, mib(2));
        }
    }

    #[test]
    fn the_cache_evicts_the_oldest_block_when_full() {
        let a = CachingAlloc::new();
        unsafe {
            let layouts: Vec<Layout> = (0..SLOTS + 3)
                .map(|i| Layout::from_size_align(MIN_CACHED + i * PAGE, 8).unwrap())
                .collect();
            let ptrs: Vec<*mut u8> = layouts.iter().map(|l| a.alloc(*l)).collect();
            for (p, l) in ptrs.iter().zip(&layouts) {
                a.dealloc(*p, *l);
            }
            let c = a.cache.lock().unwrap();
            assert_eq!(c.slots.iter().filter(|s| s.0 != 0).count(), SLOTS);
            assert!(
                c.slots.iter().all(|s| s.0 != MIN_CACHED),
                "the oldest block was released"
            );
        }
    }
}
