"""Testbed v2 (issue 14 items 1, 2, 4): harder scenes where the token budget binds, relation and
digit-reading questions, the image before the question; deterministic, right by construction."""

import collections
import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image as PIL

from autoselect.testbed import __main__ as cli
from autoselect.testbed import data, data_v2

HALF = data_v2.IMAGE_SIZE / 2
PLURALS = {data_v2.plural(s): s for s in data_v2.SHAPES}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DIRECTION = r"(left of|right of|above|below)"
PLACE = r"(?: at the (top|bottom)(?: (left|right))?| on the (left|right))?"
SPLIT_SIZES = {"train": 12, "val": 10, "test": 8}


def the(objects, color, shape):
    """The one object "the {color} {shape}" names; fails when the name is ambiguous or names nothing."""
    found = [o for o in objects if o["color"] == color and o["shape"] == shape]
    assert len(found) == 1, f"'the {color} {shape}' names {len(found)} objects"
    return found[0]


def edges(o, axis):
    centre = o["x"] if axis == "x" else o["y"]
    return centre - o["size"] / 2, centre + o["size"] / 2


def strictly(a, b, direction):
    """The documented relation: a's box entirely on that side of b's, and a's centre within a quarter of
    the two sizes of b's centre on the other axis (same row or column)."""
    along, across = ("x", "y") if direction in ("left of", "right of") else ("y", "x")
    near = 4 * abs(a[across] - b[across]) <= a["size"] + b["size"]
    if direction in ("left of", "above"):
        return near and edges(a, along)[1] <= edges(b, along)[0]
    return near and edges(a, along)[0] >= edges(b, along)[1]


def loosely(a, b, direction):
    """a's box entirely on that side of b's, the boxes overlapping at all on the other axis."""
    along, across = ("x", "y") if direction in ("left of", "right of") else ("y", "x")
    low, high = edges(a, across)
    other_low, other_high = edges(b, across)
    if not (low < other_high and high > other_low):
        return False
    if direction in ("left of", "above"):
        return edges(a, along)[1] <= edges(b, along)[0]
    return edges(a, along)[0] >= edges(b, along)[1]


def recount(scene: dict, question: str) -> str:
    """The answer to `question`, worked out again from the scene description alone."""
    objects = scene["objects"]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (obj, ) = [o for o in objects if o["shape"] == m[1]]
        return obj["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj, ) = [o for o in objects if o["color"] == m[1]]
        return obj["shape"]
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if question == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        assert m[1] in data_v2.COLORS
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o["shape"] == PLURALS[m[1]] for o in objects))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (on the left or the right|at the top or the bottom)\?", question):
        obj = the(objects, m[1], m[2])
        low, high = edges(obj, "x" if "left" in m[3] else "y")
        assert high < HALF or low > HALF, "asked about an object that straddles the middle"
        return ("left" if high < HALF else "right") if "left" in m[3] else ("top" if high < HALF else "bottom")
    if m := re.fullmatch(r"What color is the object " + DIRECTION + r" the (\w+) (\w+)\?", question):
        anchor = the(objects, m[2], m[3])
        beside = [o for o in objects if o is not anchor and loosely(o, anchor, m[1])]
        assert len(beside) == 1, f"{len(beside)} objects {m[1]} the anchor"
        assert strictly(beside[0], anchor, m[1]), "the one object beside is not in the anchor's row/column"
        return beside[0]["color"]
    if m := re.fullmatch(r"Is the (\w+) (\w+) " + DIRECTION + r" the (\w+) (\w+)\?", question):
        a, b = the(objects, m[1], m[2]), the(objects, m[4], m[5])
        if strictly(a, b, m[3]):
            return "yes"
        assert strictly(a, b, OPPOSITE[m[3]]), "yes/no relation asked about objects in different rows"
        return "no"
    if m := re.fullmatch(r"What digit is on the (\w+) (\w+)\?", question):
        obj = the(objects, m[1], m[2])
        assert obj["mark"] is not None
        return obj["mark"]
    raise AssertionError(f"unexpected question {question!r}")


