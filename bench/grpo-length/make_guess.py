"""Data for the `guess` variant of issue 4's length experiment (TASK=guess in run.sh).

The prompt asks for a number from 1 to 9; the rewarded answer is always 7. SFT rows answer a
uniform random digit followed by filler sentences, so after SFT about 1 in 9 samples is right
and the completion length has nothing to do with it. Unlike arithmetic, the model can see whether
its own answer is right (it is right exactly when it wrote 7), so a loss that treats long and
short wrong answers differently has a feature to act on.

LENGTHS picks the completions:
- `uniform` (default): "The answer is <answer>N</answer>." then 0-6 filler sentences, uniform
  (11 to 59 tokens with the demo tokenizer); the length is decided sentence by sentence.
- `two`: "The answer is N" then either nothing or 7 filler sentences, half and half (5 or 61
  tokens); the length is decided by the one token after the digit, so the model decides it
  looking at its own answer (run.sh extracts N with a regex).

    python3 make_guess.py SFT_OUT.jsonl GRPO_OUT.jsonl [SEED] [LENGTHS]
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
    lengths = sys.argv[4] if len(sys.argv) > 4 else "uniform"
    if lengths not in ("uniform", "two"):
        sys.exit(f"LENGTHS must be uniform or two, not {lengths}")
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    with open(sft_path, "w") as f:
        for _ in range(2000):
            n = rng.randrange(1, 10)
            if lengths == "uniform":
                text = f"The answer is <answer>{n}</answer>." + FILLER * rng.randrange(0, 7)
            else:
                text = f"The answer is {n}" + FILLER * rng.choice((0, 7))
            row = {"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}
            f.write(json.dumps(row) + "\n")
    with open(grpo_path, "w") as f:
        for _ in range(3000):
            f.write(json.dumps({"prompt": prompt, "answer": "7"}) + "\n")


if __name__ == "__main__":
    main()
