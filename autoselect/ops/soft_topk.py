"""Soft top-K budget gate (DESIGN.md 1.2).

    alpha_n = F((s_n - tau) / T),   tau per image such that sum_n alpha_n = k

Two choices of F, the `kind`:
- "laplace" (PAPER: LapSum, ICML 2025): F the Laplace CDF, 0.5 e^x for x < 0 and 1 - 0.5 e^-x
  otherwise. Between two consecutive sorted scores the budget equation is a quadratic in e^(tau/T),
  so tau has a closed form once the segment is known; all segments are evaluated at once from
  log-cumulative sums after one sort.
- "logistic" (OURS): F the logistic sigmoid; tau by a binary search over the sorted scores, then
  bisection within that segment and safeguarded Newton steps.

Both solve in float64 on scores shifted by their row maximum, so the result does not depend on a
common offset (scores + 1e6), T may be tiny (1e-8) and scores may be near the float32 limit; alpha is
returned in float32 (float64 for float64 scores). The solvers never enter autograd. The backward is
the implicit-function formula, not a differentiation of the solver:

    d alpha_i / d s_j = (f_i / T) (delta_ij - f_j / sum_k f_k),    f = F' at the solution

(logistic: f = alpha (1 - alpha); Laplace: f = 0.5 e^-|x| = min(alpha, 1 - alpha)), so for an upstream
gradient u, ds = (f / T) (u - sum(u f) / sum(f)). Its entries sum to zero per image, and so do the
columns of the Jacobian: any update of the scores keeps sum(alpha) = k. As T -> 0, alpha tends to the
hard top-K mask (where the k-th and (k+1)-th scores differ).
"""

import math
from numbers import Integral, Real
from typing import Union

import torch
from torch import Tensor

from ._dispatch import check_values, opmath
from .select import check_scores_finite, resolve_k

KINDS = ("logistic", "laplace")
DEFAULT_KIND = "logistic"
_BISECTION_STEPS = 32  # an interval of width <= 50 + log N down to ~1e-8, then Newton
_NEWTON_STEPS = 4
# sigmoid(+-50) is 1 and 0 to float64 precision (e^-50 ~ 2e-22), which bounds the bracket.
_BRACKET = 50.0


def _scaled(scores: Tensor, temperature: float) -> Tensor:
    """(s - max s) / T per row in float64: shift-invariant, and wide enough for any float32 input."""
    s = scores.to(torch.float64)
    return (s - s.amax(-1, keepdim=True)) / temperature


