//! `ferrotune train` for a `[distill]` config, `ferrotune distill cache-teacher`, and
//! `ferrotune data gen from-model`: resolve the config into a plan (student + adapters,
//! tokenized SFT rows with their cache keys, the teacher or its cache, step totals), check that
//! teacher and student share a tokenizer, run the loop of `ferrotune-train`, and write the
//! distilled student as a plain Hugging Face folder (`<output_dir>/model`, adapters merged) that
//! `generate --draft-model` can load. The math lives in `ferrotune-train`; this file only
//! connects rooms.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_data::{read_rows, Tokenized};
use ferrotune_generate::{generate, GenerateOptions, SamplingParams};
use ferrotune_models::LoadOptions;
use ferrotune_nn::Mode;
use ferrotune_report::Progress;
use ferrotune_tokenize::Tokenizer;
use ferrotune_train::distill::{
    teacher_topk_rows, train_distill, CachedTeacher, DistillItem, DistillPlan, DistillSummary,
    TeacherSource,
};
use ferrotune_train::distill_loss::JsdConfig;
use ferrotune_train::trainer::Trainable;

use crate::config::{DistillSection, RunConfig};
use crate::lm::{load_tokenizer_with, parse_device, parse_dtype, Lm};
use crate::session::{held_out, load_frozen, run_device, sizes, Headline, Session};
use crate::teacher_cache::{self, CacheHeader};

/// `ferrotune distill ...`
#[derive(clap::Subcommand)]
pub enum DistillCmd {
    /// Write the teacher's top-k log-probs at every completion token of a `[distill]` config's
    /// data to `distill.teacher_cache` (or --out), so training never loads the teacher.
    CacheTeacher {
        /// The `[distill]` run config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override a config key: --set distill.top_k=32 (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Output file (default: distill.teacher_cache).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Examples per teacher forward.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
    },
}

