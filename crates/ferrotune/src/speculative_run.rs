//! The command-line side of speculative decoding: loading a draft model beside the target
//! (refused unless both tokenizers give the same ids), `generate --draft-model`, and
//! `bench speculative`, which decodes a prompt set with the target alone and with the draft and
//! reports tokens/s, the speed-up and the acceptance rate as one JSON object (also written to
//! `--out`). The draft–verify loop itself lives in `ferrotune_generate::speculative`.
//!
//! The baseline is our own batch-of-one decode ([`generate`]) with the same sampling settings
//! and seed: what a user would run without a draft. Both sides decode the same prompts in the
//! same order, each prompt timed from its first forward to its last token, so prompt
//! processing is in both.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferrotune_generate::speculative::{speculative_generate, SpeculativeOptions, SpeculativeStats};
use ferrotune_generate::{generate, GenerateOptions, SamplingParams};
use ferrotune_models::LoadOptions;
use ferrotune_nn::Mode;
use serde::Serialize;
use serde_json::json;

use crate::grpo_run::load_prompts;
use crate::lm::{load_tokenizer, Lm};

/// Load the draft model on the target's device and dtype; refuse it when its tokenizer maps
/// text to other ids than the target's (the draft's tokens are the target's tokens). A
/// different number of embedding rows is refused by the decode loop itself.
pub fn load_draft(target: &Lm, target_path: &Path, draft: &Path, opts: &LoadOptions) -> Result<Lm> {
    // The tokenizer first: a mismatch is reported before any weight is read.
    let tok =
        load_tokenizer(draft).with_context(|| format!("--draft-model {}", draft.display()))?;
    if let Some(why) = target.tokenizer.vocab_mismatch(&tok) {
        bail!(
            "--draft-model {}: its tokenizer differs from --model {}'s ({why}); a draft must share the target's tokenizer",
            draft.display(),
            target_path.display()
        );
    }
    Lm::load(draft, opts).with_context(|| format!("--draft-model {}", draft.display()))
}

/// Settings of `bench speculative`.
pub struct BenchArgs {
    pub prompts: Option<PathBuf>,
    pub n: usize,
    pub max_new_tokens: usize,
    pub draft_tokens: usize,
    pub sampling: SamplingParams,
    pub out: Option<PathBuf>,
}

/// One side of the benchmark, summed over the prompt set.
#[derive(Debug, Default, Serialize)]
pub struct Side {
    pub new_tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

impl Side {
    fn finish(mut self) -> Self {
        self.tokens_per_second = if self.seconds > 0.0 {
            self.new_tokens as f64 / self.seconds
        } else {
            0.0
        };
        self
    }
}

/// What `bench speculative` measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub prompts: usize,
    pub max_new_tokens: usize,
    pub draft_tokens: usize,
    pub temperature: f64,
    pub target_alone: Side,
    pub speculative: Side,
    /// speculative tokens/s ÷ target-alone tokens/s.
    pub speedup: f64,
    /// Draft tokens kept ÷ draft tokens proposed.
    pub acceptance_rate: f64,
    /// Mean tokens emitted per target forward pass (1 = no gain possible).
    pub tokens_per_target_forward: f64,
    /// Greedy only: prompts whose speculative output differs from the target's own (must be 0).
    pub greedy_mismatches: Option<usize>,
}

/// A small built-in prompt set when no file is given: arithmetic questions in the demo's
/// format, rendered through the chat template when the target has one.
fn default_prompts(lm: &Lm, n: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = (3 + 7 * i % 41, 5 + 11 * i % 37);
        let q = format!("What is {a} + {b}?");
        let ids = if lm.tokenizer.chat_template().is_some() {
            let msgs = [ferrotune_tokenize::Message::new("user", &q)];
            lm.tokenizer.render(&msgs, true)?.ids
        } else {
            lm.tokenizer.encode(&q, true)?
        };
        out.push(ids);
    }
    Ok(out)
}

