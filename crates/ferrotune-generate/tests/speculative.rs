//! Speculative decoding (`ferrotune_generate::speculative`) on the committed tiny models of
//! `fixtures/tiny` (vocab 128 for every family; written by `fixtures/tiny/make_tiny.py`):
//!
//! - greedy: token-for-token the target's own greedy output from [`generate`], on 50 prompts,
//!   with k from 1 to 6 and four drafts (the target itself, the tiny Qwen2, a fresh random
//!   init, the target with the fixture's LoRA adapter), including an end-of-sequence stop in the middle of a draft block;
//! - draft = target: every draft token is accepted, greedy and sampled, and the counts add up;
//! - the acceptance rule as a pure function: P(accept x)·q(x) + P(reject)·residual = p exactly,
//!   for hand-made (p, q) pairs (disjoint supports, equal, one-hot), and a Monte Carlo run of
//!   `verify_drafts`;
//! - sampling end to end: the first token of speculative sampling with the tiny Llama as target
//!   and the same model plus its fixture LoRA adapter as draft
//!   (top-k 8) follows the target's distribution by a chi-square test over 3000 seeded draws,
//!   while the draft's own distribution would fail the same test.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ferrotune_generate::speculative::{
    acceptance_probability, residual_distribution, sampling_distribution, speculative_generate,
    speculative_generate_with_rng, verify_drafts, SpeculativeOptions,
};
use ferrotune_generate::{generate, Finish, GenerateOptions, SamplingParams};
use ferrotune_models::adapter::{load_weights, PeftConfig};
use ferrotune_models::init::{init_model, InitOptions};
use ferrotune_models::{load, Batch, CausalLm, LoadOptions};
use ferrotune_nn::Mode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 128;

fn tiny(family: &str) -> Box<dyn CausalLm> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tiny")
        .join(family);
    load(&dir, &LoadOptions::default()).unwrap().model
}

/// The tiny Llama with the fixture's PEFT adapter (`fixtures/tiny/llama/adapter`, lora_B drawn
/// N(0, 0.05²)): logits within ~2 of the base's, so a draft that is close but not equal.
fn llama_with_adapter() -> Box<dyn CausalLm> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama");
    let adapter = dir.join("adapter");
    let lora = PeftConfig::from_dir(&adapter)
        .unwrap()
        .lora_config()
        .unwrap();
    let opts = LoadOptions {
        lora: Some((lora, 0)),
        ..LoadOptions::default()
    };
    let model = load(&dir, &opts).unwrap().model;
    load_weights(model.as_ref(), &adapter).unwrap();
    model
}

/// A Llama-shaped model with fresh weights (std 0.02): a draft that knows nothing.
fn random_draft(like: &dyn CausalLm) -> Box<dyn CausalLm> {
    let init = InitOptions {
        initializer_range: 0.02,
        seed: 7,
        pad_token_id: None,
    };
    init_model(like.config(), &init, &LoadOptions::default())
        .unwrap()
        .model
}

fn prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..=12);
            (0..len)
                .map(|_| rng.random_range(3..VOCAB as u32))
                .collect()
        })
        .collect()
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn plain(target: &dyn CausalLm, prompt: &[u32], max_new: usize, eos: &[u32]) -> (Vec<u32>, Finish) {
    let opts = GenerateOptions {
        sampling: greedy(),
        max_new_tokens: max_new,
        eos_ids: eos.to_vec(),
        pad_id: 0,
        mode: Mode::EVAL,
    };
    let g = generate(
        target,
        &[prompt.to_vec()],
        &opts,
        &|_, _| false,
        &Device::Cpu,
    )
    .unwrap();
    (g[0].ids.clone(), g[0].finish)
}

