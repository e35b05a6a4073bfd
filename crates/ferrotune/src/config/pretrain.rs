//! The pretrain config (`ferrotune pretrain --config FILE`): the architecture, tokenizer and
//! corpus sections of its own, and the `[optim]` section of a run config with pretraining's
//! defaults; read by the same loader as run configs ([`super::read_table`]), its optimizer rules
//! checked by the same [`OptimSection`] check.
//!
//! Owns: the pretrain schema, defaults and checks. Does not own: running it (`pretrain_run`).

use std::path::{Path, PathBuf};

use ferrotune_tokenize::train::SPECIAL_TOKENS;
use serde::{Deserialize, Serialize};

use super::{base_of, check_choices, normalize, read_table, ConfigError, OptimSection, Refusal};
use crate::corpus::CorpusSpec;

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

/// Pretraining's defaults for `[optim]` (the same section as a run config's, whose own defaults
/// suit fine-tuning): a higher learning rate, beta2 0.95 and cosine decay.
fn pretrain_optim() -> [(&'static str, toml::Value); 3] {
    [
        ("learning_rate", toml::Value::Float(3e-3)),
        ("adam_beta2", toml::Value::Float(0.95)),
        ("lr_scheduler_type", toml::Value::String("cosine".into())),
    ]
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
    pub optim: OptimSection,
    pub run: PretrainRun,
}

serde_defaults! {
    d_ctx: usize = 256;
    d_theta: f64 = 10000.0;
    d_rms_eps: f64 = 1e-5;
    d_true: bool = true;
    d_init: f64 = 0.02;
    d_vocab: usize = 1024;
    d_min_freq: u64 = 2;
    d_batch: usize = 16;
    d_one: usize = 1;
    d_seq: usize = 128;
    d_eval_frac: f64 = 0.01;
    d_log_every: usize = 10;
    d_save_dtype: String = "auto".into();
}
fn d_tokenizer() -> TokenizerSection {
    TokenizerSection {
        vocab_size: d_vocab(),
        min_frequency: d_min_freq(),
    }
}

impl PretrainConfig {
    /// Read a TOML file, apply `--set` overrides, reject unknown keys, resolve paths against
    /// the file's folder, and check the cross-field rules.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let mut table = read_table(path, sets)?;
        let optim = table
            .entry("optim")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(optim) = optim.as_table_mut() {
            for (key, value) in pretrain_optim() {
                optim.entry(key).or_insert(value);
            }
        }
        let parse = |msg: String| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: msg.replace('\n', " "),
        };
        check_choices(&table).map_err(|r| r.at(path))?;
        let mut cfg = PretrainConfig::deserialize(table).map_err(|e| parse(e.to_string()))?;
        let base = base_of(path);
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
        self.optim.check().map_err(|r: Refusal| r.at(path))
    }

    /// The resolved config as TOML (written to the run folder).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}
