//! Example order: the train/eval split, seeded per-epoch shuffling and the loader whose cursor
//! (`epoch`, `index`) is saved in checkpoints so a resumed run sees exactly the batches an
//! uninterrupted run would. It works on example indices only and never looks at the data.
//!
//! The random numbers come from our own SplitMix64 and Fisher–Yates shuffle rather than `rand`'s
//! `StdRng`/`shuffle`, whose streams `rand` does not promise to keep across versions: a run
//! resumed after a dependency upgrade must still get the same order.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and fixed forever by its definition.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias (Lemire's multiply-and-reject).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A seeded permutation of `0..n`.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    // Fisher–Yates, from the back.
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// XORed into the seed for the split ("split" in ASCII), so the split is not the first epoch's
/// order.
const SPLIT_STREAM: u64 = 0x0073_706C_6974;

/// How much of the data goes to evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSize {
    /// A fraction in `[0, 1)`; the count is rounded up, as `datasets.train_test_split` does.
    Fraction(f64),
    /// An exact number of examples.
    Count(usize),
}

/// Indices of the train and eval parts, each in ascending order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
}

/// Deterministic train/eval split of `n` examples: the eval part is a seeded random subset.
/// At least one example must stay for training.
pub fn split(n: usize, eval: EvalSize, seed: u64) -> Result<Split> {
    let n_eval = match eval {
        EvalSize::Fraction(f) if (0.0..1.0).contains(&f) => (f * n as f64).ceil() as usize,
        EvalSize::Fraction(f) => {
            return Err(DataError::InvalidOption(format!(
                "eval fraction must be in [0, 1), got {f}"
            )))
        }
        EvalSize::Count(c) => c,
    };
    if n_eval >= n {
        return Err(DataError::InvalidOption(format!(
            "an eval split of {n_eval} leaves no training example out of {n}"
        )));
    }
    // A different stream from the epoch shuffles, which also start from `seed`.
    let order = permutation(n, seed ^ SPLIT_STREAM);
    let mut eval_idx = order[..n_eval].to_vec();
    let mut train_idx = order[n_eval..].to_vec();
    eval_idx.sort_unstable();
    train_idx.sort_unstable();
    Ok(Split {
        train: train_idx,
        eval: eval_idx,
    })
}

/// `split` applied to a list: returns `(train, eval)`, each in the original order.
pub fn split_items<T>(items: Vec<T>, eval: EvalSize, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    let parts = split(items.len(), eval, seed)?;
    let mut is_eval = vec![false; items.len()];
    for &i in &parts.eval {
        is_eval[i] = true;
    }
    let (mut train, mut eval_items) = (Vec::new(), Vec::new());
    for (item, e) in items.into_iter().zip(is_eval) {
        if e {
            eval_items.push(item);
        } else {
            train.push(item);
        }
    }
    Ok((train, eval_items))
}

/// Per-epoch orders of `n` examples: epoch `e` is the permutation seeded by `seed + e` (the
/// convention of Hugging Face's `set_epoch`), or `0..n` when shuffling is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shuffler {
    pub seed: u64,
    pub shuffle: bool,
}

impl Shuffler {
    pub fn new(seed: u64, shuffle: bool) -> Self {
        Shuffler { seed, shuffle }
    }

    pub fn epoch_order(&self, n: usize, epoch: u64) -> Vec<usize> {
        if self.shuffle {
            permutation(n, self.seed.wrapping_add(epoch))
        } else {
            (0..n).collect()
        }
    }
}

/// Where the loader is: the next example is `epoch_order(epoch)[index]`. Saved with a
/// checkpoint; restoring it continues the exact sequence of batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    pub epoch: u64,
    pub index: usize,
}

/// Hands out batches of example indices forever, epoch after epoch. A batch that reaches the end
/// of an epoch is completed from the start of the next one, so every batch has `batch_size`
/// examples and no example is dropped.
#[derive(Clone, Debug)]
pub struct Loader {
    n: usize,
    shuffler: Shuffler,
    cursor: Cursor,
    /// `shuffler.epoch_order(n, cursor.epoch)`, kept to avoid recomputing it per batch.
    order: Vec<usize>,
}

impl Loader {
    /// A loader over `n` examples starting at epoch 0.
    pub fn new(n: usize, shuffler: Shuffler) -> Result<Self> {
        Self::resume(n, shuffler, Cursor::default())
    }

    /// A loader continuing from a saved cursor. `n` and `shuffler` must be the ones of the
    /// interrupted run (the checkpoint stores them beside the cursor).
    pub fn resume(n: usize, shuffler: Shuffler, cursor: Cursor) -> Result<Self> {
        if n == 0 {
            return Err(DataError::InvalidOption(
                "cannot load batches from an empty dataset".into(),
            ));
        }
        if cursor.index > n {
            return Err(DataError::InvalidOption(format!(
                "resume cursor index {} is past the end of a dataset of {n} examples (was the \
                 dataset changed since the checkpoint?)",
                cursor.index
            )));
        }
        Ok(Loader {
            n,
            shuffler,
            cursor,
            order: shuffler.epoch_order(n, cursor.epoch),
        })
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Epochs done as a fraction (`epoch + index / n`), for logs: 1.0 right after the last
    /// example of epoch 0 (the cursor moves to the next epoch only when a batch needs it).
    pub fn epochs_done(&self) -> f64 {
        self.cursor.epoch as f64 + self.cursor.index as f64 / self.n as f64
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The next `batch_size` example indices, wrapping into the next epoch when this one ends.
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Vec<usize>> {
        if batch_size == 0 {
            return Err(DataError::InvalidOption(
                "batch_size must be at least 1".into(),
            ));
        }
        let mut batch = Vec::with_capacity(batch_size);
        while batch.len() < batch_size {
            if self.cursor.index == self.n {
                self.cursor = Cursor {
                    epoch: self.cursor.epoch + 1,
                    index: 0,
                };
                self.order = self.shuffler.epoch_order(self.n, self.cursor.epoch);
            }
            let take = (batch_size - batch.len()).min(self.n - self.cursor.index);
            batch.extend_from_slice(&self.order[self.cursor.index..self.cursor.index + take]);
            self.cursor.index += take;
        }
        Ok(batch)
    }
}
