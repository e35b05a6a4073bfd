"""transformers rollout contender of bench/gpu/run.sh: model.generate on a random-init Qwen2.5-0.5B-shaped
Qwen2ForCausalLM (bf16, sdpa, default dynamic KV cache), prompt 128 tokens + 256 sampled new tokens
(temperature 1.0, top_p 1.0, top_k off, no eos: every row generates exactly 256). One small warm-up
generate call first; then one timed call. tokens/s = batch * new_tokens / wall time of generate.

    python bench/gpu/hf_generate.py --batch 64 --device cuda

Prints ONE JSON line on stdout: {"who":"transformers","bench":"rollout","batch":..,"tokens_per_s":..}.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from common import DTYPES, device_name, peak_gb, reset_peak, shape_args, sync, token_ids  # noqa: E402
from hf_step import build_qwen2  # noqa: E402


def generate(model, ids, new_tokens):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                          temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, use_cache=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape_args(p)
    p.set_defaults(layers=24, vocab=151936)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model = build_qwen2(a, DTYPES[a.dtype], a.prompt_len + a.new_tokens)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        warm = token_ids(min(a.batch, 4), min(a.prompt_len, 16), a.vocab, a.device, a.seed + 1)
        generate(model, warm, min(a.new_tokens, 8))
        ids = token_ids(a.batch, a.prompt_len, a.vocab, a.device, a.seed)
        reset_peak(a.device)
        sync(a.device)
        t0 = time.perf_counter()
        out = generate(model, ids, a.new_tokens)
        sync(a.device)
        secs = time.perf_counter() - t0
    got = out.shape[1] - a.prompt_len  # (B, prompt + new)
    if got != a.new_tokens:
        sys.exit(f"generate made {got} new tokens, wanted {a.new_tokens}")
    print(f"generate: {secs:.2f} s for {a.batch}x{a.new_tokens} new tokens", file=sys.stderr)
    print(json.dumps({"who": "transformers", "bench": "rollout", "layers": a.layers, "vocab": a.vocab,
                      "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                      "seconds": round(secs, 3), "tokens_per_s": round(a.batch * a.new_tokens / secs, 1),
                      "peak_mem_gb": round(peak_gb(a.device), 3), "device": device_name(a.device),
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
