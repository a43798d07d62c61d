"""`autoselect show`: kept patches outlined, the others dimmed; the selection is the patched model's."""

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (in the [test] extra)")

from PIL import Image  # noqa: E402

from autoselect import show  # noqa: E402
from autoselect.testbed import data, vlm  # noqa: E402

SMALL = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)


def test_draw_selection_outlines_kept_and_dims_the_rest():
    image = Image.new("RGB", (40, 40), (200, 200, 200))
    drawn = show.draw_selection(image, [0, 5], grid=4, outline=(255, 0, 0), dim=0.5)
    assert drawn.getpixel((0, 0)) == (255, 0, 0)  # outline of patch 0
    assert drawn.getpixel((5, 5)) == (200, 200, 200)  # inside patch 0: untouched
    assert drawn.getpixel((15, 15)) == (200, 200, 200)  # inside patch 5 (row 1, column 1)
    assert drawn.getpixel((25, 5)) == (100, 100, 100)  # patch 2: dimmed
    assert image.getpixel((25, 5)) == (200, 200, 200)  # the input is not modified


def test_show_draws_the_models_selection(tmp_path):
    processor = vlm.build_processor()
    model = vlm.build_model(seed=0, tokenizer=processor.tokenizer, **SMALL).eval()
    scene = next(data.generate("test", 1))[1]
    image = data.render(scene)
    index = show.kept_indices(model, processor, image, method="norm", keep=20)
    assert len(index) == 20 and index == sorted(index)
    sheet = show.show(model, processor, [image, image], methods=["norm", "random"], keep=20)
    assert sheet.size[0] > 2 * 336 and sheet.size[1] > 2 * 336
    sheet.save(tmp_path / "kept.png")
    assert (tmp_path / "kept.png").stat().st_size > 0
