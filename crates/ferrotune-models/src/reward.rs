//! The Bradley–Terry reward model's model side: a causal LM body plus a scalar head
//! `score.weight` (1, H), no bias, read at one token per row — the layout of transformers'
//! `…ForSequenceClassification` with `num_labels = 1`, so a checkpoint written from here loads in
//! transformers and scores the same.
//!
//! Pooling mirrors `GenericForSequenceClassification.forward` (transformers 5.24,
//! `modeling_layers.py`): `logits = score(last_hidden_state)`, then the row's score is the logit
//! at `(arange(T) * (input_ids != pad_token_id)).argmax(-1)`, i.e. the rightmost token that is not
//! the pad id (index 0 when every token is pad), for right and left padding alike. Without a pad id
//! transformers takes the last position and refuses batches larger than one.
//!
//! Owns: the head, its init, loading a sequence-classification folder, pooling. Does not own: the
//! pairwise loss (`ferrotune_train`), writing the merged folder (`ferrotune_ckpt`), tokenization.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result as CResult, Tensor, Var};
use ferrotune_nn::Mode;
use serde::Deserialize;

use crate::batch::Batch;
use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::source::{CheckedSource, RawStore, SafetensorsStore};
use crate::{build, safetensors_files, CausalLm, LoadOptions, Loaded};

/// The head's checkpoint name (transformers' `self.score = nn.Linear(H, num_labels, bias=False)`).
pub const SCORE_WEIGHT: &str = "score.weight";

/// transformers' `initializer_range` default for every family we load.
const DEFAULT_INIT_STD: f64 = 0.02;

/// The `config.json` fields a sequence-classification model adds to the causal ones.
#[derive(Debug, Default, Deserialize)]
struct SeqClsFields {
    initializer_range: Option<f64>,
    pad_token_id: Option<serde_json::Value>,
    num_labels: Option<usize>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

impl SeqClsFields {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// As `PretrainedConfig.__init__` resolves it: the length of `id2label` when present, else
    /// `num_labels`, else transformers' default of 2.
    fn num_labels(&self) -> usize {
        match &self.id2label {
            Some(m) => m.len(),
            None => self.num_labels.unwrap_or(2),
        }
    }

    fn pad_token_id(&self, path: &Path) -> Result<Option<u32>> {
        match &self.pad_token_id {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| ModelError::Config {
                    path: path.to_path_buf(),
                    field: "pad_token_id".into(),
                    msg: format!("expected a token id, got {v}"),
                }),
        }
    }
}

/// A sequence-classification checkpoint seen as a causal one: `score.weight` is hidden (the
/// reward model reads it itself) and, for an untied config, the absent `lm_head.weight` is served
/// as a zero-stride broadcast zero so the body builds without allocating a (V, H) head that
/// scoring never uses.
struct BodyStore {
    inner: SafetensorsStore,
    /// (V, H) and dtype of the stand-in head, when the file has none and the config is untied.
    stand_in_head: Option<([usize; 2], DType)>,
}

impl RawStore for BodyStore {
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .names()
            .into_iter()
            .filter(|n| n != SCORE_WEIGHT)
            .collect();
        if self.stand_in_head.is_some() {
            names.push("lm_head.weight".into());
        }
        names
    }

    fn load(&self, name: &str, device: &Device) -> CResult<Option<Tensor>> {
        match (name, self.stand_in_head) {
            (SCORE_WEIGHT, _) => Ok(None),
            ("lm_head.weight", Some((shape, dtype))) => Ok(Some(
                Tensor::zeros((), dtype, device)?.broadcast_as((shape[0], shape[1]))?,
            )),
            _ => self.inner.load(name, device),
        }
    }

    fn origin(&self) -> &Path {
        self.inner.origin()
    }
}

/// A causal LM body with a scalar score head.
pub struct RewardModel {
    /// The decoder (or GPT-2) body; its `lm_head` is never used for scoring.
    pub body: Box<dyn CausalLm>,
    /// (1, H) f32, trainable.
    pub score: Var,
    /// The folder or GGUF file the body's base weights came from (a merged export reads them
    /// again).
    pub path: PathBuf,
    /// The pad id written to `config.json`, which transformers pools by.
    pub pad_token_id: Option<u32>,
}

