"""Soft top-K budget gate (DESIGN.md 1.2).

    alpha_n = sigmoid((s_n - tau) / T),   tau per image such that sum_n alpha_n = k

tau is found in the op-math dtype (float32, or float64 for float64 scores) by bisection on a bracket
where the sum runs from N to 0, then polished by safeguarded Newton steps; the loop never enters
autograd. The backward is the implicit-function formula, not a differentiation of the solver:

    d alpha_i / d s_j = (g_i / T) (delta_ij - g_j / sum_k g_k),    g = alpha (1 - alpha)

so for an upstream gradient u, ds = (g / T) (u - sum(u g) / sum(g)). Its entries sum to zero per
image, and so do the columns of the Jacobian: any update of the scores keeps sum(alpha) = k.
As T -> 0, alpha tends to the hard top-K mask (where the k-th and (k+1)-th scores differ).
"""

from numbers import Integral, Real
from typing import Union

import torch
from torch import Tensor

from .select import check_scores_finite, resolve_k

_BISECTION_STEPS = {torch.float32: 40, torch.float64: 80}
_NEWTON_STEPS = 4
# sigmoid(+-50) is 1 and 0 in float32 and float64 alike, so the bracket [min - 50 T, max + 50 T]
# gives sums N and ~0 at its ends.
_BRACKET = 50.0


def _solve_threshold(s: Tensor, k: Tensor, temperature: float) -> Tensor:
    """tau (B, 1) with sum(sigmoid((s - tau) / T)) = k per row, s (B, N) and k (B, 1) in op-math."""
    lo = s.amin(-1, keepdim=True) - _BRACKET * temperature
    hi = s.amax(-1, keepdim=True) + _BRACKET * temperature
    for _ in range(_BISECTION_STEPS[s.dtype]):
        mid = 0.5 * (lo + hi)
        too_many = torch.sigmoid((s - mid) / temperature).sum(-1, keepdim=True) > k
        lo = torch.where(too_many, mid, lo)
        hi = torch.where(too_many, hi, mid)
    tau = 0.5 * (lo + hi)
    for _ in range(_NEWTON_STEPS):  # d sum / d tau = -sum(g) / T; stay inside the bracket
        a = torch.sigmoid((s - tau) / temperature)
        excess = a.sum(-1, keepdim=True) - k
        slope = (a * (1 - a)).sum(-1, keepdim=True)
        step = torch.where(slope > 0, excess * temperature / slope.clamp_min(torch.finfo(s.dtype).tiny),
                           torch.zeros_like(excess))
        tau = torch.minimum(torch.maximum(tau + step, lo), hi)
    return tau


@torch.library.custom_op("autoselect::soft_topk", mutates_args=())
def _soft_topk_op(scores: Tensor, k: Tensor, temperature: float) -> Tensor:
    check_scores_finite(scores, "soft_topk")  # inside the op: real values, also under torch.compile
    opmath = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(opmath)
    tau = _solve_threshold(s, k.to(opmath).unsqueeze(-1), temperature)
    return torch.sigmoid((s - tau) / temperature)


@_soft_topk_op.register_fake
def _(scores, k, temperature):
    opmath = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return scores.new_empty(scores.shape, dtype=opmath)


def soft_topk_backward(grad: Tensor, alpha: Tensor, temperature: float) -> Tensor:
    """The implicit-function backward: ds = (g / T) (u - sum(u g) / sum(g)), g = alpha (1 - alpha),
    per image (last dimension). Rows where every alpha is saturated (sum g = 0) get a zero gradient."""
    g = alpha * (1 - alpha)
    g_sum = g.sum(-1, keepdim=True)
    mean_u = (grad * g).sum(-1, keepdim=True) / g_sum.clamp_min(torch.finfo(g.dtype).tiny)
    return torch.where(g_sum > 0, g / temperature * (grad - mean_u), torch.zeros_like(grad))


def _setup_context(ctx, inputs, output):
    scores, k, temperature = inputs
    ctx.save_for_backward(output)
    ctx.temperature = temperature
    ctx.scores_dtype = scores.dtype


def _backward(ctx, grad):
    (alpha, ) = ctx.saved_tensors
    grad_scores = soft_topk_backward(grad.to(alpha.dtype), alpha, ctx.temperature)
    return grad_scores.to(ctx.scores_dtype), None, None


_soft_topk_op.register_autograd(_backward, setup_context=_setup_context)


def _budgets(k, B: int, N: int, device) -> Tensor:
    where = "soft_topk"
    if isinstance(k, Tensor):
        if k.dim() > 1 or (k.dim() == 1 and k.shape[0] != B):
            raise ValueError(f"{where}: a tensor k must be a scalar or have shape ({B},) (one budget per image), "
                             f"got {tuple(k.shape)}")
        if k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"{where}: k must hold real token counts, got {k.dtype}")
        budget = k.detach().to(device=device, dtype=torch.float64).expand(B)
        if not bool(((budget > 0) & (budget <= N)).all()):
            raise ValueError(f"{where}: every k must lie in (0, N] = (0, {N}], got {budget.tolist()[:8]}")
        return budget
    if isinstance(k, bool) or not isinstance(k, (Integral, Real)):
        raise TypeError(f"{where}: k must be an int, a float fraction in (0, 1] or a tensor of per-image counts, "
                        f"got {type(k).__name__}")
    return torch.full((B, ), float(resolve_k(k, N, where=where)), dtype=torch.float64, device=device)


def soft_topk(scores: Tensor, k: Union[int, float, Tensor], temperature: float) -> Tensor:
    """Soft top-K: alpha = sigmoid((scores - tau) / temperature) with tau per image so that the
    alphas of each image sum to k (DESIGN.md 1.2).

    Args:
        scores: (B, N) (or (N,) for one image), any float dtype; computed in float32 (float64 for
            float64 scores). Must be finite.
        k: the budget: an int in [1, N], a float in (0, 1] (a fraction of N), or a tensor of shape
            (B,) (or a scalar tensor) holding per-image counts in (0, N] (these may be fractional).
            k receives no gradient.
        temperature: T > 0. Large T spreads alpha; as T -> 0 alpha tends to the hard top-K mask.
            Anneal it during training (e.g. 1 -> 0.05). No gradient.

    Returns:
        alpha, the shape of scores, float32 (float64 for float64 scores), each row in [0, 1] and
        summing to k. Differentiable with respect to scores by the implicit-function formula; the
        gradient of any loss sums to zero per image, so an update keeps the budget.
    """
    where = "soft_topk"
    if not isinstance(scores, Tensor):
        raise TypeError(f"{where}: scores must be a tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{where}: scores must be a floating-point tensor, got {scores.dtype}")
    if scores.dim() not in (1, 2) or scores.shape[-1] == 0:
        raise ValueError(f"{where}: scores must have shape (B, N) or (N,) with N >= 1, got {tuple(scores.shape)}")
    if isinstance(temperature, Tensor):
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not temperature > 0 \
            or temperature == float("inf"):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")
    squeeze = scores.dim() == 1
    s = scores.unsqueeze(0) if squeeze else scores
    B, N = s.shape
    budget = _budgets(k, B, N, s.device)
    opmath = torch.float64 if s.dtype == torch.float64 else torch.float32
    alpha = _soft_topk_op(s.contiguous(), budget.to(opmath), float(temperature))
    return alpha.squeeze(0) if squeeze else alpha
