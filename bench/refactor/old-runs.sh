#!/usr/bin/env bash
# Do run folders written by an older build still resume, and exactly as that build would resume
# them? For each tiny example config (GRPO, PPO, SFT, DPO, distillation, reward model): OLD_BIN
# trains two copies to half the steps; OLD_BIN resumes one and NEW_BIN the other to the end; each
# line prints both metrics.jsonl hashes (timing fields left out) and both final checkpoints'
# hashes, which must be equal pairwise.
#   bash bench/refactor/old-runs.sh OLD_BIN NEW_BIN OUT
set -u
OLD=$(realpath "$1"); NEW=$(realpath "$2"); OUT=$(realpath -m "$3")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$OUT"; mkdir -p "$OUT"
hash_metrics() {
  python3 -c 'import sys,json
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(json.dumps({k: v for k, v in r.items() if not any(x in k for x in ("per_s", "seconds", "eps", "time"))}, sort_keys=True))' "$1" | sha256sum | cut -c1-12
}
hash_weights() { find "$1/checkpoints" -name '*.safetensors' | sort | tail -3 | xargs cat | sha256sum | cut -c1-12; }
# PPO's reward model (configs/ppo-tiny.toml reads runs/rm-sevens-tiny): trained here first.
sed -e "s#\"\.\./#\"$ROOT/#" -e "s#^output_dir = .*#output_dir = \"$OUT/rm-sevens-tiny\"#" \
  "$ROOT/configs/rm-sevens-tiny.toml" > "$OUT/rm-sevens-tiny.toml"
"$OLD" train --config "$OUT/rm-sevens-tiny.toml" > "$OUT/rm-sevens-tiny.log" 2>&1 || echo "rm-sevens-tiny FAILED"
for c in grpo-tiny ppo-tiny sft-tiny dpo-tiny distill-tiny rm-tiny; do
  full=$(grep '^max_steps' "$ROOT/configs/$c.toml" | head -1 | sed 's/[^0-9]//g'); half=$((full / 2))
  [ $c = grpo-tiny ] && half=20 # a generation boundary and a save step
  for who in old new; do
    sed -e "s#\"\.\./runs/rm-sevens-tiny\"#\"$OUT/rm-sevens-tiny\"#" -e "s#\"\.\./#\"$ROOT/#" \
      -e "s#^output_dir = .*#output_dir = \"$OUT/$who/$c\"#" "$ROOT/configs/$c.toml" > "$OUT/$c-$who.toml"
    "$OLD" train --config "$OUT/$c-$who.toml" --set run.max_steps=$half > "$OUT/$c-$who-half.log" 2>&1 || echo "$c $who: half run FAILED"
  done
  "$OLD" train --resume "$OUT/old/$c" --set run.max_steps=$full > "$OUT/$c-old-resume.log" 2>&1 || echo "$c: old resume FAILED"
  "$NEW" train --resume "$OUT/new/$c" --set run.max_steps=$full > "$OUT/$c-new-resume.log" 2>&1 || echo "$c: new resume FAILED"
  echo "$c (steps $half + $full): metrics $(hash_metrics "$OUT/old/$c/metrics.jsonl") $(hash_metrics "$OUT/new/$c/metrics.jsonl")," \
    "checkpoints $(hash_weights "$OUT/old/$c") $(hash_weights "$OUT/new/$c")"
done