impl RewardModel {
    /// Load a Hugging Face `…ForSequenceClassification` folder with `num_labels = 1`: the body
    /// (with `opts.lora` adapters) and `score.weight`.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if opts.trainable_base {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                field: "trainable_base".into(),
                msg: "full fine-tuning of a reward model is not supported; train LoRA adapters \
                      on the body (the head is always trainable)"
                    .into(),
            });
        }
        let cfg_path = path.join("config.json");
        if !path.is_dir() || !cfg_path.is_file() {
            return Err(ModelError::NotAModel {
                path: path.to_path_buf(),
            });
        }
        let cfg = ModelConfig::from_file(&cfg_path)?;
        let fields = SeqClsFields::read(&cfg_path)?;
        let n = fields.num_labels();
        if n != 1 {
            return Err(ModelError::Config {
                path: cfg_path,
                field: "num_labels".into(),
                msg: format!(
                    "a reward model has one output (num_labels = 1, id2label with one entry); \
                     this config has {n}{}",
                    if fields.id2label.is_none() && fields.num_labels.is_none() {
                        " (transformers' default: no id2label or num_labels). For a causal LM \
                         checkpoint start a fresh head with RewardModel::from_causal"
                    } else {
                        ""
                    }
                ),
            });
        }
        let pad_token_id = fields.pad_token_id(&cfg_path)?;
        let inner = SafetensorsStore::open(&safetensors_files(path)?, path)?;
        let h = cfg.hidden_size;
        let score = match inner.load(SCORE_WEIGHT, &Device::Cpu)? {
            Some(t) if t.dims() == [1, h] => t.to_dtype(DType::F32)?.to_device(&opts.device)?,
            Some(t) => {
                return Err(ModelError::Weights {
                    path: path.to_path_buf(),
                    problems: vec![format!(
                        "shape mismatch for {SCORE_WEIGHT}: file has {:?}, model expects [1, {h}]",
                        t.dims()
                    )],
                })
            }
            None => {
                return Err(ModelError::Weights {
                    path: path.to_path_buf(),
                    problems: vec![format!(
                        "missing key {SCORE_WEIGHT} (shape [1, {h}]); a causal LM checkpoint has \
                         no score head: use RewardModel::from_causal"
                    )],
                })
            }
        };
        let has_head = inner.names().iter().any(|n| n == "lm_head.weight");
        let stand_in_head =
            (!cfg.tie_word_embeddings && !has_head).then_some(([cfg.vocab_size, h], opts.dtype));
        let store = BodyStore {
            inner,
            stand_in_head,
        };
        let src = CheckedSource::new(Box::new(store), opts.dtype, opts.device.clone());
        let body = build(&cfg, &src, opts)?;
        Self::new(body, Var::from_tensor(&score)?, path, pad_token_id)
    }

    /// Start from a causal LM with a fresh head drawn as transformers' `_init_weights` draws an
    /// `nn.Linear`: normal(0, `initializer_range`) from the base's `config.json` (0.02 when absent,
    /// e.g. for a GGUF base), seeded by `seed`. `pad_token_id` comes from the same config; set the
    /// field when the tokenizer's pad id is known and differs.
    pub fn from_causal(loaded: Loaded, seed: u64) -> Result<Self> {
        let cfg_path = loaded.path.join("config.json");
        let fields = if loaded.path.is_dir() && cfg_path.is_file() {
            SeqClsFields::read(&cfg_path)?
        } else {
            SeqClsFields::default()
        };
        let std = fields.initializer_range.unwrap_or(DEFAULT_INIT_STD);
        if !(std > 0.0 && std.is_finite()) {
            return Err(ModelError::Config {
                path: cfg_path,
                field: "initializer_range".into(),
                msg: format!("must be a positive number, got {std}"),
            });
        }
        let pad_token_id = fields.pad_token_id(&cfg_path)?;
        let h = loaded.model.config().hidden_size;
        let device = loaded.model.lm_head().weight.device().clone();
        let values = crate::init::normal(h, std, seed, SCORE_WEIGHT);
        let score = Tensor::from_vec(values, (1, h), &device)?;
        Self::new(
            loaded.model,
            Var::from_tensor(&score)?,
            &loaded.path,
            pad_token_id,
        )
    }

    /// [`RewardModel::load`] when `path` is a one-label classifier folder, otherwise a causal LM
    /// (HF folder or GGUF) with a fresh head from `seed` ([`RewardModel::from_causal`]) — as
    /// transformers decides, by the config's label count.
    pub fn load_or_init(path: &Path, opts: &LoadOptions, seed: u64) -> Result<Self> {
        let cfg_path = path.join("config.json");
        if path.is_dir() && cfg_path.is_file() && SeqClsFields::read(&cfg_path)?.num_labels() == 1 {
            return Self::load(path, opts);
        }
        Self::from_causal(crate::load(path, opts)?, seed)
    }

    fn new(
        body: Box<dyn CausalLm>,
        score: Var,
        path: &Path,
        pad_token_id: Option<u32>,
    ) -> Result<Self> {
        // The output head plays no part in scoring and is dropped from the export; an adapter on
        // it would train nothing and be lost.
        if body
            .linear_slots()
            .iter()
            .any(|s| s.lora.is_some() && s.path.ends_with("lm_head"))
        {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                field: "target_modules".into(),
                msg: "a reward model does not use lm_head; remove it from the LoRA targets".into(),
            });
        }
        Ok(RewardModel {
            body,
            score,
            path: path.to_path_buf(),
            pad_token_id,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.body.config()
    }

    /// Scores (B,) f32 at the last real token of each row by the batch's key mask (the
    /// rightmost position with mask 1; the last position when there is no mask). Equals
    /// transformers' scores whenever no row ends in a real token equal to the pad id (see
    /// [`RewardModel::scores_hf`] for that case). Differentiable in the LoRA adapters and head.
    pub fn scores(&self, batch: &Batch, mode: Mode) -> CResult<Tensor> {
        let last = last_real_index(batch)?;
        self.scores_at(batch, &last, mode)
    }

    /// Scores pooled exactly as transformers pools them, by `self.pad_token_id`
    /// ([`hf_last_non_pad`]): with pad = eos, a row ending in eos is scored at the token before.
    pub fn scores_hf(&self, batch: &Batch, mode: Mode) -> CResult<Tensor> {
        let last = hf_last_non_pad(&batch.input_ids, self.pad_token_id)?;
        self.scores_at(batch, &last, mode)
    }

    /// Scores (B,) f32 read at position `last[b]` of row b.
    pub fn scores_at(&self, batch: &Batch, last: &[usize], mode: Mode) -> CResult<Tensor> {
        let h = self.body.hidden(batch, None, mode)?; // (B, T, H)
        let (b, t, hd) = h.dims3()?;
        if last.len() != b || last.iter().any(|&l| l >= t) {
            candle_core::bail!("score positions {last:?} do not fit a ({b}, {t}) batch");
        }
        let rows: Vec<u32> = last
            .iter()
            .enumerate()
            .map(|(i, &l)| (i * t + l) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, h.device())?;
        let pooled = h
            .reshape((b * t, hd))? // (B·T, H)
            .index_select(&rows, 0)? // (B, H)
            .to_dtype(DType::F32)?;
        pooled.matmul(&self.score.as_tensor().t()?)?.squeeze(1) // (B, 1) -> (B,)
    }

    /// Score token sequences (right-padded into one batch, pooled at each row's last token).
    pub fn score_sequences(&self, seqs: &[Vec<u32>], mode: Mode) -> CResult<Vec<f32>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        if seqs.iter().any(|s| s.is_empty()) {
            candle_core::bail!("cannot score an empty token sequence");
        }
        let device = self.score.as_tensor().device();
        let batch = Batch::right_padded(seqs, self.pad_token_id.unwrap_or(0), device)?;
        self.scores(&batch, mode)?.to_vec1()
    }

    /// transformers' class name for this family's sequence-classification model.
    pub fn architecture(&self) -> &'static str {
        seq_cls_architecture(self.config().family)
    }
}

