"""Where a v2 VLM's language model looks when asked "Is the {colour} {shape} on the left or the right?":
for the left/right questions among the first 300 validation questions, the attention mass (averaged over
questions) that each layer and head puts, from the last position (where the answer is predicted), on the
asked object's patches and on the other objects' patches; beside it the same for the first 60 colour
questions ("What color is the {shape}?", answered at 0.99) and the first 60 digit questions ("What digit
is on the {colour} {shape}?", 0.91: named as the location questions name), the lookups that work. Uniform attention
would put about the asked object's share of the 576 patches on it.

    python weights/tiny-vlm-v2-wip/diagnostics/location_attention.py MODEL_DIR   # about 2 min on 2 cores

Written for issue 14's tenth session; what it printed is in location_attention.txt beside it."""

import re
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.testbed import data_v2, vlm
from autoselect.testbed.train_vlm import load_records, load_scenes

torch.set_num_threads(2)
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
records = load_records("data/testbed-v2", "val")
scenes = dict(load_scenes("data/testbed-v2", "val", 2))
text_config = model.config.text_config
kinds = {
    "left/right": ([r for r in records[:300] if "on the left or the right" in r["conversations"][0]["value"]],
                   r"the (\w+) (\w+) on the left"),
    "colour": ([r for r in records if r["type"] == "color"][:60], r"the (\w+)\?"),
    "digit": ([r for r in records if r["type"] == "text"][:60], r"on the (\w+) (\w+)\?"),
}
for kind, (chosen, pattern) in kinds.items():
    on_asked = np.zeros((text_config.num_hidden_layers, text_config.num_attention_heads))
    on_others, share = np.zeros_like(on_asked), 0.0
    for record in chosen:
        scene = scenes[record["image"]]
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        words = re.search(pattern, question).groups()
        colour, shape = (None, words[0]) if len(words) == 1 else words
        asked = 1 + next(i for i, o in enumerate(scene.objects)
                         if o.shape == shape and (colour is None or o.color == colour))
        owner = np.asarray(data_v2.patch_labels(scene)).reshape(-1)  # 0: background, i + 1: object i
        image = Image.open(f"data/testbed-v2/{record['image']}").convert("RGB")
        inputs = processor(images=image, text=vlm.prompt(question, version=2), return_tensors="pt")
        ids = inputs["input_ids"][0]
        patches = (ids == model.config.image_token_index).nonzero().flatten()
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        for layer, attention in enumerate(attentions):
            weights = attention[0, :, len(ids) - 1, patches].numpy()
            on_asked[layer] += weights[:, owner == asked].sum(1)
            on_others[layer] += weights[:, (owner > 0) & (owner != asked)].sum(1)
        share += float((owner == asked).mean())
    print(f"{kind}: {len(chosen)} questions; asked object's share of the patches {share / len(chosen):.4f}")
    print("  from the last position, rows = layers, columns = heads; on the asked object:")
    print(np.round(on_asked / len(chosen), 3))
    print("  on the other objects:")
    print(np.round(on_others / len(chosen), 3))
