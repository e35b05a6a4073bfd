//! Shared test helpers: fixture paths, the reference batch of fixtures/tiny, masked logit
//! comparison, and the deterministic ferrotune adapter that fixtures/ckpt/ferrotune_adapter holds
//! (also used by `examples/make_ferrotune_adapter.rs`, which writes that folder).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune_models::{load, Batch, CausalLm, LoadOptions};
use ferrotune_nn::{LoraConfig, TargetModules};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tiny(name: &str) -> PathBuf {
    repo().join("fixtures/tiny").join(name)
}

pub fn ckpt_fixtures() -> PathBuf {
    repo().join("fixtures/ckpt")
}

pub fn st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The right-padded batch of fixtures/tiny/<name>/reference.safetensors.
pub fn right_batch(name: &str) -> Batch {
    let r = st(&tiny(name).join("reference.safetensors"));
    Batch {
        input_ids: r["right.input_ids"].to_dtype(DType::U32).unwrap(),
        position_ids: r["right.position_ids"].to_dtype(DType::U32).unwrap(),
        key_mask: Some(r["right.attention_mask"].to_dtype(DType::U8).unwrap()),
        segments: None,
    }
}

/// Max |a - b| over positions where `mask` (B, T) is 1 (padded positions are not compared).
pub fn masked_max_abs(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap(); // (B, T, 1)
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&m)
        .unwrap();
    d.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// LoRA r=4, alpha=8 on q, k, v, o, gate, up, down: the config of fixtures/ckpt/ferrotune_adapter.
pub fn llama_lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::Names(
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        ),
    }
}

/// The tiny llama with a fresh adapter (A from seed 0) whose every B is set to
/// `0.01 * sin(k)`, k counting B elements across slots in slot order from 1 — deterministic
/// and non-zero, so the adapter visibly changes the logits.
pub fn ferrotune_adapter_model() -> Box<dyn CausalLm> {
    let opts = LoadOptions {
        lora: Some((llama_lora(), 0)),
        ..LoadOptions::default()
    };
    let model = load(&tiny("llama"), &opts).unwrap().model;
    let mut k = 0u64;
    for slot in model.linear_slots() {
        let Some(l) = &slot.lora else { continue };
        let (out, r) = l.b.dims2().unwrap();
        let vals: Vec<f32> = (0..out * r)
            .map(|_| {
                k += 1;
                (0.01 * (k as f64).sin()) as f32
            })
            .collect();
        l.b.set(&Tensor::from_vec(vals, (out, r), &Device::Cpu).unwrap())
            .unwrap();
    }
    model
}

/// Base-model name written into the committed adapter's config.
pub const FERROTUNE_ADAPTER_BASE: &str = "fixtures/tiny/llama";
