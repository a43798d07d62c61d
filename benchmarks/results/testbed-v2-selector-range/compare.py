"""The K-range selector (trained with --keep 16:192) against the shipped one (--keep 64) and DivPrune /
FastV, on the validation split (1,500 questions; the test split is not used to choose a recipe): accuracy
per keep and type, and paired-bootstrap intervals (2,000 resamples, seed 0, 95%) from the two evals'
eval.json files (same questions, same order)."""
import json
import sys

from autoselect.evaluation import paired_bootstrap

range_eval, shipped_eval = (json.load(open(path)) for path in sys.argv[1:3])
assert range_eval["question_ids"] == shipped_eval["question_ids"]
ranged = {str(r["keep"]): r for r in range_eval["rows"] if r["method"] == "autoselect"}
others = {(r["method"], str(r["keep"])): r for r in shipped_eval["rows"]}
types = ["color", "shape", "exist", "count", "location", "relation", "text"]
print(f"{len(range_eval['question_ids'])} validation questions; full model {others[('full', 'all')]['accuracy']['all']:.3f}")
print("keep  method              accuracy  range selector minus it [95% CI]   " + "  ".join(f"{t[:5]:>5}" for t in types))
for keep, row in ranged.items():
    print(f"{keep:>4}  autoselect (16:192)   {row['accuracy']['all']:.3f}  {'':34s} "
          + "  ".join(f"{row['accuracy'][t]:.3f}" for t in types))
    for method in ("autoselect", "divprune", "fastv"):
        other = others[(method, keep)]
        b = paired_bootstrap(row["correct"], other["correct"], resamples=2000, seed=0)
        label = "autoselect (64)" if method == "autoselect" else method
        print(f"{keep:>4}  {label:20s}  {other['accuracy']['all']:.3f}  {b['difference']:+.3f} [{b['low']:+.3f}, "
              f"{b['high']:+.3f}]{' tie' if b['tie'] else '    '}        "
              + "  ".join(f"{other['accuracy'][t]:.3f}" for t in types))
