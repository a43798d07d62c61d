"""Train the testbed's tiny VLM from scratch on testbed data (LLaVA conversation JSON + images).

    python -m autoselect.testbed --out data/testbed --train 20000 --val 500 --test 500
    python -m autoselect.testbed.train_vlm --data data/testbed --out checkpoints/tiny-vlm
    python -m autoselect.testbed --version 2 --out data/testbed-v2 ...   # testbed v2 (see below)
    python -m autoselect.testbed.train_vlm --version 2 --data data/testbed-v2 --out checkpoints/tiny-vlm-v2 --resume

Every parameter of the VLM is trained here (vision tower, projector, language model): this makes the
frozen VLM that AutoSelect is later trained on. Training runs in two stages.

Stage 1 trains the vision tower alone to label every patch through linear heads on its feature layer
(dropped afterwards): the colour and shape of the object on the patch (0 = background), whether the
object's centre lies in it, and the patch's row and column (labels from the scene descriptions,
`data.patch_labels`). Without it the answer loss stays at the question prior for thousands of steps
(measured: 2,200 steps, val accuracy 0.39). Per-patch shape needs context across patches and is the
slow part (val object patches: 0.26 after 200 steps, 0.71 after 800).

Stage 2 trains the projector and the language model on the answers with the tower frozen (--tower-lr 0,
the default: stage 1's features stay as they are, and no backward runs through the tower). Each sample
is one image with --turns of its questions (the data's, plus --extra-questions more drawn from the scene
description, deterministic from --seed and the step), the question before the image (vlm.prompt); the
loss is the next-token loss on answer tokens (and the </s> after each). Recall turns (`recall_turns`:
--recall-steps first, --recall-fraction of the samples after, --recall-as their form) ask every object of
unique shape for its colour, which a language model trained from scratch needs to learn the lookup by
shape (weights/tiny-vlm-v2-wip/README.md, eighth session). A curriculum shows the language
model every patch an object touches but only a fraction of the background patches (--background-start,
rising linearly from --ramp-from to --full-from of the steps, then every token): with all 576 tokens from
the start the model stayed near the question prior (image first, 8 questions per image: val 0.52 after
1,000 steps, colour questions at chance; question first: 0.43 after 750 steps). The last part of stage 2
and every evaluation use all 576 tokens, so the result is an ordinary full-token VLM; the curriculum does
make it used to shorter visual sequences, which helps every pruning method alike (documented in
weights/tiny-vlm/README.md). Validation accuracy (all tokens) is measured every --eval-every steps by the
package's one evaluator, `evaluation.accuracy_of` (greedy generate(), the answer's first word against the
reference, overall and per type; before issue 13 item 9 this file had its own first-token argmax
accuracy, so logs of earlier runs, the shipped model's included, used that metric; on the shipped model
both give 0.833 on the first 96 validation questions); the best checkpoint is saved with save_pretrained
(safetensors) beside the processor, and every line of the log goes to train_log.jsonl in --out. --steps 0
saves after stage 1; --tower-from starts stage 2 from such a tower instead of running stage 1; --init-from
continues from every weight of a saved tiny VLM (a second stage 2 with a fresh schedule); given both,
--init-from's weights are loaded first and --tower-from's tower replaces theirs.

Testbed v2 (--version 2; default 1, the shipped weights' testbed): the data module is `data_v2` (scenes,
patch labels, the extra questions), the tokenizer covers v2's vocabulary, the sizes are `vlm.V2_SIZES`
(--sizes overrides any of them, as JSON) and the prompt puts the image first (`vlm.prompt(...,
version=2)`, as v2's records do). Stage 1 adds a sixth head that reads the digit mark on each patch
(`data_v2.mark_patches`: 0 = no mark, 1..10 = digit 0..9; mark patches weigh MARK_PATCH_WEIGHT in its loss),
and its `vision_eval` lines add "mark" (digit accuracy on marked patches) and "mark_none" (no mark predicted
where there is none, grey decoy digits included). Stage 2 replaces a sample by its image's caption
(`<split>_captions.json`, "What is in the image?") with probability --caption-fraction (default 0.2 for v2,
0 for v1), so the VLM also captions (the selector is trained on captions); each sample then weighs the same
in the loss (--loss-average samples, v2's default: a caption has tens of answer tokens, a question one),
where v1 averages over all answer tokens. The curriculum stays, but v2's last half trains on all 576
tokens (--full-from 0.5 by default; v1: 0.8), so the result is at home with full visual sequences.

Interrupting and resuming (both versions): every --checkpoint-every steps (default 250), at a stop by
--max-minutes or --stop-at, and after the last step, the running stage writes OUT/resume/ atomically (a
temporary folder renamed into place): model.safetensors (every weight; stage 1 also the heads), the
optimizer state and trainer_state.json (stage, step, running loss, best-so-far record, the schedule's
param_groups, the data order and the python RNG states) and rng.safetensors (torch's global RNG and the
curriculum's generator). --resume continues from it (or starts afresh when there is none, so one command
serves every session) and ends with the same weights as an uninterrupted run with the same arguments; the
log is appended to. --max-minutes counts this session's minutes (from the start of the command, stage 1
included; stage 1 now stops at it too), the log's "minutes" the whole run's. --tower-from still skips stage 1.

--feature-cache DIR (stage 2 with the tower frozen): the tower's feature layer of every training image is
computed once (fp16, a numpy memmap named by a hash of the tower's weights, `build_feature_cache`) and each
step reads its rows instead of loading images and running the tower; the loss equals the tower-running
one to fp16 rounding (tested). On two cores it made a curriculum step (object patches and 5% of the
background) about twice as fast; a 20,000-image cache of v2 takes 2.2 GB and 8 minutes to build.

Auxiliary losses of stage 2 (v2; neither adds anything to the saved model, a plain LLaVA):
--position-loss W (`PositionHead`, with --feature-cache) makes each projected image token's (column, row)
a linear read-out, so that the language model's input keeps the side of an object; --lookup-loss W
(`LookupProbe`) adds W x -log(the attention mass that each head of the language model's second layer puts,
from the answer position of each location question, on the asked object's image tokens), the lookup the
model already makes for digit questions and did not make for location ones
(weights/tiny-vlm-v2-wip/diagnostics/location_attention.txt); --lookup-kinds location,relation also points
it at the object a relation question asks about (both objects of a yes/no one, half of the heads each).

Both stages run through `training.loop.Trainer` (AdamW, `warmup_cosine`, clip 1.0, the running loss, best
tracking), the loop `autoselect train` uses too, and stage 2 encodes through `training.data.
ConversationCollator` (with a per-row image-token count for the curriculum), the collator of the trainer
and the evaluator; `conversation.llava_prompt` is the one prompt template.
"""

import argparse
import collections
import json
import os
import random
import re
import shutil
import sys
import time
from types import SimpleNamespace as _Run  # what `main` holds between its steps (built by `setup`)

import torch

from ..conversation import IGNORE_INDEX  # noqa: F401 (re-exported: the package's one definition)
from ..evaluation import accuracy_of
from ..training.data import ConversationCollator
from ..training.loop import Trainer, restore_optimizer, save_optimizer, scaled, warmup_cosine
from . import vlm

RESUME = "resume"  # OUT/resume/: the checkpoint --resume continues from
MARK_PATCH_WEIGHT = 5.0  # stage 1 (v2): weight of a patch with a mark in the digit head's loss
# Per-version defaults of the options whose default depends on --version.
VERSION_DEFAULTS = {1: dict(full_from=0.8, caption_fraction=0.0, loss_average="tokens"),
                    2: dict(full_from=0.5, caption_fraction=0.2, loss_average="samples")}


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


def load_captions(data_dir: str, split: str):
    """{image path: (prompt, caption)} of `<split>_captions.json` (prompt without its `<image>`)."""
    return {image: (question, answer) for image, turns in group_by_image(load_records(data_dir, f"{split}_captions"))
            .items() for question, answer, _ in turns[:1]}


