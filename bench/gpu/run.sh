#!/usr/bin/env bash
# GPU benchmark: ferrotune vs hand-written PyTorch vs transformers(+peft), measured in the same run on
# the same card, each contender in its own process under its own `timeout` (a hang costs one cell, not
# the run). Cases, most important first:
#   step4     LoRA step, Qwen2-shaped stack, 4 layers, vocab 8192, B=8 T=512
#   step24    LoRA step, same, 24 layers
#   roll64    rollouts, Qwen2.5-0.5B shape (24 layers, vocab 151936), prompt 128 + 256 sampled, batch 64
#   step24v   LoRA step, real Qwen2.5-0.5B shape (24 layers, vocab 151936)
#   roll256   rollouts, batch 256
# Writes $OUT/results.jsonl (one line per contender per case, with the case shape), $OUT/<case>.log
# (stdout+stderr), $OUT/env.txt (card, versions) and $OUT/table.txt: 8 files at most, the device
# tool's limit on what comes back; prints the table. MFU uses the one formula in table.py:
#   LoRA-step FLOPs/token = 4*N_matmul + 6*N_lora + 6*T*d*L  (fwd 2N + bwd input-grads 2N; LoRA 6N;
#   attention 4*T*d*L fwd, x(1+2) fwd+bwd, /2 causal); peak 989 TFLOP/s unless PEAK_TFLOPS is set.
#
#   bash bench/gpu/run.sh [--quick] [--skip-python] [--skip-ferrotune]
# Env: OUT (./bench-out), PYTHON (python3, else /opt/torch/.venv/bin/python), FERROTUNE_BIN
#   (.carry/ferrotune, else .carry/ferrotune.gz unpacked to /tmp), QUICK=1, SKIP_PYTHON=1,
#   BUDGET_S (420: no process starts past it, each timeout is cut to what is left),
#   TIMEOUT_STEP_S (150), TIMEOUT_ROLLOUT_S (180), PEAK_TFLOPS (989).
# CPU plumbing test only (not a benchmark): BENCH_DEVICE=cpu BENCH_TINY=1 (tiny shapes; the Python
#   contenders also shrink hidden/intermediate/heads), BENCH_DTYPE (bf16).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
HERE=bench/gpu

QUICK=${QUICK:-0}
SKIP_PYTHON=${SKIP_PYTHON:-0}
SKIP_FERROTUNE=${SKIP_FERROTUNE:-0}
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --skip-python) SKIP_PYTHON=1 ;;
    --skip-ferrotune) SKIP_FERROTUNE=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-./bench-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
: > "$OUT/results.jsonl"
CUR_SHAPE="{}"  # JSON shape of the case being run; every record of the case carries it
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-420}
TIMEOUT_STEP_S=${TIMEOUT_STEP_S:-150}
TIMEOUT_ROLLOUT_S=${TIMEOUT_ROLLOUT_S:-180}
DEV=${BENCH_DEVICE:-cuda}
DTYPE=${BENCH_DTYPE:-bf16}
SECONDS=0

# --- Python with torch: $PYTHON / python3, else the machine's venv. ---
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  if [ -x /opt/torch/.venv/bin/python ] && /opt/torch/.venv/bin/python -c 'import torch' >/dev/null 2>&1; then
    PY=/opt/torch/.venv/bin/python
  else
    echo "warning: no python with torch ($PY, /opt/torch/.venv/bin/python); Python contenders will fail" >&2
    PY=""
  fi
fi
TPY=${PY:-python3}  # table.py needs only the standard library

# --- ferrotune binary: $FERROTUNE_BIN, else .carry/ferrotune, else .carry/ferrotune.gz unpacked. ---
BIN=${FERROTUNE_BIN:-.carry/ferrotune}
if [ ! -f "$BIN" ] && [ -z "${FERROTUNE_BIN:-}" ] && [ -f .carry/ferrotune.gz ]; then
  gunzip -c .carry/ferrotune.gz > /tmp/ferrotune-bench && BIN=/tmp/ferrotune-bench
elif [[ "$BIN" == *.gz ]] && [ -f "$BIN" ]; then
  gunzip -c "$BIN" > /tmp/ferrotune-bench && BIN=/tmp/ferrotune-bench
fi
if [ -f "$BIN" ] && [ ! -x "$BIN" ]; then
  chmod +x "$BIN" 2>/dev/null || { cp "$BIN" /tmp/ferrotune-bench && chmod +x /tmp/ferrotune-bench && BIN=/tmp/ferrotune-bench; }
fi

# --- card ---
if command -v nvidia-smi >/dev/null 2>&1; then
  GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tail -n +2 | head -n 1)
else
  GPU="no nvidia-smi (device $DEV)"
fi
{
  echo "date: $(date -u +%FT%TZ)  gpu: $GPU  device: $DEV  dtype: $DTYPE"
  echo "python: ${PY:-none}  ferrotune: $BIN $( [ -f "$BIN" ] && sha256sum "$BIN" | cut -c1-16 )"
  [ -n "$PY" ] && "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 | tail -n 1
} | tee "$OUT/env.txt"

# --- shapes (the real ones unless BENCH_TINY=1) ---
if [ "${BENCH_TINY:-0}" = 1 ]; then
  L_SMALL=1 L_BIG=2 V_SMALL=512 V_BIG=1024 B=2 T=32 STEPS=2 WARM=1
  RB_SMALL=2 RB_BIG=4 PROMPT=8 NEW=8
  HID=128 INTER=256 HEADS=2 KVH=1
else
  L_SMALL=4 L_BIG=24 V_SMALL=8192 V_BIG=151936 B=8 T=512 STEPS=10 WARM=3
  RB_SMALL=64 RB_BIG=256 PROMPT=128 NEW=256
  HID=896 INTER=4864 HEADS=14 KVH=2
