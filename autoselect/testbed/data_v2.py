"""Testbed v2: synthetic visual questions where the visual-token budget binds (issue 14 items 1, 2, 4).

Testbed v1 (`data`) is answered from one token per object: a few large uniform shapes, so keeping the
most diverse 16 of 576 tokens loses nothing. v2 keeps v1's image geometry (336 x 336 pixels, 24 x 24 =
576 patches of 14 pixels, like LLaVA-1.5), colours, splits and file format, and changes the rest:

Scenes: 3 to 9 objects, about half of them small (14 to 27 pixels across: 1 to 2 patches), the rest
28 to 60 pixels (2 to 4.3 patches). Shapes: v1's five (circle, square, triangle, diamond, cross) and
star, ring. Colours and shapes repeat on purpose: each scene has a focus colour and a focus shape that
every object takes with a scene-specific probability, and (colour, shape) pairs may repeat, so one token
per distinct-looking region is not enough to count. Some objects are placed in the row (or column) of
an earlier one, for relation questions. Objects carry a mark: every circle, square, triangle or diamond
at least MARK_MIN_SIZE (34) pixels across has a digit 0-9 with probability MARK_PROB (0.6), and the first
object of every scene is such a marked object. The digit is a hand-defined 5 x 7 bitmap scaled 2x (10 x 14
pixels, inside one patch's height), white on red, green, blue and purple, black on yellow and orange,
centred on the object (a little below the centre in a triangle, `mark_centre`). The background is v1's
grey clutter plus denser, stronger grey edges: outlined and filled grey polygons and grey digits
(distractor marks). Nothing in the clutter has a hue, so every colour question stays answerable.

Naming: "the {color} {shape}" names an object only when no other object in the scene has the same
colour and shape; questions that name an object are asked only about such unique objects.

Question types (one-word answers; a digit is one word):
  color     What color is the {shape}?                              (that shape is unique in the scene)
  shape     What shape is the {color} object?                       (that colour is unique in the scene)
  exist     Is there a {color} {shape} in the image?                yes / no, balanced; absent pairs are
                                                                    random or adversarial (POPE-style)
  count     How many objects are there? / How many {color} objects are there? /
            How many {shapes} are there?                            0 to 9; mostly a repeated colour or
                                                                    shape, sometimes an absent one (0)
  location  Is the {color} {shape} on the left or the right? / ... at the top or the bottom?
                                                                    (the object lies entirely in one half)
  relation  What color is the object {left of|right of|above|below} the {color} {shape}?   a colour
            Is the {color} {shape} {left of|right of|above|below} the {color} {shape}?     yes / no,
                                                                    balanced
  text      What digit is on the {color} {shape}?                   0 to 9 (the object carries a mark)

Answers not given away by the scene's statistics: each scene has a focus colour that repeats, so a colour
question asked of a uniformly picked object would be answered by "the scene's most common colour" alone
(0.53 of colour questions, measured). The colour and shape questions and the colour form of the relation
question therefore pick their answer first, each candidate answer weighted by 1 / its count among the
scene's objects, then the object (`_balanced`): a guess of the most common (or least common) colour scores
about what naming any colour present scores (0.40 and 0.33 against 0.36 on colour questions).

Relation rule (`relation`): A is "left of" B when A's bounding box (centre +- size / 2) ends before B's
begins on x AND A is in B's row: their centres differ on y by at most (A.size + B.size) / 4 (half of
what boxes that just touch differ by). "right of" likewise; "above" / "below" the same
with the axes swapped (A in B's column). Objects are at least 6 pixels apart, so two objects in a row
never overlap on x. The colour form is asked for an anchor B and a direction only when exactly one object
A is in that relation to B and no other object lies entirely on that side of B with boxes overlapping
at all on the other axis (no near-miss that a reader could also take for "the object left of"). The
yes/no form is asked for two uniquely named objects A, B only when A is in the asked relation to B
(answer yes) or in the opposite one (answer no): A "left of" B is "no" only when A is right of B in B's
row, never for objects in different rows.

Captions (derived from the scene description alone, like v1's): one per image, e.g.
  "there are 4 objects a red square with a 7 at the top left a blue star a green circle with a 3 on the
   right a red ring at the bottom right"
The total count, then every object left to right (by centre x, then y) as "a {color} {shape}", then
"with a {digit}" for a marked object, then its place as in v1 (`data._place`: the location questions'
words, nothing for an object across both middle lines).

Files (`write_split`, `write_captions`): as v1 (images/, `<split>.json` in the LLaVA conversation
format, `<split>_scenes.json`, `<split>_captions.json`), except that the human turn is LLaVA-1.5's
standard image-first prompt, "<image>\\n{question}" (v1: "{question}\\n<image>"), also for the caption
prompt, and the scene objects have a "mark" field (a digit, or null). Image i of a split depends only on
(seed, split, i): a larger split extends a smaller one, and splits never share a seed. Captions draw no
random numbers: writing them changes no other file.

`vocabulary()` is v1's vocabulary followed by the words v2 adds, so a tokenizer built from it keeps v1's
word ids.
"""

