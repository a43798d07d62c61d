"""Teacher-forced first-token accuracy of a tiny v2 VLM on validation questions, shown every one of the
576 visual tokens and shown the curriculum's tokens (every object patch and 5% of the background,
`train_vlm.curriculum_tokens`): whether a model trained on the curriculum carries over to all tokens.

    python weights/tiny-vlm-v2-wip/diagnostics/token_count_gap.py MODEL_FOLDER [questions]"""

import json
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoselect.testbed import train_vlm
from autoselect.training.data import ConversationCollator

torch.set_num_threads(2)
folder, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 96
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
collator = ConversationCollator(processor, "data/testbed-v2")
records = json.load(open("data/testbed-v2/val.json"))[:count]
scenes = dict(train_vlm.load_scenes("data/testbed-v2", "val", 2))
generator = torch.Generator().manual_seed(0)
for fraction in (1.0, 0.05):
    hits = 0
    for start in range(0, count, 16):
        chunk = records[start:start + 16]
        images = [Image.open(f"data/testbed-v2/{r['image']}").convert("RGB") for r in chunk]
        shown = [train_vlm.curriculum_tokens(scenes[r["image"]], fraction, generator, 2) for r in chunk]
        turns = [[(r["conversations"][0]["value"], r["conversations"][1]["value"])] for r in chunk]
        inputs = collator.pad([collator.encode_turns(t, len(s)) for t, s in zip(turns, shown)])
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels, return_dict=True)
            features = features.pooler_output if hasattr(features, "pooler_output") else features
            features = [f[s] for f, s in zip(features, shown)]
            labels = inputs.pop("labels")
            encoded = {"image": BaseModelOutputWithPooling(pooler_output=features)}
            logits = model(**inputs, mm_encoder_outputs=encoded).logits
        for row in range(len(chunk)):
            first = (labels[row] >= 0).nonzero()[0].item()
            hits += int(logits[row, first - 1].argmax() == labels[row, first])
    tokens = "all 576 tokens" if fraction >= 1 else f"object patches + {fraction:.0%} of the background"
    print(f"{folder}: {tokens}: first-token accuracy {hits / count:.3f} ({count} questions)")
