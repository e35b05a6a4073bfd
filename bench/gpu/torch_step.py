"""Hand-written PyTorch contender of bench/gpu/run.sh: a Qwen2-shaped decoder written the way a
PyTorch user would (eager, F.scaled_dot_product_attention(is_causal=True), own LoRA layers), timed
for one LoRA training step (forward + backward + AdamW on the LoRA parameters only).
It does not count FLOPs (table.py does, one formula for all contenders) and uses no transformers/peft.

    python bench/gpu/torch_step.py --layers 4 --vocab 8192 --batch 8 --seq 512 --steps 10 --device cuda

Prints ONE JSON line on stdout: {"who":"pytorch","bench":"lora_step",...,"ms_per_step",...}.
Shape: hidden 896, 14 q heads / 2 kv heads (head_dim 64), MLP 4864, RMSNorm eps 1e-6, RoPE theta 1e6,
q/k/v with bias, tied embeddings; LoRA r=16 alpha=32 on q,k,v,o,gate,up,down; base frozen.
"""
import argparse
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import DTYPES, shape_args, step_args, step_record, timed_steps, token_ids, reset_peak

HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha/r) * (x A^T) B^T, W/b frozen, A/B trained (B starts at zero as in PEFT)."""

    def __init__(self, d_in, d_out, bias, r, alpha):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=bias)
        self.base.weight.requires_grad_(False)
        if bias:
            self.base.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(r, d_in))
        self.lora_b = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def rms_norm(x, w, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        d, hd = a.hidden, a.hidden // a.heads
        self.h, self.kv, self.hd, self.eps = a.heads, a.kv_heads, hd, a.eps
        self.ln1 = nn.Parameter(torch.ones(d))
        self.ln2 = nn.Parameter(torch.ones(d))
        self.ln1.requires_grad_(False)
        self.ln2.requires_grad_(False)
        lin = lambda i, o, bias: LoRALinear(i, o, bias, a.rank, a.alpha)  # noqa: E731
        self.q = lin(d, a.heads * hd, True)
        self.k = lin(d, a.kv_heads * hd, True)
        self.v = lin(d, a.kv_heads * hd, True)
        self.o = lin(a.heads * hd, d, False)
        self.gate = lin(d, a.intermediate, False)
        self.up = lin(d, a.intermediate, False)
        self.down = lin(a.intermediate, d, False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = rms_norm(x, self.ln1, self.eps)
        q = self.q(h).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(h).view(b, t, self.kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v(h).view(b, t, self.kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if HAS_GQA:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, hd)
        else:
            rep = self.h // self.kv
            k = k.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, self.h * self.hd))  # (B, T, D)
        h = rms_norm(x, self.ln2, self.eps)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.hidden)
        self.embed.weight.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = nn.Parameter(torch.ones(a.hidden), requires_grad=False)
        self.eps, self.theta, self.hd = a.eps, a.rope_theta, a.hidden // a.heads

    def rope(self, t, device, dtype):
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, device=device, dtype=torch.float32) / self.hd))
        f = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv)  # (T, hd/2)
        e = torch.cat((f, f), dim=-1)  # (T, hd)
        return e.cos().to(dtype), e.sin().to(dtype)

    def forward(self, ids):
        x = self.embed(ids)  # (B, T, D)
        cos, sin = self.rope(ids.shape[1], ids.device, x.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = rms_norm(x, self.norm, self.eps)
        return F.linear(x, self.embed.weight)  # tied head: (B, T, V)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape_args(p)
    step_args(p)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    dtype = DTYPES[a.dtype]
    with torch.device(a.device):
        model = Model(a)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    nn.init.normal_(model.embed.weight, std=0.02)
    model.to(dtype)
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    n_lora = sum(p_.numel() for p_ in params)
    print(f"pytorch model: {sum(p_.numel() for p_ in model.parameters()) / 1e6:.1f}M params, "
          f"{n_lora / 1e6:.2f}M LoRA, gqa_in_sdpa={HAS_GQA}", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=a.lr)
    ids = token_ids(a.batch, a.seq, a.vocab, a.device, a.seed)
    reset_peak(a.device)

    def step():
        logits = model(ids)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    secs = timed_steps(step, a)
    print(step_record("pytorch", a, secs, lora_params=n_lora), flush=True)


if __name__ == "__main__":
    main()
