//! The `model` reward: a trained reward model (a `…ForSequenceClassification` folder, a PEFT
//! `SEQ_CLS` adapter folder such as a reward-model checkpoint, or a reward-model run folder)
//! scoring prompt + completion, for `[grpo] rewards = [{ name = "model", path = "…" }]` and the
//! PPO runner.
//!
//! The text scored is the sequence the reward model was trained on, built with its own
//! tokenizer, as TRL's GRPO trainer does for a model reward: for a chat prompt (one that ends
//! with the reward model's own generation prompt) the completion is closed with the template's
//! end of an assistant turn, like rendering prompt + reply through the chat template; for a plain
//! prompt the EOS text is appended, as the reward trainer appended it to every plain-text
//! completion. The score is the head at the last real token.
//!
//! Owns: loading a reward model for scoring and building the reward set that mixes it with the
//! registry's rewards. Does not own: the head or pooling (`ferrotune_models::reward`), the
//! registry (`ferrotune_rewards`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use ferrotune_ckpt::load_reward_adapter;
use ferrotune_models::adapter::PeftConfig;
use ferrotune_models::{LoadOptions, RewardModel};
use ferrotune_nn::Mode;
use ferrotune_rewards::{Failure, Reward, RewardSet, RewardSpec, Sample, Scores};
use ferrotune_tokenize::{Message, Tokenizer};

use crate::lm::load_tokenizer;
use crate::rm_run::reward_pad_id;

/// What can go wrong loading a `model` reward.
#[derive(Debug, thiserror::Error)]
pub enum ModelRewardError {
    #[error("{path}: {msg}")]
    Path { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Load {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("parameter `{key}`: {msg}")]
    Param { key: String, msg: String },
}

type Result<T> = std::result::Result<T, ModelRewardError>;

/// How a completion is closed before scoring (module docs).
#[derive(Debug, Clone)]
struct Framing {
    /// What the chat template renders after a user message when asked for a reply (e.g.
    /// `<|im_end|>\n<|im_start|>assistant\n`); a prompt ending with it is a chat prompt.
    generation_tail: Option<String>,
    /// What the template renders after an assistant reply (e.g. `<|im_end|>\n`).
    turn_end: String,
    /// The EOS text appended to plain-text completions.
    eos: Option<String>,
}

impl Framing {
    /// Learn the template's framing by rendering a probe conversation.
    fn of(tok: &Tokenizer) -> Framing {
        const P: &str = "ferrotune-probe-prompt";
        const C: &str = "ferrotune-probe-reply";
        let chat = || -> Option<(String, String)> {
            tok.chat_template()?;
            let g = tok.render_text(&[Message::user(P)], true).ok()?;
            let f = tok
                .render_text(&[Message::user(P), Message::assistant(C)], false)
                .ok()?;
            let tail = &g[g.find(P)? + P.len()..];
            let end = f.strip_prefix(g.as_str())?.strip_prefix(C)?;
            (!tail.is_empty()).then(|| (tail.to_string(), end.to_string()))
        };
        let (generation_tail, turn_end) = match chat() {
            Some((t, e)) => (Some(t), e),
            None => (None, String::new()),
        };
        Framing {
            generation_tail,
            turn_end,
            eos: tok.eos_token().map(String::from),
        }
    }

