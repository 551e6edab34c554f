//! Reproducible training windows and deterministic evaluation batches.
//!
//! The training sampler is stateless by construction: the window of global row
//! `r = batch_index * batch_size + row` depends only on `(seed, r, n_tokens, ctx)`:
//!
//! ```text
//! start(r) = splitmix64(seed ^ (r * 0x9E3779B97F4A7C15 mod 2^64)) % (n_tokens - ctx)
//! window   = tokens[start .. start + ctx + 1];  inputs = window[..ctx], targets = window[1..]
//! ```
//!
//! so resuming only needs the next batch index, and a Python port (see the test vector
//! in [`window_start`]) produces identical batches.

use crate::error::{DataError, Result};
use crate::shard::TokenShard;

pub use kiln_rng::splitmix64;
use kiln_rng::GOLDEN;

/// Start of the training window for global row `r` in a shard of `n_tokens` tokens.
///
/// Requires `n_tokens > ctx`. Test vector: seed 1337, n_tokens 1000, ctx 16 gives starts
/// **571, 172, 221** for rows 0, 1, 2.
pub fn window_start(seed: u64, r: u64, n_tokens: u64, ctx: u64) -> u64 {
    splitmix64(seed ^ r.wrapping_mul(GOLDEN)) % (n_tokens - ctx)
}

/// One batch of `batch_size` rows of `ctx` tokens, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Input ids, `batch_size * ctx`.
    pub inputs: Vec<u32>,
    /// Next-token targets (inputs shifted by one), `batch_size * ctx`.
    pub targets: Vec<i64>,
    pub batch_size: usize,
    pub ctx: usize,
}

/// Draws pseudo-random training windows; serialise it into checkpoints to resume exactly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSampler {
    pub seed: u64,
    pub batch_size: usize,
    pub ctx: usize,
    /// Index of the batch the next call to [`WindowSampler::next_batch`] returns.
    pub next_batch: u64,
}

impl WindowSampler {
    pub fn new(seed: u64, batch_size: usize, ctx: usize) -> Self {
        Self {
            seed,
            batch_size,
            ctx,
            next_batch: 0,
        }
    }

    /// Returns batch number `self.next_batch` and advances.
    pub fn next_batch(&mut self, shard: &TokenShard) -> Result<Batch> {
        let batch = self.batch_at(shard, self.next_batch)?;
        self.next_batch += 1;
        Ok(batch)
    }

    /// Batch number `batch_index`, without touching the state.
    pub fn batch_at(&self, shard: &TokenShard, batch_index: u64) -> Result<Batch> {
        check_shape(shard, self.batch_size, self.ctx)?;
        let n = shard.len() as u64;
        let first_row = batch_index * self.batch_size as u64;
        let mut builder = BatchBuilder::new(self.batch_size, self.ctx);
        for row in 0..self.batch_size as u64 {
            let start = window_start(self.seed, first_row + row, n, self.ctx as u64);
            builder.push_window(shard, start as usize)?;
        }
        Ok(builder.finish())
    }
}

/// Number of batches [`eval_batches`] yields for these arguments.
pub fn eval_batch_count(
    n_tokens: usize,
    batch_size: usize,
    ctx: usize,
    max_batches: usize,
) -> usize {
    if batch_size == 0 || ctx == 0 || n_tokens == 0 {
        return 0;
    }
    // Window k covers tokens [k*ctx, k*ctx + ctx], so every token after the first is a
    // target exactly once.
    let windows = (n_tokens - 1) / ctx;
    (windows / batch_size).min(max_batches)
}

/// Deterministic evaluation batches: consecutive windows `[k*ctx, k*ctx + ctx]` from the
/// start of the shard, grouped into full batches (a trailing partial batch is dropped so
/// every batch has the same shape), at most `max_batches`. Yields nothing if the shard is
/// too short for one full batch; check [`eval_batch_count`] to report that.
pub fn eval_batches(
    shard: &TokenShard,
    batch_size: usize,
    ctx: usize,
    max_batches: usize,
) -> impl Iterator<Item = Batch> + '_ {
    let count = eval_batch_count(shard.len(), batch_size, ctx, max_batches);
    (0..count).map(move |b| {
        let mut builder = BatchBuilder::new(batch_size, ctx);
        for row in 0..batch_size {
            let start = (b * batch_size + row) * ctx;
            // In range by construction of `count`.
            builder
                .push_window(shard, start)
                .expect("eval window within shard");
        }
        builder.finish()
    })
}

fn check_shape(shard: &TokenShard, batch_size: usize, ctx: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(DataError::InvalidOption {
            field: "batch_size",
            problem: "must be at least 1".into(),
        });
    }
    if ctx == 0 {
        return Err(DataError::InvalidOption {
            field: "ctx",
            problem: "must be at least 1".into(),
        });
    }
    if shard.len() <= ctx {
        return Err(DataError::ShardTooShort {
            path: shard.path().to_path_buf(),
            n_tokens: shard.len(),
            ctx,
            needed: ctx + 1,
        });
    }
    Ok(())
}

/// Accumulates `ctx + 1`-token windows into inputs/targets.
struct BatchBuilder {
    inputs: Vec<u32>,
    targets: Vec<i64>,
    window: Vec<u32>,
    batch_size: usize,
    ctx: usize,
}

