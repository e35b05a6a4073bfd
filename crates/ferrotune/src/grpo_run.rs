//! `ferrotune train` for a `[grpo]` config: prompts (TRL's `prompt` column, plain or
//! conversational, with `answer` and any other columns for the rewards) → token ids → the GRPO
//! loop of `ferrotune-train`, with the text side supplied here: decoding, stop strings, the
//! reward functions of `ferrotune-rewards`, and `completions.jsonl`. Health findings go to the
//! terminal and to `health.jsonl` in the run folder; plots are drawn at the end.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_data::{prompt_examples, read_rows, split, EvalSize, Example, Segment};
use ferrotune_generate::{Finish, Generation, SamplingParams};
use ferrotune_report::plot_metrics;
use ferrotune_rewards::tools::ToolSet;
use ferrotune_rewards::{RewardSet, RewardSpec, Sample};
use ferrotune_tokenize::tools::{tool_suffix_ids, ToolCallFormat};
use ferrotune_tokenize::{Message, Tokenizer};
use ferrotune_train::grpo::{train_grpo, GrpoPlan, GrpoSummary};
use ferrotune_train::grpo_loss::LossConfig;
use ferrotune_train::rollout::{CompletionRecord, Env, RewardRole, Split, ToolTurn};
use serde_json::{json, Map, Value};

use crate::config::{GrpoSection, RunConfig};
use crate::lm::Lm;
use crate::session::{epoch_steps, loop_plan, run_device, Headline, Session};

/// A prompt ready to generate from.
#[derive(Debug, Clone)]
pub struct PromptItem {
    pub ids: Vec<u32>,
    /// The prompt as the model sees it (chat prompts: rendered with the template).
    pub text: String,
    /// Every column of the row (incl. `answer`), for the rewards.
    pub row: Map<String, Value>,
}

/// Tokenize prompt examples: chat prompts through the chat template with the generation
/// prompt, plain ones as they are (no special tokens added, as TRL); longer than `max_len`
/// keeps the last tokens. Returns the items and how many were cut.
pub fn prompt_items(
    tok: &Tokenizer,
    examples: &[Example],
    max_len: usize,
    path: &Path,
) -> Result<(Vec<PromptItem>, usize)> {
    prompt_items_with_tools(tok, examples, max_len, path, None)
}

/// [`prompt_items`] with the `tools` list the chat template renders (multi-turn tool use);
/// tools need conversational prompts, so a plain-text prompt is refused.
pub fn prompt_items_with_tools(
    tok: &Tokenizer,
    examples: &[Example],
    max_len: usize,
    path: &Path,
    tools: Option<&Value>,
) -> Result<(Vec<PromptItem>, usize)> {
    let mut out = Vec::with_capacity(examples.len());
    let mut cut = 0;
    for (i, ex) in examples.iter().enumerate() {
        let Example::Prompt {
            prompt,
            answer,
            fields,
        } = ex
        else {
            bail!("{}: row {}: not a prompt row", path.display(), i + 1);
        };
        let (mut ids, text) = match prompt {
            Segment::Text(_) if tools.is_some() => return Err(tools_need_chat(path, i)),
            Segment::Text(t) => (
                tok.encode(t, false)
                    .with_context(|| format!("{}: row {}", path.display(), i + 1))?,
                t.clone(),
            ),
            Segment::Chat(msgs) => {
                let r = tok
                    .render_with_tools(msgs, true, tools)
                    .with_context(|| format!("{}: row {}", path.display(), i + 1))?;
                (r.ids, r.text)
            }
        };
        if ids.is_empty() {
            bail!("{}: row {}: the prompt is empty", path.display(), i + 1);
        }
        if ids.len() > max_len {
            ids.drain(..ids.len() - max_len);
            cut += 1;
        }
        let mut row = fields.clone();
        if let Some(a) = answer {
            row.entry("answer")
                .or_insert_with(|| Value::String(a.clone()));
        }
        out.push(PromptItem { ids, text, row });
    }
    Ok((out, cut))
}

/// The error for a plain-text prompt (row index `i`) in a run with tools.
fn tools_need_chat(path: &Path, i: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: row {}: grpo.tools needs conversational prompts (a `prompt` list of messages), so the chat template can list the tools and render their replies",
        path.display(),
        i + 1
    )
}

