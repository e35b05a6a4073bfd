"""Mean completion length of right and wrong answers, per window of steps, for GRPO runs
(read from each run's metrics.jsonl: completions/mean_length_right|wrong, rewards, accuracy).
With SHORT=N in the environment (LENGTHS=two runs: short completions are 6 tokens, long ones
about 60), also the fraction of right and of wrong answers with at most N tokens, from each
run's completions.jsonl (log_every = 1 logs every completion).

    [SHORT=8] python3 report.py RUN_DIR [RUN_DIR ...]
"""
import json
import os
import sys

WINDOWS = [(1, 20), (21, 40), (41, 60), (61, 80), (81, 100), (101, 120), (121, 140), (141, 160),
           (161, 200), (201, 240)]


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main():
    print(f"{'run':<10} {'steps':<9} {'accuracy':>8} {'len right':>9} {'len wrong':>9} {'len all':>8} {'wrong-right':>11}")
    for run in sys.argv[1:]:
        rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
        rows = [r for r in rows if "completions/mean_length" in r]
        name = os.path.basename(os.path.normpath(run))
        for lo, hi in WINDOWS:
            w = [r for r in rows if lo <= r["step"] <= hi]
            if not w:
                continue
            right = [r["completions/mean_length_right"] for r in w if "completions/mean_length_right" in r]
            wrong = [r["completions/mean_length_wrong"] for r in w if "completions/mean_length_wrong" in r]
            acc = mean([r["rewards/answer_match/mean"] for r in w])
            # The gap per step (both lengths from the same step's completions), then averaged.
            gap = [r["completions/mean_length_wrong"] - r["completions/mean_length_right"] for r in w
                   if "completions/mean_length_right" in r and "completions/mean_length_wrong" in r]
            print(f"{name:<10} {lo:>3}-{hi:<5} {acc:>8.3f} {mean(right):>9.2f} {mean(wrong):>9.2f} "
                  f"{mean([r['completions/mean_length'] for r in w]):>8.2f} {mean(gap):>11.2f}")
        # Once the answer is mostly learned (accuracy > 0.8 from about step 40 in the guess
        # runs), the per-step gap over the rest of the run, in one number.
        late = [r["completions/mean_length_wrong"] - r["completions/mean_length_right"] for r in rows
                if r["step"] > 40 and "completions/mean_length_right" in r
                and "completions/mean_length_wrong" in r]
        print(f"{name:<10} {'41-end':<9} {'':>8} {'':>9} {'':>9} {'':>8} {mean(late):>11.2f}"
              f"  (mean over {len(late)} steps)")
    if "SHORT" in os.environ:
        short_fractions(sys.argv[1:], int(os.environ["SHORT"]))


def short_fractions(runs, short):
    print(f"\nfraction of completions with at most {short} tokens (n = completions)")
    print(f"{'run':<10} {'steps':<9} {'right':>12} {'wrong':>12}")
    for run in runs:
        rows = [json.loads(l) for l in open(os.path.join(run, "completions.jsonl"))]
        name = os.path.basename(os.path.normpath(run))
        for lo, hi in WINDOWS:
            w = [r for r in rows if lo <= r["step"] <= hi]
            if not w:
                continue
            cells = []
            for right in (True, False):
                s = [r for r in w if (r["rewards"]["answer_match"] > 0) == right]
                frac = mean([float(r["tokens"] <= short) for r in s])
                cells.append(f"{frac:.2f} ({len(s):>4})" if s else "-")
            print(f"{name:<10} {lo:>3}-{hi:<5} {cells[0]:>12} {cells[1]:>12}")


if __name__ == "__main__":
    main()
