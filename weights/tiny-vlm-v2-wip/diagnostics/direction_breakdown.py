"""Accuracy of location and relation questions by axis and form, from an `autoselect eval` output: is
the horizontal (left/right) weaker than the vertical (top/bottom, above/below)? Rows: location by axis;
relation by form (the colour of the object beside a named one, or yes/no) and direction.

    python weights/tiny-vlm-v2-wip/diagnostics/direction_breakdown.py EVAL.json --data SPLIT.json [--method full]"""

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from probe_tools import wilson_interval  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("eval")
parser.add_argument("--data", required=True)
parser.add_argument("--method", default="full")
parser.add_argument("--keep", default="all")
args = parser.parse_args()
result = json.load(open(args.eval))
questions = {q["id"]: q for q in json.load(open(args.data))}
row = next(r for r in result["rows"] if r["method"] == args.method and str(r["keep"]) == args.keep)
tally = collections.defaultdict(lambda: [0, 0])
for qid, correct in zip(result["question_ids"], row["correct"]):
    q = questions[qid]
    text = q["conversations"][0]["value"].split("\n")[-1]
    if q["type"] == "location":
        keys = ["location " + ("left/right" if "left or the right" in text else "top/bottom")]
    elif q["type"] == "relation":
        direction = next(d for d in ("left of", "right of", "above", "below") if d in text)
        axis = "horizontal" if direction in ("left of", "right of") else "vertical"
        form = "colour" if text.startswith("What") else "yes/no"
        keys = [f"relation {form} {axis}", f"relation {form} {direction}"]
    else:
        continue
    for key in keys:
        tally[key][0] += correct
        tally[key][1] += 1
print(f"# {args.eval} ({args.method}, keep {args.keep}) on {args.data}")
for key in sorted(tally):
    right, total = tally[key]
    low, high = wilson_interval(right, total)
    print(f"{key:32s} {right:4d} / {total:4d} = {right / total:.3f}  [{low:.3f}, {high:.3f}]")
