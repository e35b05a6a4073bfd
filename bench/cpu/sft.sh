#!/usr/bin/env bash
# LoRA SFT of SmolLM2-135M (GGUF) on CPU: ferrotune vs PyTorch + PEFT, same config, same rows,
# same threads, measured in the same run. Prints loss before/after, median step tokens/s and
# peak RSS for each, and the ratio.
#
#   PYTHON=/path/to/python-with-torch-transformers-peft bash bench/cpu/sft.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
GGUF=${FERROTUNE_SMOLLM2_GGUF:-$(bash scripts/fetch-smollm2.sh)}
export BENCH_THREADS=${BENCH_THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$BENCH_THREADS OMP_NUM_THREADS=$BENCH_THREADS
STEPS=${STEPS:-12}
cargo build --release -q
run=$(mktemp -d)/sft
/usr/bin/time -f '%M' -o "$run.rss" ./target/release/ferrotune train --config configs/sft-smollm2.toml \
  --set "model.path=$GGUF" --set "run.output_dir=$run" --set "run.max_steps=$STEPS" >/dev/null 2>&1
"$PYTHON" bench/cpu/torch_sft.py "$GGUF" bench/data/sft_arith.jsonl "$STEPS" 8 > "$run.torch.jsonl" 2>"$run.torch.log"
python3 - "$run" <<'PY'
import json, statistics, sys
run = sys.argv[1]
f = [json.loads(l) for l in open(run + "/metrics.jsonl") if '"loss"' in l]
t = [json.loads(l) for l in open(run + ".torch.jsonl")]
ts = [r for r in t if "step" in r]
summ = [r for r in t if r.get("summary")][0]
f_rate = statistics.median([r["tokens_per_s"] for r in f[1:]])
f_rss = int(open(run + ".rss").read().split()[-1]) / 1024
print(f"{'':<10} {'loss step 1':>12} {'loss last':>10} {'tok/s (median)':>15} {'peak RSS MB':>12}")
print(f"{'ferrotune':<10} {f[0]['loss']:>12.4f} {f[-1]['loss']:>10.4f} {f_rate:>15.1f} {f_rss:>12.0f}")
print(f"{'pytorch':<10} {ts[0]['loss']:>12.4f} {ts[-1]['loss']:>10.4f} {summ['median_tokens_per_s']:>15.1f} {summ['peak_rss_mb']:>12.0f}")
print(f"speed ratio ferrotune/pytorch: {f_rate / summ['median_tokens_per_s']:.2f}x; memory ratio: {f_rss / summ['peak_rss_mb']:.2f}x")
PY
