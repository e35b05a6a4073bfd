//! Merge-and-export: a base model (Hugging Face folder or GGUF file) plus an optional PEFT
//! adapter, written as a plain Hugging Face folder that transformers, vLLM or llama.cpp's
//! converter read without PEFT:
//!
//! - `model.safetensors`: every tensor of the base under its HF name, with
//!   `W' = W + scale · B A` for adapter slots (GPT-2 Conv1D weights are stored `(in, out)`, so
//!   they get the transposed update, as PEFT's `fan_in_fan_out` merge does);
//! - `config.json`: copied from an HF folder (dtype field updated), or generated from the
//!   resolved [`ModelConfig`] with transformers' field names for a GGUF base;
//! - tokenizer files: copied, or for GGUF built from the metadata (`tokenizer.json` +
//!   `tokenizer_config.json` with the chat template and bos/eos);
//! - `generation_config.json` when the base has one (GGUF: bos/eos ids).
//!
//! [`export_model`] does the same for a model already in memory (its LoRA adapters merged),
//! with [`ExportExtras`] to drop base tensors, add tensors and set config fields: how a reward
//! model (`reward.rs`) becomes a `…ForSequenceClassification` folder.
//!
//! The folder is built beside `out` and renamed into place; an existing non-empty `out` is
//! refused. Owns: the merge and the file set. Does not own: reading weights or adapters
//! (`ferrotune_models`), tokenizer construction (`ferrotune_tokenize`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use ferrotune_models::gguf::GgufStore;
use ferrotune_models::source::{RawStore, SafetensorsStore};
use ferrotune_models::{load, CausalLm, Family, LayerType, LoadOptions, ModelConfig};
use ferrotune_nn::RopeScaling;
use ferrotune_tokenize::Tokenizer;
use serde_json::{json, Value};

use crate::error::{io, CkptError, Result};
use crate::files;
use crate::peft::load_with_adapter;

/// Tokenizer files of a Hugging Face folder, copied verbatim when present.
const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    /// Number of tensors in `model.safetensors`.
    pub tensors: usize,
    /// Weights that received an adapter update (HF names).
    pub merged: Vec<String>,
    /// Files written, relative to `out`.
    pub files: Vec<String>,
    /// Things the user should know (e.g. no tokenizer could be exported from a GGUF).
    pub warnings: Vec<String>,
}

/// transformers' name for a dtype, as written in `config.json`.
pub(crate) fn dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::BF16 => Some("bfloat16"),
        DType::F16 => Some("float16"),
        _ => None,
    }
}

/// Tensors checkpoints may carry that transformers derives itself (mirrors the loader).
fn derived_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
}

fn is_gguf(p: &Path) -> bool {
    p.is_file() && p.extension().and_then(|e| e.to_str()) == Some("gguf")
}

/// What an export writes beyond the base's own tensors and config, for models that are a causal
/// body plus something else (a reward model's `score.weight` and sequence-classification config
/// fields). Empty for a plain merged export.
#[derive(Debug, Clone, Default)]
pub struct ExportExtras {
    /// Base tensors left out, by HF name (e.g. `lm_head.weight`, unused by a classifier).
    pub drop: Vec<String>,
    /// Tensors added, by HF name (any dtype; written in the export dtype).
    pub tensors: Vec<(String, Tensor)>,
    /// Top-level `config.json` fields set, replacing the base's.
    pub config: serde_json::Map<String, Value>,
}

