#!/usr/bin/env bash
# The whole GPU-machine session in one script (the device budget is minutes): kernel correctness
# tests, a GRPO step on GPU vs CPU, then the benchmark (bench/gpu/run.sh). Each part runs under
# its own timeout, so a failure in one does not cost the others.
#
#   bash bench/gpu/check.sh            (from the repo root, on the GPU machine)
#
# Needs, carried in .carry/ (git-ignored), built here with the CUDA toolchain
# (../shared/cuda/setup-toolchain.sh; see bench/gpu/README.md):
#   ferrotune.gz  the release binary with --features cuda
#   cuda_ops.gz   the test binary of crates/ferrotune-nn/tests/cuda_ops.rs (cargo test --no-run)
# Writes to $OUT (default ./bench-out) at most 8 files: kernels.log, grpo_parity.txt, table.txt,
# results.jsonl, env.txt, bench_logs.txt.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-./bench-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
SECONDS=0

unpack() { # .carry/NAME.gz -> /tmp/NAME
  if [ -f ".carry/$1.gz" ]; then gunzip -c ".carry/$1.gz" > "/tmp/$1" && chmod +x "/tmp/$1"; fi
}
unpack ferrotune
unpack cuda_ops
unpack ferrotune_lib_tests
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/env.txt" 2>&1

echo "== kernel tests ($SECONDS s)"
if [ -x /tmp/cuda_ops ]; then
  timeout 120 /tmp/cuda_ops --test-threads=1 --nocapture > "$OUT/kernels.log" 2>&1
  echo "exit $?" >> "$OUT/kernels.log"
  grep -E "test result|panicked|FAILED|error" "$OUT/kernels.log" | head -20
else
  echo "no .carry/cuda_ops.gz" | tee "$OUT/kernels.log"
fi

echo "== one device per run ($SECONDS s)"
if [ -x /tmp/ferrotune_lib_tests ]; then
  # Run from crates/ferrotune: the test finds configs/ and fixtures/ from its manifest dir.
  (cd crates/ferrotune && timeout 120 /tmp/ferrotune_lib_tests a_run_puts_every_tensor_on_one_device) >> "$OUT/kernels.log" 2>&1
  grep -E "test result|panicked" "$OUT/kernels.log" | tail -2
fi

echo "== GRPO step, GPU vs CPU ($SECONDS s)"
# The tiny chat model, 2 optimizer steps, beta 0.04 (the reference pass runs too), f32 so both
# devices sample the same completions from the same seed.
G="$OUT/grpo_parity.txt"
: > "$G"
for dev in cpu cuda; do
  timeout 150 /tmp/ferrotune train --config configs/grpo-tiny.toml --overwrite \
    --set model.device=$dev --set run.max_steps=2 --set run.log_every=1 --set run.save_every=0 \
    --set grpo.beta=0.04 --set run.output_dir=/tmp/grpo-$dev > /tmp/grpo-$dev.log 2>&1
  echo "$dev exit $?" >> "$G"
  tail -n 3 /tmp/grpo-$dev.log >> "$G"
  if [ -f /tmp/grpo-$dev/metrics.jsonl ]; then
    sed -e "s/^/$dev: /" /tmp/grpo-$dev/metrics.jsonl | grep '"loss"' >> "$G"
  fi
done
python3 - "$G" <<'EOF' >> "$G" 2>&1
import json, sys
rows = {"cpu": [], "cuda": []}
for line in open(sys.argv[1]):
    for dev in rows:
        if line.startswith(dev + ": "):
            rows[dev].append(json.loads(line[len(dev) + 2:]))
for c, g in zip(rows["cpu"], rows["cuda"]):
    for k in ("loss", "reward", "kl", "grad_norm"):
        if k in c and k in g:
            a, b = c[k], g[k]
            print(f"step {c.get('step')} {k}: cpu {a:.8g} cuda {b:.8g} rel diff {abs(a-b)/max(abs(a),1e-12):.2e}")
EOF
tail -n 12 "$G"

echo "== benchmark ($SECONDS s)"
BUDGET_S=${BUDGET_S:-330} OUT=/tmp/bench-out FERROTUNE_BIN=/tmp/ferrotune bash bench/gpu/run.sh "$@"
cp /tmp/bench-out/table.txt /tmp/bench-out/results.jsonl "$OUT/" 2>/dev/null
cat /tmp/bench-out/env.txt >> "$OUT/env.txt" 2>/dev/null
for f in /tmp/bench-out/*.log; do echo "=== $f"; tail -n 40 "$f"; done > "$OUT/bench_logs.txt" 2>&1
echo "== done ($SECONDS s)"
