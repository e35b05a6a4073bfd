"""SFT rows for issue 4's length experiment: each problem's completion is the demo's answer
sentence with 0-6 filler sentences, drawn uniformly and independently of the problem, after it
(`after`, the default) or before it (`before`).

After the answer, the filler is a free length knob that cannot change correctness, so any
link between length and correctness that GRPO builds comes from the loss, not from the task.
Before the answer, the filler changes the tiny model's answers (it makes them wrong), so length
and correctness are tied from the start.

    python3 make_sft.py PROBLEMS.jsonl OUT.jsonl [SEED] [after|before]
"""
import json
import random
import sys

FILLER_BEFORE = "Let me think. "
FILLER_AFTER = " Let me check."


def main():
    src, dst = sys.argv[1], sys.argv[2]
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    at = sys.argv[4] if len(sys.argv) > 4 else "after"
    if at not in ("after", "before"):
        sys.exit(f"filler position must be after or before, not {at!r}")
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            row = json.loads(line)
            k = rng.randrange(0, 7)
            answer = f"The answer is <answer>{row['answer']}</answer>."
            if at == "after":
                text = answer + FILLER_AFTER * k
            else:
                text = FILLER_BEFORE * k + answer
            completion = [{"role": "assistant", "content": text}]
            out.write(json.dumps({"prompt": row["prompt"], "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