class PatchHeads(torch.nn.Module):
    """Stage 1's linear heads on the vision tower's feature layer (dropped after stage 1): per patch, the
    colour and the shape of the object on it (0 = background), whether the object's centre lies in the
    patch, and the patch's own row and column (which keeps the position in the features); version 2 adds
    the digit mark on the patch (0 = none, 1..10 = digit 0..9)."""

    def __init__(self, hidden, version: int = 1):
        super().__init__()
        source = vlm.data_module(version)
        grid = vlm.IMAGE_SIZE // vlm.PATCH_SIZE
        self.color = torch.nn.Linear(hidden, 1 + len(source.COLORS))
        self.shape = torch.nn.Linear(hidden, 1 + len(source.SHAPES))
        self.centre = torch.nn.Linear(hidden, 2)
        self.row = torch.nn.Linear(hidden, grid)
        self.col = torch.nn.Linear(hidden, grid)
        self.names = ("color", "shape", "centre", "row", "col")
        if version == 2:  # created last: v1's heads draw the same initial weights as before
            self.mark = torch.nn.Linear(hidden, 1 + len(source.DIGITS))
            self.names += ("mark",)

    def forward(self, features):
        return {name: getattr(self, name)(features) for name in self.names}


class PositionHead(torch.nn.Module):
    """Stage 2's auxiliary reader of a token's place (--position-loss): a linear map of each projected
    image token to its patch's (column, row), both scaled to [-1, 1], trained by mean squared error. The
    language model must tell an object's side (location and relation questions) from its tokens; the
    projector, trained by the answer loss alone, kept little of the side that the tower's features hold
    (weights/tiny-vlm-v2-wip/diagnostics/side_probe.txt). This loss makes the side a linear read-out of
    the language model's input. The head is discarded: the saved model is a plain LLaVA (and the resume
    checkpoint does not hold it either: a resumed run starts a fresh head)."""

    def __init__(self, config):
        super().__init__()
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.linear = torch.nn.Linear(config.text_config.hidden_size, 2)
        grid = torch.arange(side, dtype=torch.float32) / max(side - 1, 1) * 2 - 1
        rows, columns = torch.meshgrid(grid, grid, indexing="ij")  # patches in row-major order, as CLIP's
        self.register_buffer("target", torch.stack([columns.flatten(), rows.flatten()], 1), persistent=False)

    def loss(self, features):
        """Mean squared error of the (column, row) read from `features` (batch, side * side, hidden)."""
        if features.shape[1] != self.target.shape[0]:
            raise ValueError(f"PositionHead: expected {self.target.shape[0]} tokens an image, got {features.shape[1]}")
        return torch.nn.functional.mse_loss(self.linear(features), self.target.expand(features.shape[0], -1, -1))


def patch_targets(scenes, version: int = 1):
    """Stage 1 labels of each scene's 576 patches (see PatchHeads), stacked: {name: (B, 576) long}."""
    source = vlm.data_module(version)
    grid = vlm.IMAGE_SIZE // vlm.PATCH_SIZE
    color_index = {c: i + 1 for i, c in enumerate(source.COLORS)}
    shape_index = {c: i + 1 for i, c in enumerate(source.SHAPES)}
    out = collections.defaultdict(list)
    position = torch.arange(grid * grid)
    for scene in scenes:
        owner = torch.as_tensor(source.patch_labels(scene))
        out["color"].append(torch.tensor([0] + [color_index[o.color] for o in scene.objects])[owner])
        out["shape"].append(torch.tensor([0] + [shape_index[o.shape] for o in scene.objects])[owner])
        centre = torch.zeros(grid * grid, dtype=torch.long)
        for obj in scene.objects:
            centre[(obj.y // vlm.PATCH_SIZE) * grid + obj.x // vlm.PATCH_SIZE] = 1
        out["centre"].append(centre)
        out["row"].append(position // grid)
        out["col"].append(position % grid)
        if version == 2:
            out["mark"].append(torch.as_tensor(source.mark_patches(scene)))
    return {name: torch.stack(values) for name, values in out.items()}


def patch_loss(outputs, targets, background_weight=0.1):
    """Cross-entropy of the stage 1 heads; background patches weigh `background_weight` in the colour,
    shape and centre terms (objects cover about 5% of the patches); the mark term (v2) weighs patches
    with a mark MARK_PATCH_WEIGHT, the others as in the colour term."""
    obj = targets["color"] > 0
    weight = torch.where(obj, 1.0, background_weight)
    loss = 0.0
    for name in ("color", "shape", "centre"):
        ce = torch.nn.functional.cross_entropy(outputs[name].flatten(0, 1), targets[name].flatten(), reduction="none")
        loss = loss + (ce * weight.flatten()).sum() / weight.sum()
    for name in ("row", "col"):
        loss = loss + 0.1 * torch.nn.functional.cross_entropy(outputs[name].flatten(0, 1), targets[name].flatten())
    if "mark" in targets:
        mark_weight = torch.where(targets["mark"] > 0, MARK_PATCH_WEIGHT, weight).flatten()
        ce = torch.nn.functional.cross_entropy(outputs["mark"].flatten(0, 1), targets["mark"].flatten(),
                                               reduction="none")
        loss = loss + (ce * mark_weight).sum() / mark_weight.sum()
    return loss


def feature_layers(config) -> list:
    """The tower's hidden states the projector reads (`vision_feature_layer`, an index or a list), as a list."""
    layers = config.vision_feature_layer
    return list(layers) if isinstance(layers, (list, tuple)) else [layers]


def feature_width(config) -> int:
    """The width of `tower_features`: the tower's hidden size times the number of feature layers."""
    return config.vision_config.hidden_size * len(feature_layers(config))


def tower_features(model, pixel_values):
    """The vision tower's feature layer without the class token: (B, 576, `feature_width`); several layers
    (a list `vision_feature_layer`) concatenated along the features in the list's order, as LLaVA does."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return torch.cat([hidden[layer][:, 1:] for layer in feature_layers(model.config)], dim=-1)


def load_scenes(data_dir, split, version: int = 1):
    Scene = vlm.data_module(version).Scene
    with open(os.path.join(data_dir, f"{split}_scenes.json")) as handle:
        return [(path, Scene.from_dict(scene)) for path, scene in json.load(handle).items()]


@torch.no_grad()
def evaluate_vision(model, heads, processor, data_dir, scenes, batch_size=16, version: int = 1):
    """Stage 1 accuracy per patch: colour and shape on object patches, background kept as background,
    centre recall, and row/column; version 2 also the digit on patches with a mark ("mark") and no mark
    predicted on the others ("mark_none")."""
    from PIL import Image

    hits, counts = collections.Counter(), collections.Counter()
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        images = [Image.open(os.path.join(data_dir, path)).convert("RGB") for path, _ in chunk]
        features = tower_features(model, processor.image_processor(images, return_tensors="pt")["pixel_values"])
        outputs = heads(features)
        targets = patch_targets([scene for _, scene in chunk], version)
        obj = targets["color"] > 0
        predicted = {name: value.argmax(-1) for name, value in outputs.items()}
        for name in ("color", "shape"):
            hits[name] += int((predicted[name] == targets[name])[obj].sum())
            counts[name] += int(obj.sum())
        hits["background"] += int(((predicted["color"] == 0) & (predicted["shape"] == 0))[~obj].sum())
        counts["background"] += int((~obj).sum())
        centre = targets["centre"] == 1
        hits["centre_recall"] += int((predicted["centre"] == 1)[centre].sum())
        counts["centre_recall"] += int(centre.sum())
        hits["centre_precision"] += int((targets["centre"] == 1)[predicted["centre"] == 1].sum())
        counts["centre_precision"] += int((predicted["centre"] == 1).sum())
        for name in ("row", "col"):
            hits[name] += int((predicted[name] == targets[name]).sum())
            counts[name] += targets[name].numel()
        if "mark" in targets:
            marked = targets["mark"] > 0
            hits["mark"] += int((predicted["mark"] == targets["mark"])[marked].sum())
            counts["mark"] += int(marked.sum())
            hits["mark_none"] += int((predicted["mark"] == 0)[~marked].sum())
            counts["mark_none"] += int((~marked).sum())
    return {name: round(hits[name] / max(1, counts[name]), 4) for name in counts}


# -- resume checkpoints ----------------------------------------------------------------------------------

def save_resume(out: str, stage: int, step: int, trainer: Trainer, weights: dict, state: dict,
                generators: dict = None):
    """Write OUT/resume/ atomically (see the module docstring): `weights` (name -> tensor) as
    model.safetensors, the optimizer and trainer_state.json (stage, step, the trainer's running loss and
    best record, python's global RNG state and `state`), torch's global RNG state and each of `generators`'
    (torch.Generator) in rng.safetensors. Written to OUT/resume.tmp, then renamed into place."""
    from safetensors.torch import save_file

    final = os.path.join(out, RESUME)
    temporary, old = f"{final}.tmp", f"{final}.old"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    save_file({name: value.detach().cpu().clone().contiguous() for name, value in weights.items()},
              os.path.join(temporary, "model.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    rng.update({f"generator.{name}": g.get_state() for name, g in (generators or {}).items()})
    save_file(rng, os.path.join(temporary, "rng.safetensors"))
    version, internal, gauss = random.getstate()
    save_optimizer(temporary, trainer.optimizer, {
        "stage": stage, "step": step, "running": trainer.running, **trainer.state(),
        "python_random": [version, list(internal), gauss], **state})
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def resume_folder(out: str):
    """OUT/resume/ if a complete one is there (or OUT/resume.old, left by a stop between the two renames
    of `save_resume`), else None."""
    for name in (RESUME, f"{RESUME}.old"):
        folder = os.path.join(out, name)
        if os.path.exists(os.path.join(folder, "trainer_state.json")):
            return folder
    return None


def load_resume(folder: str):
    """(state, weights, rng tensors) of a checkpoint written by `save_resume` (the optimizer is restored
    by `restore_resume`)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "trainer_state.json")) as handle:
        state = json.load(handle)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    return state, weights, load_file(os.path.join(folder, "rng.safetensors"))


def restore_resume(folder: str, trainer: Trainer, state: dict, rng: dict, generators: dict = None):
    """The optimizer, the trainer's running loss and best record, python's and torch's global RNG and
    `generators`' states of a checkpoint (`load_resume`'s state and rng)."""
    restore_optimizer(folder, trainer.optimizer, state)
    trainer.running = state["running"]
    trainer.load_state(state)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(rng["torch"])
    for name, generator in (generators or {}).items():
        generator.set_state(rng[f"generator.{name}"])


def pretrain_vision(model, processor, data_dir, steps, batch_size, lr, seed, write, progress=True,
                    warmup=100, eval_every=500, eval_images=200, version: int = 1, out=None, checkpoint_every=0,
                    resume=None, should_stop=None):
    """Stage 1: per-patch labels (PatchHeads) on the vision tower's feature layer; the heads are dropped
    afterwards. A `Trainer`: AdamW, linear warmup times a cosine decay (`warmup_cosine`), clip 1.0.

    With `out`, writes OUT/resume/ (stage 1) every `checkpoint_every` steps, at a stop and after the last
    step; `resume` (a `load_resume` result and its folder) continues from such a checkpoint;
    `should_stop(step)` gives a reason to stop after that step (or None). Returns the heads, with
    `stopped` (the reason, or None)."""
    from PIL import Image

    scenes = load_scenes(data_dir, "train", version)
    val_scenes = load_scenes(data_dir, "val", version)[:eval_images]
    heads = PatchHeads(feature_width(model.config), version)
    parameters = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    start = 0
    generator = random.Random(seed)
    if resume is not None:
        folder, (state, weights, _) = resume
        start = state["step"]
        model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("heads.")})
        heads.load_state_dict({k[len("heads."):]: v for k, v in weights.items() if k.startswith("heads.")})
    trainer = Trainer(parameters, steps=steps, lr=lr, schedule=scaled(warmup_cosine(warmup, steps)), clip=1.0,
                      weight_decay=0.01, smoothing=0.95, progress=progress, start=start,
                      progress_options={"desc": "stage 1: vision tower", "mininterval": 10})
    if resume is not None:
        restore_resume(folder, trainer, state, resume[1][2])
        internal = state["stage_random"]
        generator.setstate((internal[0], tuple(internal[1]), internal[2]))

    def checkpoint(step):
        weights = {**model.state_dict(), **{f"heads.{k}": v for k, v in heads.state_dict().items()}}
        internal = generator.getstate()
        save_resume(out, 1, step, trainer, weights, {"stage_random": [internal[0], list(internal[1]), internal[2]]})

    heads.stopped = None
    for index in trainer:
        step = index + 1
        picked = generator.sample(scenes, batch_size)
        images = [Image.open(os.path.join(data_dir, path)).convert("RGB") for path, _ in picked]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        loss = patch_loss(heads(tower_features(model, pixel_values)),
                          patch_targets([scene for _, scene in picked], version))
        loss.backward()
        trainer.step(index, loss.item())
        trainer.bar.set_postfix(loss=f"{trainer.running:.3f}")
        if step % 50 == 0 or step == steps:
            write({"event": "vision", "step": step, "loss": round(trainer.running, 4)})
        if val_scenes and (step % eval_every == 0 or step == steps):
            metrics = evaluate_vision(model, heads, processor, data_dir, val_scenes, version=version)
            write({"event": "vision_eval", "step": step, **metrics})
            trainer.write(f"stage 1 step {step}: {metrics}")
        heads.stopped = should_stop(step) if should_stop is not None and step < steps else None
        due = checkpoint_every and step % checkpoint_every == 0
        if out is not None and (heads.stopped or step == steps or due):
            checkpoint(step)
        if heads.stopped:
            write({"event": "stop", "stage": 1, "reason": heads.stopped, "step": step})
            break
    return heads


