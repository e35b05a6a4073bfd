//! `ferrotune pretrain --config FILE`: next-token pretraining of a small Llama from scratch.
//! Resolve the config, generate the corpus, train a byte-level BPE tokenizer on it, initialise
//! the model (transformers' rule), train every weight with the SFT loop on packed text (a `Text`
//! example trains every token: that is the pretraining loss), then write a Hugging Face folder
//! (config.json, model.safetensors, tokenizer files with a ChatML template,
//! generation_config.json) plus the held-out evaluation files under `eval/`.
//!
//! Owns: document packing, the run, the output folder (the config and its checks are
//! `config/pretrain.rs`). Does not own:
//! the training math (`ferrotune-train`), the tokenizer trainer (`ferrotune-tokenize::train`),
//! the init rule (`ferrotune-models::init`) or the corpus templates (`corpus.rs`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ferrotune_ckpt::files::{staging_sibling, write_safetensors};
use ferrotune_ckpt::{hf_config_json, OnExisting, RunDir};
use ferrotune_data::Tokenized;
use ferrotune_models::init::{init_model, InitOptions};
use ferrotune_models::{HfConfig, LoadOptions, ModelConfig};
use ferrotune_report::{plot_metrics, Progress, RunLog};
use ferrotune_tokenize::train::{train_tokenizer, BpeTrainOptions, ENDOFTEXT, IM_END, PAD};
use ferrotune_tokenize::Tokenizer;
use ferrotune_train::plan::LoopPlan;
use ferrotune_train::sft::{train_sft, SftPlan, SftSummary};
use ferrotune_train::trainer::{Observer, RunCtx, Trainable};

pub use crate::config::PretrainConfig;
use crate::corpus;
use crate::session::{adamw, schedule};

/// Largest model.safetensors that `save_dtype = "auto"` keeps in f32.
const AUTO_F32_LIMIT: usize = 10 * 1000 * 1000;

impl PretrainConfig {
    /// The model config the run builds (token ids from the trained tokenizer).
    fn model_config(&self, tok: &Tokenizer) -> Result<ModelConfig> {
        let m = &self.model;
        let hf = HfConfig {
            model_type: Some("llama".into()),
            vocab_size: Some(tok.vocab_size()),
            hidden_size: Some(m.hidden_size),
            intermediate_size: Some(m.intermediate_size),
            num_hidden_layers: Some(m.num_hidden_layers),
            num_attention_heads: Some(m.num_attention_heads),
            num_key_value_heads: m.num_key_value_heads,
            rms_norm_eps: Some(m.rms_norm_eps),
            rope_theta: Some(m.rope_theta),
            tie_word_embeddings: Some(m.tie_word_embeddings),
            max_position_embeddings: Some(m.max_position_embeddings),
            hidden_act: Some("silu".into()),
            bos_token_id: tok.bos_id().map(Into::into),
            eos_token_id: tok.eos_ids().first().map(|&i| i.into()),
            ..HfConfig::default()
        };
        Ok(ModelConfig::from_hf(&hf, Path::new("[model]"))?)
    }
}

/// What a pretraining run produced.
#[derive(Debug, Clone)]
pub struct PretrainSummary {
    pub model_dir: PathBuf,
    pub run_dir: PathBuf,
    pub parameters: usize,
    pub train_sequences: usize,
    pub train_tokens: usize,
    pub sft: SftSummary,
    pub seconds: f64,
}

struct Obs {
    log: RunLog,
    progress: Progress,
}

impl Observer for Obs {
    fn metrics(&mut self, step: usize, values: &[(&str, f64)]) {
        if let Err(e) = self.log.log(step as u64, values) {
            self.progress
                .println(&format!("warning: cannot write metrics: {e}"));
        }
        self.progress.update(step as u64, values);
    }
    fn message(&mut self, msg: &str) {
        self.progress.println(msg);
    }
}

