//! The KV cache for incremental decoding, passed explicitly to the model.
//!
//! One cache holds a batch of sequences (rows), each with its own length, so ragged batches
//! decode together: row `r`'s next token sits at position `row_len(r)`. Keys and values are
//! kept per row, layer and KV head as plain vectors `(t, hd)` row-major, grown in place; the
//! tensor path (prefill) and the decode fast path read and append the same storage.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Default)]
pub struct KvCache {
    rows: Vec<RowKv>,
}

/// One sequence: its cached positions and, per layer, its keys and values.
#[derive(Default, Clone)]
pub(crate) struct RowKv {
    pub(crate) len: usize,
    pub(crate) layers: Vec<LayerKv>,
}

/// Keys and values of one layer, one vector per KV head, `len * hd` long.
#[derive(Default, Clone)]
pub(crate) struct LayerKv {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached in row 0 (the position of the next token of a single sequence).
    pub fn len(&self) -> usize {
        self.rows.first().map_or(0, |r| r.len)
    }

    pub fn is_empty(&self) -> bool {
        self.rows.iter().all(|r| r.len == 0)
    }

    /// Positions cached in row `row` (0 for a row not started yet).
    pub fn row_len(&self, row: usize) -> usize {
        self.rows.get(row).map_or(0, |r| r.len)
    }

    /// Rows (sequences) the cache holds.
    pub fn n_rows(&self) -> usize {
        self.rows.len()
    }

    pub fn clear(&mut self) {
        self.rows.clear();
    }

    /// Forgets row `row`'s positions (its storage is reused).
    pub fn clear_row(&mut self, row: usize) {
        if let Some(r) = self.rows.get_mut(row) {
            r.len = 0;
            for l in &mut r.layers {
                l.k.iter_mut().for_each(Vec::clear);
                l.v.iter_mut().for_each(Vec::clear);
            }
        }
    }

    /// Keeps the first `len` positions of row `row` and forgets the rest (a server reuses a
    /// cached prompt prefix this way). A `len` past the row's length changes nothing.
    pub fn truncate_row(&mut self, row: usize, len: usize) {
        let Some(r) = self.rows.get_mut(row) else {
            return;
        };
        if len >= r.len {
            return;
        }
        let old = r.len;
        for l in &mut r.layers {
            for h in l.k.iter_mut().chain(l.v.iter_mut()) {
                let hd = h.len() / old;
                h.truncate(len * hd);
            }
        }
        r.len = len;
    }

    /// Row `to` becomes a copy of row `from` (several samples of one prompt share its
    /// prefill).
    pub fn copy_row(&mut self, from: usize, to: usize) {
        if self.rows.len() <= to {
            self.rows.resize(to + 1, RowKv::default());
        }
        if from != to {
            self.rows[to] = self.rows[from].clone();
        }
    }

    /// Makes sure rows `0..n_rows` exist with `n_layers` layers of `n_kv_heads` heads.
    pub(crate) fn ensure(&mut self, n_rows: usize, n_layers: usize, n_kv_heads: usize) {
        if self.rows.len() < n_rows {
            self.rows.resize(n_rows, RowKv::default());
        }
        for r in &mut self.rows {
            if r.layers.len() != n_layers {
                r.layers = vec![LayerKv::default(); n_layers];
            }
            for l in &mut r.layers {
                if l.k.len() != n_kv_heads {
                    l.k = vec![Vec::new(); n_kv_heads];
                    l.v = vec![Vec::new(); n_kv_heads];
                }
            }
        }
    }

    /// Moves row `row` out into a one-row cache (for a single-row prefill); [`Self::put_row`]
    /// puts it back.
    pub(crate) fn take_row(&mut self, row: usize, n_layers: usize, n_kv_heads: usize) -> KvCache {
        self.ensure(row + 1, n_layers, n_kv_heads);
        KvCache {
            rows: vec![std::mem::take(&mut self.rows[row])],
        }
    }

    pub(crate) fn put_row(&mut self, row: usize, mut single: KvCache) {
        if let Some(r) = single.rows.pop() {
            self.rows[row] = r;
        }
    }

    pub(crate) fn row(&self, row: usize) -> &RowKv {
        &self.rows[row]
    }

    pub(crate) fn layer_mut(&mut self, row: usize, layer: usize) -> &mut LayerKv {
        &mut self.rows[row].layers[layer]
    }

    pub(crate) fn advance(&mut self, row: usize, t: usize) {
        self.rows[row].len += t;
    }

    /// Appends the keys and values `(b, hkv, t, hd)` of rows `0..b` for `layer` and returns
    /// each row's whole cache for that layer as `(b, hkv, t_all, hd)` tensors (every row must
    /// hold the same number of positions). `len` is not advanced here.
    pub(crate) fn append_tensors(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, hkv, t, hd) = k.dims4()?;
        let fresh = (0..b).all(|r| self.rows[r].layers[layer].k[0].is_empty());
        for (src, is_key) in [(k, true), (v, false)] {
            let vals = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for r in 0..b {
                let lk = &mut self.rows[r].layers[layer];
                let dst = if is_key { &mut lk.k } else { &mut lk.v };
                for (g, d) in dst.iter_mut().enumerate() {
                    let o = (r * hkv + g) * t * hd;
                    d.extend_from_slice(&vals[o..o + t * hd]);
                }
            }
        }
        if fresh {
            return Ok((k.clone(), v.clone()));
        }
        let t_all = self.rows[0].layers[layer].k[0].len() / hd;
        let gather = |is_key: bool| -> Result<Tensor> {
            let mut all = Vec::with_capacity(b * hkv * t_all * hd);
            for r in 0..b {
                let l = &self.rows[r].layers[layer];
                let src = if is_key { &l.k } else { &l.v };
                for h in src {
                    if h.len() != t_all * hd {
                        candle_core::bail!(
                            "KV cache rows have different lengths; prefill rows one at a time"
                        )
                    }
                    all.extend_from_slice(h);
                }
            }
            Tensor::from_vec(all, (b, hkv, t_all, hd), &Device::Cpu)?
                .to_dtype(k.dtype())?
                .to_device(k.device())
        };
        Ok((gather(true)?, gather(false)?))
    }
}