LOOKUP_LAYER = 1  # --lookup-loss: the language model's second layer, where digit questions' lookup is
LOOKUP_KINDS = ("location", "relation")
_LOCATION = re.compile(r"Is the (?:(\w+) )?(\w+) (?:on the left or the right|at the top or the bottom)\?$")
_NEIGHBOUR = re.compile(r"What color is the object (left of|right of|above|below) the (\w+) (\w+)\?$")
_RELATION = re.compile(r"Is the (\w+) (\w+) (?:left of|right of|above|below) the (\w+) (\w+)\?$")


def lookup_objects(scene, question: str, version: int = 2, kinds=("location",)):
    """The objects of `scene` that `question` asks to look up (a list of one or two), or None: kinds
    "location": the object a location question names, "Is the {color} {shape} on the left or the right?"
    (or "at the top or the bottom", or named by its shape alone). "relation": for "What color is the object
    left of the red star?" the object whose colour is asked (the one `data_v2.neighbours` finds); for "Is
    the red star left of the blue circle?" both objects, in that order. None for any other question, or
    when a name does not pick exactly one object."""

    def named(colour, shape):
        matches = [o for o in scene.objects if o.shape == shape and (colour is None or o.color == colour)]
        return matches[0] if len(matches) == 1 else None

    objects = None
    if "location" in kinds and (found := _LOCATION.search(question)):
        objects = [named(*found.groups())]
    elif "relation" in kinds and (found := _NEIGHBOUR.search(question)):
        direction, colour, shape = found.groups()
        anchor = named(colour, shape)
        options = vlm.data_module(version).neighbours(scene.objects, [anchor] if anchor else [])
        beside = [other for _, d, other in options if d == direction]
        objects = beside[:1] if len(beside) == 1 else [None]
    elif "relation" in kinds and (found := _RELATION.search(question)):
        a_colour, a_shape, b_colour, b_shape = found.groups()
        objects = [named(a_colour, a_shape), named(b_colour, b_shape)]
    return None if objects is None or any(o is None for o in objects) else objects


def lookup_target(scene, question: str, version: int = 2, kinds=("location",), owner=None):
    """The patches to look up for `question` (a tuple of boolean arrays over the 576 patches, row-major),
    or None: one array per object of `lookup_objects` (for a yes/no relation question two, and
    LookupProbe gives the first half of the heads the first, the rest the second); None also when an
    object covers no patch. owner: the scene's `patch_labels`, when the caller has them already."""
    import numpy as np

    objects = lookup_objects(scene, question, version, kinds)
    if objects is None:
        return None
    owner = np.asarray(vlm.data_module(version).patch_labels(scene) if owner is None else owner)
    targets = tuple(owner == scene.objects.index(o) + 1 for o in objects)
    return targets if all(t.any() for t in targets) else None


