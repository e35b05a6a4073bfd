#!/usr/bin/env bash
# CPU benchmark of the model core: ferrotune vs PyTorch (transformers + peft) on real GGUF models
# (SmolLM2-135M-Instruct and Gemma 3 270M, dequantized to f32), same batch, same ids, same threads,
# each phase in its own process. Prints one JSON line per run and a table of ratios
# (ferrotune / PyTorch; >1 = ferrotune faster) with each side's peak RSS.
#
#   PYTHON=/path/to/python-with-torch bash bench/cpu/run.sh
# Env: BENCH_MODELS ("smollm2 gemma3"), BENCH_B (4), BENCH_T (128), BENCH_ITERS (5), BENCH_NEW (64),
# BENCH_THREADS (nproc), BENCH_PHASES ("forward step generate"), BENCH_ROUNDS (2): each phase runs
# ferrotune then PyTorch this many times, alternating, and the table keeps each side's best round
# (on a shared VM one process can run ~8% slower than the next).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
export BENCH_THREADS=${BENCH_THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$BENCH_THREADS OMP_NUM_THREADS=$BENCH_THREADS
cargo bench --bench core --no-run -q 2>/dev/null || cargo bench --bench core --no-run
out=$(mktemp)
for model in ${BENCH_MODELS:-smollm2 gemma3}; do
  case $model in
    smollm2) gguf=${FERROTUNE_SMOLLM2_GGUF:-$(bash scripts/fetch-smollm2.sh)} ;;
    gemma3) gguf=${FERROTUNE_GEMMA3_GGUF:-$(bash scripts/fetch-gemma3.sh)} ;;
    *) echo "unknown model \`$model\` in BENCH_MODELS (smollm2 | gemma3)" >&2; exit 2 ;;
  esac
  export BENCH_GGUF=$gguf
  for phase in ${BENCH_PHASES:-forward step generate}; do
    for _ in $(seq "${BENCH_ROUNDS:-2}"); do
      cargo bench -q --bench core -- "$phase" 2>>"$out.stderr" | grep '^{' | tee -a "$out"
      "$PYTHON" bench/cpu/torch_core.py "$phase" 2>>"$out.stderr" | grep '^{' | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by, models = {}, []
for r in rows:  # best round per side
    k = (r["model"], r["impl"], r["phase"])
    if r["model"] not in models:
        models.append(r["model"])
    if k not in by or r["tokens_per_s"] > by[k]["tokens_per_s"]:
        by[k] = r
print(f"\n{'model':<36} {'phase':<9} {'ferrotune tok/s':>16} {'pytorch tok/s':>14} {'speed ratio':>12} {'ferrotune MB':>13} {'pytorch MB':>11}")
for m in models:
    for ph in ["forward", "step", "generate"]:
        f, p = by.get((m, "ferrotune", ph)), by.get((m, "pytorch", ph))
        if f and p:
            print(f"{m:<36} {ph:<9} {f['tokens_per_s']:>16.1f} {p['tokens_per_s']:>14.1f} {f['tokens_per_s']/p['tokens_per_s']:>11.2f}x {f['peak_rss_mb']:>13.0f} {p['peak_rss_mb']:>11.0f}")
PY
