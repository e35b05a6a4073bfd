"""Bookkeeping of bench/gpu/run.sh, standard library only (runs with any python3): `record` turns one
contender's output into one line of results.jsonl, `table` prints the comparison table, and
`flops_per_token` is the ONE model-FLOPs formula used for every contender's MFU.
It runs no benchmark itself.

    python3 bench/gpu/table.py record --case step4 --contender ferrotune --rc 0 --shape '{...}' < stdout.txt >> results.jsonl
    python3 bench/gpu/table.py table --results results.jsonl --gpu "NVIDIA H100 ..."
"""
import argparse
import json
import os
import sys

CONTENDERS = ["ferrotune", "pytorch", "transformers"]
FLOPS_FORMULA = ("LoRA-step FLOPs/token = 4*N_matmul + 6*N_lora + 6*T*d*L  "
                 "[fwd 2*N_matmul + bwd input-grads 2*N_matmul (frozen base: no weight grads); "
                 "LoRA fwd+bwd 6*N_lora; attention 4*T*d*L fwd x(1+2) fwd+bwd, /2 causal]")


def flops_per_token(c):
    """Model FLOPs per trained token of a LoRA step (see FLOPS_FORMULA), for case shape `c`.

    N_matmul: weights of every matmul a token goes through (7 projections per layer + tied LM head);
      forward 2*N_matmul, backward 2*N_matmul (gradients w.r.t. inputs only: the base is frozen).
    N_lora: LoRA A and B weights, r*(d_in + d_out) per projection; trained, so 2+4 = 6*N_lora.
    Attention scores and mixing: QK^T and PV are 2*T*d each per token per layer in the forward
      (4*T*d*L), halved by the causal mask, and x3 for forward + backward (6*T*d*L in all).
    Embedding lookups, norms, activations, softmax and the optimizer are not counted."""
    d, i_, layers, vocab, t = c["hidden"], c["intermediate"], c["layers"], c["vocab"], c["seq"]
    q = c["heads"] * (d // c["heads"])  # query / attention width
    kv = c["kv_heads"] * (d // c["heads"])
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i_), (d, i_), (i_, d)]  # (d_in, d_out) of q k v o gate up down
    n_matmul = layers * sum(a * b for a, b in shapes) + d * vocab
    n_lora = layers * sum(c["rank"] * (a + b) for a, b in shapes)
    attn = 4 * t * q * layers * 3 / 2
    return 4 * n_matmul + 6 * n_lora + attn


def last_json(text):
    """The last stdout line that parses as a JSON object carrying a result (ms_per_step or
    tokens_per_s), so log lines or metric lines printed before or after it do not confuse us;
    else the last JSON object of any kind (kept as `partial` of a failure record)."""
    any_obj = None
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and ("ms_per_step" in obj or "tokens_per_s" in obj):
            return obj
        any_obj = any_obj or obj
    return any_obj


def cmd_record(a):
    rec = last_json(sys.stdin.read())
    base = {"bench_case": a.case, "contender": a.contender, "rc": a.rc, "wall_s": a.wall,
            "shape": json.loads(a.shape)}
    if a.status:
        out = dict(base, status=a.status, reason=a.reason)
    elif a.rc == 0 and rec is not None and ("ms_per_step" in rec or "tokens_per_s" in rec):
        out = dict(rec, **base, status="ok")
    else:
        why = ("timeout" if a.rc in (124, 137) else f"exit {a.rc}" if a.rc != 0
               else "no JSON line with ms_per_step/tokens_per_s on stdout")
        out = dict(base, status="failed", reason=why, partial=rec)
    print(json.dumps(out))


def fmt_num(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def cmd_table(a):
    cases, res = [], {}
    for line in open(a.results):
        if line.strip():
            r = json.loads(line)
            res[(r["bench_case"], r["contender"])] = r
            if r["bench_case"] not in [c["case"] for c in cases]:
                cases.append(r["shape"])
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
    out = [f"GPU: {a.gpu}",
           f"MFU = model FLOPs / step time / {peak / 1e12:g} TFLOP/s (dense bf16 peak; PEAK_TFLOPS overrides)",
           FLOPS_FORMULA,
           "ratios: ferrotune speed / other speed (>1 = ferrotune faster); step cells ms/step, rollout cells tok/s",
           ""]
    hdr = (f"{'case':<34} {'ferrotune':>10} {'pytorch':>10} {'transformers':>12} {'ft/pt':>7} {'ft/hf':>7} "
           f"{'peak GB ft/pt/hf':>18} {'MFU% ft/pt/hf':>16}")
    out += [hdr, "-" * len(hdr)]
    notes = []
    for c in cases:
        step = c["kind"] == "lora_step"
        rows = {w: res.get((c["case"], w)) for w in CONTENDERS}
        val, cell, mem, mfu = {}, {}, {}, {}
        for w, r in rows.items():
            if step is False and w == "pytorch":
                cell[w], mem[w], mfu[w] = "n/a", "-", "-"
                continue
            if r is None:
                cell[w], mem[w], mfu[w] = "not run", "-", "-"
                continue
            if r.get("status") != "ok":
                cell[w] = "skipped" if r.get("status") == "skipped" else "failed"
                mem[w], mfu[w] = "-", "-"
                if cell[w] == "failed" or "budget" in str(r.get("reason")):
                    notes.append(f"{c['case']} {w}: {r.get('status')} ({r.get('reason')}), see {c['case']}.log")
                continue
            if step:
                ms = r.get("ms_per_step")
                if ms is None and r.get("tokens_per_s"):
                    ms = c["batch"] * c["seq"] / r["tokens_per_s"] * 1e3
                val[w] = 1e3 / ms  # steps/s: bigger = faster
                cell[w] = fmt_num(ms, 1)
                step_flops = flops_per_token(c) * c["batch"] * c["seq"]
                mfu[w] = fmt_num(100 * step_flops / (ms / 1e3) / peak, 1)
            else:
                val[w] = r["tokens_per_s"]
                cell[w] = fmt_num(r["tokens_per_s"], 0)
                mfu[w] = "-"
            mem[w] = fmt_num(r.get("peak_mem_gb"), 1)
        ratio = {w: (f"{val['ferrotune'] / val[w]:.2f}x" if "ferrotune" in val and w in val else "-")
                 for w in ("pytorch", "transformers")}
        out.append(f"{c['label']:<34} {cell['ferrotune']:>10} {cell['pytorch']:>10} {cell['transformers']:>12} "
                   f"{ratio['pytorch']:>7} {ratio['transformers']:>7} "
                   f"{'/'.join(mem[w] for w in CONTENDERS):>18} {'/'.join(mfu[w] for w in CONTENDERS):>16}")
    if notes:
        out += ["", "notes:"] + [f"  {n}" for n in notes]
    print("\n".join(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--case", required=True)
    r.add_argument("--contender", required=True)
    r.add_argument("--rc", type=int, default=0)
    r.add_argument("--wall", type=float, default=None)
    r.add_argument("--status", default=None, help="force a status (skipped / failed) without reading stdin")
    r.add_argument("--reason", default=None)
    r.add_argument("--shape", default="{}", help="JSON shape of the case (run.sh's case_json), used for FLOPs")
    t = sub.add_parser("table")
    t.add_argument("--results", required=True)
    t.add_argument("--gpu", default="unknown")
    a = p.parse_args()
    cmd_record(a) if a.cmd == "record" else cmd_table(a)


if __name__ == "__main__":
    main()
