//! The inference commands: `generate` (plain or speculative), `perplexity`, `export`, and
//! `bench`; and loading a model from `--model/--adapter/--device/--dtype`.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferrotune::lm::{parse_device, parse_dtype, Lm};
use ferrotune::speculative_run;
use ferrotune_generate::speculative::{speculative_generate, SpeculativeOptions};
use ferrotune_generate::{GenerateOptions, SamplingParams};
use ferrotune_models::LoadOptions;
use ferrotune_nn::Mode;
use ferrotune_tokenize::Message;

use super::args::{BenchCmd, ExportArgs, GenerateArgs, ModelArgs, PerplexityArgs, TokenizeArgs};

pub fn load_options(m: &ModelArgs) -> Result<LoadOptions> {
    Ok(LoadOptions {
        dtype: parse_dtype(&m.dtype)?,
        device: parse_device(&m.device)?,
        lora: None,
        trainable_base: false,
    })
}

pub fn load(m: &ModelArgs) -> Result<Lm> {
    let mut lm = Lm::load_with(&m.model, m.adapter.as_deref(), &load_options(m)?)?;
    lm.set_chat_template_file(m.chat_template.as_deref())?;
    Ok(lm)
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let GenerateArgs {
        model,
        prompt,
        chat,
        system,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
        draft_model,
        draft_tokens,
    } = a;
    if max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let sampling = SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
    };
    sampling
        .check()
        .map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
    let lm = load(&model)?;
    let ids = if chat {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(Message::new("system", &s));
        }
        msgs.push(Message::new("user", &prompt));
        lm.tokenizer.render(&msgs, true)?.ids
    } else {
        lm.tokenizer.encode(&prompt, true)?
    };
    let opts = GenerateOptions {
        sampling,
        max_new_tokens,
        eos_ids: lm.eos_ids(),
        pad_id: lm.pad_id(),
        mode: Mode::EVAL,
    };
    let tok = &lm.tokenizer;
    let stop_rule = |_: usize, ids: &[u32]| {
        !stop.is_empty()
            && tok
                .decode(ids, true)
                .map(|t| stop.iter().any(|s| t.contains(s.as_str())))
                .unwrap_or(false)
    };
    if let Some(draft) = draft_model {
        let d = speculative_run::load_draft(&lm, &model.model, &draft, &load_options(&model)?)?;
        let spec = SpeculativeOptions {
            sampling: opts.sampling.clone(),
            max_new_tokens,
            eos_ids: opts.eos_ids.clone(),
            num_draft_tokens: draft_tokens,
            mode: Mode::EVAL,
        };
        let out = speculative_generate(
            lm.model.as_ref(),
            d.model.as_ref(),
            &ids,
            &spec,
            &|ids: &[u32]| stop_rule(0, ids),
            &lm.device,
        )?;
        println!("{}", lm.tokenizer.decode(&out.generation.ids, true)?);
        std::io::stdout().flush().ok();
        eprintln!("{}", speculative_run::stats_line(&out.stats));
        return Ok(());
    }
    let t = Instant::now();
    let gens =
        ferrotune_generate::generate(lm.model.as_ref(), &[ids], &opts, &stop_rule, &lm.device)?;
    let secs = t.elapsed().as_secs_f64();
    let g = &gens[0];
    let text = lm.tokenizer.decode(&g.ids, true)?;
    println!("{text}");
    std::io::stdout().flush().ok();
    eprintln!(
        "[{} tokens, {:.1} tokens/s, finish: {:?}]",
        g.ids.len(),
        g.ids.len() as f64 / secs,
        g.finish
    );
    Ok(())
}

/// `ferrotune tokenize`: ids and token strings of a text, a chat prompt or one SFT row, with the
/// SFT loss mask for a row, and a warning for the silent failures of a template: no trained
/// token, or a trained turn whose last token does not end the turn (the model never learns to
/// stop).
pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = ferrotune::lm::load_tokenizer_with(&a.model, a.chat_template.as_deref())?;
    let (ids, trained) = match (&a.text, &a.data) {
        (Some(text), _) if a.chat => (tok.render(&[Message::user(text)], true)?.ids, None),
        (Some(text), _) => (tok.encode(text, true)?, None),
        (None, Some(path)) => {
            let rows = ferrotune_data::read_rows(path)?;
            let Some(row) = rows.get(a.row) else {
                bail!(
                    "{}: --row {} but the file has {} rows",
                    path.display(),
                    a.row,
                    rows.len()
                );
            };
            let examples = ferrotune_data::sft_examples(std::slice::from_ref(row), path)?;
            let Some(example) = examples.first() else {
                bail!("{} line {}: not an SFT example", path.display(), row.line);
            };
            let t = ferrotune_data::tokenize_sft(
                &tok,
                example,
                usize::MAX,
                &ferrotune_data::SftOptions::default(),
            )
            .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), row.line))?;
            (t.ids, Some(t.loss_mask))
        }
        (None, None) => bail!("give --text or --data"),
    };
    let tokens: Vec<String> = ids
        .iter()
        .map(|&i| tok.id_to_token(i).unwrap_or_default())
        .collect();
    if a.json {
        let v = serde_json::json!({"ids": ids, "tokens": tokens, "trained": trained});
        println!("{v}");
    } else {
        for (i, (id, t)) in ids.iter().zip(&tokens).enumerate() {
            let mark = match &trained {
                Some(m) if m[i] == 1 => "  train",
                Some(_) => "       ",
                None => "",
            };
            println!("{i:>6} {id:>8}{mark}  {t:?}");
        }
        let n = trained
            .as_ref()
            .map(|m| m.iter().filter(|&&x| x == 1).count());
        match n {
            Some(n) => println!("{} tokens, {n} trained", ids.len()),
            None => println!("{} tokens", ids.len()),
        }
    }
    if let Some(mask) = &trained {
        for w in mask_warnings(&ids, mask, tok.eos_ids(), &tokens) {
            eprintln!("warning: {w}");
        }
    }
    Ok(())
}

