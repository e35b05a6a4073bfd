//! Batched generation on the committed tiny Llama (`fixtures/tiny/llama`, vocab 128) with rows
//! that finish at different steps, so finished rows leave the batch (the cache and the step
//! inputs are compacted) while the others go on:
//!
//! - greedy: every row's tokens, finish reason and log-probs equal what `generate` gives for
//!   that prompt alone (log-probs within 1e-4: a different batch shape may round differently);
//! - sampled: every token's recorded log-prob equals the log-prob a fresh teacher-forced
//!   forward of that row's prompt + completion gives it, so no row was fed another row's cache
//!   or position after a compaction.

use std::path::PathBuf;

use candle_core::{Device, IndexOp};
use ferrotune_generate::{
    generate, next_token_logprobs, Finish, GenerateOptions, Generation, SamplingParams,
};
use ferrotune_models::{load, Batch, CausalLm, LoadOptions};
use ferrotune_nn::Mode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOCAB: u32 = 128;
const MAX_NEW: usize = 10;

fn tiny_llama() -> Box<dyn CausalLm> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama");
    load(&dir, &LoadOptions::default()).unwrap().model
}

/// 16 prompts of 1-12 tokens and, per row, after how many new tokens its stop rule fires
/// (1 to 12: rows past MAX_NEW end by length).
fn cases() -> (Vec<Vec<u32>>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(11);
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|_| {
            let len = rng.random_range(1..=12);
            (0..len).map(|_| rng.random_range(3..VOCAB)).collect()
        })
        .collect();
    let stops = (0..16).map(|i| 1 + (i * 5) % 12).collect();
    (prompts, stops)
}

fn options(temperature: f64, seed: u64) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        },
        max_new_tokens: MAX_NEW,
        eos_ids: vec![],
        pad_id: 0,
        mode: Mode::EVAL,
    }
}

/// `generate` on `prompts`, where prompt k's stop rule fires after `stops[k]` new tokens.
fn run(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    stops: &[usize],
    opts: &GenerateOptions,
) -> Vec<Generation> {
    generate(
        model,
        prompts,
        opts,
        &|i, ids| ids.len() >= stops[i],
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn greedy_rows_that_finish_early_leave_the_batch_and_the_rest_match_each_row_alone() {
    let model = tiny_llama();
    let (prompts, stops) = cases();
    let opts = options(0.0, 0);
    let batched = run(model.as_ref(), &prompts, &stops, &opts);
    let mut finishes = std::collections::HashSet::new();
    for (i, (p, got)) in prompts.iter().zip(&batched).enumerate() {
        let alone = run(
            model.as_ref(),
            std::slice::from_ref(p),
            &stops[i..=i],
            &opts,
        )
        .remove(0);
        assert_eq!(got.ids, alone.ids, "row {i}: ids");
        assert_eq!(got.finish, alone.finish, "row {i}: finish");
        assert_eq!(got.ids.len(), stops[i].min(MAX_NEW), "row {i}: length");
        for (t, (a, b)) in got.logprobs.iter().zip(&alone.logprobs).enumerate() {
            assert!((a - b).abs() < 1e-4, "row {i} token {t}: {a} vs {b}");
        }
        finishes.insert(format!("{:?}", got.finish));
    }
    // Both ways of ending occur, and rows end at many different steps.
    assert!(finishes.contains(&format!("{:?}", Finish::Stop)));
    assert!(finishes.contains(&format!("{:?}", Finish::Length)));
}

#[test]
fn sampled_logprobs_match_a_fresh_forward_of_each_row() {
    let model = tiny_llama();
    let (prompts, stops) = cases();
    let dev = Device::Cpu;
    for seed in [1u64, 2, 3] {
        let opts = options(1.0, seed);
        let gens = run(model.as_ref(), &prompts, &stops, &opts);
        for (i, (p, g)) in prompts.iter().zip(&gens).enumerate() {
            assert_eq!(g.ids.len(), stops[i].min(MAX_NEW), "seed {seed} row {i}");
            let mut seq = p.clone();
            seq.extend(&g.ids);
            let batch = Batch::right_padded(&[seq], 0, &dev).unwrap();
            let lp = next_token_logprobs(model.as_ref(), &batch, Mode::EVAL)
                .unwrap()
                .i(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Row i scores ids[1..]: the completion's tokens are the last g.ids.len() of them.
            let want = &lp[lp.len() - g.ids.len()..];
            for (t, (a, b)) in g.logprobs.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4,
                    "seed {seed} row {i} token {t}: sampled {a}, forward {b}"
                );
            }
        }
    }
}
