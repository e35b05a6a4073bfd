//! The config's rules: each section's `check` (its own values, and what it needs of the rest
//! of the config), and [`RunConfig::validate`], which runs them in a fixed order and names the
//! file and key of the first refusal.
//!
//! Owns: every refusal of a config value and why. Does not own: defaults or the schema
//! (`sections.rs`), reading files (`mod.rs`).

use std::path::Path;

use super::*;

/// A refused value: its key and why.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub key: String,
    pub msg: String,
}

impl Refusal {
    /// The refusal as the error of config file `path`.
    pub(crate) fn at(self, path: &Path) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            field: self.key,
            msg: self.msg,
        }
    }
}

type Check = Result<(), Refusal>;

/// The keys whose value is one of a fixed set of names (`sections::choices`), on the raw TOML:
/// a wrong name is refused here with its key, before deserialising would refuse it without one.
pub(crate) fn check_choices(raw: &toml::Table) -> Check {
    for (key, names, why) in choices() {
        let (section, leaf) = key.split_once('.').unwrap_or((key, ""));
        let Some(v) = raw.get(section).and_then(|s| s.get(leaf)) else {
            continue;
        };
        if v.as_str().is_some_and(|s| names.contains(&s)) {
            continue;
        }
        let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        return refuse(
            key,
            match why {
                Some(why) => format!("`{shown}` {why}"),
                None => format!("`{shown}` is not one of {}", names.join(", ")),
            },
        );
    }
    Ok(())
}

fn refuse(key: &str, msg: String) -> Check {
    Err(Refusal {
        key: key.to_string(),
        msg,
    })
}

