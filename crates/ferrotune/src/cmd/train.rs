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

use super::args::TrainArgs;

/// A loss (or score) to `digits` places, `-` when there is none.
fn num(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or("-".into())
}

/// `, checkpoint PATH` when one was written.
fn checkpoint(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| format!(", checkpoint {}", p.display()))
        .unwrap_or_default()
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
    format!(
        "done: {} steps, loss {} -> {}{}{}",
        s.steps,
        num(s.first_loss, 4),
        num(s.last_loss, 4),
        s.last_eval_loss
            .map(|l| format!(", eval loss {l:.4}"))
            .unwrap_or_default(),
        checkpoint(&s.last_checkpoint)
    )
}

fn grpo_line(s: &GrpoSummary) -> String {
    format!(
        "done: {} steps, mean reward {} -> {}{}, max |ratio - 1| on first iterations {:.1e}, {} health findings{}",
        s.steps,
        num(s.first_reward, 3),
        num(s.last_reward, 3),
        s.last_eval_reward
            .map(|e| format!(", eval reward {} -> {e:.3}", num(s.first_eval_reward, 3)))
            .unwrap_or_default(),
        s.max_first_ratio_dev,
        s.findings.len(),
        checkpoint(&s.last_checkpoint)
    )
}

fn dpo_line(s: &DpoSummary) -> String {
    format!(
        "done: {} steps, loss {} -> {}{}{}",
        s.steps,
        num(s.first_loss, 4),
        num(s.last_loss, 4),
        s.last_eval
            .as_ref()
            .map(|e| format!(
                ", eval reward accuracy {} -> {:.3}, eval margin {:.4}",
                s.first_eval
                    .as_ref()
                    .map_or("-".into(), |f| format!("{:.3}", f.rewards_accuracies)),
                e.rewards_accuracies,
                e.rewards_margins
            ))
            .unwrap_or_default(),
        checkpoint(&s.last_checkpoint)
    )
}

fn ppo_line(s: &PpoSummary) -> String {
    format!(
        "done: {} steps, mean score {} -> {}, KL {} (max {:.3}){}",
        s.steps,
        num(s.first_score, 3),
        num(s.last_score, 3),
        num(s.last_kl, 3),
        s.max_kl,
        checkpoint(&s.last_checkpoint)
    )
}

fn distill_line(s: &DistillSummary) -> String {
    format!(
        "done: {} steps, loss {} -> {}, distill loss {} -> {}{}, {} on-policy micro-batches{}",
        s.steps,
        num(s.first_loss, 4),
        num(s.last_loss, 4),
        num(s.first_distill_loss, 4),
        num(s.last_distill_loss, 4),
        s.last_eval
            .map(|e| format!(
                ", eval forward KL {} -> {:.4}",
                num(s.first_eval.map(|x| x.forward_kl), 4),
                e.forward_kl
            ))
            .unwrap_or_default(),
        s.on_policy_batches,
        checkpoint(&s.last_checkpoint)
    )
}

fn rm_line(s: &RmSummary) -> String {
    format!(
        "done: {} steps, loss {} -> {}{}{}{}",
        s.steps,
        num(s.first_loss, 4),
        num(s.last_loss, 4),
        s.last_eval
            .as_ref()
            .map(|e| format!(
                ", eval accuracy {} -> {:.3}, eval margin {:.4}",
                s.first_eval
                    .as_ref()
                    .map_or("-".into(), |f| format!("{:.3}", f.accuracy)),
                e.accuracy,
                e.margin
            ))
            .unwrap_or_default(),
        checkpoint(&s.last_checkpoint),
        s.export
            .as_ref()
            .map(|p| format!(", reward model {}", p.display()))
            .unwrap_or_default()
    )
}

/// `ferrotune pretrain --config FILE`.
pub fn pretrain(config: &std::path::Path, sets: &[String]) -> Result<()> {
    let cfg = ferrotune::pretrain_run::PretrainConfig::load(config, sets)?;
    let s = ferrotune::pretrain_run::pretrain(&cfg, false)?;
    println!(
        "done: {} steps in {:.0}s, loss {} -> {}{}, wrote {}",
        s.sft.steps,
        s.seconds,
        num(s.sft.first_loss, 4),
        num(s.sft.last_loss, 4),
        s.sft
            .last_eval_loss
            .map(|l| format!(", eval loss {l:.4}"))
            .unwrap_or_default(),
        s.model_dir.display()
    );
    Ok(())
}