/// Read a prompt file into items.
pub fn load_prompts(tok: &Tokenizer, path: &Path, max_len: usize) -> Result<Vec<PromptItem>> {
    load_prompts_with_tools(tok, path, max_len, None)
}

/// [`load_prompts`] rendering chat prompts with a `tools` list.
pub fn load_prompts_with_tools(
    tok: &Tokenizer,
    path: &Path,
    max_len: usize,
    tools: Option<&Value>,
) -> Result<Vec<PromptItem>> {
    let rows = read_rows(path)?;
    let examples = prompt_examples(&rows, path)?;
    let (items, cut) = prompt_items_with_tools(tok, &examples, max_len, path, tools)?;
    if cut > 0 {
        eprintln!(
            "warning: {}: {cut} of {} prompts longer than max_prompt_len = {max_len} tokens keep only their last {max_len}",
            path.display(),
            items.len()
        );
    }
    Ok(items)
}

/// The text side of a GRPO run.
pub struct TextEnv<'a> {
    pub tokenizer: &'a Tokenizer,
    pub train: Vec<PromptItem>,
    pub eval: Vec<PromptItem>,
    pub rewards: &'a RewardSet,
    pub roles: Vec<RewardRole>,
    pub stop: Vec<String>,
    /// `completions.jsonl`, when logging completions.
    pub completions: Option<std::fs::File>,
    /// Samples the rewards could not judge since the last drain: (reward, reason) and count.
    pub failures: Vec<(String, String)>,
    pub failed: usize,
    /// Multi-turn tool use (`[[grpo.tools]]`), when configured.
    pub tools: Option<&'a ToolEnv>,
}

impl<'a> TextEnv<'a> {
    /// An env with no completions log and no tools (set `completions` / `tools` after).
    pub fn new(
        tokenizer: &'a Tokenizer,
        (train, eval): (Vec<PromptItem>, Vec<PromptItem>),
        rewards: &'a RewardSet,
        roles: Vec<RewardRole>,
        stop: Vec<String>,
    ) -> Self {
        TextEnv {
            tokenizer,
            train,
            eval,
            rewards,
            roles,
            stop,
            completions: None,
            failures: Vec::new(),
            failed: 0,
            tools: None,
        }
    }
}

/// The tools of a run and how the model's calls are read and answered.
pub struct ToolEnv {
    pub set: ToolSet,
    /// `set.schemas()`, as the chat template renders them.
    pub schemas: Value,
    pub format: ToolCallFormat,
    /// `grpo.max_tool_calling_iterations` (no limit: bounded by max_completion_len).
    pub max_rounds: usize,
}

impl ToolEnv {
    /// The tools `set` (at most `max_rounds` rounds per completion; none = no limit), checked
    /// against the model's chat template: it must render tool
    /// replies after sampled ids unchanged (prefix-preserving), or none can be appended.
    pub fn new(set: ToolSet, max_rounds: Option<usize>, tok: &Tokenizer) -> Result<ToolEnv> {
        let schemas = set.schemas();
        let source = tok
            .chat_template()
            .context("grpo.tools: the model has no chat template to render tool calls with")?;
        let format = ToolCallFormat::detect(source);
        let probe = [Message::tool(set.names()[0], "0")];
        tool_suffix_ids(tok, &probe, Some(&schemas)).context("grpo.tools")?;
        Ok(ToolEnv {
            set,
            schemas,
            format,
            max_rounds: max_rounds.unwrap_or(usize::MAX),
        })
    }

    /// Answers the calls in one model turn: each call's reply (or `{"error": ...}` for an
    /// unknown tool, bad arguments, a malformed call or a failing program) as a `tool` message.
    pub fn answer(&self, turn_text: &str) -> Option<(Vec<Message>, usize)> {
        let parsed = self.format.parse(turn_text);
        if parsed.calls.is_empty() {
            return None;
        }
        let mut failures = 0;
        let replies = parsed
            .calls
            .iter()
            .map(|c| {
                let (name, reply) = match c {
                    Ok(call) => {
                        let f = &call.function;
                        (f.name.clone(), self.set.call(&f.name, &f.arguments.0))
                    }
                    Err(reason) => ("invalid_call".to_string(), Err(reason.clone())),
                };
                let content = reply.unwrap_or_else(|e| {
                    failures += 1;
                    json!({ "error": e }).to_string()
                });
                Message::tool(name, content)
            })
            .collect();
        Some((replies, failures))
    }
}

