"""PyTorch + PEFT side of bench/cpu/sft.sh: the same LoRA SFT as configs/sft-smollm2.toml (same GGUF
dequantized to f32, same rows in the same order, same loss mask on the completion + EOS, same
LoRA / AdamW / clipping / batch / steps), printing per-step loss and the median tokens/s with
ferrotune's definition (B x T padded tokens per optimizer-step second).

    python bench/cpu/torch_sft.py GGUF DATA.jsonl STEPS BATCH
"""
import json
import os
import resource
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    gguf, data, steps, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    torch.manual_seed(0)
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    rows = [json.loads(l) for l in open(data)]
    examples = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"])["input_ids"] + [tok.eos_token_id]
        examples.append((p + c, [0] * len(p) + [1] * len(c)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rates, cursor = [], 0
    for step in range(steps):
        batch = [examples[(cursor + i) % len(examples)] for i in range(bs)]
        cursor += bs
        t = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (t - len(x)) for x, _ in batch])
        att = torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x, _ in batch])
        lm = torch.tensor([m + [0] * (t - len(m)) for _, m in batch])
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").reshape(ids.shape[0], -1)
        mask = lm[:, 1:].float()
        loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        rates.append(ids.numel() / (time.perf_counter() - t0))
        print(json.dumps({"impl": "pytorch", "step": step + 1, "loss": round(loss.item(), 4),
                          "tokens_per_s": round(rates[-1], 1)}), flush=True)
    print(json.dumps({"impl": "pytorch", "summary": True,
                      "median_tokens_per_s": round(statistics.median(rates[1:]), 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
