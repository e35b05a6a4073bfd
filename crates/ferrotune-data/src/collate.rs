//! Collation: a batch of sequences (tokenized examples or packs) → rectangular, right-padded
//! plain `Vec` rows of ids, loss mask, attention mask and position ids. The train room turns them
//! into tensors; this file owns no tensors and no model knowledge.

use std::borrow::Cow;

use crate::pack::Packed;
use crate::sft::Tokenized;

/// Anything with ids, a loss mask and position ids of one length.
pub trait Sequence {
    fn ids(&self) -> &[u32];
    fn loss_mask(&self) -> &[u8];
    fn position_ids(&self) -> Cow<'_, [u32]>;
    /// Per-token segment ids when several examples share the sequence (packing): attention
    /// stays inside a segment. None = one example.
    fn segment_ids(&self) -> Option<Vec<u32>> {
        None
    }
}

impl Sequence for Tokenized {
    fn ids(&self) -> &[u32] {
        &self.ids
    }
    fn loss_mask(&self) -> &[u8] {
        &self.loss_mask
    }
    fn position_ids(&self) -> Cow<'_, [u32]> {
        Cow::Owned((0..self.ids.len() as u32).collect())
    }
}

impl Sequence for Packed {
    fn ids(&self) -> &[u32] {
        &self.ids
    }
    fn loss_mask(&self) -> &[u8] {
        &self.loss_mask
    }
    fn position_ids(&self) -> Cow<'_, [u32]> {
        Cow::Borrowed(&self.position_ids)
    }
    fn segment_ids(&self) -> Option<Vec<u32>> {
        Some(self.segment_ids())
    }
}

/// A right-padded batch: every row has the length of the longest sequence. Padding has
/// `attention_mask = 0`, `loss_mask = 0`, id `pad_id`; its position ids continue counting (any
/// value works since nothing attends to or scores a pad, and increasing ones keep RoPE tables in
/// range).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collated {
    pub ids: Vec<Vec<u32>>,
    pub loss_mask: Vec<Vec<u8>>,
    pub attention_mask: Vec<Vec<u8>>,
    pub position_ids: Vec<Vec<u32>>,
    /// Per-token segment ids when any row packs several examples (padding gets a segment of
    /// its own); None = every row is one example.
    pub segment_ids: Option<Vec<Vec<u32>>>,
}

impl Collated {
    /// (B, T)
    pub fn shape(&self) -> (usize, usize) {
        (self.ids.len(), self.ids.first().map_or(0, Vec::len))
    }

    /// Trained tokens in the batch (the denominator of a token-mean loss).
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask
            .iter()
            .map(|r| r.iter().filter(|&&m| m != 0).count())
            .sum()
    }
}

/// Right-pads a batch to its longest sequence.
pub fn collate_right<S: Sequence>(batch: &[&S], pad_id: u32) -> Collated {
    let width = batch.iter().map(|s| s.ids().len()).max().unwrap_or(0);
    let mut out = Collated::default();
    for s in batch {
        let len = s.ids().len();
        let pad = width - len;
        let mut ids = s.ids().to_vec();
        ids.resize(width, pad_id);
        let mut loss_mask = s.loss_mask().to_vec();
        loss_mask.resize(width, 0);
        let mut attention_mask = vec![1u8; len];
        attention_mask.resize(width, 0);
        let mut position_ids = s.position_ids().into_owned();
        let next = position_ids.last().map_or(0, |&p| p + 1);
        position_ids.extend((0..pad as u32).map(|k| next + k));
        out.ids.push(ids);
        out.loss_mask.push(loss_mask);
        out.attention_mask.push(attention_mask);
        out.position_ids.push(position_ids);
    }
    if batch.iter().any(|s| s.segment_ids().is_some()) {
        let rows = batch.iter().map(|s| {
            let mut seg = s.segment_ids().unwrap_or_else(|| vec![0; s.ids().len()]);
            let pad = seg.last().map_or(0, |&g| g + 1);
            seg.resize(width, pad);
            seg
        });
        out.segment_ids = Some(rows.collect());
    }
    out
}
