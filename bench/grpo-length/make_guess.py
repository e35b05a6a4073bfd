"""Data for the `guess` variant of issue 4's length experiment (TASK=guess in run.sh).

The prompt asks for a number from 1 to 9; the rewarded answer is always 7. SFT rows answer a
uniform random digit followed by 0-6 filler sentences, so after SFT about 1 in 9 samples is right
and the completion length has nothing to do with it. Unlike arithmetic, the model can see whether
its own answer is right (it is right exactly when it wrote 7), so a loss that treats long and
short wrong answers differently has a feature to act on.

    python3 make_guess.py SFT_OUT.jsonl GRPO_OUT.jsonl [SEED]
"""
import json
import random
import sys

SYSTEM = "Answer with the number inside <answer></answer> tags."
USER = "Guess my number from 1 to 9."
FILLER = " Let me check."


def main():
    sft_path, grpo_path = sys.argv[1], sys.argv[2]
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    with open(sft_path, "w") as f:
        for _ in range(2000):
            n, k = rng.randrange(1, 10), rng.randrange(0, 7)
            text = f"The answer is <answer>{n}</answer>." + FILLER * k
            row = {"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}
            f.write(json.dumps(row) + "\n")
    with open(grpo_path, "w") as f:
        for _ in range(3000):
            f.write(json.dumps({"prompt": prompt, "answer": "7"}) + "\n")


if __name__ == "__main__":
    main()