class LookupProbe:
    """Stage 2's auxiliary lookup loss (--lookup-loss): for each location question of the batch (and
    relation question, with --lookup-kinds; `lookup_target`), the attention that every head of the
    language model's layer LOOKUP_LAYER gives, from the position that predicts the answer, to the asked
    object's image tokens; the loss is the mean over heads and questions of -log(that attention mass).
    Why: the language model looks the named object up from the answer position for "What digit is on
    the red star?" (0.83-0.87 of layer 2's attention on it) but not for "Is the red star on the left or
    the right?" (0.05-0.11; 0.61 after run look-a with this loss), so it read the side of a mixture of
    objects (weights/tiny-vlm-v2-wip/diagnostics/location_attention.txt). The attention is recomputed from the
    layer's input (captured by a forward pre-hook) as the layer computes it: its query and key projections,
    the rotary embedding and the causal, padding-masked softmax (tested against eager attention's weights).
    Nothing is added to the model: the saved model is a plain LLaVA."""

    def __init__(self, model, layer: int = LOOKUP_LAYER):
        self.attention = model.model.language_model.layers[layer].self_attn
        self.captured = None

    def _capture(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.captured = (hidden, kwargs.get("position_embeddings"))

    def run(self, model, inputs: dict, extra: dict):
        """model(**inputs, **extra) with the layer's input captured; returns the model's output."""
        handle = self.attention.register_forward_pre_hook(self._capture, with_kwargs=True)
        try:
            return model(**inputs, **extra)
        finally:
            handle.remove()

    def mass(self, queries, targets, attention_mask):
        """(questions, heads) attention mass on the targets. queries: (row, position) pairs; targets:
        (questions, sequence) booleans, or (questions, heads, sequence) for a target per head;
        attention_mask: the batch's (rows, sequence) padding mask."""
        from transformers.models.llama.modeling_llama import rotate_half

        hidden, (cos, sin) = self.captured
        cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in (cos, sin))  # one row when the positions are shared
        attention = self.attention
        head_dim = attention.head_dim
        rows = torch.tensor([r for r, _ in queries])
        positions = torch.tensor([p for _, p in queries])
        q = attention.q_proj(hidden[rows, positions]).view(len(queries), -1, head_dim)
        q = q * cos[rows, positions][:, None] + rotate_half(q) * sin[rows, positions][:, None]
        # the keys once per row that has questions (not once per question: a row asks up to ~16)
        unique, inverse = rows.unique(return_inverse=True)
        k = attention.k_proj(hidden[unique]).view(len(unique), hidden.shape[1], -1, head_dim)
        k = k * cos[unique][:, :, None] + rotate_half(k) * sin[unique][:, :, None]
        k = k.repeat_interleave(q.shape[1] // k.shape[2], dim=2)
        asked = [(inverse == i).nonzero().flatten() for i in range(len(unique))]
        logits = torch.cat([torch.einsum("nhd,thd->nht", q[a], k[i]) for i, a in enumerate(asked)])
        logits = logits[torch.cat(asked).argsort()] * attention.scaling  # back in the questions' order
        keys = torch.arange(hidden.shape[1])
        allowed = (attention_mask[rows] > 0) & (keys[None] <= positions[:, None])
        weights = logits.float().masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        return (weights * (targets if targets.dim() == 3 else targets[:, None]).float()).sum(-1)


def lookup_queries(conversations, inputs, shown, scenes, image_token_id: int, version: int = 2, heads: int = 1,
                   kinds=("location",)):
    """(queries, targets) of --lookup-loss: for each question of each row that `lookup_target` (of
    `kinds`) gives patches for, the (row, position) that predicts its answer's first token (the position
    before the start of its answer's labels; answers are labelled runs, one per turn, in order) and a
    (heads, sequence) boolean mask of the image tokens each head should attend to (row's image tokens are
    the patches `shown[row]`, in order; with two targets, the first half of the heads gets the first)."""
    labels, ids = inputs["labels"], inputs["input_ids"]
    queries, targets = [], []
    for row, turns in enumerate(conversations):
        labelled = labels[row] != IGNORE_INDEX
        starts = (labelled & ~torch.cat([torch.zeros(1, dtype=torch.bool), labelled[:-1]])).nonzero().flatten()
        if len(starts) != len(turns):
            raise RuntimeError(f"row {row}: {len(starts)} labelled answers for {len(turns)} turns")
        image_positions, owner = (ids[row] == image_token_id).nonzero().flatten(), None
        for (question, _), start in zip(turns, starts.tolist()):
            if lookup_objects(scenes[row], question, version, kinds) is None:
                continue
            if owner is None:  # the scene's patch labels, drawn once for all of its questions
                owner = vlm.data_module(version).patch_labels(scenes[row])
            target = lookup_target(scenes[row], question, version, kinds, owner)
            if target is None:
                continue
            on_objects = [torch.from_numpy(t)[shown[row]] for t in target]
            if not all(o.any() for o in on_objects):
                continue
            mask = torch.zeros(heads, ids.shape[1], dtype=torch.bool)
            for group, on_object in enumerate(on_objects):
                share = slice(group * heads // len(on_objects), (group + 1) * heads // len(on_objects))
                mask[share, image_positions[on_object]] = True
            queries.append((row, start - 1))
            targets.append(mask)
    return queries, (torch.stack(targets) if targets else None)


def background_fraction(step, steps, start, full_from, ramp_from):
    """Stage 2's curriculum: the fraction of background patches the language model sees at `step` (1-based):
    `start` until ramp_from * steps, then linear up to 1 at full_from * steps, then 1 (every token)."""
    ramp_begin, ramp_end = ramp_from * steps, full_from * steps
    if step >= ramp_end:
        return 1.0
    if step <= ramp_begin:
        return start
    return start + (1.0 - start) * (step - ramp_begin) / max(1.0, ramp_end - ramp_begin)


def curriculum_tokens(scene, fraction, generator, version: int = 1):
    """Ascending patch indices shown to the language model: every patch an object touches
    (`patch_labels` of `version`'s data module) and each background patch with probability `fraction`
    (at least one)."""
    owner = torch.as_tensor(vlm.data_module(version).patch_labels(scene))
    if fraction >= 1.0:
        return torch.arange(owner.numel())
    keep = (owner > 0) | (torch.rand(owner.numel(), generator=generator) < fraction)
    if not keep.any():
        keep[0] = True
    return keep.nonzero().flatten()


def tower_fingerprint(model) -> str:
    """A short hash of the vision tower's weights: names a feature cache, so a changed tower never reads a
    stale one."""
    import hashlib

    digest = hashlib.sha1()
    for name, value in sorted(model.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


@torch.no_grad()
def build_feature_cache(model, processor, data_dir, paths, folder, batch_size=32, progress=True):
    """The frozen tower's feature layer (`tower_features`, fp16) of every image in `paths`, in order, as a
    (len(paths), 576, vision hidden) numpy memmap under `folder` named by `tower_fingerprint` (built once,
    reused by later runs and resumes; a .tmp file renamed into place when complete). Stage 2 with
    --feature-cache reads it instead of loading images and running the tower each step: with the tower
    frozen the features are the same every epoch, and they were most of a short-sequence step's time."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    hidden = feature_width(model.config)
    layers = feature_layers(model.config)  # the last layer alone keeps the name caches had before lists
    named = "" if layers == [-1] else "-layers" + "_".join(str(layer) for layer in layers)
    path = os.path.join(folder, f"train-{tower_fingerprint(model)}{named}-{len(paths)}.npy")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        temporary = path + ".tmp"
        cache = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float16,
                                          shape=(len(paths), vlm.NUM_PATCHES, hidden))
        was_training = model.training
        model.eval()
        for start in tqdm(range(0, len(paths), batch_size), desc="feature cache", disable=not progress, mininterval=10):
            chunk = paths[start:start + batch_size]
            images = [Image.open(os.path.join(data_dir, p)).convert("RGB") for p in chunk]
            pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            cache[start:start + len(chunk)] = tower_features(model, pixel_values).half().numpy()
        cache.flush()
        del cache
        model.train(was_training)
        os.replace(temporary, path)
    return np.load(path, mmap_mode="r")


def build_parser():
    """The command line of `python -m autoselect.testbed.train_vlm`."""
    parser = argparse.ArgumentParser(prog="python -m autoselect.testbed.train_vlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder written by `python -m autoselect.testbed`")
    parser.add_argument("--out", required=True, help="output folder for the model, processor and log")
    parser.add_argument("--version", type=int, choices=vlm.VERSIONS, default=1,
                        help="testbed version of --data: 1 (data, the shipped weights') or 2 (data_v2)")
    parser.add_argument("--sizes", type=json.loads, default=None,
                        help="JSON object overriding the version's model sizes (vlm.DEFAULT_SIZES / V2_SIZES), "
                             "e.g. '{\"text_layers\": 2}', '{\"rope_theta\": 1e6}' or "
                             "'{\"vision_feature_layer\": [0, -1]}' "
                             "(a projector that reads the position-embedded patches too; --init-from widens it)")
    parser.add_argument("--vision-steps", type=int, default=1500, help="stage 1 steps (per-patch labels)")
    parser.add_argument("--vision-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000, help="stage 2 steps (answers; 0: save after stage 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--vision-lr", type=float, default=2e-3, help="stage 1 peak learning rate")
    parser.add_argument("--lr", type=float, default=2e-3, help="stage 2 peak learning rate (projector, LM)")
    parser.add_argument("--tower-lr", type=float, default=0.0,
                        help="stage 2 learning rate of the vision tower (0: frozen after stage 1)")
    parser.add_argument("--extra-questions", type=int, default=5,
                        help="stage 2: questions per image generated from the scene, added to the data's")
    parser.add_argument("--caption-fraction", type=float, default=None,
                        help="stage 2: probability that a sample is its image's caption (<split>_captions.json) "
                             "instead of questions (default: 0.2 for --version 2, 0 for 1)")
    parser.add_argument("--loss-average", choices=("tokens", "samples"), default=None,
                        help="stage 2: the loss is the mean over all answer tokens of the batch (tokens, v1's "
                             "default) or the mean of each sample's mean (samples, v2's: a caption weighs as "
                             "much as a one-word answer)")
    parser.add_argument("--background-start", type=float, default=0.05,
                        help="stage 2 curriculum: fraction of background patches shown at first (1: no curriculum)")
    parser.add_argument("--ramp-from", type=float, default=0.35,
                        help="stage 2 curriculum: the background fraction starts rising at this fraction of --steps")
    parser.add_argument("--full-from", type=float, default=None,
                        help="stage 2 curriculum: every token from this fraction of --steps on (default: 0.8 for "
                             "--version 1, 0.5 for 2)")
    parser.add_argument("--feature-cache", default=None,
                        help="folder for the frozen tower's features of the training images (fp16, built once; "
                             "stage 2 reads them instead of running the tower; needs --tower-lr 0)")
    parser.add_argument("--turns", type=int, default=1,
                        help="stage 2: questions per image in one sample (later turns follow the image)")
    parser.add_argument("--recall-fraction", type=float, default=0.0,
                        help="stage 2: after --recall-steps, the probability that a sample is its recall turn "
                             "instead of questions (keeps the lookup trained; 0: off)")
    parser.add_argument("--recall-as", choices=RECALL_FORMS,
                        default="pairs",
                        help="the recall turns' form: one turn 'star blue ring red' (pairs), one colour question per "
                             "unique shape (questions), those and every shape and digit lookup (all), or all's and "
                             "every location and neighbour-colour question (every), every's with the side of "
                             "each unique shape named by its shape alone (every+shape), or every's with the count "
                             "of all objects, of each colour and of each shape in the scene (every+count), or every's "
                             f"with the yes/no relation of up to {RECALL_RELATION_PAIRS} related pairs of named "
                             "objects, both answers (every+relation), and with each pair's order as a word, 'Is "
                             "the red star left or right of the blue circle?' -> 'left' (every+relation+order)")
    parser.add_argument("--position-loss", type=float, default=0.0,
                        help="stage 2 (with --feature-cache): weight of an auxiliary loss that makes the projector's "
                        "output keep each token's place in the image (position_loss; 0: off)")
    parser.add_argument("--lookup-loss", type=float, default=0.0,
                        help="stage 2: weight of an auxiliary loss that makes the language model's second layer "
                             "attend, from the answer position of each location question, to the asked object's image "
                             "tokens (LookupProbe; 0: off)")
    parser.add_argument("--lookup-kinds", type=lambda text: tuple(text.split(",")), default=("location",),
                        help="the questions --lookup-loss supervises, comma-separated: location (the asked object), "
                             "relation (the object whose colour is asked, or both objects of a yes/no question)")
    parser.add_argument("--recall-steps", type=int, default=0,
                        help="stage 2: the first N steps replace the questions by one recall turn: every object whose "
                             "shape is unique in the scene as its shape's name and its colour ('star blue ring red'), "
                             "so that the language model learns the lookup by shape before it has to find the "
                             "shape in a question (recall_turns; 0: off)")
    parser.add_argument("--init-from", help="a saved tiny VLM to continue from (every weight; with "
                        "--vision-steps 0): a second stage 2 with a fresh learning-rate schedule; more text_heads "
                        "or vision_feature_layer layers in --sizes than it has grow it so that it starts as the "
                        "saved model (with_more_heads, with_wider_projector)")
    parser.add_argument("--insert-layer", type=int, default=None,
                        help="with --init-from and one more text_layers in --sizes than the saved model has: put a "
                             "new language-model layer at this index, started as the identity (its attention's and "
                             "MLP's output projections zero), the saved layers around it")
    parser.add_argument("--tower-from", help="a saved tiny VLM whose vision tower replaces stage 1 (with "
                        "--vision-steps 0), e.g. the checkpoint of an earlier run of this command; with "
                        "--init-from, its tower replaces that model's (a retrained tower under a trained "
                        "projector and language model)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-records", type=int, default=600, help="validation questions per evaluation")
    parser.add_argument("--eval-from", type=int, default=0,
                        help="index of the first validation question the evaluations use (--eval-records from "
                             "there), e.g. 500 to keep testbed v2's first 500, the selection set of many earlier "
                             "runs, out of a new run's choice of its best step")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many minutes of this command (the resume checkpoint written; "
                             "stage 2 also validates and keeps the best)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this stage 2 step (the resume checkpoint written), e.g. to split a run "
                             "across sessions; --resume continues")
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="write OUT/resume/ every this many steps of either stage (0: only at a stop and at "
                             "the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/resume/ (same arguments), or start afresh when there is none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def resolve_defaults(args):
    """Fill the options whose default depends on --version (VERSION_DEFAULTS); returns args."""
    for name, value in VERSION_DEFAULTS[args.version].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    """Stage 1 (unless --vision-steps 0), then stage 2 with validation every --eval-every steps; returns 0."""
    parser = build_parser()
    args = resolve_defaults(parser.parse_args(argv))
    if args.position_loss > 0 and not args.feature_cache:
        parser.error("--position-loss needs --feature-cache (it reads every token's projected features)")
    if set(args.lookup_kinds) - set(LOOKUP_KINDS):
        parser.error(f"--lookup-kinds {','.join(args.lookup_kinds)}: choose from {','.join(LOOKUP_KINDS)}")
    if args.lookup_loss > 0 and args.version != 2:
        parser.error("--lookup-loss reads testbed v2's scenes and questions (--version 2)")
    if args.feature_cache and args.tower_lr > 0:
        parser.error("--feature-cache holds a frozen tower's features: it cannot be used with --tower-lr > 0")
    if args.insert_layer is not None and not args.init_from:
        parser.error("--insert-layer puts a new layer among the layers of an --init-from model: give --init-from")
    if args.sizes is not None and not isinstance(args.sizes, dict):
        parser.error("--sizes must be a JSON object")
    if args.caption_fraction > 0 and args.steps and not os.path.exists(os.path.join(args.data, "train_captions.json")):
        parser.error(f"--caption-fraction {args.caption_fraction}: no train_captions.json in {args.data} (write it "
                     f"with `python -m autoselect.testbed --captions-only --version {args.version} --out {args.data}`)")
    run = setup(args)
    stage = run.resume[1][0]["stage"] if run.resume else 1
    if args.vision_steps and stage == 1:
        heads = pretrain_vision(run.model, run.processor, args.data, args.vision_steps, args.vision_batch_size,
                                args.vision_lr, args.seed, run.write, version=args.version, out=args.out,
                                checkpoint_every=args.checkpoint_every, resume=run.resume,
                                should_stop=lambda step: out_of_time(run))
        if heads.stopped:
            run.write({"event": "end", "best_val_accuracy": -1.0, "minutes": round(run_minutes(run), 2)})
            print(f"stopped in stage 1 ({heads.stopped}); continue with --resume")
            return 0
        run.resume = None  # stage 2 starts afresh after a resumed stage 1
    if args.steps == 0:  # stage 1 only: keep its tower for a later --tower-from
        run.model.save_pretrained(args.out)
        run.processor.save_pretrained(args.out)
    if args.feature_cache:
        paths = [path for path, _ in run.train_groups]
        run.cache = build_feature_cache(run.model, run.processor, args.data, paths, args.feature_cache)
        run.cache_rows = {path: row for row, path in enumerate(paths)}
    if args.position_loss > 0:
        run.position_head = PositionHead(run.model.config)
    if args.lookup_loss > 0:
        run.lookup = LookupProbe(run.model)
    trainer = stage2_trainer(run)
    generators = {"curriculum": run.token_generator}
    if run.resume:
        folder, (state, weights, rng) = run.resume
        run.model.load_state_dict(weights)
        trainer.start = state["step"]
        restore_resume(folder, trainer, state, rng, generators)
        run.order, run.cursor, run.minutes_before = state["order"], state["cursor"], state["minutes"]

    def checkpoint(step):
        save_resume(args.out, 2, step, trainer, run.model.state_dict(),
                    {"order": run.order, "cursor": run.cursor, "minutes": round(run_minutes(run), 4)}, generators)

    for index in trainer:
        step = index + 1
        fraction = background_fraction(step, args.steps, args.background_start, args.full_from, args.ramp_from)
        loss = stage2_loss(run, step, fraction)
        loss.backward()
        trainer.step(index, loss.item())
        trainer.bar.set_postfix(loss=f"{trainer.running:.3f}", lr=f"{trainer.lr:.1e}", background=f"{fraction:.2f}")
        minutes = run_minutes(run)
        stop = out_of_time(run) or (f"--stop-at {args.stop_at} reached" if args.stop_at is not None
                                    and step >= args.stop_at and step < args.steps else None)
        if step % args.eval_every == 0 or step == args.steps or stop:
            validate(run, trainer, step, minutes)
        elif step % 50 == 0:
            extra = {"position_loss": round(run.position_running, 4)} if run.position_head is not None else {}
            if run.lookup is not None:
                extra["lookup_loss"] = round(run.lookup_running, 4)
            run.write({"event": "train", "step": step, "minutes": round(minutes, 2), "loss": round(trainer.running, 4),
                       "background_fraction": round(fraction, 3), **extra})
        if stop or step == args.steps or (args.checkpoint_every and step % args.checkpoint_every == 0):
            checkpoint(step)
        if stop:
            run.write({"event": "stop", "reason": stop, "step": step})
            break
    best = trainer.best if trainer.best is not None else -1.0
    run.write({"event": "end", "best_val_accuracy": best, "minutes": round(run_minutes(run), 2)})
    print(f"best validation accuracy {best:.4f}; model, processor and log in {args.out}")
    return 0


def run_minutes(run: _Run) -> float:
    """Minutes of the whole run: this command's and those of the sessions it resumes."""
    return run.minutes_before + (time.time() - run.start) / 60


def out_of_time(run: _Run):
    """The reason to stop when this command has run longer than --max-minutes, else None."""
    limit = run.args.max_minutes
    if limit is not None and (time.time() - run.start) / 60 > limit:
        return f"--max-minutes {limit} reached"
    return None


def setup(args) -> _Run:
    """Seeds, the fresh model (or --init-from / --tower-from weights) in train mode, the processor, the
    collator, the data, and the log (train_log.jsonl, its "start" line written; appended to when resuming)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    folder = resume_folder(args.out) if args.resume else None
    resume = (folder, load_resume(folder)) if folder else None
    processor = vlm.build_processor(version=args.version)
    model = vlm.build_model(seed=args.seed, tokenizer=processor.tokenizer, version=args.version, **(args.sizes or {}))
    model.train()
    train_groups = list(group_by_image(load_records(args.data, "train")).items())
    val_records = load_records(args.data, "val")
    if args.eval_from < 0 or args.eval_from and args.eval_from >= len(val_records):  # 0 works on an empty split
        raise ValueError(f"--eval-from {args.eval_from} is outside the {len(val_records)} validation questions")
    val_records = val_records[args.eval_from:args.eval_from + args.eval_records]
    captions = load_captions(args.data, "train") if args.caption_fraction > 0 and args.steps else {}
    log_path = os.path.join(args.out, "train_log.jsonl")
    if resume is None:
        open(log_path, "w").close()

    def write(entry):
        with open(log_path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    write({"event": "start", "args": vars(args), "parameters": sum(p.numel() for p in model.parameters()),
           "torch": torch.__version__, "train_images": len(train_groups), "val_records": len(val_records)})
    if resume is not None:
        write({"event": "resume", "path": folder, "stage": resume[1][0]["stage"], "step": resume[1][0]["step"]})
    elif args.resume:
        write({"event": "resume", "path": None, "note": f"no checkpoint in {os.path.join(args.out, RESUME)}: "
               "starting afresh"})
    from transformers import LlavaForConditionalGeneration

    # --init-from first, so that with both --tower-from's tower replaces the one it loaded
    for event, path in (("init_from", args.init_from), ("tower_from", args.tower_from)):
        if path:
            source = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
            if event == "init_from":
                state = source.state_dict()
                if feature_layers(source.config) != feature_layers(model.config):
                    state = with_wider_projector(state, feature_layers(source.config), model.state_dict(),
                                                 feature_layers(model.config))
                saved_heads = source.config.text_config.num_attention_heads
                if saved_heads != model.config.text_config.num_attention_heads:
                    state = with_more_heads(state, model.state_dict(), saved_heads,
                                            model.config.text_config.num_attention_heads,
                                            model.config.text_config.head_dim)
                if args.insert_layer is not None:
                    state = with_inserted_layer(state, model.state_dict(), args.insert_layer)
                model.load_state_dict(state)
            else:
                model.model.vision_tower.load_state_dict(source.model.vision_tower.state_dict())
            write({"event": event, "path": path})
    return _Run(args=args, model=model, processor=processor, collator=ConversationCollator(processor, args.data),
                train_groups=train_groups, val_records=val_records,
                train_scenes=dict(load_scenes(args.data, "train", args.version)), captions=captions,
                token_generator=torch.Generator().manual_seed(args.seed), write=write, start=time.time(),
                minutes_before=0.0, order=[], cursor=0, resume=resume, cache=None, cache_rows={}, position_head=None,
                position_running=0.0, lookup=None, lookup_running=0.0)


PROJECTOR_INPUT = "model.multi_modal_projector.linear_1.weight"


def with_wider_projector(saved: dict, saved_layers: list, fresh: dict, layers: list) -> dict:
    """`saved`'s state dict for a model whose projector reads more tower layers (`layers`, a list
    `vision_feature_layer` in --sizes) than the saved model's (`saved_layers`, which must all be among
    them): the projector's first weight gets the saved columns at its saved layers' places in the
    concatenation and zero columns for the added layers, so that the model computes what the saved one did
    and the new columns start learning from their gradient."""
    missing = [layer for layer in saved_layers if layer not in layers]
    if missing:
        raise ValueError(f"vision_feature_layer {layers} drops the saved model's feature layer(s) {missing}: "
                         "a wider projector keeps every saved layer")
    old, new = saved[PROJECTOR_INPUT], fresh[PROJECTOR_INPUT]
    width = old.shape[1] // len(saved_layers)
    if new.shape[1] != width * len(layers):
        raise ValueError(f"the projector's input is {new.shape[1]} wide, not {width} x {len(layers)} layers")
    weight = torch.zeros_like(new)
    for i, layer in enumerate(saved_layers):
        at = layers.index(layer)
        weight[:, at * width:(at + 1) * width] = old[:, i * width:(i + 1) * width]
    return {**saved, PROJECTOR_INPUT: weight}


def with_inserted_layer(saved: dict, fresh: dict, at: int) -> dict:
    """A state dict for `fresh`'s model (one more language-model layer than `saved`'s): `saved`'s weights,
    its layers from `at` on moved one index up, and at index `at` `fresh`'s new layer with its attention's
    and MLP's output projections zeroed, so that the layer adds nothing to the residual stream at first
    and the deeper model computes what the saved one did (--insert-layer)."""
    prefix = "model.language_model.layers."
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    layers = {int(m.group(1)) for m in map(pattern.match, saved) if m}
    wanted = {int(m.group(1)) for m in map(pattern.match, fresh) if m}
    if len(wanted) != len(layers) + 1:
        raise ValueError(f"--insert-layer needs one more language-model layer in --sizes than the saved model's "
                         f"{len(layers)}; got {len(wanted)}")
    if not 0 <= at <= len(layers):
        raise ValueError(f"--insert-layer {at} is out of range: choose 0 to {len(layers)}")
    state = {}
    for key, value in saved.items():
        match = pattern.match(key)
        if match and int(match.group(1)) >= at:
            key = f"{prefix}{int(match.group(1)) + 1}.{match.group(2)}"
        state[key] = value
    for key, value in fresh.items():
        match = pattern.match(key)
        if match and int(match.group(1)) == at:
            zero = match.group(2) in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
            state[key] = torch.zeros_like(value) if zero else value.clone()
    return state


def head_places(saved_heads: int, heads: int) -> list:
    """Where each of a saved model's `saved_heads` attention heads goes among `heads` (--init-from with more
    text_heads in --sizes): each keeps its half of the heads, the half that --lookup-loss sends to a
    relation's first (or second) object (`lookup_queries`), so that a learnt lookup is still asked of it."""
    if heads < saved_heads or heads % 2 or saved_heads % 2:
        raise ValueError(f"more heads needs an even number of heads at least the saved model's {saved_heads}; "
                         f"got {heads}")
    half, new_half = saved_heads // 2, heads // 2
    return [(h // half) * new_half + h % half for h in range(saved_heads)]


def with_more_heads(saved: dict, fresh: dict, saved_heads: int, heads: int, head_dim: int) -> dict:
    """A state dict for `fresh`'s model (`heads` language-model attention heads of `head_dim`, more than
    the saved model's `saved_heads`): the saved heads' query, key and value rows at their `head_places`,
    `fresh`'s initial rows for the added heads, and the output projection's columns of the added heads
    zero, so that the wider model computes what the saved one did and the added heads learn from there."""
    places = head_places(saved_heads, heads)
    state = dict(saved)
    for key, value in fresh.items():
        projection = key.rsplit(".", 2)[-2] if key.startswith("model.language_model.layers.") else None
        if projection not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        if key not in saved:  # a layer the saved model lacks (--insert-layer adds it afterwards)
            continue
        old = saved[key]
        if projection == "o_proj":
            weight = torch.zeros_like(value).view(value.shape[0], heads, head_dim)
            weight[:, places] = old.view(old.shape[0], saved_heads, head_dim)
        else:
            if value.shape[0] != heads * head_dim or old.shape[0] != saved_heads * head_dim:
                raise ValueError(f"{key}: {tuple(old.shape)} -> {tuple(value.shape)} is not {saved_heads} -> "
                                 f"{heads} heads of {head_dim} (more heads keeps the head size and key/value heads "
                                 "equal to query heads)")
            weight = value.clone().view(heads, head_dim, value.shape[1])
            weight[places] = old.view(saved_heads, head_dim, old.shape[1])
        state[key] = weight.reshape(value.shape)
    return state


def stage2_trainer(run: _Run) -> Trainer:
    """Stage 2's `Trainer`: AdamW (weight decay 0.01, betas 0.9 / 0.98) over the projector and the
    language model at --lr (and the tower at --tower-lr, else frozen: no gradient, no backward through
    it), `warmup_cosine`, clip 1.0 over every parameter; best = highest validation accuracy."""
    args, model = run.args, run.model
    tower_parameters = list(model.model.vision_tower.parameters())
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")],
               "lr": args.lr}]
    if run.position_head is not None:  # trained with the projector, never saved with the model
        groups.append({"params": list(run.position_head.parameters()), "lr": args.lr})
    if args.tower_lr > 0:
        groups.append({"params": tower_parameters, "lr": args.tower_lr})
    else:
        for parameter in tower_parameters:
            parameter.requires_grad_(False)
    return Trainer(groups, steps=args.steps, lr=args.lr, schedule=scaled(warmup_cosine(args.warmup, args.steps)),
                   clip=1.0, weight_decay=0.01, betas=(0.9, 0.98), clip_parameters=model.parameters(), smoothing=0.98,
                   maximize=True, progress_options={"desc": "stage 2: tiny VLM", "mininterval": 10})