impl BatchBuilder {
    fn new(batch_size: usize, ctx: usize) -> Self {
        Self {
            inputs: Vec::with_capacity(batch_size * ctx),
            targets: Vec::with_capacity(batch_size * ctx),
            window: Vec::with_capacity(ctx + 1),
            batch_size,
            ctx,
        }
    }

    fn push_window(&mut self, shard: &TokenShard, start: usize) -> Result<()> {
        self.window.clear();
        shard.copy_window(start, self.ctx + 1, &mut self.window)?;
        self.inputs.extend_from_slice(&self.window[..self.ctx]);
        self.targets
            .extend(self.window[1..].iter().map(|&t| i64::from(t)));
        Ok(())
    }

    fn finish(self) -> Batch {
        Batch {
            inputs: self.inputs,
            targets: self.targets,
            batch_size: self.batch_size,
            ctx: self.ctx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A u16 shard holding 0, 1, 2, ... (mod 65536), so token == position.
    fn iota_shard(n: usize) -> (tempfile::TempDir, TokenShard) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..n {
            f.write_all(&(i as u16).to_le_bytes()).unwrap();
        }
        drop(f);
        let shard = TokenShard::open(&path, crate::Dtype::U16).unwrap();
        (dir, shard)
    }

    #[test]
    fn splitmix64_reference_values() {
        // Reference outputs of the canonical splitmix64 generator seeded with 0
        // (state advanced by GOLDEN before each output).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(GOLDEN), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn test_vector_for_python_port() {
        let starts: Vec<u64> = (0..3).map(|r| window_start(1337, r, 1000, 16)).collect();
        println!("seed 1337, n_tokens 1000, ctx 16: first starts {starts:?}");
        assert_eq!(starts, [571, 172, 221]);
    }

    #[test]
    fn batches_match_window_starts() {
        let (_d, shard) = iota_shard(1000);
        let mut s = WindowSampler::new(1337, 2, 16);
        let b0 = s.next_batch(&shard).unwrap();
        let b1 = s.next_batch(&shard).unwrap();
        assert_eq!((b0.batch_size, b0.ctx), (2, 16));
        assert_eq!(b0.inputs.len(), 32);
        // Rows 0..4 of the global row sequence, split over two batches.
        let expect_starts = [571u32, 172, 221];
        assert_eq!(b0.inputs[0], expect_starts[0]);
        assert_eq!(b0.inputs[16], expect_starts[1]);
        assert_eq!(b1.inputs[0], expect_starts[2]);
        for b in [&b0, &b1] {
            for row in 0..2 {
                for t in 0..16 {
                    let i = row * 16 + t;
                    assert_eq!(b.targets[i], i64::from(b.inputs[i]) + 1);
                }
            }
        }
    }

    #[test]
    fn sampler_determinism_and_resume() {
        let (_d, shard) = iota_shard(5000);
        let mut a = WindowSampler::new(7, 4, 32);
        let mut b = WindowSampler::new(7, 4, 32);
        let mut other_seed = WindowSampler::new(8, 4, 32);
        for _ in 0..3 {
            assert_eq!(a.next_batch(&shard).unwrap(), b.next_batch(&shard).unwrap());
        }
        assert_ne!(
            WindowSampler::new(7, 4, 32).next_batch(&shard).unwrap(),
            other_seed.next_batch(&shard).unwrap()
        );

        // Save mid-run, restore, and compare with the uninterrupted sampler.
        let saved = serde_json::to_string(&a).unwrap();
        let expected = a.next_batch(&shard).unwrap();
        let mut restored: WindowSampler = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored.next_batch, 3);
        assert_eq!(restored.next_batch(&shard).unwrap(), expected);
        assert_eq!(restored, a);
        assert_eq!(a.batch_at(&shard, 3).unwrap(), expected);
    }

    #[test]
    fn sampler_edge_cases() {
        // Exactly ctx + 1 tokens: the only window starts at 0.
        let (_d, shard) = iota_shard(17);
        let b = WindowSampler::new(1, 3, 16).next_batch(&shard).unwrap();
        assert!(b.inputs.chunks(16).all(|row| row[0] == 0));
        assert_eq!(*b.targets.last().unwrap(), 16);

        let (_d2, short) = iota_shard(16);
        let err = WindowSampler::new(1, 1, 16).next_batch(&short).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("16 tokens") && msg.contains("at least 17"),
            "{msg}"
        );
        assert!(WindowSampler::new(1, 0, 4).next_batch(&shard).is_err());
    }

    #[test]
    fn eval_batches_are_consecutive_and_capped() {
        let (_d, shard) = iota_shard(100);
        // (100 - 1) / 10 = 9 windows -> 4 full batches of 2.
        assert_eq!(eval_batch_count(100, 2, 10, usize::MAX), 4);
        let batches: Vec<Batch> = eval_batches(&shard, 2, 10, usize::MAX).collect();
        assert_eq!(batches.len(), 4);
        let all_inputs: Vec<u32> = batches.iter().flat_map(|b| b.inputs.clone()).collect();
        assert_eq!(all_inputs, (0..80).collect::<Vec<u32>>());
        assert_eq!(batches[3].targets.last(), Some(&80));
        assert_eq!(eval_batches(&shard, 2, 10, 3).count(), 3);
        assert_eq!(eval_batches(&shard, 20, 10, 3).count(), 0);
        // Same result every time.
        assert_eq!(batches, eval_batches(&shard, 2, 10, 9).collect::<Vec<_>>());
    }
}