def _logistic_cdf(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _laplace_cdf(x: Tensor) -> Tensor:
    half_tail = 0.5 * torch.exp(-x.abs())
    return torch.where(x < 0, half_tail, 1 - half_tail)


def _budget(cdf, x: Tensor, t: Tensor) -> Tensor:
    return cdf(x - t).sum(-1, keepdim=True)


def _segment(cdf, x: Tensor, k: Tensor):
    """Binary search over the sorted scores for the segment that holds the solution t.

    Returns (desc, m, upper, lower): the scores sorted descending, the number m of scores above t,
    and the ends of the segment, budget(upper) <= k < budget(lower) (upper = x_m, lower = x_(m+1),
    each end moved out by L = 50 + log N where there is no score: the budget is then within e^-50 of
    N or 0). The budget falls as t rises; O(N log N) for the whole search.
    """
    N = x.shape[-1]
    L = _BRACKET + math.log(N + 1)
    desc = torch.sort(x, dim=-1, descending=True).values
    padded = torch.cat([desc[:, :1] + L, desc, desc[:, -1:] - L], dim=-1)  # positions 0 .. N + 1
    lo_j = torch.zeros_like(k, dtype=torch.long)  # budget(padded[lo_j]) <= k
    hi_j = torch.full_like(k, N + 1, dtype=torch.long)  # budget(padded[hi_j]) > k (k < N + ...)
    for _ in range(max(1, math.ceil(math.log2(N + 1)))):
        mid_j = (lo_j + hi_j) // 2
        small = _budget(cdf, x, padded.gather(-1, mid_j)) <= k
        lo_j = torch.where(small, mid_j, lo_j)
        hi_j = torch.where(small, hi_j, mid_j)
    return desc, lo_j, padded.gather(-1, lo_j), padded.gather(-1, lo_j + 1)


def _logistic_alpha(x: Tensor, k: Tensor) -> Tensor:
    """alpha = sigmoid(x - t) with sum = k per row, x (B, N) scaled scores, k (B, 1), float64.

    Within L = 50 + log N of neither end of its segment the budget is flat (m to within e^-50), so
    the solution lies within L of one end, or anywhere in the flat part where the budget already
    holds: bisection on that interval of width <= L, then Newton steps, then whichever of the final
    points meets the budget best (where float64 cannot place t within L of a huge score, an end of
    the interval is the answer). Exact whatever the gaps between scores (T = 1e-8, scores near the
    float32 limit).
    """
    L = _BRACKET + math.log(x.shape[-1] + 1)
    _, _, upper, lower = _segment(_logistic_cdf, x, k)
    middle = 0.5 * (upper + lower)
    near_upper = _budget(_logistic_cdf, x, middle) > k
    up = torch.full_like(upper, float("inf"))
    lo = torch.where(near_upper, torch.maximum(middle, torch.nextafter(upper - L, -up)), lower)
    hi = torch.where(near_upper, upper, torch.minimum(middle, torch.nextafter(lower + L, up)))
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        too_many = _budget(_logistic_cdf, x, mid) > k
        lo = torch.where(too_many, mid, lo)
        hi = torch.where(too_many, hi, mid)
    t = 0.5 * (lo + hi)
    for _ in range(_NEWTON_STEPS):  # d budget / d t = -sum(f); stay inside the bracket
        a = torch.sigmoid(x - t)
        excess = a.sum(-1, keepdim=True) - k
        slope = (a * (1 - a)).sum(-1, keepdim=True)
        step = torch.where(slope > 0, excess / slope.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(excess))
        t = torch.minimum(torch.maximum(t + step, lo), hi)
    candidates = torch.cat([t, lo, hi], dim=-1)
    miss = (torch.sigmoid(x.unsqueeze(1) - candidates.unsqueeze(-1)).sum(-1) - k).abs()
    return torch.sigmoid(x - candidates.gather(-1, miss.argmin(-1, keepdim=True)))


def _laplace_alpha(x: Tensor, k: Tensor) -> Tensor:
    """LapSum: alpha = F(x - t) with sum = k per row, F the Laplace CDF, t in closed form.

    With the scores sorted descending (x_1 >= ... >= x_N) and t in [x_(m+1), x_m], the m scores above
    t give 1 - 0.5 e^(t - x_i) and the rest 0.5 e^(x_i - t). Referred to c = x_m, with v = e^(t - c),
    A = sum_(i<=m) e^(c - x_i) (<= m) and B = sum_(i>m) e^(x_i - c) (<= N - m), the budget is
    m - v A / 2 + B / (2 v) = k, whose positive root is v = (m - k + sqrt((m - k)^2 + A B)) / A,
    written as B / (k - m + sqrt(...)) where k >= m to avoid cancellation, and evaluated in logs
    (B underflows when the gaps are large against T). The segment comes from `_segment`.
    """
    desc, m, _, _ = _segment(_laplace_cdf, x, k)
    position = torch.arange(x.shape[-1], device=x.device)
    c = desc.gather(-1, (m - 1).clamp(min=0))  # x_m; for m = 0 the top score (then A = 0)
    none = torch.full_like(desc, -float("inf"))
    log_a = torch.logsumexp(torch.where(position < m, c - desc, none), -1, keepdim=True)
    log_b = torch.logsumexp(torch.where(position >= m, desc - c, none), -1, keepdim=True)
    d = k - m.to(x.dtype)
    log_d = torch.log(d.abs())
    log_root = 0.5 * torch.logaddexp(2 * log_d, log_a + log_b)
    log_d_plus_root = torch.logaddexp(log_d, log_root)
    # B = 0 (m = N: every score above t) leaves v = 0 when k = N: t = -inf, every alpha 1.
    log_v = torch.where(d >= 0, torch.where(log_b == -float("inf"), log_b, log_b - log_d_plus_root),
                        log_d_plus_root - log_a)
    return _laplace_cdf(x - c - log_v)


_SOLVERS = {"logistic": _logistic_alpha, "laplace": _laplace_alpha}


@torch.library.custom_op("autoselect::soft_topk", mutates_args=())
def _soft_topk_op(scores: Tensor, k: Tensor, temperature: float, kind: str) -> Tensor:
    check_scores_finite(scores, "soft_topk")  # inside the op: real values, also under torch.compile
    alpha = _SOLVERS[kind](_scaled(scores, temperature), k.to(torch.float64).unsqueeze(-1))
    return alpha.to(opmath(scores.dtype))


@_soft_topk_op.register_fake
def _(scores, k, temperature, kind):
    return scores.new_empty(scores.shape, dtype=opmath(scores.dtype))


def density(alpha: Tensor, kind: str) -> Tensor:
    """F' at the solution, from alpha: alpha (1 - alpha) (logistic) or min(alpha, 1 - alpha) (Laplace)."""
    if kind == "laplace":
        return torch.minimum(alpha, 1 - alpha)
    return alpha * (1 - alpha)


def soft_topk_backward(grad: Tensor, alpha: Tensor, temperature: float, kind: str = DEFAULT_KIND) -> Tensor:
    """The implicit-function backward: ds = (f / T) (u - sum(u f) / sum(f)), f = F' at the solution
    (`density`), per image (last dimension). Rows where every alpha is saturated (sum f = 0) get a
    zero gradient."""
    f = density(alpha, kind)
    f_sum = f.sum(-1, keepdim=True)
    mean_u = (grad * f).sum(-1, keepdim=True) / f_sum.clamp_min(torch.finfo(f.dtype).tiny)
    return torch.where(f_sum > 0, f / temperature * (grad - mean_u), torch.zeros_like(grad))


def _setup_context(ctx, inputs, output):
    scores, k, temperature, kind = inputs
    ctx.save_for_backward(output)
    ctx.temperature, ctx.kind = temperature, kind
    ctx.scores_dtype = scores.dtype


def _backward(ctx, grad):
    (alpha, ) = ctx.saved_tensors
    grad_scores = soft_topk_backward(grad.to(alpha.dtype), alpha, ctx.temperature, ctx.kind)
    return grad_scores.to(ctx.scores_dtype), None, None, None


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
        check_values(((budget > 0) & (budget <= N)).all(), f"{where}: every k must lie in (0, N] = (0, {N}]",
                     lambda: f"got {budget.tolist()[:8]}")
        return budget
    if isinstance(k, bool) or not isinstance(k, (Integral, Real)):
        raise TypeError(f"{where}: k must be an int, a float fraction in (0, 1] or a tensor of per-image counts, "
                        f"got {type(k).__name__}")
    return torch.full((B, ), float(resolve_k(k, N, where=where)), dtype=torch.float64, device=device)


def soft_topk(scores: Tensor, k: Union[int, float, Tensor], temperature: float, *,
              kind: str = DEFAULT_KIND) -> Tensor:
    """Soft top-K: alpha = F((scores - tau) / temperature) with tau per image so that the alphas of
    each image sum to k (DESIGN.md 1.2); F the logistic sigmoid (kind="logistic") or the Laplace CDF
    (kind="laplace", LapSum, tau in closed form).

    Args:
        scores: (B, N) (or (N,) for one image), any float dtype; computed in float32 (float64 for
            float64 scores). Must be finite.
        k: the budget: an int in [1, N], a float in (0, 1] (a fraction of N), or a tensor of shape
            (B,) (or a scalar tensor) holding per-image counts in (0, N] (these may be fractional).
            k receives no gradient.
        temperature: T > 0. Large T spreads alpha; as T -> 0 alpha tends to the hard top-K mask.
            Anneal it during training (e.g. 1 -> 0.05). No gradient. Pass a Python number: a tensor
            is read on the host.
        kind: "logistic" (default) or "laplace".

    Returns:
        alpha, the shape of scores, float32 (float64 for float64 scores), each row in [0, 1] and
        summing to k. Differentiable with respect to scores by the implicit-function formula; the
        gradient of any loss sums to zero per image, so an update keeps the budget. Adding a constant
        to every score of an image changes nothing.
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
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    squeeze = scores.dim() == 1
    s = scores.unsqueeze(0) if squeeze else scores
    B, N = s.shape
    budget = _budgets(k, B, N, s.device)
    alpha = _soft_topk_op(s.contiguous(), budget, float(temperature), kind)
    return alpha.squeeze(0) if squeeze else alpha
