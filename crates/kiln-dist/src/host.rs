//! Host (CPU) memory of tensors, for engines that take raw buffers: a contiguous f32 (or bf16)
//! view is read through its storage's read guard and written through a candle in-place op, so
//! the engine reads and writes the tensor's own memory (a view of a flat buffer included), no
//! copy.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use half::bf16;

use crate::{DistError, Result};

/// An element type the engines move: f32 (every collective), bf16 (gathers of FSDP's compute
/// parameters).
pub(crate) trait HostElem: Copy + Send + 'static {
    const DTYPE: DType;
    fn view(storage: &CpuStorage) -> Option<&[Self]>;
    fn view_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl HostElem for f32 {
    const DTYPE: DType = DType::F32;
    fn view(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(d) => Some(d),
            _ => None,
        }
    }
    fn view_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(d) => Some(d),
            _ => None,
        }
    }
}

impl HostElem for bf16 {
    const DTYPE: DType = DType::BF16;
    fn view(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::BF16(d) => Some(d),
            _ => None,
        }
    }
    fn view_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::BF16(d) => Some(d),
            _ => None,
        }
    }
}

fn check_host<T: HostElem>(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != T::DTYPE || !t.is_contiguous() || !t.device().is_cpu() {
        return Err(DistError::Buffer {
            op,
            msg: format!(
                "needs a contiguous {:?} CPU tensor, got {:?} on {:?} (contiguous: {})",
                T::DTYPE,
                t.dtype(),
                t.device().location(),
                t.is_contiguous()
            ),
        });
    }
    Ok(())
}

/// Runs `f` on the elements of `t` (read only).
pub(crate) fn with_slice<T: HostElem, R>(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    check_host::<T>(op, t)?;
    let (storage, layout) = t.storage_and_layout();
    let Some(data) = (match &*storage {
        Storage::Cpu(s) => T::view(s),
        _ => None,
    }) else {
        return Err(DistError::Buffer {
            op,
            msg: format!("not {:?} CPU storage", T::DTYPE),
        });
    };
    let start = layout.start_offset();
    f(&data[start..start + t.elem_count()])
}

struct WithSliceMut<F, T> {
    f: Mutex<Option<F>>,
    result: Mutex<Option<Result<()>>>,
    elem: std::marker::PhantomData<fn() -> T>,
}

impl<T: HostElem, F: FnOnce(&mut [T]) -> Result<()>> InplaceOp1 for WithSliceMut<F, T> {
    fn name(&self) -> &'static str {
        "kiln-dist-buffer"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some(data) = T::view_mut(storage) else {
            candle_core::bail!("kiln-dist: not {:?} storage", T::DTYPE)
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("kiln-dist: not contiguous")
        };
        let f = self
            .f
            .lock()
            .expect("poisoned")
            .take()
            .expect("called once");
        *self.result.lock().expect("poisoned") = Some(f(&mut data[start..end]));
        Ok(())
    }
}

/// Runs `f` on the elements of `t`, which it may overwrite.
pub(crate) fn with_slice_mut<T: HostElem>(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&mut [T]) -> Result<()>,
) -> Result<()> {
    check_host::<T>(op, t)?;
    let call = WithSliceMut {
        f: Mutex::new(Some(f)),
        result: Mutex::new(None),
        elem: std::marker::PhantomData::<fn() -> T>,
    };
    t.inplace_op1(&call)?;
    let result = call.result.lock().expect("poisoned").take();
    result.unwrap_or_else(|| {
        Err(DistError::Buffer {
            op,
            msg: "the buffer was not visited".into(),
        })
    })
}

/// Checks that `whole.len() == sum(chunks)` and `part.len() == chunks[rank]`.
pub(crate) fn check_chunks(
    op: &'static str,
    whole: &Tensor,
    part: &Tensor,
    chunks: &[usize],
    rank: usize,
) -> Result<()> {
    let total: usize = chunks.iter().sum();
    let mine = chunks.get(rank).copied();
    if whole.elem_count() != total || Some(part.elem_count()) != mine {
        return Err(DistError::Buffer {
            op,
            msg: format!(
                "buffers of {} and {} elements do not match chunks {chunks:?} (rank {rank})",
                whole.elem_count(),
                part.elem_count()
            ),
        });
    }
    Ok(())
}
