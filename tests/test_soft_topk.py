"""soft_topk: the budget holds, the implicit-function gradient is right (gradcheck), keeps the budget
under any upstream gradient, and tends to the hard top-K mask as T -> 0."""

import pytest
import torch

import autoselect
from autoselect import soft_topk
from autoselect.ops.soft_topk import density, soft_topk_backward


@pytest.fixture(params=["logistic", "laplace"])
def kind(request):
    return request.param


@pytest.mark.parametrize("B, N, k", [(1, 1, 1), (4, 577, 64), (2, 577, 577), (64, 8192, 576), (3, 10, 0.5)])
@pytest.mark.parametrize("temperature", [10.0, 1.0, 0.05, 1e-3])
def test_budget_holds(B, N, k, temperature, kind):
    g = torch.Generator().manual_seed(N)
    scores = torch.randn(B, N, generator=g) * 3
    alpha = soft_topk(scores, k, temperature, kind=kind)
    budget = k if isinstance(k, int) else round(k * N)
    assert alpha.shape == (B, N) and alpha.dtype == torch.float32
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    assert (alpha.sum(-1) - budget).abs().max() <= 1e-4 * budget


def test_per_image_budgets_and_one_image(kind):
    scores = torch.randn(3, 100)
    k = torch.tensor([1.0, 10.5, 99.0])
    alpha = soft_topk(scores, k, 0.3, kind=kind)
    torch.testing.assert_close(alpha.sum(-1), k, rtol=1e-5, atol=1e-4)
    single = soft_topk(scores[1], 10, 0.3, kind=kind)
    assert single.shape == (100, )
    torch.testing.assert_close(single.sum(), torch.tensor(10.0), rtol=1e-5, atol=1e-4)


def test_low_precision_scores_compute_in_float32(kind):
    scores = torch.randn(2, 300).to(torch.bfloat16)
    alpha = soft_topk(scores, 30, 0.2, kind=kind)
    assert alpha.dtype == torch.float32
    torch.testing.assert_close(alpha, soft_topk(scores.float(), 30, 0.2, kind=kind))


@pytest.mark.parametrize("k", [3, 0.5, torch.tensor([1.0, 7.5, 11.0])])
@pytest.mark.parametrize("temperature", [2.0, 0.3])
def test_gradcheck_float64(k, temperature, kind):
    scores = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, k, temperature, kind=kind), (scores, ))


def test_backward_matches_implicit_function_jacobian(kind):
    """The gradient equals u^T J for J_ij = (g_i / T) (delta_ij - g_j / sum g), written out."""
    T = 0.4
    scores = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    alpha = soft_topk(scores, 4, T, kind=kind)
    u = torch.randn_like(alpha)
    (grad, ) = torch.autograd.grad(alpha, scores, u)
    for b in range(2):
        g = density(alpha[b], kind).detach()
        J = (torch.diag(g) - torch.outer(g, g) / g.sum()) / T
        torch.testing.assert_close(grad[b], u[b] @ J)


def test_gradient_keeps_the_budget(kind):
    """For any upstream gradient the score gradient sums to zero per image, and a step along it
    leaves sum(alpha) = k (the Jacobian's columns sum to zero too)."""
    scores = torch.randn(4, 577, requires_grad=True)
    alpha = soft_topk(scores, 64, 0.5, kind=kind)
    for _ in range(3):
        u = torch.randn_like(alpha) * 10
        (grad, ) = torch.autograd.grad(alpha, scores, u, retain_graph=True)
        assert grad.sum(-1).abs().max() < 1e-4 * grad.abs().sum(-1).max()
    g = density(alpha, kind)
    column_sums = (g / 0.5) - (g / 0.5).sum(-1, keepdim=True) * g / g.sum(-1, keepdim=True)
    assert column_sums.abs().max() < 1e-5


def test_saturated_rows_get_zero_gradient():
    alpha = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    grad = soft_topk_backward(torch.randn(1, 4), alpha, 0.1)
    assert torch.equal(grad, torch.zeros(1, 4))


def test_small_temperature_gives_the_hard_mask(kind):
    g = torch.Generator().manual_seed(0)
    scores = torch.randperm(577, generator=g).float().reshape(1, 577) / 100  # separated by >= 0.01
    scores = torch.cat([scores, torch.randn(1, 577, generator=g).sort(-1).values.flip(-1)])
    for b in range(2):  # the second row may have close neighbours: compare where separated
        alpha = soft_topk(scores[b:b + 1], 64, 1e-3, kind=kind)[0]
        _, index = autoselect.select_topk(torch.zeros(1, 577, 1), scores[b:b + 1], 64)
        mask = torch.zeros(577)
        mask[index[0]] = 1
        gap = (scores[b] - scores[b].sort(descending=True).values[63:65].mean()).abs()
        separated = gap > 0.02
        assert separated.sum() > 500
        assert torch.allclose(alpha[separated], mask[separated], atol=1e-4)