    /// The text to score and whether the tokenizer should add its special tokens (plain text
    /// only: a rendered chat already holds them).
    fn text(&self, prompt: &str, completion: &str) -> (String, bool) {
        if let Some(tail) = &self.generation_tail {
            if prompt.ends_with(tail.as_str()) {
                return (format!("{prompt}{completion}{}", self.turn_end), false);
            }
        }
        match &self.eos {
            Some(eos) if !completion.ends_with(eos.as_str()) => {
                (format!("{prompt}{completion}{eos}"), true)
            }
            _ => (format!("{prompt}{completion}"), true),
        }
    }
}

/// A reward model as a reward function.
pub struct ModelReward {
    label: String,
    rm: RewardModel,
    tokenizer: Tokenizer,
    framing: Framing,
    /// Sequences per forward.
    batch_size: usize,
    /// The folder the model was read from (for messages).
    pub path: PathBuf,
}

/// Where the scoring model of a `path` lives: (model folder, adapter folder).
fn resolve(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let bad = |msg: &str| ModelRewardError::Path {
        path: path.to_path_buf(),
        msg: msg.into(),
    };
    if !path.exists() {
        return Err(bad("no such file or folder"));
    }
    // A reward-model run folder: its merged export.
    let export = path.join(ferrotune_train::reward_train::EXPORT_DIR);
    if export.join("config.json").is_file() {
        return Ok((export, None));
    }
    if path.join("adapter_config.json").is_file() {
        let peft = PeftConfig::from_dir(path).map_err(|e| ModelRewardError::Load {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let base = peft
            .base_model_name_or_path
            .clone()
            .ok_or_else(|| bad("adapter_config.json names no base_model_name_or_path"))?;
        return Ok((PathBuf::from(base), Some(path.to_path_buf())));
    }
    if path.join("config.json").is_file() {
        return Ok((path.to_path_buf(), None));
    }
    Err(bad(
        "not a reward model: expected a sequence-classification folder (config.json + \
         model.safetensors), a reward-model adapter (adapter_config.json) or a reward-model run \
         folder (with reward_model/)",
    ))
}

impl ModelReward {
    /// Load the reward model at `path` (module docs) onto `device`, logged as `model`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (model_dir, adapter) = resolve(path)?;
        let load_err = |e: Box<dyn std::error::Error + Send + Sync>| ModelRewardError::Load {
            path: path.to_path_buf(),
            source: e,
        };
        let opts = LoadOptions {
            device: device.clone(),
            ..LoadOptions::default()
        };
        let mut rm = match &adapter {
            Some(a) => load_reward_adapter(&model_dir, a, &opts).map_err(|e| load_err(e.into()))?,
            None => RewardModel::load(&model_dir, &opts).map_err(|e| load_err(e.into()))?,
        };
        let tokenizer = load_tokenizer(&model_dir).map_err(|e| load_err(e.into()))?;
        rm.pad_token_id = rm.pad_token_id.or_else(|| reward_pad_id(&tokenizer, &rm));
        Ok(ModelReward {
            label: "model".into(),
            framing: Framing::of(&tokenizer),
            rm,
            tokenizer,
            batch_size: 8,
            path: path.to_path_buf(),
        })
    }

    /// Log the reward under `label`.
    pub fn with_label(mut self, label: &str) -> Self {
        self.label = label.into();
        self
    }

    /// Score this many sequences per forward (at least 1).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The reward model's token ids for one (prompt, completion).
    pub fn encode(&self, prompt: &str, completion: &str) -> std::result::Result<Vec<u32>, String> {
        let (text, special) = self.framing.text(prompt, completion);
        self.tokenizer
            .encode(&text, special)
            .map_err(|e| e.to_string())
    }

    /// Scores of (prompt, completion) texts, batched.
    pub fn score_texts(&self, pairs: &[(&str, &str)]) -> std::result::Result<Vec<f32>, String> {
        let mut seqs = Vec::with_capacity(pairs.len());
        for (p, c) in pairs {
            let ids = self.encode(p, c)?;
            if ids.is_empty() {
                return Err("prompt and completion tokenize to nothing".into());
            }
            seqs.push(ids);
        }
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(self.batch_size) {
            out.extend(
                self.rm
                    .score_sequences(chunk, Mode::EVAL)
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(out)
    }
}

impl Reward for ModelReward {
    fn name(&self) -> &str {
        &self.label
    }

    fn score(&self, samples: &[Sample]) -> Vec<Option<f64>> {
        self.score_detailed(samples).values
    }

    fn score_detailed(&self, samples: &[Sample]) -> Scores {
        let pairs: Vec<(&str, &str)> = samples.iter().map(|s| (s.prompt, s.completion)).collect();
        match self.score_texts(&pairs) {
            Ok(v) => Scores {
                values: v.into_iter().map(|x| Some(x as f64)).collect(),
                failures: Vec::new(),
            },
            // A forward that fails fails for the whole batch; the trainer logs it.
            Err(reason) => Scores {
                values: vec![None; samples.len()],
                failures: (0..samples.len())
                    .map(|sample| Failure {
                        sample,
                        reason: reason.clone(),
                    })
                    .collect(),
            },
        }
    }
}

/// The registry entry's one-line help, for `ferrotune rewards`.
pub const HELP: &str = "a trained reward model's score of prompt + completion: `path` = a \
    reward-model run folder, its reward_model/ export (any …ForSequenceClassification folder) or \
    a checkpoint's SEQ_CLS adapter; `batch_size` 8";

/// Build one `model` entry; errors name `{what}[{i}]` and the key.
fn build_model(spec: &RewardSpec, device: &Device) -> Result<ModelReward> {
    const ALLOWED: &[&str] = &["path", "batch_size"];
    if let Some(k) = spec.params.keys().find(|k| !ALLOWED.contains(&k.as_str())) {
        return Err(ModelRewardError::Param {
            key: k.clone(),
            msg: format!("unknown (allowed: {})", ALLOWED.join(", ")),
        });
    }
    let path = match spec.params.get("path") {
        Some(toml::Value::String(p)) => PathBuf::from(p),
        Some(v) => {
            return Err(ModelRewardError::Param {
                key: "path".into(),
                msg: format!("must be a string, found {}", v.type_str()),
            })
        }
        None => {
            return Err(ModelRewardError::Param {
                key: "path".into(),
                msg: "missing: the reward model to score with".into(),
            })
        }
    };
    let batch_size = match spec.params.get("batch_size") {
        None => 8,
        Some(toml::Value::Integer(n)) if *n >= 1 => *n as usize,
        Some(v) => {
            return Err(ModelRewardError::Param {
                key: "batch_size".into(),
                msg: format!("must be an integer >= 1, found {v}"),
            })
        }
    };
    Ok(ModelReward::load(&path, device)?
        .with_label(spec.key())
        .with_batch_size(batch_size))
}

/// The reward set of `specs` (`what` is the config key, e.g. `grpo.rewards`): `model` entries
/// load their reward model onto `device`, the others come from the registry. Errors are one
/// line naming the entry and key, e.g. `grpo.rewards[1].path: runs/rm: no such file or folder`.
pub fn reward_set(specs: &[RewardSpec], device: &Device, what: &str) -> anyhow::Result<RewardSet> {
    let mut parts: Vec<(Box<dyn Reward>, f64)> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        if !spec.weight.is_finite() {
            anyhow::bail!(
                "{what}[{i}].weight: must be a finite number, got {}",
                spec.weight
            );
        }
        let reward: Box<dyn Reward> = if spec.name == "model" {
            match build_model(spec, device) {
                Ok(r) => Box::new(r),
                Err(ModelRewardError::Param { key, msg }) => {
                    anyhow::bail!("{what}[{i}].{key}: {msg}")
                }
                Err(e) => anyhow::bail!("{what}[{i}].path: {e}"),
            }
        } else {
            ferrotune_rewards::build(spec).map_err(|e| match e {
                // The registry does not know this file's reward; the list should.
                ferrotune_rewards::RewardError::UnknownReward { name, known } => {
                    anyhow::anyhow!("{what}[{i}]: unknown reward `{name}` (known: {known}, model)")
                }
                e => anyhow::anyhow!("{what}[{i}]: {e}"),
            })?
        };
        parts.push((reward, spec.weight));
    }
    RewardSet::from_parts(parts).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Tokenizer {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-chat/model");
        Tokenizer::from_dir(&dir).unwrap()
    }

    /// A chat prompt is closed as the template closes an assistant turn, so the scored text is
    /// exactly the rendered conversation the reward model was trained on; a plain prompt gets
    /// the EOS text, as the reward trainer appends it.
    #[test]
    fn completions_are_framed_as_in_training() {
        let tok = tiny_tokenizer();
        let f = Framing::of(&tok);
        let prompt = [
            Message::system("Be brief."),
            Message::user("What is 2 + 2?"),
        ];
        let p = tok.render_text(&prompt, true).unwrap();
        let mut full = prompt.to_vec();
        full.push(Message::assistant("The answer is 4."));
        let want = tok.render_text(&full, false).unwrap();
        assert_eq!(f.text(&p, "The answer is 4."), (want, false));
        let eos = tok.eos_token().unwrap().to_string();
        assert_eq!(
            f.text("Q: 2 + 2?", " 4"),
            (format!("Q: 2 + 2? 4{eos}"), true)
        );
        assert_eq!(
            f.text("Q: 2 + 2?", &format!(" 4{eos}")),
            (format!("Q: 2 + 2? 4{eos}"), true)
        );
    }

    #[test]
    fn bad_entries_name_their_key() {
        let dev = Device::Cpu;
        let mut spec = RewardSpec::new("model");
        let e = reward_set(
            &[RewardSpec::new("format_tags"), spec.clone()],
            &dev,
            "grpo.rewards",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.starts_with("grpo.rewards[1].path: missing"), "{e}");
        spec.params
            .insert("path".into(), toml::Value::String("/no/such/rm".into()));
        let e = reward_set(&[spec.clone()], &dev, "grpo.rewards")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("grpo.rewards[0].path: /no/such/rm: no such"),
            "{e}"
        );
        // A causal LM is not a reward model: the loader's reason is kept, on one line.
        let lm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-chat/model");
        spec.params
            .insert("path".into(), toml::Value::String(lm.display().to_string()));
        let e = reward_set(&[spec.clone()], &dev, "grpo.rewards")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("grpo.rewards[0].path: ") && e.contains("num_labels"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        let e = reward_set(&[RewardSpec::new("modle")], &dev, "grpo.rewards")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("grpo.rewards[0]: unknown reward `modle`") && e.ends_with(", model)"),
            "{e}"
        );
        spec.params
            .insert("temperature".into(), toml::Value::Float(1.0));
        let e = reward_set(&[spec], &dev, "grpo.rewards")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("grpo.rewards[0].temperature: unknown"), "{e}");
    }
}
