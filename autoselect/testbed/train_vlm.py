"""Train the testbed's tiny VLM from scratch on testbed data (LLaVA conversation JSON + images).

    python -m autoselect.testbed --out data/testbed --train 20000 --val 500 --test 500
    python -m autoselect.testbed.train_vlm --data data/testbed --out checkpoints/tiny-vlm

Every parameter trains (vision tower, projector, language model): this makes the frozen VLM that
AutoSelect is later trained on. Training runs in two stages. First the vision tower alone learns to
name, for every patch, the colour and shape of the object on it (labels drawn from the scene
descriptions, `data.patch_labels`); without this, the language model's attention is spread over 576
tokens and the answer loss stays at the question prior for thousands of steps (seen here: 2,200 steps,
val accuracy 0.39). Then the whole VLM trains on the answers. The questions of one image are packed into one multi-turn LLaVA
conversation, so the vision tower runs once per image; the loss is the next-token loss on answer
tokens (and the </s> after each). Validation accuracy (greedy one-word answer) is measured every
--eval-every steps; the best checkpoint is saved with save_pretrained (safetensors) beside the
processor, and every line of the log goes to train_log.jsonl in --out.
"""

import argparse
import collections
import json
import math
import os
import random
import sys
import time

import torch

from . import vlm

IGNORE_INDEX = -100


def load_records(data_dir: str, split: str):
    with open(os.path.join(data_dir, f"{split}.json")) as handle:
        return json.load(handle)


def group_by_image(records):
    """{image path: [(question, answer, type), ...]} from LLaVA single-turn records."""
    groups = collections.OrderedDict()
    for record in records:
        human, gpt = record["conversations"][:2]
        question = human["value"].replace("<image>", "").strip()
        groups.setdefault(record["image"], []).append((question, gpt["value"], record.get("type", "")))
    return groups


