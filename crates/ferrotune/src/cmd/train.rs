//! `ferrotune train` and `ferrotune pretrain`: load the run config, hand it to the method's
//! runner (one per [`Method`]), and print the one-line result of the run.

use anyhow::{bail, Result};
use ferrotune::config::{Method, RunConfig};
use ferrotune_train::distill::DistillSummary;
use ferrotune_train::dpo::DpoSummary;
use ferrotune_train::grpo::GrpoSummary;
use ferrotune_train::ppo::PpoSummary;
use ferrotune_train::reward_train::RmSummary;
use ferrotune_train::sft::SftSummary;
use ferrotune_train::trainer::{FirstLast, Outcome};

use super::args::TrainArgs;

/// A loss (or score) to `digits` places, `-` when there is none.
fn num(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or("-".into())
}

/// `first -> last` of a per-step number.
fn change(x: &FirstLast, digits: usize) -> String {
    format!("{} -> {}", num(x.first, digits), num(x.last, digits))
}

/// `done: N steps, <what>, checkpoint PATH`: every method's one-line result.
fn done(run: &Outcome, what: String) -> String {
    let ck = run
        .last_checkpoint
        .as_ref()
        .map(|p| format!(", checkpoint {}", p.display()))
        .unwrap_or_default();
    format!("done: {} steps, {what}{ck}", run.steps)
}

/// `, eval <name> first -> last[, <extra>]` when the run evaluated.
fn eval_change<E>(
    first: &Option<E>,
    last: &Option<E>,
    name: &str,
    f: impl Fn(&E) -> f64,
) -> String {
    match last {
        Some(e) => format!(
            ", eval {name} {} -> {:.3}",
            first
                .as_ref()
                .map_or("-".into(), |x| format!("{:.3}", f(x))),
            f(e)
        ),
        None => String::new(),
    }
}
pub fn train(a: TrainArgs) -> Result<()> {
    let TrainArgs {
        config,
        sets,
        resume,
        overwrite,
    } = a;
    let cfg = match (&config, &resume) {
        (Some(c), _) => RunConfig::load(c, &sets)?,
        (None, Some(r)) => {
            // Not a run folder: say so rather than "config.toml: no such file".
            ferrotune_ckpt::RunDir::open(r)?;
            RunConfig::load(&r.join("config.toml"), &sets)?
        }
        (None, None) => bail!("give --config FILE or --resume RUN_DIR"),
    };
    if let Some(r) = &resume {
        if config.is_some() && r != &cfg.run.output_dir {
            bail!(
                "--resume {} differs from run.output_dir {} in the config",
                r.display(),
                cfg.run.output_dir.display()
            );
        }
    }
    let resume = resume.is_some();
    let line = match cfg.method() {
        Method::Sft => sft_line(&ferrotune::sft_run::run_sft(&cfg, resume, overwrite)?),
        Method::Grpo => grpo_line(&ferrotune::grpo_run::run_grpo(&cfg, resume, overwrite)?),
        Method::Dpo => dpo_line(&ferrotune::dpo_run::run_dpo(&cfg, resume, overwrite)?),
        Method::Ppo => ppo_line(&ferrotune::ppo_run::run_ppo(&cfg, resume, overwrite)?),
        Method::Distill => distill_line(&ferrotune::distill_run::run_distill(
            &cfg, resume, overwrite,
        )?),
        Method::RewardModel => rm_line(&ferrotune::rm_run::run_reward_model(
            &cfg, resume, overwrite,
        )?),
    };
    println!("{line}");
    Ok(())
}

fn sft_line(s: &SftSummary) -> String {
    let eval = s
        .last_eval_loss
        .map(|l| format!(", eval loss {l:.4}"))
        .unwrap_or_default();
    done(&s.run, format!("loss {}{eval}", change(&s.loss, 4)))
}

fn grpo_line(s: &GrpoSummary) -> String {
    let eval = s
        .eval_reward
        .last
        .map(|e| format!(", eval reward {} -> {e:.3}", num(s.eval_reward.first, 3)))
        .unwrap_or_default();
    done(
        &s.run,
        format!(
            "mean reward {}{eval}, max |ratio - 1| on first iterations {:.1e}, {} health findings",
            change(&s.reward, 3),
            s.max_first_ratio_dev,
            s.findings.len()
        ),
    )
}

fn dpo_line(s: &DpoSummary) -> String {
    let acc = eval_change(&s.first_eval, &s.last_eval, "reward accuracy", |e| {
        e.rewards_accuracies
    });
    let margin = s
        .last_eval
        .as_ref()
        .map(|e| format!(", eval margin {:.4}", e.rewards_margins))
        .unwrap_or_default();
    done(&s.run, format!("loss {}{acc}{margin}", change(&s.loss, 4)))
}

fn ppo_line(s: &PpoSummary) -> String {
    done(
        &s.run,
        format!(
            "mean score {}, KL {} (max {:.3})",
            change(&s.score, 3),
            num(s.last_kl, 3),
            s.max_kl
        ),
    )
}

fn distill_line(s: &DistillSummary) -> String {
    let kl = s
        .last_eval
        .map(|e| {
            format!(
                ", eval forward KL {} -> {:.4}",
                num(s.first_eval.map(|x| x.forward_kl), 4),
                e.forward_kl
            )
        })
        .unwrap_or_default();
    done(
        &s.run,
        format!(
            "loss {}, distill loss {}{kl}, {} on-policy micro-batches",
            change(&s.loss, 4),
            change(&s.distill_loss, 4),
            s.on_policy_batches
        ),
    )
}

fn rm_line(s: &RmSummary) -> String {
    let acc = eval_change(&s.first_eval, &s.last_eval, "accuracy", |e| e.accuracy);
    let margin = s
        .last_eval
        .as_ref()
        .map(|e| format!(", eval margin {:.4}", e.margin))
        .unwrap_or_default();
    let export = s
        .export
        .as_ref()
        .map(|p| format!(", reward model {}", p.display()))
        .unwrap_or_default();
    // The reward model's folder comes after the checkpoint, as before.
    format!(
        "{}{export}",
        done(&s.run, format!("loss {}{acc}{margin}", change(&s.loss, 4)))
    )
}

/// `ferrotune pretrain --config FILE`.
pub fn pretrain(config: &std::path::Path, sets: &[String]) -> Result<()> {
    let cfg = ferrotune::pretrain_run::PretrainConfig::load(config, sets)?;
    let s = ferrotune::pretrain_run::pretrain(&cfg, false)?;
    println!(
        "done: {} steps in {:.0}s, loss {} -> {}{}, wrote {}",
        s.sft.run.steps,
        s.seconds,
        num(s.sft.loss.first, 4),
        num(s.sft.loss.last, 4),
        s.sft
            .last_eval_loss
            .map(|l| format!(", eval loss {l:.4}"))
            .unwrap_or_default(),
        s.model_dir.display()
    );
    Ok(())
}