/// What a reward function measures, by its registry name.
pub fn role_of(name: &str) -> RewardRole {
    match name {
        "answer_match" | "code_tests" => RewardRole::Correctness,
        "format_tags" => RewardRole::Format,
        _ => RewardRole::Other,
    }
}

/// Parse the `grpo.rewards` tables into specs (errors name the entry).
pub fn reward_specs(g: &GrpoSection) -> Result<Vec<RewardSpec>> {
    g.rewards
        .iter()
        .enumerate()
        .map(|(i, t)| {
            RewardSpec::deserialize(toml::Value::Table(t.clone()))
                .map_err(|e| anyhow::anyhow!("grpo.rewards[{i}]: {e}"))
        })
        .collect()
}

use serde::Deserialize;

impl TextEnv<'_> {
    fn items(&self, split: Split) -> &[PromptItem] {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// One completion as `completions.jsonl` and `eval --completions` write it: the prompt, the
    /// completion, each reward (null where it does not apply), the total, the token count and,
    /// with tools, every turn.
    pub(crate) fn completion_record(
        &self,
        prompt: &str,
        ids: &[u32],
        injected: &[std::ops::Range<usize>],
        rewards: &[Option<f64>],
        total: f64,
    ) -> Value {
        let per: Map<String, Value> = self
            .rewards
            .labels()
            .into_iter()
            .zip(rewards)
            .map(|(l, s)| (l, s.map_or(Value::Null, |v| json!(v))))
            .collect();
        let mut rec = json!({
            "prompt": prompt,
            "completion": self.decode(ids),
            "rewards": per,
            "reward": total,
            "tokens": ids.len(),
        });
        if !injected.is_empty() {
            rec["turns"] = Value::Array(self.turns(ids, injected));
        }
        rec
    }

    /// A multi-turn completion as its turns: the model's text and the tool replies (with the
    /// template's framing), in order.
    fn turns(&self, ids: &[u32], injected: &[std::ops::Range<usize>]) -> Vec<Value> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in injected {
            if r.start > at {
                out.push(json!({"role": "assistant", "text": self.decode(&ids[at..r.start])}));
            }
            out.push(json!({"role": "tool", "text": self.decode(&ids[r.clone()])}));
            at = r.end;
        }
        if at < ids.len() {
            out.push(json!({"role": "assistant", "text": self.decode(&ids[at..])}));
        }
        out
    }
}

