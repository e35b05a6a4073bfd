//! PEFT adapter folders in and out: `adapter_config.json` + `adapter_model.safetensors`, the
//! layout `PeftModel.from_pretrained` reads and `save_pretrained` writes, so an adapter trained
//! here loads in PEFT and one trained with PEFT loads here.
//!
//! A reward model's adapter is a PEFT `SEQ_CLS` adapter: the same files plus the score head as a
//! `modules_to_save` tensor (`reward.rs` saves and loads it).
//!
//! Owns: checking that the model's LoRA slots agree with the config before writing, and the
//! clear error when an adapter's `target_modules` match nothing. Does not own: the key names
//! and tensor reading (`ferrotune_models::adapter`), or merging (export.rs).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrotune_models::adapter::{adapter_tensors, load_weights, PeftConfig};
use ferrotune_models::{load, CausalLm, LoadOptions, Loaded};
use ferrotune_nn::LoraConfig;

use crate::error::{CkptError, Result};
use crate::files;

/// File names of a PEFT adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Save the model's adapters as a PEFT folder at `dir` (which must not exist, or be empty).
/// The folder is built beside `dir` and renamed into place, so it appears whole or not at all.
pub fn save_adapter(
    model: &dyn CausalLm,
    lora: &LoraConfig,
    base_name: &str,
    dir: &Path,
) -> Result<()> {
    save_adapter_with_head(model, lora, base_name, None, dir)
}

/// [`save_adapter`], with the sequence-classification head when `score` is given.
pub(crate) fn save_adapter_with_head(
    model: &dyn CausalLm,
    lora: &LoraConfig,
    base_name: &str,
    score: Option<&Tensor>,
    dir: &Path,
) -> Result<()> {
    if !files::entries(dir)?.is_empty() {
        return Err(CkptError::OutputExists {
            path: dir.to_path_buf(),
        });
    }
    let staging = files::staging_sibling(dir, "partial");
    crate::run::remove_any(&staging)?;
    std::fs::create_dir_all(&staging).map_err(crate::error::io(&staging))?;
    write_adapter_files_with_head(model, lora, base_name, score, &staging)?;
    files::sync_dir(&staging)?;
    files::commit_dir(&staging, dir)
}

/// Write `adapter_config.json` and `adapter_model.safetensors` into the existing folder `dir`.
pub(crate) fn write_adapter_files(
    model: &dyn CausalLm,
    lora: &LoraConfig,
    base_name: &str,
    dir: &Path,
) -> Result<()> {
    write_adapter_files_with_head(model, lora, base_name, None, dir)
}

/// PEFT's key for a sequence-classification head saved through `modules_to_save`.
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// [`write_adapter_files`]; with a `score` head (1, H), as PEFT saves a `SEQ_CLS` adapter:
/// `task_type: "SEQ_CLS"`, `modules_to_save: ["classifier", "score"]` and the head under
/// [`SCORE_KEY`].
pub(crate) fn write_adapter_files_with_head(
    model: &dyn CausalLm,
    lora: &LoraConfig,
    base_name: &str,
    score: Option<&Tensor>,
    dir: &Path,
) -> Result<()> {
    check_slots(model, lora)?;
    let mut cfg = PeftConfig::from_lora(
        lora,
        (!base_name.is_empty()).then(|| base_name.to_string()),
        model.config().family,
    );
    let mut tensors = adapter_tensors(model)?;
    if let Some(score) = score {
        cfg.task_type = Some("SEQ_CLS".into());
        cfg.modules_to_save = Some(serde_json::json!(["classifier", "score"]));
        let t = score
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .contiguous()?;
        tensors.push((SCORE_KEY.into(), t));
    }
    let path = dir.join(ADAPTER_CONFIG);
    let value = serde_json::to_value(&cfg).map_err(|source| CkptError::Json {
        path: path.clone(),
        source,
    })?;
    files::write_json(&path, &value)?;
    files::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors)
}

/// The written config must reproduce exactly the model's adapter slots on load: the same slots
/// matched by `target_modules`, with the rank and scale it states.
fn check_slots(model: &dyn CausalLm, lora: &LoraConfig) -> Result<()> {
    let mut any = false;
    for slot in model.linear_slots() {
        let wants = lora.target_modules.matches(&slot.path);
        let mismatch = |msg: String| CkptError::AdapterMismatch {
            slot: slot.path.clone(),
            msg,
        };
        let Some(l) = &slot.lora else {
            if wants {
                return Err(mismatch(
                    "target_modules match this slot but it has no adapter; the LoRA config \
                     given does not describe this model"
                        .into(),
                ));
            }
            continue;
        };
        any = true;
        if !wants {
            return Err(mismatch(
                "has an adapter but target_modules do not match it; the saved config would \
                 not reload it"
                    .into(),
            ));
        }
        let (out_dim, in_dim) = slot.weight.dims2()?;
        if l.a.dims() != [lora.r, in_dim] || l.b.dims() != [out_dim, lora.r] {
            return Err(mismatch(format!(
                "A {:?} / B {:?} do not fit rank {} on a ({out_dim}, {in_dim}) weight",
                l.a.dims(),
                l.b.dims(),
                lora.r
            )));
        }
        if (l.scale - lora.scale()).abs() > 1e-9 * lora.scale().abs().max(1.0) {
            return Err(mismatch(format!(
                "scale {} differs from the config's {} (lora_alpha {}, r {}, use_rslora {})",
                l.scale,
                lora.scale(),
                lora.lora_alpha,
                lora.r,
                lora.use_rslora
            )));
        }
    }
    if !any {
        return Err(CkptError::NoAdapters);
    }
    Ok(())
}

/// Load the model at `base` (HF folder or GGUF) with the PEFT adapter in `adapter` attached:
/// its config decides which slots get LoRA, its file fills them. `opts.lora` is ignored.
pub fn load_with_adapter(base: &Path, adapter: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let peft = PeftConfig::from_dir(adapter)?;
    let lora = peft.lora_config()?;
    let opts = LoadOptions {
        // A is overwritten from the file, so the init seed does not matter.
        lora: Some((lora.clone(), 0)),
        ..opts.clone()
    };
    let loaded = load(base, &opts)?;
    require_matches(loaded.model.as_ref(), adapter, base, &peft)?;
    load_weights(loaded.model.as_ref(), adapter)?;
    Ok(loaded)
}

/// An adapter whose `target_modules` match no slot would load as a silent no-op; refuse it.
pub(crate) fn require_matches(
    model: &dyn CausalLm,
    adapter: &Path,
    base: &Path,
    peft: &PeftConfig,
) -> Result<()> {
    let slots = model.linear_slots();
    if slots.iter().any(|s| s.lora.is_some()) {
        return Ok(());
    }
    let mut names: Vec<String> = slots
        .iter()
        .map(|s| s.path.rsplit('.').next().unwrap_or(&s.path).to_string())
        .collect();
    names.sort();
    names.dedup();
    Err(CkptError::NoTargetMatch {
        adapter: adapter.to_path_buf(),
        model: base.to_path_buf(),
        targets: peft.target_modules.to_string(),
        slots: names,
    })
}
