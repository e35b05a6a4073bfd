//! `ferrotune eval` (accuracy / pass@k with the training rewards, perplexity) and `ferrotune
//! compare` (rank a run's checkpoints, flag perplexity regressions).

use anyhow::{bail, Context, Result};
use ferrotune::config::RunConfig;

use super::args::{CompareArgs, EvalArgs};
use super::infer::load;

pub fn eval(a: EvalArgs) -> Result<()> {
    let EvalArgs {
        model,
        task,
        rewards,
        config,
        samples,
        k,
        temperature,
        max_new_tokens,
        stop,
        max_prompt_len,
        seed,
        text,
        json,
        completions,
    } = a;
    use ferrotune::grpo_run::{reward_specs, role_of, task_prompts};
    use ferrotune::task_eval::{eval_task, perplexity_of_file, TaskOptions};
    let run_cfg = config
        .as_ref()
        .map(|c| RunConfig::load(c, &[]))
        .transpose()?;
    let grpo = run_cfg.as_ref().and_then(|c| c.grpo.clone());
    if run_cfg.is_some() && grpo.is_none() {
        bail!("--config: not a GRPO config (no [grpo] section with rewards)");
    }
    let task = task.or_else(|| run_cfg.as_ref().and_then(|c| c.data.eval.clone()));
    if task.is_none() && text.is_none() {
        bail!("give --task FILE (with --rewards or --config) and/or --text FILE");
    }
    if task.is_none() && completions.is_some() {
        bail!("--completions writes a task's completions: give --task FILE (or --config with data.eval)");
    }
    let lm = load(&model)?;
    let mut report = serde_json::Map::new();
    if let Some(task) = &task {
        let specs: Vec<ferrotune_rewards::RewardSpec> = match (&rewards, &grpo) {
            (Some(r), _) => parse_rewards(r)?,
            (None, Some(g)) => reward_specs(g)?,
            (None, None) => {
                bail!("--task needs --rewards '[{{name=\"answer_match\"}}]' or --config RUN.toml")
            }
        };
        let set = ferrotune::model_reward::reward_set(&specs, &lm.device, "rewards")?;
        let roles: Vec<_> = specs.iter().map(|s| role_of(&s.name)).collect();
        let prompt_len = grpo.as_ref().map_or(max_prompt_len, |g| g.max_prompt_len);
        let (items, tools) = task_prompts(grpo.as_ref(), task, &lm, prompt_len)?;
        let opts = TaskOptions {
            samples,
            temperature,
            top_p: None,
            max_new_tokens: max_new_tokens
                .or(grpo.as_ref().map(|g| g.max_completion_len))
                .unwrap_or(256),
            batch_size: 16,
            stop: if stop.is_empty() {
                grpo.as_ref().map(|g| g.stop.clone()).unwrap_or_default()
            } else {
                stop
            },
            seed,
            ks: k,
            keep_completions: completions.is_some(),
        };
        let r = eval_task(&lm, &items, &set, &roles, tools.as_ref(), &opts)?;
        println!(
            "{}: {} prompts x {} samples in {:.1}s",
            task.display(),
            r.prompts,
            r.samples_per_prompt,
            r.seconds
        );
        println!("  mean reward      {:.4}", r.mean_reward);
        for (l, m) in &r.rewards {
            println!("  {l:<16} {m:.4}");
        }
        if let Some(a) = r.accuracy {
            println!("  accuracy         {a:.4}");
        }
        if let Some(f) = r.format_rate {
            println!("  format rate      {f:.4}");
        }
        for (k, p) in &r.pass_at_k {
            println!("  pass@{k:<11} {p:.4}");
        }
        if let (Some(c), Some(f)) = (r.tool_calls_per_completion, r.tool_failure_frequency) {
            println!(
                "  tool calls       {c:.4} per completion ({:.0}% failed)",
                100.0 * f
            );
        }
        println!(
            "  mean length      {:.1} tokens ({:.0}% truncated)",
            r.mean_length,
            100.0 * r.truncated_fraction
        );
        report.insert("task".into(), serde_json::to_value(&r)?);
        if let Some(path) = &completions {
            let lines: String = r.completions.iter().map(|c| format!("{c}\n")).collect();
            std::fs::write(path, lines)
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
    }
    if let Some(t) = &text {
        let p = perplexity_of_file(&lm, t, None, None)?;
        println!(
            "{}: perplexity {:.4} (mean NLL {:.6} over {} tokens)",
            t.display(),
            p.ppl(),
            p.mean_nll(),
            p.tokens
        );
        report.insert(
            "perplexity".into(),
            serde_json::json!({"ppl": p.ppl(), "mean_nll": p.mean_nll(), "tokens": p.tokens}),
        );
    }
    if let Some(j) = json {
        std::fs::write(&j, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("{}: cannot write", j.display()))?;
    }
    Ok(())
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let (run, max_ppl_ratio) = (a.run.clone(), a.max_ppl_ratio);
    let opts = ferrotune::compare::CompareOptions {
        run: a.run,
        task: a.task,
        rewards: a.rewards.map(|r| parse_rewards(&r)).transpose()?,
        forget_set: a.forget_set,
        max_ppl_ratio: a.max_ppl_ratio,
        first_round: a.first_round,
        max_new_tokens: a.max_new_tokens,
    };
    let rows = ferrotune::compare::compare(&opts)?;
    print!("{}", ferrotune::compare::table(&rows, max_ppl_ratio));
    let mut pts: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.step? as f64, r.mean_reward)))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let plot = run.join("plots/compare.png");
    ferrotune_report::plot_series_labeled(
        &plot,
        "checkpoints: mean reward on the eval set",
        "step",
        "mean reward",
        &[("mean reward", pts)],
    )?;
    std::fs::write(
        run.join("compare.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    println!(
        "wrote {} and {}",
        plot.display(),
        run.join("compare.json").display()
    );
    Ok(())
}

/// `--rewards '[{name="answer_match"}, ...]'` → specs (errors name the entry).
pub fn parse_rewards(r: &str) -> Result<Vec<ferrotune_rewards::RewardSpec>> {
    let t: toml::Table = toml::from_str(&format!("r = {r}"))
        .map_err(|e| anyhow::anyhow!("--rewards: {}", e.to_string().trim()))?;
    let arr = t
        .get("r")
        .and_then(|v| v.as_array())
        .cloned()
        .context("--rewards: expected a TOML array of tables")?;
    arr.into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde::Deserialize::deserialize(v).map_err(|e| anyhow::anyhow!("--rewards[{i}]: {e}"))
        })
        .collect()
}
