//! `ferrotune data gen ...`: synthetic datasets for verifiable domains (arithmetic, word
//! problems, preference pairs) and completions sampled from a model.

use anyhow::{Context, Result};

use super::args::GenKind;

/// `ferrotune data gen ...`
pub fn gen_data(kind: GenKind) -> Result<()> {
    use ferrotune_data::{
        arithmetic_excluding, parse_digits, parse_ops, prompt_examples, read_rows,
        word_problems_excluding, write_jsonl, ArithmeticSpec, Example, PromptFormat, Segment,
        WordSpec,
    };
    let common = match &kind {
        GenKind::Arithmetic { common, .. }
        | GenKind::WordProblems { common }
        | GenKind::Preferences { common, .. } => common.clone(),
        GenKind::FromModel(a) => {
            let n = ferrotune::distill_run::gen_from_model(a)?;
            println!("wrote {n} completions to {}", a.out.display());
            return Ok(());
        }
    };
    // Prompts to leave out, as the generator writes them (the user turn for chat files).
    let mut exclude = std::collections::HashSet::new();
    for p in &common.exclude {
        for ex in prompt_examples(&read_rows(p)?, p)? {
            if let Example::Prompt { prompt, .. } = ex {
                match prompt {
                    Segment::Text(t) => exclude.insert(t),
                    Segment::Chat(m) => exclude.insert(
                        m.iter()
                            .rev()
                            .find(|m| m.role == "user")
                            .map(|m| m.content.clone())
                            .unwrap_or_default(),
                    ),
                };
            }
        }
    }
    let problems = match &kind {
        GenKind::WordProblems { .. } => word_problems_excluding(
            &WordSpec {
                n: common.n,
                seed: common.seed,
            },
            &exclude,
        )?,
        // Preference pairs are built on arithmetic problems.
        GenKind::Arithmetic { digits, ops, .. } | GenKind::Preferences { digits, ops, .. } => {
            let spec = ArithmeticSpec {
                n: common.n,
                seed: common.seed,
                digits: parse_digits(digits).with_context(|| "--digits")?,
                ops: parse_ops(ops).with_context(|| "--ops")?,
            };
            arithmetic_excluding(&spec, &exclude)?
        }
        GenKind::FromModel(_) => unreachable!("returned above"),
    };
    let format = if common.chat {
        PromptFormat::Chat {
            system: common.system.clone(),
        }
    } else {
        PromptFormat::Text
    };
    if let Some(dir) = common.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    if let GenKind::Preferences { rejected, .. } = &kind {
        let kind: ferrotune_data::RejectedKind = rejected.parse().with_context(|| "--rejected")?;
        let pairs = ferrotune_data::preference_pairs(&problems, kind, common.seed);
        ferrotune_data::write_preference_jsonl(&pairs, &common.out, &format)?;
        println!(
            "wrote {} preference pairs to {}",
            pairs.len(),
            common.out.display()
        );
        return Ok(());
    }
    if let GenKind::Arithmetic {
        tool_calls: true, ..
    } = &kind
    {
        ferrotune_data::write_tool_transcripts(&problems, &common.out, common.system.as_deref())?;
        println!(
            "wrote {} calculator transcripts to {}",
            problems.len(),
            common.out.display()
        );
        return Ok(());
    }
    if let GenKind::Arithmetic { sft: true, .. } = &kind {
        ferrotune_data::write_sft_conversations(&problems, &common.out, common.system.as_deref())?;
        println!(
            "wrote {} SFT conversations to {}",
            problems.len(),
            common.out.display()
        );
        return Ok(());
    }
    write_jsonl(&problems, &common.out, &format)?;
    println!(
        "wrote {} problems to {}",
        problems.len(),
        common.out.display()
    );
    Ok(())
}
