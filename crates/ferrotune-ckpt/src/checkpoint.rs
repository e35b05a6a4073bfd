//! Checkpoints of a run: atomic saves, finding the newest complete one, pruning, loading back.
//!
//! ```text
//! checkpoints/step-N/
//!   adapter_config.json + adapter_model.safetensors   LoRA runs: a PEFT adapter folder, so
//!                                                     `PeftModel.from_pretrained` reads it as is
//!   model.safetensors                                 full fine-tuning: trainable weights, HF names,
//!   config.json, tokenizer files                      with the base's config and tokenizer, so
//!                                                     the checkpoint loads as a model folder
//!   optimizer.safetensors                             optimizer state tensors from the trainer
//!   trainer_state.json                                step, epoch, data cursor, RNG, metrics
//!   value_head.safetensors, ...                       trainer-specific extras (PPO's value head)
//!   COMPLETE                                          written last: manifest of file sizes
//! ```
//!
//! A save writes everything into `checkpoints/.tmp-step-N/`, fsyncs each file, writes the
//! `COMPLETE` marker last and renames the folder to `step-N`: a crash at any point leaves either
//! a complete `step-N` or a `.tmp-` folder that resume ignores. (nanochat's manifest idea.)
//!
//! Owns: the layout and the commit protocol. Does not own: when to save (the trainer decides) or
//! what the trainer state means (it is an opaque JSON value here).

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrotune_models::adapter::load_weights;
use ferrotune_models::{CausalLm, ModelConfig, RewardModel};
use ferrotune_nn::LoraConfig;

use crate::error::{io, CkptError, Result};
use crate::files;
use crate::peft::{
    write_adapter_files, write_adapter_files_with_head, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
use crate::run::{remove_any, RunDir};

/// The marker written last into a checkpoint: its presence means every other file is complete.
pub const COMPLETE: &str = "COMPLETE";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const FULL_WEIGHTS: &str = "model.safetensors";
/// Version of the checkpoint layout, recorded in the marker.
pub const CHECKPOINT_FORMAT_VERSION: u64 = 1;

/// The weights a checkpoint holds.
pub enum Weights<'a> {
    /// LoRA training: the model's adapters, saved as a PEFT adapter folder.
    Adapter {
        model: &'a dyn CausalLm,
        lora: &'a LoraConfig,
        /// `base_model_name_or_path` in `adapter_config.json` (a Hub id or a path).
        base_name: &'a str,
    },
    /// Full fine-tuning: the trainable weights under their Hugging Face names. With `model`
    /// (the base it started from and the model's config), the checkpoint also gets the base's
    /// config.json, tokenizer and generation config, so it loads as a model folder (as a
    /// transformers `Trainer` checkpoint does).
    Full {
        tensors: &'a [(String, Tensor)],
        model: Option<(&'a Path, &'a ModelConfig)>,
    },
    /// A reward model: its body's adapters and the score head, saved as the PEFT `SEQ_CLS`
    /// adapter folder `reward.rs` writes (the head under `modules_to_save`), so a checkpoint
    /// loads in PEFT as is and resumes through `restore_reward_adapter`.
    RewardAdapter {
        rm: &'a RewardModel,
        lora: &'a LoraConfig,
        base_name: &'a str,
    },
}

/// Everything the trainer hands over for one checkpoint.
pub struct CheckpointParts<'a> {
    pub weights: Weights<'a>,
    /// Optimizer state tensors (e.g. AdamW moments), named by the trainer.
    pub optimizer: &'a [(String, Tensor)],
    /// Step, epoch, data cursor, RNG state, metrics: opaque here, given back on load.
    pub trainer_state: &'a serde_json::Value,
}

/// Save a checkpoint for `step` atomically (see the module docs). Returns `checkpoints/step-N`.
/// A checkpoint that already exists for this step is never replaced.
pub fn save_checkpoint(run: &RunDir, step: u64, parts: &CheckpointParts) -> Result<PathBuf> {
    save_checkpoint_with(run, step, parts, &[])
}

