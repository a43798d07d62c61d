"""Testbed v2's selector ablation over the training budget (--keep), on the validation split (1,500
questions; the test split chooses nothing).

Usage: python ablation.py LABEL=eval.json [LABEL=eval.json ...]; the first is the reference (the shipped
K = 64 selector). Each eval.json is `autoselect eval --methods autoselect --keep 192,64,32,16` of one
selector on data/testbed-v2/val.json. Prints each variant's accuracy per keep and their mean (the rule
fixed before the runs: the variant with the highest mean is chosen, if no keep has it significantly below
the reference), and each variant minus the reference with 95% paired-bootstrap intervals (2,000
resamples, seed 0)."""
import json
import sys

from autoselect.evaluation import paired_bootstrap

variants = [argument.split("=", 1) for argument in sys.argv[1:]]
evals = {label: json.load(open(path)) for label, path in variants}
reference = variants[0][0]
ids = evals[reference]["question_ids"]
rows = {}
for label, result in evals.items():
    assert result["question_ids"] == ids, f"{label}: not the same questions"
    rows[label] = {str(r["keep"]): r for r in result["rows"] if r["method"] == "autoselect"}
keeps = list(rows[reference])
print(f"{len(ids)} validation questions; budgets {', '.join(keeps)}; reference: --keep {reference}")
print(f"{'--keep':>8}  " + "  ".join(f"K={k:>4}" for k in keeps) + "    mean")
for label in rows:
    accuracies = [rows[label][k]["accuracy"]["all"] for k in keeps]
    print(f"{label:>8}  " + "  ".join(f"{a:6.3f}" for a in accuracies) + f"  {sum(accuracies) / len(accuracies):6.3f}")
print(f"\nminus --keep {reference} [95% CI]")
for label in rows:
    if label == reference:
        continue
    cells = []
    for k in keeps:
        b = paired_bootstrap(rows[label][k]["correct"], rows[reference][k]["correct"], resamples=2000, seed=0)
        cells.append(f"K={k}: {b['difference']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}]{' tie' if b['tie'] else ''}")
    print(f"{label:>8}  " + "; ".join(cells))
