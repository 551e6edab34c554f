//! Decoding with a KV cache: [`CausalLm`] is what the generate loop needs (prefill a row, then
//! one token for each of many rows per step), implemented by the one decoder for dense and
//! quantised weights alike.

use candle_core::{DType, Device, Tensor};

use crate::{KvCache, Llama, ModelConfig, ModelError};

/// A model that can decode with a KV cache.
pub trait CausalLm {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// Feeds `tokens (b, t)` after the cached ones of rows `0..b` and returns the last
    /// position's logits `(b, v)`.
    fn forward_decode(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError>;
    /// One token for each of `rows` (`tokens[i]` goes to row `rows[i]`, at that row's own
    /// position): logits `(rows.len(), v)`. Every projection runs once over all rows.
    fn decode_step(
        &self,
        rows: &[usize],
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError>;
    /// Feeds `tokens` to row `row` alone (a ragged batch is prefilled row by row): the last
    /// position's logits `(1, v)`.
    fn prefill_row(
        &self,
        row: usize,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        self.prefill_row_adapter(row, tokens, 0, cache)
    }
    /// [`decode_step`](Self::decode_step) where row `i` adds served adapter `adapters[i]`
    /// (0: none; see [`Llama::add_served_adapter`]).
    fn decode_step_adapters(
        &self,
        rows: &[usize],
        tokens: &[u32],
        adapters: &[u16],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError>;
    /// [`prefill_row`](Self::prefill_row) with served adapter `adapter` (0: none).
    fn prefill_row_adapter(
        &self,
        row: usize,
        tokens: &[u32],
        adapter: u16,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError>;
    /// A text's embedding from the final hidden states `RMSNorm(h_L)` of `tokens`: their
    /// mean (`last == false`) or the last position's, L2-normalised.
    fn pooled_hidden(&self, tokens: &[u32], last: bool) -> Result<Vec<f32>, ModelError>;
    /// Adds a LoRA adapter served next to the base; returns its id.
    fn add_served_adapter(
        &mut self,
        adapters: &crate::Params,
        spec: &crate::LoraSpec,
    ) -> Result<u16, ModelError>;
    /// See [`Llama::norm_fingerprint`]: what adapters are checked against.
    fn norm_fingerprint(&self) -> Result<Vec<f32>, ModelError>;
}

impl CausalLm for Llama {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward_decode(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        if t == 1 {
            let ids = tokens
                .flatten_all()?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?;
            let rows: Vec<usize> = (0..b).collect();
            return self.decode_step(&rows, &ids, cache);
        }
        in_pool(|| self.prefill(tokens, cache, 0))
    }

    fn decode_step(
        &self,
        rows: &[usize],
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        in_pool(|| self.decode_rows(rows, tokens, None, cache))
    }

    fn decode_step_adapters(
        &self,
        rows: &[usize],
        tokens: &[u32],
        adapters: &[u16],
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        in_pool(|| self.decode_rows(rows, tokens, Some(adapters), cache))
    }

    fn add_served_adapter(
        &mut self,
        adapters: &crate::Params,
        spec: &crate::LoraSpec,
    ) -> Result<u16, ModelError> {
        Llama::add_served_adapter(self, adapters, spec)
    }

    fn norm_fingerprint(&self) -> Result<Vec<f32>, ModelError> {
        Llama::norm_fingerprint(self)
    }

    fn pooled_hidden(&self, tokens: &[u32], last: bool) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        let x = Tensor::from_slice(tokens, (1, tokens.len()), &self.device)?;
        let h = in_pool(|| self.forward_cached_hidden(&x, &mut KvCache::new()))?; // (t, d)
        let pooled = if last {
            h.get(tokens.len() - 1)?
        } else {
            h.mean(0)?
        };
        let mut v: Vec<f32> = pooled.to_dtype(DType::F32)?.to_vec1()?;
        let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
        v.iter_mut().for_each(|x| *x /= norm.max(1e-12));
        Ok(v)
    }

    fn prefill_row_adapter(
        &self,
        row: usize,
        tokens: &[u32],
        adapter: u16,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("empty token sequence".into()));
        }
        // Prefill a single row through a one-row cache view: move the row out and back.
        let mut single = cache.take_row(row, self.cfg.n_layers, self.cfg.n_kv_heads());
        let out = if tokens.len() == 1 {
            self.decode_step_adapters(&[0], tokens, &[adapter], &mut single)
        } else {
            let x = Tensor::from_slice(tokens, (1, tokens.len()), &self.device)?;
            in_pool(|| self.prefill(&x, &mut single, adapter))
        };
        cache.put_row(row, single);
        out
    }
}

/// Runs `f` on a rayon worker: each matmul's parallel loop then splits work with the other
/// workers directly, instead of the calling thread handing every one of them to the pool and
/// sleeping until it is done (about 120 round trips per token).
fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}
