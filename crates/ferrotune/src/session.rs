//! What every trainer's runner does the same way, once: open the run folder (and the checkpoint
//! to resume), parse the device, load the model with its adapters, pick what is trained, resolve
//! the loop plan from `[run]`/`[optim]`/`[data]`, and report to the user ([`CliObserver`]:
//! metrics.jsonl + TensorBoard, the progress display, the regression gate, health.jsonl). A
//! runner (`sft_run`, `grpo_run`, ...) opens a [`Session`], reads its data, and calls its
//! trainer.
//!
//! Owns: the run's setup and its observer. Does not own: any method's data or plan fields.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use ferrotune_ckpt::{latest_complete, load_checkpoint, Checkpoint, OnExisting, RunDir};
use ferrotune_data::{split_items, EvalSize};
use ferrotune_models::LoadOptions;
use ferrotune_nn::{LoraConfig, TargetModules};
use ferrotune_report::{open_step_log, plot_metrics, Progress, RunLog};
use ferrotune_tokenize::Tokenizer;
use ferrotune_train::optim::AdamWConfig;
use ferrotune_train::plan::LoopPlan;
use ferrotune_train::schedule::{Schedule, Warmup};
use ferrotune_train::trainer::{EvalVerdict, Observer, RunCtx, Trainable};

use crate::config::{LoraSection, OptimSection, RunConfig};
use crate::lm::{parse_device, parse_dtype, Lm};

/// A training run as its runner sees it: the config, the run folder, the checkpoint to resume
/// from, the device (parsed once: on CUDA every tensor of the run is on this one), the model
/// with its adapters.
pub struct Session<'c> {
    pub cfg: &'c RunConfig,
    pub run: RunDir,
    pub checkpoint: Option<Checkpoint>,
    pub device: Device,
    pub lm: Lm,
    pub lora: Option<LoraConfig>,
}

impl<'c> Session<'c> {
    /// Open (or resume) the run of `cfg` and load its model.
    pub fn open(cfg: &'c RunConfig, resume: bool, overwrite: bool) -> Result<Self> {
        Self::open_on(cfg, run_device(cfg)?, resume, overwrite)
    }

    /// [`Session::open`] on a device the runner parsed already (with [`run_device`]), to load
    /// something else onto it before the run folder is touched (GRPO's reward models).
    pub fn open_on(
        cfg: &'c RunConfig,
        device: Device,
        resume: bool,
        overwrite: bool,
    ) -> Result<Self> {
        let (run, checkpoint) = open_run(cfg, resume, overwrite)?;
        let lora = cfg.lora.as_ref().map(lora_config);
        let dtype = parse_dtype(&cfg.model.dtype)?;
        let opts = LoadOptions {
            dtype,
            device: device.clone(),
            lora: lora.clone().map(|l| (l, cfg.run.seed)),
            trainable_base: lora.is_none(),
        };
        if lora.is_none() && opts.dtype != candle_core::DType::F32 {
            bail!(
                "{}: full fine-tuning needs model.dtype = \"f32\" (f32 master weights)",
                cfg.model.path.display()
            );
        }
        let mut lm = Lm::load(&cfg.model.path, &opts)?;
        lm.set_chat_template_file(cfg.model.chat_template.as_deref())?;
        Ok(Session {
            cfg,
            run,
            checkpoint,
            device,
            lm,
            lora,
        })
    }

    /// What is trained: the adapters, or every weight.
    pub fn trainable(&self) -> Result<Trainable<'_>> {
        trainable(self.cfg, &self.lm, &self.lora)
    }

    /// A second, frozen model on the run's device (see [`load_frozen`]).
    pub fn load_frozen(&self, key: &str, path: &Path) -> Result<Lm> {
        load_frozen(self.cfg, &self.device, key, path, &self.lm.tokenizer)
    }

    /// The loop plan over `n_examples` training examples (prompts, pairs).
    pub fn loop_plan(&self, n_examples: usize) -> Result<LoopPlan> {
        let total = total_steps(self.cfg, n_examples);
        loop_plan(self.cfg, total, self.lm.pad_id())
    }

    /// The observer of this run, with the regression gate of `[eval]` measured on the model as
    /// loaded.
    pub fn observer(&self, plan: &LoopPlan, headline: Headline) -> Result<CliObserver> {
        let ck = self.checkpoint.as_ref();
        let mut obs = CliObserver::start(self.cfg, &self.run, ck, plan, None, headline)?;
        obs.gate = regression_gate(self.cfg, &self.lm)?;
        Ok(obs)
    }

    /// Where the trainer runs: this run's folder, checkpoint and device, reporting to `obs`.
    pub fn ctx<'a>(&'a self, obs: &'a mut dyn Observer) -> RunCtx<'a> {
        RunCtx::new(&self.run, self.checkpoint.as_ref(), obs, &self.device)
    }

    /// A side log of the run folder (`completions.jsonl`, `health.jsonl`), cut back to the
    /// checkpoint's step on resume.
    pub fn side_log(&self, name: &str) -> Result<std::fs::File> {
        let resumed = self.checkpoint.as_ref().map(|c| c.step);
        Ok(open_step_log(self.run.root(), name, resumed)?)
    }
}

