//! `length`: DAPO's soft overlong punishment (2503.14476, eq. 13) on the completion's token
//! count.
//!
//! Owns: the piecewise penalty. Does not own: truncation itself (generation's `max_new_tokens`).
//!
//! R(len) = 0 when len ≤ max_len − buffer; (max_len − buffer − len) / buffer inside the buffer
//! (0 → −1 linearly); −1 beyond max_len. `buffer` is DAPO's L_cache; 0 is allowed (a hard
//! step at max_len, as TRL's `soft_punish_cache = 0`).

use crate::params::Params;
use crate::{Reward, RewardError, Sample};

/// `length`: DAPO soft overlong punishment. Params: `max_len`, `buffer` (both required
/// integers, 0 ≤ buffer ≤ max_len). Scores in [−1, 0].
pub struct LengthPenalty {
    label: String,
    max_len: u64,
    buffer: u64,
}

impl LengthPenalty {
    pub const PARAMS: &'static [&'static str] = &["max_len", "buffer"];

    pub(crate) fn from_params(label: String, p: &Params) -> Result<Self, RewardError> {
        let max_len = p.u64("max_len")?.ok_or_else(|| {
            p.missing(
                "max_len",
                "DAPO's L_max, e.g. the generation max_new_tokens",
            )
        })?;
        let buffer = p
            .u64("buffer")?
            .ok_or_else(|| p.missing("buffer", "DAPO's L_cache, the soft zone before max_len"))?;
        if buffer > max_len {
            return Err(p.invalid(
                "buffer",
                format!("must be in 0..=max_len ({max_len}), got {buffer}"),
            ));
        }
        Ok(LengthPenalty {
            label,
            max_len,
            buffer,
        })
    }

    pub fn new(max_len: u64, buffer: u64) -> Self {
        LengthPenalty {
            label: "length".into(),
            max_len,
            buffer,
        }
    }

    pub fn penalty(&self, len: usize) -> f64 {
        let len = len as f64;
        let (max, buf) = (self.max_len as f64, self.buffer as f64);
        if len <= max - buf {
            0.0
        } else if len <= max {
            (max - buf - len) / buf
        } else {
            -1.0
        }
    }
}

impl Reward for LengthPenalty {
    fn name(&self) -> &str {
        &self.label
    }
    fn score(&self, samples: &[Sample]) -> Vec<Option<f64>> {
        samples
            .iter()
            .map(|s| Some(self.penalty(s.completion_tokens)))
            .collect()
    }
}