#[test]
fn greedy_output_is_the_targets_own() {
    let target = tiny("llama");
    let qwen = tiny("qwen2");
    let random = random_draft(target.as_ref());
    let lora = llama_with_adapter();
    let drafts: [(&str, &dyn CausalLm); 4] = [
        ("self", target.as_ref()),
        ("qwen2", qwen.as_ref()),
        ("random", random.as_ref()),
        ("llama+lora", lora.as_ref()),
    ];
    let max_new = 20;
    let mut rejected_somewhere = 0;
    for (i, prompt) in prompts(50, 1).iter().enumerate() {
        let (want, _) = plain(target.as_ref(), prompt, max_new, &[]);
        let (name, draft) = drafts[i % drafts.len()];
        let opts = SpeculativeOptions {
            sampling: greedy(),
            max_new_tokens: max_new,
            num_draft_tokens: 1 + i % 6,
            ..SpeculativeOptions::default()
        };
        let out = speculative_generate(
            target.as_ref(),
            draft,
            prompt,
            &opts,
            &|_| false,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            out.generation.ids, want,
            "prompt {i} {prompt:?}, draft {name}, k {}",
            opts.num_draft_tokens
        );
        assert_eq!(out.generation.finish, Finish::Length);
        assert_eq!(out.generation.logprobs.len(), max_new);
        let s = &out.stats;
        assert_eq!(s.new_tokens, max_new);
        assert_eq!(s.target_forwards, s.rounds);
        // Each round emits its accepted drafts plus one target token.
        assert_eq!(s.accepted + s.rounds, max_new, "{s:?}");
        if s.accepted < s.drafted {
            rejected_somewhere += 1;
        }
        if name == "self" {
            assert_eq!(
                s.accepted, s.drafted,
                "draft = target keeps every draft: {s:?}"
            );
        }
    }
    // The foreign drafts were wrong somewhere, so cache rollback after a rejection was used.
    assert!(rejected_somewhere >= 25, "{rejected_somewhere}");
}

