//! The KV cache for incremental decoding, passed explicitly to `Llama::forward_decode`.

use candle_core::{Result, Tensor};

/// Per-layer keys and values `(b, hkv, t_cached, hd)` and the number of cached positions.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
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
        self.len = 0;
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
