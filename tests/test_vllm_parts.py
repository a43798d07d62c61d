"""The parts of the vLLM plugin that need no vLLM (its configuration, Qwen's M-RoPE layout), and the
Hugging Face path's positions="compact" that the plugin's LLaVA output is compared with. The plugin
itself runs in vLLM's environment: tests/vllm_plugin (`make test-vllm`)."""

import types

import numpy as np
import pytest
import torch

import autoselect
from autoselect.integrations import last_selection
from autoselect.vllm import config as C
from autoselect.vllm.select import grid_offsets, mrope_layout, place_kept_tokens

import tiny_vlms as T


# -- configuration ------------------------------------------------------------------------------------

def _hf(settings):
    return types.SimpleNamespace(autoselect=settings)


def test_no_configuration_means_no_pruning(monkeypatch):
    for name in C.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert C.from_hf_config(types.SimpleNamespace()) is None


def test_hf_overrides_win_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOSELECT_METHOD", "random")
    monkeypatch.setenv("AUTOSELECT_KEEP", "8")
    config = C.from_hf_config(_hf({"method": "norm", "keep": 0.25}))
    assert (config.method, config.keep, config.source) == ("norm", 0.25, "hf_overrides")
    env = C.from_hf_config(types.SimpleNamespace())
    assert (env.method, env.keep, env.source) == ("random", 8, "environment")
    assert env.budget(576) == 8 and config.budget(576) == 144 and config.budget(3) == 1


@pytest.mark.parametrize("settings, message", [
    ({"method": "fastv", "keep": 4}, "cannot work inside vLLM"),
    ({"method": "visionzip", "keep": 4}, "attention weights"),
    ({"method": "tome", "keep": 4}, "unknown method 'tome'"),
    ({"method": "norm"}, "no keep"),
    ({"method": "norm", "keep": 0}, ">= 1"),
    ({"method": "norm", "keep": 1.5}, "(0, 1]"),
    ({"method": "norm", "keep": "64"}, "an int"),
    ({"method": "norm", "keep": 4, "selector": "/x"}, "uses none"),
    ({"method": "autoselect", "keep": 4}, "needs a selector"),
    ({"method": "autoselect", "keep": 4, "selector": "/nonexistent"}, "does not exist"),
    ({"method": "random", "keep": 4, "seed": 1.5}, "seed must be an int"),
    ({"method": "norm", "keep": 4, "budget": 3}, "unknown setting"),
])
def test_bad_settings_are_value_errors_that_name_the_problem(settings, message):
    with pytest.raises(ValueError, match="autoselect vLLM plugin") as info:
        C.from_hf_config(_hf(settings))
    assert message in str(info.value)


def test_environment_numbers_are_checked(monkeypatch):
    monkeypatch.setenv("AUTOSELECT_METHOD", "norm")
    monkeypatch.setenv("AUTOSELECT_KEEP", "lots")
    with pytest.raises(ValueError, match="AUTOSELECT_KEEP='lots' is not a number"):
        C.from_hf_config(types.SimpleNamespace())


# -- Qwen's M-RoPE: the plugin's layout equals the kept columns of the unpruned positions -----------------

def test_mrope_layout_and_kept_offsets_equal_the_unpruned_positions():
    model, make_inputs = T.build("qwen2_vl")
    inputs = make_inputs((2,), "left")  # one row, two images of different grids
    ids, grids = inputs["input_ids"][0], inputs["image_grid_thw"].tolist()
    full = T.unpruned_positions(model, inputs)[:, 0]  # (3, L), as Hugging Face computes them
    gen = torch.Generator().manual_seed(0)
    is_image = ids == T.IMAGE
    starts = [int(i) for i in torch.nonzero(is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]]))]
    keep_cols = torch.ones_like(ids, dtype=torch.bool)
    items, kept_offsets = [], []
    removed = 0
    for start, (t, h, w) in zip(starts, grids):
        n = t * h * w // 4
        k = max(1, n // 3)
        index = torch.randperm(n, generator=gen)[:k].sort().values
        keep_cols[start:start + n] = False
        keep_cols[start + index] = True
        items.append((start - removed, t, h // 2, w // 2, k, 1.0))
        kept_offsets.append(grid_offsets(index, t, h // 2, w // 2))
        removed += n - k
    pruned_ids = ids[keep_cols]
    layout, delta = mrope_layout(int(pruned_ids.numel()), items)
    assert delta == int(full.max()) + 1 - int(pruned_ids.numel())  # decoding continues where unpruned would
    positions = torch.from_numpy(layout)
    # the encoder's outputs arrive in two steps (chunked prefill): the first image, then the second
    first = place_kept_tokens(pruned_ids, T.IMAGE, kept_offsets[:1], positions, 0)
    cut = items[1][0]
    both = place_kept_tokens(pruned_ids, T.IMAGE, kept_offsets[1:], first, cut)
    assert torch.equal(both, full[:, keep_cols])
    assert torch.equal(place_kept_tokens(pruned_ids, T.IMAGE, kept_offsets[1:], both, cut), both)  # idempotent
    assert not torch.equal(positions, full[:, keep_cols])  # the placeholders alone are not the answer


def test_mrope_layout_without_pruning_is_the_grid():
    layout, delta = mrope_layout(12, [(2, 1, 2, 3, 6, 1.0)])
    expected = np.concatenate([np.tile(np.arange(2), (3, 1)), np.indices((1, 2, 3)).reshape(3, -1) + 2,
                               np.tile(np.arange(4) + 5, (3, 1))], axis=1)
    assert np.array_equal(layout, expected) and delta == 9 - 12


# -- the Hugging Face path's compact positions ------------------------------------------------------------

def test_compact_positions_are_the_pruned_prompts_own():
    """positions="compact": the language model sees the positions the unpatched model gives a prompt that
    holds only the kept tokens (its mask's running count), at prefill and at every decode step."""
    model, make_inputs = T.build("llava")
    inputs = make_inputs((2, 1), "left")
    rec = T.RecordLanguageModel(model)
    try:
        with autoselect.pruned(model, method="norm", keep=3, positions="compact"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            keep = last_selection(model).keep_columns
        compact = rec.calls
        rec.calls = []
        with autoselect.pruned(model, method="norm", keep=3):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        original = rec.calls
    finally:
        rec.remove()
    mask = compact[0]["attention_mask"]
    assert torch.equal(compact[0]["position_ids"], (mask.cumsum(-1) - 1).clamp(min=0))
    kept_per_row = (keep & inputs["attention_mask"].bool()).sum(1)
    for step, call in enumerate(compact[1:]):
        assert torch.equal(call["position_ids"][:, 0], kept_per_row + step)
    assert not torch.equal(compact[0]["position_ids"], original[0]["position_ids"])
    assert not torch.equal(compact[1]["position_ids"], original[1]["position_ids"])


def test_compact_positions_are_refused_for_mrope():
    model, _ = T.build("qwen2_vl")
    with pytest.raises(ValueError, match="1-D position families"):
        autoselect.apply(model, method="norm", keep=3, positions="compact")
    with pytest.raises(ValueError, match="positions must be one of"):
        autoselect.apply(model, method="norm", keep=3, positions="packed")
    assert not autoselect.integrations.is_applied(model)
