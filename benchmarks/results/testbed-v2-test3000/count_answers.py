"""Which way pruning moves the v2 VLM's count answers: on the test split's count questions, the answer
(greedy, first word) of the full model and of each method at one budget, against the truth; prints the
mean signed error and the share of over- and under-counts.

    python benchmarks/results/testbed-v2-test3000/count_answers.py --keep 64 --limit 200
"""
import argparse
from collections import Counter

import torch

from autoselect import AutoSelector
from autoselect.evaluation import normalise, score
from autoselect.integrations import apply, revert
from autoselect.training.data import load_records
from autoselect.training.trainer import load_vlm

WORDS = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}


def number(text):
    word = normalise(text)
    return int(word) if word.isdigit() else WORDS.get(word)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="autoselect/weights/tiny-vlm-v2")
    parser.add_argument("--selector", default="autoselect/weights/tiny-vlm-v2-selector")
    parser.add_argument("--data", default="data/testbed-v2")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--methods", default="autoselect,divprune,fastv,random")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = load_vlm(args.model)
    selector = AutoSelector.from_pretrained(args.selector)
    records = [r for r in load_records(f"{args.data}/test.json") if r.get("type") == "count"][:args.limit]
    truth = [number(r["conversations"][1]["value"]) for r in records]
    for method in ["full"] + args.methods.split(","):
        if method != "full":
            apply(model, selector if method == "autoselect" else None, method=method, keep=args.keep,
                  **({"seed": 0} if method == "random" else {}))
        got = [number(a) for a in score(model, processor, records, args.data)["answers"]]
        if method != "full":
            revert(model)
        errors = [g - t for g, t in zip(got, truth) if g is not None and t is not None]
        sign = Counter((e > 0) - (e < 0) for e in errors)
        print(f"{method:10s} keep {args.keep if method != 'full' else 'all':>3}: correct {sign[0] / len(errors):.3f}  "
              f"over {sign[1] / len(errors):.3f}  under {sign[-1] / len(errors):.3f}  mean error "
              f"{sum(errors) / len(errors):+.2f}  (n={len(errors)}, unparsed {len(got) - len(errors)})")


if __name__ == "__main__":
    main()