fn check_output(out: &Path, dtype: DType) -> Result<&'static str> {
    let dtype_str = dtype_name(dtype).ok_or_else(|| CkptError::Unsupported {
        path: out.to_path_buf(),
        msg: format!("export dtype {dtype:?}; use f32, bf16 or f16"),
    })?;
    if !files::entries(out)?.is_empty() {
        return Err(CkptError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    Ok(dtype_str)
}

/// Merge `adapter` (if any) into `base` and write a Hugging Face folder at `out` in `dtype`
/// (f32, bf16 or f16). See the module docs for the files written.
pub fn export_merged(
    base: &Path,
    adapter: Option<&Path>,
    out: &Path,
    dtype: DType,
) -> Result<ExportReport> {
    check_output(out, dtype)?;
    // Building the model checks that every base tensor is one we understand (names, shapes,
    // config) and, with an adapter, that its keys fit the slots exactly.
    let opts = LoadOptions::default();
    let loaded = match adapter {
        Some(a) => load_with_adapter(base, a, &opts)?,
        None => load(base, &opts)?,
    };
    export_model(
        base,
        loaded.model.as_ref(),
        out,
        dtype,
        &ExportExtras::default(),
    )
}

/// The decoder-layer index of an HF tensor name (`model.layers.7.…`, GPT-2's
/// `transformer.h.7.…`) with the prefix and the rest of the name.
fn layer_of(name: &str) -> Option<(&'static str, usize, &str)> {
    for prefix in ["model.layers.", "transformer.h."] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let (idx, tail) = rest.split_once('.')?;
            return Some((prefix, idx.parse().ok()?, tail));
        }
    }
    None
}

/// Write a smaller model made of some of `base`'s decoder layers (in the given order,
/// renumbered from 0) with its embeddings, final norm and head: a student that starts from the
/// teacher's weights (layer dropping, as DistilBERT's and Minitron's students are initialised),
/// sharing its tokenizer. `config.json` gets the new `num_hidden_layers`.
pub fn export_layer_subset(
    base: &Path,
    layers: &[usize],
    out: &Path,
    dtype: DType,
) -> Result<ExportReport> {
    check_output(out, dtype)?;
    let loaded = load(base, &LoadOptions::default())?;
    let n = loaded.model.config().num_layers;
    if layers.is_empty() || layers.iter().any(|&l| l >= n) {
        return Err(CkptError::Unsupported {
            path: base.to_path_buf(),
            msg: format!(
                "layers {layers:?}: the model has layers 0..{n}; give at least one of them"
            ),
        });
    }
    let store: Box<dyn RawStore> = if is_gguf(base) {
        Box::new(GgufStore::open(base)?)
    } else {
        Box::new(SafetensorsStore::open(&safetensors_files(base)?, base)?)
    };
    let mut extras = ExportExtras::default();
    for name in store.names() {
        let Some((prefix, idx, tail)) = layer_of(&name) else {
            continue;
        };
        extras.drop.push(name.clone());
        for (new_idx, _) in layers.iter().enumerate().filter(|(_, &l)| l == idx) {
            if let Some(t) = store.load(&name, &Device::Cpu)? {
                extras
                    .tensors
                    .push((format!("{prefix}{new_idx}.{tail}"), t.to_dtype(DType::F32)?));
            }
        }
    }
    drop(store);
    extras
        .config
        .insert("num_hidden_layers".into(), json!(layers.len()));
    if loaded.model.config().family == Family::Gpt2 {
        extras.config.insert("n_layer".into(), json!(layers.len()));
    }
    export_model(base, loaded.model.as_ref(), out, dtype, &extras)
}

