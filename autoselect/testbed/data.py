"""Synthetic visual questions for the testbed (DESIGN.md section 6), deterministic from a seed.

A scene is one to five coloured shapes on a cluttered grey background (336 x 336 pixels: 24 x 24 = 576
patches of 14 pixels, like LLaVA-1.5). The clutter is grey (no hue), so every colour question is
answerable, but it gives the vision tower edges and blobs everywhere, which keeps "keep the tokens with
the most energy" from being a good token selector. Objects cover a small part of the image: keeping
64 of 576 tokens is enough only if the right ones are kept.

Question types (one-word answers):
  color      What color is the {shape}?                        (that shape is unique in the scene)
  shape      What shape is the {color} object?                 (that colour is unique in the scene)
  exist      Is there a {color} {shape} in the image?          yes / no, balanced; absent objects are
                                                               POPE-style: random, or adversarial
                                                               (sharing a colour or shape with a
                                                               present object)
  count      How many {color} objects are there? / How many {shape}s are there?    0 to 5
  location   Is the {color} {shape} on the left or the right? / ... at the top or the bottom?
             (asked only when the object lies entirely in one half)

Captions (DESIGN.md section 1 item 5: the selector is trained on captions only, so it never sees an
evaluated question type): one per image, derived from the scene description alone, e.g.
  "there are 3 objects a red circle at the top left a blue cross a green square on the right"
The total count ("there is 1 object" / "there are N objects"), then every object from left to right (by
centre x, then y) as "a {color} {shape}" and its place: "at the {top|bottom} {left|right}", "at the
{top|bottom}", "on the {left|right}", or nothing, where the words are the location questions' answers
(the object lies entirely in that half of the image; nothing for an object across both middle lines).
Every word is in `vocabulary()`, which the shipped tiny VLM's tokenizer is built from: it has no
punctuation but "?" and ":", and no "and" or "middle", so the caption has neither. The prompt is
CAPTION_PROMPT with `<image>` placed as in the question records.

Files: `write_split` writes PNG images, `<split>.json` in the LLaVA conversation format
([{"id", "image", "conversations": [{"from": "human", "value": "...\\n<image>"}, {"from": "gpt", ...}],
"type"}]), `<split>_scenes.json` with the scene descriptions the answers come from, and
`<split>_captions.json`: one record per image, same format, "type": "caption" (`write_captions` adds
it to a folder written without it). Captions draw no random numbers: writing them changes no other file.
"""

import dataclasses
import hashlib
import json
import os
import sys
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

VERSION = 1
IMAGE_SIZE = 336
PATCH_SIZE = 14
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 215, 30),
    "purple": (145, 55, 190),
    "orange": (245, 135, 20),
}
QUESTION_TYPES = ("color", "shape", "exist", "count", "location")
CAPTION_TYPE = "caption"
CAPTION_PROMPT = "What is in the image?"
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_OBJECTS = 5
SIZE_RANGE = (34, 62)  # bounding-box side in pixels: about 2.5 to 4.5 patches


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: its kind, colour name, centre (x, y) and bounding-box side, in pixels."""

    shape: str
    color: str
    x: int
    y: int
    size: int


@dataclasses.dataclass(frozen=True)
class Scene:
    """The objects (in drawing order) and the seed of the background clutter."""

    objects: Tuple[SceneObject, ...]
    background_seed: int
    object_type: ClassVar[type] = SceneObject  # what `from_dict` builds (v2: objects with a mark)

    def to_dict(self) -> dict:
        """JSON-ready description (the `<split>_scenes.json` entries)."""
        return {"objects": [dataclasses.asdict(o) for o in self.objects], "background_seed": self.background_seed}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        """The inverse of `to_dict`."""
        return cls(tuple(cls.object_type(**o) for o in data["objects"]), int(data["background_seed"]))


@dataclasses.dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def sample_scene(rng: np.random.Generator) -> Scene:
    """One to five objects, no two with the same (shape, colour), bounding boxes apart by 6 pixels."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    objects: List[SceneObject] = []
    used = set()
    attempts = 0
    while len(objects) < count and attempts < 200:
        attempts += 1
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        if objects and rng.random() < 0.4:  # repeat a colour or a shape: count questions need repeats
            twin = objects[rng.integers(len(objects))]
            shape, color = (twin.shape, color) if rng.random() < 0.5 else (shape, twin.color)
        if (shape, color) in used:
            continue
        size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        half = size // 2 + 4
        x, y = int(rng.integers(half, IMAGE_SIZE - half)), int(rng.integers(half, IMAGE_SIZE - half))
        if any(abs(x - o.x) < (size + o.size) // 2 + 6 and abs(y - o.y) < (size + o.size) // 2 + 6 for o in objects):
            continue
        objects.append(SceneObject(shape, color, x, y, size))
        used.add((shape, color))
    return Scene(tuple(objects), int(rng.integers(2**31)))


def _draw_clutter(draw, rng: np.random.Generator, base: int):
    for _ in range(int(rng.integers(25, 45))):  # grey strokes
        level = int(np.clip(base + rng.integers(-70, 71), 0, 255))
        x0, y0 = rng.integers(0, IMAGE_SIZE, 2)
        length, angle = rng.uniform(20, 140), rng.uniform(0, np.pi)
        x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
        draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=(level, level, level),
                  width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(8, 16))):  # grey blobs and rings
        level = int(np.clip(base + rng.integers(-60, 61), 0, 255))
        cx, cy = rng.integers(0, IMAGE_SIZE, 2)
        rx, ry = rng.integers(6, 30, 2)
        box = [int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry)]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=(level, level, level))
        else:
            draw.ellipse(box, outline=(level, level, level), width=2)