impl Env for TextEnv<'_> {
    fn len(&self, split: Split) -> usize {
        self.items(split).len()
    }
    fn prompt_ids(&self, split: Split, index: usize) -> &[u32] {
        &self.items(split)[index].ids
    }
    fn reward_labels(&self) -> Vec<String> {
        self.rewards.labels()
    }
    fn reward_weights(&self) -> Vec<f64> {
        self.rewards.weights()
    }
    fn reward_roles(&self) -> Vec<RewardRole> {
        self.roles.clone()
    }
    fn score(
        &mut self,
        split: Split,
        items: &[usize],
        gens: &[Generation],
    ) -> std::result::Result<Vec<Vec<Option<f64>>>, String> {
        // A multi-turn completion is scored on the model's final turn (what it answered after
        // its last tool reply), so a tool's output is never taken for the model's answer.
        let texts: Vec<String> = gens
            .iter()
            .map(|g| {
                let start = g.injected.last().map_or(0, |r| r.end);
                self.decode(&g.ids[start..])
            })
            .collect();
        let pool = self.items(split);
        let samples: Vec<Sample> = items
            .iter()
            .zip(&texts)
            .zip(gens)
            .map(|((&i, t), g)| Sample {
                prompt: &pool[i].text,
                completion: t,
                completion_tokens: g.model_tokens(),
                row: &pool[i].row,
            })
            .collect();
        let scored = self.rewards.score(&samples);
        for (label, fails) in self.rewards.labels().iter().zip(&scored.failures) {
            self.failed += fails.len();
            for f in fails.iter().take(3) {
                self.failures.push((label.clone(), f.reason.clone()));
            }
        }
        Ok(scored.per_reward)
    }
    fn drain_failures(&mut self) -> (Vec<String>, usize) {
        let n = std::mem::take(&mut self.failed);
        let notes = std::mem::take(&mut self.failures)
            .into_iter()
            .take(3)
            .map(|(l, r)| format!("reward `{l}` could not judge a sample (scored 0): {r}"))
            .collect();
        (notes, n)
    }
    fn stop(&self, ids: &[u32]) -> bool {
        if self.stop.is_empty() {
            return false;
        }
        // Stop strings are short: the tail of the completion is enough to find them.
        let tail = self.decode(&ids[ids.len().saturating_sub(16)..]);
        self.stop.iter().any(|s| tail.contains(s.as_str()))
    }
    fn max_tool_rounds(&self) -> usize {
        self.tools.as_ref().map_or(0, |t| t.max_rounds)
    }
    fn calls_tool(&self, completion: &[u32], turn_start: usize) -> bool {
        self.tools.as_ref().is_some_and(|t| {
            !t.format
                .parse(&self.decode(&completion[turn_start..]))
                .calls
                .is_empty()
        })
    }
    fn tool_turn(
        &mut self,
        _split: Split,
        _item: usize,
        completion: &[u32],
        turn_start: usize,
    ) -> Option<ToolTurn> {
        let tools = self.tools.as_ref()?;
        let text = self.decode(&completion[turn_start..]);
        let (replies, failures) = tools.answer(&text)?;
        // Prefix preservation was checked when the run opened; a render that fails now ends
        // the completion rather than appending ids the template would not produce.
        let ids = tool_suffix_ids(self.tokenizer, &replies, Some(&tools.schemas)).ok()?;
        Some(ToolTurn {
            ids,
            calls: replies.len(),
            failures,
        })
    }
    fn record(&mut self, step: usize, rows: &[CompletionRecord]) {
        let lines: Vec<String> = rows
            .iter()
            .map(|r| {
                let mut rec = self.completion_record(
                    &self.train[r.item].text,
                    &r.ids,
                    &r.injected,
                    &r.rewards,
                    r.total,
                );
                rec["step"] = json!(step);
                rec["advantage"] = json!(r.advantage);
                rec["finish"] = json!(match r.finish {
                    Finish::Eos => "eos",
                    Finish::Stop => "stop",
                    Finish::Length => "length",
                });
                rec.to_string()
            })
            .collect();
        if let Some(f) = self.completions.as_mut() {
            for l in lines {
                // Logging is advisory: a full disk must not stop training here (metrics
                // writing reports it).
                let _ = writeln!(f, "{l}");
            }
        }
    }
}

/// The progress line shows a few headline numbers; metrics.jsonl gets all of them.
const HEADLINE: &[(&str, &str)] = &[
    ("reward", "reward"),
    ("kl", "kl"),
    ("completions/mean_length", "len"),
    ("loss", "loss"),
    ("tokens_per_s/rollout", "gen_tok/s"),
    ("eval/reward", "eval/reward"),
];

