"""Can one attention layer look an object up by its shape in the frozen tower's features? A probe apart
from the language model: a learnt query per asked shape (or colour), keys and values linear in the
tower's 576 cached features (the stage-2 feature cache), softmax over the 576 patches, a linear read-out
of the answer. Trained on the training images' generated questions ("What color is the {shape}?":
lookup by shape; "What shape is the {color} object?": lookup by colour, the control the language model
already passes), scored on 2,000 held-out training images' questions.

    python weights/tiny-vlm-v2-wip/diagnostics/lookup_probe.py CACHE.npy [steps [kinds]]   # ~3 min, one thread

If the probe learns the lookup by shape quickly, the features hold what the language model needs and its
failure is one of optimisation; if it stalls at the majority colour's score too, the tower's features are
the limit. Written for issue 14's fourth training session; what it printed is in lookup_probe.txt."""

import collections
import os
import sys

import numpy as np
import torch

from autoselect.testbed import data_v2
from autoselect.testbed.train_vlm import load_scenes

torch.manual_seed(0)
torch.set_num_threads(1)
cache = np.load(sys.argv[1], mmap_mode="r")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
scenes = [scene for _, scene in load_scenes("data/testbed-v2", "train", 2)]  # cache row i = train image i
assert len(scenes) == cache.shape[0]
held_out = 2000


def questions(kind):
    """(image row, key index, answer index) of one generated question per image (None skipped)."""
    keys, answers = (data_v2.SHAPES, data_v2.COLORS) if kind == "color" else (data_v2.COLORS, data_v2.SHAPES)
    out = []
    for row, scene in enumerate(scenes):
        question = data_v2._question_of_type(kind, scene, np.random.default_rng([row, 77]))
        if question is None:
            continue
        key = next(k for k in keys if f" {k}" in question.text.replace("?", " "))
        out.append((row, list(keys).index(key), list(answers).index(question.answer), scene))
    return out, len(keys), len(answers)


# Variants (environment): NORM=layer|rms (LayerNorm, the default, or the language model's RMSNorm without
# centring), WIDTH (the head size, 64), THETA (rotary base: 0 = no rotary, the default; else the query at
# the language model's answer position, 590, and the keys at the image tokens' positions, 5 to 580).
# PROJECTOR=1: the features go through LLaVA's projector first (Linear, GELU, Linear to 128, trained here).
NORM, WIDTH, THETA = os.environ.get("NORM", "layer"), int(os.environ.get("WIDTH", 64)), float(os.environ.get("THETA", 0))
PROJECTOR = os.environ.get("PROJECTOR", "0") == "1"
print(f"variant: NORM={NORM} WIDTH={WIDTH} THETA={THETA:g} PROJECTOR={int(PROJECTOR)}", flush=True)


def rotate(x, positions):
    """Llama's rotary embedding (rotate_half form) of x (..., n, WIDTH) at `positions` (n,)."""
    half = x.shape[-1] // 2
    angles = positions[:, None].float() * THETA ** (-torch.arange(half).float() / half)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Lookup(torch.nn.Module):
    def __init__(self, keys, answers, hidden=cache.shape[2], width=WIDTH):
        super().__init__()
        self.projector = (torch.nn.Sequential(torch.nn.Linear(hidden, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
                          if PROJECTOR else torch.nn.Identity())
        hidden = 128 if PROJECTOR else hidden
        self.norm = torch.nn.LayerNorm(hidden) if NORM == "layer" else torch.nn.RMSNorm(hidden)
        self.query = torch.nn.Embedding(keys, width)
        self.key, self.value = torch.nn.Linear(hidden, width), torch.nn.Linear(hidden, width)
        self.out = torch.nn.Linear(width, answers)

    def forward(self, features, key):
        features = self.norm(self.projector(features))
        query, keys = self.query(key), self.key(features)
        if THETA:
            query = rotate(query[:, None], torch.tensor([590]))[:, 0]
            keys = rotate(keys, torch.arange(5, 5 + keys.shape[1]))
        logits = torch.einsum("bd,bnd->bn", query, keys) / self.key.out_features ** 0.5
        attention = logits.softmax(-1)
        return self.out(torch.einsum("bn,bnd->bd", attention, self.value(features))), attention


for kind in (sys.argv[3].split(",") if len(sys.argv) > 3 else ("shape", "color")):
    data, keys, answers = questions(kind)
    train, test = [q for q in data if q[0] < len(scenes) - held_out], [q for q in data if q[0] >= len(scenes) - held_out]
    probe = Lookup(keys, answers)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)

    def batch(items):
        rows = [q[0] for q in items]
        order = np.argsort(rows)
        features = torch.from_numpy(np.stack([cache[rows[i]] for i in order]).astype(np.float32))
        return (features, torch.tensor([items[i][1] for i in order]), torch.tensor([items[i][2] for i in order]),
                [items[i][3] for i in order])

    def score():
        right, majority = 0, 0.0
        with torch.no_grad():
            for start in range(0, len(test), 256):
                features, key, answer, chunk = batch(test[start:start + 256])
                right += int((probe(features, key)[0].argmax(-1) == answer).sum())
                for scene, a in zip(chunk, answer.tolist()):
                    counts = collections.Counter(getattr(o, kind) for o in scene.objects)
                    top = [k for k, v in counts.items() if v == max(counts.values())]
                    name = list(data_v2.COLORS if kind == "color" else data_v2.SHAPES)[a]
                    majority += (name in top) / len(top)
        return right / len(test), majority / len(test)

    for step in range(1, steps + 1):
        features, key, answer, _ = batch([train[i] for i in rng.integers(len(train), size=64)])
        loss = torch.nn.functional.cross_entropy(probe(features, key)[0], answer)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 250 == 0 or step == steps:
            accuracy, majority = score()
            print(f"{kind} question (lookup by {'shape' if kind == 'color' else 'colour'}): step {step} loss "
                  f"{loss.item():.3f} held-out accuracy {accuracy:.3f} (most common {kind}: {majority:.3f}; "
                  f"{len(test)} questions)", flush=True)
