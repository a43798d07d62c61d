"""Top-K selection of visual tokens (DESIGN.md 1.6): the reference, the torch op and the functional.

    index = the K highest scores of each image, sorted ascending (spatial order kept)
    kept  = x[index]

Ties go to the lower index: the order is (score descending, index ascending), so the result is
exact and the same on every backend. Scores are compared in float32 (bf16 and fp16 scores convert
exactly); -0.0 and +0.0 count as equal.

Every backend works on the packed layout: the tokens of all images concatenated, x (T, D) and
scores (T,), with a token count and a K per image, so a ragged batch (images with different token
counts and budgets) runs in one launch without padding to the largest image. A regular batch
(B, N, D) is the special case of B equal lengths.

Layers: `select_topk_ref` (the spec in PyTorch) -> the kernels (csrc/select_cpu.cpp,
csrc/select_cuda.cu) -> the torch op `autoselect::select_topk` (backend choice, fake tensors,
autograd for x) -> the functional `select_topk`, which checks its inputs and names what is wrong.

Finite scores: each kernel also returns `finite`, a 0-dim bool it clears when it meets a NaN or inf
score in the pass that reads the scores anyway; the op asserts it on the device (`check_values`: one
launch, no host read). The eager inference path (`_eager`: plain tensors, no gradient needed, not
traced) calls the kernels without the custom-op layer, whose dispatch is host work of the order of
the kernel itself on a GPU; everything else (autograd, torch.compile, fake tensors, dispatch modes)
goes through the op.
"""

from numbers import Integral, Real
from typing import List, Sequence, Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._dispatch import Kernels, check_values, compiled, opmath

KeepSpec = Union[int, float]
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------------

def resolve_k(k: KeepSpec, n: int, *, where: str = "select_topk") -> int:
    """The number of tokens to keep out of `n` for a budget `k`: an int in [1, n], or a float in
    (0, 1] (a fraction of n, rounded to the nearest int, at least 1). Anything else is a ValueError
    or TypeError that says what was given."""
    if isinstance(k, bool) or not isinstance(k, (Integral, Real)):
        raise TypeError(f"{where}: k must be an int (tokens) or a float in (0, 1] (fraction), got "
                        f"{type(k).__name__}")
    if isinstance(k, Integral):
        k = int(k)
        if not 1 <= k <= n:
            raise ValueError(f"{where}: k must lie in [1, N] = [1, {n}] tokens, got {k}")
        return k
    k = float(k)
    if not 0.0 < k <= 1.0:  # also rejects NaN
        raise ValueError(f"{where}: a fractional k must lie in (0, 1], got {k}")
    return min(n, max(1, int(round(k * n))))


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------

