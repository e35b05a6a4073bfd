//! The model's input: token ids, explicit position ids and the key padding mask, with
//! constructors for right padding (training) and left padding (generation).

use candle_core::{Device, Result, Tensor};

/// One forward pass's input.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, T) u32
    pub input_ids: Tensor,
    /// (B, T) u32, the absolute position of each token in its own sequence
    pub position_ids: Tensor,
    /// (B, T_past + T) u8, 1 = real token, 0 = padding; None = no padding anywhere
    pub key_mask: Option<Tensor>,
    /// (B, T_past + T) u32 segment ids of packed rows: a token attends only within its own
    /// segment. None = one sequence per row.
    pub segments: Option<Tensor>,
}

impl Batch {
    /// Sequences padded on the right with `pad_id`; positions 0..len.
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        Self::padded(seqs, pad_id, false, device)
    }

    /// Sequences padded on the left with `pad_id`; positions count real tokens only, as
    /// transformers' `generate` does (`cumsum(mask) - 1`, clamped at 0).
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        Self::padded(seqs, pad_id, true, device)
    }

    fn padded(seqs: &[Vec<u32>], pad_id: u32, left: bool, device: &Device) -> Result<Self> {
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for s in seqs {
            let pad = t - s.len();
            let (lead, trail) = if left { (pad, 0) } else { (0, pad) };
            ids.extend(std::iter::repeat_n(pad_id, lead));
            pos.extend(std::iter::repeat_n(0u32, lead));
            mask.extend(std::iter::repeat_n(0u8, lead));
            ids.extend_from_slice(s);
            pos.extend(0..s.len() as u32);
            mask.extend(std::iter::repeat_n(1u8, s.len()));
            ids.extend(std::iter::repeat_n(pad_id, trail));
            pos.extend((s.len() as u32..).take(trail));
            mask.extend(std::iter::repeat_n(0u8, trail));
        }
        let any_pad = mask.contains(&0);
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            position_ids: Tensor::from_vec(pos, (b, t), device)?,
            key_mask: if any_pad {
                Some(Tensor::from_vec(mask, (b, t), device)?)
            } else {
                None
            },
            segments: None,
        })
    }

    pub fn dims(&self) -> Result<(usize, usize)> {
        self.input_ids.dims2()
    }
}
