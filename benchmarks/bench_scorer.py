"""Selection time of the paper's Scorer (2 Transformer blocks, width 1024, 16 heads) against the
prefill time that keeping K of N tokens saves, in one run.

    python benchmarks/bench_scorer.py [--device cuda] [--threads 1]

Rows (appended to benchmarks/results/scorer.csv):
- kernel "scorer_select", provider "transformer-2x1024" and "mlp-256": `Scorer.select(x, 64)` on
  vision features x (B, 576, 1024), B in {1, 8} (the paper's anchor: 0.69 ms on an A6000, fp16, B=1).
  The Transformer runs its blocks through SDPA, then the fused top-K and gather (`select_topk`); the
  MLP (layers=0) is the fully fused `score_select`.
- kernel "prefill": the LLaVA-shaped language model of `autoselect.bench.prefill` (reduced width on the
  CPU, the 7B shape on a GPU), full against keep 64 (norm selection, whose cost is negligible), at B=1;
  the note of each scorer row gives the selection time as a fraction of the prefill time saved.
Untrained weights: speed does not depend on them.
"""

import argparse
import os
import sys

import torch

import autoselect
from autoselect.bench import prefill
from autoselect.bench._timing import append_rows, device_name, measure, today, versions

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scorer.csv")
SCORERS = {"transformer-2x1024": dict(layers=2, width=1024, heads=16, mlp_ratio=4),
           "mlp-256": dict(layers=0, hidden=256)}


def scorer_rows(device, dtype, batches=(1, 8), n=576, dim=1024, k=64, repeats=20):
    meta = {"date": today(), "kernel": "scorer_select", "mode": "select", "dtype": str(dtype).replace("torch.", ""),
            "device": device.type, "device_name": device_name(device), "gbps": "", **versions()}
    rows = []
    for name, arguments in SCORERS.items():
        torch.manual_seed(0)
        scorer = autoselect.Scorer(dim, **arguments).to(device=device, dtype=dtype).eval()
        for batch in batches:
            x = torch.randn(batch, n, dim, device=device, dtype=dtype)

            def call():
                with torch.no_grad():
                    return scorer.select(x, k)

            median, p20, p80 = measure(call, device, repeats=repeats, warmup=3)
            rows.append({**meta, "provider": name, "backend": autoselect.backends(device)["select_topk"]["chosen"],
                         "shape": f"B={batch} N={n} D={dim} K={k}", "median_ms": median, "p20_ms": p20,
                         "p80_ms": p80, "note": ""})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = scorer_rows(device, dtype)
    shape = prefill.parse_shape(prefill.DEFAULT_SHAPES[device.type][0])
    prefill_rows = prefill.run(**shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                               device=device, keeps=(64, ), methods=("norm", ))
    full = next(r["median_ms"] for r in prefill_rows if r["mode"] == "full")
    pruned = next(r["median_ms"] for r in prefill_rows if r["mode"] == "keep=64" and r["provider"] == "norm")
    saved = full - pruned
    for row in rows:
        if row["shape"].startswith("B=1 ") and saved > 0:
            row["note"] = (f"{100 * row['median_ms'] / saved:.1f}% of the prefill time saved at keep 64 "
                           f"({full:.1f} -> {pruned:.1f} ms, {prefill_rows[0]['shape']})")
        elif row["shape"].startswith("B=1 "):  # launch-bound: fewer tokens saved nothing to compare with
            row["note"] = (f"keep 64 saved no prefill time ({full:.1f} -> {pruned:.1f} ms, "
                           f"{prefill_rows[0]['shape']})")
    append_rows(args.results, rows + prefill_rows)
    print(f"{'provider':<22} {'shape':<24} {'median ms':>10}  note")
    for row in rows + prefill_rows:
        print(f"{row['provider']:<22} {row['shape']:<24} {row['median_ms']:>10.3f}  {row['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