impl RunConfig {
    /// Cross-field checks, each saying why: every section's own rules, then what spans
    /// sections, in a fixed order (the first refusal is reported).
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.check().map_err(|r| r.at(path))
    }

    fn check(&self) -> Check {
        let cfg = self;
        if let Some(l) = &cfg.lora {
            l.check()?;
        }
        cfg.model.check()?;
        cfg.data.check()?;
        cfg.check_eval()?;
        cfg.run.check()?;
        cfg.optim.check()?;
        cfg.check_method()?;
        if let Some(d) = &cfg.dpo {
            d.check(cfg)?;
        }
        if let Some(r) = &cfg.reward_model {
            r.check(cfg)?;
        }
        if let Some(d) = &cfg.distill {
            d.check(cfg)?;
        }
        if let Some(p) = &cfg.ppo {
            p.check(cfg)?;
        }
        if let Some(g) = &cfg.grpo {
            g.check(cfg)?;
        }
        if cfg.lora.is_none() && cfg.model.path.extension().is_some_and(|e| e == "gguf") {
            return refuse(
                "lora",
                "full fine-tuning of a GGUF base is not supported: add a [lora] section or convert the model to safetensors (ferrotune export)".into(),
            );
        }
        Ok(())
    }

    /// `[eval]` (the regression gate) and `run.eval_every`, which needs some eval set.
    fn check_eval(&self) -> Check {
        let cfg = self;
        let forget = cfg.eval.as_ref().and_then(|e| e.forget_set.as_ref());
        if let Some(e) = &cfg.eval {
            if forget.is_none() {
                return refuse(
                    "eval.forget_set",
                    "the [eval] section needs forget_set".into(),
                );
            }
            if cfg.run.eval_every == 0 {
                return refuse(
                    "run.eval_every",
                    "the regression gate ([eval]) runs at eval steps: set run.eval_every".into(),
                );
            }
            if !(e.max_ppl_ratio > 0.0 && e.max_ppl_ratio.is_finite()) {
                return refuse("eval.max_ppl_ratio", "must be a positive number".into());
            }
        }
        if cfg.run.eval_every > 0
            && cfg.data.eval.is_none()
            && cfg.data.eval_fraction == 0.0
            && forget.is_none()
            && cfg.grpo.is_none()
        {
            return refuse(
                "run.eval_every",
                "needs an eval set: set data.eval or data.eval_fraction".into(),
            );
        }
        Ok(())
    }

    /// Exactly one method section.
    fn check_method(&self) -> Check {
        let cfg = self;
        let methods: Vec<&str> = [
            ("sft", cfg.sft.is_some()),
            ("grpo", cfg.grpo.is_some()),
            ("dpo", cfg.dpo.is_some()),
            ("ppo", cfg.ppo.is_some()),
            ("distill", cfg.distill.is_some()),
            ("reward_model", cfg.reward_model.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        match methods.as_slice() {
            [] => {
                return refuse(
                    "sft",
                    "the config needs a method section: [sft], [grpo], [dpo], [distill], [ppo] or [reward_model]".into(),
                )
            }
            [_] => {}
            [.., last] => {
                return refuse(
                    last,
                    format!(
                        "a run has exactly one method section, this one has [{}]",
                        methods.join("] and [")
                    ),
                )
            }
        }
        Ok(())
    }
}

impl LoraSection {
    /// `[lora]` on its own.
    pub(super) fn check(&self) -> Check {
        let l = self;
        if l.r == 0 {
            return refuse("lora.r", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&(l.lora_dropout as f64)) {
            return refuse("lora.lora_dropout", "must be in [0, 1)".into());
        }
        // PEFT takes any number; 0 makes the adapter a no-op that trains nothing, and a
        // negative one flips its update.
        if !(l.lora_alpha > 0.0 && l.lora_alpha.is_finite()) {
            return refuse("lora.lora_alpha", "must be a positive number".into());
        }
        match &l.target_modules {
            toml::Value::String(s) if s == "all-linear" => {}
            toml::Value::Array(a) if !a.is_empty() && a.iter().all(|v| v.is_str()) => {}
            _ => {
                return refuse(
                    "lora.target_modules",
                    "must be a non-empty list of module names or \"all-linear\"".into(),
                )
            }
        }
        Ok(())
    }
}

impl ModelSection {
    /// `[model]` on its own.
    pub(super) fn check(&self) -> Check {
        if let Err(e) = crate::lm::parse_dtype(&self.dtype) {
            return refuse("model.dtype", e.to_string());
        }
        Ok(())
    }
}

impl DataSection {
    /// `[data]` on its own.
    pub(super) fn check(&self) -> Check {
        if self.max_seq_len < 2 {
            return refuse("data.max_seq_len", "must be at least 2".into());
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return refuse("data.eval_fraction", "must be in [0, 1)".into());
        }
        if self.eval.is_some() && self.eval_fraction > 0.0 {
            return refuse(
                "data.eval_fraction",
                "give either data.eval or data.eval_fraction, not both".into(),
            );
        }
        Ok(())
    }
}

impl RunSection {
    /// `[run]` on its own.
    pub(super) fn check(&self) -> Check {
        if self.batch_size == 0 {
            return refuse("run.batch_size", "must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return refuse(
                "run.gradient_accumulation_steps",
                "must be at least 1".into(),
            );
        }
        if self.max_steps == 0 && self.num_train_epochs <= 0.0 {
            return refuse(
                "run.max_steps",
                "set max_steps or a positive num_train_epochs".into(),
            );
        }
        if self.log_every == 0 {
            return refuse("run.log_every", "must be at least 1".into());
        }
        Ok(())
    }
}

impl OptimSection {
    /// `[optim]` on its own.
    pub(crate) fn check(&self) -> Check {
        let o = self;
        if !(o.learning_rate > 0.0 && o.learning_rate.is_finite()) {
            return refuse("optim.learning_rate", "must be a positive number".into());
        }
        if !(0.0..1.0).contains(&o.adam_beta1) || !(0.0..1.0).contains(&o.adam_beta2) {
            return refuse("optim.adam_beta1", "betas must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&o.warmup_ratio) {
            return refuse("optim.warmup_ratio", "must be in [0, 1)".into());
        }
        if !(o.max_grad_norm >= 0.0 && o.max_grad_norm.is_finite()) {
            return refuse(
                "optim.max_grad_norm",
                "must be >= 0 (0 = no clipping)".into(),
            );
        }
        if o.warmup_steps > 0 && o.warmup_ratio > 0.0 {
            return refuse(
                "optim.warmup_ratio",
                "give either warmup_steps or warmup_ratio, not both".into(),
            );
        }
        Ok(())
    }
}

impl DpoSection {
    /// `[dpo]`, with what it needs of the rest of the config.
    pub(super) fn check(&self, cfg: &RunConfig) -> Check {
        let d = self;
        if cfg.lora.is_none() && d.ref_model.is_none() {
            return refuse(
                    "dpo",
                    "the DPO reference is the base with adapters switched off, so [dpo] needs a [lora] section (or set dpo.ref_model for full fine-tuning)".into(),
                );
        }
        if !(d.beta.is_finite() && d.beta > 0.0) {
            return refuse(
                "dpo.beta",
                format!(
                    "must be a positive number (it scales the log-ratio margin), got {}",
                    d.beta
                ),
            );
        }
        let loss = ferrotune_train::pref_loss::DpoConfig {
            beta: d.beta,
            loss_type: d.loss_type,
            label_smoothing: d.label_smoothing,
        };
        if let Err(e) = loss.validate() {
            let msg = e.to_string();
            let msg = msg.strip_prefix("DPO config: ").unwrap_or(&msg).to_string();
            return refuse("dpo.label_smoothing", msg);
        }
        if d.max_length < 2 {
            return refuse(
                "dpo.max_length",
                "must be at least 2 (a prompt token and a completion token)".into(),
            );
        }
        if cfg.data.packing {
            return refuse(
                "data.packing",
                "does not apply to DPO (chosen and rejected are scored as whole sequences)".into(),
            );
        }
        Ok(())
    }
}

impl RewardModelSection {
    /// `[reward_model]`, with what it needs of the rest of the config.
    pub(super) fn check(&self, cfg: &RunConfig) -> Check {
        let r = self;
        if cfg.lora.is_none() {
            return refuse(
                    "reward_model",
                    "the body is trained through LoRA adapters (the head is always trainable), so [reward_model] needs a [lora] section".into(),
                );
        }
        if r.max_length < 2 {
            return refuse("reward_model.max_length", "must be at least 2".into());
        }
        if let Some(c) = r.center_rewards_coefficient {
            if !(c.is_finite() && c >= 0.0) {
                return refuse(
                    "reward_model.center_rewards_coefficient",
                    format!("must be a finite number >= 0, got {c}"),
                );
            }
        }
        if cfg.data.packing {
            return refuse(
                "data.packing",
                "does not apply to a reward model (each side is scored as a whole sequence)".into(),
            );
        }
        if cfg.eval.is_some() {
            return refuse(
                    "eval",
                    "the perplexity gate measures a language model; a reward model's score head has no perplexity (use data.eval for its pairwise accuracy)".into(),
                );
        }
        Ok(())
    }
}

impl DistillSection {
    /// `[distill]`, with what it needs of the rest of the config.
    pub(super) fn check(&self, cfg: &RunConfig) -> Check {
        let d = self;
        if let Some(msg) = distill_problem(d) {
            return refuse(msg.0, msg.1);
        }
        if cfg.data.packing {
            return refuse(
                "data.packing",
                "does not apply to distillation (completions are sampled and scored per example)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl PpoSection {
    /// `[ppo]`, with what it needs of the rest of the config.
    pub(super) fn check(&self, cfg: &RunConfig) -> Check {
        let p = self;
        if let Some(msg) = ppo_problem(p, cfg) {
            return refuse(msg.0, msg.1);
        }
        Ok(())
    }
}

impl GrpoSection {
    /// `[grpo]`, with what it needs of the rest of the config.
    pub(super) fn check(&self, cfg: &RunConfig) -> Check {
        let g = self;
        if g.num_generations < 2 {
            return refuse(
                "grpo.num_generations",
                "must be at least 2 (advantages are relative to the group)".into(),
            );
        }
        let per_step = cfg.run.batch_size * cfg.run.gradient_accumulation_steps;
        if !per_step.is_multiple_of(g.num_generations) {
            return refuse(
                    "grpo.num_generations",
                    format!("run.batch_size x run.gradient_accumulation_steps = {per_step} completions per step must be divisible by num_generations = {}", g.num_generations),
                );
        }
        if g.max_prompt_len == 0 || g.max_completion_len == 0 {
            return refuse(
                "grpo.max_completion_len",
                "max_prompt_len and max_completion_len must be at least 1".into(),
            );
        }
        if !(g.temperature > 0.0 && g.temperature.is_finite()) {
            return refuse(
                "grpo.temperature",
                "must be positive (GRPO needs sampled completions)".into(),
            );
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return refuse("grpo.top_p", "must be in (0, 1]".into());
        }
        if g.beta < 0.0 || !g.beta.is_finite() {
            return refuse("grpo.beta", "must be >= 0".into());
        }
        if g.beta > 0.0 && cfg.lora.is_none() {
            return refuse(
                    "grpo.beta",
                    "the KL reference is the base with adapters switched off, so beta > 0 needs a [lora] section (or set beta = 0 for full fine-tuning)".into(),
                );
        }
        if !(0.0..1.0).contains(&g.epsilon) {
            return refuse("grpo.epsilon", "must be in [0, 1)".into());
        }
        if g.epsilon_high.is_some_and(|e| e < 0.0 || !e.is_finite()) {
            return refuse("grpo.epsilon_high", "must be >= 0".into());
        }
        if g.loss_type == ferrotune_train::grpo_loss::LossType::Cispo && g.epsilon_high.is_none() {
            return refuse(
                "grpo.epsilon_high",
                "cispo caps the importance weight at epsilon_high, which must be set (CISPO and ScaleRL use 5.0); TRL's fallback to epsilon = 0.2 would cap every weight at 0.2".into(),
            );
        }
        if g.delta.is_some_and(|d| d <= 0.0 || !d.is_finite()) {
            return refuse(
                "grpo.delta",
                "must be > 0 (1 + epsilon_high or more is recommended)".into(),
            );
        }
        for (key, t) in [
            ("grpo.sapo_temperature_pos", g.sapo_temperature_pos),
            ("grpo.sapo_temperature_neg", g.sapo_temperature_neg),
        ] {
            if t <= 0.0 || !t.is_finite() {
                return refuse(key, "must be > 0".into());
            }
        }
        if !(0.0..=1.0).contains(&g.top_entropy_quantile) {
            return refuse(
                "grpo.top_entropy_quantile",
                "must be in [0, 1] (1 = every token)".into(),
            );
        }
        if g.num_iterations == 0 {
            return refuse("grpo.num_iterations", "must be at least 1".into());
        }
        if g.max_tool_calling_iterations == Some(0) {
            return refuse(
                "grpo.max_tool_calling_iterations",
                "must be at least 1 (leave it out for no limit, or remove [[grpo.tools]])".into(),
            );
        }
        if g.max_tool_calling_iterations.is_some() && g.tools.is_empty() {
            return refuse(
                "grpo.max_tool_calling_iterations",
                "is set but there are no [[grpo.tools]] to call".into(),
            );
        }
        if g.dynamic_sampling && g.max_num_gen_batches == 0 {
            return refuse(
                "grpo.max_num_gen_batches",
                "must be at least 1 (a bound on generation rounds, so a task whose groups all agree cannot loop forever)".into(),
            );
        }
        if cfg.run.save_every > 0 && !cfg.run.save_every.is_multiple_of(g.num_iterations) {
            return refuse(
                    "run.save_every",
                    format!("must be a multiple of grpo.num_iterations = {} (checkpoints are taken between generation batches, so resume is exact)", g.num_iterations),
                );
        }
        if g.rewards.is_empty() {
            return refuse(
                "grpo.rewards",
                "needs at least one reward function, e.g. rewards = [{ name = \"answer_match\" }]"
                    .into(),
            );
        }
        if cfg.data.packing {
            return refuse(
                "data.packing",
                "does not apply to GRPO (prompts are generated from, not packed)".into(),
            );
        }
        Ok(())
    }
}

/// The first `[distill]` setting that cannot work, with why.
fn distill_problem(d: &DistillSection) -> Option<(&'static str, String)> {
    let unit = |x: f64| (0.0..=1.0).contains(&x);
    if !unit(d.lmbda) {
        return Some((
            "distill.lmbda",
            format!("must be in [0, 1] (a probability), got {}", d.lmbda),
        ));
    }
    if !unit(d.beta) {
        return Some(("distill.beta", format!("must be in [0, 1], got {}", d.beta)));
    }
    if !(d.temperature > 0.0 && d.temperature.is_finite()) {
        return Some((
            "distill.temperature",
            "must be positive (completions are sampled)".into(),
        ));
    }
    if !(d.loss_temperature > 0.0 && d.loss_temperature.is_finite()) {
        return Some(("distill.loss_temperature", "must be positive".into()));
    }
    if !(d.sft_weight >= 0.0 && d.sft_weight.is_finite()) {
        return Some(("distill.sft_weight", "must be a finite number >= 0".into()));
    }
    if (d.lmbda > 0.0 || d.seq_kd) && d.max_new_tokens == 0 {
        return Some((
            "distill.max_new_tokens",
            "must be at least 1 when completions are sampled (lmbda > 0 or seq_kd)".into(),
        ));
    }
    if d.teacher_cache.is_some() {
        if d.top_k == 0 {
            return Some((
                "distill.top_k",
                "a teacher cache holds the teacher's top-k log-probs: set top_k (e.g. 20)".into(),
            ));
        }
        if d.lmbda > 0.0 || d.seq_kd {
            return Some(("distill.teacher_cache", "on-policy (lmbda > 0) and seq_kd completions are sampled during training, so only the live teacher can score them: set lmbda = 0 and seq_kd = false, or remove teacher_cache".into()));
        }
    }
    None
}

/// The first `[ppo]` setting that cannot work, with why.
fn ppo_problem(p: &PpoSection, cfg: &RunConfig) -> Option<(&'static str, String)> {
    if cfg.lora.is_none() {
        return Some(("ppo", "the KL reference is the base with adapters switched off, so [ppo] needs a [lora] section".into()));
    }
    if p.reward_model_path.is_none() && p.rewards.is_empty() {
        return Some(("ppo.rewards", "PPO needs a reward: set ppo.reward_model_path, or reward functions, e.g. rewards = [{ name = \"answer_match\" }]".into()));
    }
    if p.num_ppo_epochs == 0 || p.num_mini_batches == 0 {
        return Some((
            "ppo.num_ppo_epochs",
            "num_ppo_epochs and num_mini_batches must be at least 1".into(),
        ));
    }
    if p.max_prompt_len == 0 || p.max_completion_len == 0 {
        return Some((
            "ppo.max_completion_len",
            "max_prompt_len and max_completion_len must be at least 1".into(),
        ));
    }
    if cfg.run.batch_size * cfg.run.gradient_accumulation_steps * p.num_mini_batches < 2 {
        return Some((
            "run.batch_size",
            "a rollout batch needs at least 2 completions (advantages are whitened over it)".into(),
        ));
    }
    if !(p.temperature > 0.0 && p.temperature.is_finite()) {
        return Some((
            "ppo.temperature",
            "must be positive (PPO needs sampled completions)".into(),
        ));
    }
    if p.missing_eos_penalty.is_some_and(|x| !x.is_finite()) {
        return Some(("ppo.missing_eos_penalty", "must be a finite number".into()));
    }
    let loss = p.loss_config();
    if let Err(e) = loss.validate() {
        let msg = e.to_string();
        let msg = msg.strip_prefix("PPO config: ").unwrap_or(&msg).to_string();
        return Some(("ppo", msg));
    }
    if cfg.data.packing {
        return Some((
            "data.packing",
            "does not apply to PPO (prompts are generated from, not packed)".into(),
        ));
    }
    None
}
