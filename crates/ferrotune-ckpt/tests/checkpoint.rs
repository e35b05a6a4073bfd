//! Run folder and checkpoint invariants: atomic saves, resume from the newest complete
//! checkpoint, half-written checkpoints ignored (or refused when they are all there is), pruning,
//! and save -> load giving identical logits. No reference numbers are needed here: every check
//! compares a value with itself after a round trip, or a file system state with the protocol.

mod common;

use std::fs;

use candle_core::{Device, Tensor};
use common::*;
use ferrotune_ckpt::{
    latest_complete, load_checkpoint, load_latest, prune, save_checkpoint, CheckpointParts,
    CheckpointWeights, CkptError, OnExisting, RunDir, Weights, COMPLETE,
};
use ferrotune_models::{load, LoadOptions};
use ferrotune_nn::Mode;
use serde_json::json;

fn optimizer_state() -> Vec<(String, Tensor)> {
    // Names whose numeric order differs from their sort order: the order must survive.
    ["m.10", "m.2", "v.10", "v.2", "step"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
                .unwrap()
                .affine(1.0, i as f64)
                .unwrap();
            (n.to_string(), t.reshape((2, 3)).unwrap())
        })
        .collect()
}

fn full_parts<'a>(
    weights: &'a [(String, Tensor)],
    opt: &'a [(String, Tensor)],
    state: &'a serde_json::Value,
) -> CheckpointParts<'a> {
    CheckpointParts {
        weights: Weights::Full {
            tensors: weights,
            model: None,
        },
        optimizer: opt,
        trainer_state: state,
    }
}