/// [`save_checkpoint`] plus trainer-specific safetensors files `(file name, tensors)` (e.g. PPO's
/// value head), written into the same staging folder before the marker: they are part of the
/// atomic save and of the manifest's size check. Read them back with
/// [`Checkpoint::extra_tensors`].
pub fn save_checkpoint_with(
    run: &RunDir,
    step: u64,
    parts: &CheckpointParts,
    extra: &[(&str, &[(String, Tensor)])],
) -> Result<PathBuf> {
    let dir = run.checkpoint_dir(step);
    if dir.exists() {
        return Err(CkptError::CheckpointExists { path: dir, step });
    }
    let cps = run.checkpoints_dir();
    fs::create_dir_all(&cps).map_err(io(&cps))?;
    let tmp = cps.join(format!(".tmp-step-{step}"));
    // A `.tmp-` folder for this step is what a crashed save of it left behind.
    remove_any(&tmp)?;
    fs::create_dir(&tmp).map_err(io(&tmp))?;

    let kind = match &parts.weights {
        Weights::Adapter {
            model,
            lora,
            base_name,
        } => {
            write_adapter_files(*model, lora, base_name, &tmp)?;
            "adapter"
        }
        Weights::Full { tensors, model } => {
            files::write_safetensors(&tmp.join(FULL_WEIGHTS), tensors)?;
            if let Some((base, cfg)) = model {
                let dtype = tensors
                    .first()
                    .map_or(candle_core::DType::F32, |t| t.1.dtype());
                let dtype_str = crate::export::dtype_name(dtype).unwrap_or("float32");
                // A GGUF base without a tokenizer gives a checkpoint without one: loading it
                // then names the missing file, so the warning is not needed here.
                let mut warnings = Vec::new();
                let patch = serde_json::Map::new();
                crate::export::write_side_files(base, cfg, dtype_str, &patch, &tmp, &mut warnings)?;
            }
            "full"
        }
        Weights::RewardAdapter {
            rm,
            lora,
            base_name,
        } => {
            let score = Some(rm.score.as_tensor());
            write_adapter_files_with_head(rm.body.as_ref(), lora, base_name, score, &tmp)?;
            "adapter"
        }
    };
    files::write_safetensors(&tmp.join(OPTIMIZER), parts.optimizer)?;
    files::write_json(&tmp.join(TRAINER_STATE), parts.trainer_state)?;
    for (name, tensors) in extra {
        let reserved = [COMPLETE, OPTIMIZER, TRAINER_STATE, FULL_WEIGHTS];
        let taken = reserved.contains(name) || [ADAPTER_CONFIG, ADAPTER_WEIGHTS].contains(name);
        if taken || name.contains(['/', '\\']) {
            return Err(CkptError::Unsupported {
                path: tmp.join(name),
                msg: "an extra checkpoint file must be a plain name no standard file uses".into(),
            });
        }
        files::write_safetensors(&tmp.join(name), tensors)?;
    }

    let mut sizes = serde_json::Map::new();
    for name in files::entries(&tmp)? {
        let p = tmp.join(&name);
        let len = fs::metadata(&p).map_err(io(&p))?.len();
        sizes.insert(name, len.into());
    }
    let manifest = serde_json::json!({
        "format": "ferrotune-checkpoint",
        "version": CHECKPOINT_FORMAT_VERSION,
        "step": step,
        "weights": kind,
        "files": sizes,
    });
    files::write_json(&tmp.join(COMPLETE), &manifest)?;
    files::sync_dir(&tmp)?;
    fs::rename(&tmp, &dir).map_err(io(&dir))?;
    files::sync_dir(&cps)?;
    Ok(dir)
}

/// The newest complete checkpoint of a run, and what was passed over to find it.
#[derive(Debug, Clone)]
pub struct LatestCheckpoint {
    pub step: u64,
    pub path: PathBuf,
    /// Checkpoint folders that are not complete (half-written saves `.tmp-step-N`, `step-N`
    /// without a marker, interrupted prunes `.del-step-N`); never read.
    pub ignored: Vec<PathBuf>,
}