/// The run's device, `model.device`: parse it once per run and hand it on (each CUDA device
/// parsed anew gets its own id, and tensors of two ids do not mix).
pub fn run_device(cfg: &RunConfig) -> Result<Device> {
    Ok(parse_device(&cfg.model.device)?)
}

/// Optimizer steps of a run over `n` examples: `run.max_steps`, else `num_train_epochs` over
/// the examples at `batch_size × gradient_accumulation_steps` per step (at least 1).
pub fn total_steps(cfg: &RunConfig, n: usize) -> usize {
    let per_step = cfg.run.batch_size * cfg.run.gradient_accumulation_steps;
    if cfg.run.max_steps > 0 {
        cfg.run.max_steps
    } else {
        epoch_steps(cfg, n, per_step)
    }
}

/// Steps of `per_step` examples that cover `n` examples `run.num_train_epochs` times (at least
/// 1).
pub fn epoch_steps(cfg: &RunConfig, n: usize, per_step: usize) -> usize {
    ((cfg.run.num_train_epochs * n as f64) / per_step as f64)
        .ceil()
        .max(1.0) as usize
}

/// The train and eval sets of `cfg`: `data.train` and `data.eval` read with `load`, or (with
/// no `data.eval`) a `data.eval_fraction` of the train set held out.
pub fn train_and_eval<T>(
    cfg: &RunConfig,
    mut load: impl FnMut(&Path) -> Result<Vec<T>>,
) -> Result<(Vec<T>, Vec<T>)> {
    let train = load(&cfg.data.train)?;
    let eval = match &cfg.data.eval {
        Some(e) => load(e)?,
        None => Vec::new(),
    };
    held_out(cfg, train, eval)
}

/// `eval` as it is, or (with no `data.eval`) a `data.eval_fraction` of `train` held out, by
/// the run's seed.
pub fn held_out<T>(cfg: &RunConfig, train: Vec<T>, eval: Vec<T>) -> Result<(Vec<T>, Vec<T>)> {
    if cfg.data.eval.is_none() && cfg.data.eval_fraction > 0.0 {
        let frac = EvalSize::Fraction(cfg.data.eval_fraction);
        Ok(split_items(train, frac, cfg.run.seed)?)
    } else {
        Ok((train, eval))
    }
}

/// `N train / M eval <unit>, S steps of P <unit>, T trainable parameters`: the sizes every
/// runner's first line reports.
pub fn sizes(
    unit: &str,
    (train, eval): (usize, usize),
    plan: &LoopPlan,
    trainable: &Trainable,
) -> String {
    format!(
        "{train} train / {eval} eval {unit}, {} steps of {} {unit}, {} trainable parameters",
        plan.total_steps,
        plan.per_step(),
        trainable.num_params()
    )
}

