"""What compact positions cost in accuracy: the same pruning with the unpruned prompt's positions
("original", the Hugging Face path's default) and with the pruned prompt's own ("compact", what vLLM
serves for LLaVA), on the same questions, with a 95% paired-bootstrap interval per method and keep.

    python benchmarks/positions_cost.py --model weights/tiny-vlm --selector weights/tiny-vlm-selector \\
        --data data/testbed/test.json --keep 192,64,16 --methods autoselect,divprune --out DIR

Writes DIR/positions_cost.json (every row of both evaluations, and the differences) and prints the
table: accuracy with original and compact positions, compact minus original [interval], tie or not.
"""

import argparse
import json
import os
import sys
import time

import torch

from autoselect.evaluation import evaluate, load_records, paired_bootstrap
from autoselect.hf import load_vlm
from autoselect.modules.selector import AutoSelector


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--selector", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--keep", default="192,64,16")
    parser.add_argument("--methods", default="autoselect,divprune")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    keeps = [float(k) if "." in k else int(k) for k in args.keep.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    model, processor = load_vlm(args.model)
    selector = AutoSelector.from_pretrained(args.selector)
    records = load_records(args.data)[: args.limit]
    root = os.path.dirname(os.path.abspath(args.data))
    started = time.time()
    runs = {}
    for positions in ("original", "compact"):
        runs[positions] = evaluate(model, processor, records, root, methods=methods, keeps=keeps, selector=selector,
                                   batch_size=args.batch_size, resamples=args.resamples, positions=positions)
    table = []
    print(f"{'method':>10} {'keep':>5} {'original':>9} {'compact':>9}  compact - original [95% interval]")
    for a, b in zip(runs["original"], runs["compact"]):
        assert (a["method"], a["keep"]) == (b["method"], b["keep"])
        diff = paired_bootstrap(b["correct"], a["correct"], b["ids"], a["ids"], resamples=args.resamples)
        row = {"method": a["method"], "keep": a["keep"], "original": a["accuracy"]["all"],
               "compact": b["accuracy"]["all"], "difference": diff}
        table.append(row)
        verdict = "tie" if diff["tie"] else ("compact better" if diff["difference"] > 0 else "compact worse")
        print(f"{a['method']:>10} {str(a['keep']):>5} {row['original']:9.3f} {row['compact']:9.3f}  "
              f"{diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] {verdict}")
    os.makedirs(args.out, exist_ok=True)
    meta = {"model": args.model, "selector": args.selector, "data": args.data, "questions": len(records),
            "torch": torch.__version__, "seconds": round(time.time() - started, 1)}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("correct", "ids")} for r in rows]  # noqa: E731
    with open(os.path.join(args.out, "positions_cost.json"), "w") as handle:
        json.dump({"meta": meta, "table": table, "original": strip(runs["original"]),
                   "compact": strip(runs["compact"])}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