impl LatestCheckpoint {
    /// A line for the user when folders were ignored (the CLI prints it).
    pub fn warning(&self) -> Option<String> {
        if self.ignored.is_empty() {
            return None;
        }
        let list: Vec<String> = self
            .ignored
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        Some(format!(
            "ignoring {} incomplete checkpoint folder(s) without a {COMPLETE} marker: {}",
            list.len(),
            list.join(", ")
        ))
    }
}

/// Complete `step-N` folders (ascending by step) and incomplete checkpoint folders.
type Scan = (Vec<(u64, PathBuf)>, Vec<PathBuf>);

/// What `checkpoints/` holds.
fn scan(run: &RunDir) -> Result<Scan> {
    let cps = run.checkpoints_dir();
    let mut complete = Vec::new();
    let mut other = Vec::new();
    for name in files::entries(&cps)? {
        let p = cps.join(&name);
        let step = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok());
        let ours =
            step.is_some() || name.starts_with(".tmp-step-") || name.starts_with(".del-step-");
        match step {
            Some(s) if p.join(COMPLETE).is_file() => complete.push((s, p)),
            // Anything else (an editor's or OS's stray file) is not a checkpoint of ours.
            _ if ours => other.push(p),
            _ => {}
        }
    }
    complete.sort();
    Ok((complete, other))
}

/// The steps of the complete checkpoints, ascending.
pub fn complete_steps(run: &RunDir) -> Result<Vec<u64>> {
    Ok(scan(run)?.0.into_iter().map(|(s, _)| s).collect())
}

/// The newest checkpoint with a `COMPLETE` marker; `None` when the run has no checkpoint at
/// all. A run whose only checkpoints are half-written is an error naming them, so a resume
/// never silently starts from scratch.
pub fn latest_complete(run: &RunDir) -> Result<Option<LatestCheckpoint>> {
    let (complete, ignored) = scan(run)?;
    match complete.last() {
        Some((step, path)) => Ok(Some(LatestCheckpoint {
            step: *step,
            path: path.clone(),
            ignored,
        })),
        None if ignored.is_empty() => Ok(None),
        None => Err(CkptError::OnlyIncomplete {
            run: run.root().to_path_buf(),
            folders: ignored,
        }),
    }
}

/// Delete all but the newest `keep_last` complete checkpoints (at least the newest is always
/// kept). Each is first renamed to `.del-step-N`, so a crash mid-delete never leaves a
/// `step-N` with a marker but missing files. Returns the deleted `step-N` paths.
pub fn prune(run: &RunDir, keep_last: usize) -> Result<Vec<PathBuf>> {
    let (complete, _) = scan(run)?;
    let keep = keep_last.max(1);
    let n_delete = complete.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for (step, path) in complete.into_iter().take(n_delete) {
        let doomed = run.checkpoints_dir().join(format!(".del-step-{step}"));
        remove_any(&doomed)?;
        fs::rename(&path, &doomed).map_err(io(&path))?;
        remove_any(&doomed)?;
        deleted.push(path);
    }
    files::sync_dir(&run.checkpoints_dir())?;
    Ok(deleted)
}

/// Where a loaded checkpoint's weights are.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointWeights {
    /// A PEFT adapter folder (the checkpoint folder itself).
    Adapter(PathBuf),
    /// `model.safetensors` with the trainable weights under HF names.
    Full(PathBuf),
}

/// A checkpoint read back for resuming.
#[derive(Debug)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
    pub weights: CheckpointWeights,
    /// Optimizer tensors in the order they were saved, on the CPU.
    pub optimizer: Vec<(String, Tensor)>,
    pub trainer_state: serde_json::Value,
}

impl Checkpoint {
    /// The PEFT adapter folder, for LoRA checkpoints.
    pub fn adapter_dir(&self) -> Option<&Path> {
        match &self.weights {
            CheckpointWeights::Adapter(p) => Some(p),
            CheckpointWeights::Full(_) => None,
        }
    }