/// Plan of a GRPO run from the config.
pub fn grpo_plan(cfg: &RunConfig, g: &GrpoSection, lm: &Lm, n_prompts: usize) -> Result<GrpoPlan> {
    let completions_per_step = cfg.run.batch_size * cfg.run.gradient_accumulation_steps;
    let prompts_per_step = completions_per_step / g.num_generations;
    let total_steps = if cfg.run.max_steps > 0 {
        cfg.run.max_steps
    } else {
        epoch_steps(cfg, n_prompts, prompts_per_step) * g.num_iterations
    };
    Ok(GrpoPlan {
        run: loop_plan(cfg, total_steps, lm.pad_id())?,
        num_generations: g.num_generations,
        num_iterations: g.num_iterations,
        max_completion_len: g.max_completion_len,
        sampling: SamplingParams {
            temperature: g.temperature,
            top_k: (g.top_k > 0).then_some(g.top_k),
            top_p: (g.top_p < 1.0).then_some(g.top_p),
            seed: cfg.run.seed,
        },
        loss: LossConfig {
            epsilon_low: g.epsilon,
            epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
            beta: g.beta,
            use_bias_correction_kl: g.use_bias_correction_kl,
            importance_sampling_level: g.importance_sampling_level,
            delta: g.delta,
            sapo_temperature_pos: g.sapo_temperature_pos,
            sapo_temperature_neg: g.sapo_temperature_neg,
            top_entropy_quantile: g.top_entropy_quantile,
            ..LossConfig::new(g.loss_type, g.max_completion_len)
        },
        scale_rewards: g.scale_rewards,
        mask_truncated_completions: g.mask_truncated_completions,
        dynamic_sampling: g.dynamic_sampling,
        max_num_gen_batches: g.max_num_gen_batches,
        log_completions: g.log_completions,
        eos_ids: lm.eos_ids(),
    })
}

/// Plots of a GRPO run (reward curves, KL, lengths, loss).
pub fn grpo_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let records = ferrotune_report::read_metrics(&run_dir.join("metrics.jsonl"))?;
    let keys: Vec<String> = ferrotune_report::numeric_keys(&records)
        .into_iter()
        .filter(|k| {
            k == "reward"
                || k == "kl"
                || k == "loss"
                || k.starts_with("rewards/") && k.ends_with("/mean")
                || k.starts_with("eval/")
                || k.starts_with("completions/")
                || k == "frac_reward_zero_std"
        })
        .collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    Ok(plot_metrics(run_dir, &refs)?)
}

/// The tools of `[[grpo.tools]]` (none configured: `None`), after checking that every prompt
/// of `files` is conversational (the chat template lists the tools and renders their replies).
pub fn grpo_tool_set<'p>(
    g: &GrpoSection,
    files: impl IntoIterator<Item = &'p PathBuf>,
) -> Result<Option<ToolSet>> {
    if g.tools.is_empty() {
        return Ok(None);
    }
    let set = ToolSet::from_specs(&g.tools)?;
    for path in files {
        let rows = read_rows(path)?;
        let text_row = prompt_examples(&rows, path)?.iter().position(|ex| {
            matches!(
                ex,
                Example::Prompt {
                    prompt: Segment::Text(_),
                    ..
                }
            )
        });
        if let Some(i) = text_row {
            return Err(tools_need_chat(path, i));
        }
    }
    Ok(Some(set))
}

/// The prompts of `task` for evaluating `lm` as the GRPO run `g` trained it: with the run's
/// tools (listed in the prompts, answered during generation), if it has any.
pub fn task_prompts(
    g: Option<&GrpoSection>,
    task: &Path,
    lm: &Lm,
    max_prompt_len: usize,
) -> Result<(Vec<PromptItem>, Option<ToolEnv>)> {
    let tools = match g {
        // Plain-text rows are refused as the prompts load (tools_need_chat).
        Some(g) => grpo_tool_set(g, std::iter::empty())?
            .map(|set| ToolEnv::new(set, g.max_tool_calling_iterations, &lm.tokenizer))
            .transpose()?,
        None => None,
    };
    let schemas = tools.as_ref().map(|t| &t.schemas);
    let items = load_prompts_with_tools(&lm.tokenizer, task, max_prompt_len, schemas)?;
    Ok((items, tools))
}

