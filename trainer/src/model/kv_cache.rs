//! The KV cache, kept outside the model: keys and values per layer, `[batch, kv_heads, seq, head_dim]`.

use candle_core::{Result, Tensor};

/// Past keys and values of every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// How many positions the cache holds.
    pub fn seq_len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    pub(super) fn layer_mut(&mut self, layer: usize) -> &mut Option<(Tensor, Tensor)> {
        &mut self.layers[layer]
    }

    /// A cache whose row `i` is row `rows[i]` of this one (`rows`: u32 indices), e.g. one prompt's
    /// prefix repeated to each of its samples. Differentiable: the gradients of repeated rows add up.
    pub fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        let select = |t: &Tensor| t.index_select(rows, 0);
        let layers = self
            .layers
            .iter()
            .map(|layer| layer.as_ref().map(|(k, v)| Ok((select(k)?, select(v)?))).transpose())
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Keys and values of one layer, when filled.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|l| l.as_ref())
    }
}
