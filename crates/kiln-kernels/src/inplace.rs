//! In-place writes into views of a flat buffer (a gradient buffer's per-tensor views):
//!
//! - [`add_in_place`]: `dst += src`, the gradient accumulation of a micro-batch;
//! - [`index_add_rows`]: `dst[ids[i], :] += src[i, :]`, the embedding lookup's backward written
//!   straight into the table's gradient, with no `(rows, d)` temporary;
//! - [`widen_into`]: `dst = src` from bf16 into f32, FSDP's gathered bf16 compute parameters
//!   widened into the f32 workspace the kernels read, with no f32 temporary.
//!
//! `dst` may be any contiguous view (a `narrow` of a larger buffer: non-zero start offset). On
//! the CPU in f32/f64 each is one pass with no allocation; elsewhere they compute the result
//! with tensor ops and copy it back into `dst` (`slice_set`).

use crate::util::{contiguous, contiguous_mut, Float, ELEMWISE_CHUNK};
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// `dst += src` in place; `dst` contiguous (a view is fine), `src` of the same shape and dtype.
pub fn add_in_place(dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() {
        bail!(
            "add_in_place: shape mismatch dst {:?} src {:?}",
            dst.dims(),
            src.dims()
        )
    }
    if !dst.is_contiguous() {
        bail!("add_in_place: the destination must be contiguous")
    }
    let fused = dst.device().is_cpu()
        && src.device().is_cpu()
        && matches!(dst.dtype(), DType::F32 | DType::F64)
        && src.dtype() == dst.dtype();
    if fused {
        dst.inplace_op2(&src.contiguous()?, &AddAssign)
    } else {
        let sum = (dst.detach() + src.to_dtype(dst.dtype())?)?;
        write_back(dst, &sum)
    }
}

/// `dst[ids[i], :] += src[i, :]` in place, in the order of `ids` (so a zeroed `dst` ends up equal
/// to `zeros.index_add(ids, src, 0)`, bit for bit). `dst (r, d)` contiguous (a view is fine),
/// `ids (n)` u32 or i64 (an id equal to the type's maximum is skipped, as candle's `index_add`
/// does), `src (n, d)`.
pub fn index_add_rows(dst: &Tensor, ids: &Tensor, src: &Tensor) -> Result<()> {
    let (_, d) = dst.dims2()?;
    let (n, sd) = src.dims2()?;
    let ids = ids.flatten_all()?;
    if sd != d || ids.dim(0)? != n {
        bail!(
            "index_add_rows: dst {:?}, ids {:?} and src {:?} do not match",
            dst.dims(),
            ids.dims(),
            src.dims()
        )
    }
    if !dst.is_contiguous() {
        bail!("index_add_rows: the destination must be contiguous")
    }
    let ids = match ids.dtype() {
        DType::U32 | DType::I64 => ids,
        _ => ids.to_dtype(DType::U32)?,
    };
    let fused = dst.device().is_cpu()
        && src.device().is_cpu()
        && ids.device().is_cpu()
        && matches!(dst.dtype(), DType::F32 | DType::F64)
        && src.dtype() == dst.dtype();
    if fused {
        dst.inplace_op3(&ids.contiguous()?, &src.contiguous()?, &IndexAddRows)
    } else {
        let sum = dst
            .detach()
            .index_add(&ids, &src.to_dtype(dst.dtype())?, 0)?;
        write_back(dst, &sum)
    }
}

/// `dst = src`, converted to `dst`'s dtype; `dst` contiguous (a view is fine), `src` of the
/// same element count. On the CPU, bf16 into f32 is one pass with no allocation.
pub fn widen_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.elem_count() != src.elem_count() {
        bail!(
            "widen_into: {} elements into {}",
            src.elem_count(),
            dst.elem_count()
        )
    }
    if !dst.is_contiguous() {
        bail!("widen_into: the destination must be contiguous")
    }
    let fused = dst.device().is_cpu()
        && src.device().is_cpu()
        && dst.dtype() == DType::F32
        && src.dtype() == DType::BF16;
    if fused {
        dst.flatten_all()?
            .inplace_op2(&src.flatten_all()?.contiguous()?, &Widen)
    } else {
        write_back(dst, &src.to_dtype(dst.dtype())?)
    }
}

