"""Which side a tiny v2 VLM answers to the first validation location questions ("Is the red star on the
left or the right?", "... at the top or the bottom?"): counts of (reference, answer) pairs, greedy, all
576 tokens, through the package's scoring path (`evaluation.score`).

    python weights/tiny-vlm-v2-wip/diagnostics/location_sides.py MODEL_FOLDER [questions]"""

import collections
import json
import sys

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.evaluation import score

torch.set_num_threads(2)
folder, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64
model = LlavaForConditionalGeneration.from_pretrained(folder)
processor = AutoProcessor.from_pretrained(folder)
records = [r for r in json.load(open("data/testbed-v2/val.json"))
           if " on the left or the right?" in r["conversations"][0]["value"]
           or " at the top or the bottom?" in r["conversations"][0]["value"]][:count]
result = score(model, processor, records, "data/testbed-v2")
pairs = collections.Counter()
for record, answer in zip(records, result["answers"]):
    pairs[(record["conversations"][1]["value"], (answer.split() or [""])[0])] += 1
print(f"{folder}: {sum(result['correct'])} of {len(records)} location questions right")
for axis in (("left", "right"), ("top", "bottom")):
    right = sum(n for (ref, said), n in pairs.items() if ref in axis and said == ref)
    total = sum(n for (ref, _), n in pairs.items() if ref in axis)
    said = {side: sum(n for (ref, s), n in pairs.items() if ref in axis and s == side) for side in axis}
    print(f"  {'/'.join(axis)}: {right} of {total} right; answered {said}")