import collections
import dataclasses
import sys
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import data as v1
from .data import (CAPTION_PROMPT, CAPTION_TYPE, COLORS, IMAGE_SIZE, PATCH_SIZE, SPLITS, Question, image_digest,
                   plural, split_words)

__all__ = ["VERSION", "IMAGE_SIZE", "PATCH_SIZE", "COLORS", "SHAPES", "MARKABLE_SHAPES", "DIGITS", "SPLITS",
           "MIN_OBJECTS", "MAX_OBJECTS", "QUESTION_TYPES", "CAPTION_TYPE", "CAPTION_PROMPT", "SceneObject", "Scene",
           "Question", "sample_scene", "render", "patch_labels", "mark_patches", "mark_centre", "mark_ink", "mark_box",
           "glyph", "relation", "location_questions", "neighbours", "neighbour_question", "make_questions",
           "caption", "caption_record", "vocabulary", "generate", "write_split", "write_captions", "image_digest",
           "plural", "split_words", "image_first"]

VERSION = 2
SHAPES = v1.SHAPES + ("star", "ring")
MARKABLE_SHAPES = ("circle", "square", "triangle", "diamond")  # a 10 x 14 glyph fits inside from 34 px
DIGITS = tuple(str(d) for d in range(10))
QUESTION_TYPES = ("color", "shape", "exist", "count", "location", "relation", "text")
MIN_OBJECTS, MAX_OBJECTS = 3, 9
SMALL_RANGE = (14, 27)  # 1 to 2 patches across
LARGE_RANGE = (28, 60)  # 2 to 4.3 patches across
SMALL_SHARE = 0.5
MARK_MIN_SIZE = 34
MARK_PROB = 0.6
GAP = 6  # pixels between bounding boxes
GLYPH_SCALE = 2
DIRECTIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# 5 x 7 bitmap digits (rows top to bottom, "#" = ink): fully deterministic, no system font.
_FONT = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
GLYPH_WIDTH, GLYPH_HEIGHT = 5 * GLYPH_SCALE, 7 * GLYPH_SCALE
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)
_INK = {"red": _WHITE, "green": _WHITE, "blue": _WHITE, "purple": _WHITE, "yellow": _BLACK, "orange": _BLACK}


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: its kind, colour name, centre (x, y) and bounding-box side in pixels, and its mark (a
    digit drawn on it, or None)."""

    shape: str
    color: str
    x: int
    y: int
    size: int
    mark: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Scene(v1.Scene):
    """v1's scene (objects in drawing order, the clutter's seed) of v2 objects (with their marks)."""

    object_type: ClassVar[type] = SceneObject


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Not v1's stream: the extra key keeps v2's images apart from v1's for the same (seed, split, index).
    return np.random.default_rng([seed, SPLITS[split], index, 1000 + VERSION])


def _apart(x: int, y: int, size: int, objects: Sequence[SceneObject]) -> bool:
    return all(abs(x - o.x) >= (size + o.size) / 2 + GAP or abs(y - o.y) >= (size + o.size) / 2 + GAP
               for o in objects)


def sample_scene(rng: np.random.Generator) -> Scene:
    """3 to 9 objects (see the module docstring): sizes half small, colours and shapes biased towards a
    per-scene focus colour and shape (repeats for counting), some objects in an earlier object's row or
    column, marks on large circles, squares, triangles and diamonds (always on the first object);
    bounding boxes at least GAP pixels apart."""
    colors, count = list(COLORS), int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    focus_color, focus_shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
    color_bias, shape_bias = float(rng.uniform(0.0, 0.7)), float(rng.uniform(0.0, 0.6))
    objects: List[SceneObject] = []
    for _ in range(1000):
        if len(objects) == count:
            break
        first = not objects
        color = focus_color if rng.random() < color_bias else colors[rng.integers(len(colors))]
        if first:
            shape = MARKABLE_SHAPES[rng.integers(len(MARKABLE_SHAPES))]
            size = int(rng.integers(MARK_MIN_SIZE, LARGE_RANGE[1] + 1))
        else:
            shape = focus_shape if rng.random() < shape_bias else SHAPES[rng.integers(len(SHAPES))]
            low, high = SMALL_RANGE if rng.random() < SMALL_SHARE else LARGE_RANGE
            size = int(rng.integers(low, high + 1))
        mark = None
        if shape in MARKABLE_SHAPES and size >= MARK_MIN_SIZE and (first or rng.random() < MARK_PROB):
            mark = DIGITS[rng.integers(len(DIGITS))]
        half = size // 2 + 4
        x, y = int(rng.integers(half, IMAGE_SIZE - half)), int(rng.integers(half, IMAGE_SIZE - half))
        align = rng.random()
        if objects and align < 0.45:  # in the row (or column) of an earlier object
            other = objects[rng.integers(len(objects))]
            offset = int(rng.integers(-((size + other.size) // 5), (size + other.size) // 5 + 1))
            if align < 0.3:
                y = int(np.clip(other.y + offset, half, IMAGE_SIZE - half - 1))
            else:
                x = int(np.clip(other.x + offset, half, IMAGE_SIZE - half - 1))
        if _apart(x, y, size, objects):
            objects.append(SceneObject(shape, color, x, y, size, mark))
    return Scene(tuple(objects), int(rng.integers(2**31)))


def mark_centre(obj: SceneObject) -> Tuple[int, int]:
    """Pixel centre of the object's mark: the object's centre, a little lower in a triangle (whose
    widest part is near its base)."""
    if obj.shape == "triangle":
        return obj.x, obj.y + int(round(obj.size * 0.1))
    return obj.x, obj.y


def mark_ink(obj: SceneObject) -> Tuple[int, int, int]:
    """The mark's colour: white on red, green, blue and purple, black on yellow and orange."""
    return _INK[obj.color]