def is_caption(run: _Run, step: int, row: int) -> bool:
    """Whether row `row` of stage 2's `step` is a caption sample: probability --caption-fraction, drawn
    from its own stream (deterministic from --seed, the step and the row; no draw at fraction 0)."""
    import numpy as np

    fraction = run.args.caption_fraction
    return fraction > 0 and float(np.random.default_rng([run.args.seed, step, row, 1]).random()) < fraction


RECALL_QUESTION = "color"
RECALL_RELATION_PAIRS = 6  # every+relation: the related ordered pairs asked in one sample (at most)
RECALL_FORMS = ("pairs", "questions", "all", "every", "every+shape", "every+count", "every+relation",
                "every+relation+order")
ORDER_WORDS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


def order_question(a, b, actual: str) -> tuple:
    """(question, answer) asking the order of a related pair as a word: a `actual` b (`data_v2.relation`)
    -> "Is the red star left or right of the blue circle?" -> "left" ("above or below" on the vertical)."""
    words = "left or right of" if actual in ("left of", "right of") else "above or below"
    return f"Is the {a.color} {a.shape} {words} the {b.color} {b.shape}?", ORDER_WORDS[actual]


def recall_turns(scene, rng, form: str = "pairs") -> list:
    """The recall phase's one turn of a scene (--recall-steps): RECALL_QUESTION answered by every object
    whose shape is unique in the scene as its shape name followed by its colour, in a random order
    ("star blue ring red ..."); empty when no shape is unique (the sample keeps its questions). With
    form "questions" (--recall-as questions) the same objects are asked one turn each, "What color is the
    star?" -> "blue" (every question of the sample a lookup by shape). With form "all" the sample asks
    every lookup the generator's questions name an object by: the colour of each unique shape, the shape
    of each unique colour ("What shape is the red object?") and the digit on each marked object named by
    colour and shape ("What digit is on the red star?"), in a random order; empty when there is none. Form
    "every" adds every location question (`data_v2.location_questions`) and the colour of each object
    beside a named one ("What color is the object left of the red star?", `data_v2.neighbours`). Form
    "every+shape" adds the location questions of each object whose shape is unique, named by its shape
    alone ("Is the star on the left or the right?"): the lookup by shape that colour questions teach,
    with the side to read instead of the colour. Form "every+count" adds every count question the
    generator asks of a scene's objects: "How many objects are there?", "How many {color} objects are
    there?" for each colour and "How many {shapes} are there?" for each shape the scene has. Form
    "every+relation" adds the yes/no relation question of every ordered pair of named objects A, B in a
    `data_v2.relation` (at most RECALL_RELATION_PAIRS pairs, drawn at random: 3,000 training scenes had 5
    on average and up to 32, and with all of them a training step took 16 s instead of 8 on 2 cores),
    asked both ways: A's actual direction ("Is the red star left of the blue circle?" -> "yes") and its
    opposite ("... right of ..." -> "no"), as the generator asks them. Form "every+relation+order" adds to
    each of those pairs the order itself as a word, "Is the red star left or right of the blue circle?" ->
    "left" ("above or below" -> "above" for a vertical pair; ORDER_WORDS): the yes/no form needs the
    order and then its match with the asked direction, and on the horizontal the language model learnt
    neither (diagnostics/relation_probe.txt: the order is partly in the answer position's state, the yes/no
    answer at chance even on training scenes); this turn asks for the order alone, as the location
    questions ask for one object's side (`order_question`). Measured (run order, 400 steps): a tie overall,
    and the order word itself 0.55 on the horizontal (0.77 vertical; weights/tiny-vlm-v2-wip/README.md).

    Why: a small language model trained from scratch on "What color is the star?" after the image did not
    learn to find the star's patches (weights/tiny-vlm-v2-wip/diagnostics). When the colour is the token
    right after its shape's name, a small Llama learns that lookup within a few hundred steps and then
    carries it over to the full questions quickly; with the prompt's "assistant :" between them it learns
    it more slowly (recall_probe.py)."""
    from collections import Counter

    counts = Counter(o.shape for o in scene.objects)
    pairs = [(o.shape, o.color) for o in scene.objects if counts[o.shape] == 1]
    if form in RECALL_FORMS[2:]:
        from .data_v2 import OPPOSITE, _unique, location_questions, neighbour_question, neighbours, relation

        named = _unique(scene.objects)  # the objects named by colour and shape, as the digit questions name them
        colours = Counter(o.color for o in scene.objects)
        turns = [(f"What color is the {shape}?", color) for shape, color in pairs]
        turns += [(f"What shape is the {o.color} object?", o.shape) for o in scene.objects if colours[o.color] == 1]
        turns += [(f"What digit is on the {o.color} {o.shape}?", o.mark) for o in named
                  if getattr(o, "mark", None) is not None]
        if form != "all":
            spatial = location_questions(named) + [neighbour_question(*o) for o in neighbours(scene.objects, named)]
            if form == "every+shape":
                spatial += location_questions([o for o in scene.objects if counts[o.shape] == 1], by_shape=True)
            turns += [(q.text, q.answer) for q in spatial]
        if form == "every+count":
            from .data import plural

            turns.append(("How many objects are there?", str(len(scene.objects))))
            turns += [(f"How many {color} objects are there?", str(n)) for color, n in sorted(colours.items())]
            turns += [(f"How many {plural(shape)} are there?", str(n)) for shape, n in sorted(counts.items())]
        if form.startswith("every+relation"):
            related = [(a, b, actual) for a in named for b in named if a is not b and (actual := relation(a, b))]
            for i in sorted(rng.permutation(len(related))[:RECALL_RELATION_PAIRS]):
                a, b, actual = related[i]
                turns += [(f"Is the {a.color} {a.shape} {direction} the {b.color} {b.shape}?", answer)
                          for direction, answer in ((actual, "yes"), (OPPOSITE[actual], "no"))]
                if form == "every+relation+order":
                    turns.append(order_question(a, b, actual))
        return [turns[i] for i in rng.permutation(len(turns))]
    if not pairs:
        return []
    order = rng.permutation(len(pairs))
    if form == "questions":
        return [(f"What color is the {pairs[i][0]}?", pairs[i][1]) for i in order]
    return [(RECALL_QUESTION, " ".join(f"{pairs[i][0]} {pairs[i][1]}" for i in order))]