fi
PYSHAPE=(--hidden "$HID" --intermediate "$INTER" --heads "$HEADS" --kv-heads "$KVH" --device "$DEV" --dtype "$DTYPE")

# run_one CASE CONTENDER CAP_S CMD...: runs CMD under timeout, logs it, appends one record.
run_one() {
  local case=$1 who=$2 cap=$3; shift 3
  local left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc tmp
  if (( left < 20 )); then
    "$TPY" $HERE/table.py record --case "$case" --contender "$who" --status skipped --shape "$CUR_SHAPE" \
      --reason="time budget BUDGET_S=$BUDGET_S spent" >> "$OUT/results.jsonl"
    return
  fi
  (( cap > left )) && cap=$left
  echo "=== $who: $* (timeout ${cap}s) ===" >> "$OUT/$case.log"
  tmp=$(mktemp)
  timeout -k 10 "$cap" "$@" > "$tmp" 2>> "$OUT/$case.log"
  rc=$?
  cat "$tmp" >> "$OUT/$case.log"
  "$TPY" $HERE/table.py record --case "$case" --contender "$who" --rc "$rc" --wall $((SECONDS - t0)) --shape "$CUR_SHAPE" \
    < "$tmp" >> "$OUT/results.jsonl"
  rm -f "$tmp"
  printf '%-8s %-13s rc=%-3s %4ss  %s\n' "$case" "$who" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$OUT/results.jsonl" | cut -c1-150)"
}

skip() {  # skip CASE CONTENDER REASON
  "$TPY" $HERE/table.py record --case "$1" --contender "$2" --status "${4:-skipped}" --reason="$3" --shape "$CUR_SHAPE" >> "$OUT/results.jsonl"
}

ferro() {  # ferro CASE CAP ARGS...
  local case=$1 cap=$2; shift 2
  if [ "$SKIP_FERROTUNE" = 1 ]; then skip "$case" ferrotune "--skip-ferrotune"; return; fi
  if [ ! -x "$BIN" ]; then skip "$case" ferrotune "binary missing: $BIN" failed; return; fi
  run_one "$case" ferrotune "$cap" "$BIN" "$@"
}

py() {  # py CASE CONTENDER CAP SCRIPT ARGS...
  local case=$1 who=$2 cap=$3 script=$4; shift 4
  if [ "$SKIP_PYTHON" = 1 ]; then skip "$case" "$who" "--skip-python"; return; fi
  if [ -z "$PY" ]; then skip "$case" "$who" "no python with torch" failed; return; fi
  run_one "$case" "$who" "$cap" "$PY" "$HERE/$script" "$@"
}

case_json() {  # case_json CASE LABEL KIND LAYERS VOCAB BATCH SEQ
  CUR_SHAPE=$(printf '{"case":"%s","label":"%s","kind":"%s","layers":%s,"vocab":%s,"batch":%s,"seq":%s,"hidden":%s,"intermediate":%s,"heads":%s,"kv_heads":%s,"rank":16}' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$HID" "$INTER" "$HEADS" "$KVH")
}

step_case() {  # step_case CASE LABEL LAYERS VOCAB
  local case=$1 label=$2 l=$3 v=$4
  case_json "$case" "$label" lora_step "$l" "$v" "$B" "$T"
  : > "$OUT/$case.log"
  ferro "$case" "$TIMEOUT_STEP_S" bench lora-step --layers "$l" --vocab "$v" --batch "$B" --seq "$T" \
    --steps "$STEPS" --device "$DEV" --dtype "$DTYPE"
  local pyargs=(--layers "$l" --vocab "$v" --batch "$B" --seq "$T" --steps "$STEPS" --warmup "$WARM" "${PYSHAPE[@]}")
  py "$case" pytorch "$TIMEOUT_STEP_S" torch_step.py "${pyargs[@]}"
  py "$case" transformers "$TIMEOUT_STEP_S" hf_step.py "${pyargs[@]}"
}

roll_case() {  # roll_case CASE LABEL BATCH
  local case=$1 label=$2 b=$3
  case_json "$case" "$label" rollout "$L_BIG" "$V_BIG" "$b" "$((PROMPT + NEW))"
  : > "$OUT/$case.log"
  ferro "$case" "$TIMEOUT_ROLLOUT_S" bench rollout --layers "$L_BIG" --vocab "$V_BIG" --batch "$b" \
    --prompt-len "$PROMPT" --new-tokens "$NEW" --device "$DEV" --dtype "$DTYPE"
  py "$case" transformers "$TIMEOUT_ROLLOUT_S" hf_generate.py --layers "$L_BIG" --vocab "$V_BIG" --batch "$b" \
    --prompt-len "$PROMPT" --new-tokens "$NEW" "${PYSHAPE[@]}"
}

step_case step4 "step L=$L_SMALL V=$V_SMALL (ms/step)" "$L_SMALL" "$V_SMALL"
[ "$QUICK" = 1 ] || step_case step24 "step L=$L_BIG V=$V_SMALL (ms/step)" "$L_BIG" "$V_SMALL"
roll_case roll64 "rollout B=$RB_SMALL +$NEW (tok/s)" "$RB_SMALL"
if [ "$QUICK" != 1 ]; then
  step_case step24v "step 0.5B L=$L_BIG V=$V_BIG (ms/step)" "$L_BIG" "$V_BIG"
  roll_case roll256 "rollout B=$RB_BIG +$NEW (tok/s)" "$RB_BIG"
fi

echo
"$TPY" $HERE/table.py table --results "$OUT/results.jsonl" --gpu "$GPU" \
  | tee "$OUT/table.txt"
echo "total ${SECONDS}s; logs in $OUT"
