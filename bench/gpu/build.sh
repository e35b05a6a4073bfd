#!/usr/bin/env bash
# Builds what bench/gpu/check.sh runs on the GPU machine, on a machine with no GPU: the release
# binary with --features cuda and the GPU kernel test binary, gzipped into .carry/ (git-ignored;
# name it in the device tool's `carry`). The first build takes 10-25 minutes (candle's kernels).
#
#   bash bench/gpu/build.sh      (from the repo root)
# Env: CARGO_TARGET_DIR (default target-cuda beside the repo, so CPU builds stay untouched).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash ../shared/cuda/setup-toolchain.sh >/dev/null
# shellcheck disable=SC1090
. ~/.cache/ferrotune-cuda/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(pwd)/../target-cuda}
cargo build --release --features cuda -p ferrotune
test_bin=$(cargo test --release --features cuda -p ferrotune-nn --test cuda_ops --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_ops":
        print(m["executable"])' | tail -n 1)
# The CLI library's unit tests, with the one-device test of a run (session.rs) compiled in.
lib_bin=$(cargo test --release --features cuda -p ferrotune --lib --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])' | tail -n 1)
mkdir -p .carry
gzip -c "$CARGO_TARGET_DIR/release/ferrotune" > .carry/ferrotune.gz
[ -n "$lib_bin" ] && gzip -c "$lib_bin" > .carry/ferrotune_lib_tests.gz
gzip -c "$test_bin" > .carry/cuda_ops.gz
ls -l .carry