/// Which metrics the progress line shows.
#[derive(Clone, Copy)]
pub enum Headline {
    /// Every logged value.
    All,
    /// These `(metric, short name)` pairs, in this order; a record with none of them (an eval
    /// hook's) is shown whole.
    Only(&'static [(&'static str, &'static str)]),
}

/// Where a trainer reports in the CLI: every metric to metrics.jsonl and TensorBoard, the
/// headline to the progress display, health findings to health.jsonl, and the regression gate
/// at eval points.
pub struct CliObserver {
    pub log: RunLog,
    pub progress: Progress,
    pub gate: Option<crate::eval::RegressionGate>,
    pub headline: Headline,
    /// `health.jsonl` (GRPO's health checks), when the run keeps one.
    pub health: Option<std::fs::File>,
}

impl CliObserver {
    /// Start (or resume) the run's log and progress display for `plan`.
    pub fn start(
        cfg: &RunConfig,
        run: &RunDir,
        checkpoint: Option<&Checkpoint>,
        plan: &LoopPlan,
        gate: Option<crate::eval::RegressionGate>,
        headline: Headline,
    ) -> Result<Self> {
        let (log, resumed_step) = start_log(cfg, run, checkpoint)?;
        Ok(CliObserver {
            log,
            gate,
            progress: Progress::auto(plan.total_steps as u64)
                .with_log_every(plan.log_every as u64)
                .resumed_from(resumed_step),
            headline,
            health: None,
        })
    }

    /// End the progress display and draw the plots of `keys` (a warning if they cannot be).
    pub fn finish(&mut self, run: &RunDir, keys: &[&str]) {
        self.progress.finish();
        if let Err(e) = plot_metrics(run.root(), keys) {
            eprintln!("warning: plots not written: {e}");
        }
    }

    /// The gate's check, as the trainers' eval hook.
    pub(crate) fn gate_check(
        &mut self,
        step: usize,
        model: &dyn ferrotune_models::CausalLm,
    ) -> std::result::Result<EvalVerdict, String> {
        let Some(g) = self.gate.as_mut() else {
            return Ok(Default::default());
        };
        let (ppl, ratio, bad) = g.check(step, model).map_err(|e| e.to_string())?;
        if bad {
            self.progress.println(&format!(
                "REGRESSION at step {step}: perplexity on {} is {ppl:.4}, {ratio:.3}x the base ({:.4}); max_ppl_ratio = {}{}",
                g.path.display(),
                g.base_ppl,
                g.max_ratio,
                if g.stop {
                    format!(
                        "; stopping (last good eval: {})",
                        g.last_good_step.map_or("none".into(), |s| format!("step {s}"))
                    )
                } else {
                    String::new()
                }
            ));
        }
        Ok(EvalVerdict {
            metrics: vec![
                ("eval/forget_ppl".into(), ppl),
                ("eval/forget_ppl_ratio".into(), ratio),
            ],
            stop: bad && g.stop,
        })
    }
}

impl Observer for CliObserver {
    fn metrics(&mut self, step: usize, values: &[(&str, f64)]) {
        if let Err(e) = self.log.log(step as u64, values) {
            self.progress
                .println(&format!("warning: cannot write metrics: {e}"));
        }
        match self.headline {
            Headline::All => self.progress.update(step as u64, values),
            Headline::Only(keys) => {
                let head: Vec<(&str, f64)> = keys
                    .iter()
                    .filter_map(|(k, short)| {
                        values
                            .iter()
                            .find(|(name, _)| name == k)
                            .map(|(_, v)| (*short, *v))
                    })
                    .collect();
                let head = if head.is_empty() { values } else { &head };
                self.progress.update(step as u64, head);
            }
        }
    }
    fn message(&mut self, msg: &str) {
        self.progress.println(msg);
    }
    fn finding(&mut self, f: &ferrotune_train::health::Finding) {
        if let Some(file) = self.health.as_mut() {
            // One record per finding, keyed by step like metrics.jsonl (resume cuts it back).
            if let Err(e) = writeln!(file, "{}", serde_json::json!(f)) {
                self.progress
                    .println(&format!("warning: cannot write health.jsonl: {e}"));
            }
        }
        self.progress.println(&f.to_string());
    }
    fn on_eval(
        &mut self,
        step: usize,
        model: &dyn ferrotune_models::CausalLm,
    ) -> std::result::Result<EvalVerdict, String> {
        self.gate_check(step, model)
    }
}

/// LoRA config from the `[lora]` section.
pub fn lora_config(l: &LoraSection) -> LoraConfig {
    let target_modules = match &l.target_modules {
        toml::Value::Array(a) => TargetModules::Names(
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
        ),
        _ => TargetModules::AllLinear,
    };
    LoraConfig {
        r: l.r,
        lora_alpha: l.lora_alpha,
        lora_dropout: l.lora_dropout,
        use_rslora: l.use_rslora,
        target_modules,
    }
}

/// The regression gate of `cfg` (`[eval] forget_set`), measured on the model as loaded (fresh
/// adapters = the base).
pub(crate) fn regression_gate(
    cfg: &RunConfig,
    lm: &Lm,
) -> Result<Option<crate::eval::RegressionGate>> {
    let Some(e) = &cfg.eval else { return Ok(None) };
    let Some(path) = &e.forget_set else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("eval.forget_set: {}: cannot read", path.display()))?;
    let ids = lm.tokenizer.encode(&text, true)?;
    if ids.len() < 2 {
        bail!(
            "eval.forget_set: {}: needs at least 2 tokens",
            path.display()
        );
    }
    let gate = crate::eval::RegressionGate::new(
        lm.model.as_ref(),
        path.clone(),
        ids,
        e.max_ppl_ratio,
        e.stop_on_regression,
        &lm.device,
    )?;
    eprintln!(
        "regression gate: base perplexity {:.4} on {} (max ratio {})",
        gate.base_ppl,
        path.display(),
        e.max_ppl_ratio
    );
    Ok(Some(gate))
}

