#!/usr/bin/env python3
"""Arithmetic problems with checkable answers, for PACED (`[paced]`, examples/paced.toml).

Writes JSONL records {"prompt": "Q: 23 + 45 = ?\\nA:", "response": " 68", "answer": "68"}: sums,
differences and products of 1- to 3-digit numbers, a mix of difficulties (the digits of each
operand drawn uniformly from 1..=3; products keep one operand at 1-2 digits). Seeded and
standard-library only, so the same command writes the same files:

    python3 scripts/arithmetic.py --seed 0 --train 400 --validation 100 \\
        --out examples/arithmetic.jsonl --validation-out examples/arithmetic_validation.jsonl

No problem appears twice, and no validation problem is a training problem.
"""
import argparse
import json
import random


def operand(rng, digits):
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def problem(rng):
    op = rng.choice(["+", "-", "*"])
    a = operand(rng, rng.randint(1, 3))
    b = operand(rng, rng.randint(1, 3) if op != "*" else rng.randint(1, 2))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    shown = "×" if op == "*" else op
    return (f"Q: {a} {shown} {b} = ?\nA:", str(value))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--validation", type=int, default=100)
    ap.add_argument("--out", default="examples/arithmetic.jsonl")
    ap.add_argument("--validation-out", default="examples/arithmetic_validation.jsonl")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seen = set()
    rows = []
    while len(rows) < args.train + args.validation:
        p, ans = problem(rng)
        if p in seen:
            continue
        seen.add(p)
        rows.append({"prompt": p, "response": " " + ans, "answer": ans})
    for path, part in [(args.out, rows[: args.train]), (args.validation_out, rows[args.train :])]:
        with open(path, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{path}: {len(part)} problems")


if __name__ == "__main__":
    main()
