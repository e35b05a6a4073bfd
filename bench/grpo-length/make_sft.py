"""SFT rows for issue 4's length experiment: each problem's completion is the demo's answer
sentence preceded by 0-6 filler sentences, drawn uniformly and independently of the problem.
The filler gives the policy a free length knob that has nothing to do with correctness, so any
length drift GRPO produces comes from the loss, not from the task.

    python3 make_sft.py PROBLEMS.jsonl OUT.jsonl [SEED]
"""
import json
import random
import sys

FILLER = "Let me think. "


def main():
    src, dst = sys.argv[1], sys.argv[2]
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            row = json.loads(line)
            k = rng.randrange(0, 7)
            text = FILLER * k + f"The answer is <answer>{row['answer']}</answer>."
            completion = [{"role": "assistant", "content": text}]
            out.write(json.dumps({"prompt": row["prompt"], "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