def _draw_object(draw, obj: SceneObject, fill=None):
    fill = COLORS[obj.color] if fill is None else fill
    h = obj.size / 2
    x, y = obj.x, obj.y
    if obj.shape == "circle":
        draw.ellipse([x - h, y - h, x + h, y + h], fill=fill)
    elif obj.shape == "square":
        s = h * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - h), (x - h, y + h * 0.8), (x + h, y + h * 0.8)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=fill)
    elif obj.shape == "cross":
        t = h * 0.33
        draw.rectangle([x - h, y - t, x + h, y + t], fill=fill)
        draw.rectangle([x - t, y - h, x + t, y + h], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, *, clutter=None, paint=None):
    """The scene as a 336 x 336 RGB PIL image: a grey background, `clutter(draw, rng, base)` (v1's by
    default), then each object by `paint(draw, obj)` (v1's `_draw_object` by default; v2 passes its own)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(scene.background_seed)
    base = int(rng.integers(80, 176))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (base, base, base))
    draw = ImageDraw.Draw(image)
    (clutter or _draw_clutter)(draw, rng, base)
    for obj in scene.objects:
        (paint or _draw_object)(draw, obj)
    return image


def patch_labels(scene: Scene) -> np.ndarray:
    """For each of the 24 x 24 patches (row-major, like the vision tower's tokens), 1 + the index of the
    object covering most of it, or 0 where objects cover less than a quarter of the patch. Drawn with the
    same shapes as `render`, on a blank canvas."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for index, obj in enumerate(scene.objects):
        _draw_object(draw, obj, fill=index + 1)
    grid = IMAGE_SIZE // PATCH_SIZE
    ids = np.asarray(canvas).reshape(grid, PATCH_SIZE, grid, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    if not scene.objects:
        return np.zeros(grid * grid, dtype=np.int64)
    share = np.stack([(ids == index + 1).mean(axis=1) for index in range(len(scene.objects))])
    return np.where(share.max(axis=0) >= 0.25, share.argmax(axis=0) + 1, 0).astype(np.int64)


def _side(obj: SceneObject, axis: str) -> Optional[str]:
    """'left'/'right' (axis x) or 'top'/'bottom' (axis y) when the object lies in one half, else None."""
    centre, half = (obj.x if axis == "x" else obj.y), obj.size / 2
    low, high = ("left", "right") if axis == "x" else ("top", "bottom")
    if centre + half < IMAGE_SIZE / 2:
        return low
    if centre - half > IMAGE_SIZE / 2:
        return high
    return None


def attribute_question(kind: str, objects: Sequence[SceneObject], rng: np.random.Generator,
                       pick=None) -> Optional[Question]:
    """A "color" or "shape" question: one attribute of an object named by the other, which must be
    unique in the scene ("What color is the {shape}?", "What shape is the {color} object?"); None when
    no object's naming attribute is unique. `pick(candidates)` chooses the object (default: uniformly)."""
    named_by = "shape" if kind == "color" else "color"
    names = [getattr(o, named_by) for o in objects]
    unique = [o for o in objects if names.count(getattr(o, named_by)) == 1]
    if not unique:
        return None
    obj = unique[rng.integers(len(unique))] if pick is None else pick(unique)
    text = f"What color is the {obj.shape}?" if kind == "color" else f"What shape is the {obj.color} object?"
    return Question(kind, text, getattr(obj, kind))


def exist_question(objects: Sequence[SceneObject], rng: np.random.Generator, shapes: Sequence[str] = SHAPES) -> Question:
    """"Is there a {color} {shape} in the image?", yes / no balanced; an absent pair is random or
    adversarial (sharing a colour or shape with a present object), out of COLORS x `shapes`."""
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        color, shape = sorted(present)[rng.integers(len(present))]
        return Question("exist", f"Is there a {color} {shape} in the image?", "yes")
    colors, present_shapes = [o.color for o in objects], [o.shape for o in objects]
    absent = [(c, s) for c in COLORS for s in shapes if (c, s) not in present]
    adversarial = [(c, s) for c, s in absent if c in colors or s in present_shapes]
    pool = adversarial if adversarial and rng.random() < 0.5 else absent
    color, shape = pool[rng.integers(len(pool))]
    return Question("exist", f"Is there a {color} {shape} in the image?", "no")


def attribute_count_question(objects: Sequence[SceneObject], by_color: bool, rng: np.random.Generator,
                             shapes: Sequence[str], repeated_below: float, any_above: float) -> Question:
    """"How many {color} objects are there?" (by_color) or "How many {shape}s are there?": the value is
    one that repeats in the scene (a draw below `repeated_below`, when one does), any colour / shape of
    `shapes` (above `any_above`: the answer is often 0), else one present in the scene."""
    colors, present = [o.color for o in objects], [o.shape for o in objects]
    values, every = (colors, list(COLORS)) if by_color else (present, list(shapes))
    repeated = sorted({v for v in values if values.count(v) > 1})
    draw = rng.random()
    options = repeated if repeated and draw < repeated_below else (every if draw > any_above else sorted(set(values)))
    value = options[rng.integers(len(options))]
    if by_color:
        return Question("count", f"How many {value} objects are there?", str(colors.count(value)))
    return Question("count", f"How many {plural(value)} are there?", str(present.count(value)))


def _question_of_type(kind: str, scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    objects = scene.objects
    if kind in ("color", "shape"):
        return attribute_question(kind, objects, rng)
    if kind == "exist":
        return exist_question(objects, rng)
    if kind == "count":
        return attribute_count_question(objects, rng.random() < 0.5, rng, SHAPES, repeated_below=0.5, any_above=0.85)
    if kind == "location":
        candidates = [(o, axis) for o in objects for axis in ("x", "y") if _side(o, axis) is not None]
        if not candidates:
            return None
        obj, axis = candidates[rng.integers(len(candidates))]
        if axis == "x":
            return Question(kind, f"Is the {obj.color} {obj.shape} on the left or the right?", _side(obj, "x"))
        return Question(kind, f"Is the {obj.color} {obj.shape} at the top or the bottom?", _side(obj, "y"))
    raise ValueError(f"unknown question type {kind!r}; choose one of {QUESTION_TYPES}")


def make_questions(scene: Scene, rng: np.random.Generator, count: int,
                   types: Sequence[str] = QUESTION_TYPES, *, question_of_type=None) -> List[Question]:
    """`count` distinct questions about the scene, types drawn in turn from a shuffled order (a type
    that does not apply to the scene is skipped). `question_of_type(kind, scene, rng)` makes one
    question (default: v1's; `data_v2.make_questions` passes v2's)."""
    question_of_type = question_of_type or _question_of_type
    order = [types[i] for i in rng.permutation(len(types))]
    questions: List[Question] = []
    seen = set()
    for attempt in range(8 * count * len(order)):
        if len(questions) == count:
            break
        question = question_of_type(order[attempt % len(order)], scene, rng)
        if question is not None and question.text not in seen:
            seen.add(question.text)
            questions.append(question)
    return questions


def vocabulary() -> List[str]:
    """Every word a question, answer, caption or caption prompt can contain, for a word-level tokenizer.
    The shipped tiny VLM's tokenizer (weights/tiny-vlm) is built from this list: change it append-only."""
    templates = ["What color is the {s}?", "What shape is the {c} object?", "Is there a {c} {s} in the image?",
                 "How many {c} objects are there?", "How many {p} are there?",
                 "Is the {c} {s} on the left or the right?", "Is the {c} {s} at the top or the bottom?"]
    words = set()
    for template in templates:
        for c in COLORS:
            for s in SHAPES:
                words.update(split_words(template.format(c=c, s=s, p=plural(s))))
    words.update(COLORS)
    words.update(SHAPES)
    words.update(["yes", "no", "left", "right", "top", "bottom"])
    words.update(str(i) for i in range(MAX_OBJECTS + 1))
    # Captions use these words only (the shipped tokenizer has them all: this adds no word).
    words.update(split_words(CAPTION_PROMPT))
    words.update(split_words("there is 1 object there are objects a at the on"))
    return sorted(words)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def split_words(text: str) -> List[str]:
    """Lower-case words with punctuation split off: the tokenizer's pre-tokenization."""
    out = []
    for raw in text.lower().split():
        word = raw.rstrip("?.,!")
        if word:
            out.append(word)
        out.extend(raw[len(word):])
    return out


def _place(obj: SceneObject) -> str:
    """Where the object lies, in the location questions' words ("" across both middle lines)."""
    horizontal, vertical = _side(obj, "x"), _side(obj, "y")
    if vertical and horizontal:
        return f"at the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return ""


def caption(scene: Scene) -> str:
    """The scene in words: its object count, then each object's colour, shape and place, left to right
    (see the module docstring). Depends on the scene description only."""
    count = len(scene.objects)
    words = ["there is 1 object" if count == 1 else f"there are {count} objects"]
    for obj in sorted(scene.objects, key=lambda o: (o.x, o.y, o.color, o.shape)):
        words.append(f"a {obj.color} {obj.shape}")
        place = _place(obj)
        if place:
            words.append(place)
    return " ".join(words)


def human_turn(text: str) -> str:
    """The human turn of a v1 record: the question, then the image ("{text}\n<image>")."""
    return f"{text}\n<image>"


def _version(testbed):
    """The testbed version module a shared writer works for (this one, v1, by default). Each version
    module has VERSION, QUESTION_TYPES, Scene, _rng, sample_scene, make_questions, render, caption,
    human_turn and caption_record."""
    return testbed if testbed is not None else sys.modules[__name__]


def caption_record(image_name: str, scene: Scene, *, testbed=None) -> dict:
    """The LLaVA-format caption record of one image (prompt laid out like the question records')."""
    t = _version(testbed)
    stem = os.path.splitext(os.path.basename(image_name))[0]
    return {
        "id": f"{stem}_{CAPTION_TYPE}",
        "image": image_name,
        "type": CAPTION_TYPE,
        "conversations": [{"from": "human", "value": t.human_turn(CAPTION_PROMPT)},
                          {"from": "gpt", "value": t.caption(scene)}],
    }


def _dump_captions(out_dir: str, split: str, scenes: Dict[str, Scene], testbed=None) -> int:
    t = _version(testbed)
    records = [t.caption_record(image_name, scene) for image_name, scene in scenes.items()]
    with open(os.path.join(out_dir, f"{split}_captions.json"), "w") as handle:
        json.dump(records, handle, indent=1)
    return len(records)


def write_captions(out_dir: str, split: str, *, testbed=None) -> int:
    """Write `<split>_captions.json` from the `<split>_scenes.json` already under out_dir (a folder
    written before captions existed: no image is rendered again). Returns the number of captions."""
    t = _version(testbed)
    with open(os.path.join(out_dir, f"{split}_scenes.json")) as handle:
        scenes = {name: t.Scene.from_dict(scene) for name, scene in json.load(handle).items()}
    return _dump_captions(out_dir, split, scenes, t)


def generate(split: str, count: int, seed: int = 0, questions_per_image: int = 2, *, testbed=None):
    """Yield (index, scene, questions) for images 0..count-1 of a split. Image i of a split depends only
    on (seed, split, i), so a larger split extends a smaller one, and splits never share a seed."""
    t = _version(testbed)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    for index in range(count):
        rng = t._rng(seed, split, index)
        scene = t.sample_scene(rng)
        yield index, scene, t.make_questions(scene, rng, questions_per_image)


def write_split(out_dir: str, split: str, count: int, seed: int = 0, questions_per_image: int = 2,
                progress: bool = True, captions: bool = True, *, testbed=None) -> Dict[str, int]:
    """Write `count` images of `split` with their questions (and, with `captions`, one caption each)
    under out_dir (see the module docstring). Returns {question type: number of questions}.
    `testbed`: the version module to write (default: this one, v1; `data_v2.write_split` passes v2)."""
    from tqdm.auto import tqdm

    t = _version(testbed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records, scenes, per_type = [], {}, {kind: 0 for kind in t.QUESTION_TYPES}
    name = "testbed" if t.VERSION == 1 else f"testbed v{t.VERSION}"
    for index, scene, questions in tqdm(generate(split, count, seed, questions_per_image, testbed=t), total=count,
                                        desc=f"{name} {split}", disable=not progress):
        image_name = f"images/{split}_{index:06d}.png"
        t.render(scene).save(os.path.join(out_dir, image_name), optimize=False)
        scenes[image_name] = scene
        for q_index, question in enumerate(questions):
            records.append({
                "id": f"{split}_{index:06d}_{q_index}",
                "image": image_name,
                "type": question.type,
                "conversations": [{"from": "human", "value": t.human_turn(question.text)},
                                  {"from": "gpt", "value": question.answer}],
            })
            per_type[question.type] += 1
    with open(os.path.join(out_dir, f"{split}.json"), "w") as handle:
        json.dump(records, handle, indent=1)
    with open(os.path.join(out_dir, f"{split}_scenes.json"), "w") as handle:
        json.dump({name: scene.to_dict() for name, scene in scenes.items()}, handle)
    if captions:
        _dump_captions(out_dir, split, scenes, t)
    return per_type


def image_digest(image) -> str:
    """SHA-256 of the image's pixels (for checking that splits share no image)."""
    return hashlib.sha256(image.tobytes()).hexdigest()
