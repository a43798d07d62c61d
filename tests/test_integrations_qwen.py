"""Qwen2-VL / Qwen2.5-VL specifics: M-RoPE positions from the unpruned sequence, rope deltas."""

import pytest
import torch

import autoselect
from autoselect.integrations import last_selection

import tiny_vlms as T


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_columns_and_decode_deltas(kind):
    model, make_inputs = T.build(kind)
    inputs = make_inputs((2, 1), "left")
    full, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    rec = T.RecordLanguageModel(model)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)  # unpatched: computes positions and rope deltas itself
        ref_prefill = rec.calls[-1]["position_ids"]
        with autoselect.pruned(model, method="norm", keep=2):
            model.model.rope_deltas = None
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
                keep = last_selection(model).keep_columns
                # rope deltas come from the UNPRUNED sequence (they would be larger on the pruned one)
                assert torch.equal(model.model.rope_deltas, deltas)
                step = torch.tensor([[5], [6]])
                mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
                model(input_ids=step, attention_mask=mask, cache=out.cache, use_cache=True)
                model(input_ids=step, cache=out.cache, use_cache=True)  # no mask, no positions
    finally:
        rec.remove()
    assert torch.equal(ref_prefill, full)
    prefill, decode_masked, decode_plain = (c["position_ids"] for c in rec.calls[-3:])
    assert prefill.shape == (3, 2, int(keep.sum(1).max()))
    for b in range(2):
        kept = full[:, b, keep[b]]
        assert torch.equal(prefill[:, b, -kept.shape[1]:], kept)  # the kept M-RoPE columns
    length = inputs["input_ids"].shape[1]
    text_next = mask.cumsum(-1)[:, -1:] - 1  # the unpruned text position of the new token
    assert torch.equal(decode_masked, (text_next + deltas).unsqueeze(0).expand(3, -1, -1))
    assert torch.equal(decode_plain, (torch.full((2, 1), length + 1) + deltas).unsqueeze(0).expand(3, -1, -1))
    # the vision rows of the image tokens really are 2-D (height / width differ), so columns matter
    assert not torch.equal(full[1], full[2])


def test_videos_pass_through_unpruned():
    model, make_inputs = T.build("qwen2_vl")
    inputs = make_inputs((1, 1), "left")
    gen = torch.Generator().manual_seed(5)
    # append a 2-frame video (t=2 patches of 2 frames -> grid (1, 4, 4): 4 merged tokens) to every row
    n_video = 4
    video = [T.VISION_START] + [T.VIDEO] * n_video + [T.VISION_END]
    ids = torch.cat([inputs["input_ids"], torch.tensor([video] * 2)], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, len(video), dtype=torch.long)], 1)
    types = (ids == T.IMAGE).long() + 2 * (ids == T.VIDEO).long()
    batch = dict(inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                 pixel_values_videos=torch.randn(2 * 16, 3 * 2 * 14 * 14, generator=gen),
                 video_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    with torch.no_grad():
        reference = model(**batch).logits
    with autoselect.pruned(model, method="norm", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, reference)
    with autoselect.pruned(model, method="norm", keep=2):
        with torch.no_grad():
            out = model(**batch)
        keep = last_selection(model).keep_columns
    assert bool(keep[ids == T.VIDEO].all())
    assert out.logits.shape[1] == int(keep.sum(1).max()) < ids.shape[1]
