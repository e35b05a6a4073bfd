//! PEFT interop both ways. Fixtures: fixtures/ckpt/make_ckpt_fixtures.py (PEFT's logits for the
//! adapter we wrote) and fixtures/tiny/make_tiny.py (adapters written by PEFT, with PEFT's logits).

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use common::*;
use ferrotune_ckpt::{load_with_adapter, save_adapter, CkptError};
use ferrotune_models::adapter::PeftConfig;
use ferrotune_models::LoadOptions;
use ferrotune_nn::Mode;

/// Tensors as (dims, raw f32 bits), for bitwise comparison.
fn bits(map: &HashMap<String, Tensor>) -> HashMap<String, (Vec<usize>, Vec<u32>)> {
    map.iter()
        .map(|(k, t)| {
            let v: Vec<u32> = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect();
            (k.clone(), (t.dims().to_vec(), v))
        })
        .collect()
}

#[test]
fn ferrotune_adapter_loads_in_peft() {
    // Regenerate the adapter and check the committed fixture is still exactly what we write, so
    // PEFT's logits (computed from the committed files) are logits for *our* output.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    let model = ferrotune_adapter_model();
    save_adapter(model.as_ref(), &llama_lora(), FERROTUNE_ADAPTER_BASE, &dir).unwrap();
    let committed = ckpt_fixtures().join("ferrotune_adapter");
    let ours = st(&dir.join("adapter_model.safetensors"));
    let theirs = st(&committed.join("adapter_model.safetensors"));
    assert_eq!(ours.len(), 28, "7 targets x 2 layers x (A, B)");
    assert!(bits(&ours) == bits(&theirs), "committed ferrotune_adapter differs from what save_adapter writes; rerun the example and the fixture script");
    let cfg_ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let cfg_theirs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(committed.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg_ours, cfg_theirs);
    for (k, v) in [
        ("peft_type", "\"LORA\""),
        ("r", "4"),
        ("lora_alpha", "8.0"),
        ("task_type", "\"CAUSAL_LM\""),
        ("bias", "\"none\""),
        ("fan_in_fan_out", "false"),
        ("use_rslora", "false"),
        ("base_model_name_or_path", "\"fixtures/tiny/llama\""),
    ] {
        assert_eq!(cfg_ours[k].to_string(), v, "adapter_config.json field {k}");
    }

    // Our logits with that adapter equal PEFT's.
    let peft = st(&ckpt_fixtures().join("peft_logits.safetensors"));
    let b = right_batch("llama");
    let logits = model.forward(&b, None, Mode::EVAL).unwrap();
    let err = masked_max_abs(&logits, &peft["logits"], b.key_mask.as_ref().unwrap());
    println!("ferrotune adapter: max |ours - PEFT| = {err:.3e}");
    assert!(
        err < 1e-4,
        "ferrotune adapter in PEFT: logits differ by {err}"
    );
    // And the adapter matters: without it the logits are far from PEFT's.
    let base = model.forward(&b, None, Mode::REFERENCE).unwrap();
    let moved = masked_max_abs(&base, &peft["logits"], b.key_mask.as_ref().unwrap());
    assert!(moved > 1e-2, "adapter moved logits by only {moved}");
}

#[test]
fn peft_adapters_load_and_match_peft_logits() {
    for name in ["llama", "gpt2"] {
        let loaded = load_with_adapter(
            &tiny(name),
            &tiny(name).join("adapter"),
            &LoadOptions::default(),
        )
        .unwrap();
        let model = loaded.model;
        let n = model
            .linear_slots()
            .iter()
            .filter(|s| s.lora.is_some())
            .count();
        assert_eq!(
            n,
            if name == "llama" { 14 } else { 8 },
            "{name}: adapter slots"
        );
        let want = st(&tiny(name).join("lora_grads.safetensors"));
        let b = right_batch(name);
        let logits = model.forward(&b, None, Mode::EVAL).unwrap();
        let err = masked_max_abs(&logits, &want["logits"], b.key_mask.as_ref().unwrap());
        println!("{name}: PEFT adapter, max |ours - PEFT| = {err:.3e}");
        assert!(err < 1e-4, "{name}: PEFT adapter logits differ by {err}");
    }
}

#[test]
fn peft_adapter_round_trips_through_save_adapter() {
    // PEFT's gpt2 adapter (Conv1D, fan_in_fan_out) -> ours -> saved -> reloaded: same tensors,
    // and the config says fan_in_fan_out as PEFT wrote it.
    let name = "gpt2";
    let adir = tiny(name).join("adapter");
    let loaded = load_with_adapter(&tiny(name), &adir, &LoadOptions::default()).unwrap();
    let lora = PeftConfig::from_dir(&adir).unwrap().lora_config().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("again");
    save_adapter(loaded.model.as_ref(), &lora, "tiny-gpt2", &out).unwrap();
    assert!(
        bits(&st(&out.join("adapter_model.safetensors")))
            == bits(&st(&adir.join("adapter_model.safetensors")))
    );
    let cfg = PeftConfig::from_dir(&out).unwrap();
    assert!(cfg.fan_in_fan_out);
    assert_eq!(cfg.base_model_name_or_path.as_deref(), Some("tiny-gpt2"));
    // No staging folder is left beside the output.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["again".to_string()]);
}

#[test]
fn adapter_matching_nothing_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("adapter");
    std::fs::create_dir(&adir).unwrap();
    let src = tiny("llama").join("adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        adir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    // GPT-2 module names on a Llama model.
    cfg["target_modules"] = serde_json::json!(["c_attn", "c_fc"]);
    std::fs::write(adir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let err = load_with_adapter(&tiny("llama"), &adir, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, CkptError::NoTargetMatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("c_attn") && msg.contains("q_proj") && msg.contains("adapter"),
        "{msg}"
    );
}

#[test]
fn save_adapter_refuses_a_model_without_adapters_and_a_wrong_config() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = ferrotune_models::load(&tiny("llama"), &LoadOptions::default())
        .unwrap()
        .model;
    let err = save_adapter(plain.as_ref(), &llama_lora(), "", &tmp.path().join("a"))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            CkptError::AdapterMismatch { .. } | CkptError::NoAdapters
        ),
        "{err}"
    );

    let model = ferrotune_adapter_model();
    let mut wrong = llama_lora();
    wrong.lora_alpha = 16.0;
    let err = save_adapter(model.as_ref(), &wrong, "", &tmp.path().join("b"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("scale"), "{err}");
    assert!(!tmp.path().join("b").exists());

    // A non-empty destination is never written into.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "x").unwrap();
    let err = save_adapter(model.as_ref(), &llama_lora(), "", &full)
        .err()
        .unwrap();
    assert!(matches!(err, CkptError::OutputExists { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(full.join("keep.txt")).unwrap(), "x");
}