def test_compiles_without_graph_breaks(kind):
    scores = torch.randn(2, 50, requires_grad=True)

    def f(s):
        return (soft_topk(s, 5, 0.5, kind=kind) * torch.arange(50.0)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(scores)
    (grad, ) = torch.autograd.grad(out, scores)
    (ref, ) = torch.autograd.grad(f(scores), scores)
    torch.testing.assert_close(out, f(scores))
    torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("k, temperature, error, match", [
    (0, 1.0, ValueError, r"\[1, N\]"), (11, 1.0, ValueError, r"\[1, N\]"), (1.5, 1.0, ValueError, r"\(0, 1\]"),
    (3, 0.0, ValueError, "temperature"), (3, -1.0, ValueError, "temperature"), (3, float("nan"), ValueError,
                                                                                   "temperature"),
    (torch.tensor([1.0, 2.0, 3.0]), 1.0, ValueError, r"shape \(2,\)"), (torch.tensor([0.0, 2.0]), 1.0, ValueError,
                                                                         r"\(0, N\]"),
    ("3", 1.0, TypeError, "int"),
])
def test_bad_input(k, temperature, error, match):
    with pytest.raises(error, match=match):
        soft_topk(torch.randn(2, 10), k, temperature)


def test_bad_scores():
    with pytest.raises(ValueError, match="finite"):
        soft_topk(torch.tensor([[0.0, float("nan"), 1.0]]), 1, 1.0)
    with pytest.raises(TypeError, match="floating"):
        soft_topk(torch.ones(2, 3, dtype=torch.long), 1, 1.0)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        soft_topk(torch.ones(2, 3, 4), 1, 1.0)


def test_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of logistic, laplace"):
        soft_topk(torch.randn(2, 10), 3, 1.0, kind="gumbel")


# ---------------------------------------------------------------------------------------------------
# Shift invariance and the extremes (each broke the float32 solver of the first release)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5, 1e6])
def test_shift_invariant_budget_at_small_temperature(offset, kind):
    scores = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    alpha = soft_topk(scores + offset, 64, 0.05, kind=kind)
    assert (alpha.sum(-1) - 64).abs().max() <= 1e-4 * 64
    # the same scores as float32 represents them after the shift give the same alpha
    shifted = (scores + offset) - offset
    torch.testing.assert_close(alpha, soft_topk(shifted, 64, 0.05, kind=kind), rtol=0, atol=1e-5)


def test_tiny_temperature_keeps_the_budget(kind):
    scores = torch.randn(4, 576, generator=torch.Generator().manual_seed(1))
    alpha = soft_topk(scores, 64, 1e-8, kind=kind)
    assert (alpha.sum(-1) - 64).abs().max() <= 1e-4 * 64
    _, index = autoselect.select_topk(torch.zeros(4, 576, 1), scores, 64)
    assert torch.equal(alpha.gather(-1, index), torch.ones(4, 64))


def test_equal_large_scores_share_the_budget(kind):
    alpha = soft_topk(torch.full((2, 576), 1e8), 64, 0.5, kind=kind)
    torch.testing.assert_close(alpha, torch.full((2, 576), 64 / 576))


@pytest.mark.parametrize("spread", ["near", "both signs"])
def test_scores_near_the_float32_limit(spread, kind):
    g = torch.Generator().manual_seed(2)
    if spread == "near":
        scores = torch.full((2, 576), 2e38) - torch.rand(2, 576, generator=g) * 1e37
    else:
        scores = (torch.rand(2, 576, generator=g) * 2 - 1) * 2e38
    alpha = soft_topk(scores, 64, 0.5, kind=kind)
    assert bool(torch.isfinite(alpha).all())
    assert (alpha.sum(-1) - 64).abs().max() <= 1e-4 * 64


def test_full_and_tiny_budgets(kind):
    scores = torch.randn(3, 200, generator=torch.Generator().manual_seed(3))
    alpha = soft_topk(scores, torch.tensor([1e-3, 199.5, 200.0]), 0.3, kind=kind)
    torch.testing.assert_close(alpha.sum(-1), torch.tensor([1e-3, 199.5, 200.0]), rtol=1e-5, atol=1e-5)
    assert torch.equal(alpha[2], torch.ones(200))
    assert torch.equal(soft_topk(torch.randn(1, 1), 1, 0.3, kind=kind), torch.ones(1, 1))


def test_laplace_is_the_laplace_cdf():
    """LapSum's alpha is F((s - tau) / T) with F the Laplace CDF: recover tau from one token and
    check every other token against the formula."""
    T = 0.7
    scores = torch.randn(2, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    alpha = soft_topk(scores, 40, T, kind="laplace")
    inner = (alpha > 0.01) & (alpha < 0.99)
    x = torch.where(alpha < 0.5, torch.log(2 * alpha), -torch.log(2 * (1 - alpha)))  # F^-1(alpha)
    tau = scores - T * x
    for b in range(2):
        torch.testing.assert_close(tau[b][inner[b]], tau[b][inner[b]][:1].expand(int(inner[b].sum())))
    logistic = soft_topk(scores, 40, T, kind="logistic")
    assert (alpha - logistic).abs().max() > 1e-2  # a different F, not the sigmoid under another name