#[test]
fn greedy_stops_at_eos_inside_a_draft_block() {
    let target = tiny("llama");
    for (i, prompt) in prompts(6, 2).iter().enumerate() {
        let (free, _) = plain(target.as_ref(), prompt, 16, &[]);
        // An eos the target emits at step 5 + i: with k = 4 and draft = target it falls inside
        // an accepted block, so the block must be cut there.
        let eos = free[5 + i];
        let (want, finish) = plain(target.as_ref(), prompt, 16, &[eos]);
        assert_eq!(finish, Finish::Eos);
        let opts = SpeculativeOptions {
            sampling: greedy(),
            max_new_tokens: 16,
            eos_ids: vec![eos],
            num_draft_tokens: 4,
            ..SpeculativeOptions::default()
        };
        let out = speculative_generate(
            target.as_ref(),
            target.as_ref(),
            prompt,
            &opts,
            &|_| false,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(out.generation.ids, want);
        assert_eq!(out.generation.finish, Finish::Eos);
        // The stop rule over ids ends it the same way.
        let n = want.len();
        let out = speculative_generate(
            target.as_ref(),
            target.as_ref(),
            prompt,
            &SpeculativeOptions {
                eos_ids: vec![],
                ..opts.clone()
            },
            &|ids| ids.len() == n,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(out.generation.ids, want);
        assert_eq!(out.generation.finish, Finish::Stop);
    }
}

#[test]
fn draft_equal_to_target_accepts_everything() {
    let target = tiny("qwen2");
    let sampled = SamplingParams {
        temperature: 1.0,
        top_k: None,
        top_p: Some(0.95),
        seed: 11,
    };
    for sampling in [greedy(), sampled] {
        for k in [1, 3, 5] {
            let opts = SpeculativeOptions {
                sampling: sampling.clone(),
                max_new_tokens: 24,
                num_draft_tokens: k,
                ..SpeculativeOptions::default()
            };
            let prompt = [5u32, 17, 33, 9];
            let out = speculative_generate(
                target.as_ref(),
                target.as_ref(),
                &prompt,
                &opts,
                &|_| false,
                &Device::Cpu,
            )
            .unwrap();
            let s = &out.stats;
            assert_eq!(
                s.acceptance_rate(),
                1.0,
                "T {} k {k}: {s:?}",
                sampling.temperature
            );
            // Rounds of k drafts + 1 bonus token, the last round trimmed to the budget.
            let rounds = 24usize.div_ceil(k + 1);
            assert_eq!(s.rounds, rounds);
            assert_eq!(s.target_forwards, rounds);
            assert_eq!(s.drafted, 24 - rounds);
            assert_eq!(s.draft_forwards, s.drafted);
            assert_eq!(out.generation.ids.len(), 24);
            assert!(s.tokens_per_second() > 0.0);
            // Reported log-probs are the target's, as `generate` reports them.
            let mut seq = prompt.to_vec();
            seq.extend(&out.generation.ids);
            let lp = target_logprobs(target.as_ref(), &seq, sampling.temperature);
            for (j, (&got, &want)) in out
                .generation
                .logprobs
                .iter()
                .zip(&lp[prompt.len() - 1..])
                .enumerate()
            {
                assert!((got - want).abs() < 1e-4, "token {j}: {got} vs {want}");
            }
        }
    }
}

/// log p(seq[t + 1] | seq[..=t]) under softmax(logits / T) (raw logits when T = 0), from one
/// full forward pass without cache.
fn target_logprobs(model: &dyn CausalLm, seq: &[u32], temperature: f64) -> Vec<f32> {
    let batch = Batch::right_padded(&[seq.to_vec()], 0, &Device::Cpu).unwrap();
    let logits = model
        .forward(&batch, None, Mode::EVAL)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    (0..seq.len() - 1)
        .map(|i| {
            let row: Vec<f64> = logits[i].iter().map(|&x| x as f64 / t).collect();
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
            (row[seq[i + 1] as usize] - lse) as f32
        })
        .collect()
}

/// Distribution of the first emitted token, exactly: the draft proposes x ~ q, keeps it with
/// probability a(x), else the token comes from the residual.
fn first_token_distribution(p: &[f64], q: &[f64]) -> Vec<f64> {
    let r = residual_distribution(p, q);
    let mut out = vec![0.0; p.len()];
    for x in 0..p.len() {
        if q[x] == 0.0 {
            continue;
        }
        let a = acceptance_probability(p, q, x);
        out[x] += q[x] * a;
        for (o, &ry) in out.iter_mut().zip(&r) {
            *o += q[x] * (1.0 - a) * ry;
        }
    }
    out
}

fn normalised(w: &[f64]) -> Vec<f64> {
    let s: f64 = w.iter().sum();
    w.iter().map(|x| x / s).collect()
}

#[test]
fn acceptance_rule_reproduces_the_target_exactly() {
    let cases: Vec<(Vec<f64>, Vec<f64>)> = vec![
        (normalised(&[1., 2., 3., 4.]), normalised(&[4., 3., 2., 1.])),
        // Disjoint supports: every draft is rejected, the residual is p itself.
        (vec![0.5, 0.5, 0.0, 0.0], vec![0.0, 0.0, 0.3, 0.7]),
        // The draft's support is larger than the target's (top-k on the target).
        (
            vec![0.0, 0.6, 0.4, 0.0, 0.0],
            normalised(&[1., 1., 1., 1., 1.]),
        ),
        // Equal: every draft is accepted.
        (normalised(&[3., 1., 1.]), normalised(&[3., 1., 1.])),
        // Greedy: one-hot p and q, same or different argmax.
        (vec![0.0, 1.0, 0.0], vec![0.0, 1.0, 0.0]),
        (vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 0.0]),
    ];
    for (p, q) in &cases {
        let got = first_token_distribution(p, q);
        for (y, (&g, &w)) in got.iter().zip(p).enumerate() {
            assert!(
                (g - w).abs() < 1e-12,
                "p {p:?} q {q:?}: token {y} {g} vs {w}"
            );
        }
    }
    // And the same law by sampling `verify_drafts` (k = 2): the first token follows p1.
    let p1 = normalised(&[1., 2., 3., 4., 0.]);
    let p2 = normalised(&[1., 1., 1., 1., 1.]);
    let p3 = normalised(&[5., 1., 1., 1., 1.]);
    let q1 = normalised(&[4., 3., 2., 1., 5.]);
    let q2 = normalised(&[1., 0., 0., 0., 1.]);
    let mut rng = StdRng::seed_from_u64(3);
    let n = 200_000;
    let mut counts = [0usize; 5];
    for _ in 0..n {
        let x1 = sample_index(&q1, &mut rng);
        let x2 = sample_index(&q2, &mut rng);
        let (kept, next) = verify_drafts(
            &[p1.clone(), p2.clone(), p3.clone()],
            &[q1.clone(), q2.clone()],
            &[x1 as u32, x2 as u32],
            &mut rng,
        );
        let first = if kept >= 1 { x1 } else { next as usize };
        counts[first] += 1;
    }
    assert_eq!(counts[4], 0, "token 4 has p = 0 and must never be emitted");
    let stat = chi_square(&counts, &p1);
    assert!(
        stat < chi_square_threshold(3),
        "chi-square {stat} over {counts:?}"
    );
}

fn sample_index(w: &[f64], rng: &mut StdRng) -> usize {
    let mut u = rng.random::<f64>();
    for (i, &x) in w.iter().enumerate() {
        u -= x;
        if u < 0.0 {
            return i;
        }
    }
    w.len() - 1
}

/// Pearson's statistic over the categories with p > 0.
fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(p)
        .filter(|(_, &pi)| pi > 0.0)
        .map(|(&c, &pi)| {
            let e = n as f64 * pi;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

/// The 1 − 1e-4 quantile of chi-square with `df` degrees of freedom (Wilson–Hilferty, within
/// ~1% for df ≥ 3): a correct sampler fails one seed in 10,000.
fn chi_square_threshold(df: usize) -> f64 {
    let z = 3.719; // standard normal 1 − 1e-4 quantile
    let d = df as f64;
    let h = 2.0 / (9.0 * d);
    d * (1.0 - h + z * h.sqrt()).powi(3)
}

#[test]
fn sampled_first_token_follows_the_target_distribution() {
    let target = tiny("llama");
    let draft = llama_with_adapter();
    let prompt = [7u32, 42, 99, 3, 18];
    let sampling = SamplingParams {
        temperature: 1.0,
        top_k: Some(8),
        top_p: None,
        seed: 0,
    };
    // The target's distribution at the prompt, from a plain forward pass.
    let row = |m: &dyn CausalLm| {
        let batch = Batch::right_padded(&[prompt.to_vec()], 0, &Device::Cpu).unwrap();
        let logits = m.forward(&batch, None, Mode::EVAL).unwrap();
        let last: Tensor = logits.squeeze(0).unwrap().get(prompt.len() - 1).unwrap();
        last.to_vec1::<f32>().unwrap()
    };
    let p = sampling_distribution(&row(target.as_ref()), &sampling);
    let q = sampling_distribution(&row(draft.as_ref()), &sampling);
    assert_eq!(p.iter().filter(|&&x| x > 0.0).count(), 8);
    let opts = SpeculativeOptions {
        sampling,
        max_new_tokens: 2,
        num_draft_tokens: 1,
        ..SpeculativeOptions::default()
    };
    let mut rng = StdRng::seed_from_u64(2024);
    let n = 3000;
    let mut counts = vec![0usize; VOCAB];
    let (mut drafted, mut accepted) = (0, 0);
    for _ in 0..n {
        let out = speculative_generate_with_rng(
            target.as_ref(),
            draft.as_ref(),
            &prompt,
            &opts,
            // Only the first token is tested: stop there, so no second round runs.
            &|ids| !ids.is_empty(),
            &Device::Cpu,
            &mut rng,
        )
        .unwrap();
        assert_eq!(out.generation.ids.len(), 1);
        counts[out.generation.ids[0] as usize] += 1;
        drafted += out.stats.drafted;
        accepted += out.stats.accepted;
    }
    let outside: usize = counts
        .iter()
        .zip(&p)
        .filter(|(_, &pi)| pi == 0.0)
        .map(|(&c, _)| c)
        .sum();
    assert_eq!(outside, 0, "a token outside the target's top-8 was emitted");
    let threshold = chi_square_threshold(7);
    let stat = chi_square(&counts, &p);
    assert!(
        stat < threshold,
        "chi-square {stat} >= {threshold}: {counts:?} vs {p:?}"
    );
    // Power: had the draft's tokens been emitted unchecked, the statistic would exceed the
    // threshold by several standard deviations: its noncentrality n Σ (q − p)² / p over p's
    // support (≈ 91 here, sd of the statistic ≈ 19) is over twice the threshold (≈ 30), or q
    // would put mass outside p's support, which the `outside` check above catches.
    let q_on_p: f64 = p
        .iter()
        .zip(&q)
        .filter(|(&pi, _)| pi > 0.0)
        .map(|(&pi, &qi)| n as f64 * (qi - pi).powi(2) / pi)
        .sum();
    let q_outside: f64 = p
        .iter()
        .zip(&q)
        .filter(|(&pi, _)| pi == 0.0)
        .map(|(_, &qi)| qi)
        .sum();
    assert!(
        q_on_p > 2.0 * threshold || q_outside > 0.05,
        "{q_on_p} {q_outside}"
    );
    // The foreign draft is sometimes right and sometimes wrong: both branches ran.
    assert!(accepted > 0 && accepted < drafted, "{accepted}/{drafted}");
}

#[test]
fn refuses_mismatched_vocabularies_and_empty_prompts() {
    let target = tiny("llama");
    let mut other = target.config().clone();
    other.vocab_size = 64;
    let small = init_model(
        &other,
        &InitOptions {
            initializer_range: 0.02,
            seed: 1,
            pad_token_id: None,
        },
        &LoadOptions::default(),
    )
    .unwrap()
    .model;
    let opts = SpeculativeOptions::default();
    let e = speculative_generate(
        target.as_ref(),
        small.as_ref(),
        &[1, 2],
        &opts,
        &|_| false,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vocabulary") && e.contains("64") && e.contains("128"),
        "{e}"
    );
    let e = speculative_generate(
        target.as_ref(),
        target.as_ref(),
        &[],
        &opts,
        &|_| false,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("prompt"), "{e}");
}

#[test]
fn sampling_distribution_is_what_sample_token_draws_from() {
    // The acceptance test needs p and q as full vectors; they must be the distributions the
    // plain sampler draws from, or speculative sampling would follow a different law.
    let logits = [1.5f32, -0.3, 2.2, 0.0, 0.9, -2.0];
    let params = [
        (1.0, None, None),
        (0.7, Some(3), None),
        (1.3, None, Some(0.8)),
        (1.0, Some(4), Some(0.9)),
    ];
    let mut rng = StdRng::seed_from_u64(5);
    for (temperature, top_k, top_p) in params {
        let sp = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 0,
        };
        let want = sampling_distribution(&logits, &sp);
        assert!((want.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let mut counts = [0usize; 6];
        for _ in 0..20_000 {
            counts[ferrotune_generate::sample_token(&logits, &sp, &mut rng).0 as usize] += 1;
        }
        let outside: usize = counts
            .iter()
            .zip(&want)
            .filter(|(_, &w)| w == 0.0)
            .map(|(&c, _)| c)
            .sum();
        assert_eq!(outside, 0, "{sp:?}");
        let df = want.iter().filter(|&&w| w > 0.0).count() - 1;
        let stat = chi_square(&counts, &want);
        assert!(
            stat < chi_square_threshold(df.max(3)),
            "{sp:?}: {stat} {counts:?} {want:?}"
        );
    }
    let g = sampling_distribution(&logits, &greedy());
    assert_eq!(g, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
}
