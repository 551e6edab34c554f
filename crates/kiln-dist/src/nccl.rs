//! NCCL collectives for CUDA ranks (feature `nccl`, which the binary's `cuda` feature turns
//! on): tensors on the GPU go through NCCL on the device's stream, everything else (host
//! scalars, bytes, barriers, the failure probe, abort) through MPI, which also carries NCCL's
//! unique id from rank 0 to the others at start (as llm.c does).
//!
//! NCCL's reduce-scatter and all-gather take equal chunks: [`shard_sizes`](crate::shard_sizes)
//! chunks (the last ones shorter) are padded to the largest through temporary device buffers.
//! A collective is enqueued, then an event on the stream is polled until it completes or the
//! timeout passes (then the MPI probe names the silent peers).
//!
//! Built here without a GPU (CUDA from PyPI wheels): compiled, not yet run on a device.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};
use std::sync::Arc;

use crate::{Collectives, DistError, MpiCollectives, Result};

pub struct NcclCollectives {
    comm: Comm,
    stream: Arc<CudaStream>,
    device: Device,
    host: MpiCollectives,
    seq: std::cell::Cell<u64>,
}

fn nccl_err(op: &'static str, e: impl std::fmt::Debug) -> DistError {
    DistError::Buffer {
        op,
        msg: format!("NCCL: {e:?}"),
    }
}

impl NcclCollectives {
    /// NCCL over the ranks of `host` (an initialised MPI group), one GPU per rank: rank r uses
    /// `device` (normally `Device::new_cuda(local_rank)`).
    pub fn init(host: MpiCollectives, device: Device) -> Result<Self> {
        let Device::Cuda(cuda) = &device else {
            return Err(DistError::Init(
                "NCCL needs a CUDA device for this rank".into(),
            ));
        };
        let stream = cuda.cuda_stream();
        let mut id_bytes = if host.rank() == 0 {
            let id = Id::new().map_err(|e| DistError::Init(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        host.broadcast_bytes(&mut id_bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            stream.clone(),
            host.rank(),
            host.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| DistError::Init(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Self {
            comm,
            stream,
            device,
            host,
            seq: std::cell::Cell::new(0),
        })
    }

    /// Waits for the work enqueued on the stream, at most the timeout.
    fn wait(&self, op: &'static str) -> Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| nccl_err(op, e))?;
        let start = Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(nccl_err(op, e)),
            }
            if start.elapsed() >= self.host.timeout() {
                return Err(DistError::Timeout {
                    op,
                    seq,
                    waited_s: start.elapsed().as_secs_f64(),
                    rank: self.host.rank(),
                    unresponsive: self.host.unresponsive_peers(),
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// NCCL's all-gather of equal chunks `send` into `recv`, waited for.
    fn gather_padded<T: DeviceElem>(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        const OP: &str = "all_gather";
        read_device(OP, send, |src: &CudaView<'_, T>| {
            with_device_slice(OP, recv, |dst: &mut CudaViewMut<'_, T>| {
                self.comm
                    .all_gather(src, dst)
                    .map_err(|e| nccl_err(OP, e))?;
                Ok(())
            })
        })?;
        self.wait(OP)
    }

    /// `t` padded with zeros to `len` elements (a new device tensor).
    fn padded(&self, t: &Tensor, len: usize) -> Result<Tensor> {
        let t = t.flatten_all()?;
        let n = t.elem_count();
        Ok(if n == len {
            t.copy()?
        } else {
            Tensor::cat(&[&t, &Tensor::zeros(len - n, t.dtype(), &self.device)?], 0)?
        })
    }
}

/// An element type NCCL moves for kiln: f32 (every collective), bf16 (FSDP's compute
/// parameters, gathered).
trait DeviceElem: CudaDType + NcclType + 'static {
    const DTYPE: DType;
}
impl DeviceElem for f32 {
    const DTYPE: DType = DType::F32;
}
impl DeviceElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
}

/// Runs `f` on the device memory of a contiguous CUDA tensor of `T`.
fn with_device_slice<T: DeviceElem>(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&mut CudaViewMut<'_, T>) -> Result<()>,
) -> Result<()> {
    struct Visit<F, T>(
        Mutex<Option<F>>,
        Mutex<Option<Result<()>>>,
        std::marker::PhantomData<fn() -> T>,
    );
    impl<F, T: DeviceElem> InplaceOp1 for Visit<F, T>
    where
        F: FnOnce(&mut CudaViewMut<'_, T>) -> Result<()>,
    {
        fn name(&self) -> &'static str {
            "kiln-dist-nccl"
        }
        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("NCCL collectives take CUDA tensors")
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("kiln-dist: not contiguous")
            };
            let slice = s.as_cuda_slice_mut::<T>()?;
            let mut view = slice.slice_mut(start..end);
            let f = self
                .0
                .lock()
                .expect("poisoned")
                .take()
                .expect("called once");
            *self.1.lock().expect("poisoned") = Some(f(&mut view));
            Ok(())
        }
    }
    if t.dtype() != T::DTYPE || !t.is_contiguous() {
        return Err(DistError::Buffer {
            op,
            msg: format!(
                "needs a contiguous {:?} tensor, got {:?}",
                T::DTYPE,
                t.dtype()
            ),
        });
    }
    let v = Visit(
        Mutex::new(Some(f)),
        Mutex::new(None),
        std::marker::PhantomData,
    );
    t.inplace_op1(&v)?;
    let r = v.1.lock().expect("poisoned").take();
    r.unwrap_or_else(|| {
        Err(DistError::Buffer {
            op,
            msg: "the buffer was not visited".into(),
        })
    })
}

/// The device slice of a contiguous CUDA tensor of `T`, read only.
fn read_device<T: DeviceElem, R>(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(DistError::Buffer {
            op,
            msg: "NCCL collectives take CUDA tensors".into(),
        });
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(DistError::Buffer {
            op,
            msg: "not contiguous".into(),
        });
    };
    let slice = s.as_cuda_slice::<T>()?;
    f(&slice.slice(start..end))
}