def parse_caption(caption: str):
    """(count, [(color, shape, mark or None, horizontal or None, vertical or None), ...]) read back from a
    caption; fails on any word the format does not allow."""
    match = re.fullmatch(r"there (?:is (1) object|are (\d) objects)((?: a \w+ \w+(?: with a \d)?" + PLACE + r")*)",
                         caption)
    assert match, f"caption not in the format: {caption!r}"
    items = []
    for m in re.finditer(r" a (\w+) (\w+)(?: with a (\d))?" + PLACE, match[3]):
        items.append((m[1], m[2], m[3], m[5] or m[6], m[4]))
    return int(match[1] or match[2]), items


def expected_caption(scene: dict):
    def side(o, axis, low, high):
        lo, hi = edges(o, axis)
        return low if hi < HALF else high if lo > HALF else None

    objects = sorted(scene["objects"], key=lambda o: (o["x"], o["y"]))
    return len(objects), [(o["color"], o["shape"], o["mark"], side(o, "x", "left", "right"),
                           side(o, "y", "top", "bottom")) for o in objects]


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed_v2")
    for split, count in SPLIT_SIZES.items():
        data_v2.write_split(str(out), split, count, seed=3, progress=False)
    return out


@pytest.fixture(scope="module")
def many():
    """300 training images' scenes and questions, not rendered."""
    return [(scene, questions) for _, scene, questions in data_v2.generate("train", 300, seed=1)]