/// `ferrotune data gen from-model`: sequence-level distillation data.
#[derive(clap::Args, Clone)]
pub struct GenFromModelArgs {
    /// The teacher: Hugging Face folder or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompts: JSONL/Parquet/CSV with `prompt` (text or chat messages); other columns are kept.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output JSONL: each row + `completion` (text, or `[{role: assistant, content}]` for chat
    /// prompts: TRL's prompt-completion format).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a completion after this text (repeatable; kept in the completion).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Longer prompts keep their last tokens.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_len: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Tokenize one SFT file (errors name the file).
fn tokenize_file(tok: &Tokenizer, path: &Path, cfg: &RunConfig) -> Result<Vec<Tokenized>> {
    let (items, s) = crate::sft_run::tokenize_sft_file(tok, path, cfg)?;
    eprintln!(
        "{}: {} examples, {} truncated to {} tokens, {} skipped with no trained token",
        path.display(),
        s.examples,
        s.truncated,
        cfg.data.max_seq_len,
        s.no_loss
    );
    Ok(items)
}

/// Every tokenized example of `data.train` then `data.eval`, keyed in that order (the cache's
/// keys), and how many come from `data.train`.
fn all_items(tok: &Tokenizer, cfg: &RunConfig) -> Result<(Vec<DistillItem>, usize)> {
    let mut seqs = tokenize_file(tok, &cfg.data.train, cfg)?;
    let n_train = seqs.len();
    if let Some(e) = &cfg.data.eval {
        seqs.extend(tokenize_file(tok, e, cfg)?);
    }
    let items = seqs
        .into_iter()
        .enumerate()
        .map(|(key, seq)| DistillItem { seq, key })
        .collect();
    Ok((items, n_train))
}

/// What a cache for `cfg` must have been computed from.
fn expected_header(
    cfg: &RunConfig,
    d: &DistillSection,
    tok: &Tokenizer,
    items: &[DistillItem],
    rows: usize,
) -> CacheHeader {
    CacheHeader {
        format: teacher_cache::FORMAT.into(),
        version: teacher_cache::VERSION,
        teacher: d.teacher.clone(),
        tokenizer: teacher_cache::tokenizer_fingerprint(tok),
        data: ferrotune_data::tokenized_fingerprint(items.iter().map(|x| &x.seq)),
        k: d.top_k,
        temperature: d.loss_temperature,
        examples: items.len(),
        rows,
        train_file: cfg.data.train.clone(),
        eval_file: cfg.data.eval.clone(),
        max_seq_len: cfg.data.max_seq_len,
    }
}

fn load_teacher(cfg: &RunConfig, d: &DistillSection, student_tok: &Tokenizer) -> Result<Lm> {
    let device = run_device(cfg)?;
    load_frozen(cfg, &device, "distill.teacher", &d.teacher, student_tok)
}

/// `ferrotune distill cache-teacher`: returns the file written.
pub fn cache_teacher(cfg: &RunConfig, out: Option<&Path>, batch_size: usize) -> Result<PathBuf> {
    let Some(d) = &cfg.distill else {
        bail!("not a distillation config (no [distill] section)");
    };
    if d.top_k == 0 {
        bail!("distill.top_k: a teacher cache holds the teacher's top-k log-probs; set top_k (e.g. --set distill.top_k=20)");
    }
    let out = out
        .map(Path::to_path_buf)
        .or_else(|| d.teacher_cache.clone())
        .context("give --out FILE or set distill.teacher_cache")?;
    let tok = load_tokenizer_with(&cfg.model.path, cfg.model.chat_template.as_deref())
        .with_context(|| format!("model.path {}", cfg.model.path.display()))?;
    let teacher = load_teacher(cfg, d, &tok)?;
    let (items, _) = all_items(&tok, cfg)?;
    let t0 = std::time::Instant::now();
    let mut rows = CachedTeacher {
        k: d.top_k,
        offsets: vec![0],
        ..Default::default()
    };
    for chunk in items.chunks(batch_size.max(1)) {
        let seqs: Vec<&Tokenized> = chunk.iter().map(|x| &x.seq).collect();
        let (ids, lps, counts) = teacher_topk_rows(
            teacher.model.as_ref(),
            &seqs,
            tok.pad_id().unwrap_or(0),
            d.top_k,
            d.loss_temperature,
            &teacher.device,
        )?;
        rows.ids.extend(ids);
        rows.logprobs.extend(lps);
        for c in counts {
            let last = rows.offsets.last().copied().unwrap_or(0);
            rows.offsets.push(last + c);
        }
    }
    let n_rows = rows.offsets.last().copied().unwrap_or(0);
    let header = expected_header(cfg, d, &tok, &items, n_rows);
    teacher_cache::write(&out, &header, &rows)?;
    eprintln!(
        "cache-teacher: {} examples, {} rows of top-{} log-probs in {:.1}s",
        items.len(),
        n_rows,
        d.top_k,
        t0.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// The metrics a distillation run plots at the end.
const PLOTS: &[&str] = &[
    "loss",
    "distill_loss",
    "eval/distill_loss",
    "eval/forward_kl",
    "grad_norm",
];

/// Run (or resume) a `[distill]` config. `resume` = continue the newest checkpoint.
pub fn run_distill(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<DistillSummary> {
    let Some(d) = &cfg.distill else {
        bail!("not a distillation config (no [distill] section)");
    };
    let session = Session::open(cfg, resume, overwrite)?;
    let trainable = session.trainable()?;
    let lm = &session.lm;
    // The teacher: its cached rows (checked against this run), or the model itself, loaded
    // (and its tokenizer checked) before the data is read, so a mismatch fails fast.
    let live: Option<Lm> = match &d.teacher_cache {
        Some(_) => None,
        None => Some(session.load_frozen("distill.teacher", &d.teacher)?),
    };
    let (items, n_train) = all_items(&lm.tokenizer, cfg)?;
    let cached: Option<CachedTeacher>;
    let teacher = match &d.teacher_cache {
        Some(path) => {
            let (h, rows) = teacher_cache::read(path)?;
            let now = expected_header(cfg, d, &lm.tokenizer, &items, h.rows);
            teacher_cache::check(path, &h, &now)?;
            eprintln!(
                "teacher: {} rows of top-{} log-probs from {} (teacher {} not loaded)",
                h.rows,
                h.k,
                path.display(),
                d.teacher.display()
            );
            cached = Some(rows);
            TeacherSource::Cache(cached.as_ref().context("teacher cache")?)
        }
        None => {
            let t = live.as_ref().context("teacher")?;
            TeacherSource::Live {
                model: t.model.as_ref(),
                top_k: d.top_k,
            }
        }
    };
    let mut train = items;
    let eval = train.split_off(n_train);
    let (train, eval) = held_out(cfg, train, eval)?;
    let plan = DistillPlan {
        run: session.loop_plan(train.len())?,
        loss: JsdConfig {
            beta: d.beta,
            temperature: d.loss_temperature,
        },
        add_tail: d.loss_add_tail,
        sft_weight: d.sft_weight,
        lmbda: d.lmbda,
        seq_kd: d.seq_kd,
        temperature: d.temperature,
        max_new_tokens: d.max_new_tokens,
        max_seq_len: cfg.data.max_seq_len,
        eos_ids: lm.eos_ids(),
    };
    let total_steps = plan.run.total_steps;
    let mut obs = session.observer(&plan.run, Headline::All)?;
    let teacher_rows = match d.top_k {
        0 => "full vocabulary".to_string(),
        k => format!("teacher top-{k}"),
    };
    let sizes = sizes("examples", (train.len(), eval.len()), &plan.run, &trainable);
    eprintln!(
        "distill (beta {}, lmbda {}, {teacher_rows}): {sizes}",
        d.beta, d.lmbda
    );
    let summary = train_distill(
        lm.model.as_ref(),
        &trainable,
        teacher,
        &train,
        &eval,
        &plan,
        session.ctx(&mut obs),
    )?;
    obs.finish(&session.run, PLOTS);
    if !summary.run.stopped_early && summary.run.steps == total_steps {
        let out = export_student(cfg, lm, &trainable, session.run.root())?;
        eprintln!("wrote the distilled student to {}", out.display());
    }
    Ok(summary)
}

/// The student as a plain Hugging Face folder `<run>/model`: adapters merged, or every trained
/// weight in place of the base's.
fn export_student(cfg: &RunConfig, lm: &Lm, trainable: &Trainable, run: &Path) -> Result<PathBuf> {
    let out = run.join("model");
    if out.exists() {
        if !out.join("config.json").is_file() {
            bail!(
                "{}: exists and is not a model folder; move it away",
                out.display()
            );
        }
        std::fs::remove_dir_all(&out)
            .with_context(|| format!("{}: cannot replace", out.display()))?;
    }
    let mut extras = ferrotune_ckpt::ExportExtras::default();
    if let Trainable::Full { params, .. } = trainable {
        for (name, var) in params {
            extras.drop.push(name.clone());
            extras.tensors.push((name.clone(), var.as_tensor().clone()));
        }
    }
    let dtype = parse_dtype(&cfg.model.dtype)?;
    ferrotune_ckpt::export_model(&cfg.model.path, lm.model.as_ref(), &out, dtype, &extras)?;
    Ok(out)
}

/// `ferrotune data gen from-model`: the teacher's completion of every prompt, as TRL
/// prompt-completion rows (sequence-level distillation: SFT the student on them).
pub fn gen_from_model(a: &GenFromModelArgs) -> Result<usize> {
    let opts = LoadOptions {
        dtype: parse_dtype(&a.dtype)?,
        device: parse_device(&a.device)?,
        lora: None,
        trainable_base: false,
    };
    let lm = Lm::load_with(&a.model, a.adapter.as_deref(), &opts)?;
    let items = crate::grpo_run::load_prompts(&lm.tokenizer, &a.prompts, a.max_prompt_len)?;
    // The rows as written (one per prompt item, in order): every column is kept.
    let rows = read_rows(&a.prompts)?;
    if items.is_empty() || rows.len() != items.len() {
        bail!(
            "{}: {} rows, {} prompts",
            a.prompts.display(),
            rows.len(),
            items.len()
        );
    }
    let tok = &lm.tokenizer;
    let stop_rule = |_: usize, ids: &[u32]| {
        !a.stop.is_empty()
            && tok
                .decode(ids, true)
                .map(|t| a.stop.iter().any(|s| t.contains(s.as_str())))
                .unwrap_or(false)
    };
    let mut out = String::new();
    let bs = a.batch_size.max(1);
    let mut progress = Progress::auto(items.len().div_ceil(bs) as u64);
    let (t0, mut new_tokens) = (std::time::Instant::now(), 0usize);
    for (b, chunk) in items.chunks(bs).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let g = GenerateOptions {
            sampling: SamplingParams {
                temperature: a.temperature,
                top_k: None,
                top_p: a.top_p,
                seed: ferrotune_nn::splitmix64(a.seed ^ b as u64),
            },
            max_new_tokens: a.max_new_tokens,
            eos_ids: lm.eos_ids(),
            pad_id: lm.pad_id(),
            mode: Mode::EVAL,
        };
        let gens = generate(lm.model.as_ref(), &prompts, &g, &stop_rule, &lm.device)?;
        new_tokens += gens.iter().map(|g| g.ids.len()).sum::<usize>();
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        progress.update(b as u64 + 1, &[("tokens_per_s", new_tokens as f64 / secs)]);
        for (i, gen) in gens.into_iter().enumerate() {
            let text = tok.decode(&gen.ids, true)?;
            let mut row = rows[b * bs + i].fields.clone();
            let chat = row.get("prompt").is_some_and(|p| p.is_array());
            let completion = if chat {
                serde_json::json!([{"role": "assistant", "content": text}])
            } else {
                serde_json::Value::String(text)
            };
            row.insert("completion".into(), completion);
            out.push_str(&serde_json::Value::Object(row).to_string());
            out.push('\n');
        }
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    std::fs::write(&a.out, out).with_context(|| format!("{}: cannot write", a.out.display()))?;
    progress.finish();
    Ok(items.len())
}
