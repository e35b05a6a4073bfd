//! Packing: several short tokenized examples concatenated into one sequence of at most
//! `max_seq_len` tokens, so a batch wastes less compute on padding. Bins are filled
//! best-fit-decreasing with whole examples (none is split). Each packed sequence keeps
//! `position_ids` that restart at 0 at every example, so RoPE sees each example as if alone, and
//! the examples' loss masks side by side.
//!
//! The examples of a pack cannot see each other: [`Packed::segment_ids`] numbers them, the
//! collated batch carries the ids and the attention op keeps every query inside its own
//! segment (a block-diagonal causal mask, as varlen FlashAttention and TRL's `padding_free`
//! do), so a packed example's logits and gradients are those it has alone. It owns no tensors.

use std::collections::BTreeSet;

use crate::error::{DataError, Result};
use crate::sft::Tokenized;

/// One packed sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// Restart at 0 at the first token of every member example.
    pub position_ids: Vec<u32>,
    /// Indices (into the packed slice) of the examples, in the order they were concatenated.
    pub members: Vec<usize>,
}

impl Packed {
    /// The member each token belongs to (0, 1, ...): a new member starts where its positions
    /// restart at 0.
    pub fn segment_ids(&self) -> Vec<u32> {
        let mut seg = 0u32;
        self.position_ids
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                if p == 0 && i > 0 {
                    seg += 1;
                }
                seg
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Packs whole examples into sequences of at most `max_seq_len` tokens, best-fit-decreasing:
/// longest first, each into the fullest pack it still fits in. Ties keep input order, so the
/// result depends only on the lengths. An example longer than `max_seq_len` is an error (truncate
/// first); empty examples are left out.
pub fn pack(examples: &[Tokenized], max_seq_len: usize) -> Result<Vec<Packed>> {
    if max_seq_len == 0 {
        return Err(DataError::InvalidOption(
            "max_seq_len must be at least 1".into(),
        ));
    }
    if let Some((index, t)) = examples
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > max_seq_len)
    {
        return Err(DataError::TooLongToPack {
            index,
            len: t.len(),
            max_seq_len,
        });
    }
    let mut by_len: Vec<usize> = (0..examples.len())
        .filter(|&i| !examples[i].is_empty())
        .collect();
    by_len.sort_by_key(|&i| std::cmp::Reverse(examples[i].len())); // stable
                                                                   // Open bins keyed by (free space, bin id): the first key with free >= len is the best fit.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for i in by_len {
        let len = examples[i].len();
        let fit = free.range((len, 0)..).next().copied();
        match fit {
            Some((space, bin)) => {
                free.remove(&(space, bin));
                bins[bin].push(i);
                if space > len {
                    free.insert((space - len, bin));
                }
            }
            None => {
                bins.push(vec![i]);
                if max_seq_len > len {
                    free.insert((max_seq_len - len, bins.len() - 1));
                }
            }
        }
    }
    Ok(bins
        .into_iter()
        .map(|members| {
            let total: usize = members.iter().map(|&i| examples[i].len()).sum();
            let mut p = Packed {
                ids: Vec::with_capacity(total),
                loss_mask: Vec::with_capacity(total),
                position_ids: Vec::with_capacity(total),
                members,
            };
            for &i in &p.members {
                let t = &examples[i];
                p.ids.extend_from_slice(&t.ids);
                p.loss_mask.extend_from_slice(&t.loss_mask);
                p.position_ids.extend(0..t.len() as u32);
            }
            p
        })
        .collect())
}