def mark_box(obj: SceneObject) -> Tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel box of the mark's glyph, right and bottom exclusive."""
    cx, cy = mark_centre(obj)
    left, top = cx - GLYPH_WIDTH // 2, cy - GLYPH_HEIGHT // 2
    return left, top, left + GLYPH_WIDTH, top + GLYPH_HEIGHT


def glyph(digit: str) -> np.ndarray:
    """The digit's bitmap at GLYPH_SCALE: a (14, 10) bool array, True where ink is drawn."""
    bits = np.array([[c == "#" for c in row] for row in _FONT[digit]])
    return np.kron(bits, np.ones((GLYPH_SCALE, GLYPH_SCALE), dtype=bool))


def _draw_glyph(draw, digit: str, left: int, top: int, fill):
    for row, col in zip(*np.nonzero(glyph(digit))):
        draw.point((int(left + col), int(top + row)), fill=fill)


def _draw_object(draw, obj: SceneObject, fill=None):
    fill = COLORS[obj.color] if fill is None else fill
    h, x, y = obj.size / 2, obj.x, obj.y
    if obj.shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, h, h * 0.45)
        draw.polygon([(x + r * np.cos(a), y + r * np.sin(a) + h * 0.08) for r, a in zip(radii, angles)], fill=fill)
    elif obj.shape == "ring":
        draw.ellipse([x - h, y - h, x + h, y + h], outline=fill, width=max(2, int(round(obj.size * 0.2))))
    else:
        v1._draw_object(draw, v1.SceneObject(obj.shape, obj.color, obj.x, obj.y, obj.size), fill=fill)


