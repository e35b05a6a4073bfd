//! Split, shuffling and the resumable loader: deterministic per seed, every epoch a
//! permutation, and a restored cursor continues the exact batch sequence.

use std::collections::BTreeSet;

use ferrotune_data::{split, split_items, Cursor, EvalSize, Loader, Shuffler};

#[test]
fn split_is_deterministic_disjoint_and_complete() {
    let a = split(100, EvalSize::Fraction(0.1), 7).unwrap();
    let b = split(100, EvalSize::Fraction(0.1), 7).unwrap();
    let c = split(100, EvalSize::Fraction(0.1), 8).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.eval, c.eval);
    assert_eq!(a.eval.len(), 10);
    let all: BTreeSet<usize> = a.train.iter().chain(&a.eval).copied().collect();
    assert_eq!(all.len(), 100);
    assert_eq!(all, (0..100).collect());
    // Rounded up like `datasets.train_test_split`.
    assert_eq!(
        split(10, EvalSize::Fraction(0.05), 0).unwrap().eval.len(),
        1
    );
    assert_eq!(split(10, EvalSize::Count(3), 0).unwrap().eval.len(), 3);
    // The eval part is not simply the first examples.
    assert_ne!(a.eval, (0..10).collect::<Vec<_>>());

    assert!(split(10, EvalSize::Count(10), 0).is_err());
    assert!(split(10, EvalSize::Fraction(1.0), 0).is_err());
    assert!(split(10, EvalSize::Fraction(-0.1), 0).is_err());

    let items: Vec<String> = (0..20).map(|i| format!("ex{i}")).collect();
    let (train, eval) = split_items(items, EvalSize::Count(4), 3).unwrap();
    let s = split(20, EvalSize::Count(4), 3).unwrap();
    assert_eq!(
        eval,
        s.eval.iter().map(|i| format!("ex{i}")).collect::<Vec<_>>()
    );
    assert_eq!(train.len(), 16);
}

#[test]
fn epochs_are_seeded_permutations() {
    let s = Shuffler::new(42, true);
    let e0 = s.epoch_order(50, 0);
    let e1 = s.epoch_order(50, 1);
    assert_eq!(e0, Shuffler::new(42, true).epoch_order(50, 0));
    assert_ne!(e0, e1);
    assert_ne!(e0, Shuffler::new(43, true).epoch_order(50, 0));
    assert_ne!(e0, (0..50).collect::<Vec<_>>());
    // seed + epoch: epoch 1 of seed 42 is epoch 0 of seed 43.
    assert_eq!(e1, Shuffler::new(43, true).epoch_order(50, 0));
    for order in [&e0, &e1] {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
    assert_eq!(
        Shuffler::new(42, false).epoch_order(5, 3),
        vec![0, 1, 2, 3, 4]
    );
}

#[test]
fn the_shuffle_is_roughly_uniform() {
    // Position of element 0 over many seeds: each of 4 slots about 1/4 of the time.
    let mut counts = [0usize; 4];
    for seed in 0..4000 {
        let order = Shuffler::new(seed, true).epoch_order(4, 0);
        counts[order.iter().position(|&x| x == 0).unwrap()] += 1;
    }
    for c in counts {
        assert!((850..1150).contains(&c), "{counts:?}");
    }
}

#[test]
fn batches_wrap_into_the_next_epoch() {
    let shuffler = Shuffler::new(1, true);
    let mut loader = Loader::new(10, shuffler).unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let b = loader.next_batch(4).unwrap();
        assert_eq!(b.len(), 4);
        seen.extend(b);
    }
    let mut want = shuffler.epoch_order(10, 0);
    want.extend(shuffler.epoch_order(10, 1));
    assert_eq!(seen, want);
    assert_eq!(
        loader.cursor(),
        Cursor {
            epoch: 1,
            index: 10
        }
    );
    assert_eq!(loader.epochs_done(), 2.0);
    assert!(loader.next_batch(0).is_err());
    assert!(Loader::new(0, shuffler).is_err());
}

#[test]
fn resuming_from_a_saved_cursor_gives_the_same_batches() {
    let shuffler = Shuffler::new(1234, true);
    let mut straight = Loader::new(13, shuffler).unwrap();
    let uninterrupted: Vec<Vec<usize>> = (0..20).map(|_| straight.next_batch(5).unwrap()).collect();

    for stop in [0, 1, 2, 3, 7, 13] {
        let mut first = Loader::new(13, shuffler).unwrap();
        let mut batches: Vec<Vec<usize>> =
            (0..stop).map(|_| first.next_batch(5).unwrap()).collect();
        // Through JSON, as a checkpoint would store it.
        let saved = serde_json::to_string(&first.cursor()).unwrap();
        let cursor: Cursor = serde_json::from_str(&saved).unwrap();
        let mut resumed = Loader::resume(13, shuffler, cursor).unwrap();
        batches.extend((stop..20).map(|_| resumed.next_batch(5).unwrap()));
        assert_eq!(batches, uninterrupted, "stopped after {stop} batches");
    }
    let bad = Cursor {
        epoch: 0,
        index: 14,
    };
    assert!(Loader::resume(13, shuffler, bad).is_err());
}
