//! The external KV cache: per layer, keys and values of every position seen so far, kept
//! outside the model so one model can serve many generation streams and training never
//! carries one.

use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: k, v of shape (B, Hkv, T_past, D).
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append this step's k, v (B, Hkv, T, D) for `layer`; returns all keys and values.
    /// Stored detached: a cache serves inference only, and a graph kept through it would hold
    /// every earlier decoding step's activations alive.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach(), v.detach());
        let (k, v) = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Keep only rows `idx` of the batch (finished streams dropped).
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            *l = (l.0.index_select(idx, 0)?, l.1.index_select(idx, 0)?);
        }
        Ok(())
    }

    /// Drop cached positions beyond `len` (speculative decoding's rejected drafts).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            *l = (l.0.narrow(2, 0, len)?, l.1.narrow(2, 0, len)?);
        }
        Ok(())
    }
}