/// Whole documents into sequences of at most `seq_len` tokens, positions continuous (as in
/// ordinary pretraining; each sequence starts at a document start, like a prompt at inference).
/// A document goes into the first of the last few open sequences it fits in, so little is
/// padded; one longer than `seq_len` is cut into `seq_len` pieces.
pub fn pack_documents(docs: &[Vec<u32>], seq_len: usize) -> Vec<Vec<u32>> {
    const OPEN: usize = 8;
    let mut done: Vec<Vec<u32>> = Vec::new();
    let mut open: Vec<Vec<u32>> = Vec::new();
    for doc in docs {
        for piece in doc.chunks(seq_len) {
            match open.iter_mut().find(|s| s.len() + piece.len() <= seq_len) {
                Some(s) => s.extend_from_slice(piece),
                None => {
                    if open.len() == OPEN {
                        done.push(open.remove(0));
                    }
                    open.push(piece.to_vec());
                }
            }
            // A full sequence leaves the open list at once.
            if let Some(i) = open.iter().position(|s| s.len() == seq_len) {
                done.push(open.remove(i));
            }
        }
    }
    done.extend(open);
    done
}

/// Read extra text files: documents separated by blank lines.
fn read_text_files(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("{}: cannot read corpus file", f.display()))?;
        docs.extend(
            text.split("\n\n")
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(String::from),
        );
    }
    Ok(docs)
}

/// Run the pretrain config at `config` (with `--set` overrides); returns the model folder.
pub fn run_pretrain(config: &Path, overrides: &[String], quiet: bool) -> Result<PathBuf> {
    let cfg = PretrainConfig::load(config, overrides)?;
    Ok(pretrain(&cfg, quiet)?.model_dir)
}

/// Make sure `dir` may be (re)written: absent, empty, or a model folder with `overwrite`.
fn check_replaceable(dir: &Path, overwrite: bool) -> Result<()> {
    let entries = ferrotune_ckpt::files::entries(dir)?;
    if entries.is_empty() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "{}: run.model_dir exists and is not empty; set run.overwrite = true to replace it",
            dir.display()
        );
    }
    if !dir.join("config.json").exists() {
        bail!(
            "{}: run.model_dir holds files but no config.json; refusing to replace a folder that is not a model",
            dir.display()
        );
    }
    Ok(())
}

