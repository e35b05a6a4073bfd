"""Shared pieces of the PyTorch contenders in bench/gpu (torch_step.py, hf_step.py, hf_generate.py):
argument parsing for the model shape, the deterministic token ids, the timed LoRA-step loop (warm-up,
synchronize, median) and peak-memory reading. It does not build models (each contender builds its
own) and does not count FLOPs (table.py owns the one FLOPs formula, the same for every contender).
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shape_args(p: argparse.ArgumentParser) -> None:
    """Model-shape flags shared by all contenders. Defaults = Qwen2.5-0.5B widths."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rope-theta", type=float, default=1e6)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)


def step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)


def token_ids(batch: int, seq: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """Deterministic pseudo-random ids (B, T), drawn on the CPU so every device sees the same ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float:
    """GPU: torch.cuda.max_memory_allocated since reset_peak. CPU (plumbing tests only): peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def timed_steps(step_fn, args) -> list:
    """Runs `warmup` untimed steps, then `steps` timed ones (synchronized each side); returns the
    per-step seconds of the timed ones and prints each loss to stderr so a log shows it trains."""
    secs = []
    for i in range(args.warmup + args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        loss = step_fn()
        sync(args.device)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            secs.append(dt)
        print(f"step {i} loss {loss.item():.4f} {dt * 1e3:.1f} ms{' (warm-up)' if i < args.warmup else ''}",
              file=sys.stderr)
    return secs


def step_record(who: str, args, secs: list, **extra) -> str:
    med = statistics.median(secs)
    rec = {"who": who, "bench": "lora_step", "layers": args.layers, "vocab": args.vocab,
           "batch": args.batch, "seq": args.seq, "hidden": args.hidden, "intermediate": args.intermediate,
           "rank": args.rank, "ms_per_step": round(med * 1e3, 3),
           "tokens_per_s": round(args.batch * args.seq / med, 1), "peak_mem_gb": round(peak_gb(args.device), 3),
           "device": device_name(args.device), "torch": torch.__version__}
    rec.update(extra)
    return json.dumps(rec)


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return "cpu"
