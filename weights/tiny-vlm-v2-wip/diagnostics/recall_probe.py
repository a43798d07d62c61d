"""Under which training format does a small Llama learn the text-only lookup "what colour is the {shape}"
over a scene written in words? two_hop_probe.py trained one question per scene (one supervised position
per sequence) and stayed on a plateau for 4,000 steps. Here the scene ("user : red ring blue star ...",
objects left to right) is followed by questions about every object whose shape is unique in the scene,
in a random order, with the loss on every answer:

  FORMAT=single   one question, the full prompt ("what color is the star ? assistant : blue"): the old probe
  FORMAT=multi    every unique-shape object asked, each with the full prompt, a loss per answer
  FORMAT=pairs    every unique-shape object asked as "star blue" (multi-query associative recall)
  FORMAT=short    every unique-shape object asked as "star assistant : blue" (the shape, then the prompt's tail)
  FORMAT=mixed    each scene in the pairs or the multi format (half and half)
  FORMAT=then     PAIRS_STEPS (default 500) steps of pairs, then multi
  FORMAT=shortthen  the same with short instead of pairs

IMAGE=1 puts the frozen stage-1c tower's cached features where the scene's words were (through an MLP
projector, as LLaVA's): every patch an object touches and 24 random background patches, in image order
(CACHE, default checkpoints/feature-cache/train-90caaf17e275-20000.npy).

Held-out accuracy is always that of the single format's question (the first question after the scene),
so the formats are compared on the task the VLM is asked.

    FORMAT=multi LAYERS=2 STEPS=2000 python weights/tiny-vlm-v2-wip/diagnostics/recall_probe.py
    # also BATCH (32), LR (1e-3), WIDTH (128), HEADS (4), THREADS (2)

Written for issue 14's eighth session; what it printed is in recall_probe.txt."""

import collections
import os
import time

import numpy as np
import torch

from autoselect.testbed import data_v2
from autoselect.testbed.train_vlm import load_scenes
from llama_parts import Block  # noqa: E402 (this folder; python puts a script's folder on sys.path)

FORMAT = os.environ.get("FORMAT", "multi")
LAYERS, STEPS = int(os.environ.get("LAYERS", 2)), int(os.environ.get("STEPS", 2000))
BATCH, LR = int(os.environ.get("BATCH", 32)), float(os.environ.get("LR", 1e-3))
WIDTH, HEADS = int(os.environ.get("WIDTH", 128)), int(os.environ.get("HEADS", 4))
IMAGE, BACKGROUND = os.environ.get("IMAGE", "0") == "1", 24
CACHE = os.environ.get("CACHE", "checkpoints/feature-cache/train-90caaf17e275-20000.npy")
assert FORMAT in ("single", "multi", "pairs", "short", "mixed", "then", "shortthen")
PAIRS_STEPS = int(os.environ.get("PAIRS_STEPS", 500))
torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
scenes = [scene for _, scene in load_scenes("data/testbed-v2", "train", 2)]
colours, shapes = list(data_v2.COLORS), list(data_v2.SHAPES)
words = ["<pad>", "user", ":", "what", "color", "is", "the", "?", "assistant"] + shapes + colours
ID = {w: i for i, w in enumerate(words)}
cache = np.load(CACHE, mmap_mode="r") if IMAGE else None


def sequence(row, rng, fmt):
    """(scene part, tail ids, [(position in the tail whose next token is an answer, answer colour index)]):
    the scene part is word ids, or with IMAGE the features of the kept patches; the first target is the
    single format's question."""
    scene = scenes[row]
    objects = sorted(scene.objects, key=lambda o: o.x)
    counts = collections.Counter(o.shape for o in objects)
    asked = [o for o in objects if counts[o.shape] == 1]
    if not asked:
        return None
    rng.shuffle(asked)
    if IMAGE:
        labels = data_v2.patch_labels(scene)
        background = np.flatnonzero(labels == 0)
        shown = [np.flatnonzero(labels > 0), rng.choice(background, BACKGROUND, replace=False)]
        keep = np.sort(np.concatenate(shown))
        part = torch.from_numpy(cache[row][keep].astype(np.float32))
    else:
        part = torch.tensor([ID[w] for o in objects for w in (o.color, o.shape)])
    ids, targets = [], []
    for obj in asked[:1] if fmt == "single" else asked:
        if fmt == "pairs":
            ids.append(ID[obj.shape])
        elif fmt == "short":
            ids += [ID[obj.shape], ID["assistant"], ID[":"]]
        else:
            ids += [ID[w] for w in ("what", "color", "is", "the", obj.shape, "?", "assistant", ":")]
        targets.append((len(ids) - 1, colours.index(obj.color)))
        ids.append(ID[obj.color])
    return part, ids, targets


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(len(words), WIDTH)
        if IMAGE:
            self.projector = torch.nn.Sequential(torch.nn.Linear(cache.shape[2], WIDTH), torch.nn.GELU(),
                                                 torch.nn.Linear(WIDTH, WIDTH))
        self.blocks = torch.nn.ModuleList(Block(WIDTH, HEADS) for _ in range(LAYERS))
        self.norm, self.head = torch.nn.RMSNorm(WIDTH), torch.nn.Linear(WIDTH, len(colours))

    def forward(self, batch):
        """Logits at every target of every sequence (right padding: causal attention never sees it)."""
        head = self.embed(torch.tensor([ID["user"], ID[":"]]))
        sequences, rows, cols = [], [], []
        for i, (part, ids, targets) in enumerate(batch):
            scene = self.projector(part) if IMAGE else self.embed(part)
            sequences.append(torch.cat([head, scene, self.embed(torch.tensor(ids))]))
            rows += [i] * len(targets)
            cols += [2 + len(part) + p for p, _ in targets]
        length = max(len(x) for x in sequences)
        x = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, length - len(x))) for x in sequences])
        positions = torch.arange(length)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(self.norm(x[torch.tensor(rows), torch.tensor(cols)]))


def draw(rows, rng, fmt):
    out = []
    for row in rows:
        this = ("pairs" if rng.random() < 0.5 else "multi") if fmt == "mixed" else fmt
        if (s := sequence(row, rng, this)) is not None:
            out.append(s)
    return out


held_out = draw(range(len(scenes) - 1000, len(scenes)), np.random.default_rng(5), "single")
model = Model()
optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 50))
rng = np.random.default_rng(0)
print(f"{'image' if IMAGE else 'text'}, format {FORMAT}, {LAYERS} layers, width {WIDTH}, {HEADS} heads, "
      f"{STEPS} steps of {BATCH} scenes, lr {LR:g}; {len(held_out)} held-out questions", flush=True)
start = time.time()
for step in range(1, STEPS + 1):
    first = {"then": "pairs", "shortthen": "short"}.get(FORMAT)
    fmt = (first if step <= PAIRS_STEPS else "multi") if first else FORMAT
    batch = draw(rng.integers(len(scenes) - 1000, size=BATCH), rng, fmt)
    answers = torch.tensor([a for _, _, targets in batch for _, a in targets])
    loss = torch.nn.functional.cross_entropy(model(batch), answers)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()
    if step % 200 == 0:
        with torch.no_grad():
            right = torch.cat([model(chunk).argmax(-1) == torch.tensor([t[0][1] for _, _, t in chunk])
                               for chunk in (held_out[i:i + 250] for i in range(0, len(held_out), 250))])
        print(f"step {step} loss {loss.item():.3f} ({len(answers)} answers) held-out accuracy "
              f"{right.float().mean():.3f} [{time.time() - start:.0f} s]", flush=True)
