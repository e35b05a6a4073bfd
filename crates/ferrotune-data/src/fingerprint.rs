//! Stable fingerprints of tokenized data, for caches that must never be read for other data
//! (the distillation teacher cache, DPO's precomputed reference log-probs).
//!
//! Owns: the hash and what of a tokenized example it covers. Does not own: where caches live.

use crate::sft::Tokenized;

/// FNV-1a, 64 bits: a stable fingerprint (not a security hash) of bytes, the same on every
/// build and machine.
#[derive(Debug, Clone)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// One tokenized example: its length, ids and loss mask.
    pub fn tokenized(&mut self, t: &Tokenized) {
        self.bytes(&(t.ids.len() as u64).to_le_bytes());
        for id in &t.ids {
            self.bytes(&id.to_le_bytes());
        }
        self.bytes(&t.loss_mask);
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Fingerprint of tokenized examples (ids and loss masks, in order).
pub fn tokenized_fingerprint<'a>(items: impl IntoIterator<Item = &'a Tokenized>) -> String {
    let mut h = Fingerprint::default();
    for t in items {
        h.tokenized(t);
    }
    h.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint sees a changed id and a changed mask, and nothing else changes it.
    #[test]
    fn changes_with_ids_and_masks() {
        let a = Tokenized {
            ids: vec![1, 2, 3],
            loss_mask: vec![0, 1, 1],
            ..Default::default()
        };
        let mut b = a.clone();
        b.loss_mask[1] = 0;
        let mut c = a.clone();
        c.ids[2] = 4;
        let fa = tokenized_fingerprint([&a]);
        assert_ne!(fa, tokenized_fingerprint([&b]));
        assert_ne!(fa, tokenized_fingerprint([&c]));
        assert_eq!(fa, tokenized_fingerprint([&a.clone()]));
    }
}
