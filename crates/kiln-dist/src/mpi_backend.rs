//! MPI collectives (OpenMPI, MPICH: anything the `mpi` crate builds against), for CPU ranks
//! started by `mpirun -np N kiln ...` or `srun`.
//!
//! Every collective is MPI's non-blocking form (`MPI_Iallreduce`, `MPI_Ireduce_scatter`,
//! `MPI_Iallgatherv`, `MPI_Ibcast`, `MPI_Ibarrier`), polled with `MPI_Test` until it completes
//! or the timeout passes, so a dead or stalled peer becomes an error rather than a hang. On a
//! timeout each waiting rank probes every peer on a separate communicator for a few seconds;
//! the peers that do not answer are named in the error. After a timeout the buffers may still
//! be in MPI's hands: the only sound next call is [`Collectives::abort`].

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use half::bf16;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use crate::host::{check_chunks, with_slice, with_slice_mut};
use crate::{Collectives, DistError, Result};

/// Elements per message: MPI counts are C ints, and smaller messages keep memory bounded.
const MAX_MESSAGE: usize = 1 << 28;
/// How long a timed-out rank listens for its peers' probes.
const PROBE_WINDOW: Duration = Duration::from_secs(5);
const PROBE_TAG: c_int = 7177;

pub struct MpiCollectives {
    // Field order matters: the communicators are freed before the universe finalises MPI.
    comm: SimpleCommunicator,
    probe_comm: SimpleCommunicator,
    _universe: mpi::environment::Universe,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Collectives issued so far (names the one that failed).
    seq: Cell<u64>,
}

fn check(op: &'static str, code: c_int) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(DistError::Engine {
            engine: "mpi",
            op,
            code,
        })
    }
}

