"""This folder's eval.json (the shipped VLM, run rope24's step 650, and its selector) against
rel-a-vlm/eval.json (the VLM shipped before, rel-a's step 750, and its selector) on the same 3,000 test
questions: each method's accuracy at each K under both, and the difference (this - before) with the
paired bootstrap of `autoselect eval` (2,000 resamples, seed 0, 95%).

    python benchmarks/results/testbed-v2-test3000/compare_vlms.py
"""
import json
from pathlib import Path

from autoselect.evaluation import paired_bootstrap

HERE = Path(__file__).resolve().parent
now, before = (json.loads((HERE / name).read_text()) for name in ("eval.json", "rel-a-vlm/eval.json"))
if now["question_ids"] != before["question_ids"]:
    raise SystemExit("the two evaluations are not on the same questions")
rows_now, rows_before = ({(r["method"], str(r["keep"])): r for r in result["rows"]} for result in (now, before))
print("method      keep  before   now    now - before [95% CI]")
for key, row in rows_now.items():
    a, b = row["correct"], rows_before[key]["correct"]
    d = paired_bootstrap(a, b)
    print(f"{key[0]:<10} {key[1]:>5}  {sum(b) / len(b):.3f}  {sum(a) / len(a):.3f}  {d['difference']:+.3f} "
          f"[{d['low']:+.3f}, {d['high']:+.3f}]{' tie' if d['tie'] else ''}")
