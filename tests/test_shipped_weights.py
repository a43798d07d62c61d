"""The shipped weights (weights/tiny-vlm, weights/tiny-vlm-selector) load offline, fit each other, and the
selector keeps what a token budget should keep on unseen test scenes. The full accuracy table comes from
`autoselect demo` (README, Measured); this is the fast check that the shipped files are the ones it used."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (in the [test] extra)")

from autoselect import AutoSelector  # noqa: E402
from autoselect.testbed import data  # noqa: E402
from autoselect.training.trainer import load_vlm, visual_tokens  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_vlm(str(WEIGHTS / "tiny-vlm"))
    return model, processor, AutoSelector.from_pretrained(WEIGHTS / "tiny-vlm-selector")


def test_selector_fits_the_vlm_and_was_trained_at_64(shipped):
    model, _, selector = shipped
    assert selector.config["dim"] == model.config.text_config.hidden_size == 160
    assert selector.config["keep"] == 64
    assert not any(p.requires_grad for p in model.parameters())
    log = [json.loads(line) for line in (WEIGHTS / "tiny-vlm-selector" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 300 and all(abs(e["alpha_sum_min"] - 64) < 1e-2 for e in log)


def test_selector_keeps_the_objects_of_unseen_scenes(shipped):
    """On 16 test scenes the top 64 hold every object's centre patch and most object patches; a random
    choice of 64 of 576 would hold about 11% of them."""
    model, processor, selector = shipped
    scenes = [scene for _, scene, _ in data.generate("test", 16, seed=11)]
    pixels = processor.image_processor([data.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        _, index = selector.select(visual_tokens(model, pixels), 64)
    covered, total = 0, 0
    for scene, kept in zip(scenes, index):
        kept = set(kept.tolist())
        owner = torch.as_tensor(data.patch_labels(scene))
        objects = set((owner > 0).nonzero().flatten().tolist())
        covered, total = covered + len(objects & kept), total + len(objects)
        for obj in scene.objects:
            assert (obj.y // 14) * 24 + obj.x // 14 in kept, (scene, obj)
    assert covered / total > 0.8, covered / total