def _draw_clutter(draw, rng: np.random.Generator, base: int):
    """v1's grey strokes, blobs and rings, then stronger grey edges: polygons (filled and outlined) and
    grey digits. No hue anywhere."""
    v1._draw_clutter(draw, rng, base)

    def level(spread):
        offset = int(rng.integers(spread[0], spread[1] + 1)) * (1 if rng.random() < 0.5 else -1)
        value = int(np.clip(base + offset, 0, 255))
        return (value, value, value)

    for _ in range(int(rng.integers(10, 20))):  # grey polygons, strong contrast
        cx, cy = rng.integers(0, IMAGE_SIZE, 2)
        radius = rng.uniform(6, 28)
        sides = int(rng.integers(3, 6))
        angles = rng.uniform(0, 2 * np.pi) + np.arange(sides) * 2 * np.pi / sides
        points = [(float(cx + radius * np.cos(a)), float(cy + radius * np.sin(a))) for a in angles]
        if rng.random() < 0.5:
            draw.polygon(points, fill=level((50, 110)))
        else:
            draw.polygon(points, outline=level((50, 110)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(4, 10))):  # grey digits: distractor marks
        left, top = rng.integers(0, IMAGE_SIZE - GLYPH_WIDTH, 2)
        _draw_glyph(draw, DIGITS[rng.integers(len(DIGITS))], int(left), int(top), level((60, 120)))


def render(scene: Scene):
    """The scene as a 336 x 336 RGB PIL image: background, clutter, then the objects in order, each with
    its mark."""
    return v1.render(scene, clutter=_draw_clutter, paint=_paint)


def _paint(draw, obj: SceneObject):
    """One object, then its mark."""
    _draw_object(draw, obj)
    if obj.mark is not None:
        left, top, _, _ = mark_box(obj)
        _draw_glyph(draw, obj.mark, left, top, mark_ink(obj))