/// Write `model` — built from the base weights stored at `base` (HF folder or GGUF), with its
/// in-memory LoRA adapters merged — as a Hugging Face folder at `out`, changed by `extras`.
pub fn export_model(
    base: &Path,
    model: &dyn CausalLm,
    out: &Path,
    dtype: DType,
    extras: &ExportExtras,
) -> Result<ExportReport> {
    let dtype_str = check_output(out, dtype)?;
    let cfg = model.config().clone();
    let deltas = adapter_deltas(model, base)?;

    let gguf = is_gguf(base);
    let store: Box<dyn RawStore> = if gguf {
        Box::new(GgufStore::open(base)?)
    } else {
        Box::new(SafetensorsStore::open(&safetensors_files(base)?, base)?)
    };
    let mut names = store.names();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut merged = Vec::new();
    let dropped = |n: &String| extras.drop.contains(n);
    for name in names
        .into_iter()
        .filter(|n| !derived_buffer(n) && !dropped(n))
    {
        let Some(t) = store.load(&name, &Device::Cpu)? else {
            continue;
        };
        let mut t = t.to_dtype(DType::F32)?;
        if let Some(delta) = deltas.get(&name) {
            // GPT-2 keeps its block projections as Conv1D, (in, out): add the update transposed.
            let delta = if cfg.family == Family::Gpt2 && name != "lm_head.weight" {
                delta.t()?
            } else {
                delta.clone()
            };
            if t.dims() != delta.dims() {
                return Err(CkptError::AdapterMismatch {
                    slot: name.clone(),
                    msg: format!(
                        "update {:?} does not fit the stored weight {:?}",
                        delta.dims(),
                        t.dims()
                    ),
                });
            }
            t = (t + delta)?;
            merged.push(name.clone());
        }
        tensors.push((name, t.to_dtype(dtype)?.contiguous()?));
    }
    if merged.len() != deltas.len() {
        let mut missing: Vec<&String> = deltas.keys().filter(|k| !merged.contains(k)).collect();
        missing.sort();
        return Err(CkptError::AdapterMismatch {
            slot: missing.first().map(|s| s.to_string()).unwrap_or_default(),
            msg: format!(
                "adapter slots whose weights are not stored in the base (or are dropped from \
                 the export): {missing:?}"
            ),
        });
    }
    drop(store);
    for (name, t) in &extras.tensors {
        if tensors.iter().any(|(n, _)| n == name) {
            return Err(CkptError::Unsupported {
                path: base.to_path_buf(),
                msg: format!("the export would write {name} twice (base and extra tensor)"),
            });
        }
        let t = t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()?;
        tensors.push((name.clone(), t));
    }

    let staging = files::staging_sibling(out, "partial");
    crate::run::remove_any(&staging)?;
    fs::create_dir_all(&staging).map_err(io(&staging))?;
    let mut report = ExportReport {
        out: out.to_path_buf(),
        tensors: tensors.len(),
        merged,
        files: Vec::new(),
        warnings: Vec::new(),
    };
    files::write_safetensors(&staging.join("model.safetensors"), &tensors)?;
    drop(tensors);
    write_side_files(
        base,
        &cfg,
        dtype_str,
        &extras.config,
        &staging,
        &mut report.warnings,
    )?;
    report.files = files::entries(&staging)?;
    files::sync_dir(&staging)?;
    files::commit_dir(&staging, out)?;
    Ok(report)
}

/// `scale · B A` (out, in) for every adapter slot, keyed by the slot's HF weight name.
fn adapter_deltas(model: &dyn CausalLm, base: &Path) -> Result<HashMap<String, Tensor>> {
    let mut deltas = HashMap::new();
    for slot in model.linear_slots() {
        let Some(l) = &slot.lora else { continue };
        if slot.path.ends_with("lm_head") && model.config().tie_word_embeddings {
            return Err(CkptError::Unsupported {
                path: base.to_path_buf(),
                msg: "the adapter targets lm_head, which is tied to the embeddings; merging \
                      would change both. Export without merging or untie the head first"
                    .into(),
            });
        }
        let a = l.a.as_tensor().to_dtype(DType::F32)?; // (r, in)
        let b = l.b.as_tensor().to_dtype(DType::F32)?; // (out, r)
                                                       // Same order as PEFT's merge: (B @ A) * scaling, then added to W.
        let delta = (b.matmul(&a)? * l.scale)?; // (out, in)
        deltas.insert(format!("{}.weight", slot.path), delta);
    }
    Ok(deltas)
}

/// The safetensors files of an HF folder: `model.safetensors`, or the shards of the index.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let v = files::read_json(&index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| CkptError::Unsupported {
            path: index.clone(),
            msg: "`weight_map` is missing or not an object".into(),
        })?;
    let mut out: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The files beside `model.safetensors` that make `staging` load as the model `base` does:
/// config.json (with `dtype_str` and `patch`), the tokenizer and the generation config, copied
/// from an HF folder or built from a GGUF's metadata. What could not be written (a GGUF without
/// a tokenizer) goes to `warnings`.
pub(crate) fn write_side_files(
    base: &Path,
    cfg: &ModelConfig,
    dtype_str: &str,
    patch: &serde_json::Map<String, Value>,
    staging: &Path,
    warnings: &mut Vec<String>,
) -> Result<()> {
    if is_gguf(base) {
        write_gguf_side_files(base, cfg, dtype_str, patch, staging, warnings)
    } else {
        copy_hf_side_files(base, dtype_str, patch, staging)
    }
}