def stage2_batch(run: _Run, step: int):
    """(images, conversations, scene paths) of stage 2's `step` (1-based): the next --batch-size images
    of a shuffled order, each with --turns of its questions (the data's and --extra-questions more
    generated from the scene; in the first --recall-steps steps, and later with probability
    --recall-fraction, its recall_turns instead) or, with probability --caption-fraction, its caption;
    the image placed as the version's prompt has it (`vlm.image_question`: v1 after the first question,
    v2 before it)."""
    import numpy as np
    from PIL import Image

    args = run.args
    make_questions = vlm.data_module(args.version).make_questions
    if run.cursor + args.batch_size > len(run.order):
        run.order, run.cursor = random.sample(range(len(run.train_groups)), len(run.train_groups)), 0
    picked = [run.train_groups[i] for i in run.order[run.cursor:run.cursor + args.batch_size]]
    run.cursor += args.batch_size
    images = ([] if run.cache is not None else  # --feature-cache: stage2_loss reads the tower's features
              [Image.open(os.path.join(args.data, path)).convert("RGB") for path, _ in picked])
    conversations = []
    for row, (path, turns) in enumerate(picked):
        if is_caption(run, step, row):
            prompt, text = run.captions[path]
            conversations.append([(vlm.image_question(prompt, args.version), text)])
            continue
        draw = np.random.default_rng([args.seed, step, row, 2])
        recall = recall_turns(run.train_scenes[path], draw, args.recall_as) \
            if step <= args.recall_steps or (args.recall_fraction > 0 and draw.random() < args.recall_fraction) else []
        if recall:
            conversations.append([(vlm.image_question(q, args.version) if i == 0 else q, a)
                                  for i, (q, a) in enumerate(recall)])
            continue
        turns = [(q, a) for q, a, _ in turns]
        if args.extra_questions:
            rng = np.random.default_rng([args.seed, step, row])
            asked = {q for q, _ in turns}
            turns += [(q.text, q.answer) for q in make_questions(run.train_scenes[path], rng, args.extra_questions)
                      if q.text not in asked]
        turns = random.sample(turns, min(args.turns, len(turns)))
        conversations.append([(vlm.image_question(q, args.version) if i == 0 else q, a)
                              for i, (q, a) in enumerate(turns)])
    return images, conversations, [path for path, _ in picked]


