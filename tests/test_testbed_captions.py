"""The testbed's captions (DESIGN.md section 1 item 5, section 6): one per image, LLaVA format, words the
shipped tiny VLM can read, faithful to the scene, deterministic, and no change to any other file."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from autoselect.testbed import data, vlm
from autoselect.testbed import __main__ as cli

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "tiny-vlm"
SPLITS = {"train": 12, "val": 7, "test": 5}
CAPTION_FILES = {f"{split}_captions.json" for split in SPLITS}
PLACE = r"(?: at the (top|bottom)(?: (left|right))?| on the (left|right))?"


def parse(caption: str):
    """(count, [(color, shape, horizontal or None, vertical or None), ...]) read back from a caption;
    fails on any word the format does not allow."""
    match = re.fullmatch(r"there (?:is (1) object|are (\d) objects)((?: a \w+ \w+" + PLACE + r")*)", caption)
    assert match, f"caption not in the format: {caption!r}"
    count = int(match[1] or match[2])
    items = []
    for m in re.finditer(r" a (\w+) (\w+)" + PLACE, match[3]):
        vertical, horizontal = m[3], m[4] or m[5]
        items.append((m[1], m[2], horizontal, vertical))
    return count, items


def expected(scene: dict):
    """What the caption must say, worked out from the scene description alone: every object, left to
    right, with the half of the image it lies entirely in on each axis (None when it crosses the middle)."""
    half = data.IMAGE_SIZE / 2

    def side(centre, size, low, high):
        return low if centre + size / 2 < half else high if centre - size / 2 > half else None

    objects = sorted(scene["objects"], key=lambda o: (o["x"], o["y"]))
    return len(objects), [(o["color"], o["shape"], side(o["x"], o["size"], "left", "right"),
                           side(o["y"], o["size"], "top", "bottom")) for o in objects]


def digests(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same splits written twice: without captions and with them."""
    plain, captioned = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("captioned")
    for split, count in SPLITS.items():
        data.write_split(str(plain), split, count, seed=3, questions_per_image=3, progress=False, captions=False)
        data.write_split(str(captioned), split, count, seed=3, questions_per_image=3, progress=False)
    return plain, captioned


def test_question_files_and_images_unchanged_by_captions(folders):
    plain, captioned = folders
    without, with_captions = digests(plain), digests(captioned)
    assert not CAPTION_FILES & set(without)
    assert set(with_captions) - set(without) == CAPTION_FILES
    assert {name: with_captions[name] for name in without} == without


def test_one_caption_record_per_image(folders):
    _, out = folders
    for split, count in SPLITS.items():
        questions = json.loads((out / f"{split}.json").read_text())
        scenes = json.loads((out / f"{split}_scenes.json").read_text())
        records = json.loads((out / f"{split}_captions.json").read_text())
        assert len(records) == count
        assert [r["image"] for r in records] == list(scenes) == list(dict.fromkeys(q["image"] for q in questions))
        assert len({r["id"] for r in records}) == count
        assert not {r["id"] for r in records} & {q["id"] for q in questions}
        for record in records:
            assert set(record) == {"id", "image", "type", "conversations"}
            assert record["type"] == data.CAPTION_TYPE == "caption"
            assert (out / record["image"]).is_file()
            human, gpt = record["conversations"]
            assert human == {"from": "human", "value": f"{data.CAPTION_PROMPT}\n<image>"}
            assert gpt["from"] == "gpt" and gpt["value"] == gpt["value"].strip()
        # The prompt is laid out like every question record's: text, newline, <image>, nothing after.
        for record in questions + records:
            value = record["conversations"][0]["value"]
            text, image = value.rsplit("\n", 1)
            assert image == "<image>" and "<image>" not in text and text.endswith("?")
        assert data.CAPTION_TYPE not in data.QUESTION_TYPES


