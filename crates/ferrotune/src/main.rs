//! The `ferrotune` binary: parse the command line, run the one command it names (the `cmd/`
//! files hold each), and turn any error into one line and a non-zero exit code. Holds no model or
//! training math.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use ferrotune::config::{self, RunConfig};

mod cmd;
use cmd::args::{Cli, Cmd, DataCmd};
use cmd::{evaluate, gen, infer, train};

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => infer::generate(a)?,
        Cmd::Perplexity(a) => infer::perplexity(a)?,
        Cmd::Tokenize(a) => infer::tokenize(a)?,
        Cmd::Export(a) => infer::export(a)?,
        Cmd::Bench { cmd } => infer::bench(cmd)?,
        Cmd::Train(a) => train::train(a)?,
        Cmd::Pretrain { config, sets } => train::pretrain(&config, &sets)?,
        Cmd::Eval(a) => evaluate::eval(a)?,
        Cmd::Compare(a) => evaluate::compare(a)?,
        Cmd::Config { explain, check } => {
            if let Some(c) = check {
                let cfg = RunConfig::load(&c, &[])?;
                println!("{}: ok", c.display());
                print!("{}", cfg.to_toml());
            } else if explain {
                print!("{}", config::explain());
            } else {
                bail!("give --explain or --check FILE");
            }
        }
        Cmd::Data {
            cmd: DataCmd::Gen { kind },
        } => gen::gen_data(kind)?,
        Cmd::Distill {
            cmd:
                ferrotune::distill_run::DistillCmd::CacheTeacher {
                    config,
                    sets,
                    out,
                    batch_size,
                },
        } => {
            let cfg = RunConfig::load(&config, &sets)?;
            let path = ferrotune::distill_run::cache_teacher(&cfg, out.as_deref(), batch_size)?;
            println!("wrote {}", path.display());
        }
        Cmd::Rewards => {
            println!("reward functions for grpo.rewards = [{{ name = \"...\", weight = 1.0, ...params }}]:\n");
            for (name, help) in ferrotune_rewards::available() {
                println!("{name:<18} {help}");
            }
            println!("{:<18} {}", "model", ferrotune::model_reward::HELP);
        }
        Cmd::Demo {
            out,
            quick,
            seed,
            sets,
        } => {
            ferrotune::demo::run_demo(&ferrotune::demo::DemoOptions {
                out,
                quick,
                seed,
                grpo_sets: sets,
            })?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    ferrotune_nn::init_cpu_threads();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain, skipping causes a message already quotes.
            let mut line = String::new();
            for cause in e.chain() {
                let c = cause.to_string();
                if !line.contains(&c) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&c);
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
