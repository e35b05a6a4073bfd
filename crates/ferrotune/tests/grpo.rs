//! GRPO end to end through the real binary on the tiny chat model (fixtures/tiny-chat, random
//! weights, made by make_tiny_chat.py): on a trivially learnable verifiable task the mean reward
//! rises clearly within a few dozen seeded steps; the run folder has metrics, completions,
//! health findings, plots and checkpoints; the sampler's log-probs equal the trainer's (ratio 1
//! on the first iteration); resume is exact; bad reward configs fail with one line.

mod common;

use common::*;

use std::path::{Path, PathBuf};

/// The task (fixtures/tiny-chat/sevens.jsonl): sums whose answer is 7; the reward is 1 when the
/// completion says a 7 anywhere. The random model does so now and then; GRPO must make it
/// say it more often.
fn task() -> PathBuf {
    root().join("fixtures/tiny-chat/sevens.jsonl")
}

fn config(dir: &Path, run: &str, extra_run: &str, extra_grpo: &str) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{model}"

[lora]
r = 8
lora_alpha = 16
target_modules = "all-linear"

[data]
train = "{train}"

[optim]
learning_rate = 1e-2
lr_scheduler_type = "constant"

[run]
output_dir = "{run}"
batch_size = 32
log_every = 1
seed = 1
{extra_run}

