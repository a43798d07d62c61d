"""Probe how fast stage 2's language model learns, on the curriculum's view (object patches only).

    python weights/tiny-vlm-v2-wip/diagnostics/stage2_probe.py NAME [--question-first] [train_vlm options]

Runs 400 steps of train_vlm's stage 2 (testbed v2, tower from checkpoints/tiny-vlm-v2-stage1, features
from --feature-cache checkpoints/feature-cache, a 400-step schedule, warm-up 50, the language model
shown every object patch and no background) and every 100 steps prints: NAME, step, seconds, running
loss, first-token accuracy on the first 400 validation questions seen the same way, and that accuracy
per question type. The extra options are train_vlm's (e.g. --turns 6 --sizes '{"text_heads": 4}').
--question-first puts the question before the image (v1's prompt) in training and in the probe.
Written for issue 14's second training session; results in results.txt beside this file (2 CPU cores,
2026-11-26)."""

import collections
import os
import sys
import time

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoselect.testbed import train_vlm, vlm

name, extra = sys.argv[1], [a for a in sys.argv[2:] if a != "--question-first"]
question_first = "--question-first" in sys.argv[2:]
if question_first:
    vlm.image_question = lambda q, version=1: f"{q}\n<image>"  # train_vlm builds its prompts through this
steps = 400
argv = ["--version", "2", "--data", "data/testbed-v2", "--out", f"checkpoints/probe-{name}", "--tower-from",
        "checkpoints/tiny-vlm-v2-stage1", "--vision-steps", "0", "--steps", str(steps), "--threads", "2",
        "--feature-cache", "checkpoints/feature-cache", "--background-start", "0.0", "--ramp-from", "1.0",
        "--full-from", "1.0", "--warmup", "50"] + extra
args = train_vlm.resolve_defaults(train_vlm.build_parser().parse_args(argv))
run = train_vlm.setup(args)
paths = [p for p, _ in run.train_groups]
run.cache = train_vlm.build_feature_cache(run.model, run.processor, args.data, paths, args.feature_cache)
run.cache_rows = {p: i for i, p in enumerate(paths)}
trainer = train_vlm.stage2_trainer(run)
val = run.val_records[:400]
val_scenes = dict(train_vlm.load_scenes(args.data, "val", 2))
val_images = sorted({r["image"] for r in val})
features = {}
with torch.no_grad():
    for i in range(0, len(val_images), 32):
        chunk = val_images[i:i + 32]
        pixels = run.processor.image_processor([Image.open(os.path.join(args.data, p)).convert("RGB") for p in chunk],
                                               return_tensors="pt")["pixel_values"]
        features.update(zip(chunk, train_vlm.tower_features(run.model, pixels)))
generator = torch.Generator().manual_seed(5)
shown = {p: train_vlm.curriculum_tokens(val_scenes[p], 0.0, generator, 2) for p in val_images}


def question(record):
    text = record["conversations"][0]["value"]
    return text.replace("<image>", "").strip() + "\n<image>" if question_first else text


@torch.no_grad()
def evaluate():
    model = run.model
    model.eval()
    hits, counts = collections.Counter(), collections.Counter()
    for i in range(0, len(val), 50):
        chunk = val[i:i + 50]
        inputs = run.collator.pad([run.collator.encode_turns([(question(r), None)], len(shown[r["image"]]),
                                                             answers=False) for r in chunk])
        inputs.pop("labels", None)
        projected = model.model.multi_modal_projector(torch.stack([features[r["image"]] for r in chunk]))
        kept = [x[shown[r["image"]]] for x, r in zip(projected, chunk)]
        logits = model(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=kept)},
                       logits_to_keep=1).logits[:, -1]
        for record, predicted in zip(chunk, logits.argmax(-1)):
            answer = run.processor.tokenizer(record["conversations"][1]["value"], add_special_tokens=False)["input_ids"][0]
            hits[record["type"]] += int(predicted == answer)
            counts[record["type"]] += 1
    model.train()
    return round(sum(hits.values()) / sum(counts.values()), 3), {k: round(hits[k] / counts[k], 2) for k in counts}


start = time.time()
for index in trainer:
    step = index + 1
    loss = train_vlm.stage2_loss(run, step, 0.0)
    loss.backward()
    trainer.step(index, loss.item())
    if step % 100 == 0:
        print(name, step, round(time.time() - start, 1), round(trainer.running, 3), *evaluate(), flush=True)
