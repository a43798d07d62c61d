"""Two VLMs' full-model answers to the same questions, compared: accuracy of each and B - A with its 95%
paired-bootstrap interval (`autoselect.evaluation.paired_bootstrap`, 10,000 resamples), over all the
questions, per question type, and over the first --head questions and the rest. The head/rest split is
there because the first 500 validation questions are the ones every stage-2 run was selected on, so a
model picked by them scores higher there than on questions no run was picked by.

    python weights/tiny-vlm-v2-wip/diagnostics/full_paired.py checkpoints/val-shipped/eval.json \
        checkpoints/val-rel750/eval.json --head 500

Each eval.json is `autoselect eval --methods full` on the same split (the questions are aligned by id).
"""
import argparse
import json

import numpy as np

from autoselect.evaluation import paired_bootstrap


def full_row(path):
    with open(path) as f:
        result = json.load(f)
    row = next((r for r in result["rows"] if r["method"] == "full"), None)
    if row is None:
        raise SystemExit(f"{path}: no 'full' row (run autoselect eval with --methods full)")
    return result["question_ids"], np.asarray(row["correct"], dtype=float)


def line(name, ids, a, b):
    d = paired_bootstrap(b, a, ids, ids, resamples=10000, seed=0)
    verdict = "tie" if d["tie"] else ("B ahead" if d["difference"] > 0 else "A ahead")
    print(f"{name:<14} {len(a):>5}  A {a.mean():.3f}  B {b.mean():.3f}  B-A {d['difference']:+.3f} "
          f"[{d['low']:+.3f}, {d['high']:+.3f}]  {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--head", type=int, default=0, help="also compare the first HEAD questions and the rest")
    parser.add_argument("--data", default=None, help="the split's json, for the per-type lines")
    args = parser.parse_args()
    ids, a = full_row(args.a)
    ids_b, b = full_row(args.b)
    if ids != ids_b:
        raise SystemExit("the two evaluations are not over the same questions in the same order")
    line("all", ids, a, b)
    if args.head:
        line(f"first {args.head}", ids[:args.head], a[:args.head], b[:args.head])
        line("the rest", ids[args.head:], a[args.head:], b[args.head:])
    if args.data:
        with open(args.data) as f:
            kinds = {r["id"]: r["type"] for r in json.load(f)}
        types = np.array([kinds[i] for i in ids])
        for kind in sorted(set(types)):
            keep = types == kind
            line(kind, [i for i, k in zip(ids, keep) if k], a[keep], b[keep])


if __name__ == "__main__":
    main()