[grpo]
num_generations = 8
max_completion_len = 8
temperature = 1.0
rewards = [{{ name = "answer_match", extract = "regex", pattern = "(7)" }}]
{extra_grpo}
"#,
        model = root().join("fixtures/tiny-chat/model").display(),
        train = task().display(),
        run = dir.join(run).display(),
    );
    let p = dir.join(format!("{run}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn grpo_raises_the_reward_and_writes_a_complete_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "run", "max_steps = 60\nsave_every = 20", "");
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("run");
    let reward = metric(&run, "reward");
    assert_eq!(reward.len(), 60);
    // Windows of 10 steps: a 5-step window of 32 completions is too noisy for a fixed bar
    // (measured over seeds 1-6: the rise is +0.13 to +0.28 at these windows).
    let (first, last) = (mean(&reward[..10]), mean(&reward[50..]));
    assert!(
        last > first + 0.12 && last > 1.4 * first,
        "mean reward did not rise clearly: {first:.3} -> {last:.3} ({reward:?})"
    );
    // The sampler's log-probs are the trainer's: the first-iteration ratio is 1 up to rounding.
    let dev = metric(&run, "ratio/max_abs_dev");
    assert!(
        dev.iter().all(|&d| d < 1e-3),
        "ratio deviates from 1: {dev:?}"
    );
    for key in [
        "rewards/answer_match/mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "frac_reward_zero_std",
        "tokens_per_s/rollout",
        "clip_ratio/region_mean",
        "grad_norm",
    ] {
        assert_eq!(metric(&run, key).len(), 60, "{key} not logged every step");
    }
    for f in [
        "config.toml",
        "metrics.jsonl",
        "completions.jsonl",
        "health.jsonl",
        "plots/reward.png",
        "checkpoints/step-20/adapter_model.safetensors",
        "checkpoints/step-60/COMPLETE",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let first_line = std::fs::read_to_string(run.join("completions.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(first_line.lines().next().unwrap()).unwrap();
    for k in [
        "step",
        "prompt",
        "completion",
        "rewards",
        "reward",
        "advantage",
    ] {
        assert!(rec.get(k).is_some(), "completions.jsonl lacks {k}: {rec}");
    }
}

/// The adapter and optimizer state of `step` are bit-identical in two run folders.
fn same_checkpoint(a: &Path, b: &Path, step: usize) {
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let load =
            |p: PathBuf| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
        let x = load(a.join(format!("checkpoints/step-{step}")).join(f));
        let y = load(b.join(format!("checkpoints/step-{step}")).join(f));
        assert_eq!(x.len(), y.len());
        for (k, v) in &x {
            let flat = |t: &candle_core::Tensor| {
                t.to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let same = flat(v) == flat(&y[k]);
            assert!(same, "{f} {k} differs between straight and resumed runs");
        }
    }
}

/// Runs the config as `a` straight through and as `b`, deletes b's checkpoint at `last`,
/// resumes b, and checks that b's checkpoint at `last` equals a's; returns b's folder.
fn straight_and_resumed(dir: &Path, extra_run: &str, extra_grpo: &str, last: usize) -> PathBuf {
    for run in ["a", "b"] {
        let cfg = config(dir, run, extra_run, extra_grpo);
        let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run_b = dir.join("b");
    std::fs::remove_dir_all(run_b.join(format!("checkpoints/step-{last}"))).unwrap();
    let out = ferrotune(&["train", "--resume", run_b.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    same_checkpoint(&dir.join("a"), &run_b, last);
    run_b
}

#[test]
fn grpo_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "max_steps = 4\nsave_every = 2";
    let run_b = straight_and_resumed(tmp.path(), extra, "beta = 0.04\nnum_iterations = 2", 4);
    // The resumed run sampled and scored what the straight one did, and its logs hold each
    // step once: the completions of steps 3-4 from before the resume were cut back.
    assert_eq!(
        metric(&tmp.path().join("a"), "reward"),
        metric(&run_b, "reward")
    );
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap();
    let (straight, resumed) = (
        read(tmp.path().join("a/completions.jsonl")),
        read(run_b.join("completions.jsonl")),
    );
    assert!(
        straight == resumed,
        "completions.jsonl: {} lines in the straight run, {} in the resumed one",
        straight.lines().count(),
        resumed.lines().count()
    );
    // Health findings are records keyed by step (the random model's first groups have no
    // reward variance, so there is at least one), none twice.
    let health = read(run_b.join("health.jsonl"));
    let mut seen = std::collections::HashSet::new();
    for line in health.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        let (code, step) = (rec["code"].as_str().unwrap(), rec["step"].as_u64().unwrap());
        assert!(
            rec["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{line}"
        );
        assert!(
            seen.insert((code.to_string(), step)),
            "logged twice: {line}"
        );
    }
    assert!(!seen.is_empty(), "no health findings recorded");
    // The monitor's history is part of the checkpoint: the resumed run reports what the
    // straight one reported, nothing twice and nothing again.
    let straight = read(tmp.path().join("a/health.jsonl"));
    assert!(
        straight == health,
        "health.jsonl differs:\nstraight:\n{straight}\nresumed:\n{health}"
    );
}

#[test]
fn bad_reward_configs_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    for (grpo, needle) in [
        (
            "rewards = [{ name = \"no_such_reward\" }]",
            "no_such_reward",
        ),
        (
            "rewards = [{ name = \"answer_match\", extrakt = \"boxed\" }]",
            "extrakt",
        ),
        ("num_generations = 3", "num_generations"),
        ("loss_type = \"ppo\"", "loss_type"),
        // TRL would cap every CISPO weight at epsilon = 0.2 here; refused instead.
        ("loss_type = \"cispo\"", "epsilon_high"),
        (
            "importance_sampling_level = \"tokens\"",
            "importance_sampling_level",
        ),
        ("top_entropy_quantile = 1.5", "top_entropy_quantile"),
        ("delta = 0.0", "delta"),
        ("sapo_temperature_neg = -1.0", "sapo_temperature_neg"),
        (
            "dynamic_sampling = true\nmax_num_gen_batches = 0",
            "max_num_gen_batches",
        ),
        (
            "max_tool_calling_iterations = 2",
            "max_tool_calling_iterations",
        ),
        // Tools need chat prompts (the sevens prompts are plain text).
        ("[[grpo.tools]]\nname = \"calculator\"", "conversational"),
        ("[[grpo.tools]]\nname = \"search\"", "not a built-in"),
        (
            "[[grpo.tools]]\nname = \"search\"\ncmd = [\"python3\", \"s.py\"]",
            "description",
        ),
        ("[[grpo.tools]]\nname = \"calculator\"\nbogus = 1", "bogus"),
    ] {
        let cfg = config(tmp.path(), "bad", "max_steps = 2", "");
        let text = std::fs::read_to_string(&cfg).unwrap();
        // Replace the default rewards line when the case sets its own.
        let text = if grpo.starts_with("rewards") {
            text.replace(
                "rewards = [{ name = \"answer_match\", extract = \"regex\", pattern = \"(7)\" }]",
                grpo,
            )
        } else {
            format!("{text}{grpo}\n")
        };
        std::fs::write(&cfg, text).unwrap();
        let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success(), "{grpo} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or("");
        assert!(
            last.starts_with("error:") && last.contains(needle),
            "{grpo}: {err}"
        );
        assert!(!tmp.path().join("bad/checkpoints").exists());
    }
}

/// Micro-batching is invisible: 32 completions as one micro-batch or as 2 × 16 accumulated
/// give the same update, for each loss type whose normalisation spans the step (the sampled
/// completions are the same: one generation batch either way). One step with AdamW's epsilon
/// at 1 makes the update ≈ lr · gradient, so rounding is not amplified to ±lr by sign(g).
#[test]
fn accumulation_equals_one_big_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    for (loss, extra) in [
        ("grpo", ""),
        ("dr_grpo", ""),
        ("dapo", ""),
        ("cispo", "epsilon_high = 5.0"),
        ("sapo", ""),
        ("luspo", "importance_sampling_level = \"sequence\""),
    ] {
        let mut adapters = Vec::new();
        for (name, bs, acc) in [("one", 32, 1), ("two", 16, 2)] {
            let run = format!("{loss}-{name}");
            let cfg = config(
                tmp.path(),
                &run,
                "max_steps = 1\nbatch_size_placeholder = 0",
                &format!("loss_type = \"{loss}\"\nbeta = 0.04\n{extra}"),
            );
            let text = std::fs::read_to_string(&cfg)
                .unwrap()
                .replace("batch_size = 32\n", "")
                .replace(
                    "learning_rate = 1e-2",
                    "learning_rate = 1e-1\nadam_epsilon = 1.0",
                )
                .replace(
                    "batch_size_placeholder = 0",
                    &format!("batch_size = {bs}\ngradient_accumulation_steps = {acc}"),
                );
            std::fs::write(&cfg, text).unwrap();
            let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            adapters.push(
                candle_core::safetensors::load(
                    tmp.path()
                        .join(&run)
                        .join("checkpoints/step-1/adapter_model.safetensors"),
                    &candle_core::Device::Cpu,
                )
                .unwrap(),
            );
        }
        let mut moved = 0.0f32;
        for (k, a) in &adapters[0] {
            if k.contains("lora_B") {
                moved = moved.max(
                    a.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                );
            }
            let d = (a - &adapters[1][k])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-7, "{loss}: {k} differs by {d} between 32x1 and 16x2");
        }
        assert!(
            moved > 1e-5,
            "{loss}: the step did not move the adapters ({moved})"
        );
    }
}

/// Users bring their own reward: a program that reads the sample as JSON and prints a score
/// runs (sandboxed) inside the training loop; a scorer that crashes scores 0, is reported, and
/// the run goes on.
#[test]
fn command_rewards_score_inside_the_loop_and_failures_do_not_stop_it() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("has_seven.py");
    std::fs::write(
        &good,
        "import json, sys\ns = json.load(sys.stdin)\nprint(1.0 if '7' in s['completion'] else 0.0)\n",
    )
    .unwrap();
    let bad = tmp.path().join("crash.py");
    std::fs::write(&bad, "raise SystemExit('scorer bug')\n").unwrap();
    let rewards = format!(
        "rewards = [{{ name = \"command\", label = \"seven\", cmd = [\"python3\", \"{good}\"], read_paths = [\"{dir}\"] }}, {{ name = \"command\", label = \"broken\", cmd = [\"python3\", \"{bad}\"], read_paths = [\"{dir}\"] }}]",
        good = good.display(),
        bad = bad.display(),
        dir = tmp.path().display()
    );
    let cfg = config(
        tmp.path(),
        "cmd",
        "max_steps = 2\nbatch_size_placeholder = 0",
        "",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("batch_size = 32\n", "")
        .replace("batch_size_placeholder = 0", "batch_size = 16")
        .replace(
            "rewards = [{ name = \"answer_match\", extract = \"regex\", pattern = \"(7)\" }]",
            &rewards,
        );
    std::fs::write(&cfg, text).unwrap();
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("reward `broken` could not judge"),
        "no failure reported: {err}"
    );
    let run = tmp.path().join("cmd");
    // The user's scorer agrees with the same rule applied to the logged completions.
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(run.join("completions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 32);
    for r in &recs {
        let want = if r["completion"].as_str().unwrap().contains('7') {
            1.0
        } else {
            0.0
        };
        assert_eq!(r["rewards"]["seven"].as_f64(), Some(want), "{r}");
        assert_eq!(r["rewards"]["broken"].as_f64(), Some(0.0), "{r}");
    }
    assert_eq!(metric(&run, "rewards/failures"), vec![16.0, 16.0]);
}

/// The `[eval]` perplexity gate runs in GRPO too (it was measured at the start and then never
/// checked): with a threshold every state fails (ppl ratio > 0.5) and `stop_on_regression`, the
/// run stops at its first eval step, logs the gate's metrics there, and does not save that step.
#[test]
fn the_regression_gate_checks_grpo_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let gate = format!(
        "\n[eval]\nforget_set = \"{}\"\nmax_ppl_ratio = 0.5\nstop_on_regression = true",
        root().join("fixtures/gguf/text.txt").display()
    );
    let cfg = config(
        tmp.path(),
        "gate",
        "max_steps = 6\neval_every = 2\nsave_every = 2",
        &gate,
    );
    let o = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    let stdout = ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("REGRESSION at step 2"), "{err}");
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
    let run = tmp.path().join("gate");
    let ratios = metric_at(&run, "eval/forget_ppl_ratio");
    assert_eq!(ratios.len(), 1, "{ratios:?}");
    assert!(ratios[0].0 == 2 && ratios[0].1 > 0.5, "{ratios:?}");
    assert!(!run.join("checkpoints/step-2").exists());
}

/// TRL 1.16's other losses and options, each through the CLI on the sevens task with μ = 2 (so
/// the second iteration is off-policy and the options act): every one raises the mean reward
/// over 3 seeds, and logs what TRL logs for it. Measured (120 steps = 60 generation batches,
/// first vs last 10 batches): the smallest rise was +0.084 (top_entropy_quantile, seed 3),
/// most were +0.13 to +0.26.
#[test]
fn frontier_losses_raise_the_reward_over_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str], &[&str])] = &[
        (
            // GSPO as its paper and TRL's docs run it: sequence-level weights with a clip range
            // of 3e-4 / 4e-4 (with the token-level default of 0.2, seed 1 rose and fell back:
            // 0.312 -> 0.419 -> 0.303 in a release build).
            "gspo",
            "loss_type = \"grpo\"\nimportance_sampling_level = \"sequence\"\nepsilon = 3e-4\nepsilon_high = 4e-4",
            &["clip_ratio/region_mean"],
            &[],
        ),
        (
            "cispo",
            "loss_type = \"cispo\"\nepsilon_high = 5.0",
            &["cispo_clip_ratio"],
            &["clip_ratio/region_mean"],
        ),
        (
            "sapo",
            "loss_type = \"sapo\"",
            &[],
            &["clip_ratio/region_mean"],
        ),
        (
            "luspo",
            "loss_type = \"luspo\"\nimportance_sampling_level = \"sequence\"",
            &["clip_ratio/region_mean"],
            &[],
        ),
        (
            "top_entropy",
            "top_entropy_quantile = 0.2",
            &["entropy", "entropy/kept_frac"],
            &[],
        ),
        ("delta", "delta = 1.5", &["clip_ratio/region_mean"], &[]),
        ("kl", "beta = 0.04", &["kl"], &[]),
    ];
    for (name, grpo, logged, absent) in cases {
        for seed in [1, 2, 3] {
            let run_name = format!("{name}-{seed}");
            let cfg = config(
                tmp.path(),
                &run_name,
                "max_steps = 120",
                &format!("num_iterations = 2\n{grpo}"),
            );
            let text = std::fs::read_to_string(&cfg)
                .unwrap()
                .replace("seed = 1\n", &format!("seed = {seed}\n"));
            std::fs::write(&cfg, text).unwrap();
            let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{run_name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let run = tmp.path().join(&run_name);
            let reward = metric(&run, "reward"); // once per generation batch
            assert_eq!(reward.len(), 60, "{run_name}");
            let (first, last) = (mean(&reward[..10]), mean(&reward[50..]));
            assert!(
                last > first + 0.06,
                "{run_name}: mean reward did not rise: {first:.3} -> {last:.3}"
            );
            for key in *logged {
                assert!(
                    !metric(&run, key).is_empty(),
                    "{run_name}: {key} not logged"
                );
            }
            for key in *absent {
                assert!(metric(&run, key).is_empty(), "{run_name}: {key} logged");
            }
            if *name == "top_entropy" {
                // 20% of each micro-batch's tokens train (ties and rounding aside).
                let kept = metric(&run, "entropy/kept_frac");
                assert!(kept.iter().all(|&k| (0.15..0.3).contains(&k)), "{kept:?}");
            }
        }
    }
}