class Encoder:
    """Token ids and labels of packed conversations, with each <image> expanded to its 576 tokens."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.eos_id = self.tokenizer.eos_token_id

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def conversation(self, turns):
        """turns: [(question, answer)]; the image comes with the first question, as in LLaVA."""
        ids, labels = [], []
        for index, (question, answer) in enumerate(turns):
            head = f"USER: <image>\n{question} ASSISTANT:" if index == 0 else f"USER: {question} ASSISTANT:"
            head_ids = []
            for token in self._ids(head):
                head_ids += [self.image_token_id] * vlm.NUM_PATCHES if token == self.image_token_id else [token]
            answer_ids = self._ids(answer) + [self.eos_id]
            ids += head_ids + answer_ids
            labels += [IGNORE_INDEX] * len(head_ids) + answer_ids
        return ids, labels

    def batch(self, images, conversations):
        encoded = [self.conversation(turns) for turns in conversations]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):  # left padding, as for generation
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            labels[row, width - len(ids):] = torch.tensor(labs)
            attention_mask[row, width - len(ids):] = 1
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "labels": labels}


def pretrain_vision(model, processor, data_dir, steps, batch_size, lr, seed, write, progress_factory):
    """Stage 1: per-patch colour and shape classification on the vision tower's feature layer, through
    two linear heads that are dropped afterwards."""
    from PIL import Image

    from .data import COLORS, SHAPES, Scene, patch_labels

    with open(os.path.join(data_dir, "train_scenes.json")) as handle:
        scenes = [(path, Scene.from_dict(scene)) for path, scene in json.load(handle).items()]
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    color_head, shape_head = torch.nn.Linear(hidden, 1 + len(COLORS)), torch.nn.Linear(hidden, 1 + len(SHAPES))
    parameters = list(tower.parameters()) + list(color_head.parameters()) + list(shape_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    color_index = {c: i + 1 for i, c in enumerate(COLORS)}
    shape_index = {c: i + 1 for i, c in enumerate(SHAPES)}
    generator = random.Random(seed)
    progress = progress_factory(range(1, steps + 1), desc="stage 1: vision tower")
    running = None
    for step in progress:
        picked = generator.sample(scenes, batch_size)
        images = [Image.open(os.path.join(data_dir, path)).convert("RGB") for path, _ in picked]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        colors, shapes = [], []
        for _, scene in picked:
            owner = patch_labels(scene)
            lookup_color = [0] + [color_index[o.color] for o in scene.objects]
            lookup_shape = [0] + [shape_index[o.shape] for o in scene.objects]
            colors.append(torch.tensor([lookup_color[i] for i in owner]))
            shapes.append(torch.tensor([lookup_shape[i] for i in owner]))
        features = tower(pixel_values, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        loss = (torch.nn.functional.cross_entropy(color_head(features).flatten(0, 1), torch.cat(colors)) +
                torch.nn.functional.cross_entropy(shape_head(features).flatten(0, 1), torch.cat(shapes)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        progress.set_postfix(loss=f"{running:.3f}")
        if step % 50 == 0 or step == steps:
            write({"event": "vision", "step": step, "loss": round(running, 4)})


@torch.no_grad()
def evaluate(model, processor, data_dir, records, batch_size=16):
    """Greedy one-word accuracy over single-turn records: overall and per question type."""
    from PIL import Image

    model.eval()
    tokenizer = processor.tokenizer
    correct, total = collections.Counter(), collections.Counter()
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [Image.open(os.path.join(data_dir, r["image"])).convert("RGB") for r in chunk]
        prompts = [vlm.prompt(r["conversations"][0]["value"].replace("<image>", "").strip()) for r in chunk]
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        logits = model(**batch).logits[:, -1]
        predictions = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for record, predicted in zip(chunk, predictions):
            kind = record.get("type", "all")
            total[kind] += 1
            correct[kind] += int(predicted == record["conversations"][1]["value"].lower())
    model.train()
    per_type = {k: correct[k] / total[k] for k in sorted(total)}
    return sum(correct.values()) / max(1, sum(total.values())), per_type


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m autoselect.testbed.train_vlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder written by `python -m autoselect.testbed`")
    parser.add_argument("--out", required=True, help="output folder for the model, processor and log")
    parser.add_argument("--vision-steps", type=int, default=1500, help="stage 1 steps (per-patch labels)")
    parser.add_argument("--vision-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6000, help="stage 2 steps (answers)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-records", type=int, default=600, help="validation questions per evaluation")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and keep the best) after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from PIL import Image
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    processor = vlm.build_processor()
    model = vlm.build_model(seed=args.seed, tokenizer=processor.tokenizer)
    model.train()
    encoder = Encoder(processor)
    train_groups = list(group_by_image(load_records(args.data, "train")).items())
    val_records = load_records(args.data, "val")[:args.eval_records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup) *
        0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    log_path = os.path.join(args.out, "train_log.jsonl")
    log = open(log_path, "w")

    def write(entry):
        log.write(json.dumps(entry) + "\n")
        log.flush()

    parameters = sum(p.numel() for p in model.parameters())
    write({"event": "start", "args": vars(args), "parameters": parameters, "torch": torch.__version__,
           "train_images": len(train_groups), "val_records": len(val_records)})
    start, best, order, cursor, running = time.time(), -1.0, [], 0, None
    if args.vision_steps:
        pretrain_vision(model, processor, args.data, args.vision_steps, args.vision_batch_size, args.lr, args.seed,
                        write, lambda it, desc: tqdm(it, desc=desc, dynamic_ncols=True))
    progress = tqdm(range(1, args.steps + 1), desc="stage 2: tiny VLM", dynamic_ncols=True)
    for step in progress:
        if cursor + args.batch_size > len(order):
            order, cursor = random.sample(range(len(train_groups)), len(train_groups)), 0
        picked = [train_groups[i] for i in order[cursor:cursor + args.batch_size]]
        cursor += args.batch_size
        images = [Image.open(os.path.join(args.data, path)).convert("RGB") for path, _ in picked]
        conversations = [[(q, a) for q, a, _ in random.sample(turns, len(turns))] for _, turns in picked]
        loss = model(**encoder.batch(images, conversations)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.set_postfix(loss=f"{running:.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        minutes = (time.time() - start) / 60
        out_of_time = args.max_minutes is not None and minutes > args.max_minutes
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            accuracy, per_type = evaluate(model, processor, args.data, val_records)
            write({"event": "eval", "step": step, "minutes": round(minutes, 2), "loss": round(running, 4),
                   "val_accuracy": round(accuracy, 4), "val_per_type": {k: round(v, 4) for k, v in per_type.items()}})
            progress.write(f"step {step}: loss {running:.3f}, val accuracy {accuracy:.3f} {per_type}")
            if accuracy > best:
                best = accuracy
                model.save_pretrained(args.out)
                processor.save_pretrained(args.out)
        elif step % 50 == 0:
            write({"event": "train", "step": step, "minutes": round(minutes, 2), "loss": round(running, 4)})
        if out_of_time:
            write({"event": "stop", "reason": f"--max-minutes {args.max_minutes} reached", "step": step})
            break
    write({"event": "end", "best_val_accuracy": best, "minutes": round((time.time() - start) / 60, 2)})
    log.close()
    print(f"best validation accuracy {best:.4f}; model, processor and log in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