def test_captions_match_the_scenes(folders):
    _, out = folders
    for split in SPLITS:
        scenes = json.loads((out / f"{split}_scenes.json").read_text())
        for record in json.loads((out / f"{split}_captions.json").read_text()):
            assert parse(record["conversations"][1]["value"]) == expected(scenes[record["image"]]), record
    for _, scene, _ in data.generate("train", 400, seed=11):
        assert parse(data.caption(scene)) == expected(scene.to_dict())


def test_every_caption_word_is_in_the_vocabulary_and_the_shipped_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(WEIGHTS))
    # The vocabulary the shipped weights depend on is unchanged: same words, same ids.
    assert tokenizer.get_vocab() == vlm.build_tokenizer().get_vocab()
    vocabulary = set(data.vocabulary())
    seen = set()
    for _, scene, _ in data.generate("train", 300, seed=2):
        caption = data.caption(scene)
        words = data.split_words(caption)
        seen.update(words)
        assert set(words) <= vocabulary, caption
        text = vlm.prompt(f"{data.CAPTION_PROMPT}\n<image>", caption)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        answer = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(answer) == words
    assert set(data.split_words(data.CAPTION_PROMPT)) <= vocabulary
    assert {"there", "is", "are", "object", "objects", "left", "right", "top", "bottom"} <= seen
    assert set(data.COLORS) | set(data.SHAPES) <= seen


def test_a_changed_scene_changes_the_caption():
    scenes = [scene for _, scene, _ in data.generate("val", 60, seed=5) if len(scene.objects) >= 2]
    assert scenes
    for scene in scenes:
        text = data.caption(scene)
        first, rest = scene.objects[0], scene.objects[1:]
        other_color = next(c for c in data.COLORS if c != first.color)
        other_shape = next(s for s in data.SHAPES if s != first.shape)
        moved = dataclasses.replace(first, x=data.IMAGE_SIZE - first.x, y=data.IMAGE_SIZE - first.y)
        variants = [dataclasses.replace(scene, objects=rest),
                    dataclasses.replace(scene, objects=(dataclasses.replace(first, color=other_color), ) + rest),
                    dataclasses.replace(scene, objects=(dataclasses.replace(first, shape=other_shape), ) + rest)]
        if data._side(first, "x") or data._side(first, "y"):
            variants.append(dataclasses.replace(scene, objects=(moved, ) + rest))
        for variant in variants:
            assert data.caption(variant) != text, (scene, variant)
        # Only the scene description counts: the background and the listing order do not.
        assert data.caption(dataclasses.replace(scene, background_seed=scene.background_seed + 1)) == text
        assert data.caption(dataclasses.replace(scene, objects=scene.objects[::-1])) == text


def test_captions_deterministic(folders, tmp_path):
    _, out = folders
    first = [data.caption(s) for _, s, _ in data.generate("val", 50, seed=7)]
    assert first == [data.caption(s) for _, s, _ in data.generate("val", 50, seed=7)]
    assert first != [data.caption(s) for _, s, _ in data.generate("val", 50, seed=8)]
    # write_captions (from the scenes file) gives the bytes write_split wrote.
    for split in SPLITS:
        scenes = f"{split}_scenes.json"
        (tmp_path / scenes).write_bytes((out / scenes).read_bytes())
        assert data.write_captions(str(tmp_path), split) == SPLITS[split]
        assert (tmp_path / f"{split}_captions.json").read_bytes() == (out / f"{split}_captions.json").read_bytes()


def test_command_line_writes_captions(tmp_path, capsys):
    sizes = ["--train", "3", "--val", "2", "--test", "2", "--seed", "4"]
    assert cli.main(["--out", str(tmp_path / "a"), *sizes]) == 0
    assert cli.main(["--out", str(tmp_path / "b"), *sizes, "--no-captions"]) == 0
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert set(a) - set(b) == CAPTION_FILES and {name: a[name] for name in b} == b
    assert len(json.loads((tmp_path / "a" / "val_captions.json").read_text())) == 2
    assert cli.main(["--out", str(tmp_path / "b"), "--captions-only"]) == 0
    assert digests(tmp_path / "b") == a
    assert "captions" in capsys.readouterr().out