fn null_request() -> ffi::MPI_Request {
    // SAFETY: reading an extern constant of the MPI library (a handle value).
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

impl MpiCollectives {
    /// Initialises MPI (threading "funneled": only the main thread calls MPI; the compute
    /// threads never do) with `timeout` per collective.
    pub fn init(timeout: Duration) -> Result<Self> {
        let (universe, _threading) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| DistError::Init("MPI was already initialised".into()))?;
        let world = universe.world();
        let comm = world.duplicate();
        let probe_comm = world.duplicate();
        Ok(Self {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm,
            probe_comm,
            _universe: universe,
            timeout,
            seq: Cell::new(0),
        })
    }

    /// Waits for `req` until it completes or the timeout passes.
    fn wait(&self, op: &'static str, req: ffi::MPI_Request) -> Result<()> {
        self.wait_for(op, req, self.timeout)
    }

    /// Waits for `req` until it completes or `timeout` passes.
    fn wait_for(
        &self,
        op: &'static str,
        mut req: ffi::MPI_Request,
        timeout: Duration,
    ) -> Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            let mut done: c_int = 0;
            // SAFETY: `req` is a live request of this process; status is ignored.
            let code = unsafe { ffi::MPI_Test(&mut req, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            check(op, code)?;
            if done != 0 {
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(DistError::Timeout {
                    op,
                    seq,
                    waited_s: waited.as_secs_f64(),
                    rank: self.rank,
                    unresponsive: self.unresponsive_peers(),
                });
            }
            // Spin briefly (most collectives finish within microseconds of the last arrival),
            // then poll at a gentler pace.
            polls += 1;
            if polls < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// After a timeout: sends a probe to every peer and listens for theirs for
    /// [`PROBE_WINDOW`]. Peers stuck in the same collective time out too and answer; a dead or
    /// stalled peer does not. The buffers are leaked: requests to silent peers stay pending
    /// until the job is aborted.
    pub(crate) fn unresponsive_peers(&self) -> Vec<usize> {
        let peers: Vec<usize> = (0..self.size).filter(|&p| p != self.rank).collect();
        let me: &'static [u8; 1] = Box::leak(Box::new([self.rank as u8]));
        let inbox: &'static mut [u8] = Box::leak(vec![0u8; peers.len()].into_boxed_slice());
        let mut receives = Vec::with_capacity(peers.len());
        for (i, &p) in peers.iter().enumerate() {
            let (mut send, mut recv) = (null_request(), null_request());
            // SAFETY: 'static buffers; valid ranks of `probe_comm`.
            unsafe {
                ffi::MPI_Isend(
                    me.as_ptr() as *const c_void,
                    1,
                    ffi::RSMPI_UINT8_T,
                    p as c_int,
                    PROBE_TAG,
                    self.probe_comm.as_raw(),
                    &mut send,
                );
                ffi::MPI_Irecv(
                    inbox[i..].as_mut_ptr() as *mut c_void,
                    1,
                    ffi::RSMPI_UINT8_T,
                    p as c_int,
                    PROBE_TAG,
                    self.probe_comm.as_raw(),
                    &mut recv,
                );
            }
            receives.push(Some(recv));
        }
        let start = Instant::now();
        while start.elapsed() < PROBE_WINDOW && receives.iter().any(Option::is_some) {
            for slot in receives.iter_mut() {
                if let Some(req) = slot {
                    let mut done: c_int = 0;
                    // SAFETY: a live request of this process.
                    unsafe { ffi::MPI_Test(req, &mut done, ffi::RSMPI_STATUS_IGNORE) };
                    if done != 0 {
                        *slot = None;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        peers
            .iter()
            .zip(&receives)
            .filter(|(_, r)| r.is_some())
            .map(|(&p, _)| p)
            .collect()
    }

    fn counts(op: &'static str, chunks: &[usize]) -> Result<(Vec<c_int>, Vec<c_int>)> {
        let total: usize = chunks.iter().sum();
        if total > c_int::MAX as usize {
            return Err(DistError::Buffer {
                op,
                msg: format!("{total} elements is more than one MPI message holds"),
            });
        }
        let counts: Vec<c_int> = chunks.iter().map(|&c| c as c_int).collect();
        let displs: Vec<c_int> = chunks
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c as c_int;
                Some(d)
            })
            .collect();
        Ok((counts, displs))
    }

    /// `MPI_Iallreduce` of `data` (f32 or f64 by `datatype`) with `op`, in place via a copy of
    /// the input; the copy is leaked on a timeout (MPI may still read it).
    fn all_reduce_raw<T: Copy>(
        &self,
        name: &'static str,
        data: &mut [T],
        datatype: ffi::MPI_Datatype,
        reduce: ffi::MPI_Op,
    ) -> Result<()> {
        for chunk in data.chunks_mut(MAX_MESSAGE) {
            let send = chunk.to_vec();
            let mut req = null_request();
            // SAFETY: both buffers hold `chunk.len()` elements of `datatype` and outlive the
            // request (the send copy is leaked if the wait fails).
            let code = unsafe {
                ffi::MPI_Iallreduce(
                    send.as_ptr() as *const c_void,
                    chunk.as_mut_ptr() as *mut c_void,
                    chunk.len() as c_int,
                    datatype,
                    reduce,
                    self.comm.as_raw(),
                    &mut req,
                )
            };
            check(name, code)?;
            if let Err(e) = self.wait(name, req) {
                std::mem::forget(send);
                return Err(e);
            }
        }
        Ok(())
    }

    /// `MPI_Iallgatherv` of elements of `datatype` (f32, or bf16 moved as 16-bit words: a
    /// gather does no arithmetic).
    fn all_gather_raw<T: Copy>(
        &self,
        op: &'static str,
        mine: &[T],
        out: &mut [T],
        chunks: &[usize],
        datatype: ffi::MPI_Datatype,
    ) -> Result<()> {
        let (counts, displs) = Self::counts(op, chunks)?;
        let send = mine.to_vec();
        let mut req = null_request();
        // SAFETY: `send` holds chunks[rank] elements, `out` sum(chunks), all of `datatype`'s
        // size; counts/displs describe it.
        let code = unsafe {
            ffi::MPI_Iallgatherv(
                send.as_ptr() as *const c_void,
                send.len() as c_int,
                datatype,
                out.as_mut_ptr() as *mut c_void,
                counts.as_ptr(),
                displs.as_ptr(),
                datatype,
                self.comm.as_raw(),
                &mut req,
            )
        };
        check(op, code)?;
        let r = self.wait(op, req);
        if r.is_err() {
            std::mem::forget(send);
            std::mem::forget(counts);
            std::mem::forget(displs);
        }
        r
    }
}

impl Collectives for MpiCollectives {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        with_slice_mut("all_reduce", t, |buf: &mut [f32]| {
            // SAFETY: extern constants of the MPI library.
            let (dt, op) = unsafe { (ffi::RSMPI_FLOAT, ffi::RSMPI_SUM) };
            self.all_reduce_raw("all_reduce", buf, dt, op)
        })
    }

    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()> {
        const OP: &str = "reduce_scatter";
        check_chunks(OP, input, output, chunks, self.rank)?;
        let (counts, _) = Self::counts(OP, chunks)?;
        with_slice(OP, input, |inp: &[f32]| {
            with_slice_mut(OP, output, |out: &mut [f32]| {
                let mut req = null_request();
                // SAFETY: `inp` holds sum(counts) f32s, `out` counts[rank]; both outlive the
                // request (the caller aborts after a timeout).
                let code = unsafe {
                    ffi::MPI_Ireduce_scatter(
                        inp.as_ptr() as *const c_void,
                        out.as_mut_ptr() as *mut c_void,
                        counts.as_ptr(),
                        ffi::RSMPI_FLOAT,
                        ffi::RSMPI_SUM,
                        self.comm.as_raw(),
                        &mut req,
                    )
                };
                check(OP, code)?;
                self.wait(OP, req)
            })
        })
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor, chunks: &[usize]) -> Result<()> {
        const OP: &str = "all_gather";
        check_chunks(OP, output, input, chunks, self.rank)?;
        match (input.dtype(), output.dtype()) {
            (DType::F32, DType::F32) => with_slice(OP, input, |mine: &[f32]| {
                with_slice_mut(OP, output, |out: &mut [f32]| {
                    // SAFETY: an extern constant of the MPI library.
                    let dt = unsafe { ffi::RSMPI_FLOAT };
                    self.all_gather_raw(OP, mine, out, chunks, dt)
                })
            }),
            (DType::BF16, DType::BF16) => with_slice(OP, input, |mine: &[bf16]| {
                with_slice_mut(OP, output, |out: &mut [bf16]| {
                    // SAFETY: an extern constant of the MPI library.
                    let dt = unsafe { ffi::RSMPI_UINT16_T };
                    self.all_gather_raw(OP, mine, out, chunks, dt)
                })
            }),
            (a, b) => Err(DistError::Buffer {
                op: OP,
                msg: format!("gathers f32 or bf16 into the same dtype, not {a:?} into {b:?}"),
            }),
        }
    }

    fn all_gather_in_place(&self, buf: &Tensor, chunks: &[usize]) -> Result<()> {
        const OP: &str = "all_gather";
        let total: usize = chunks.iter().sum();
        if buf.elem_count() != total || chunks.len() != self.size {
            return Err(DistError::Buffer {
                op: OP,
                msg: format!(
                    "a buffer of {} elements does not match chunks {chunks:?}",
                    buf.elem_count()
                ),
            });
        }
        let start: usize = chunks[..self.rank].iter().sum();
        with_slice_mut(OP, buf, |out: &mut [f32]| {
            let mine = out[start..start + chunks[self.rank]].to_vec();
            // SAFETY: an extern constant of the MPI library.
            let dt = unsafe { ffi::RSMPI_FLOAT };
            self.all_gather_raw(OP, &mine, out, chunks, dt)
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        with_slice_mut(OP, t, |buf: &mut [f32]| {
            for chunk in buf.chunks_mut(MAX_MESSAGE) {
                let mut req = null_request();
                // SAFETY: `chunk` outlives the request.
                let code = unsafe {
                    ffi::MPI_Ibcast(
                        chunk.as_mut_ptr() as *mut c_void,
                        chunk.len() as c_int,
                        ffi::RSMPI_FLOAT,
                        root as c_int,
                        self.comm.as_raw(),
                        &mut req,
                    )
                };
                check(OP, code)?;
                self.wait(OP, req)?;
            }
            Ok(())
        })
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        // SAFETY: extern constants of the MPI library.
        let (dt, op) = unsafe { (ffi::RSMPI_DOUBLE, ffi::RSMPI_SUM) };
        self.all_reduce_raw("all_reduce", values, dt, op)
    }

    fn all_reduce_max_f64(&self, values: &mut [f64]) -> Result<()> {
        // SAFETY: extern constants of the MPI library.
        let (dt, op) = unsafe { (ffi::RSMPI_DOUBLE, ffi::RSMPI_MAX) };
        self.all_reduce_raw("all_reduce_max", values, dt, op)
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        let mut len = [bytes.len() as f64];
        if self.rank != root {
            len[0] = 0.0;
        }
        // The length first (a sum where only the root contributes), then the bytes.
        self.all_reduce_sum_f64(&mut len)?;
        bytes.resize(len[0] as usize, 0);
        for chunk in bytes.chunks_mut(MAX_MESSAGE) {
            let mut req = null_request();
            // SAFETY: `chunk` outlives the request.
            let code = unsafe {
                ffi::MPI_Ibcast(
                    chunk.as_mut_ptr() as *mut c_void,
                    chunk.len() as c_int,
                    ffi::RSMPI_UINT8_T,
                    root as c_int,
                    self.comm.as_raw(),
                    &mut req,
                )
            };
            check(OP, code)?;
            self.wait(OP, req)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.barrier_within(self.timeout)
    }

    fn barrier_within(&self, timeout: Duration) -> Result<()> {
        let mut req = null_request();
        // SAFETY: a valid communicator.
        let code = unsafe { ffi::MPI_Ibarrier(self.comm.as_raw(), &mut req) };
        check("barrier", code)?;
        self.wait_for("barrier", req, timeout)
    }

    fn abort(&self, code: i32) -> ! {
        // SAFETY: MPI is initialised; MPI_Abort ends every process of the communicator's job.
        unsafe { ffi::MPI_Abort(self.comm.as_raw(), code) };
        std::process::exit(code)
    }
}
