"""Where a v2 VLM's language model looks when asked "What color is the {shape}?": for the first 60
validation colour questions, the attention mass (averaged over questions) that each layer and head puts
on the asked object's patches and on the other objects' patches, from two query positions: the shape
word of the question (where a first-layer lookup by shape can happen) and the last position (where the
answer is predicted). The asked object covers about 1% of the 576 patches, so uniform attention would
put about 0.01 on it.

    python weights/tiny-vlm-v2-wip/diagnostics/colour_attention.py MODEL_DIR   # about 30 s on 2 cores

Written for issue 14's third training session; what it printed is in colour_attention.txt beside it."""

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
records = [r for r in load_records("data/testbed-v2", "val") if r["type"] == "color"][:60]
scenes = dict(load_scenes("data/testbed-v2", "val", 2))
text_config = model.config.text_config
shape_ = (2, text_config.num_hidden_layers, text_config.num_attention_heads)
on_asked, on_others, share = np.zeros(shape_), np.zeros(shape_), 0.0
for record in records:
    scene = scenes[record["image"]]
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    shape = re.search(r"the (\w+)\?", question).group(1)
    asked = 1 + next(i for i, o in enumerate(scene.objects) if o.shape == shape)
    owner = np.asarray(data_v2.patch_labels(scene)).reshape(-1)  # 0: background, i + 1: object i
    image = Image.open(f"data/testbed-v2/{record['image']}").convert("RGB")
    inputs = processor(images=image, text=vlm.prompt(question, version=2), return_tensors="pt")
    ids = inputs["input_ids"][0]
    patches = (ids == model.config.image_token_index).nonzero().flatten()
    word = int((ids == processor.tokenizer.convert_tokens_to_ids(shape)).nonzero().flatten()[-1])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    for p, position in enumerate((word, len(ids) - 1)):
        for layer, attention in enumerate(attentions):
            weights = attention[0, :, position, patches].numpy()
            on_asked[p, layer] += weights[:, owner == asked].sum(1)
            on_others[p, layer] += weights[:, (owner > 0) & (owner != asked)].sum(1)
    share += float((owner == asked).mean())
print(f"asked object's share of the 576 patches: {share / len(records):.4f}")
for p, name in enumerate(("the shape word", "the last position")):
    print(f"from {name}, rows = layers, columns = heads; on the asked object:")
    print(np.round(on_asked[p] / len(records), 3))
    print("on the other objects:")
    print(np.round(on_others[p] / len(records), 3))
