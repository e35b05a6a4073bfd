"""PyTorch side of bench/cpu/run.sh: the same phases as crates/ferrotune/benches/core.rs, on the same
GGUF (transformers dequantizes it to float32), same batch, same ids, same thread count.

    python bench/cpu/torch_core.py PHASE     (PHASE = forward | step | generate)
Env: BENCH_GGUF (default FERROTUNE_SMOLLM2_GGUF), BENCH_B, BENCH_T, BENCH_ITERS, BENCH_NEW, BENCH_THREADS.
"""
import json
import os
import resource
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModelForCausalLM  # noqa: E402


def ids(b, t):
    return torch.tensor([[100 + (i * 7919 + j * 104729) % 19900 for j in range(t)] for i in range(b)])


def main():
    phase = sys.argv[1] if len(sys.argv) > 1 else "forward"
    path = os.environ.get("BENCH_GGUF") or os.environ["FERROTUNE_SMOLLM2_GGUF"]
    b, t = int(os.environ.get("BENCH_B", 4)), int(os.environ.get("BENCH_T", 128))
    iters = int(os.environ.get("BENCH_ITERS", 5))
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    model.eval()
    x = ids(b, t)
    mask = torch.ones_like(x)
    secs = []
    if phase == "forward":
        with torch.no_grad():
            for _ in range(iters + 1):
                t0 = time.perf_counter()
                logits = model(input_ids=x, attention_mask=mask).logits
                float(logits.sum())
                secs.append(time.perf_counter() - t0)
        tokens = b * t
    elif phase == "step":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(iters + 1):
            t0 = time.perf_counter()
            logits = model(input_ids=x, attention_mask=mask).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p -= 1e-4 * p.grad
                    p.grad = None
            secs.append(time.perf_counter() - t0)
        tokens = b * t
    elif phase == "generate":
        new = int(os.environ.get("BENCH_NEW", 64))
        p = ids(b, 32)
        with torch.no_grad():
            for _ in range(min(iters, 3) + 1):
                t0 = time.perf_counter()
                out = model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=0)
                assert out.shape[1] == 32 + new
                secs.append(time.perf_counter() - t0)
        tokens = b * new
    else:
        sys.exit(f"unknown phase {phase}")
    med = statistics.median(secs[1:])
    print(json.dumps({"impl": "pytorch", "model": os.path.basename(path), "phase": phase, "B": b, "T": t, "median_s": round(med, 4),
                      "tokens_per_s": round(tokens / med, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