/// HF base: copy config.json (with the export dtype and `patch`), tokenizer files, generation
/// config.
fn copy_hf_side_files(
    base: &Path,
    dtype_str: &str,
    patch: &serde_json::Map<String, Value>,
    staging: &Path,
) -> Result<()> {
    let cfg_path = base.join("config.json");
    let mut cfg = files::read_json(&cfg_path)?;
    if let Some(obj) = cfg.as_object_mut() {
        // transformers 5 writes `dtype`, older versions `torch_dtype`; keep whichever is there.
        let mut set = false;
        for key in ["dtype", "torch_dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), dtype_str.into());
                set = true;
            }
        }
        if !set {
            obj.insert("torch_dtype".into(), dtype_str.into());
        }
        obj.extend(patch.clone());
    }
    files::write_json(&staging.join("config.json"), &cfg)?;
    for name in TOKENIZER_FILES
        .iter()
        .chain(["generation_config.json"].iter())
    {
        let p = base.join(name);
        if p.is_file() {
            files::copy_new(&p, &staging.join(name))?;
        }
    }
    let templates = base.join("chat_templates");
    if templates.is_dir() {
        let to = staging.join("chat_templates");
        fs::create_dir(&to).map_err(io(&to))?;
        for name in files::entries(&templates)? {
            let p = templates.join(&name);
            if p.is_file() {
                files::copy_new(&p, &to.join(&name))?;
            }
        }
    }
    Ok(())
}

/// One id as a number, several as a list (transformers accepts both for `eos_token_id`).
fn ids_value(ids: &[u32]) -> Option<Value> {
    match ids {
        [] => None,
        [one] => Some(json!(one)),
        many => Some(json!(many)),
    }
}

/// A float that came from an f32 GGUF field, written as the f32's shortest decimal (1e-5, not
/// 9.999999747378752e-6), as transformers' own conversion writes it.
fn f32_clean(x: f64) -> Value {
    let f = x as f32;
    if f as f64 == x {
        if let Ok(clean) = f.to_string().parse::<f64>() {
            return json!(clean);
        }
    }
    json!(x)
}

/// `config.json` for a resolved config, with transformers' field names, so that
/// `AutoModelForCausalLM.from_pretrained` builds the same model.
pub fn hf_config_json(cfg: &ModelConfig, dtype_str: &str) -> Value {
    let mut v = if cfg.family == Family::Gpt2 {
        json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": f32_clean(cfg.norm_eps),
            "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_word_embeddings,
        })
    } else {
        let arch = match cfg.family {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Gpt2 => "GPT2LMHeadModel",
        };
        let rope_scaling = match &cfg.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => json!({ "rope_type": "linear", "factor": factor }),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
        };
        let mut v = json!({
            "architectures": [arch],
            "model_type": cfg.family.model_type(),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": f32_clean(cfg.norm_eps),
            "rope_theta": f32_clean(cfg.rope_theta),
            "rope_scaling": rope_scaling,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
        });
        let mut extra = serde_json::Map::new();
        match cfg.family {
            // Qwen2's q/k/v biases are implied by the family; it has no such field.
            Family::Qwen2 => {}
            _ => {
                extra.insert("attention_bias".into(), cfg.attention_bias.into());
            }
        }
        if matches!(cfg.family, Family::Llama) {
            extra.insert("mlp_bias".into(), cfg.mlp_bias.into());
        }
        match cfg.family {
            Family::Qwen2 | Family::Qwen3 => {
                extra.insert(
                    "use_sliding_window".into(),
                    cfg.sliding_window.is_some().into(),
                );
                extra.insert("sliding_window".into(), json!(cfg.sliding_window));
            }
            Family::Mistral => {
                extra.insert("sliding_window".into(), json!(cfg.sliding_window));
            }
            Family::Gemma3 => {
                // transformers 4.x and 5.x both read these (5.x folds the two rope bases into
                // `rope_parameters` itself).
                let types: Vec<&str> = cfg
                    .layer_types
                    .iter()
                    .map(|t| match t {
                        LayerType::Full => "full_attention",
                        LayerType::Sliding => "sliding_attention",
                    })
                    .collect();
                extra.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
                extra.insert("layer_types".into(), json!(types));
                extra.insert("sliding_window".into(), json!(cfg.sliding_window));
                extra.insert("rope_local_base_freq".into(), json!(cfg.rope_local_theta));
                extra.insert(
                    "query_pre_attn_scalar".into(),
                    json!(cfg.query_pre_attn_scalar),
                );
            }
            _ => {}
        }
        if cfg.family == Family::Gemma3 {
            if let Some(o) = v.as_object_mut() {
                o.remove("hidden_act");
            }
        }
        extend(&mut v, extra);
        v
    };
    let mut tail = serde_json::Map::new();
    if let Some(b) = cfg.bos_token_id {
        tail.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = ids_value(&cfg.eos_token_ids) {
        tail.insert("eos_token_id".into(), e);
    }
    tail.insert("torch_dtype".into(), dtype_str.into());
    extend(&mut v, tail);
    v
}

