//! PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<slot path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r). Reads a
//! config into our [`LoraConfig`], loads adapter weights into a model's slots, and saves them.
//! A sequence-classification adapter (`task_type: "SEQ_CLS"`, PEFT's `modules_to_save:
//! ["classifier", "score"]`) also carries the reward head as `base_model.model.score.weight`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use ferrotune_nn::{LoraConfig, TargetModules};
use serde::{Deserialize, Serialize};

use crate::config::Family;
use crate::error::{ModelError, Result};
use crate::source::root_msg;
use crate::CausalLm;

/// `adapter_config.json`, the fields we read or write (PEFT's names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    #[serde(default = "lora_str")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "none_str")]
    pub bias: String,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "task")]
    pub task_type: Option<String>,
}

fn lora_str() -> String {
    "LORA".into()
}
fn none_str() -> String {
    "none".into()
}
fn task() -> Option<String> {
    Some("CAUSAL_LM".into())
}

/// PEFT's key for a slot's adapter matrix (`which` = "lora_A" | "lora_B").
pub fn peft_key(slot_path: &str, which: &str) -> String {
    format!("base_model.model.{slot_path}.{which}.weight")
}

impl PeftConfig {
    /// Read and validate `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let cfg: PeftConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        let bad = |field: &str, msg: &str| ModelError::Config {
            path: path.clone(),
            field: field.into(),
            msg: msg.into(),
        };
        if cfg.peft_type != "LORA" {
            return Err(bad("peft_type", "only LORA adapters are supported"));
        }
        if cfg.r == 0 {
            return Err(bad("r", "must be > 0"));
        }
        if cfg.bias != "none" {
            return Err(bad("bias", "only \"none\" is supported"));
        }
        if cfg.use_dora {
            return Err(bad("use_dora", "DoRA is not supported"));
        }
        if let Some(modules) = cfg.modules_to_save.as_ref().filter(|v| !v.is_null()) {
            // PEFT adds these two for SEQ_CLS; the classifier head of our families is `score`.
            let head_only = modules.as_array().is_some_and(|a| {
                a.iter()
                    .all(|m| matches!(m.as_str(), Some("classifier" | "score")))
            });
            if !(cfg.is_seq_cls() && head_only) {
                return Err(bad(
                    "modules_to_save",
                    "only the sequence-classification head (`score`, with task_type \"SEQ_CLS\") \
                     is supported",
                ));
            }
        }
        cfg.targets().map_err(|m| bad("target_modules", &m))?;
        Ok(cfg)
    }

    /// A sequence-classification (reward model) adapter.
    pub fn is_seq_cls(&self) -> bool {
        self.task_type.as_deref() == Some("SEQ_CLS")
    }

    pub fn targets(&self) -> std::result::Result<TargetModules, String> {
        match &self.target_modules {
            serde_json::Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
            serde_json::Value::Array(a) => {
                let names: Option<Vec<String>> =
                    a.iter().map(|v| v.as_str().map(String::from)).collect();
                names
                    .map(TargetModules::Names)
                    .ok_or_else(|| "must be a list of module names".to_string())
            }
            _ => Err("must be a list of module names or \"all-linear\" (regex strings are not supported)".into()),
        }
    }

    /// The config PEFT writes for `lora` on a model of `family`. GPT-2's slots are Conv1D in
    /// transformers, which PEFT marks with `fan_in_fan_out` (the A/B matrices keep the same
    /// (r, in) / (out, r) layout either way).
    pub fn from_lora(
        lora: &LoraConfig,
        base_model_name_or_path: Option<String>,
        family: Family,
    ) -> Self {
        let target_modules = match &lora.target_modules {
            TargetModules::AllLinear => serde_json::Value::String("all-linear".into()),
            TargetModules::Names(names) => {
                let mut n = names.clone();
                n.sort();
                n.dedup();
                serde_json::Value::from(n)
            }
        };
        PeftConfig {
            peft_type: lora_str(),
            r: lora.r,
            lora_alpha: lora.lora_alpha,
            lora_dropout: lora.lora_dropout,
            target_modules,
            use_rslora: lora.use_rslora,
            base_model_name_or_path,
            bias: none_str(),
            use_dora: false,
            modules_to_save: None,
            fan_in_fan_out: family == Family::Gpt2,
            task_type: task(),
        }
    }

    pub fn lora_config(&self) -> Result<LoraConfig> {
        Ok(LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules: self.targets().map_err(|msg| ModelError::Config {
                path: "adapter_config.json".into(),
                field: "target_modules".into(),
                msg,
            })?,
        })
    }
}

/// Every LoRA slot's matrices under PEFT's keys, in slot order: `lora_A` (r, in) then
/// `lora_B` (out, r), f32 on the CPU, as `adapter_model.safetensors` stores them.
pub fn adapter_tensors(model: &dyn CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for slot in model.linear_slots() {
        let Some(l) = &slot.lora else { continue };
        for (which, var) in [("lora_A", &l.a), ("lora_B", &l.b)] {
            let t = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?
                .contiguous()?;
            out.push((peft_key(&slot.path, which), t));
        }
    }
    Ok(out)
}

/// Load `dir/adapter_model.safetensors` into the model's LoRA slots (the model must have been
/// built with the adapter's LoRA config). Every slot must find its A and B, and every key in
/// the file must belong to a slot.
pub fn load_weights(model: &dyn CausalLm, dir: &Path) -> Result<()> {
    load_weights_keeping(model, dir, &[]).map(|_| ())
}

/// [`load_weights`], except that the keys in `keep` (e.g. a `modules_to_save` head) are not
/// slot keys: they are returned, f32 on the CPU, instead of being refused as unexpected.
pub fn load_weights_keeping(
    model: &dyn CausalLm,
    dir: &Path,
    keep: &[&str],
) -> Result<HashMap<String, Tensor>> {
    let path = dir.join("adapter_model.safetensors");
    if !path.exists() {
        return Err(ModelError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        });
    }
    let device = candle_core::Device::Cpu;
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &device).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            msg: root_msg(&e),
        })?;
    let mut problems = Vec::new();
    let mut kept = HashMap::new();
    for k in keep {
        if let Some(t) = tensors.get(*k) {
            kept.insert(k.to_string(), t.to_dtype(DType::F32)?);
        }
    }
    let mut used = kept.len();
    for slot in model.linear_slots() {
        let Some(l) = &slot.lora else { continue };
        for (which, var) in [("lora_A", &l.a), ("lora_B", &l.b)] {
            let key = peft_key(&slot.path, which);
            match tensors.get(&key) {
                Some(t) if t.dims() == var.dims() => {
                    used += 1;
                    let t = t.to_dtype(DType::F32)?.to_device(var.device())?;
                    var.set(&t)?;
                }
                Some(t) => problems.push(format!(
                    "shape mismatch for {key}: file has {:?}, model expects {:?}",
                    t.dims(),
                    var.dims()
                )),
                None => problems.push(format!("missing key {key}")),
            }
        }
    }
    if used < tensors.len() && problems.is_empty() {
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|k| {
                !keep.contains(&k.as_str())
                    && !model.linear_slots().iter().any(|s| {
                        s.lora.is_some()
                            && (**k == peft_key(&s.path, "lora_A")
                                || **k == peft_key(&s.path, "lora_B"))
                    })
            })
            .collect();
        extra.sort();
        problems.push(format!(
            "unexpected keys (no matching LoRA slot): {}",
            extra
                .iter()
                .take(8)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(kept)
    } else {
        Err(ModelError::Weights { path, problems })
    }
}
