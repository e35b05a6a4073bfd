//! Build script: with the `cuda` feature, compiles kernels/ops.cu to PTX with nvcc (found through
//! $NVCC, $CUDA_ROOT/bin or PATH) for $CUDA_COMPUTE_CAP (default 90, Hopper). Without the
//! feature it does nothing, so the default CPU build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/ops.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC")
        .ok()
        .or_else(|| {
            std::env::var("CUDA_ROOT")
                .ok()
                .map(|r| format!("{r}/bin/nvcc"))
        })
        .unwrap_or_else(|| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let ptx = out.join("ferrotune_ops.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("kernels/ops.cu")
        .arg("-o")
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed to compile kernels/ops.cu ({s})"),
        Err(e) => {
            panic!("could not run {nvcc} to compile kernels/ops.cu: {e} (set NVCC or CUDA_ROOT)")
        }
    }
}