def per_sample_loss(logits, labels):
    """The mean over samples of each sample's mean next-token loss on its labelled tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (labels != IGNORE_INDEX).sum(1)
    return (ce.sum(1) / counts.clamp(min=1))[counts > 0].mean()


def stage2_loss(run: _Run, step: int, fraction: float):
    """Stage 2's next-token loss on the answers of `step`'s batch (over all answer tokens, or per sample
    with --loss-average samples); below fraction 1 the curriculum: the language model sees the object
    patches and `fraction` of the background (positions contiguous). Plus --position-loss's and
    --lookup-loss's terms when they are on."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    images, conversations, paths = stage2_batch(run, step)
    model, per_sample = run.model, run.args.loss_average == "samples"
    auxiliary = 0.0  # --position-loss's term (with --feature-cache only)
    if run.cache is None and fraction >= 1.0:
        inputs, extra = run.collator.batch(images, conversations), {}
        shown = [torch.arange(vlm.NUM_PATCHES)] * len(paths)
    else:  # the curriculum's tokens, or every token with --feature-cache: features computed here
        shown = [curriculum_tokens(run.train_scenes[path], fraction, run.token_generator, run.args.version)
                 for path in paths]
        if run.cache is not None:  # the frozen tower's cached features, projected here
            inputs = run.collator.pad([run.collator.encode_turns(turns, len(s))
                                       for turns, s in zip(conversations, shown)])
            cached = torch.from_numpy(run.cache[[run.cache_rows[path] for path in paths]].astype("float32"))
            features = model.model.multi_modal_projector(cached)
            if run.position_head is not None:
                position = run.position_head.loss(features)
                run.position_running = 0.98 * run.position_running + 0.02 * position.item() \
                    if run.position_running else position.item()
                auxiliary = run.args.position_loss * position
        else:
            inputs = run.collator.batch(images, conversations, [len(s) for s in shown])
            features = model.model.get_image_features(pixel_values=inputs.pop("pixel_values"), return_dict=True)
            features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = [f[s] for f, s in zip(features, shown)]
        extra = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
    model_inputs = {k: v for k, v in inputs.items() if not per_sample or k != "labels"}  # per sample: loss here
    if run.lookup is None:
        outputs = model(**model_inputs, **extra)
    else:  # --lookup-loss: the layer's attention to each supervised question's objects
        queries, targets = lookup_queries(conversations, inputs, shown, [run.train_scenes[p] for p in paths],
                                          run.collator.image_token_id, run.args.version,
                                          model.config.text_config.num_attention_heads, run.args.lookup_kinds)
        outputs = run.lookup.run(model, model_inputs, extra)
        if queries:
            mass = run.lookup.mass(queries, targets, inputs["attention_mask"])
            lookup = -mass.clamp(min=1e-6).log().mean()
            run.lookup_running = 0.98 * run.lookup_running + 0.02 * lookup.item() if run.lookup_running \
                else lookup.item()
            auxiliary = auxiliary + run.args.lookup_loss * lookup
        run.lookup.captured = None
    if not per_sample:
        return outputs.loss + auxiliary
    return per_sample_loss(outputs.logits, inputs["labels"]) + auxiliary


def validate(run: _Run, trainer: Trainer, step: int, minutes: float):
    """Validation accuracy with every token through the package's evaluator (`evaluation.accuracy_of`:
    greedy generate(), first word of the answer, overall and per type), logged; the model and the
    processor are saved to --out when it is the best so far."""
    scores = accuracy_of(run.model, run.processor, run.val_records, run.args.data)
    accuracy, per_type = scores["all"], {k: v for k, v in scores.items() if k != "all"}
    result = trainer.evaluate(step, accuracy)
    run.write({"event": "eval", "step": step, "minutes": round(minutes, 2), "loss": round(trainer.running, 4),
               "val_accuracy": round(accuracy, 4), "val_per_type": {k: round(v, 4) for k, v in per_type.items()}})
    trainer.write(f"step {step}: loss {trainer.running:.3f}, val accuracy {accuracy:.3f} {per_type}")
    if result["improved"]:
        trainer.save(run.args.out, run.model, run.processor)


if __name__ == "__main__":
    sys.exit(main())
