//! The deterministic reward model that fixtures/reward/ferrotune_export holds: shared by the test
//! `reward_export` and `examples/make_reward_export.rs`, which writes that folder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrotune_models::{load, LoadOptions, RewardModel};
use ferrotune_nn::LoraConfig;

pub fn reward_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reward")
}

/// LoRA r=4, alpha=8 on the seven projections: the same config as the PEFT interop fixture
/// (`common::llama_lora`; the including crate declares `common` too).
pub fn lora() -> LoraConfig {
    crate::common::llama_lora()
}

/// The causal model at `base` with LoRA (A from seed 0, every B set to `0.05 * sin(k)`, k
/// counting B elements across slots in slot order from 1, so the adapters change the scores)
/// and a fresh score head from `head_seed`.
pub fn reward_model(base: &Path, head_seed: u64) -> RewardModel {
    let opts = LoadOptions {
        lora: Some((lora(), 0)),
        ..LoadOptions::default()
    };
    let loaded = load(base, &opts).unwrap();
    let mut k = 0u64;
    for slot in loaded.model.linear_slots() {
        let Some(l) = &slot.lora else { continue };
        let (out, r) = l.b.dims2().unwrap();
        let vals: Vec<f32> = (0..out * r)
            .map(|_| {
                k += 1;
                (0.05 * (k as f64).sin()) as f32
            })
            .collect();
        l.b.set(&Tensor::from_vec(vals, (out, r), &Device::Cpu).unwrap())
            .unwrap();
    }
    RewardModel::from_causal(loaded, head_seed).unwrap()
}

/// The model of fixtures/reward/ferrotune_export: fixtures/reward/base + the adapters above +
/// head seed 7.
pub fn export_fixture_model() -> RewardModel {
    reward_model(&reward_fixtures().join("base"), 7)
}

/// Base-model name written into the committed adapter's config.
pub const ADAPTER_BASE: &str = "fixtures/reward/base";
