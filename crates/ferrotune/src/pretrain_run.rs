//! `ferrotune pretrain --config FILE`: next-token pretraining of a small Llama from scratch.
//! Resolve the config, generate the corpus, train a byte-level BPE tokenizer on it, initialise
//! the model (transformers' rule), train every weight with the SFT loop on packed text (a `Text`
//! example trains every token: that is the pretraining loss), then write a Hugging Face folder
//! (config.json, model.safetensors, tokenizer files with a ChatML template,
//! generation_config.json) plus the held-out evaluation files under `eval/`.
//!
//! Owns: the pretrain config and its checks, document packing, the output folder. Does not own:
//! the training math (`ferrotune-train`), the tokenizer trainer (`ferrotune-tokenize::train`),
//! the init rule (`ferrotune-models::init`) or the corpus templates (`corpus.rs`).

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ferrotune_ckpt::files::{staging_sibling, write_safetensors};
use ferrotune_ckpt::{hf_config_json, OnExisting, RunDir};
use ferrotune_data::Tokenized;
use ferrotune_models::init::{init_model, InitOptions};
use ferrotune_models::{HfConfig, LoadOptions, ModelConfig};
use ferrotune_report::{plot_metrics, Progress, RunLog};
use ferrotune_tokenize::train::{
    train_tokenizer, BpeTrainOptions, ENDOFTEXT, IM_END, PAD, SPECIAL_TOKENS,
};
use ferrotune_tokenize::Tokenizer;
use ferrotune_train::optim::AdamWConfig;
use ferrotune_train::plan::LoopPlan;
use ferrotune_train::schedule::{Schedule, ScheduleKind, Warmup};
use ferrotune_train::sft::{train_sft, SftPlan, SftSummary};
use ferrotune_train::trainer::{Observer, Trainable};
use serde::{Deserialize, Serialize};

use crate::config::{apply_set, ConfigError};
use crate::corpus::{self, CorpusSpec};

/// `[model]`: the architecture (a Llama), with transformers' field names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArchSection {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Default: num_attention_heads (no grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// The context length; sequences are packed up to `run.seq_len` <= this.
    #[serde(default = "d_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Std of the normal init of every Linear and Embedding weight.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
}

/// `[tokenizer]`: the byte-level BPE trained on the corpus.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// Largest vocabulary size; the trainer stops earlier when no pair occurs `min_frequency`
    /// times. The model's vocab_size is the size reached.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_min_freq")]
    pub min_frequency: u64,
}

/// `[optim]`: AdamW and the schedule (pretraining defaults: higher LR, cosine decay).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PretrainOptim {
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// constant | constant_with_warmup | linear | cosine
    #[serde(default = "d_sched")]
    pub lr_scheduler_type: String,
    #[serde(default)]
    pub warmup_steps: usize,
}

/// `[run]`: where things go, steps and batching.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PretrainRun {
    /// Run folder: resolved config, metrics, TensorBoard events, plots, the final checkpoint.
    pub output_dir: PathBuf,
    /// The Hugging Face model folder written at the end.
    pub model_dir: PathBuf,
    /// Replace an existing run folder and model folder (else they are refused).
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default)]
    pub seed: u64,
    pub max_steps: usize,
    /// Packed sequences per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    /// Tokens per packed sequence (whole documents, positions continuous).
    #[serde(default = "d_seq")]
    pub seq_len: usize,
    /// Fraction of documents held out for the eval loss.
    #[serde(default = "d_eval_frac")]
    pub eval_fraction: f64,
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// Eval loss every N steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Also checkpoint every N steps into the run folder (0 = only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// f32 | bf16 | auto (f32 when the weights fit in 10 MB, else bf16).
    #[serde(default = "d_save_dtype")]
    pub save_dtype: String,
}

/// A pretrain config file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    pub model: ArchSection,
    #[serde(default = "d_tokenizer")]
    pub tokenizer: TokenizerSection,
    #[serde(default)]
    pub corpus: CorpusSpec,
    #[serde(default = "d_optim")]
    pub optim: PretrainOptim,
    pub run: PretrainRun,
}

