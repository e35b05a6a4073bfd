"""transformers + peft contender of bench/gpu/run.sh: Qwen2ForCausalLM(Qwen2Config(...)) with random
init (no download, attn_implementation="sdpa") wrapped by peft LoRA on all seven projections, timed
for one LoRA training step (forward + backward + AdamW on the LoRA parameters only), the same loop,
ids and loss as torch_step.py. peft's defaults are kept (autocast_adapter_dtype=True keeps the
adapter weights in float32 over the bf16 base), since that is what a peft user gets.
It does not count FLOPs (table.py does).

    python bench/gpu/hf_step.py --layers 24 --vocab 151936 --batch 8 --seq 512 --steps 10 --device cuda

Prints ONE JSON line on stdout: {"who":"transformers+peft","bench":"lora_step",...}.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from common import DTYPES, LORA_TARGETS, reset_peak, shape_args, step_args, step_record, timed_steps, token_ids  # noqa: E402


def build_qwen2(a, dtype, max_pos):
    """Random-init Qwen2ForCausalLM of the requested shape, built directly on the device in `dtype`."""
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      rms_norm_eps=a.eps, rope_theta=a.rope_theta, tie_word_embeddings=True,
                      max_position_embeddings=max(max_pos, 512), use_sliding_window=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)
    cfg._attn_implementation = "sdpa"
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None and abs(float(theta) - a.rope_theta) > 1e-3:
        sys.exit(f"Qwen2Config ignored rope_theta: got {theta}")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(a.device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.to(device=a.device, dtype=dtype)
    print(f"transformers {transformers.__version__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, attn={model.config._attn_implementation}, rope_theta={theta}", file=sys.stderr)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape_args(p)
    step_args(p)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    dtype = DTYPES[a.dtype]
    import peft
    from peft import LoraConfig, get_peft_model

    model = build_qwen2(a, dtype, a.seq)
    model.config.use_cache = False
    lcfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    n_lora = sum(p_.numel() for p_ in params)
    print(f"peft {peft.__version__}: {n_lora / 1e6:.2f}M LoRA params, dtype {params[0].dtype}", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=a.lr)
    ids = token_ids(a.batch, a.seq, a.vocab, a.device, a.seed)
    reset_peak(a.device)

    def step():
        # labels=ids: transformers shifts them and takes the mean next-token cross-entropy (in float32).
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    secs = timed_steps(step, a)
    print(step_record("transformers+peft", a, secs, lora_params=n_lora), flush=True)


if __name__ == "__main__":
    main()