/// Decode every prompt with the target alone, then with the draft, and compare.
pub fn bench(target: &Lm, draft: &Lm, args: &BenchArgs) -> Result<BenchReport> {
    let prompts: Vec<Vec<u32>> = match &args.prompts {
        Some(p) => load_prompts(&target.tokenizer, p, 4096)?
            .into_iter()
            .take(args.n)
            .map(|it| it.ids)
            .collect(),
        None => default_prompts(target, args.n)?,
    };
    if prompts.is_empty() {
        bail!("bench speculative: no prompts");
    }
    let eos = target.eos_ids();
    let gen_opts = GenerateOptions {
        sampling: args.sampling.clone(),
        max_new_tokens: args.max_new_tokens,
        eos_ids: eos.clone(),
        pad_id: target.pad_id(),
        mode: Mode::EVAL,
    };
    let spec_opts = SpeculativeOptions {
        sampling: args.sampling.clone(),
        max_new_tokens: args.max_new_tokens,
        eos_ids: eos,
        num_draft_tokens: args.draft_tokens,
        mode: Mode::EVAL,
    };
    let greedy = args.sampling.temperature <= 0.0;
    let never = |_: usize, _: &[u32]| false;
    let never1 = |_: &[u32]| false;
    // The target alone on one prompt.
    let plain = |p: &Vec<u32>, o: &GenerateOptions| {
        let prompt = std::slice::from_ref(p);
        generate(target.model.as_ref(), prompt, o, &never, &target.device)
    };
    // One untimed warm-up of each path, so neither side pays first-call costs.
    let warm = &prompts[0];
    plain(warm, &gen_opts)?;
    speculative_generate(
        target.model.as_ref(),
        draft.model.as_ref(),
        warm,
        &spec_opts,
        &never1,
        &target.device,
    )?;

    let mut alone = Side::default();
    let mut plain_ids = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let mut o = gen_opts.clone();
        o.sampling.seed = args.sampling.seed.wrapping_add(i as u64);
        let t = Instant::now();
        let g = plain(p, &o)?;
        alone.seconds += t.elapsed().as_secs_f64();
        alone.new_tokens += g[0].ids.len();
        plain_ids.push(g[0].ids.clone());
    }
    let mut stats = SpeculativeStats::default();
    let mut mismatches = 0;
    for (i, p) in prompts.iter().enumerate() {
        let mut o = spec_opts.clone();
        o.sampling.seed = args.sampling.seed.wrapping_add(i as u64);
        let s = speculative_generate(
            target.model.as_ref(),
            draft.model.as_ref(),
            p,
            &o,
            &never1,
            &target.device,
        )?;
        if s.generation.ids != plain_ids[i] {
            mismatches += 1;
        }
        stats.add(&s.stats);
    }
    let alone = alone.finish();
    let spec = Side {
        new_tokens: stats.new_tokens,
        seconds: stats.seconds,
        tokens_per_second: 0.0,
    }
    .finish();
    let report = BenchReport {
        prompts: prompts.len(),
        max_new_tokens: args.max_new_tokens,
        draft_tokens: args.draft_tokens,
        temperature: args.sampling.temperature,
        speedup: if alone.tokens_per_second > 0.0 {
            spec.tokens_per_second / alone.tokens_per_second
        } else {
            0.0
        },
        acceptance_rate: stats.acceptance_rate(),
        tokens_per_target_forward: if stats.target_forwards > 0 {
            stats.new_tokens as f64 / stats.target_forwards as f64
        } else {
            0.0
        },
        greedy_mismatches: greedy.then_some(mismatches),
        target_alone: alone,
        speculative: spec,
    };
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--out {}: cannot create its folder", out.display()))?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("--out {}: cannot write", out.display()))?;
    }
    Ok(report)
}

/// The stderr line `generate --draft-model` prints after the text.
pub fn stats_line(s: &SpeculativeStats) -> String {
    json!({
        "new_tokens": s.new_tokens,
        "tokens_per_second": (s.tokens_per_second() * 10.0).round() / 10.0,
        "acceptance_rate": (s.acceptance_rate() * 1000.0).round() / 1000.0,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "target_forwards": s.target_forwards,
    })
    .to_string()
}
