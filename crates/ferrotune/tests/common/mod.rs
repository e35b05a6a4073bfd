//! What the end-to-end tests of the binary share: where the repository is, running the binary,
//! reading a run's metrics and checkpoint tensors. Each test file uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// The repository root (fixtures/, models/, configs/).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Run the ferrotune binary built for this test.
pub fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap()
}

/// Assert the command succeeded (showing its stderr otherwise); returns its stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

/// Every value of `key` in the run's metrics.jsonl, in order.
pub fn metric(run: &Path, key: &str) -> Vec<f64> {
    records(run)
        .iter()
        .filter_map(|v| v.get(key).and_then(|x| x.as_f64()))
        .collect()
}

/// (step, value) of every metrics.jsonl record that has `key`.
pub fn metric_at(run: &Path, key: &str) -> Vec<(u64, f64)> {
    records(run)
        .iter()
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get(key)?.as_f64()?)))
        .collect()
}

/// The tensors of a safetensors file, on the CPU.
pub fn load(p: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// A tensor's values as f64, flattened.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Copy a folder tree (a run folder, to resume a copy of it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