/// Run a resolved pretrain config.
pub fn pretrain(cfg: &PretrainConfig, quiet: bool) -> Result<PretrainSummary> {
    let t0 = std::time::Instant::now();
    let say = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    let r = &cfg.run;
    check_replaceable(&r.model_dir, r.overwrite)?;
    let on = if r.overwrite {
        OnExisting::Overwrite
    } else {
        OnExisting::Refuse
    };
    let run = RunDir::create(&r.output_dir, on)?;
    std::fs::write(run.config_toml(), cfg.to_toml())
        .with_context(|| format!("{}: cannot write", run.config_toml().display()))?;

    // 1. Corpus.
    let corpus = corpus::generate(&cfg.corpus);
    let mut docs = corpus.train.clone();
    docs.extend(read_text_files(&cfg.corpus.files)?);
    say(&format!(
        "corpus: {} training documents ({} held-out stories, {} held-out problems)",
        docs.len(),
        corpus.heldout_english.len(),
        corpus.heldout_arithmetic.len()
    ));

    // 2. Tokenizer, written straight into the staging copy of the model folder.
    let staging = staging_sibling(&r.model_dir, "pretrain");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("{}: cannot remove stale staging", staging.display()))?;
    }
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("{}: cannot create", staging.display()))?;
    let tok = train_tokenizer(
        docs.iter().map(String::as_str),
        &BpeTrainOptions {
            vocab_size: cfg.tokenizer.vocab_size,
            min_frequency: cfg.tokenizer.min_frequency,
            model_max_length: cfg.model.max_position_embeddings,
        },
        &staging,
    )?;
    let eot = tok
        .token_to_id(ENDOFTEXT)
        .context("trained tokenizer lacks <|endoftext|>")?;
    say(&format!("tokenizer: {} tokens", tok.vocab_size()));

    // 3. Documents → packed sequences; a seeded split holds some documents out for eval.
    let mut tokenized = Vec::with_capacity(docs.len());
    for d in &docs {
        let mut ids = tok.encode(d, false)?;
        ids.push(eot);
        tokenized.push(ids);
    }
    let n_eval = ((tokenized.len() as f64) * r.eval_fraction).round() as usize;
    // The generated documents are already shuffled (extra files come last).
    let eval_docs: Vec<Vec<u32>> = tokenized.drain(..n_eval.min(tokenized.len())).collect();
    let as_items = |seqs: Vec<Vec<u32>>| -> Vec<Tokenized> {
        seqs.into_iter()
            .map(|ids| Tokenized {
                loss_mask: vec![1; ids.len()],
                ids,
                truncated: false,
                tokens_dropped: 0,
            })
            .collect()
    };
    let train = as_items(pack_documents(&tokenized, r.seq_len));
    let eval = as_items(pack_documents(&eval_docs, r.seq_len));
    let train_tokens: usize = train.iter().map(|t| t.len()).sum();
    if train.is_empty() {
        bail!("the corpus produced no training sequence");
    }

    // 4. Model.
    let mcfg = cfg.model_config(&tok)?;
    let device = Device::Cpu;
    let loaded = init_model(
        &mcfg,
        &InitOptions {
            initializer_range: cfg.model.initializer_range,
            seed: r.seed,
            pad_token_id: tok.pad_id(),
        },
        &LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            lora: None,
            trainable_base: true,
        },
    )?;
    let params = loaded.base_params.clone();
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    say(&format!(
        "model: {} parameters ({} layers, hidden {}, vocab {}); {} train sequences ({} tokens, {:.1} epochs over {} steps), {} eval sequences",
        n_params,
        mcfg.num_layers,
        mcfg.hidden_size,
        mcfg.vocab_size,
        train.len(),
        train_tokens,
        (r.max_steps * r.batch_size * r.gradient_accumulation_steps) as f64 / train.len() as f64,
        r.max_steps,
        eval.len()
    ));

    // 5. Train every weight.
    let schedule = schedule(&cfg.optim, r.max_steps)?;
    let plan = SftPlan {
        run: LoopPlan {
            seed: r.seed,
            total_steps: r.max_steps,
            batch_size: r.batch_size,
            grad_accum: r.gradient_accumulation_steps,
            learning_rate: cfg.optim.learning_rate,
            schedule,
            adamw: adamw(&cfg.optim),
            max_grad_norm: cfg.optim.max_grad_norm,
            log_every: r.log_every.max(1),
            save_every: r.save_every,
            eval_every: if r.eval_every > 0 {
                r.eval_every
            } else {
                r.max_steps
            },
            keep_last: 0,
            max_nonfinite_steps: 5,
            shuffle: true,
            pad_id: tok.pad_id().unwrap_or(eot),
        },
    };
    let progress = if quiet {
        Progress::to_writer(r.max_steps as u64, Box::new(std::io::sink()))
    } else {
        Progress::auto(r.max_steps as u64)
    };
    let mut obs = Obs {
        log: RunLog::new(run.root(), true)?,
        progress: progress.with_log_every(r.log_every.max(1) as u64),
    };
    let trainable = Trainable::Full {
        params: params.clone(),
        base: None,
    };
    let summary = train_sft(
        loaded.model.as_ref(),
        &trainable,
        &train,
        &eval,
        &plan,
        RunCtx::new(&run, None, &mut obs, &device),
    )?;
    obs.progress.finish();
    if let Err(e) = plot_metrics(run.root(), &["loss", "eval_loss", "lr", "grad_norm"]) {
        say(&format!("warning: plots not written: {e}"));
    }

    // 6. The Hugging Face folder.
    let save_dtype = match r.save_dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        _ if n_params * 4 <= AUTO_F32_LIMIT => DType::F32,
        _ => DType::BF16,
    };
    let tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(save_dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    write_safetensors(&staging.join("model.safetensors"), &tensors)?;
    let dtype_name = if save_dtype == DType::F32 {
        "float32"
    } else {
        "bfloat16"
    };
    let mut config_json = hf_config_json(&mcfg, dtype_name);
    if let Some(o) = config_json.as_object_mut() {
        o.insert("pad_token_id".into(), tok.pad_id().into());
        o.insert(
            "initializer_range".into(),
            cfg.model.initializer_range.into(),
        );
    }
    write_json(&staging.join("config.json"), &config_json)?;
    let im_end = tok
        .token_to_id(IM_END)
        .context("tokenizer lacks <|im_end|>")?;
    let generation = serde_json::json!({
        "bos_token_id": eot,
        // A reply ends at <|im_end|>; a plain-text continuation at <|endoftext|>.
        "eos_token_id": [im_end, eot],
        "pad_token_id": tok.token_to_id(PAD),
    });
    write_json(&staging.join("generation_config.json"), &generation)?;
    write_eval_files(&staging, &corpus)?;
    if r.model_dir.exists() {
        std::fs::remove_dir_all(&r.model_dir)
            .with_context(|| format!("{}: cannot replace", r.model_dir.display()))?;
    }
    if let Some(parent) = r.model_dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    ferrotune_ckpt::files::commit_dir(&staging, &r.model_dir)?;
    say(&format!("wrote {}", r.model_dir.display()));
    Ok(PretrainSummary {
        model_dir: r.model_dir.clone(),
        run_dir: run.root().to_path_buf(),
        parameters: n_params,
        train_sequences: train.len(),
        train_tokens,
        sft: summary,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("{}: cannot write", path.display()))
}

/// `eval/english.txt` (held-out stories, one per paragraph) and `eval/arithmetic.jsonl`
/// (held-out problems with TRL's `prompt` / `answer` columns).
fn write_eval_files(dir: &Path, corpus: &corpus::Corpus) -> Result<()> {
    let eval = dir.join("eval");
    std::fs::create_dir_all(&eval).with_context(|| format!("{}: cannot create", eval.display()))?;
    let english = corpus.heldout_english.join("\n\n") + "\n";
    std::fs::write(eval.join("english.txt"), english)
        .with_context(|| format!("{}: cannot write", eval.display()))?;
    let mut lines = String::new();
    for p in &corpus.heldout_arithmetic {
        let row = serde_json::json!({
            "prompt": format!("What is {}?", p.expr()),
            "answer": p.answer().to_string(),
            "a": p.a,
            "op": p.op.to_string(),
            "b": p.b,
        });
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    std::fs::write(eval.join("arithmetic.jsonl"), lines)
        .with_context(|| format!("{}: cannot write", eval.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_documents_whole_and_fills_sequences() {
        let docs: Vec<Vec<u32>> = (0..200u32)
            .map(|i| vec![i; 3 + (i as usize * 7) % 11])
            .collect();
        let seqs = pack_documents(&docs, 64);
        let total: usize = docs.iter().map(Vec::len).sum();
        assert_eq!(seqs.iter().map(Vec::len).sum::<usize>(), total);
        assert!(seqs.iter().all(|s| s.len() <= 64));
        // Every document appears as one contiguous run.
        for d in &docs {
            assert!(seqs
                .iter()
                .any(|s| s.windows(d.len()).any(|w| w == d.as_slice())));
        }
        // Tight: under 5% padding against the bound (in-order filling alone wastes ~10%).
        assert!(
            seqs.len() * 64 < total * 105 / 100,
            "{} sequences for {total} tokens",
            seqs.len()
        );
        // A long document is cut into seq_len pieces.
        let long = pack_documents(&[vec![7; 40]], 16);
        assert_eq!(
            long.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![16, 16, 8]
        );
    }
}
