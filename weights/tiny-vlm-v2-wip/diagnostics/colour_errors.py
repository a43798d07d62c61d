"""Why colour questions fail: run a saved v2 VLM on the first 200 validation colour questions ("What
color is the {shape}?", the shape unique in the scene) and print, from the scenes, whether each wrong
answer is the colour of another object (the model read the wrong object: binding) or of none
(perception); the asked object's mean size and height for right and wrong answers; the error rate per
asked shape; which shapes the wrongly read objects had; and the shortcut: how often the answer is one
of the scene's most common colours, and the accuracy where the true colour is not one of them (where
"the most common colour" is always wrong).

    python weights/tiny-vlm-v2-wip/diagnostics/colour_errors.py MODEL_DIR   # about 20 s on 2 cores

Written for issue 14's third training session; what it printed is in colour_errors.txt beside it."""

import collections
import re
import sys

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.evaluation import score
from autoselect.testbed.train_vlm import load_records, load_scenes

torch.set_num_threads(2)
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
records = [r for r in load_records("data/testbed-v2", "val") if r["type"] == "color"][:200]
scenes = dict(load_scenes("data/testbed-v2", "val", 2))
scored = score(model, processor, records, "data/testbed-v2")
kinds, asked, wrong, confusion, shortcut = (collections.Counter() for _ in range(5))
measures = collections.defaultdict(list)
for record, answer, correct in zip(records, scored["answers"], scored["correct"]):
    scene = scenes[record["image"]]
    shape = re.search(r"the (\w+)\?", record["conversations"][0]["value"]).group(1)
    target = next(o for o in scene.objects if o.shape == shape)
    measures[bool(correct)].append((target.size, target.y, len(scene.objects)))
    colours = collections.Counter(o.color for o in scene.objects)
    majority = max(colours.values())
    shortcut["answered a most common colour"] += colours[answer.split()[0]] == majority
    shortcut["truth not a most common colour"] += colours[target.color] < majority
    shortcut["... and answered right"] += bool(correct) and colours[target.color] < majority
    asked[shape] += 1
    if correct:
        kinds["right"] += 1
        continue
    wrong[shape] += 1
    read = sorted({o.shape for o in scene.objects if o.color == answer.split()[0]})
    kinds["another object's colour" if read else "the colour of no object"] += 1
    confusion[(shape, "/".join(read))] += 1
print(dict(kinds))
for correct, rows in sorted(measures.items()):
    size, y, objects = (sum(r[i] for r in rows) / len(rows) for i in range(3))
    print("right" if correct else "wrong", f"n {len(rows)}: asked object's mean size {size:.1f} px, "
          f"mean y {y:.1f} px (of 336), mean objects in the scene {objects:.2f}")
print("errors per asked shape", {s: f"{wrong[s]}/{asked[s]}" for s in asked})
print("asked -> shapes of the object(s) whose colour was answered", confusion.most_common(8))
print(f"of {len(records)}:", dict(shortcut))
