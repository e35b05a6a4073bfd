#!/usr/bin/env bash
# Issue 4's length comparison over several GRPO seeds from one SFT model:
#   TASK=guess LENGTHS=two GRPO_LORA=0 bash bench/grpo-length/seeds.sh OUT_DIR [SEED ...]
# 1. run.sh into OUT_DIR with the same env (the SFT model, then the grpo and dr_grpo runs with
#    config seed $SEED, default 0);
# 2. the same two GRPO configs again for each extra seed (default 1 2 3 4): `--set run.seed=K`,
#    written to OUT_DIR/grpo-sK and OUT_DIR/dr_grpo-sK;
# 3. report.py's per-run number: the mean over steps 41-end of (wrong - right) answer length.
# About 6 minutes per seed pair on 2 cores with GRPO_LORA=0 (short completions), 12 with LoRA.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: seeds.sh OUT_DIR [SEED ...]}
shift
SEEDS=${*:-1 2 3 4}
BIN=${FERROTUNE:-target/release/ferrotune}
bash bench/grpo-length/run.sh "$OUT"
OUT=$(cd "$OUT" && pwd)
runs=("$OUT/grpo" "$OUT/dr_grpo")
for k in $SEEDS; do
  for loss in grpo dr_grpo; do
    "$BIN" train --config "$OUT/$loss.toml" --set "run.seed=$k" --set "run.output_dir=$loss-s$k" \
      --overwrite
    runs+=("$OUT/$loss-s$k")
  done
done
python3 bench/grpo-length/report.py "${runs[@]}" | grep -E "^run|41-end" | tee "$OUT/seeds.txt"
