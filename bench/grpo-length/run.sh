#!/usr/bin/env bash
# Issue 4's length experiment: `loss_type = "grpo"` vs `"dr_grpo"` on a task whose completion
# length is free, from the embedded demo model (no download).
#   1. SFT (LoRA) on arithmetic whose answers carry 0-6 filler sentences (make_sft.py), after
#      the answer (FILLER_AT=after, the default) or before it (FILLER_AT=before): the model
#      learns a spread of lengths. TASK=guess (make_guess.py) instead asks for a number from 1 to
#      9 and rewards 7: the model can see whether its own answer is right. LENGTHS=two (guess
#      only) makes the length one choice after the answer: no filler or 8 sentences.
#   2. Two GRPO runs from the merged SFT model, identical except `loss_type` (beta 0, no stop
#      string: a completion ends at EOS). GRPO_LORA=0: full fine-tuning instead of LoRA (lr
#      1e-4 instead of 2e-4), so every token's embedding can move on its own.
#   3. report.py: mean length of right and wrong answers per window of steps.
# The literature (Liu et al. 2025, "Understanding R1-Zero-like Training") predicts that grpo's
# per-sequence 1/|o| weighting lets wrong answers grow longer, and that dr_grpo does not.
#
#   bash bench/grpo-length/run.sh [OUT_DIR]     (release build; env FERROTUNE = binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/grpo-length}
BIN=${FERROTUNE:-target/release/ferrotune}
STEPS=${STEPS:-120}
SEED=${SEED:-0}
FILLER_AT=${FILLER_AT:-after}
TASK=${TASK:-arithmetic}
LENGTHS=${LENGTHS:-uniform}
GRPO_LORA=${GRPO_LORA:-1}
[ -x "$BIN" ] || cargo build --release
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MODEL=$(pwd)/models/demo
SYS="Answer with the number inside <answer></answer> tags."
if [ "$TASK" = guess ]; then
  python3 bench/grpo-length/make_guess.py "$OUT/sft.jsonl" "$OUT/grpo.jsonl" "$SEED" "$LENGTHS"
  REWARDS='{ name = "answer_match", weight = 1.0, extract = "answer_tag" },'
  if [ "$LENGTHS" = two ]; then
    REWARDS='{ name = "answer_match", weight = 1.0, extract = "regex", pattern = "^The answer is (\\d)" },'
  fi
elif [ "$TASK" = arithmetic ]; then
  gen() { "$BIN" data gen arithmetic --digits 1..2 --ops +- --chat --system "$SYS" \
            --exclude "$MODEL/eval/arithmetic.jsonl" "$@"; }
  gen --n 2000 --seed $((SEED + 11)) --out "$OUT/sft-problems.jsonl"
  gen --n 3000 --seed $((SEED + 12)) --exclude "$OUT/sft-problems.jsonl" --out "$OUT/grpo.jsonl"
  python3 bench/grpo-length/make_sft.py "$OUT/sft-problems.jsonl" "$OUT/sft.jsonl" "$SEED" "$FILLER_AT"
  REWARDS='{ name = "format_tags", weight = 0.25, tags = ["answer"] },
  { name = "answer_match", weight = 1.0, extract = "answer_tag" },'
else
  echo "TASK must be arithmetic or guess, not $TASK" >&2
  exit 2
fi

cat > "$OUT/sft.toml" <<T
[model]
path = "$MODEL"
[lora]
r = 16
lora_alpha = 32
[data]
train = "sft.jsonl"
max_seq_len = 128
[optim]
learning_rate = 3e-3
lr_scheduler_type = "cosine"
warmup_steps = 5
[run]
output_dir = "sft"
seed = $SEED
max_steps = 200
batch_size = 16
log_every = 20
save_every = 200
[sft]
T
"$BIN" train --config "$OUT/sft.toml" --overwrite
rm -rf "$OUT/sft-merged"
"$BIN" export --model "$MODEL" --adapter "$OUT/sft/checkpoints/step-200" --out "$OUT/sft-merged"

if [ "$GRPO_LORA" = 0 ]; then
  ADAPTER='' LR=1e-4
else
  ADAPTER=$'[lora]\nr = 16\nlora_alpha = 32' LR=2e-4
fi
for loss in grpo dr_grpo; do
  cat > "$OUT/$loss.toml" <<T
[model]
path = "$OUT/sft-merged"
$ADAPTER
[data]
train = "grpo.jsonl"
[optim]
learning_rate = $LR
lr_scheduler_type = "constant"
[run]
output_dir = "$loss"
seed = $SEED
max_steps = $STEPS
batch_size = 32
gradient_accumulation_steps = 2
log_every = 1
save_every = $STEPS
[grpo]
num_generations = 8
max_prompt_len = 96
max_completion_len = 80
temperature = 1.0
beta = 0.0
loss_type = "$loss"
rewards = [
  $REWARDS
]
T
  "$BIN" train --config "$OUT/$loss.toml" --overwrite
done
python3 bench/grpo-length/report.py "$OUT/grpo" "$OUT/dr_grpo" | tee "$OUT/report.txt"