impl Collectives for NcclCollectives {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn engine(&self) -> &'static str {
        "nccl"
    }
    fn timeout(&self) -> Duration {
        self.host.timeout()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        const OP: &str = "all_reduce";
        with_device_slice(OP, t, |buf: &mut CudaViewMut<'_, f32>| {
            self.comm
                .all_reduce_in_place(buf, &ReduceOp::Sum)
                .map_err(|e| nccl_err(OP, e))?;
            Ok(())
        })?;
        self.wait(OP)
    }

    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()> {
        const OP: &str = "reduce_scatter";
        crate::host::check_chunks(OP, input, output, chunks, self.rank())?;
        let per = chunks.iter().copied().max().unwrap_or(0);
        // Chunk r of the input at r * per: pad every chunk to `per`.
        let mut parts = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for &c in chunks {
            parts.push(self.padded(&input.narrow(0, at, c)?, per)?);
            at += c;
        }
        let send = Tensor::cat(&parts, 0)?;
        let recv = Tensor::zeros(per, DType::F32, &self.device)?;
        read_device(OP, &send, |src: &CudaView<'_, f32>| {
            with_device_slice(OP, &recv, |dst: &mut CudaViewMut<'_, f32>| {
                self.comm
                    .reduce_scatter(src, dst, &ReduceOp::Sum)
                    .map_err(|e| nccl_err(OP, e))?;
                Ok(())
            })
        })?;
        self.wait(OP)?;
        output.slice_set(&recv.narrow(0, 0, chunks[self.rank()])?, 0, 0)?;
        Ok(())
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()> {
        const OP: &str = "all_gather";
        crate::host::check_chunks(OP, output, input, chunks, self.rank())?;
        if input.dtype() != output.dtype() {
            return Err(DistError::Buffer {
                op: OP,
                msg: format!(
                    "gathers into the same dtype, not {:?} into {:?}",
                    input.dtype(),
                    output.dtype()
                ),
            });
        }
        let per = chunks.iter().copied().max().unwrap_or(0);
        let send = self.padded(input, per)?;
        let recv = Tensor::zeros(per * chunks.len(), input.dtype(), &self.device)?;
        match input.dtype() {
            DType::BF16 => self.gather_padded::<half::bf16>(&send, &recv)?,
            _ => self.gather_padded::<f32>(&send, &recv)?,
        }
        let mut at = 0;
        for (r, &c) in chunks.iter().enumerate() {
            output.slice_set(&recv.narrow(0, r * per, c)?, 0, at)?;
            at += c;
        }
        Ok(())
    }

    fn all_gather_in_place(&self, buf: &Tensor, chunks: &[usize]) -> Result<()> {
        let start: usize = chunks[..self.rank()].iter().sum();
        let mine = buf.narrow(0, start, chunks[self.rank()])?.copy()?;
        self.all_gather(&mine, buf, chunks)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        with_device_slice(OP, t, |buf: &mut CudaViewMut<'_, f32>| {
            self.comm
                .broadcast_in_place(buf, root as i32)
                .map_err(|e| nccl_err(OP, e))?;
            Ok(())
        })?;
        self.wait(OP)
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(values)
    }
    fn all_reduce_max_f64(&self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_max_f64(values)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(bytes, root)
    }
    fn barrier(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| nccl_err("barrier", e))?;
        self.host.barrier()
    }
    fn barrier_within(&self, timeout: Duration) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| nccl_err("barrier", e))?;
        self.host.barrier_within(timeout)
    }
    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
}
