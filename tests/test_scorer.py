"""The Scorer (DESIGN.md 1.1): the Transformer variant sees the rest of its image and never another
image; the layers=0 variant is per token; select keeps the top-k by the scores it returns."""

import pytest
import torch

import autoselect
from autoselect import Scorer


def small(layers=2, dim=24, **kwargs):
    torch.manual_seed(0)
    kwargs = {"width": 32, "heads": 4, "mlp_ratio": 2, **kwargs} if layers else kwargs
    return Scorer(dim, layers=layers, **kwargs).eval()


def tokens(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_context_reaches_other_tokens_only_with_blocks(layers):
    """Changing token j changes the score of token i != j for layers >= 1, and never for layers = 0."""
    scorer = small(layers)
    x = tokens(1, 10, 24)
    changed = x.clone()
    changed[0, 7] += 3 * tokens(24, seed=2)
    with torch.no_grad():
        before, after = scorer(x), scorer(changed)
    others = torch.arange(10) != 7
    moved = (after - before)[0, others].abs().max()
    if layers == 0:
        assert moved == 0
    else:
        assert moved > 1e-3
    assert (after - before)[0, 7].abs() > 1e-3


@pytest.mark.parametrize("layers", [0, 2])
def test_images_never_see_each_other(layers):
    """Changing image b never changes image a's scores: regular and ragged batches."""
    scorer = small(layers)
    x = tokens(3, 12, 24)
    changed = x.clone()
    changed[1] = tokens(12, 24, seed=5)
    with torch.no_grad():
        before, after = scorer(x), scorer(changed)
        assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
        assert not torch.equal(before[1], after[1])
        ragged = [tokens(5, 24, seed=6), tokens(12, 24, seed=7), tokens(1, 24, seed=8)]
        scores = scorer(ragged)
        for image, score in zip(ragged, scores):  # as if each image came alone
            torch.testing.assert_close(score, scorer(image.unsqueeze(0))[0], rtol=1e-5, atol=1e-5)
        ragged_changed = [ragged[0], tokens(9, 24, seed=9), ragged[2]]
        changed_scores = scorer(ragged_changed)
        torch.testing.assert_close(changed_scores[0], scores[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(changed_scores[2], scores[2], rtol=1e-5, atol=1e-6)


def test_blocks_are_permutation_equivariant():
    """No positional signal inside the Scorer: permuting the tokens permutes the scores."""
    scorer = small(2)
    x = tokens(2, 15, 24)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(scorer(x[:, order]), scorer(x)[:, order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [0, 2])
def test_select_keeps_the_top_k_of_its_scores(layers):
    scorer = small(layers)
    x = tokens(2, 30, 24)
    kept, index, scores = scorer.select(x, 7, return_scores=True)
    with torch.no_grad():
        torch.testing.assert_close(scores, scorer(x).float(), rtol=1e-4, atol=1e-4)
    ref_kept, ref_index = autoselect.select_topk_ref(x, scores, 7)
    assert torch.equal(index, ref_index) and torch.equal(kept, ref_kept)
    ragged = [x[0, :11], x[1]]
    kept_r, index_r = scorer.select(ragged, [3, 0.5])
    assert [len(i) for i in index_r] == [3, 15]
    with torch.no_grad():
        assert torch.equal(index_r[1], autoselect.select_topk_ref(x[1:], scorer(x[1:]).float(), 15)[1][0])


def test_input_projection_only_when_widths_differ():
    assert isinstance(small(2, dim=32).proj, torch.nn.Identity)
    assert isinstance(small(2, dim=24).proj, torch.nn.Linear)
    names = set(dict(small(0).named_parameters()))
    assert names == {"norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_select_compiles_fullgraph():
    scorer = small(2)
    x = tokens(2, 20, 24)

    def select(t):
        return scorer.select(t, 5, return_scores=True)

    compiled = torch.compile(select, fullgraph=True, backend="aot_eager")
    expected = select(x)
    result = compiled(x)
    assert torch.equal(result[1], expected[1])
    torch.testing.assert_close(result[2], expected[2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=-1), "layers"), (dict(layers=2, width=30, heads=4), "multiple of heads"),
    (dict(layers=2, hidden=64), "hidden is the width of the layers=0 MLP"), (dict(layers=0, hidden=0), "hidden"),
    (dict(layers=1.5), "layers"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Scorer(24, **kwargs)


def test_bad_tokens():
    scorer = small(2)
    with pytest.raises(ValueError, match=r"\(\.\.\., N, 24\)"):
        scorer(torch.randn(2, 5, 23))
    with pytest.raises(ValueError, match="ragged batch"):
        scorer([torch.randn(2, 3, 24)])
    with pytest.raises(TypeError, match="layers=0"):
        scorer.fused_parameters(torch.float32, "cpu")
    with pytest.raises(TypeError):
        Scorer(24, 2)  # everything after dim is keyword-only: Scorer(D, H) of the first release fails loudly


@pytest.mark.parametrize("layers", [0, 2])
def test_scores_features_of_another_dtype_in_its_own(layers):
    """A float32 Scorer (as trained) on a bfloat16 VLM's features: the tokens are cast to the Scorer's
    dtype, so the scores equal those of the upcast tokens, and select gathers the bfloat16 tokens."""
    scorer = small(layers)
    x = tokens(2, 30, 24).bfloat16()
    with torch.no_grad():
        scores = scorer(x)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, scorer(x.float()), rtol=0, atol=0)
        ragged = scorer([x[0, :11], x[1]])
        torch.testing.assert_close(ragged[1], scores[1], rtol=1e-5, atol=1e-5)
    kept, index = scorer.select(x, 7)
    assert kept.dtype == torch.bfloat16
    assert torch.equal(index, autoselect.select_topk_ref(x.float(), scores, 7)[1])
    assert torch.equal(kept, torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, 24)))
    with pytest.raises(ValueError, match="floating"):
        scorer(torch.ones(2, 30, 24, dtype=torch.long))