/// transformers' `…ForSequenceClassification` class for a family.
pub fn seq_cls_architecture(family: Family) -> &'static str {
    match family {
        Family::Llama => "LlamaForSequenceClassification",
        Family::Mistral => "MistralForSequenceClassification",
        Family::Qwen2 => "Qwen2ForSequenceClassification",
        Family::Qwen3 => "Qwen3ForSequenceClassification",
        Family::Gemma3 => "Gemma3TextForSequenceClassification",
        Family::Gpt2 => "GPT2ForSequenceClassification",
    }
}

/// The rightmost position whose key mask is 1 in each row (0 when none is; T - 1 without a
/// mask). Assumes no KV cache: the mask then covers exactly the batch's T positions.
pub fn last_real_index(batch: &Batch) -> CResult<Vec<usize>> {
    let (b, t) = batch.dims()?;
    let Some(mask) = &batch.key_mask else {
        return Ok(vec![t.saturating_sub(1); b]);
    };
    let rows: Vec<Vec<u8>> = mask.to_dtype(DType::U8)?.to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| r.iter().rposition(|&m| m != 0).unwrap_or(0))
        .collect())
}

/// transformers' pooling position (`GenericForSequenceClassification.forward`, 5.24):
/// `(arange(T) * (input_ids != pad)).argmax(-1)` — the rightmost non-pad token, 0 when every
/// token is pad (argmax of all zeros). Without a pad id: the last position, and an error for a
/// batch of more than one row, as transformers raises.
pub fn hf_last_non_pad(input_ids: &Tensor, pad_token_id: Option<u32>) -> CResult<Vec<usize>> {
    let rows: Vec<Vec<u32>> = input_ids.to_vec2()?;
    match pad_token_id {
        None if rows.len() != 1 => candle_core::bail!(
            "cannot score a batch of {} rows without a pad_token_id (transformers refuses too); \
             set the reward model's pad_token_id",
            rows.len()
        ),
        None => Ok(vec![rows[0].len().saturating_sub(1)]),
        Some(pad) => Ok(rows
            .iter()
            .map(|r| r.iter().rposition(|&id| id != pad).unwrap_or(0))
            .collect()),
    }
}
