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
from autoselect.training.trainer import load_vlm, placement_tokens, training_adapter  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_vlm(str(WEIGHTS / "tiny-vlm"))
    return model, processor, AutoSelector.from_pretrained(WEIGHTS / "tiny-vlm-selector")


def test_selector_fits_the_vlm_and_its_log(shipped):
    """The selector reads the tokens where its config says (the width there is the VLM's), and its
    training log kept each step's budget: the per-image sum of alpha equals that step's K."""
    model, _, selector = shipped
    adapter = training_adapter(model)
    placement = selector.config["placement"]
    assert selector.config["dim"] == adapter.feature_width(adapter.core(model), placement)
    assert not any(p.requires_grad for p in model.parameters())
    log = [json.loads(line) for line in (WEIGHTS / "tiny-vlm-selector" / "train_log.jsonl").read_text().splitlines()]
    low, high = selector.config.get("keep_range", [selector.config["keep"]] * 2)
    steps = [e for e in log if "alpha_sum_min" in e]
    assert steps and all(low <= e["keep"] <= high and abs(e["alpha_sum_min"] - e["keep"]) < 1e-2
                         and abs(e["alpha_sum_max"] - e["keep"]) < 1e-2 for e in steps)


def test_selector_keeps_the_objects_of_unseen_scenes(shipped):
    """On 16 test scenes the top 64 hold every object's centre patch and most object patches; a random
    choice of 64 of 576 would hold about 11% of them."""
    model, processor, selector = shipped
    scenes = [scene for _, scene, _ in data.generate("test", 16, seed=11)]
    pixels = processor.image_processor([data.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        _, index = selector.select(placement_tokens(model, pixels, selector.config["placement"]), 64)
    covered, total = 0, 0
    for scene, kept in zip(scenes, index):
        kept = set(kept.tolist())
        owner = torch.as_tensor(data.patch_labels(scene))
        objects = set((owner > 0).nonzero().flatten().tolist())
        covered, total = covered + len(objects & kept), total + len(objects)
        for obj in scene.objects:
            assert (obj.y // 14) * 24 + obj.x // 14 in kept, (scene, obj)
    assert covered / total > 0.8, covered / total


def test_shipped_selector_is_the_default_configuration():
    """The defaults are the ablation's choice: the README's short training command (sizes, budget and
    schedule only) describes exactly the shipped selector's configuration."""
    from autoselect.training.trainer import _temperatures, build_parser, selector_options

    args = build_parser().parse_args(
        ["--model", "m", "--data", "d.json", "--out", "o", "--keep", "64", "--scorer-width", "128",
         "--scorer-heads", "4", "--denoiser-heads", "4", "--denoiser-head-dim", "32"])
    shipped = json.loads((WEIGHTS / "tiny-vlm-selector" / "config.json").read_text())
    for key in ("format", "autoselect_version"):
        shipped.pop(key)
    assert AutoSelector(96, **selector_options(args, 96, "projector_input", (64, 64))).config == dict(shipped, dim=96)
    log = [json.loads(line) for line in (WEIGHTS / "tiny-vlm-selector" / "train_log.jsonl").read_text().splitlines()]
    assert (log[0]["temperature"], log[-1]["temperature"]) == _temperatures(args) == (2.0, 0.1)
    assert args.temperature_schedule == "cosine"
