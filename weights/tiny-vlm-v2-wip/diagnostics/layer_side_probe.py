"""Which layer of the frozen vision tower keeps an object's side? For the objects of the first 3,000
training scenes that lie in one half (`data._side`), the mean over the object's patches of every hidden
state of the tower (the embeddings, then each layer; the model uses `vision_feature_layer`), probed as in
side_probe.py (a logistic regression and one hidden layer of 256, fitted on the first 75% of the objects
in scene order, scored on the rest). Also the object's digit (marked objects, 10 classes, linear) as a
check that a layer still holds the content.

    python weights/tiny-vlm-v2-wip/diagnostics/layer_side_probe.py MODEL_FOLDER [SCENES]"""

import os
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.testbed import data as v1
from autoselect.testbed import data_v2
from autoselect.testbed.train_vlm import load_scenes

sys.path.insert(0, os.path.dirname(__file__))
from probe_tools import classify  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(2)
folder = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
scenes = load_scenes("data/testbed-v2", "train", 2)[:count]
layers = model.config.vision_config.num_hidden_layers + 1
rows = {key: ([[] for _ in range(layers)], []) for key in ("x", "y", "digit")}


with torch.no_grad():
    for start in range(0, len(scenes), 32):
        batch = scenes[start:start + 32]
        images = [Image.open(os.path.join("data/testbed-v2", path)).convert("RGB") for path, _ in batch]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        for i, (_, scene) in enumerate(batch):
            owner = torch.as_tensor(data_v2.patch_labels(scene))
            for number, obj in enumerate(scene.objects, start=1):
                patches = (owner == number).nonzero().flatten() + 1  # hidden states hold CLS first
                if len(patches) == 0:
                    continue
                labels = {axis: v1._side(obj, axis) for axis in ("x", "y")}
                labels["digit"] = obj.mark
                for key, label in labels.items():
                    if label is None:
                        continue
                    for layer in range(layers):
                        rows[key][0][layer].append(states[layer][i, patches].mean(0))
                    rows[key][1].append(int(label) if key == "digit" else int(label in ("right", "bottom")))

print(f"# python {' '.join(sys.argv)}; vision_feature_layer = {model.config.vision_feature_layer}")
for key, name, classes in (("x", "left/right", 2), ("y", "top/bottom", 2), ("digit", "digit", 10)):
    label = torch.tensor(rows[key][1])
    train = int(0.75 * len(label))
    results = []
    for layer in range(layers):
        x = torch.stack(rows[key][0][layer])
        results.append(f"{layer}: {classify(x, label, train, classes):.3f}"
                       + (f" / {classify(x, label, train, classes, hidden=256):.3f}" if key != "digit" else ""))
    print(f"{name} ({len(label)} objects; hidden state: linear / one hidden layer): " + ", ".join(results))