fn d_ctx() -> usize {
    256
}
fn d_theta() -> f64 {
    10000.0
}
fn d_rms_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_init() -> f64 {
    0.02
}
fn d_vocab() -> usize {
    1024
}
fn d_min_freq() -> u64 {
    2
}
fn d_lr() -> f64 {
    3e-3
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_sched() -> String {
    "cosine".into()
}
fn d_batch() -> usize {
    16
}
fn d_one() -> usize {
    1
}
fn d_seq() -> usize {
    128
}
fn d_eval_frac() -> f64 {
    0.01
}
fn d_log_every() -> usize {
    10
}
fn d_save_dtype() -> String {
    "auto".into()
}
fn d_tokenizer() -> TokenizerSection {
    TokenizerSection {
        vocab_size: d_vocab(),
        min_frequency: d_min_freq(),
    }
}
fn d_optim() -> PretrainOptim {
    PretrainOptim {
        learning_rate: d_lr(),
        weight_decay: 0.0,
        adam_beta1: d_beta1(),
        adam_beta2: d_beta2(),
        adam_epsilon: d_eps(),
        max_grad_norm: d_clip(),
        lr_scheduler_type: d_sched(),
        warmup_steps: 0,
    }
}

/// Largest model.safetensors that `save_dtype = "auto"` keeps in f32.
const AUTO_F32_LIMIT: usize = 10 * 1000 * 1000;

/// Lexically resolve `.` and `..` (the folder may not exist yet).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl PretrainConfig {
    /// Read a TOML file, apply `--set` overrides, reject unknown keys, resolve paths against
    /// the file's folder, and check the cross-field rules.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let parse = |msg: String| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: msg.replace('\n', " "),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
        for s in sets {
            apply_set(&mut table, s)?;
        }
        let mut cfg = PretrainConfig::deserialize(table).map_err(|e| parse(e.to_string()))?;
        let base = std::path::absolute(path.parent().unwrap_or(Path::new(".")))
            .unwrap_or_else(|_| PathBuf::from("."));
        cfg.run.output_dir = normalize(&base.join(&cfg.run.output_dir));
        cfg.run.model_dir = normalize(&base.join(&cfg.run.model_dir));
        for f in cfg.corpus.files.iter_mut() {
            *f = normalize(&base.join(&*f));
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Cross-field checks, each saying why.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, msg: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                field: field.into(),
                msg,
            })
        };
        let m = &self.model;
        let kv = m.num_key_value_heads.unwrap_or(m.num_attention_heads);
        if m.num_attention_heads == 0 || !m.hidden_size.is_multiple_of(m.num_attention_heads) {
            return bad(
                "model.num_attention_heads",
                format!(
                    "must divide hidden_size {} (head_dim = hidden_size / heads)",
                    m.hidden_size
                ),
            );
        }
        if kv == 0 || !m.num_attention_heads.is_multiple_of(kv) {
            return bad(
                "model.num_key_value_heads",
                format!("must divide num_attention_heads {}", m.num_attention_heads),
            );
        }
        if !(m.hidden_size / m.num_attention_heads).is_multiple_of(2) {
            return bad(
                "model.num_attention_heads",
                "head_dim must be even for rotary embeddings".into(),
            );
        }
        let min_vocab = 256 + SPECIAL_TOKENS.len();
        if self.tokenizer.vocab_size < min_vocab {
            return bad(
                "tokenizer.vocab_size",
                format!("must be at least {min_vocab}: 256 byte symbols + the special tokens"),
            );
        }
        let r = &self.run;
        if r.seq_len < 2 || r.seq_len > m.max_position_embeddings {
            return bad(
                "run.seq_len",
                format!(
                    "must be in 2..={} (model.max_position_embeddings)",
                    m.max_position_embeddings
                ),
            );
        }
        if r.max_steps == 0 || r.batch_size == 0 || r.gradient_accumulation_steps == 0 {
            return bad(
                "run",
                "max_steps, batch_size and gradient_accumulation_steps must be at least 1".into(),
            );
        }
        if !(0.0..0.5).contains(&r.eval_fraction) {
            return bad("run.eval_fraction", "must be in [0, 0.5)".into());
        }
        if !matches!(r.save_dtype.as_str(), "f32" | "bf16" | "auto") {
            return bad("run.save_dtype", "f32 | bf16 | auto".into());
        }
        if r.output_dir == r.model_dir {
            return bad(
                "run.model_dir",
                "must differ from run.output_dir (the run folder holds checkpoints and logs)"
                    .into(),
            );
        }
        let c = &self.corpus;
        if c.arithmetic_docs + c.chat_docs + c.english_docs == 0 && c.files.is_empty() {
            return bad("corpus", "generates no document and names no file".into());
        }
        if c.max_operand < 1 {
            return bad("corpus.max_operand", "must be at least 1".into());
        }
        for (field, v) in [
            ("corpus.three_digit_fraction", c.three_digit_fraction),
            ("corpus.multiplication_fraction", c.multiplication_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(field, format!("{v} is not a fraction in [0, 1]"));
            }
        }
        if let Err(e) = self.optim.lr_scheduler_type.parse::<ScheduleKind>() {
            return bad("optim.lr_scheduler_type", e.to_string());
        }
        Ok(())
    }

    /// The resolved config as TOML (written to the run folder).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

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
    let kind: ScheduleKind = cfg
        .optim
        .lr_scheduler_type
        .parse()
        .map_err(|e| anyhow::anyhow!("optim.lr_scheduler_type: {e}"))?;
    let schedule = Schedule::new(kind, Warmup::Steps(cfg.optim.warmup_steps), r.max_steps)
        .map_err(|e| anyhow::anyhow!("optim: {e}"))?;
    let plan = SftPlan {
        run: LoopPlan {
            seed: r.seed,
            total_steps: r.max_steps,
            batch_size: r.batch_size,
            grad_accum: r.gradient_accumulation_steps,
            learning_rate: cfg.optim.learning_rate,
            schedule,
            adamw: AdamWConfig {
                betas: (cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                eps: cfg.optim.adam_epsilon,
                weight_decay: cfg.optim.weight_decay,
            },
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
    };
    let summary = train_sft(
        loaded.model.as_ref(),
        &trainable,
        &train,
        &eval,
        &plan,
        &run,
        None,
        &mut obs,
        &device,
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
