"""The testbed's visual questions: deterministic, right by construction, disjoint splits."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image as PIL

from autoselect.testbed import data


def recount(scene: dict, question: str) -> str:
    """The answer to `question`, worked out again from the scene description alone."""
    objects = scene["objects"]
    half = data.IMAGE_SIZE / 2
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (obj, ) = [o for o in objects if o["shape"] == m[1]]
        return obj["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj, ) = [o for o in objects if o["color"] == m[1]]
        return obj["shape"]
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        singular = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
                    "crosses": "cross"}[m[1]]
        return str(sum(o["shape"] == singular for o in objects))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (on the left or the right|at the top or the bottom)\?", question):
        (obj, ) = [o for o in objects if o["color"] == m[1] and o["shape"] == m[2]]
        centre = obj["x"] if "left" in m[3] else obj["y"]
        low, high = ("left", "right") if "left" in m[3] else ("top", "bottom")
        assert abs(centre - half) > obj["size"] / 2, "asked about an object that straddles the middle"
        return low if centre < half else high
    raise AssertionError(f"unexpected question {question!r}")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    counts = {split: data.write_split(str(out), split, 40, seed=3, questions_per_image=3, progress=False)
              for split in ("train", "val", "test")}
    return out, counts


def test_llava_format_and_images(written):
    out, _ = written
    records = json.loads((out / "val.json").read_text())
    assert len(records) == 40 * 3
    for record in records:
        assert set(record) == {"id", "image", "type", "conversations"}
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].endswith("\n<image>")
        assert gpt["from"] == "gpt" and len(gpt["value"].split()) == 1
        assert record["type"] in data.QUESTION_TYPES
    image = PIL.open(out / records[0]["image"])
    assert image.size == (336, 336) and image.mode == "RGB"
    assert len({r["id"] for r in records}) == len(records)


def test_answers_right_by_construction(written):
    out, _ = written
    for split in ("train", "val", "test"):
        scenes = json.loads((out / f"{split}_scenes.json").read_text())
        for record in json.loads((out / f"{split}.json").read_text()):
            question = record["conversations"][0]["value"].rsplit("\n", 1)[0]
            assert recount(scenes[record["image"]], question) == record["conversations"][1]["value"], record


def test_objects_drawn_where_described(written):
    """Each object's centre pixel has the object's colour: the image shows what the scene says."""
    out, _ = written
    scenes = json.loads((out / "test_scenes.json").read_text())
    for image_name, scene in scenes.items():
        pixels = np.asarray(PIL.open(out / image_name))
        for obj in scene["objects"]:
            assert tuple(pixels[obj["y"], obj["x"]]) == data.COLORS[obj["color"]], (image_name, obj)


def test_deterministic():
    first = [(s, q) for _, s, q in data.generate("val", 30, seed=7, questions_per_image=2)]
    second = [(s, q) for _, s, q in data.generate("val", 30, seed=7, questions_per_image=2)]
    assert first == second
    assert data.image_digest(data.render(first[5][0])) == data.image_digest(data.render(second[5][0]))
    other = [(s, q) for _, s, q in data.generate("val", 30, seed=8, questions_per_image=2)]
    assert first != other


def test_splits_disjoint():
    digests = {split: {data.image_digest(data.render(scene)) for _, scene, _ in data.generate(split, 150, seed=0)}
               for split in ("train", "val", "test")}
    assert all(len(d) == 150 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_balance_and_coverage():
    types, exist_answers, words = [], [], set()
    for _, _, questions in data.generate("train", 600, seed=1, questions_per_image=2):
        for q in questions:
            types.append(q.type)
            words.update(data.split_words(q.text) + [q.answer])
            if q.type == "exist":
                exist_answers.append(q.answer)
    assert set(types) == set(data.QUESTION_TYPES)
    assert min(types.count(t) for t in data.QUESTION_TYPES) > 0.12 * len(types)
    assert 0.4 < exist_answers.count("yes") / len(exist_answers) < 0.6
    assert words <= set(data.vocabulary())


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split"):
        next(data.generate("dev", 1))


def test_patch_labels_follow_the_objects():
    """The patch under each object's centre belongs to that object; patches far from every object are
    background; labels are row-major over the 24 x 24 grid, like the vision tower's tokens."""
    for _, scene, _ in data.generate("val", 40, seed=4):
        labels = data.patch_labels(scene)
        assert labels.shape == (576, )
        for index, obj in enumerate(scene.objects):
            assert labels[(obj.y // 14) * 24 + obj.x // 14] == index + 1, obj
        for patch in range(576):
            cx, cy = (patch % 24) * 14 + 7, (patch // 24) * 14 + 7
            if all(abs(cx - o.x) > o.size / 2 + 14 or abs(cy - o.y) > o.size / 2 + 14 for o in scene.objects):
                assert labels[patch] == 0