fn extend(v: &mut Value, more: serde_json::Map<String, Value>) {
    if let Value::Object(o) = v {
        o.extend(more);
    }
}

/// GGUF base: config.json from the resolved config, tokenizer from the metadata, generation
/// config from the bos/eos ids.
fn write_gguf_side_files(
    base: &Path,
    cfg: &ModelConfig,
    dtype_str: &str,
    patch: &serde_json::Map<String, Value>,
    staging: &Path,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let mut config = hf_config_json(cfg, dtype_str);
    extend(&mut config, patch.clone());
    files::write_json(&staging.join("config.json"), &config)?;
    let mut gen = serde_json::Map::new();
    if let Some(b) = cfg.bos_token_id {
        gen.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = ids_value(&cfg.eos_token_ids) {
        gen.insert("eos_token_id".into(), e);
    }
    if !gen.is_empty() {
        files::write_json(&staging.join("generation_config.json"), &Value::Object(gen))?;
    }

    let mut f = fs::File::open(base).map_err(io(base))?;
    let content = Content::read(&mut f).map_err(|e| CkptError::Unsupported {
        path: base.to_path_buf(),
        msg: format!("cannot read the GGUF header again: {e}"),
    })?;
    if !content.metadata.contains_key("tokenizer.ggml.model") {
        warnings.push(format!(
            "{}: no tokenizer in the GGUF metadata; the export has no tokenizer files",
            base.display()
        ));
        return Ok(());
    }
    // A tokenizer we cannot rebuild does not make the weights less useful: export them and
    // say why the tokenizer is missing.
    let tok = match Tokenizer::from_gguf(&content) {
        Ok(t) => t,
        Err(e) => {
            warnings.push(format!("{}: tokenizer not exported: {e}", base.display()));
            return Ok(());
        }
    };
    let tok_path = staging.join("tokenizer.json");
    let text = tok
        .inner()
        .to_string(false)
        .map_err(|e| CkptError::Unsupported {
            path: tok_path.clone(),
            msg: format!("cannot serialise the tokenizer: {e}"),
        })?;
    files::write_new(&tok_path, text.as_bytes())?;
    let token = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).map(Value::from);
    let mut tc = serde_json::Map::new();
    tc.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    tc.insert(
        "model_max_length".into(),
        cfg.max_position_embeddings.into(),
    );
    tc.insert("clean_up_tokenization_spaces".into(), false.into());
    tc.insert("add_bos_token".into(), tok.add_bos_token().into());
    tc.insert("add_eos_token".into(), tok.add_eos_token().into());
    if let Some(b) = tok.bos_token() {
        tc.insert("bos_token".into(), b.into());
    }
    if let Some(e) = tok.eos_token() {
        tc.insert("eos_token".into(), e.into());
    }
    if let Some(p) = token(tok.pad_id()) {
        tc.insert("pad_token".into(), p);
    }
    if let Some(t) = tok.chat_template() {
        tc.insert("chat_template".into(), t.into());
    }
    files::write_json(&staging.join("tokenizer_config.json"), &Value::Object(tc))
}