#[test]
fn run_dir_layout_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let run = RunDir::create(&root, OnExisting::Refuse).unwrap();
    for p in [run.checkpoints_dir(), run.tb_dir(), run.plots_dir()] {
        assert!(p.is_dir(), "{}", p.display());
    }
    assert_eq!(run.metrics_jsonl(), root.join("metrics.jsonl"));
    assert_eq!(run.checkpoint_dir(7), root.join("checkpoints/step-7"));
    run.write_config("a = 1\n").unwrap();
    run.write_config("a = 2\n").unwrap();
    assert_eq!(fs::read_to_string(run.config_toml()).unwrap(), "a = 2\n");
    RunDir::open(&root).unwrap();

    // Creating over an existing run is refused (resume or overwrite instead).
    let err = RunDir::create(&root, OnExisting::Refuse).err().unwrap();
    assert!(matches!(err, CkptError::RunExists { .. }), "{err}");

    // A folder with unrelated files is refused, naming what is there; opening it fails too.
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let err = RunDir::create(&foreign, OnExisting::Refuse).err().unwrap();
    assert!(matches!(err, CkptError::ForeignFolder { .. }), "{err}");
    assert!(err.to_string().contains("notes.txt"), "{err}");
    assert!(matches!(
        RunDir::open(&foreign).err().unwrap(),
        CkptError::NotARun { .. }
    ));

    // Overwrite removes what a run owns and keeps anything else.
    let run = RunDir::create(&foreign, OnExisting::Overwrite).unwrap();
    assert_eq!(
        fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
    let w = vec![(
        "w".to_string(),
        Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )];
    let state = json!({"step": 1});
    save_checkpoint(&run, 1, &full_parts(&w, &[], &state)).unwrap();
    // The step logs and outputs trainers write beside the metrics belong to the run too: an
    // old run's completions must not be read as the new run's.
    for f in [
        "completions.jsonl",
        "health.jsonl",
        "compare.json",
        "ref_logps.json",
    ] {
        fs::write(foreign.join(f), "{\"step\": 1}\n").unwrap();
    }
    fs::create_dir_all(foreign.join("model")).unwrap();
    fs::write(foreign.join("model/config.json"), "{}").unwrap();
    // A `model` folder that is not a model (no config.json) is the user's and stays.
    let kept = tmp.path().join("kept");
    fs::create_dir_all(kept.join("model")).unwrap();
    fs::write(kept.join("model/notes.txt"), "mine").unwrap();
    RunDir::create(&foreign, OnExisting::Overwrite).unwrap();
    RunDir::create(&kept, OnExisting::Overwrite).unwrap();
    for gone in [
        "checkpoints/step-1",
        "completions.jsonl",
        "health.jsonl",
        "compare.json",
        "ref_logps.json",
        "model",
    ] {
        assert!(!foreign.join(gone).exists(), "{gone} survived --overwrite");
    }
    assert_eq!(
        fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(kept.join("model/notes.txt").is_file());
}

#[test]
fn adapter_checkpoint_round_trip_gives_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(&tmp.path().join("run"), OnExisting::Refuse).unwrap();
    let model = ferrotune_adapter_model();
    let opt = optimizer_state();
    let state = json!({"step": 3, "epoch": 0, "cursor": {"row": 12}, "rng": [1, 2, 3], "metrics": {"loss": 1.25}});
    let parts = CheckpointParts {
        weights: Weights::Adapter {
            model: model.as_ref(),
            lora: &llama_lora(),
            base_name: "fixtures/tiny/llama",
        },
        optimizer: &opt,
        trainer_state: &state,
    };
    let dir = save_checkpoint(&run, 3, &parts).unwrap();
    assert_eq!(dir, run.checkpoint_dir(3));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        COMPLETE,
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    assert!(!run.checkpoints_dir().join(".tmp-step-3").exists());

    let (ck, warning) = load_latest(&run).unwrap().unwrap();
    assert!(warning.is_none());
    assert_eq!(ck.step, 3);
    assert_eq!(ck.trainer_state, state);
    let names: Vec<&str> = ck.optimizer.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["m.10", "m.2", "v.10", "v.2", "step"]);
    for ((_, a), (_, b)) in ck.optimizer.iter().zip(&opt) {
        assert_eq!(max_abs(a, b), 0.0);
    }

    // A fresh model (different seed for A, B = 0) restored from the checkpoint gives the same
    // logits as the model that was saved.
    let opts = LoadOptions {
        lora: Some((llama_lora(), 99)),
        ..LoadOptions::default()
    };
    let fresh = load(&tiny("llama"), &opts).unwrap().model;
    let b = right_batch("llama");
    let before = fresh.forward(&b, None, Mode::EVAL).unwrap();
    ck.restore_adapter(fresh.as_ref()).unwrap();
    let want = model.forward(&b, None, Mode::EVAL).unwrap();
    let got = fresh.forward(&b, None, Mode::EVAL).unwrap();
    assert_eq!(max_abs(&got, &want), 0.0, "restored adapter changes logits");
    assert!(max_abs(&before, &want) > 1e-3, "restore was a no-op test");

    // The same step is never saved over.
    let err = save_checkpoint(&run, 3, &parts).err().unwrap();
    assert!(
        matches!(err, CkptError::CheckpointExists { step: 3, .. }),
        "{err}"
    );
}

#[test]
fn full_weights_checkpoint_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path(), OnExisting::Refuse).unwrap();
    let w = vec![
        (
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            Tensor::randn(0f32, 1.0, (4, 3), &Device::Cpu).unwrap(),
        ),
        (
            "lm_head.weight".to_string(),
            Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu).unwrap(),
        ),
    ];
    let state = json!({"step": 10});
    let dir = save_checkpoint(&run, 10, &full_parts(&w, &optimizer_state(), &state)).unwrap();
    let ck = load_checkpoint(&dir).unwrap();
    assert_eq!(
        ck.weights,
        CheckpointWeights::Full(dir.join("model.safetensors"))
    );
    assert!(ck.adapter_dir().is_none());
    let back = ck.full_weights().unwrap();
    assert_eq!(back.len(), 2);
    for ((na, a), (nb, b)) in back.iter().zip(&w) {
        assert_eq!(na, nb);
        assert_eq!(max_abs(a, b), 0.0);
    }
    // A full checkpoint is not an adapter.
    let model = ferrotune_adapter_model();
    assert!(ck.restore_adapter(model.as_ref()).is_err());
}

