"""Where does the horizontal relation get lost in the language model? For yes/no relation questions about
pairs of named objects of training scenes ("Is the red star left of the blue circle?", asked with the
pair's actual direction or its opposite, as the generator asks them), the hidden state at the answer
position after every language-model layer (0: the question's last token as embedded), probed on held-out
questions (the first 75% in scene order fit, the rest score) for:
  answer   yes / no (what the model must say)
  order    whether A comes first on the asked axis (A left of / above B), whatever direction is asked
  A, B     each object's centre on the axis (column or row in patches): R^2 of a ridge regression
Horizontal pairs (left of / right of) and vertical ones (above / below) apart. If A's and B's places are
there but the order is not, the language model fails to compare them; if the places are not there, it
fails to read them from the looked-up tokens. Also the model's own accuracy on the same questions.

With FORM "order" the questions ask the order as a word instead ("Is the red star left or right of the
blue circle?", `--recall-as every+relation+order`; answer: the order), for a model trained on them.

    python weights/tiny-vlm-v2-wip/diagnostics/relation_probe.py MODEL_FOLDER [SCENES] [THREADS] [FORM]"""

import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.testbed import data_v2, vlm
from autoselect.testbed.train_vlm import load_scenes, order_question

sys.path.insert(0, os.path.dirname(__file__))
from probe_tools import classify, related_pairs  # noqa: E402

folder = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
form = sys.argv[4] if len(sys.argv) > 4 else "yes/no"
torch.manual_seed(0)
rng = np.random.default_rng(0)
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
scenes = load_scenes("data/testbed-v2", "train", 2)[:count]
AXES = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}
# the two answer words each question's answer 1 / 0 stands for: yes / no, or the order's first / second word
WORDS = {(f, axis): processor.tokenizer.convert_tokens_to_ids(list(pair)) for f, axis, pair in (
    ("yes/no", "horizontal", ("yes", "no")), ("yes/no", "vertical", ("yes", "no")),
    ("order", "horizontal", ("left", "right")), ("order", "vertical", ("above", "below")))}

questions = []  # (scene index, text, axis, answer, order, place A, place B)
for index, (_, scene) in enumerate(scenes):
    for a, b, actual in related_pairs(scene):
        axis = next(name for name, pair in AXES.items() if actual in pair)
        asked = actual if rng.random() < 0.5 else data_v2.OPPOSITE[actual]
        first = actual in ("left of", "above")
        coordinate = "x" if axis == "horizontal" else "y"
        places = [getattr(o, coordinate) / 14.0 for o in (a, b)]
        if form == "order":  # the order as a word: the answer is the order
            text, answer = order_question(a, b, actual)[0], int(first)
        else:
            text, answer = f"Is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?", int(asked == actual)
        questions.append((index, text, axis, answer, int(first), *places))

layers = model.config.text_config.num_hidden_layers + 1
states = [[] for _ in range(layers)]
predicted = []
start = time.time()
with torch.no_grad():
    for chunk in range(0, len(questions), 16):
        batch = questions[chunk:chunk + 16]
        images = [Image.open(os.path.join("data/testbed-v2", scenes[q[0]][0])).convert("RGB") for q in batch]
        texts = [vlm.prompt(q[1], version=2) for q in batch]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states  # left padding: the last position is every prompt's answer position
        for layer in range(layers):
            states[layer].append(hidden[layer][:, -1].float())
        for q, last in zip(batch, out.logits[:, -1]):
            first_word, second_word = WORDS[(form, q[2])]
            predicted.append(int(last[first_word] > last[second_word]))


def fit_ridge(x, y, train, penalty=1.0):
    """Held-out R^2 of a ridge regression (standardised inputs)."""
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    a = x[:train]
    w = torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1]), a.T @ y[:train])
    residual = y[train:] - x[train:] @ w
    return float(1 - residual.pow(2).mean() / y[train:].var())


print(f"# python {' '.join(sys.argv)}; {len(questions)} questions of {len(scenes)} training scenes, "
      f"{time.time() - start:.0f} s forward")
for axis in AXES:
    rows = [i for i, q in enumerate(questions) if q[2] == axis]
    train = int(0.75 * len(rows))
    pick = torch.tensor(rows)
    answer = torch.tensor([questions[i][3] for i in rows])
    order = torch.tensor([questions[i][4] for i in rows])
    place_a = torch.tensor([questions[i][5] for i in rows], dtype=torch.float32)
    place_b = torch.tensor([questions[i][6] for i in rows], dtype=torch.float32)
    model_right = np.mean([predicted[i] == questions[i][3] for i in rows[train:]])
    print(f"{axis}: {len(rows)} questions ({len(rows) - train} held out); the model's own answers "
          f"{model_right:.3f} on the held-out ones")
    for layer in range(layers):
        x = torch.cat(states[layer])[pick]
        said, first = classify(x, answer, train, 2, steps=400), classify(x, order, train, 2, steps=400)
        print(f"  layer {layer}: answer {said:.3f}, order {first:.3f}, "
              f"A's place R^2 {fit_ridge(x, place_a, train):.3f}, B's place R^2 {fit_ridge(x, place_b, train):.3f}")