/// Dynamic sampling (DAPO) on the sevens task: every trained batch holds only groups whose
/// rewards differ (`frac_reward_zero_std` = 0 unless the round bound forced a top-up), the
/// extra generation is counted, the sampled reward still rises, and a resumed run samples the
/// same extra rounds as a straight one.
#[test]
fn dynamic_sampling_trains_only_informative_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "dyn",
        "max_steps = 60\nsave_every = 30",
        "dynamic_sampling = true\nmax_num_gen_batches = 3",
    );
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("dyn");
    let rounds = metric(&run, "dynamic_sampling/rounds");
    let sampled = metric(&run, "dynamic_sampling/sampled");
    let dropped = metric(&run, "dynamic_sampling/dropped_groups");
    let filled = metric(&run, "dynamic_sampling/filled_groups");
    let zero = metric(&run, "frac_reward_zero_std");
    assert_eq!(rounds.len(), 60);
    for i in 0..60 {
        assert!(
            (1.0..=3.0).contains(&rounds[i]),
            "step {i}: {} rounds",
            rounds[i]
        );
        assert_eq!(sampled[i], 32.0 * rounds[i], "step {i}");
        // Filled groups are the only zero-signal groups trained (4 groups of 8 per step).
        assert_eq!(zero[i], filled[i] / 4.0, "step {i}");
        if rounds[i] > 1.0 {
            assert!(
                dropped[i] + filled[i] > 0.0,
                "step {i}: resampled for nothing"
            );
        }
    }
    assert!(
        rounds.iter().any(|&r| r > 1.0),
        "never resampled: {rounds:?}"
    );
    assert!(zero.iter().filter(|&&z| z == 0.0).count() >= 55, "{zero:?}");
    let reward = metric(&run, "dynamic_sampling/sampled_reward");
    let (first, last) = (mean(&reward[..10]), mean(&reward[50..]));
    assert!(
        last > first + 0.1,
        "sampled reward: {first:.3} -> {last:.3}"
    );

    // Resume from step 30: the same rounds, the same adapters at 60.
    let resumed = tempfile::tempdir().unwrap();
    let run_b = straight_and_resumed(
        resumed.path(),
        "max_steps = 60\nsave_every = 30",
        "dynamic_sampling = true\nmax_num_gen_batches = 3",
        60,
    );
    assert_eq!(rounds, metric(&run_b, "dynamic_sampling/rounds"));
}