def patch_labels(scene: Scene) -> np.ndarray:
    """For each of the 24 x 24 patches (row-major, like the vision tower's tokens), 1 + the index of the
    object covering most of it, or 0 where objects cover less than a quarter of the patch (as v1's, with
    v2's shapes; a ring's hole is not the ring)."""
    from PIL import Image, ImageDraw

    grid = IMAGE_SIZE // PATCH_SIZE
    if not scene.objects:
        return np.zeros(grid * grid, dtype=np.int64)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for index, obj in enumerate(scene.objects):
        _draw_object(draw, obj, fill=index + 1)
    ids = np.asarray(canvas).reshape(grid, PATCH_SIZE, grid, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    share = np.stack([(ids == index + 1).mean(axis=1) for index in range(len(scene.objects))])
    return np.where(share.max(axis=0) >= 0.25, share.argmax(axis=0) + 1, 0).astype(np.int64)


def mark_patches(scene: Scene) -> np.ndarray:
    """For each of the 576 patches, 1 + the digit of the mark with the most ink in it, or 0 (no mark)."""
    grid = IMAGE_SIZE // PATCH_SIZE
    ink = np.zeros((len(DIGITS), IMAGE_SIZE, IMAGE_SIZE))
    for obj in scene.objects:
        if obj.mark is not None:
            left, top, right, bottom = mark_box(obj)
            ink[int(obj.mark), top:bottom, left:right] += glyph(obj.mark)
    per_patch = ink.reshape(len(DIGITS), grid, PATCH_SIZE, grid, PATCH_SIZE).sum(axis=(2, 4)).reshape(len(DIGITS), -1)
    return np.where(per_patch.max(axis=0) > 0, per_patch.argmax(axis=0) + 1, 0).astype(np.int64)


def relation(a: SceneObject, b: SceneObject) -> Optional[str]:
    """Where a is relative to b: "left of", "right of", "above", "below" (a's box entirely on that side
    of b's, and a in b's row or column: centres within (a.size + b.size) / 4 on the other axis), or None."""
    reach, row, column = (a.size + b.size) / 2, abs(a.y - b.y), abs(a.x - b.x)
    if row <= reach / 2:
        if a.x + reach <= b.x:
            return "left of"
        if a.x - reach >= b.x:
            return "right of"
    if column <= reach / 2:
        if a.y + reach <= b.y:
            return "above"
        if a.y - reach >= b.y:
            return "below"
    return None


def _beside(a: SceneObject, b: SceneObject, direction: str) -> bool:
    """a lies entirely on `direction`'s side of b with boxes overlapping at all on the other axis."""
    reach = (a.size + b.size) / 2
    if direction in ("left of", "right of"):
        if abs(a.y - b.y) >= reach:
            return False
        return a.x + reach <= b.x if direction == "left of" else a.x - reach >= b.x
    if abs(a.x - b.x) >= reach:
        return False
    return a.y + reach <= b.y if direction == "above" else a.y - reach >= b.y


def _unique(objects: Sequence[SceneObject]) -> List[SceneObject]:
    """The objects no other object shares colour and shape with (those "the {color} {shape}" names)."""
    pairs = [(o.color, o.shape) for o in objects]
    return [o for o in objects if pairs.count((o.color, o.shape)) == 1]


def _balanced(options: Sequence, answer, rng: np.random.Generator, counts):
    """One of `options`: its answer (`answer(option)`) drawn first from the distinct answers, with weight
    1 / counts[answer], then the option uniformly from those with that
    answer. A colour question picked with the scene's colour counts as `counts` is no more often answered
    by the scene's most common colour than by a rarer one (an object picked uniformly would be: the
    scene's focus colour repeats, and a guess of the most common colour scored 0.53)."""
    answers = sorted({answer(option) for option in options})
    weights = np.array([1.0 / counts[a] for a in answers])
    chosen = answers[rng.choice(len(answers), p=weights / weights.sum())]
    matching = [option for option in options if answer(option) == chosen]
    return matching[rng.integers(len(matching))]


def location_questions(named: Sequence[SceneObject], by_shape: bool = False) -> List[Question]:
    """Every location question about the named objects (`_unique`): one per object and axis on which it
    lies in one half ("Is the red star on the left or the right?" -> "left"), objects in order, x before y.
    by_shape: name each object by its shape alone ("Is the star on the left or the right?"; for objects
    whose shape is unique in the scene, which the caller picks)."""
    questions = []
    for obj in named:
        for axis in ("x", "y"):
            side = v1._side(obj, axis)
            if side is None:
                continue
            where = "on the left or the right" if axis == "x" else "at the top or the bottom"
            name = obj.shape if by_shape else f"{obj.color} {obj.shape}"
            questions.append(Question("location", f"Is the {name} {where}?", side))
    return questions


def neighbours(objects: Sequence[SceneObject], named: Sequence[SceneObject]) -> list:
    """(anchor, direction, other) for each named anchor and direction with exactly one object beside the
    anchor that way (`_beside`), which also stands in that `relation` to it: what the colour form of a
    relation question asks ("What color is the object left of the red star?" -> other's colour)."""
    options = []
    for anchor in named:
        for direction in DIRECTIONS:
            near = [o for o in objects if o is not anchor and _beside(o, anchor, direction)]
            if len(near) == 1 and relation(near[0], anchor) == direction:
                options.append((anchor, direction, near[0]))
    return options


def neighbour_question(anchor: SceneObject, direction: str, other: SceneObject) -> Question:
    """The colour form of a relation question about one of `neighbours`' options."""
    return Question("relation", f"What color is the object {direction} the {anchor.color} {anchor.shape}?",
                    other.color)


def _question_of_type(kind: str, scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    objects = scene.objects
    named = _unique(objects)
    if kind in ("color", "shape"):
        counts = collections.Counter(getattr(o, kind) for o in objects)
        return v1.attribute_question(kind, objects, rng,
                                     pick=lambda unique: _balanced(unique, lambda o: getattr(o, kind), rng, counts))
    if kind == "exist":
        return v1.exist_question(objects, rng, SHAPES)
    if kind == "count":
        draw = rng.random()
        if draw < 0.2:
            return Question(kind, "How many objects are there?", str(len(objects)))
        return v1.attribute_count_question(objects, draw < 0.6, rng, SHAPES, repeated_below=0.6, any_above=0.88)
    if kind == "location":
        candidates = location_questions(named)
        return candidates[rng.integers(len(candidates))] if candidates else None
    if kind == "relation":
        if rng.random() < 0.5:  # the colour of the one object beside a named one
            options = neighbours(objects, named)
            if options:
                return neighbour_question(*_balanced(options, lambda option: option[2].color, rng,
                                                     collections.Counter(o.color for o in objects)))
        pairs = [(a, b, relation(a, b)) for a in named for b in named if a is not b and relation(a, b)]
        if not pairs:
            return None
        a, b, actual = pairs[rng.integers(len(pairs))]
        answer = "yes" if rng.random() < 0.5 else "no"
        direction = actual if answer == "yes" else OPPOSITE[actual]
        return Question(kind, f"Is the {a.color} {a.shape} {direction} the {b.color} {b.shape}?", answer)
    if kind == "text":
        marked = [o for o in named if o.mark is not None]
        if not marked:
            return None
        obj = marked[rng.integers(len(marked))]
        return Question(kind, f"What digit is on the {obj.color} {obj.shape}?", obj.mark)
    raise ValueError(f"unknown question type {kind!r}; choose one of {QUESTION_TYPES}")


def make_questions(scene: Scene, rng: np.random.Generator, count: int,
                   types: Sequence[str] = QUESTION_TYPES) -> List[Question]:
    """`count` distinct questions about the scene, types drawn in turn from a shuffled order (a type
    that does not apply to the scene is skipped), as v1's."""
    return v1.make_questions(scene, rng, count, types, question_of_type=_question_of_type)


_TEMPLATES = ("What color is the {s}?", "What shape is the {c} object?", "Is there a {c} {s} in the image?",
              "How many objects are there?", "How many {c} objects are there?", "How many {p} are there?",
              "Is the {c} {s} on the left or the right?", "Is the {c} {s} at the top or the bottom?",
              "What color is the object {d} the {c} {s}?", "Is the {c} {s} {d} the {c} {s}?",
              "What digit is on the {c} {s}?")


def vocabulary() -> List[str]:
    """Every word a v2 question, answer, caption or caption prompt can contain: v1's `vocabulary()` in
    its order, then the words v2 adds, sorted (so a tokenizer built from it keeps v1's word ids)."""
    words = set()
    for template in _TEMPLATES:
        for c in COLORS:
            for s in SHAPES:
                for d in DIRECTIONS:
                    words.update(split_words(template.format(c=c, s=s, p=plural(s), d=d)))
    words.update(COLORS)
    words.update(SHAPES)
    words.update(["yes", "no", "left", "right", "top", "bottom"])
    words.update(str(i) for i in range(MAX_OBJECTS + 1))
    words.update(DIGITS)
    words.update(split_words(CAPTION_PROMPT))
    words.update(split_words("there is 1 object there are objects a at the on with"))
    old = v1.vocabulary()
    return old + sorted(words - set(old))


def caption(scene: Scene) -> str:
    """The scene in words: its object count, then each object's colour, shape, mark ("with a 7") and
    place, left to right (see the module docstring). Depends on the scene description only."""
    count = len(scene.objects)
    words = ["there is 1 object" if count == 1 else f"there are {count} objects"]
    for obj in sorted(scene.objects, key=lambda o: (o.x, o.y, o.color, o.shape, o.size, o.mark or "")):
        words.append(f"a {obj.color} {obj.shape}")
        if obj.mark is not None:
            words.append(f"with a {obj.mark}")
        place = v1._place(obj)
        if place:
            words.append(place)
    return " ".join(words)


def image_first(text: str) -> str:
    """The human turn of a v2 record: LLaVA-1.5's standard layout, the image first ("<image>\\n{text}")."""
    return f"<image>\n{text}"


human_turn = image_first


def _this():
    return sys.modules[__name__]


def caption_record(image_name: str, scene: Scene) -> dict:
    """The LLaVA-format caption record of one image (image-first prompt, "type": "caption")."""
    return v1.caption_record(image_name, scene, testbed=_this())


def write_captions(out_dir: str, split: str) -> int:
    """Write `<split>_captions.json` from the `<split>_scenes.json` already under out_dir (no image is
    rendered again). Returns the number of captions."""
    return v1.write_captions(out_dir, split, testbed=_this())


def generate(split: str, count: int, seed: int = 0, questions_per_image: int = 3):
    """Yield (index, scene, questions) for images 0..count-1 of a split. Image i of a split depends only
    on (seed, split, i), so a larger split extends a smaller one, and splits never share a seed."""
    return v1.generate(split, count, seed, questions_per_image, testbed=_this())


def write_split(out_dir: str, split: str, count: int, seed: int = 0, questions_per_image: int = 3,
                progress: bool = True, captions: bool = True) -> Dict[str, int]:
    """Write `count` images of `split` with their questions (and, with `captions`, one caption each)
    under out_dir (see the module docstring; prompts image first). Returns {question type: number of
    questions}. The writer is v1's (`data.write_split`), given this module."""
    return v1.write_split(out_dir, split, count, seed, questions_per_image, progress, captions, testbed=_this())