    /// Put the saved adapter weights into `model`'s LoRA slots (built with the same config).
    pub fn restore_adapter(&self, model: &dyn CausalLm) -> Result<()> {
        match &self.weights {
            CheckpointWeights::Adapter(dir) => Ok(load_weights(model, dir)?),
            CheckpointWeights::Full(p) => Err(CkptError::Unsupported {
                path: p.clone(),
                msg: "this is a full fine-tuning checkpoint, not a LoRA adapter".into(),
            }),
        }
    }

    /// A trainer-specific safetensors file written by [`save_checkpoint_with`], on the CPU in
    /// saved order; `None` when this checkpoint has no such file.
    pub fn extra_tensors(&self, file: &str) -> Result<Option<Vec<(String, Tensor)>>> {
        let p = self.dir.join(file);
        if !p.is_file() {
            return Ok(None);
        }
        Ok(Some(files::read_safetensors(&p, &Device::Cpu)?))
    }

    /// The saved full weights (full fine-tuning checkpoints), on the CPU, in saved order.
    pub fn full_weights(&self) -> Result<Vec<(String, Tensor)>> {
        match &self.weights {
            CheckpointWeights::Full(p) => files::read_safetensors(p, &Device::Cpu),
            CheckpointWeights::Adapter(p) => Err(CkptError::Unsupported {
                path: p.clone(),
                msg: "this is a LoRA checkpoint; it holds no full weights".into(),
            }),
        }
    }
}

/// Read a complete checkpoint folder (`checkpoints/step-N`): check its marker and file sizes,
/// then load the optimizer tensors and trainer state.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    let marker = path.join(COMPLETE);
    if !path.is_dir() {
        return Err(CkptError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint folder"),
        });
    }
    if !marker.is_file() {
        return Err(CkptError::Incomplete {
            path: path.to_path_buf(),
        });
    }
    let damaged = |msg: String| CkptError::Damaged {
        path: path.to_path_buf(),
        msg,
    };
    let manifest = files::read_json(&marker)?;
    let step = manifest
        .get("step")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| damaged(format!("{COMPLETE} has no `step`")))?;
    let listed = manifest
        .get("files")
        .and_then(|f| f.as_object())
        .ok_or_else(|| damaged(format!("{COMPLETE} has no `files` list")))?;
    for (name, want) in listed {
        let p = path.join(name);
        let got = fs::metadata(&p).map(|m| m.len()).ok();
        if got != want.as_u64() {
            return Err(damaged(match got {
                None => format!("`{name}` is missing"),
                Some(g) => format!("`{name}` has {g} bytes, the manifest says {want}"),
            }));
        }
    }
    let weights = match manifest.get("weights").and_then(|w| w.as_str()) {
        Some("adapter") => {
            for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
                if !listed.contains_key(f) {
                    return Err(damaged(format!("LoRA checkpoint without `{f}`")));
                }
            }
            CheckpointWeights::Adapter(path.to_path_buf())
        }
        Some("full") => CheckpointWeights::Full(path.join(FULL_WEIGHTS)),
        other => return Err(damaged(format!("unknown weights kind {other:?}"))),
    };
    Ok(Checkpoint {
        step,
        dir: path.to_path_buf(),
        weights,
        optimizer: files::read_safetensors(&path.join(OPTIMIZER), &Device::Cpu)?,
        trainer_state: files::read_json(&path.join(TRAINER_STATE))?,
    })
}

/// Resume helper: the newest complete checkpoint of the run, loaded; `None` when it has none.
/// The second value is the warning about ignored folders, if any.
pub fn load_latest(run: &RunDir) -> Result<Option<(Checkpoint, Option<String>)>> {
    match latest_complete(run)? {
        None => Ok(None),
        Some(latest) => Ok(Some((load_checkpoint(&latest.path)?, latest.warning()))),
    }
}
