#!/usr/bin/env bash
# Behaviour fingerprint of a ferrotune build: runs every tiny example config (SFT, GRPO, PPO after
# its reward model, DPO, reward models, distillation), a resumed GRPO and PPO run, and
# `demo --quick`, then prints one hash per run of what it logged and saved with the wall-clock
# fields left out. Two builds behave the same to the digit when their outputs are identical:
#   bash bench/refactor/golden.sh BIN_A OUT_A > a.txt; bash bench/refactor/golden.sh BIN_B OUT_B > b.txt
#   diff a.txt b.txt
# Used for issue 17 (the trainer-core restructure): before and after must print the same lines.
set -euo pipefail
BIN=$(realpath "$1"); OUT=$(realpath -m "$2")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$OUT"; mkdir -p "$OUT/configs"
# Each config's output_dir is moved under OUT (paths in configs are relative to the config file).
for c in sft-tiny grpo-tiny rm-sevens-tiny ppo-tiny dpo-tiny rm-tiny distill-tiny; do
  sed -e "s#\"\.\./runs/#\"$OUT/runs/#" -e "s#\"\.\./#\"$ROOT/#" "$ROOT/configs/$c.toml" > "$OUT/configs/$c.toml"
done
# Timing fields vary run to run; everything else must not.
strip() {
  python3 - "$1" <<'PY'
import json, sys
drop = ("tokens_per_s", "step_seconds", "train_seconds", "pairs_per_s", "eps", "seconds", "elapsed", "time")
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except Exception:
        print(line.rstrip()); continue
    if isinstance(r, dict):
        r = {k: v for k, v in r.items() if not any(k.startswith(d) or k.endswith(d) for d in drop)}
    print(json.dumps(r, sort_keys=True))
PY
}
fingerprint() { # name dir
  local name=$1 dir=$2
  {
    for f in metrics.jsonl completions.jsonl health.jsonl; do
      [ -f "$dir/$f" ] && { echo "== $f"; strip "$dir/$f"; }
    done
    find "$dir" -name '*.safetensors' -not -path '*/plots/*' | sort | while read -r s; do
      echo "== ${s#$dir/} $(sha256sum < "$s" | cut -c1-16)"
    done
    find "$dir" -name 'trainer_state.json' | sort | while read -r s; do
      echo "== ${s#$dir/}"; python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), sort_keys=True))' "$s"
    done
  } > "$OUT/$name.fp"
  echo "$name $(sha256sum < "$OUT/$name.fp" | cut -c1-16)"
}
for c in sft-tiny grpo-tiny rm-sevens-tiny ppo-tiny dpo-tiny rm-tiny distill-tiny; do
  "$BIN" train --config "$OUT/configs/$c.toml" > "$OUT/$c.log" 2>&1 || { echo "$c FAILED"; tail -5 "$OUT/$c.log"; }
  fingerprint "$c" "$OUT/runs/$c"
done
# Resume: GRPO and PPO stopped at step 20 (checkpoint at 20), then resumed to 40.
for c in grpo-tiny ppo-tiny; do
  sed -e "s#runs/$c\"#runs/$c-resumed\"#" "$OUT/configs/$c.toml" > "$OUT/configs/$c-resumed.toml"
  "$BIN" train --config "$OUT/configs/$c-resumed.toml" --set run.max_steps=20 > "$OUT/$c-half.log" 2>&1 || echo "$c-half FAILED"
  "$BIN" train --resume "$OUT/runs/$c-resumed" --set run.max_steps=40 > "$OUT/$c-resumed.log" 2>&1 || { echo "$c-resumed FAILED"; tail -5 "$OUT/$c-resumed.log"; }
  fingerprint "$c-resumed" "$OUT/runs/$c-resumed"
done
# Each run's one-line result (`done: ...`), the run folder written as OUT.
cat "$OUT"/*.log | grep '^done:' | sed "s#$OUT#OUT#g" | sha256sum | cut -c1-16 | sed 's/^/done-lines /'
"$BIN" demo --quick --seed 0 --out "$OUT/demo" > "$OUT/demo.log" 2>&1 || echo "demo FAILED"
# The demo's before/after table (its last lines), timing lines left out.
grep -E '^(stage|base|sft |grpo step)' "$OUT/demo.log" | sha256sum | cut -c1-16 | sed 's/^/demo-table /'
grep -E '^(stage|base|sft |grpo step)' "$OUT/demo.log" | tail -5
