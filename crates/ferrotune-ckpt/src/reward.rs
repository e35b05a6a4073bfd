//! A reward model written as the Hugging Face folder `AutoModelForSequenceClassification` loads:
//! the merged body under its HF names without `lm_head.weight`, plus `score.weight` (1, H), and a
//! `config.json` naming the family's `…ForSequenceClassification` with one label and the pad id
//! transformers pools by. Tokenizer and generation files are copied as in any merged export.
//!
//! Also the reward model's adapter folder: a PEFT `SEQ_CLS` adapter (LoRA + the head as a
//! `modules_to_save` tensor), for checkpoints and for PEFT users.
//!
//! Owns: the sequence-classification specifics of the file sets. Does not own: the merge and the
//! atomic write (`export.rs`), the head or its pooling (`ferrotune_models::reward`).

use std::path::Path;

use candle_core::DType;
use ferrotune_models::adapter::{load_weights_keeping, PeftConfig};
use ferrotune_models::reward::SCORE_WEIGHT;
use ferrotune_models::{LoadOptions, RewardModel};
use ferrotune_nn::LoraConfig;
use serde_json::{json, Map};

use crate::error::{CkptError, Result};
use crate::export::{export_model, ExportExtras, ExportReport};
use crate::peft::{
    require_matches, save_adapter_with_head, ADAPTER_CONFIG, ADAPTER_WEIGHTS, SCORE_KEY,
};

/// Write `rm` (LoRA merged into the body) to `out` in `dtype` as a `…ForSequenceClassification`
/// folder with `num_labels = 1`. Refuses a model without a pad id: transformers cannot score a
/// batch without one, and would pool at a different token than we trained on.
pub fn export_reward_model(rm: &RewardModel, out: &Path, dtype: DType) -> Result<ExportReport> {
    let pad = rm.pad_token_id.ok_or_else(|| CkptError::Unsupported {
        path: out.to_path_buf(),
        msg: "the reward model has no pad_token_id; set it (usually the tokenizer's pad id) \
              before exporting, since transformers scores at the last token that is not pad"
            .into(),
    })?;
    let mut config = Map::new();
    config.insert("architectures".into(), json!([rm.architecture()]));
    // transformers derives num_labels from id2label and writes only these two maps.
    config.insert("id2label".into(), json!({ "0": "LABEL_0" }));
    config.insert("label2id".into(), json!({ "LABEL_0": 0 }));
    config.insert("pad_token_id".into(), json!(pad));
    let extras = ExportExtras {
        // A classifier has no output head; a base that is already a classifier has its old head.
        drop: vec!["lm_head.weight".into(), SCORE_WEIGHT.into()],
        tensors: vec![(SCORE_WEIGHT.into(), rm.score.as_tensor().clone())],
        config,
    };
    export_model(&rm.path, rm.body.as_ref(), out, dtype, &extras)
}

/// Save the reward model's LoRA adapters and head as a PEFT `SEQ_CLS` adapter folder at `dir`
/// (must not exist, or be empty): what `PeftModel.from_pretrained` loads onto
/// `AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`.
pub fn save_reward_adapter(
    rm: &RewardModel,
    lora: &LoraConfig,
    base_name: &str,
    dir: &Path,
) -> Result<()> {
    save_adapter_with_head(
        rm.body.as_ref(),
        lora,
        base_name,
        Some(rm.score.as_tensor()),
        dir,
    )
}

/// Load a reward model from `base` (a causal LM, or a one-label classifier) and a PEFT `SEQ_CLS`
/// adapter folder: its LoRA config decides the slots, its file fills them and the head.
/// `opts.lora` is ignored.
pub fn load_reward_adapter(base: &Path, adapter: &Path, opts: &LoadOptions) -> Result<RewardModel> {
    let peft = PeftConfig::from_dir(adapter)?;
    if !peft.is_seq_cls() {
        return Err(CkptError::Unsupported {
            path: adapter.join(ADAPTER_CONFIG),
            msg: format!(
                "task_type {:?} is not a reward model adapter (expected \"SEQ_CLS\" with the \
                 `score` head in modules_to_save)",
                peft.task_type
            ),
        });
    }
    let opts = LoadOptions {
        // A is overwritten from the file, so the init seed does not matter; nor does the head's.
        lora: Some((peft.lora_config()?, 0)),
        ..opts.clone()
    };
    let rm = RewardModel::load_or_init(base, &opts, 0)?;
    require_matches(rm.body.as_ref(), adapter, base, &peft)?;
    restore_reward_adapter(&rm, adapter)?;
    Ok(rm)
}

/// Fill an existing reward model's adapters and head from a `SEQ_CLS` adapter folder (resume).
pub fn restore_reward_adapter(rm: &RewardModel, adapter: &Path) -> Result<()> {
    let mut kept = load_weights_keeping(rm.body.as_ref(), adapter, &[SCORE_KEY])?;
    let path = adapter.join(ADAPTER_WEIGHTS);
    let score = kept
        .remove(SCORE_KEY)
        .ok_or_else(|| CkptError::Unsupported {
            path: path.clone(),
            msg: format!("no {SCORE_KEY}: the adapter does not carry the reward head"),
        })?;
    if score.dims() != rm.score.dims() {
        return Err(CkptError::Unsupported {
            path,
            msg: format!(
                "{SCORE_KEY} has shape {:?}, the model's head {:?}",
                score.dims(),
                rm.score.dims()
            ),
        });
    }
    rm.score.set(&score.to_device(rm.score.device())?)?;
    Ok(())
}