/// Run (or resume) a GRPO config.
pub fn run_grpo(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<GrpoSummary> {
    let g = cfg
        .grpo
        .as_ref()
        .context("the config has no [grpo] section")?;
    let specs = reward_specs(g)?;
    // The tools' schemas are rendered into the prompts, so they exist before the prompts;
    // and they need chat prompts, checked before the run folder is made.
    let tool_set = grpo_tool_set(
        g,
        std::iter::once(&cfg.data.train).chain(cfg.data.eval.as_ref()),
    )?;
    let schemas = tool_set.as_ref().map(|t| t.schemas());
    let rl = RlRun::open(
        cfg,
        &specs,
        "grpo.rewards",
        g.max_prompt_len,
        schemas.as_ref(),
        (resume, overwrite),
    )?;
    let session = &rl.session;
    let tools = tool_set
        .map(|set| ToolEnv::new(set, g.max_tool_calling_iterations, &session.lm.tokenizer))
        .transpose()?;
    let trainable = session.trainable()?;
    let lm = &session.lm;
    let plan = grpo_plan(cfg, g, lm, rl.train.len())?;
    let mut obs = session.observer(&plan.run, Headline::Only(HEADLINE))?;
    let mut env = TextEnv::new(
        &lm.tokenizer,
        (rl.train, rl.eval),
        &rl.rewards,
        rl.roles,
        g.stop.clone(),
    );
    env.tools = tools.as_ref();
    if g.log_completions {
        env.completions = Some(session.side_log("completions.jsonl")?);
    }
    obs.health = Some(session.side_log("health.jsonl")?);
    eprintln!(
        "grpo: {} train / {} eval prompts, {} steps of {} prompts x {} completions, loss {} ({}-level weights), beta {}, {} trainable parameters",
        env.train.len(),
        env.eval.len(),
        plan.run.total_steps,
        plan.prompts_per_step(),
        plan.num_generations,
        g.loss_type,
        g.importance_sampling_level,
        g.beta,
        trainable.num_params()
    );
    let summary = train_grpo(
        lm.model.as_ref(),
        &trainable,
        &mut env,
        &plan,
        session.ctx(&mut obs),
    )?;
    obs.progress.finish();
    if let Err(e) = grpo_plots(session.run.root()) {
        eprintln!("warning: plots not written: {e}");
    }
    Ok(summary)
}

/// What an RL run (GRPO, PPO) opens before its plan: the reward functions (a `model` entry
/// loads a reward model onto the run's device, before the run folder is touched), their roles,
/// the session, and the train and eval prompts.
pub struct RlRun<'c> {
    pub session: Session<'c>,
    pub rewards: RewardSet,
    pub roles: Vec<RewardRole>,
    pub train: Vec<PromptItem>,
    pub eval: Vec<PromptItem>,
}

impl<'c> RlRun<'c> {
    /// `key` names the rewards in errors; `(resume, overwrite)` as for [`Session::open`].
    pub fn open(
        cfg: &'c RunConfig,
        specs: &[RewardSpec],
        key: &str,
        max_prompt_len: usize,
        tools: Option<&Value>,
        (resume, overwrite): (bool, bool),
    ) -> Result<Self> {
        let device = run_device(cfg)?;
        let rewards = crate::model_reward::reward_set(specs, &device, key)?;
        let roles = specs.iter().map(|s| role_of(&s.name)).collect();
        let session = Session::open_on(cfg, device, resume, overwrite)?;
        let (train, eval) = prompt_split(cfg, &session.lm, max_prompt_len, tools)?;
        Ok(RlRun {
            session,
            rewards,
            roles,
            train,
            eval,
        })
    }
}

/// The train and eval prompts of `cfg`: `data.eval`, else a `data.eval_fraction` split of the
/// train file; refuses an empty train set.
pub fn prompt_split(
    cfg: &RunConfig,
    lm: &Lm,
    max_prompt_len: usize,
    tools: Option<&Value>,
) -> Result<(Vec<PromptItem>, Vec<PromptItem>)> {
    let tok = &lm.tokenizer;
    let mut train = load_prompts_with_tools(tok, &cfg.data.train, max_prompt_len, tools)?;
    let mut eval = Vec::new();
    if let Some(e) = &cfg.data.eval {
        eval = load_prompts_with_tools(tok, e, max_prompt_len, tools)?;
    } else if cfg.data.eval_fraction > 0.0 {
        let s = split(
            train.len(),
            EvalSize::Fraction(cfg.data.eval_fraction),
            cfg.run.seed,
        )?;
        let all = std::mem::take(&mut train);
        train = s.train.iter().map(|&i| all[i].clone()).collect();
        eval = s.eval.iter().map(|&i| all[i].clone()).collect();
    }
    if train.is_empty() {
        bail!("{}: no training prompts", cfg.data.train.display());
    }
    Ok((train, eval))
}