def topk_index_ref(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest of a 1-D `scores`, ties toward the lower index, sorted ascending."""
    keys = scores.to(torch.float32) + 0.0  # -0.0 -> +0.0, so signed zeros tie
    order = torch.sort(keys, descending=True, stable=True).indices  # stable: equal keys keep index order
    return torch.sort(order[:k]).values


def select_topk_ref(x: Tensor, scores: Tensor, k: int):
    """The reference of `select_topk` for a regular batch: x (B, N, D), scores (B, N), k an int in
    [1, N]. Returns kept (B, k, D) (x's dtype) and index (B, k) int64, ascending per image."""
    index = torch.stack([topk_index_ref(s, k) for s in scores]) if scores.shape[0] else \
        torch.empty(0, k, dtype=torch.int64, device=x.device)
    kept = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return kept, index


def _packed_reference(x: Tensor, scores: Tensor, lengths: Sequence[int], ks: Sequence[int]):
    """The packed layout in PyTorch: (kept (sum ks, D), index (sum ks,), finite) as the kernels return."""
    return _packed_selection(x, scores, lengths, ks) + (torch.isfinite(scores.float()).all(), )


def _packed_selection(x: Tensor, scores: Tensor, lengths: Sequence[int], ks: Sequence[int]):
    kept, index = [], []
    start = 0
    for n, k in zip(lengths, ks):
        idx = topk_index_ref(scores[start:start + n], k)
        kept.append(x[start + idx])
        index.append(idx)
        start += n
    if not kept:
        return x.new_empty(0, x.shape[-1]), torch.empty(0, dtype=torch.int64, device=x.device)
    return torch.cat(kept), torch.cat(index)


# ----------------------------------------------------------------------------------------------------
# torch.library op on the packed layout
# ----------------------------------------------------------------------------------------------------

SELECT_KERNELS = Kernels("select_topk", reference=_packed_reference, cpp=compiled("select_topk"),
                         cuda=compiled("select_topk"))


def _eager(*tensors: Tensor) -> bool:
    """True when a call may run the kernels without the custom-op layer: plain tensors (no fake or
    functional tensor, no subclass) of which none needs a gradient, outside torch.compile's tracing
    and any Python dispatch mode. The result is the op's, with the op's checks."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is Tensor and not (grad and t.requires_grad) for t in tensors)


def _select_topk_impl(x: Tensor, scores: Tensor, lengths: List[int], ks: List[int]) -> tuple[Tensor, Tensor]:
    kept, index, finite = SELECT_KERNELS.run(x.device, x, scores, lengths, ks)
    check_scores_finite(scores, "select_topk", finite)  # inside the op: real values, also under torch.compile
    return kept, index


@torch.library.custom_op("autoselect::select_topk", mutates_args=())
def _select_topk_op(x: Tensor, scores: Tensor, lengths: List[int], ks: List[int]) -> tuple[Tensor, Tensor]:
    return _select_topk_impl(x, scores, lengths, ks)


@_select_topk_op.register_fake
def _(x, scores, lengths, ks):
    total = sum(ks)
    return x.new_empty(total, x.shape[-1]), torch.empty(total, dtype=torch.int64, device=x.device)


def _setup_context(ctx, inputs, output):
    x, scores, lengths, ks = inputs
    ctx.save_for_backward(output[1])
    ctx.lengths, ctx.ks, ctx.x_shape = list(lengths), list(ks), x.shape


def _backward(ctx, grad_kept, grad_index):
    (index, ) = ctx.saved_tensors
    rows = index + _segment_starts(ctx.lengths, ctx.ks, index.device)
    grad_x = grad_kept.new_zeros(ctx.x_shape)
    grad_x.index_copy_(0, rows, grad_kept)  # kept rows are distinct: a scatter, not a sum
    return grad_x, None, None, None


_select_topk_op.register_autograd(_backward, setup_context=_setup_context)


def _segment_starts(lengths, ks, device):
    """For each kept row, the packed row where its image starts (turns local indices global). Built
    from the Python lists on the host: no data-dependent op on the device."""
    starts, rows = 0, []
    for n, k in zip(lengths, ks):
        rows.append(torch.full((k, ), starts, dtype=torch.int64))
        starts += n
    return torch.cat(rows).to(device, non_blocking=True) if rows else torch.empty(0, dtype=torch.int64,
                                                                                    device=device)


# ----------------------------------------------------------------------------------------------------
# Functional
# ----------------------------------------------------------------------------------------------------

def check_scores_finite(scores: Tensor, where: str, finite: Tensor = None):
    """A ValueError when a score is NaN or inf, checked on the device without a host sync (see
    `_dispatch.check_values`); with AUTOSELECT_DEBUG_CHECKS=1 the message names the first bad one.
    `finite`, when given, is the kernel's flag (a bool tensor, false when a score in float32 was NaN or
    inf), so the scores are not read again; without it they are (`isfinite(scores).all()`)."""
    if scores.numel() == 0:
        return
    float64 = "; float64 scores are compared in float32, where beyond +-3.4e38 is inf" \
        if finite is not None and scores.dtype == torch.float64 else ""
    if finite is None:
        finite = torch.isfinite(scores).all()

    def details():
        bad = ~torch.isfinite(scores.float()).flatten()
        position = int(bad.nonzero()[0])
        return (f"found {int(bad.sum())} NaN or inf value(s), the first at flat position {position} "
                f"({scores.flatten()[position].item()})")

    check_values(finite, f"{where}: scores must be finite (a NaN or inf score was found{float64})", details)


def _check_pair(x, scores, where, index_name=""):
    label = f"x{index_name}" if index_name else "x"
    if not isinstance(x, Tensor) or not isinstance(scores, Tensor):
        raise TypeError(f"{where}: x and scores must be tensors, got {type(x).__name__} and {type(scores).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{where}: {label} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not scores.is_floating_point():
        raise TypeError(f"{where}: scores must be a floating-point tensor, got {scores.dtype}")
    if scores.device != x.device:
        raise ValueError(f"{where}: x and scores must be on one device; {label} is on {x.device}, scores on "
                         f"{scores.device}")


def _packed_inputs(xs, scores_list, k, where):
    """Validate a ragged batch and pack it: (x (T, D), scores (T,), lengths, ks)."""
    if not isinstance(scores_list, (list, tuple)) or len(scores_list) != len(xs):
        raise ValueError(f"{where}: with a list of {len(xs)} token tensors, scores must be a list of as many "
                         f"(N_i,) tensors")
    if len(xs) == 0:
        raise ValueError(f"{where}: the list of images is empty")
    if isinstance(k, (list, tuple)):
        if len(k) != len(xs):
            raise ValueError(f"{where}: k has {len(k)} entries for {len(xs)} images")
        budgets = list(k)
    else:
        budgets = [k] * len(xs)
    lengths, ks = [], []
    D = None
    for i, (x, s) in enumerate(zip(xs, scores_list)):
        _check_pair(x, s, where, f"[{i}]")
        if x.dim() != 2:
            raise ValueError(f"{where}: x[{i}] must have shape (N_i, D), got {tuple(x.shape)}")
        if tuple(s.shape) != (x.shape[0], ):
            raise ValueError(f"{where}: scores[{i}] must have shape ({x.shape[0]},), got {tuple(s.shape)}")
        if D is None:
            D, dtype, device = x.shape[1], x.dtype, x.device
        elif x.shape[1] != D or x.dtype != dtype or x.device != device:
            raise ValueError(f"{where}: every image must share D, dtype and device; x[0] is ({D}, {dtype}, "
                             f"{device}), x[{i}] is ({x.shape[1]}, {x.dtype}, {x.device})")
        lengths.append(int(x.shape[0]))
        ks.append(resolve_k(budgets[i], int(x.shape[0]), where=f"{where} (image {i})"))
    return torch.cat(list(xs)), torch.cat(list(scores_list)), lengths, ks


def select_topk(x: Union[Tensor, Sequence[Tensor]], scores: Union[Tensor, Sequence[Tensor]],
                k: Union[KeepSpec, Sequence[KeepSpec]]):
    """Keep the top-k tokens of each image, in their original (spatial) order.

    Args:
        x: visual tokens (B, N, D), fp32/fp16/bf16/fp64; or a ragged batch, a list of (N_i, D)
            tensors (different token counts per image, run in one launch without padding).
        scores: one score per token, (B, N) (or a list of (N_i,)); any float dtype, compared in
            float32; must be finite there (NaN, inf, or a float64 score beyond float32's range is a
            ValueError, checked on the device by the kernel that reads the scores, without a host
            sync: at once on the CPU, at the next synchronisation on a GPU).
        k: tokens to keep per image: an int in [1, N], or a float in (0, 1] (a fraction of N,
            rounded, at least 1). For a ragged batch also a list with one budget per image.

    Returns:
        (kept, index): kept (B, K, D) with x's dtype and index (B, K) int64, ascending per image;
        ties between equal scores go to the lower index. For a list input, two lists: kept[i]
        (K_i, D) and index[i] (K_i,). `kept` is differentiable with respect to x (a gather);
        scores get no gradient (use `soft_topk` to train through a budget).
    """
    where = "select_topk"
    if isinstance(x, (list, tuple)):
        packed_x, packed_scores, lengths, ks = _packed_inputs(x, scores, k, where)
        run = _select_topk_impl if _eager(packed_x, packed_scores) else _select_topk_op
        kept, index = run(packed_x.contiguous(), packed_scores.contiguous(), lengths, ks)
        return list(kept.split(ks)), list(index.split(ks))
    _check_pair(x, scores, where)
    if x.dim() != 3:
        raise ValueError(f"{where}: x must have shape (B, N, D) (or be a list of (N_i, D) tensors), got "
                         f"{tuple(x.shape)}")
    if tuple(scores.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{where}: scores must have shape {tuple(x.shape[:2])} (one per token of x "
                         f"{tuple(x.shape)}), got {tuple(scores.shape)}")
    if isinstance(k, (list, tuple)):
        raise TypeError(f"{where}: a per-image list of k needs a ragged batch (a list of (N_i, D) tensors); "
                        "a (B, N, D) batch keeps the same k in every image")
    B, N, D = x.shape
    k = resolve_k(k, N, where=where)
    run = _select_topk_impl if _eager(x, scores) else _select_topk_op
    kept, index = run(x.reshape(B * N, D).contiguous() if B * N else x.new_empty(0, D),
                      scores.reshape(B * N).contiguous(), [N] * B, [k] * B)
    return kept.reshape(B, k, D), index.reshape(B, k)


# ----------------------------------------------------------------------------------------------------
# Fused scoring and selection
# ----------------------------------------------------------------------------------------------------

def score_tokens_ref(x: Tensor, hidden: Tensor, col_sum: Tensor, bias: Tensor, w2: Tensor, b2: float,
                     eps: float) -> Tensor:
    """The scores of the fused path in PyTorch (float32; float64 for float64 x): the Scorer
    LayerNorm -> Linear -> GELU -> Linear with the LayerNorm folded into the first layer, from
    hidden = x @ W'^T (csrc/select.h)."""
    compute = opmath(x.dtype)
    xf = x.to(compute)
    var, mean = torch.var_mean(xf, dim=-1, correction=0, keepdim=True)
    pre = (hidden.to(compute) - mean * col_sum.to(compute)) * torch.rsqrt(var + eps) + bias.to(compute)
    return (torch.nn.functional.gelu(pre) @ w2.to(compute) + b2.to(compute)).to(torch.float32)


def _score_select_reference(x, hidden, col_sum, bias, w2, b2, eps, lengths, ks):
    scores = score_tokens_ref(x, hidden, col_sum, bias, w2, b2, eps)
    kept, index, finite = _packed_reference(x, scores, lengths, ks)
    return kept, index, scores, finite


SCORE_SELECT_KERNELS = Kernels("score_select", reference=_score_select_reference, cpp=compiled("score_select"),
                               cuda=compiled("score_select"))


def _score_select_impl(x: Tensor, hidden: Tensor, col_sum: Tensor, bias: Tensor, w2: Tensor, b2: Tensor, eps: float,
                       lengths: List[int], ks: List[int]) -> tuple[Tensor, Tensor, Tensor]:
    kept, index, scores, finite = SCORE_SELECT_KERNELS.run(x.device, x, hidden, col_sum, bias, w2, b2, eps, lengths,
                                                           ks)
    check_scores_finite(scores, "score_select", finite)  # a NaN or inf token gives a non-finite score
    return kept, index, scores


@torch.library.custom_op("autoselect::score_select", mutates_args=())
def _score_select_op(x: Tensor, hidden: Tensor, col_sum: Tensor, bias: Tensor, w2: Tensor, b2: Tensor, eps: float,
                     lengths: List[int], ks: List[int]) -> tuple[Tensor, Tensor, Tensor]:
    return _score_select_impl(x, hidden, col_sum, bias, w2, b2, eps, lengths, ks)


@_score_select_op.register_fake
def _(x, hidden, col_sum, bias, w2, b2, eps, lengths, ks):
    total = sum(ks)
    return (x.new_empty(total, x.shape[-1]), torch.empty(total, dtype=torch.int64, device=x.device),
            x.new_empty(x.shape[0], dtype=torch.float32))


def _first_layer(x: Tensor, weight: Tensor) -> Tensor:
    """hidden = x @ W'^T with a float32 result for fp16/bf16 tokens: the folded LayerNorm subtracts
    mean * c from it afterwards, and rounding the raw product to 8 bits of mantissa first would
    lose the centred signal when the tokens' mean is large. On a GPU the GEMM writes float32
    directly (torch.mm out_dtype); on the CPU the tokens are upcast."""
    if x.dtype in (torch.float16, torch.bfloat16):
        if x.is_cuda:
            try:
                return torch.mm(x, weight.t(), out_dtype=torch.float32)
            except (RuntimeError, TypeError):  # a torch without mm(out_dtype=) for this device
                pass
        return torch.nn.functional.linear(x.float(), weight.float())
    return torch.nn.functional.linear(x, weight)


def score_select(x: Union[Tensor, Sequence[Tensor]], scorer, k: Union[KeepSpec, Sequence[KeepSpec]], *,
                 return_scores: bool = False):
    """Score every token with `scorer` and keep the top-k, fused: one GEMM (the first layer, with
    the LayerNorm folded in) and one kernel launch for the rest (LayerNorm statistics, GELU, the
    H -> 1 projection, top-K, sort and gather). Inference only: nothing here is differentiable.

    Args:
        x: visual tokens (B, N, D) or a ragged list of (N_i, D); fp32/fp16/bf16/fp64.
        scorer: an `autoselect.Scorer` (anything with `fused_parameters(dtype, device)`), on x's device.
        k: as in `select_topk`: an int in [1, N], a float in (0, 1], or per image for a list.
        return_scores: also return the scores (float32, (B, N) or a list of (N_i,)).

    Returns:
        (kept, index), or (kept, index, scores) with return_scores; shapes as in `select_topk`.
        The selection is exactly `select_topk(x, scores, k)` for the returned scores, which equal
        `scorer(x)` up to float rounding. Non-finite scores raise a ValueError.
    """
    where = "score_select"
    ragged = isinstance(x, (list, tuple))
    if ragged:
        placeholders = [t.new_empty(t.shape[0]) if isinstance(t, Tensor) and t.dim() >= 1 else t for t in x]
        packed_x, _, lengths, ks = _packed_inputs(x, placeholders, k, where)
    else:
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: x must be a tensor or a list of tensors, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{where}: x must have shape (B, N, D) (or be a list of (N_i, D) tensors), got "
                             f"{tuple(x.shape)}")
        if x.dtype not in _X_DTYPES:
            raise TypeError(f"{where}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
        if isinstance(k, (list, tuple)):
            raise TypeError(f"{where}: a per-image list of k needs a ragged batch (a list of (N_i, D) tensors)")
        B, N, D = x.shape
        k_int = resolve_k(k, N, where=where)
        lengths, ks = [N] * B, [k_int] * B
        packed_x = x.reshape(B * N, D)
    if not hasattr(scorer, "fused_parameters"):
        raise TypeError(f"{where}: scorer must be an autoselect.Scorer (with fused_parameters), got "
                        f"{type(scorer).__name__}")
    weight, col_sum, bias, w2, b2, eps = scorer.fused_parameters(packed_x.dtype, packed_x.device)
    if weight.shape[1] != packed_x.shape[1]:
        raise ValueError(f"{where}: the scorer expects tokens of width {weight.shape[1]}, x has {packed_x.shape[1]}")
    packed_x = packed_x.contiguous()
    with torch.no_grad():
        hidden = _first_layer(packed_x, weight)  # the one GEMM
        run = _score_select_impl if _eager(packed_x, hidden, col_sum, bias, w2, b2) else _score_select_op
        kept, index, scores = run(packed_x, hidden.contiguous(), col_sum, bias, w2, b2, eps, lengths, ks)
    if ragged:
        out = (list(kept.split(ks)), list(index.split(ks)))
        return out + (list(scores.split(lengths)), ) if return_scores else out
    out = (kept.reshape(B, k_int, D), index.reshape(B, k_int))
    return out + (scores.reshape(B, N), ) if return_scores else out