struct Widen;

impl InplaceOp2 for Widen {
    fn name(&self) -> &'static str {
        "kiln-widen-into"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = InplaceOp2::name(self);
        let (CpuStorage::F32(d), CpuStorage::BF16(s)) = (s1, s2) else {
            bail!("{name}: expected an f32 destination and a bf16 source")
        };
        let (d, s) = (contiguous_mut(d, l1, name)?, contiguous(s, l2, name)?);
        d.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(s.par_chunks(ELEMWISE_CHUNK))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d = s.to_f32();
                }
            });
        Ok(())
    }
}

/// Copies `value` (same shape) into the contiguous view `dst` (sharing its storage).
fn write_back(dst: &Tensor, value: &Tensor) -> Result<()> {
    let (dst, value) = (dst.flatten_all()?, value.flatten_all()?);
    dst.slice_set(&value.contiguous()?, 0, 0)
}

struct AddAssign;

fn add_kernel<T: Float>(dst: &mut [T], src: &[T]) {
    dst.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(src.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
}

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "kiln-add-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = InplaceOp2::name(self);
        if l1.shape() != l2.shape() {
            bail!("{name}: shape mismatch {:?} vs {:?}", l1.dims(), l2.dims())
        }
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                add_kernel(contiguous_mut(d, l1, name)?, contiguous(s, l2, name)?)
            }
            (CpuStorage::F64(d), CpuStorage::F64(s)) => {
                add_kernel(contiguous_mut(d, l1, name)?, contiguous(s, l2, name)?)
            }
            _ => bail!("{name}: expected f32 or f64 tensors of the same dtype"),
        }
        Ok(())
    }
}

struct IndexAddRows;

/// An id as a row index; `None` for the skip marker (the type's maximum).
trait RowId: Copy {
    fn row(self) -> Option<usize>;
}

impl RowId for u32 {
    fn row(self) -> Option<usize> {
        (self != u32::MAX).then_some(self as usize)
    }
}

impl RowId for i64 {
    fn row(self) -> Option<usize> {
        if self == i64::MAX {
            None
        } else {
            // A negative id maps past any table and is rejected below.
            Some(usize::try_from(self).unwrap_or(usize::MAX))
        }
    }
}

fn index_add_kernel<T: Float, I: RowId>(
    dst: &mut [T],
    ids: &[I],
    src: &[T],
    d: usize,
) -> Result<()> {
    if d == 0 {
        return Ok(());
    }
    let rows = dst.len() / d;
    for (i, id) in ids.iter().enumerate() {
        let Some(r) = id.row() else { continue };
        if r >= rows {
            bail!("index_add_rows: id {r} is out of range for {rows} rows")
        }
        for (o, &s) in dst[r * d..(r + 1) * d]
            .iter_mut()
            .zip(&src[i * d..(i + 1) * d])
        {
            *o += s;
        }
    }
    Ok(())
}

impl InplaceOp3 for IndexAddRows {
    fn name(&self) -> &'static str {
        "kiln-index-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = InplaceOp3::name(self);
        let dst_cols = l1.dims().last().copied().unwrap_or(1);
        let src_cols = l3.dims().last().copied().unwrap_or(1);
        if dst_cols != src_cols || l2.shape().elem_count() * src_cols != l3.shape().elem_count() {
            bail!(
                "{name}: dst {:?}, ids {:?} and src {:?} do not match",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        macro_rules! run {
            ($d:expr, $s:expr) => {
                match s2 {
                    CpuStorage::U32(ids) => index_add_kernel(
                        contiguous_mut($d, l1, name)?,
                        contiguous(ids, l2, name)?,
                        contiguous($s, l3, name)?,
                        dst_cols,
                    ),
                    CpuStorage::I64(ids) => index_add_kernel(
                        contiguous_mut($d, l1, name)?,
                        contiguous(ids, l2, name)?,
                        contiguous($s, l3, name)?,
                        dst_cols,
                    ),
                    _ => bail!("{name}: ids must be u32 or i64"),
                }
            };
        }
        match (s1, s3) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => run!(d, s),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => run!(d, s),
            _ => bail!("{name}: expected f32 or f64 tensors of the same dtype"),
        }
    }
}
