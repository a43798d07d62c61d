"""Teacher-forced accuracy of a tiny v2 VLM on train_vlm's recall turns (--recall-steps): on validation
images, "USER: <image>\\ncolor ASSISTANT: star blue ring red</s>", the share of colours predicted right
at the token after their shape's name, with all 576 visual tokens.

    python weights/tiny-vlm-v2-wip/diagnostics/recall_eval.py MODEL_FOLDER [images]"""

import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from autoselect.testbed.train_vlm import RECALL_QUESTION, load_scenes, recall_turns

torch.set_num_threads(2)
folder, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
tokenizer = processor.tokenizer
right = total = 0
with torch.no_grad():
    for i, (path, scene) in enumerate(load_scenes("data/testbed-v2", "val", 2)[:count]):
        turns = recall_turns(scene, np.random.default_rng(i))
        if not turns:
            continue
        answer = turns[0][1]
        text = f"USER: <image>\n{RECALL_QUESTION} ASSISTANT: {answer}</s>"
        inputs = processor(text=text, images=Image.open(f"data/testbed-v2/{path}").convert("RGB"), return_tensors="pt")
        logits = model(**inputs).logits[0]
        ids = inputs["input_ids"][0]
        words = answer.split()
        answer_ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
        start = len(ids) - len(answer_ids) - 1  # the answer's tokens, then </s>
        assert ids[start:start + len(answer_ids)].tolist() == answer_ids
        for j in range(0, len(words), 2):  # the logits at a shape's token predict its colour
            right += int(logits[start + j].argmax().item() == answer_ids[j + 1])
            total += 1
print(f"{folder}: recall accuracy {right / total:.3f} on {total} colours of {count} validation images")