/// Open (resume) or create the run folder of `cfg`; with `resume`, the newest complete
/// checkpoint too.
pub(crate) fn open_run(
    cfg: &RunConfig,
    resume: bool,
    overwrite: bool,
) -> Result<(RunDir, Option<ferrotune_ckpt::Checkpoint>)> {
    let out = &cfg.run.output_dir;
    Ok(if resume {
        let run = RunDir::open(out)?;
        let latest = latest_complete(&run)?
            .with_context(|| format!("{}: no complete checkpoint to resume from", out.display()))?;
        if let Some(w) = latest.warning() {
            eprintln!("warning: {w}");
        }
        let ck = load_checkpoint(&latest.path)?;
        (run, Some(ck))
    } else {
        let on = if overwrite {
            OnExisting::Overwrite
        } else {
            OnExisting::Refuse
        };
        (RunDir::create(out, on)?, None)
    })
}

/// Load a second, frozen model beside the trained one (a DPO reference, a distillation
/// teacher) with the run's device and dtype. `key` is the config key that named it (errors
/// start with it); its tokenizer must give the same ids as `tok`'s, checked before any weight is
/// read.
pub(crate) fn load_frozen(
    cfg: &RunConfig,
    device: &Device,
    key: &str,
    path: &Path,
    tok: &Tokenizer,
) -> Result<Lm> {
    let other =
        crate::lm::load_tokenizer(path).with_context(|| format!("{key} {}", path.display()))?;
    if let Some(why) = tok.vocab_mismatch(&other) {
        bail!(
            "{key} {} and model.path {} do not share a tokenizer ({why}): the two models must score the same token ids",
            path.display(),
            cfg.model.path.display()
        );
    }
    let opts = LoadOptions {
        dtype: parse_dtype(&cfg.model.dtype)?,
        device: device.clone(),
        lora: None,
        trainable_base: false,
    };
    Lm::load(path, &opts).with_context(|| format!("{key} {}", path.display()))
}

/// The loop settings every trainer shares, from `[run]`, `[optim]` and `[data]`.
pub(crate) fn loop_plan(cfg: &RunConfig, total_steps: usize, pad_id: u32) -> Result<LoopPlan> {
    Ok(LoopPlan {
        seed: cfg.run.seed,
        total_steps,
        batch_size: cfg.run.batch_size,
        grad_accum: cfg.run.gradient_accumulation_steps,
        learning_rate: cfg.optim.learning_rate,
        schedule: schedule(&cfg.optim, total_steps)?,
        adamw: adamw(&cfg.optim),
        max_grad_norm: cfg.optim.max_grad_norm,
        log_every: cfg.run.log_every,
        save_every: cfg.run.save_every,
        eval_every: cfg.run.eval_every,
        keep_last: cfg.run.keep_last,
        max_nonfinite_steps: cfg.run.max_nonfinite_steps,
        shuffle: cfg.data.shuffle,
        pad_id,
    })
}

