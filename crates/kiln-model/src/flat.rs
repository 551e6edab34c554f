//! Flat storage: every parameter (and every gradient, and the optimizer's moments) lives in ONE
//! 1-D buffer, and each named tensor is a view into it (`narrow` + `reshape`, sharing storage).
//!
//! A [`FlatLayout`] says where each named tensor sits: `(name, shape, offset, numel)` in a fixed
//! order. Ordering the entries so that groups (AdamW's decay / no-decay groups, the trainable
//! LoRA adapters) are contiguous ranges lets one kernel call cover a whole group, and lets a
//! later sharding (ZeRO/FSDP) split a single buffer.
//!
//! [`Grads`] is the gradient buffer over a layout: the backward passes add into it in place
//! ([`Grads::accumulate`], [`Grads::index_add_rows`] for the embedding), so a step allocates no
//! per-tensor gradients and no `(vocab, dim)` temporary.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::ModelError;

/// One named tensor of a [`FlatLayout`]: elements `offset..offset + numel` of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
}

impl FlatEntry {
    /// The element range of this entry in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel
    }
}

/// Named tensors packed one after another in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlatLayout {
    entries: Vec<FlatEntry>,
    index: BTreeMap<String, usize>,
    total: usize,
}

impl FlatLayout {
    /// Packs `tensors` in the order given. Names must be unique.
    pub fn new(
        tensors: impl IntoIterator<Item = (String, Vec<usize>)>,
    ) -> Result<Self, ModelError> {
        let mut layout = Self::default();
        for (name, shape) in tensors {
            layout.push(name, shape)?;
        }
        Ok(layout)
    }

    /// Packs `tensors` ordered by `(group(name, shape), name)`: each group is one contiguous
    /// range, groups in increasing key order, names sorted within a group.
    pub fn grouped<K: Ord>(
        tensors: impl IntoIterator<Item = (String, Vec<usize>)>,
        group: impl Fn(&str, &[usize]) -> K,
    ) -> Result<Self, ModelError> {
        let mut v: Vec<(K, String, Vec<usize>)> = tensors
            .into_iter()
            .map(|(n, s)| (group(&n, &s), n, s))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        Self::new(v.into_iter().map(|(_, n, s)| (n, s)))
    }

    /// Appends one entry after the others.
    pub fn push(&mut self, name: String, shape: Vec<usize>) -> Result<(), ModelError> {
        if self.index.contains_key(&name) {
            return Err(ModelError::Input(format!(
                "flat layout: tensor {name:?} appears twice"
            )));
        }
        let numel = shape.iter().product();
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(FlatEntry {
            name,
            shape,
            offset: self.total,
            numel,
        });
        self.total += numel;
        Ok(())
    }

    /// The entries for which `keep` holds, in the same order, packed anew.
    pub fn subset(&self, keep: impl Fn(&FlatEntry) -> bool) -> Self {
        let mut out = Self::default();
        for e in self.entries.iter().filter(|e| keep(e)) {
            out.push(e.name.clone(), e.shape.clone())
                .expect("invariant: names are unique in a layout");
        }
        out
    }

    pub fn entries(&self) -> &[FlatEntry] {
        &self.entries
    }

    pub fn entry(&self, name: &str) -> Option<&FlatEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// The position of `name` among the entries.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Total elements: the size of the flat buffer.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The element ranges covered by maximal runs of consecutive entries with equal `key`:
    /// `(key, element range, entry range)`, in layout order.
    pub fn runs<K: PartialEq>(
        &self,
        key: impl Fn(&FlatEntry) -> K,
    ) -> Vec<(K, Range<usize>, Range<usize>)> {
        let mut out: Vec<(K, Range<usize>, Range<usize>)> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let k = key(e);
            match out.last_mut() {
                Some((last, elems, ents)) if *last == k => {
                    elems.end = e.offset + e.numel;
                    ents.end = i + 1;
                }
                _ => out.push((k, e.range(), i..i + 1)),
            }
        }
        out
    }

    /// One view per entry into `flat` (a 1-D tensor of [`FlatLayout::total`] elements), sharing
    /// its storage. Views of a `Var` stay on candle's autograd graph.
    pub fn views(&self, flat: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        if flat.dims() != [self.total] {
            return Err(ModelError::Input(format!(
                "flat buffer of shape {:?} for a layout of {} elements",
                flat.dims(),
                self.total
            )));
        }
        self.entries
            .iter()
            .map(|e| {
                Ok(flat
                    .narrow(0, e.offset, e.numel)?
                    .reshape(e.shape.clone())?)
            })
            .collect()
    }
}

/// Gradients over a [`FlatLayout`]: one flat buffer, a view per entry, and which entries hold a
/// gradient since the last [`Grads::zero`]. Reading (`get`, `iter`, `len`) sees only those:
/// like a map from name to gradient whose storage is allocated once.
///
/// Zeroing is lazy: [`Grads::zero`] only forgets which entries are live, and the first write
/// into an entry after it overwrites the stale values (a copy, or a fill with zeros before a
/// scatter), so a step touches each gradient once more than the backward itself needs, never
/// the whole buffer.
pub struct Grads {
    layout: Arc<FlatLayout>,
    flat: Tensor,
    views: Vec<Tensor>,
    live: Vec<bool>,
}

