"""Is the lookup by shape hard for a small causal transformer when the image comes first? A model of the
tiny VLM's language model (Llama blocks: RMSNorm, rotary attention, SwiGLU; width 128, 4 heads of 32)
over the frozen tower's cached features (an MLP projector, as LLaVA's) and the question's words, trained
on one task only: "What color is the {shape}?" (the generator's questions on training images). With the
image first (LLaVA-1.5's prompt) the image tokens cannot see the question, so the answer needs two hops
(find the shape word, then the patches of that shape); with the question first (v1's prompt) each image
token can see the asked shape and one hop suffices. To keep it fast each image gives its object patches
and 24 random background patches, in image order (the stage-2 curriculum's tokens).

    python weights/tiny-vlm-v2-wip/diagnostics/two_hop_probe.py CACHE.npy ORDER LAYERS [steps]
    # ORDER: image-first | question-first; about 5 min for 600 steps on two cores
    TEXT_STEPS=300 python ...   # text-only pretraining first (see TEXT_STEPS below)

Written for issue 14's fourth training session; what it printed is in two_hop_probe.txt."""

import collections
import os
import sys

import numpy as np
import torch

from autoselect.testbed import data_v2
from autoselect.testbed.train_vlm import load_scenes
from llama_parts import Block  # noqa: E402 (this folder; python puts a script's folder on sys.path)

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
cache = np.load(sys.argv[1], mmap_mode="r")
order, layers = sys.argv[2], int(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 600
assert order in ("image-first", "question-first")
scenes = [scene for _, scene in load_scenes("data/testbed-v2", "train", 2)]
colours, shapes = list(data_v2.COLORS), list(data_v2.SHAPES)
words = ["<pad>", "user", ":", "what", "color", "is", "the", "?", "assistant"] + shapes + colours
# TEXT_STEPS (environment, default 0): steps of text-only pretraining first, the same questions with the
# scene written out in words ("red ring blue star ...", objects left to right) where the image goes, so
# that the language model has its copying heads before it sees an image (as LLaVA's pretrained LLM has).
TEXT_STEPS = int(os.environ.get("TEXT_STEPS", 0))
# BATCH (32) and LR (2e-3): the batch size and the learning rate (environment).
BATCH, LR = int(os.environ.get("BATCH", 32)), float(os.environ.get("LR", 2e-3))
WIDTH, HEADS, BACKGROUND = 128, 4, 24


def example(row, rng):
    scene = scenes[row]
    question = data_v2._question_of_type("color", scene, rng)
    if question is None:
        return None
    labels = data_v2.patch_labels(scene)
    background = np.flatnonzero(labels == 0)
    keep = np.sort(np.concatenate([np.flatnonzero(labels > 0), rng.choice(background, BACKGROUND, replace=False)]))
    shape = next(s for s in shapes if f" {s}?" in question.text)
    text = [words.index(w) for w in ("what", "color", "is", "the", shape, "?")]
    counts = collections.Counter(o.color for o in scene.objects)
    return keep, text, colours.index(question.answer), counts[question.answer] == max(counts.values())


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.projector = torch.nn.Sequential(torch.nn.Linear(cache.shape[2], WIDTH), torch.nn.GELU(),
                                             torch.nn.Linear(WIDTH, WIDTH))
        self.embed = torch.nn.Embedding(len(words), WIDTH)
        self.blocks = torch.nn.ModuleList(Block(WIDTH, HEADS) for _ in range(layers))
        self.norm, self.head = torch.nn.RMSNorm(WIDTH), torch.nn.Linear(WIDTH, len(colours))

    def forward(self, batch, in_words=False):
        sequences = []
        for keep, text, _, _, features in batch:
            image = self.embed(features) if in_words else self.projector(features)
            prompt = self.embed(torch.tensor(text))
            tail = self.embed(torch.tensor([words.index("assistant"), words.index(":")]))
            head = self.embed(torch.tensor([words.index("user"), words.index(":")]))
            parts = [head, image, prompt, tail] if order == "image-first" else [head, prompt, image, tail]
            sequences.append(torch.cat(parts))
        length = max(len(s) for s in sequences)
        x = torch.stack([torch.nn.functional.pad(s, (0, 0, length - len(s), 0)) for s in sequences])  # left pad
        valid = torch.stack([torch.arange(length) >= length - len(s) for s in sequences])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = (causal[None] & valid[:, None, :])[:, None]
        positions = torch.arange(length)
        for block in self.blocks:
            x = block(x, positions, mask)
        return self.head(self.norm(x[:, -1]))


rng = np.random.default_rng(0)
held_out = [e + (torch.from_numpy(cache[row][e[0]].astype(np.float32)),)
            for row in range(len(scenes) - 400, len(scenes))
            if (e := example(row, np.random.default_rng([row, 5]))) is not None]
model = Model()
optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 50))
print(f"order {order}, {layers} layers, {TEXT_STEPS} text-only steps, {steps} steps of {BATCH}, lr {LR:g}; "
      f"held out {len(held_out)} questions, "
      f"{sum(not e[3] for e in held_out)} where the most common colour is wrong", flush=True)


def in_words(row):
    """The scene as word ids: colour, shape of each object left to right."""
    return torch.tensor([words.index(w) for o in sorted(scenes[row].objects, key=lambda o: o.x) for w in (o.color, o.shape)])


for step in range(1 - TEXT_STEPS, steps + 1):
    batch, text_only = [], step <= 0
    while len(batch) < BATCH:
        row = int(rng.integers(len(scenes) - 400))
        if (e := example(row, rng)) is not None:
            batch.append(e + (in_words(row) if text_only else torch.from_numpy(cache[row][e[0]].astype(np.float32)),))
    loss = torch.nn.functional.cross_entropy(model(batch, text_only), torch.tensor([e[2] for e in batch]))
    if text_only and (step + TEXT_STEPS) % 100 == 0:
        print(f"text-only step {step + TEXT_STEPS} loss {loss.item():.3f}", flush=True)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()
    if step > 0 and step % 100 == 0:
        with torch.no_grad():
            right = torch.cat([model(held_out[i:i + 64]).argmax(-1) == torch.tensor([e[2] for e in held_out[i:i + 64]])
                               for i in range(0, len(held_out), 64)])
        hard = torch.tensor([not e[3] for e in held_out])
        print(f"step {step} loss {loss.item():.3f} held-out accuracy {right.float().mean():.3f}; "
              f"where the most common colour is wrong {right[hard].float().mean():.3f}", flush=True)
