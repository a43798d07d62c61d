"""Is an object's side linearly readable from what the language model receives? For each object of the
first training scenes that lies in one half (`data._side`), the mean over the object's patches of (a) the
cached tower features and (b) the model's projector output on them; a logistic regression on the
objects of the first 4,000 training scenes predicts left/right and top/bottom, fitted on the first 75%
of them (in scene order) and scored on the rest; then the same with one hidden layer (`mlp_probe`).

    python weights/tiny-vlm-v2-wip/diagnostics/side_probe.py MODEL_FOLDER FEATURE_CACHE.npy"""

import sys

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from autoselect.testbed import data as v1
from autoselect.testbed import data_v2
from autoselect.testbed.train_vlm import load_scenes

torch.manual_seed(0)
torch.set_num_threads(2)
folder, cache = sys.argv[1], np.load(sys.argv[2], mmap_mode="r")
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
scenes = load_scenes("data/testbed-v2", "train", 2)[:4000]  # the cache's rows follow the train split's order
rows = {axis: ([], [], []) for axis in ("x", "y")}  # tower, projected, label
with torch.no_grad():
    for index, (_, scene) in enumerate(scenes):
        owner = torch.as_tensor(data_v2.patch_labels(scene))
        tower = torch.from_numpy(np.asarray(cache[index], dtype=np.float32))
        projected = model.model.multi_modal_projector(tower)
        for number, obj in enumerate(scene.objects, start=1):
            patches = (owner == number).nonzero().flatten()
            if len(patches) == 0:
                continue
            for axis in ("x", "y"):
                side = v1._side(obj, axis)
                if side is None:
                    continue
                rows[axis][0].append(tower[patches].mean(0))
                rows[axis][1].append(projected[patches].mean(0))
                rows[axis][2].append(float(side in ("right", "bottom")))


def probe(x, y, train):
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        optimiser.zero_grad()
        fit = torch.nn.functional.binary_cross_entropy_with_logits(x[:train] @ w + b, y[:train])
        loss = fit + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return float((((x[train:] @ w + b) > 0).float() == y[train:]).float().mean())


def mlp_probe(x, y, train, steps=600):
    """The same with one hidden layer of 256 (Adam, full batch): is the side there, if not linearly?"""
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x[:train]).squeeze(1), y[:train]).backward()
        optimiser.step()
    with torch.no_grad():
        return float(((net(x[train:]).squeeze(1) > 0).float() == y[train:]).float().mean())


for axis, name in (("x", "left/right"), ("y", "top/bottom")):
    tower, projected, label = (torch.stack(rows[axis][0]), torch.stack(rows[axis][1]), torch.tensor(rows[axis][2]))
    train = int(0.75 * len(label))
    majority = max(label[train:].mean(), 1 - label[train:].mean())
    print(f"{name}: {len(label)} objects, held-out accuracy from the tower's features "
          f"{probe(tower, label, train):.3f}, from the projector's output {probe(projected, label, train):.3f} "
          f"(majority {majority:.3f}); with a hidden layer {mlp_probe(tower, label, train):.3f} and "
          f"{mlp_probe(projected, label, train):.3f}")
