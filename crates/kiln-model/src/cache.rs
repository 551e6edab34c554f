//! The KV cache for incremental decoding, passed explicitly to `Llama::forward_decode`.

use candle_core::{Result, Tensor};

/// Per-layer keys and values `(b, hkv, t_cached, hd)` and the number of cached positions.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// The quantised model's single-sequence cache (`QLlama`), grown in place.
    pub(crate) raw: Vec<RawKv>,
}

/// Keys and values of one layer as plain vectors, one per KV head, `t_cached * hd` long.
#[derive(Default, Clone)]
pub(crate) struct RawKv {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already cached (the position of the next token fed).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.raw.clear();
        self.len = 0;
    }

    /// Layer `layer`'s plain-vector cache with `n_kv_heads` heads.
    pub(crate) fn raw_layer(
        &mut self,
        n_layers: usize,
        layer: usize,
        n_kv_heads: usize,
    ) -> &mut RawKv {
        if self.raw.len() != n_layers {
            self.raw = vec![RawKv::default(); n_layers];
        }
        let r = &mut self.raw[layer];
        if r.k.len() != n_kv_heads {
            r.k = vec![Vec::new(); n_kv_heads];
            r.v = vec![Vec::new(); n_kv_heads];
        }
        r
    }

    pub(crate) fn ensure_layers(&mut self, n_layers: usize) {
        if self.layers.len() != n_layers {
            self.layers = vec![None; n_layers];
        }
    }

    /// Appends this pass's keys/values for `layer` and returns everything cached so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let kv = match self.layers[layer].take() {
            None => (k.clone(), v.clone()),
            Some((ck, cv)) => (Tensor::cat(&[&ck, k], 2)?, Tensor::cat(&[&cv, v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
