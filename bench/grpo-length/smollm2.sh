#!/usr/bin/env bash
# Issue 4's length comparison on a model that reasons: SmolLM2-135M-Instruct (GGUF) writes free
# reasoning before its answer on 1-2 digit arithmetic; two GRPO runs identical except
# `loss_type` (grpo, dr_grpo); report.py prints the length of right and wrong answers.
#
#   GGUF=$(bash scripts/fetch-smollm2.sh)
#   MODEL=$GGUF bash bench/grpo-length/smollm2.sh [OUT_DIR]
#     env: STEPS (200), DEVICE (cpu; cuda on a GPU machine), SEED (0), FERROTUNE (binary)
# Measured on 2 CPU cores (2026-11-27): one step (64 completions of up to 128 tokens, on 2-3
# digit problems in that trial, then the LoRA step) took 131 s with peak RSS 2.7 GB, so a few
# hundred steps per loss is a GPU job (DEVICE=cuda). Before training, with this prompt, 32 other
# problems x 4 samples at T 1.0 scored 0.047 (pass@4 0.16, 26% truncated at 128 tokens): most
# groups start with no reward variance.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MODEL:?set MODEL to SmolLM2-135M-Instruct (.gguf file or Hugging Face folder)}"
OUT=${1:-runs/grpo-length-smollm2}
BIN=${FERROTUNE:-target/release/ferrotune}
STEPS=${STEPS:-200}
SEED=${SEED:-0}
DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SYS="Think step by step, then give the final number inside <answer></answer> tags, for example <answer>12</answer>."
"$BIN" data gen arithmetic --n 4000 --seed $((SEED + 21)) --digits 1..2 --ops '+-' --chat \
  --system "$SYS" --out "$OUT/grpo.jsonl"
for loss in grpo dr_grpo; do
  cat > "$OUT/$loss.toml" <<T
[model]
path = "$MODEL"
device = "$DEVICE"
[lora]
r = 16
lora_alpha = 32
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[data]
train = "grpo.jsonl"
[optim]
learning_rate = 1e-4
lr_scheduler_type = "constant"
[run]
output_dir = "$loss"
seed = $SEED
max_steps = $STEPS
batch_size = 8
gradient_accumulation_steps = 8
log_every = 1
save_every = $STEPS
[grpo]
num_generations = 8
max_prompt_len = 128
max_completion_len = 128
temperature = 1.0
beta = 0.0
loss_type = "$loss"
stop = ["</answer>"]
rewards = [
  { name = "format_tags", weight = 0.25, tags = ["answer"] },
  { name = "answer_match", weight = 1.0, extract = "last_number" },
]
T
  "$BIN" train --config "$OUT/$loss.toml" --overwrite
done
python3 bench/grpo-length/report.py "$OUT/grpo" "$OUT/dr_grpo" | tee "$OUT/report.txt"