def test_files_image_first_llava_format(written):
    for split, count in SPLIT_SIZES.items():
        records = json.loads((written / f"{split}.json").read_text())
        captions = json.loads((written / f"{split}_captions.json").read_text())
        scenes = json.loads((written / f"{split}_scenes.json").read_text())
        assert len(records) == 3 * count and len(captions) == count == len(scenes)
        assert len({r["id"] for r in records + captions}) == len(records) + count
        for record in records + captions:
            assert set(record) == {"id", "image", "type", "conversations"}
            human, gpt = record["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            # LLaVA-1.5's standard prompt: the image first, then the question; the image only once.
            image, text = human["value"].split("\n", 1)
            assert image == "<image>" and "<image>" not in text and text.endswith("?")
            assert (written / record["image"]).is_file()
        for record in records:
            assert record["type"] in data_v2.QUESTION_TYPES
            assert len(record["conversations"][1]["value"].split()) == 1
        for record in captions:
            assert record["type"] == "caption"
            assert record["conversations"][0]["value"] == f"<image>\n{data_v2.CAPTION_PROMPT}"
    image = PIL.open(written / records[0]["image"])
    assert image.size == (336, 336) and image.mode == "RGB"


def test_answers_right_by_construction(written, many):
    for split in SPLIT_SIZES:
        scenes = json.loads((written / f"{split}_scenes.json").read_text())
        for record in json.loads((written / f"{split}.json").read_text()):
            question = record["conversations"][0]["value"].split("\n", 1)[1]
            assert recount(scenes[record["image"]], question) == record["conversations"][1]["value"], record
    types = set()
    for scene, questions in many:
        for q in questions:
            assert recount(scene.to_dict(), q.text) == q.answer, (scene, q)
            types.add(q.type)
    assert types == set(data_v2.QUESTION_TYPES)


def test_relation_rule_on_hand_made_scenes():
    obj = data_v2.SceneObject
    anchor = obj("square", "red", 200, 100, 40)
    left = obj("circle", "blue", 120, 108, 30)          # in the anchor's row, entirely left
    far_left = obj("star", "green", 40, 95, 30)         # also left, in the row
    below = obj("ring", "yellow", 204, 200, 30)         # in the anchor's column, below
    diagonal = obj("cross", "purple", 300, 240, 30)     # no relation to anything

    def asked(*objects):
        scene = data_v2.Scene(objects, 0)
        rng = np.random.default_rng(0)
        return {(q.text, q.answer) for _ in range(60) for q in data_v2.make_questions(scene, rng, 1, ("relation", ))}

    questions = asked(anchor, left, below, diagonal)
    assert ("What color is the object left of the red square?", "blue") in questions
    assert ("What color is the object right of the blue circle?", "red") in questions
    assert ("What color is the object below the red square?", "yellow") in questions
    assert {("Is the blue circle left of the red square?", "yes"),
            ("Is the blue circle right of the red square?", "no")} & questions
    assert not any("purple" in text for text, _ in questions)
    # Two objects on the left: "the object left of the red square" is ambiguous, never asked.
    questions = asked(anchor, left, far_left)
    assert not any(text.startswith("What color is the object left of the red square") for text, _ in questions)
    assert data_v2.relation(left, anchor) == "left of" and data_v2.relation(anchor, below) == "above"
    assert data_v2.relation(diagonal, anchor) is None


def test_marks_are_drawn(written):
    scenes = json.loads((written / "test_scenes.json").read_text())
    checked = 0
    for image_name, description in scenes.items():
        scene = data_v2.Scene.from_dict(description)
        pixels = np.asarray(PIL.open(written / image_name)).astype(int)
        for index, o in enumerate(scene.objects):
            if o.mark is None:
                continue
            # Rendered again without this one mark: only the glyph's pixels, near the centre, change, to
            # the ink colour, which contrasts with the object's fill.
            plain = dataclasses.replace(scene, objects=tuple(dataclasses.replace(p, mark=None) if i == index else p
                                                             for i, p in enumerate(scene.objects)))
            without = np.asarray(data_v2.render(plain)).astype(int)
            changed = np.argwhere((pixels != without).any(axis=2))
            assert len(changed) >= 30, (image_name, o)
            cy = o.y + (o.size * 0.1 if o.shape == "triangle" else 0)
            assert np.abs(changed[:, 0] - cy).max() <= 7.5 and np.abs(changed[:, 1] - o.x).max() <= 5, o
            ink = {tuple(pixels[y, x]) for y, x in changed}
            assert len(ink) == 1
            ink = np.array(ink.pop())
            fill = np.array(data_v2.COLORS[o.color])
            assert abs((ink - fill) @ [0.299, 0.587, 0.114]) > 100, o
            assert {tuple(without[y, x]) for y, x in changed} == {tuple(fill)}, "mark not inside the object"
            checked += 1
    assert checked >= len(scenes)  # every scene has at least one marked object


def test_two_scenes_differing_in_the_digit_render_differently():
    windows = set()
    for shape in data_v2.MARKABLE_SHAPES:
        for digit in data_v2.DIGITS:
            scene = data_v2.Scene((data_v2.SceneObject(shape, "yellow", 168, 168, 34, digit), ), 5)
            image = np.asarray(data_v2.render(scene))
            windows.add(image[150:190, 150:190].tobytes())
        blank = data_v2.Scene((data_v2.SceneObject(shape, "yellow", 168, 168, 34), ), 5)
        windows.add(np.asarray(data_v2.render(blank))[150:190, 150:190].tobytes())
    assert len(windows) == 11 * len(data_v2.MARKABLE_SHAPES)


def test_deterministic_and_splits_disjoint():
    first = list(data_v2.generate("val", 20, seed=7))
    assert first == list(data_v2.generate("val", 20, seed=7))
    assert first[:8] == list(data_v2.generate("val", 8, seed=7))  # a larger split extends a smaller one
    assert first != list(data_v2.generate("val", 20, seed=8))
    same = [data_v2.image_digest(data_v2.render(s)) for _, s, _ in first[:5]]
    assert same == [data_v2.image_digest(data_v2.render(s)) for _, s, _ in data_v2.generate("val", 5, seed=7)]
    digests = {split: {data_v2.image_digest(data_v2.render(s)) for _, s, _ in data_v2.generate(split, 40, seed=0)}
               for split in ("train", "val", "test")}
    assert all(len(d) == 40 for d in digests.values())
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    # Not v1's scenes under another name.
    v1 = {data.image_digest(data.render(s)) for _, s, _ in data.generate("train", 40, seed=0)}
    assert not v1 & digests["train"]


def test_scenes_many_objects_small_ones_and_marks(many):
    counts = collections.Counter(len(scene.objects) for scene, _ in many)
    assert set(counts) == set(range(3, 10))
    sizes = np.array([o.size for scene, _ in many for o in scene.objects])
    across = np.floor(sizes / data_v2.PATCH_SIZE).astype(int)  # patches across: 1 to 4
    assert sizes.min() >= 14 and sizes.max() <= 60 and set(across) == {1, 2, 3, 4}
    assert (sizes < 28).mean() > 0.3  # several small objects per scene
    for scene, _ in many:
        assert any(o.mark is not None for o in scene.objects)
        for o in scene.objects:
            assert o.mark is None or (o.mark in data_v2.DIGITS and o.size >= 34 and o.shape in data_v2.MARKABLE_SHAPES)
            assert o.size / 2 <= o.x <= 336 - o.size / 2 and o.size / 2 <= o.y <= 336 - o.size / 2
        for i, a in enumerate(scene.objects):  # bounding boxes apart
            for b in scene.objects[i + 1:]:
                reach = (a.size + b.size) / 2
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach
    # Repeats: counting needs more than one token per distinct-looking object.
    assert np.mean([max(collections.Counter(o.color for o in s.objects).values()) >= 3 for s, _ in many]) > 0.3


def test_balance_and_answer_spread(many):
    questions = [q for _, qs in many for q in qs]
    assert len(questions) == 3 * len(many)
    types = collections.Counter(q.type for q in questions)
    assert set(types) == set(data_v2.QUESTION_TYPES)
    assert min(types.values()) > 0.6 * len(questions) / len(types)
    assert max(types.values()) < 1.5 * len(questions) / len(types)
    answers = {t: collections.Counter(q.answer for q in questions if q.type == t) for t in types}
    for kind, counter in answers.items():
        assert counter.most_common(1)[0][1] / sum(counter.values()) < (0.6 if kind == "exist" else 0.45), kind
    assert 0.4 < answers["exist"]["yes"] / sum(answers["exist"].values()) < 0.6
    yes_no = answers["relation"]["yes"] + answers["relation"]["no"]
    assert 0.35 < answers["relation"]["yes"] / yes_no < 0.65
    assert 0.2 < yes_no / sum(answers["relation"].values()) < 0.8  # both relation forms
    assert {str(n) for n in range(2, 9)} <= set(answers["count"])
    assert set(answers["text"]) == set(data_v2.DIGITS)


def test_every_word_in_the_vocabulary(many):
    vocabulary = data_v2.vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    assert vocabulary[:len(data.vocabulary())] == data.vocabulary()  # v1's word ids kept
    words = set(data_v2.split_words(data_v2.CAPTION_PROMPT))
    for scene, questions in many:
        for q in questions:
            words.update(data_v2.split_words(q.text) + [q.answer])
        words.update(data_v2.split_words(data_v2.caption(scene)))
    assert words <= set(vocabulary), words - set(vocabulary)
    assert {"digit", "with", "of", "above", "below", "star", "ring", "9"} <= words


def test_captions_mention_every_object_and_mark(written, many):
    for split in SPLIT_SIZES:
        scenes = json.loads((written / f"{split}_scenes.json").read_text())
        for record in json.loads((written / f"{split}_captions.json").read_text()):
            caption = record["conversations"][1]["value"]
            assert parse_caption(caption) == expected_caption(scenes[record["image"]]), record
    for scene, _ in many:
        assert parse_caption(data_v2.caption(scene)) == expected_caption(scene.to_dict())
        marked = next(o for o in scene.objects if o.mark is not None)
        other = str((int(marked.mark) + 1) % 10)
        changed = tuple(dataclasses.replace(o, mark=other) if o is marked else o for o in scene.objects)
        assert data_v2.caption(dataclasses.replace(scene, objects=changed)) != data_v2.caption(scene)


def test_write_captions_gives_the_same_bytes(written, tmp_path):
    for split, count in SPLIT_SIZES.items():
        (tmp_path / f"{split}_scenes.json").write_bytes((written / f"{split}_scenes.json").read_bytes())
        assert data_v2.write_captions(str(tmp_path), split) == count
        assert (tmp_path / f"{split}_captions.json").read_bytes() == (written / f"{split}_captions.json").read_bytes()


def test_patch_labels_follow_the_objects(many):
    for scene, _ in many[:30]:
        labels = data_v2.patch_labels(scene)
        assert labels.shape == (576, )
        for index, o in enumerate(scene.objects):
            if o.shape != "ring" and o.size >= 28:  # a ring's centre is its hole
                assert labels[(o.y // 14) * 24 + o.x // 14] == index + 1, o
        marks = data_v2.mark_patches(scene)
        for o in scene.objects:
            if o.mark is not None:
                assert marks[(o.y // 14) * 24 + o.x // 14] == int(o.mark) + 1 or o.shape == "triangle"
        assert (marks > 0).sum() >= sum(o.mark is not None for o in scene.objects)


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split"):
        next(data_v2.generate("dev", 1))


def test_command_line_versions(tmp_path, capsys):
    sizes = ["--train", "2", "--val", "2", "--test", "1", "--seed", "4"]
    assert cli.main(["--out", str(tmp_path / "v2"), *sizes, "--version", "2"]) == 0
    assert "relation" in capsys.readouterr().out
    records = json.loads((tmp_path / "v2" / "val.json").read_text())
    assert len(records) == 6 and all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    scenes = json.loads((tmp_path / "v2" / "val_scenes.json").read_text())
    assert all("mark" in o for s in scenes.values() for o in s["objects"])
    direct = tmp_path / "direct"
    for split, count in (("train", 2), ("val", 2), ("test", 1)):
        data_v2.write_split(str(direct), split, count, seed=4, progress=False)
    assert digests(tmp_path / "v2") == digests(direct)
    # Version 1 stays the default and unchanged: the question, then the image.
    assert cli.main(["--out", str(tmp_path / "v1"), *sizes, "--version", "1"]) == 0
    assert cli.main(["--out", str(tmp_path / "default"), *sizes]) == 0
    assert digests(tmp_path / "v1") == digests(tmp_path / "default")
    direct = tmp_path / "direct_v1"
    for split, count in (("train", 2), ("val", 2), ("test", 1)):
        data.write_split(str(direct), split, count, seed=4, questions_per_image=3, progress=False)
    assert digests(tmp_path / "v1") == digests(direct)
    records = json.loads((tmp_path / "v1" / "val.json").read_text())
    assert all(r["conversations"][0]["value"].endswith("?\n<image>") for r in records)
    assert "relation" not in records[0]["type"]
    # --captions-only with --version 2 rewrites v2's caption files from its scenes, byte for byte.
    captions = (tmp_path / "v2" / "val_captions.json").read_bytes()
    (tmp_path / "v2" / "val_captions.json").unlink()
    assert cli.main(["--out", str(tmp_path / "v2"), "--captions-only", "--version", "2"]) == 0
    assert (tmp_path / "v2" / "val_captions.json").read_bytes() == captions


def _credit(values, answer, pick):
    """Expected score of guessing one of the `pick` (most or least) common values, ties broken at random."""
    counts = collections.Counter(values)
    best = pick(counts.values())
    tied = [value for value, n in counts.items() if n == best]
    return (answer in tied) / len(tied)


@pytest.mark.parametrize("kind", ["color", "shape", "relation"])
def test_scene_statistics_do_not_give_the_answer_away(kind):
    """A guess from the scene's colour (shape) counts alone, without looking anything up, scores about
    what naming any colour (shape) present scores: the generator picks the answer with weight 1 / its
    count, so the focus colour's repeats do not make "the most common colour" the answer (it scored 0.53
    on colour questions when the object was picked uniformly)."""
    attribute = "shape" if kind == "shape" else "color"
    majority, least, present = [], [], []
    for index in range(2500):
        rng = data_v2._rng(5, "train", index)
        scene = data_v2.sample_scene(rng)
        question = data_v2._question_of_type(kind, scene, rng)
        if question is None or question.answer in ("yes", "no"):
            continue
        values = [getattr(o, attribute) for o in scene.objects]
        majority.append(_credit(values, question.answer, max))
        least.append(_credit(values, question.answer, min))
        present.append((question.answer in values) / len(set(values)))
    assert len(majority) > 600
    assert np.mean(present) > 0.25
    assert np.mean(majority) - np.mean(present) < 0.08, (np.mean(majority), np.mean(present))
    assert np.mean(least) - np.mean(present) < 0.08, (np.mean(least), np.mean(present))