/// The trainable parameters: the adapters, or every weight.
pub(crate) fn trainable<'a>(
    cfg: &RunConfig,
    lm: &Lm,
    lora: &'a Option<LoraConfig>,
) -> Result<Trainable<'a>> {
    Ok(match lora {
        Some(l) => {
            let params = Trainable::lora_params(lm.model.as_ref());
            if params.is_empty() {
                let wanted = match &l.target_modules {
                    TargetModules::Names(n) => format!("{n:?}"),
                    TargetModules::AllLinear => "\"all-linear\"".into(),
                };
                bail!(
                    "lora.target_modules {wanted} matches no linear layer of {} (its layers: {})",
                    cfg.model.path.display(),
                    lm.model
                        .linear_slots()
                        .iter()
                        .take(7)
                        .map(|s| s.path.rsplit('.').next().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Trainable::Lora {
                params,
                config: l,
                base_name: cfg.model.path.display().to_string(),
            }
        }
        None => Trainable::Full {
            params: lm_base_params(lm)?,
            base: Some(cfg.model.path.clone()),
        },
    })
}

/// A fresh run records its resolved config and starts `metrics.jsonl`; a resumed one keeps
/// the config and drops metrics logged after the checkpoint. Returns the log and the step
/// training starts from.
pub(crate) fn start_log(
    cfg: &RunConfig,
    run: &RunDir,
    checkpoint: Option<&ferrotune_ckpt::Checkpoint>,
) -> Result<(RunLog, u64)> {
    Ok(match checkpoint {
        Some(ck) => (RunLog::resume(run.root(), ck.step, true)?, ck.step),
        None => {
            std::fs::write(run.config_toml(), cfg.to_toml())
                .with_context(|| format!("{}: cannot write", run.config_toml().display()))?;
            (RunLog::new(run.root(), true)?, 0)
        }
    })
}

/// The learning-rate schedule of `cfg` over `total_steps`.
pub(crate) fn schedule(o: &OptimSection, total_steps: usize) -> Result<Schedule> {
    let kind = o.lr_scheduler_type;
    let warmup = if o.warmup_ratio > 0.0 {
        Warmup::Ratio(o.warmup_ratio)
    } else {
        Warmup::Steps(o.warmup_steps)
    };
    let schedule = Schedule::new(kind, warmup, total_steps)
        .map_err(|e| anyhow::anyhow!("optim.lr_scheduler_type: {e}"))?;
    Ok(schedule)
}

/// AdamW from the `[optim]` section.
pub(crate) fn adamw(o: &OptimSection) -> AdamWConfig {
    AdamWConfig {
        betas: (o.adam_beta1, o.adam_beta2),
        eps: o.adam_epsilon,
        weight_decay: o.weight_decay,
    }
}

fn lm_base_params(lm: &Lm) -> Result<Vec<(String, candle_core::Var)>> {
    let p = lm.base_params.clone();
    if p.is_empty() {
        bail!("full fine-tuning: the model exposed no trainable weights");
    }
    Ok(p)
}

/// One device per run: each CUDA device parsed anew gets its own id, so a run must parse
/// `model.device` once and hand that device to everything it loads. On CUDA (the `cuda` feature,
/// run on a GPU machine) this checks that the trained model, its adapters and a second frozen
/// model (DPO's reference) all share the session's device id; on a CPU build every device is
/// the same and there is nothing to check.
#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    #[test]
    fn a_run_puts_every_tensor_on_one_device() {
        // The build machine's checkout, or (a test binary carried to a GPU machine, run from
        // crates/ferrotune) the one two folders up.
        let root = [
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
            Path::new("../..").to_path_buf(),
        ]
        .into_iter()
        .find(|r| r.join("configs/dpo-tiny.toml").is_file())
        .expect("the repository's configs/ folder");
        let out = tempfile::tempdir().unwrap();
        let sets = [
            "model.device=cuda".to_string(),
            format!("run.output_dir={}", out.path().join("run").display()),
        ];
        let cfg = RunConfig::load(&root.join("configs/dpo-tiny.toml"), &sets).unwrap();
        let session = Session::open(&cfg, false, false).unwrap();
        let reference = session
            .load_frozen("dpo.ref_model", &cfg.model.path)
            .unwrap();
        let trainable = session.trainable().unwrap();
        let mut tensors: Vec<candle_core::Tensor> = trainable
            .params()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        for lm in [&session.lm, &reference] {
            tensors.extend(lm.model.linear_slots().iter().map(|s| s.weight.clone()));
        }
        assert!(tensors.len() > 4);
        for t in &tensors {
            assert!(
                t.device().same_device(&session.device),
                "a tensor of the run is on {:?}, the session on {:?}",
                t.device().location(),
                session.device.location()
            );
        }
    }
}
