"""The test table's comparison to AutoSelect without the count questions (eval.json of this folder; the
same paired bootstrap as `autoselect eval`: 2,000 resamples, seed 0, 95%)."""
import json
from pathlib import Path

from autoselect.evaluation import paired_bootstrap

HERE = Path(__file__).resolve().parent
result = json.loads((HERE / "eval.json").read_text())
records = json.loads((HERE.parents[2] / "data" / "testbed-v2" / "test.json").read_text())
types = {record["id"]: record.get("type") for record in records}
ids = result["question_ids"]
keep = [i for i, q in enumerate(ids) if types[q] != "count"]
rows = {(r["method"], str(r["keep"])): r for r in result["rows"]}
print(f"{len(keep)} of {len(ids)} questions (count left out)")
for (method, k), row in rows.items():
    if method in ("full", "autoselect"):
        continue
    mine = [row["correct"][i] for i in keep]
    theirs = [rows[("autoselect", k)]["correct"][i] for i in keep]
    b = paired_bootstrap(mine, theirs, resamples=2000, seed=0)
    print(f"{method:10s} {k:>4}: {sum(mine) / len(mine):.3f} vs autoselect {sum(theirs) / len(theirs):.3f}: "
          f"{b['difference']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}]{' tie' if b['tie'] else ''}")