/// What is silently wrong with a loss mask: nothing trained, or a trained span that does not end
/// with an end-of-sequence / end-of-turn id.
fn mask_warnings(ids: &[u32], mask: &[u8], eos: &[u32], tokens: &[String]) -> Vec<String> {
    if !mask.contains(&1) {
        return vec!["no token is trained: this example adds nothing to the SFT loss (no assistant turn, or a template whose assistant spans cannot be found)".into()];
    }
    let mut out = Vec::new();
    for i in 0..ids.len() {
        let span_end = mask[i] == 1 && mask.get(i + 1) != Some(&1);
        if span_end && !eos.contains(&ids[i]) {
            out.push(format!(
                "the trained span ending at token {i} ({:?}) does not end with an end-of-turn token (ids {eos:?}): the model will not learn to stop",
                tokens[i]
            ));
        }
    }
    out
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let PerplexityArgs {
        model,
        text,
        window,
        stride,
    } = a;
    // A plain text file is scored whole; a data file's `text` column row by row, as
    // `eval --text` reads it.
    let lm = load(&model)?;
    let t = Instant::now();
    let p = ferrotune::task_eval::perplexity_of_file(&lm, &text, window, stride)?;
    println!(
        "perplexity {:.4}  (mean NLL {:.6} over {} tokens, {:.1} tokens/s)",
        p.ppl(),
        p.mean_nll(),
        p.tokens,
        p.tokens as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    let ExportArgs {
        model,
        adapter,
        out,
        dtype,
        layers,
        chat_template,
    } = a;
    let dtype = parse_dtype(&dtype)?;
    // Checked before anything is written.
    let template = chat_template
        .map(|p| {
            let mut tok = ferrotune::lm::load_tokenizer(&model)?;
            ferrotune::lm::set_template_file(&mut tok, &p)?;
            Ok::<_, anyhow::Error>(std::fs::read_to_string(&p)?)
        })
        .transpose()?;
    let report = match layers {
        Some(l) => ferrotune_ckpt::export_layer_subset(&model, &l, &out, dtype)?,
        None => ferrotune_ckpt::export_merged(&model, adapter.as_deref(), &out, dtype)?,
    };
    if let Some(t) = template {
        let path = report.out.join("chat_template.jinja");
        std::fs::write(&path, t).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "wrote {} ({} tensors, {} merged with the adapter)",
        report.out.display(),
        report.tensors,
        report.merged.len()
    );
    Ok(())
}

/// `ferrotune bench ...`: one JSON line.
pub fn bench(cmd: BenchCmd) -> Result<()> {
    let line = match cmd {
        BenchCmd::LoraStep {
            shape,
            batch,
            seq,
            steps,
            warmup,
        } => ferrotune::bench::lora_step(&shape, batch, seq, steps, warmup)?,
        BenchCmd::Rollout {
            shape,
            batch,
            prompt_len,
            new_tokens,
        } => ferrotune::bench::rollout(&shape, batch, prompt_len, new_tokens)?,
        BenchCmd::Speculative {
            model,
            draft,
            prompts,
            n,
            max_new_tokens,
            draft_tokens,
            temperature,
            seed,
            out,
        } => {
            let lm = load(&model)?;
            let d = speculative_run::load_draft(&lm, &model.model, &draft, &load_options(&model)?)?;
            let args = speculative_run::BenchArgs {
                prompts,
                n,
                max_new_tokens,
                draft_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_k: None,
                    top_p: None,
                    seed,
                },
                out,
            };
            serde_json::to_value(speculative_run::bench(&lm, &d, &args)?)?
        }
    };
    println!("{line}");
    Ok(())
}