impl Grads {
    /// A zeroed buffer for `layout` (no entry live).
    pub fn new(layout: Arc<FlatLayout>, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let flat = Tensor::zeros(layout.total(), dtype, device)?;
        Self::over(layout, flat, false)
    }

    /// A buffer over existing storage `flat` (e.g. a scratch shared by several layouts of the
    /// same size): no entry live.
    pub fn over_buffer(layout: Arc<FlatLayout>, flat: Tensor) -> Result<Self, ModelError> {
        Self::over(layout, flat, false)
    }

    /// Wraps an existing flat gradient (e.g. candle autograd's gradient of a flat parameter
    /// `Var`): every entry live.
    pub fn from_flat(layout: Arc<FlatLayout>, flat: Tensor) -> Result<Self, ModelError> {
        Self::over(layout, flat.detach(), true)
    }

    fn over(layout: Arc<FlatLayout>, flat: Tensor, live: bool) -> Result<Self, ModelError> {
        let views = layout.views(&flat)?;
        Ok(Self {
            live: vec![live; layout.len()],
            layout,
            flat,
            views,
        })
    }

    pub fn layout(&self) -> &Arc<FlatLayout> {
        &self.layout
    }

    /// The whole buffer. Entries that are not live hold stale values: read it through
    /// [`Grads::live_ranges`] (what [`Grads::sum_of_squares`] and the optimizer do).
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// Forgets every gradient (O(entries); no memory is written).
    pub fn zero(&mut self) {
        self.live.iter_mut().for_each(|l| *l = false);
    }

    fn slot(&self, name: &str) -> Result<usize, ModelError> {
        self.layout.position(name).ok_or_else(|| {
            ModelError::Input(format!(
                "the gradient buffer has no entry for {name:?} (build it for this model: \
                 Llama::grads, or a layout holding every trainable tensor)"
            ))
        })
    }

    /// Adds `g` into the gradient of `name` (a copy on the first write since [`Grads::zero`]).
    pub fn accumulate(&mut self, name: &str, g: &Tensor) -> Result<(), ModelError> {
        let i = self.slot(name)?;
        let view = &self.views[i];
        if g.shape() != view.shape() {
            return Err(ModelError::Input(format!(
                "gradient of {name:?} has shape {:?}, the buffer holds {:?}",
                g.dims(),
                view.dims()
            )));
        }
        let g = g.to_dtype(view.dtype())?;
        if self.live[i] {
            kiln_kernels::add_in_place(view, &g)?;
        } else {
            view.flatten_all()?
                .slice_set(&g.flatten_all()?.contiguous()?, 0, 0)?;
            self.live[i] = true;
        }
        Ok(())
    }

    /// `grad(name)[ids[i], :] += src[i, :]`: the backward of an embedding lookup, written
    /// straight into the table's gradient (`src (n, d)`, `ids (n)`).
    pub fn index_add_rows(
        &mut self,
        name: &str,
        ids: &Tensor,
        src: &Tensor,
    ) -> Result<(), ModelError> {
        let i = self.slot(name)?;
        let view = &self.views[i];
        if !self.live[i] {
            view.zero_set()?;
            self.live[i] = true;
        }
        kiln_kernels::index_add_rows(view, ids, &src.to_dtype(view.dtype())?)?;
        Ok(())
    }

    /// Zeroes every entry the backward did not write and marks it live, so the whole buffer
    /// holds gradients (what a collective over the flat buffer needs).
    pub fn make_all_live(&mut self) -> Result<(), ModelError> {
        for (view, live) in self.views.iter().zip(self.live.iter_mut()) {
            if !*live {
                view.zero_set()?;
                *live = true;
            }
        }
        Ok(())
    }

    /// The gradient of `name` (a view into the buffer), if it has one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        let i = self.layout.position(name)?;
        self.live[i].then(|| &self.views[i])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Whether entry `index` of the layout holds a gradient.
    pub fn is_live(&self, index: usize) -> bool {
        self.live[index]
    }

    /// `(name, gradient)` of every live entry, in layout order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.layout
            .entries()
            .iter()
            .zip(&self.views)
            .zip(&self.live)
            .filter(|(_, &live)| live)
            .map(|((e, v), _)| (e.name.as_str(), v))
    }

    /// Names of the live entries, in layout order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(n, _)| n)
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.live.iter().filter(|&&l| l).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element ranges of maximal runs of live entries (one range when every entry is live).
    pub fn live_ranges(&self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for (e, _) in self
            .layout
            .entries()
            .iter()
            .zip(&self.live)
            .filter(|(_, &l)| l)
        {
            match out.last_mut() {
                Some(r) if r.end == e.offset => r.end = e.offset + e.numel,
                _ => out.push(e.range()),
            }
        }
        out
    }

    /// `sum(g^2)` over every live gradient, accumulated in f64: one fused pass per live range.
    pub fn sum_of_squares(&self) -> Result<f64, ModelError> {
        let mut total = 0.0;
        for r in self.live_ranges() {
            total += kiln_kernels::sum_of_squares(&self.flat.narrow(0, r.start, r.len())?)?;
        }
        Ok(total)
    }
}

impl std::ops::Index<&str> for Grads {
    type Output = Tensor;

    /// The gradient of `name`; panics when it has none (like a map).
    fn index(&self, name: &str) -> &Tensor {
        self.get(name)
            .unwrap_or_else(|| panic!("no gradient for {name:?}"))
    }
}
