//! Packing (best-fit-decreasing, every token kept exactly once, positions restart per example)
//! and right-padding collation.

use ferrotune_data::{collate_right, pack, Packed, Tokenized};

/// Example `k` of length `len`: ids encode (example, position) so every token is unique.
fn example(k: u32, len: usize, loss_from: usize) -> Tokenized {
    Tokenized {
        ids: (0..len as u32).map(|p| k * 1000 + p).collect(),
        loss_mask: (0..len).map(|p| u8::from(p >= loss_from)).collect(),
        truncated: false,
        tokens_dropped: 0,
    }
}

#[test]
fn packing_keeps_every_token_exactly_once() {
    let lens = [7, 3, 9, 1, 5, 5, 2, 8, 4, 6, 10, 1];
    let examples: Vec<Tokenized> = lens
        .iter()
        .enumerate()
        .map(|(k, &len)| example(k as u32, len, len / 2))
        .collect();
    let packs = pack(&examples, 10).unwrap();

    let total: usize = lens.iter().sum();
    let mut all_ids: Vec<u32> = packs.iter().flat_map(|p| p.ids.clone()).collect();
    assert_eq!(all_ids.len(), total);
    all_ids.sort_unstable();
    let mut want: Vec<u32> = examples.iter().flat_map(|t| t.ids.clone()).collect();
    want.sort_unstable();
    assert_eq!(all_ids, want);

    let mut members: Vec<usize> = packs.iter().flat_map(|p| p.members.clone()).collect();
    members.sort_unstable();
    assert_eq!(members, (0..lens.len()).collect::<Vec<_>>());

    for p in &packs {
        assert!(p.len() <= 10);
        assert_eq!(p.loss_mask.len(), p.len());
        assert_eq!(p.position_ids.len(), p.len());
        // Each member is copied whole, in order, with positions 0..len and its own mask.
        let mut at = 0;
        for &m in &p.members {
            let t = &examples[m];
            assert_eq!(p.ids[at..at + t.len()], t.ids[..]);
            assert_eq!(p.loss_mask[at..at + t.len()], t.loss_mask[..]);
            assert_eq!(
                p.position_ids[at..at + t.len()],
                (0..t.len() as u32).collect::<Vec<_>>()[..]
            );
            at += t.len();
        }
    }
    // 61 tokens in bins of 10 need at least 7 packs; best-fit-decreasing reaches that here.
    assert_eq!(packs.len(), 7);
}

#[test]
fn best_fit_puts_an_example_in_the_fullest_bin_it_fits() {
    // Decreasing: 6 → bin A (free 4), 5 → bin B (free 5), 4 → A (the fuller fit), 3 → B.
    let examples: Vec<Tokenized> = [3, 6, 4, 5]
        .iter()
        .enumerate()
        .map(|(k, &len)| example(k as u32, len, 0))
        .collect();
    let packs = pack(&examples, 10).unwrap();
    let members: Vec<Vec<usize>> = packs.iter().map(|p| p.members.clone()).collect();
    assert_eq!(members, vec![vec![1, 2], vec![3, 0]]);
}

#[test]
fn too_long_examples_are_refused() {
    let examples = vec![example(0, 3, 0), example(1, 11, 0)];
    let msg = pack(&examples, 10).unwrap_err().to_string();
    assert!(msg.contains("example 1 has 11 tokens"), "{msg}");
}

#[test]
fn collate_right_pads_every_field() {
    let a = example(1, 3, 1);
    let b = example(2, 5, 2);
    let c = collate_right(&[&a, &b], 0);
    assert_eq!(c.shape(), (2, 5));
    assert_eq!(c.ids[0], vec![1000, 1001, 1002, 0, 0]);
    assert_eq!(c.ids[1], b.ids);
    assert_eq!(c.loss_mask[0], vec![0, 1, 1, 0, 0]);
    assert_eq!(c.attention_mask[0], vec![1, 1, 1, 0, 0]);
    assert_eq!(c.attention_mask[1], vec![1; 5]);
    assert_eq!(c.position_ids[0], vec![0, 1, 2, 3, 4]);
    assert_eq!(c.loss_tokens(), 2 + 3);

    let packs: Vec<Packed> =
        pack(&[example(0, 2, 0), example(1, 3, 0), example(2, 6, 0)], 6).unwrap();
    let refs: Vec<&Packed> = packs.iter().collect();
    let c = collate_right(&refs, 9);
    assert_eq!(c.shape(), (2, 6));
    assert_eq!(c.position_ids[1], vec![0, 1, 2, 0, 1, 2]);
    assert_eq!(c.ids[1][5], 9);
    assert_eq!(c.attention_mask[1], vec![1, 1, 1, 1, 1, 0]);
    // One segment per member, padding in a segment of its own; unpacked batches carry none.
    let seg = c.segment_ids.as_ref().unwrap();
    assert_eq!(seg[0], vec![0; 6]);
    assert_eq!(seg[1], vec![0, 0, 0, 1, 1, 2]);
    assert!(collate_right(&[&a, &b], 0).segment_ids.is_none());
    assert_eq!(collate_right::<Packed>(&[], 0).shape(), (0, 0));
}
