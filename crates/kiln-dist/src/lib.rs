//! Collective communication for data-parallel training: one [`Collectives`] trait, and the
//! engines behind it. kiln never speaks its own protocol: on CPUs the collectives are MPI's
//! (Debian's OpenMPI through the `mpi` crate, feature `mpi`, on by default), and a single
//! process uses [`SingleProcess`], where every collective is the identity.
//!
//! The buffers are candle tensors (contiguous f32 views, such as a range of the flat gradient
//! buffer; gathers also take bf16), so a GPU backend can hand device memory to its engine; scalars (loss sums, token
//! counts, norms) travel as host `f64`s and small messages as bytes.
//!
//! Every collective waits at most the backend's timeout. A collective that does not complete
//! in time is diagnosed (which peers still answer) and returned as [`DistError::Timeout`];
//! the caller reports it and calls [`Collectives::abort`], which ends the whole job.

use std::ops::Range;
use std::time::Duration;

use candle_core::Tensor;

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
mod host;
#[cfg(feature = "mpi")]
mod mpi_backend;

#[cfg(feature = "nccl")]
mod nccl;

#[cfg(feature = "mpi")]
pub use mpi_backend::MpiCollectives;
#[cfg(feature = "nccl")]
pub use nccl::NcclCollectives;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "rank {rank}: {op} #{seq} did not complete within {waited_s:.0} s; {}",
        describe_missing(unresponsive)
    )]
    Timeout {
        op: &'static str,
        seq: u64,
        waited_s: f64,
        rank: usize,
        /// Peers that did not answer a probe after the timeout (dead or stalled).
        unresponsive: Vec<usize>,
    },
    #[error("{engine}: {op} failed with error code {code}")]
    Engine {
        engine: &'static str,
        op: &'static str,
        code: i32,
    },
    #[error("collective {op}: {msg}")]
    Buffer { op: &'static str, msg: String },
    #[error("{0}")]
    Init(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn describe_missing(ranks: &[usize]) -> String {
    match ranks {
        [] => "every peer still answers, so the job is stuck elsewhere (a rank in a different collective?)".into(),
        [r] => format!("rank {r} is not responding (dead or stalled)"),
        _ => format!(
            "ranks {} are not responding (dead or stalled)",
            ranks
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub type Result<T> = std::result::Result<T, DistError>;

/// The collectives a data-parallel step needs. Every rank calls the same collectives in the
/// same order; tensors are contiguous f32, on the backend's device.
pub trait Collectives {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The engine's name, for logs ("single", "mpi", "nccl").
    fn engine(&self) -> &'static str;
    /// How long one collective may wait for the others before it is declared failed.
    fn timeout(&self) -> Duration;

    /// `t = sum over ranks of t`, in place.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()>;
    /// Rank `r` receives the sum over ranks of `input[chunks[r]]` in `output`
    /// (`input.len() == chunks.sum()`, `output.len() == chunks[rank]`; see [`shard_sizes`]).
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()>;
    /// `output[chunks[r]] = input of rank r` for every r (`output` must not share storage
    /// with `input`). f32 or bf16 (FSDP's compute parameters), `input` and `output` alike.
    fn all_gather(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()>;
    /// `buf[chunks[r]]` comes from rank r, for every r: each rank has already written its own
    /// chunk in place (ZeRO-1's parameters after a sharded update).
    fn all_gather_in_place(&self, buf: &Tensor, chunks: &[usize]) -> Result<()>;
    /// `t = t of rank root`.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()>;
    /// Host scalars summed over ranks, in place.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Host values: the maximum over ranks, in place.
    fn all_reduce_max_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Bytes from rank `root` to every rank (`bytes` is resized on the receivers).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// A barrier that waits up to `timeout` instead of the backend's own: for ranks waiting
    /// on one rank's long work (preparing a dataset, committing a checkpoint).
    fn barrier_within(&self, timeout: Duration) -> Result<()>;
    /// Ends every process of the job with `code` (after a failure on this rank, so that no
    /// other rank waits for it). Never returns.
    fn abort(&self, code: i32) -> !;
}

/// Chunk sizes for splitting `len` elements over `world` ranks: `ceil(len / world)` each, the
/// last ones smaller (possibly 0), summing to `len`.
pub fn shard_sizes(len: usize, world: usize) -> Vec<usize> {
    let per = len.div_ceil(world.max(1));
    (0..world)
        .map(|r| len.saturating_sub(r * per).min(per))
        .collect()
}

/// The element range of rank `rank`'s chunk of [`shard_sizes`].
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    let sizes = shard_sizes(len, world);
    let start: usize = sizes[..rank].iter().sum();
    start..start + sizes[rank]
}

/// One process: every collective is the identity (or a copy).
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "single"
    }
    fn timeout(&self) -> Duration {
        Duration::MAX
    }
    fn all_reduce_sum(&self, _t: &Tensor) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()> {
        host::check_chunks("reduce_scatter", input, output, chunks, 0)?;
        output.slice_set(input, 0, 0)?;
        Ok(())
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()> {
        host::check_chunks("all_gather", output, input, chunks, 0)?;
        output.slice_set(input, 0, 0)?;
        Ok(())
    }
    fn all_gather_in_place(&self, _buf: &Tensor, _chunks: &[usize]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _t: &Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn barrier_within(&self, _timeout: Duration) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shards_cover_the_buffer_in_order() {
        assert_eq!(shard_sizes(10, 3), vec![4, 4, 2]);
        assert_eq!(shard_sizes(8, 2), vec![4, 4]);
        assert_eq!(shard_sizes(1, 3), vec![1, 0, 0]);
        assert_eq!(shard_range(10, 2, 3), 8..10);
        assert_eq!(shard_range(1, 2, 3), 1..1);
        for (len, world) in [(0, 2), (7, 1), (1000, 7)] {
            assert_eq!(shard_sizes(len, world).iter().sum::<usize>(), len);
        }
    }

    #[test]
    fn one_process_collectives_are_identities() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::new(&[1f32, 2., 3.], &dev)?;
        let c = SingleProcess;
        c.all_reduce_sum(&t)?;
        assert_eq!(t.to_vec1::<f32>()?, vec![1., 2., 3.]);
        let out = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
        c.reduce_scatter_sum(&t, &out, &[3])?;
        assert_eq!(out.to_vec1::<f32>()?, vec![1., 2., 3.]);
        let mut v = [2.0];
        c.all_reduce_sum_f64(&mut v)?;
        assert_eq!(v, [2.0]);
        assert!(c.reduce_scatter_sum(&t, &out, &[2]).is_err());
        Ok(())
    }
}
