"""Where does the language model lose the asked object's colour? For generated colour questions ("What
color is the {shape}?", image first, as in training) on training images, take the language model's
hidden state after each layer at two places, the shape word and the answer position (the prompt's last
token), and fit a linear read-out of the asked object's colour on 1,000 questions; print its accuracy
on 400 others, overall and where the answer is not the scene's most common colour (where the shortcut
fails). The colour is readable at the shape word after layer 1 if its first-layer lookup works (the
lookup_probe shows one attention layer can do it from these features), and at the answer position if
the result reaches it.

    python weights/tiny-vlm-v2-wip/diagnostics/hop_probe.py MODEL_DIR   # about 3 min on one core

Written for issue 14's fourth training session; what it printed is in hop_probe.txt."""

import collections
import os
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.conversation import llava_prompt
from autoselect.testbed import data_v2
from autoselect.testbed.train_vlm import load_scenes

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("THREADS", 1)))
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
colours = list(data_v2.COLORS)
items = []
for path, scene in load_scenes("data/testbed-v2", "train", 2)[-3000:]:
    question = data_v2._question_of_type("color", scene, np.random.default_rng([len(items), 91]))
    if question is not None:
        counts = collections.Counter(o.color for o in scene.objects)
        items.append((path, question, counts[question.answer] == max(counts.values())))
    if len(items) == 1400:
        break
states = {"shape word": [], "answer position": []}
with torch.no_grad():
    for start in range(0, len(items), 25):
        chunk = items[start:start + 25]
        images = [Image.open(os.path.join("data/testbed-v2", p)).convert("RGB") for p, _, _ in chunk]
        texts = [llava_prompt(data_v2.image_first(q.text)) for _, q, _ in chunk]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # embeddings, then each layer
        ids = inputs["input_ids"]
        for row, (_, q, _) in enumerate(chunk):
            shape = next(s for s in data_v2.SHAPES if f" {s}?" in q.text)
            word = int((ids[row] == processor.tokenizer.convert_tokens_to_ids(shape)).nonzero()[-1])
            states["shape word"].append(torch.stack([h[row, word] for h in hidden]))
            states["answer position"].append(torch.stack([h[row, -1] for h in hidden]))
answers = torch.tensor([colours.index(q.answer) for _, q, _ in items])
majority = torch.tensor([m for _, _, m in items])
train, test = slice(0, 1000), slice(1000, len(items))
print(f"{len(items)} colour questions (train images); held out {len(items) - 1000}, of which "
      f"{int((~majority[test]).sum())} answered by a colour that is not the scene's most common")
for place, values in states.items():
    values = torch.stack(values)  # (questions, layers + 1, hidden)
    for layer in range(values.shape[1]):
        x = values[:, layer]
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        probe = torch.nn.Linear(x.shape[1], len(colours))
        optimiser = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-2)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(probe(x[train]), answers[train])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        right = probe(x[test]).argmax(-1) == answers[test]
        print(f"{place:16s} after {'embeddings' if layer == 0 else f'layer {layer}':10s} read-out accuracy "
              f"{right.float().mean():.3f}; where the most common colour is wrong {right[~majority[test]].float().mean():.3f}",
              flush=True)