#[test]
fn half_written_checkpoints_are_ignored_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path(), OnExisting::Refuse).unwrap();
    assert!(
        latest_complete(&run).unwrap().is_none(),
        "empty run has no checkpoint"
    );

    // Only a `.tmp-step-N` (the run died while saving): a clear error naming the folder.
    let tmp_dir = run.checkpoints_dir().join(".tmp-step-5");
    fs::create_dir_all(&tmp_dir).unwrap();
    fs::write(tmp_dir.join("optimizer.safetensors"), b"trunc").unwrap();
    let err = latest_complete(&run).err().unwrap();
    assert!(matches!(err, CkptError::OnlyIncomplete { .. }), "{err}");
    assert!(err.to_string().contains(".tmp-step-5"), "{err}");
    assert!(load_latest(&run).is_err());
    // Loading the half-written folder directly is refused too.
    let err = load_checkpoint(&tmp_dir).err().unwrap();
    assert!(matches!(err, CkptError::Incomplete { .. }), "{err}");

    // A complete step 4 and a `step-6` without its marker: step 4 wins, and both leftovers are
    // listed in the warning.
    let w = vec![(
        "w".to_string(),
        Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )];
    let state = json!({"step": 4});
    save_checkpoint(&run, 4, &full_parts(&w, &[], &state)).unwrap();
    fs::create_dir_all(run.checkpoint_dir(6)).unwrap();
    let latest = latest_complete(&run).unwrap().unwrap();
    assert_eq!(latest.step, 4);
    let warning = latest.warning().unwrap();
    assert!(
        warning.contains(".tmp-step-5") && warning.contains("step-6"),
        "{warning}"
    );

    // A crashed save of step 5 does not block saving step 5 again.
    save_checkpoint(&run, 5, &full_parts(&w, &[], &state)).unwrap();
    assert_eq!(latest_complete(&run).unwrap().unwrap().step, 5);
}

#[test]
fn damaged_checkpoint_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path(), OnExisting::Refuse).unwrap();
    let w = vec![(
        "w".to_string(),
        Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )];
    let state = json!({"step": 1});
    let dir = save_checkpoint(&run, 1, &full_parts(&w, &optimizer_state(), &state)).unwrap();
    // Truncate a file behind the marker's back.
    let p = dir.join("optimizer.safetensors");
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_checkpoint(&dir).err().unwrap();
    assert!(matches!(err, CkptError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
}

#[test]
fn prune_keeps_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path(), OnExisting::Refuse).unwrap();
    let w = vec![(
        "w".to_string(),
        Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )];
    let state = json!({});
    // Steps 2 < 10 < 100: numeric order, not string order, decides which is newest.
    for step in [100u64, 2, 10] {
        save_checkpoint(&run, step, &full_parts(&w, &[], &state)).unwrap();
    }
    let deleted = prune(&run, 2).unwrap();
    assert_eq!(deleted, vec![run.checkpoint_dir(2)]);
    assert_eq!(ferrotune_ckpt::complete_steps(&run).unwrap(), vec![10, 100]);
    // keep_last = 0 still keeps the newest.
    prune(&run, 0).unwrap();
    assert_eq!(ferrotune_ckpt::complete_steps(&run).unwrap(), vec![100]);
    assert_eq!(latest_complete(&run).unwrap().unwrap().step, 100);
    let left: Vec<_> = fs::read_dir(run.checkpoints_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "no .del- leftovers: {left:?}");
}

/// Equal tensors give byte-identical files (the writer's hash-map header order is made
/// canonical), in a fresh process each time, and the files still load elsewhere with the
/// tensors intact.
#[test]
fn equal_checkpoints_are_byte_identical_files() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = optimizer_state();
    let mut files = Vec::new();
    for i in 0..4 {
        let p = tmp.path().join(format!("t{i}.safetensors"));
        ferrotune_ckpt::files::write_safetensors(&p, &tensors).unwrap();
        files.push(fs::read(&p).unwrap());
        let back = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        for (name, t) in &tensors {
            let d = (t - &back[name])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{name}");
        }
        let order: Vec<String> = ferrotune_ckpt::files::read_safetensors(&p, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let want: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(order, want);
    }
    assert!(files.windows(2).all(|w| w[0] == w[1]));
}
