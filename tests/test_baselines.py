"""Every selection method keeps exactly K per image, ascending, deterministically; bad budgets fail
clearly; method="autoselect" takes a selector object or a saved AutoSelector path."""

import pytest
import torch

import autoselect
from autoselect.baselines import divprune_select, norm_select, random_select, visionzip_select
from autoselect.baselines.divprune import divprune_index
from autoselect.baselines.visionzip import visionzip_image
from autoselect.integrations import last_selection

import tiny_vlms as T

METHODS = ["random", "norm", "fastv", "visionzip", "divprune"]


@pytest.fixture(scope="module")
def models():
    return {family: T.build(family) for family in T.FAMILIES}


@pytest.mark.parametrize("family", T.FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_exactly_k_per_image_and_deterministic(models, family, method):
    model, make_inputs = models[family]
    inputs = make_inputs((2, 1), "left")
    runs = []
    for _ in range(2):
        with autoselect.pruned(model, method=method, keep=3):
            with torch.no_grad():
                logits = model(**inputs).logits
            selection = last_selection(model)
        runs.append((logits, selection.index))
    assert [len(i) for i in runs[0][1]] == [3, 3, 3]
    for index, n in zip(runs[0][1], selection.num_tokens):
        assert index.dtype == torch.int64 and torch.all(index[1:] > index[:-1]) and 0 <= index[0] and index[-1] < n
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert torch.equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize("method", METHODS)
def test_budget_larger_than_the_image_and_errors(models, method):
    model, make_inputs = models["llava"]
    inputs = make_inputs((1, 1), "left")
    with torch.no_grad():
        reference = model(**inputs).logits
    with autoselect.pruned(model, method=method, keep=17):  # 16 tokens per image: a larger budget keeps them all
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
        assert [len(i) for i in last_selection(model).index] == [16, 16]
    for keep in (0, 1.5):
        with pytest.raises(ValueError):
            autoselect.apply(model, method=method, keep=keep)


def test_random_depends_on_the_seed_only():
    x = [torch.randn(50, 8), torch.randn(30, 8)]
    a = random_select(x, 7, seed=1)[1]
    b = random_select([t * 2 for t in x], 7, seed=1)[1]  # token values do not matter
    c = random_select(x, 7, seed=2)[1]
    assert all(torch.equal(i, j) for i, j in zip(a, b))
    assert not all(torch.equal(i, j) for i, j in zip(a, c))
    with pytest.raises(TypeError, match="seed"):
        random_select(x, 7, seed="1")


def test_norm_keeps_the_largest_norms():
    x = torch.randn(40, 16)
    x[[3, 17, 25]] *= 10
    kept, index = norm_select([x], 3)
    assert index[0].tolist() == [3, 17, 25]
    assert torch.equal(kept[0], x[[3, 17, 25]])


def test_divprune_picks_one_of_each_cluster():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1) * 5
    labels = torch.arange(40) % 4
    x = centers[labels] + 0.01 * torch.randn(40, 32)
    index = divprune_index(x, 4)
    assert sorted(labels[index].tolist()) == [0, 1, 2, 3]
    # identical tokens: still k distinct indices
    same = torch.ones(10, 4)
    assert divprune_index(same, 5).unique().numel() == 5
    kept, idx = divprune_select([x, same], 0.5)
    assert [len(i) for i in idx] == [20, 5]


def test_visionzip_dominant_plus_contextual():
    torch.manual_seed(0)
    x = torch.randn(20, 6)
    scores = torch.arange(20, dtype=torch.float32)  # tokens 16..19 most attended
    keys = torch.randn(20, 4)
    kept, index = visionzip_image(x, scores, keys, 6, contextual=2)
    assert len(index) == 6 and torch.all(index[1:] > index[:-1])
    assert set(range(16, 20)) <= set(index.tolist())
    contextual = [i for i in index.tolist() if i < 16]
    assert len(contextual) == 2
    for pos, i in enumerate(index.tolist()):
        if i >= 16:
            assert torch.equal(kept[pos], x[i])  # dominant tokens pass unchanged
        else:
            assert not torch.equal(kept[pos], x[i])  # contextual tokens carry their merged group
    kept, index = visionzip_select([x], [(scores, keys)], 6)
    assert len(index[0]) == 6


class StandIn:
    """Anything with select(x, k) -> (kept, index) as autoselect.select_topk."""

    def __init__(self):
        self.calls = 0

    def select(self, x, k):
        self.calls += 1
        return autoselect.select_topk(x, [t[:, 0].float() for t in x], k)


def test_autoselect_method_with_a_stand_in(models):
    model, make_inputs = models["llava"]
    inputs = make_inputs((1, 1), "left")
    selector = StandIn()
    with autoselect.pruned(model, selector, keep=4):
        with torch.no_grad():
            out = model(**inputs)
        assert [len(i) for i in last_selection(model).index] == [4, 4]
    assert selector.calls == 1 and out.logits.shape[1] == inputs["input_ids"].shape[1] - 12  # 16 -> 4 tokens in each row
    with pytest.raises(TypeError, match="select"):
        autoselect.apply(model, object(), keep=4)
    with pytest.raises(ValueError, match="training-free"):
        autoselect.apply(model, selector, method="norm")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_autoselect_method_with_an_autoselector(models, family, tmp_path):
    model, make_inputs = models[family]
    inputs = make_inputs((1, 2), "left")
    torch.manual_seed(0)
    selector = autoselect.AutoSelector(model.config.get_text_config().hidden_size, denoiser=None)
    with torch.no_grad():
        reference = model(**inputs).logits
    with autoselect.pruned(model, selector, keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
    with autoselect.pruned(model, selector, keep=3):
        with torch.no_grad():
            out = model(**inputs)
        index = last_selection(model).index
    assert [len(i) for i in index] == [3, 3, 3]
    # the selection is the Scorer's top-3 of each image
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], **({"image_grid_thw": inputs["image_grid_thw"]} if family != "llava" else {})
        ).pooler_output
        for f, i in zip(features, index):
            assert torch.equal(i, torch.sort(torch.topk(selector.scorer(f), 3).indices).values)
    selector.save_pretrained(tmp_path / "sel")
    with autoselect.pruned(model, str(tmp_path / "sel"), keep=3):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, out.logits)
