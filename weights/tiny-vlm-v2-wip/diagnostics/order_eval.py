"""Does a model that answers the order of two objects as a word (`--recall-as every+relation+order`: "Is
the red star left or right of the blue circle?" -> "left") also answer the yes/no form? For every related
ordered pair of named objects in the first SCENES validation scenes: the order question and the yes/no
question (the pair's direction or its opposite, drawn as the generator does), the model's first answer word
(greedy, every token), accuracy by axis with 95% Wilson intervals.

    python weights/tiny-vlm-v2-wip/diagnostics/order_eval.py MODEL_FOLDER [SCENES] [THREADS]"""

import collections
import os
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.testbed import data_v2, vlm
from autoselect.testbed.train_vlm import load_scenes, order_question

sys.path.insert(0, os.path.dirname(__file__))
from probe_tools import related_pairs, wilson_interval  # noqa: E402

folder = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 300
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
rng = np.random.default_rng(0)
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
scenes = load_scenes("data/testbed-v2", "val", 2)[:count]

questions = []  # (scene path, text, axis, form, answer)
for path, scene in scenes:
    for a, b, actual in related_pairs(scene):
        axis = "horizontal" if actual in ("left of", "right of") else "vertical"
        text, word = order_question(a, b, actual)
        questions.append((path, text, axis, "order", word))
        asked = actual if rng.random() < 0.5 else data_v2.OPPOSITE[actual]
        questions.append((path, f"Is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?", axis, "yes/no",
                          "yes" if asked == actual else "no"))

tally = collections.defaultdict(lambda: [0, 0])
with torch.no_grad():
    for start in range(0, len(questions), 16):
        batch = questions[start:start + 16]
        images = [Image.open(os.path.join("data/testbed-v2", q[0])).convert("RGB") for q in batch]
        inputs = processor(images=images, text=[vlm.prompt(q[1], version=2) for q in batch], return_tensors="pt",
                           padding=True)
        words = processor.tokenizer.convert_ids_to_tokens(model(**inputs).logits[:, -1].argmax(-1).tolist())
        for q, word in zip(batch, words):
            tally[(q[3], q[2])][0] += word == q[4]
            tally[(q[3], q[2])][1] += 1

print(f"# python {' '.join(sys.argv)}; {len(questions)} questions of {len(scenes)} validation scenes")
for (form, axis), (right, total) in sorted(tally.items()):
    low, high = wilson_interval(right, total)
    print(f"{form:7s} {axis:10s} {right:4d} / {total:4d} = {right / total:.3f}  [{low:.3f}, {high:.3f}]")
