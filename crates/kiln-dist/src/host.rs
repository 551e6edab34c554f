//! Host (CPU) memory of tensors, for engines that take raw buffers: a contiguous f32 view is
//! read through its storage's read guard and written through a candle in-place op, so the
//! engine reads and writes the tensor's own memory (a view of a flat buffer included), no copy.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};

use crate::{DistError, Result};

fn f32_contiguous(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 || !t.is_contiguous() || !t.device().is_cpu() {
        return Err(DistError::Buffer {
            op,
            msg: format!(
                "needs a contiguous f32 CPU tensor, got {:?} on {:?} (contiguous: {})",
                t.dtype(),
                t.device().location(),
                t.is_contiguous()
            ),
        });
    }
    Ok(())
}

/// Runs `f` on the elements of `t` (read only).
pub(crate) fn with_slice<R>(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    f32_contiguous(op, t)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Err(DistError::Buffer {
            op,
            msg: "not f32 CPU storage".into(),
        });
    };
    let start = layout.start_offset();
    f(&data[start..start + t.elem_count()])
}

struct WithSliceMut<F> {
    f: Mutex<Option<F>>,
    result: Mutex<Option<Result<()>>>,
}

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for WithSliceMut<F> {
    fn name(&self) -> &'static str {
        "kiln-dist-buffer"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("kiln-dist: not f32 storage")
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
pub(crate) fn with_slice_mut(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<()> {
    f32_contiguous(op, t)?;
    let call = WithSliceMut {
        f: Mutex::new(Some(f)),
        result: Mutex::new(None),
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