/// The adversary's case: no group ever has reward variance (the pattern never matches). Dynamic
/// sampling must not loop: each batch stops at `max_num_gen_batches` rounds, is topped up with
/// left-out groups, and the run finishes.
#[test]
fn dynamic_sampling_is_bounded_when_no_group_has_signal() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "flat",
        "max_steps = 3",
        "dynamic_sampling = true\nmax_num_gen_batches = 2",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("pattern = \"(7)\"", "pattern = \"(QQQQ)\"");
    std::fs::write(&cfg, text).unwrap();
    let out = ferrotune(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("flat");
    assert_eq!(metric(&run, "dynamic_sampling/rounds"), vec![2.0; 3]);
    assert_eq!(metric(&run, "dynamic_sampling/sampled"), vec![64.0; 3]);
    assert_eq!(metric(&run, "dynamic_sampling/filled_groups"), vec![4.0; 3]);
    assert_eq!(
        metric(&run, "dynamic_sampling/dropped_groups"),
        vec![4.0; 3]
    );
    assert_eq!(metric(&run, "frac_reward_zero_std"), vec![1.0; 3]);
}

/// Multi-turn tool use through the CLI. The tiny model first learns the call format by SFT on
/// transcripts (user → `<tool_call>` → tool reply → answer; its template has no tool syntax,
/// so calls are reply text and replies are `tool` turns); then GRPO with `[[grpo.tools]]`:
/// calls are parsed, run and answered inside the rollout, the next turn is generated after
/// the reply, and the sampler's log-probs still equal the trainer's on every model token
/// (a tool token left in the loss mask would put |ratio − 1| near 1: its behaviour log-prob
/// is 0). Tools that do not exist, crash or time out are answered with an error reply, counted
/// in `tools/failure_frequency`, and the run goes on. A resumed tool run equals a straight one.
#[test]
fn tool_calls_run_inside_the_rollout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut sft_rows, mut prompts) = (String::new(), String::new());
    for i in 0..64u32 {
        let (a, b) = (i % 10, (i * 7 + 3) % 10);
        let call = format!(
            "<tool_call>\n{{\"name\": \"calculator\", \"arguments\": {{\"expression\": \"{a} + {b}\"}}}}\n</tool_call>"
        );
        let row = serde_json::json!({"messages": [
            {"role": "user", "content": format!("What is {a} + {b}?")},
            {"role": "assistant", "content": call},
            {"role": "tool", "content": (a + b).to_string()},
            {"role": "assistant", "content": format!("The answer is {}.", a + b)},
        ]});
        sft_rows.push_str(&format!("{row}\n"));
        let p = serde_json::json!({"prompt": [{"role": "user", "content": format!("What is {b} + {a}?")}], "answer": (a + b).to_string()});
        prompts.push_str(&format!("{p}\n"));
    }
    std::fs::write(dir.join("sft.jsonl"), sft_rows).unwrap();
    std::fs::write(dir.join("prompts.jsonl"), &prompts).unwrap();
    let model = root().join("fixtures/tiny-chat/model");
    let sft = format!(
        "[model]\npath = \"{m}\"\n[lora]\nr = 16\nlora_alpha = 32\ntarget_modules = \"all-linear\"\n[data]\ntrain = \"{d}/sft.jsonl\"\nmax_seq_len = 128\n[optim]\nlearning_rate = 1e-2\nlr_scheduler_type = \"constant\"\n[run]\noutput_dir = \"{d}/sft\"\nmax_steps = 300\nbatch_size = 8\nlog_every = 50\n[sft]\n",
        m = model.display(),
        d = dir.display()
    );
    std::fs::write(dir.join("sft.toml"), sft).unwrap();
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(ferrotune(&[
        "train",
        "--config",
        dir.join("sft.toml").to_str().unwrap(),
    ]));
    let merged = dir.join("merged");
    ok(ferrotune(&[
        "export",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        dir.join("sft/checkpoints/step-300").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    // `eval`: the prompts are also the eval set, evaluated at the start and the end.
    let grpo_with = |name: &str, tools: &str, steps: usize, eval: bool| -> PathBuf {
        let eval = if eval {
            format!("eval = \"{}/prompts.jsonl\"\n", dir.display())
        } else {
            String::new()
        };
        let text = format!(
            "[model]\npath = \"{m}\"\n[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = \"all-linear\"\n[data]\ntrain = \"{d}/prompts.jsonl\"\n{eval}[optim]\nlearning_rate = 1e-2\nlr_scheduler_type = \"constant\"\n[run]\noutput_dir = \"{d}/{name}\"\nbatch_size = 8\nlog_every = 1\nseed = 1\nmax_steps = {steps}\nsave_every = 2\neval_every = {steps}\n[grpo]\nnum_generations = 8\nmax_completion_len = 256\nnum_iterations = 2\ntemperature = 0.05\nrewards = [{{ name = \"answer_match\", extract = \"last_number\" }}]\nmax_tool_calling_iterations = 2\n{tools}\n",
            m = merged.display(),
            d = dir.display()
        );
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, text).unwrap();
        ok(ferrotune(&["train", "--config", cfg.to_str().unwrap()]));
        dir.join(name)
    };
    let grpo = |name: &str, tools: &str, steps: usize| grpo_with(name, tools, steps, false);
    let tool_turns = |run: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(run.join("completions.jsonl")).unwrap();
        text.lines()
            .flat_map(|l| {
                let rec: serde_json::Value = serde_json::from_str(l).unwrap();
                rec["turns"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t["role"] == "tool")
                    .map(|t| t["text"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };

    // The calculator answers; the first iteration of each batch is on-policy to rounding.
    let run = grpo_with("calc", "[[grpo.tools]]\nname = \"calculator\"", 4, true);
    let calls = metric(&run, "tools/call_frequency");
    assert!(
        calls.iter().all(|&c| c > 0.5),
        "calls per completion: {calls:?}"
    );
    let fails = metric(&run, "tools/failure_frequency");
    assert!(fails.iter().all(|&f| f < 0.5), "failures: {fails:?}");
    // After the reply the model answers: one call per completion is not a loop (a limit of
    // two rounds leaves no call unanswered), and no tool_loop finding is raised.
    let unanswered = metric(&run, "tools/unanswered_frac");
    assert!(unanswered.iter().all(|&u| u < 0.5), "{unanswered:?}");
    let health = std::fs::read_to_string(run.join("health.jsonl")).unwrap();
    assert!(!health.contains("tool_loop"), "{health}");
    let dev = metric_at(&run, "ratio/max_abs_dev");
    for (step, d) in &dev {
        if step % 2 == 1 {
            assert!(
                *d < 1e-3,
                "step {step}: |ratio - 1| = {d} on a first iteration"
            );
        }
    }
    let replies = tool_turns(&run);
    assert!(!replies.is_empty(), "no tool turns in completions.jsonl");
    // `ferrotune eval --config` runs the same tool loop as the run's own eval: on the last
    // adapter it calls the tool and scores what the run scored at its last step.
    let report = dir.join("eval.json");
    ok(ferrotune(&[
        "eval",
        "--model",
        merged.to_str().unwrap(),
        "--adapter",
        run.join("checkpoints/step-4").to_str().unwrap(),
        "--config",
        dir.join("calc.toml").to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
        "--completions",
        dir.join("eval-completions.jsonl").to_str().unwrap(),
    ]));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let calls = r["task"]["tool_calls_per_completion"].as_f64().unwrap();
    assert!(calls > 0.5, "eval: {calls} calls per completion");
    let acc = r["task"]["accuracy"].as_f64().unwrap();
    let trained = metric(&run, "eval/rewards/answer_match/mean");
    assert_eq!(trained.len(), 2, "{trained:?}");
    assert!(
        (acc - trained[1]).abs() < 1e-9,
        "eval accuracy {acc}, the run's last eval {trained:?}"
    );
    // --completions writes each of them with its turns; their rewards make the accuracy.
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("eval-completions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 64);
    assert!(recs.iter().all(|r| r["turns"]
        .as_array()
        .is_some_and(|t| t.iter().any(|x| x["role"] == "tool"))));
    let right = recs
        .iter()
        .filter(|r| r["rewards"]["answer_match"].as_f64() == Some(1.0))
        .count();
    assert_eq!(right as f64 / 64.0, acc);
    // `ferrotune compare` ranks the run's checkpoints the same way.
    ok(ferrotune(&["compare", run.to_str().unwrap()]));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("compare.json")).unwrap()).unwrap();
    let last = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "step-4")
        .expect("step-4 in compare.json");
    assert_eq!(last["accuracy"].as_f64(), Some(acc), "{rows}");
    // Resume is exact with tools too: the same calls, replies and adapters as the straight run.
    let run_b = grpo_with("calc-b", "[[grpo.tools]]\nname = \"calculator\"", 4, true);
    std::fs::remove_dir_all(run_b.join("checkpoints/step-4")).unwrap();
    ok(ferrotune(&["train", "--resume", run_b.to_str().unwrap()]));
    same_checkpoint(&run, &run_b, 4);
    assert_eq!(tool_turns(&run), tool_turns(&run_b));
    // A reply is the calculator's number inside the template's `tool` turn.
    let numeric = replies
        .iter()
        .filter(|r| {
            r.trim()
                .trim_start_matches("tool")
                .trim()
                .trim_end_matches("assistant")
                .trim()
                .parse::<f64>()
                .is_ok()
        })
        .count();
    assert!(numeric * 2 > replies.len(), "{replies:?}");

    // A tool the model does not call by name, one that crashes, one that hangs: error replies.
    let crash = "[[grpo.tools]]\nname = \"calculator\"\ncmd = [\"python3\", \"-c\", \"import sys; sys.exit(3)\"]\ndescription = \"d\"\nparameters = { type = \"object\" }";
    let hang = "[[grpo.tools]]\nname = \"calculator\"\ncmd = [\"python3\", \"-c\", \"import time; time.sleep(30)\"]\ndescription = \"d\"\nparameters = { type = \"object\" }\ntimeout_s = 0.5";
    let other = "[[grpo.tools]]\nname = \"search\"\ncmd = [\"python3\", \"-c\", \"print(1)\"]\ndescription = \"d\"\nparameters = { type = \"object\" }";
    for (name, tools, needle) in [
        ("crash", crash, "failed"),
        ("hang", hang, "Timeout"),
        ("other", other, "unknown tool `calculator`"),
    ] {
        let run = grpo(name, tools, 1);
        let fails = metric(&run, "tools/failure_frequency");
        assert_eq!(fails, vec![1.0], "{name}");
        let replies = tool_turns(&run);
        assert!(!replies.is_empty(), "{name}: no tool turns");
        assert!(
            replies
                .iter()
                .all(|r| r.contains("error") && r.contains(needle)),
            "{name}: {replies:?}"
        );
    }
}

/// `data gen arithmetic --chat --tool-calls` writes SFT transcripts whose calls the rollout
/// parses, whose tool reply is what the calculator returns for the call, and whose final turn
/// tags that answer; the SFT path reads them (user → call → tool → answer).
#[test]
fn calculator_transcripts_from_data_gen_are_consistent() {
    use ferrotune_rewards::tools::{ToolSet, ToolSpec};
    use ferrotune_tokenize::tools::ToolCallFormat;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("calls.jsonl");
    let o = ferrotune(&[
        "data",
        "gen",
        "arithmetic",
        "--n",
        "40",
        "--seed",
        "3",
        "--digits",
        "3..4",
        "--ops",
        "*-",
        "--chat",
        "--system",
        "Use the calculator.",
        "--tool-calls",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let calc = ToolSet::from_specs(&[toml::from_str::<ToolSpec>("name = \"calculator\"").unwrap()])
        .unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 40);
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let m = row["messages"].as_array().unwrap();
        let roles: Vec<&str> = m.iter().map(|x| x["role"].as_str().unwrap()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "tool", "assistant"],
            "{line}"
        );
        let parsed = ToolCallFormat::Hermes.parse(m[2]["content"].as_str().unwrap());
        assert_eq!(parsed.calls.len(), 1, "{line}");
        let call = parsed.calls[0].clone().unwrap();
        assert_eq!(call.function.name, "calculator");
        let reply = calc.call("calculator", &call.function.arguments.0).unwrap();
        assert_eq!(m[3]["content"], reply.as_str(), "{line}");
        assert_eq!(
            m[4]["content"],
            format!("The answer is <answer>{reply}</answer>.").as_str()
        );
    }
    // Tool transcripts are chat rows: without --chat the flag is refused.
    let o = ferrotune(&[
        "data",
        "gen",
        "arithmetic",
        "--n",
        "4",
        "--tool-calls",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
}
