"""Diagonal attention of the Denoiser (DESIGN.md 1.4): the reference, the torch op and its autograd.

For token i of head h, with d the head dim:

    logits = [q_i . k_i / sqrt(d) + self_bias_ih] ++ [q_i . mem_k_hj / sqrt(d) for j < M]
    out_i  = softmax(logits) . [v_i ; mem_v_h0 .. mem_v_h(M-1)]

Each token attends only to itself and to M learned memory slots of its head: no information moves
between token positions ("no spatial leakage"). Gradients flow to all six inputs; the memory
gradients are sums over every token of the batch.

Layers: `diag_attention_ref` / `diag_attention_backward_ref` (the spec in PyTorch; they materialise
the (B, N, H, 1+M) logits) -> the fused Triton kernels (triton_kernels/diag_attention.py: online
softmax, logits never written to device memory, backward recomputed from the saved log-sum-exp) ->
the torch ops `autoselect::diag_attention` and `autoselect::diag_attention_backward` (backend choice,
fake tensors, autograd) -> the functional `diag_attention`, which checks its inputs and names what is
wrong.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ._dispatch import Kernels, opmath, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------

def _logits_ref(q, k, mem_k, self_bias, compute_dtype):
    """The (B, N, H, 1+M) logits, self term first, in compute_dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, mem_k = q.to(compute_dtype), k.to(compute_dtype), mem_k.to(compute_dtype)
    self_logit = (q * k).sum(-1) * scale + self_bias.to(compute_dtype)
    memory_logits = torch.einsum("bnhd,hmd->bnhm", q, mem_k) * scale
    return torch.cat((self_logit.unsqueeze(-1), memory_logits), dim=-1)


def diag_attention_ref(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, self_bias: Tensor, *,
                       compute_dtype=None, return_lse: bool = False):
    """Diagonal attention in plain PyTorch (the spec in code, and the fallback on any device).

    Materialises the (B, N, H, 1+M) logits and probabilities; differentiable by autograd with respect
    to all six inputs. Computes in `compute_dtype` (default: float32, or float64 for float64 q) and
    returns q's dtype; pass compute_dtype=q.dtype to get PyTorch's own low-precision rounding (the
    baseline of the error rule in DESIGN.md section 7). With return_lse=True, also returns the
    log-sum-exp of the logits, (B, N, H) in the compute dtype (what the backward recomputes from).
    """
    if compute_dtype is None:
        compute_dtype = opmath(q.dtype)
    logits = _logits_ref(q, k, mem_k, self_bias, compute_dtype)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))  # the softmax
    out = probs[..., :1] * v.to(compute_dtype) + torch.einsum("bnhm,hmd->bnhd", probs[..., 1:],
                                                              mem_v.to(compute_dtype))
    out = out.to(q.dtype)
    if return_lse:
        return out, lse
    return out


def diag_attention_backward_ref(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor,
                                self_bias: Tensor, lse: Optional[Tensor] = None, out: Optional[Tensor] = None):
    """The backward written out: (dq, dk, dv, dmem_k, dmem_v, dself_bias) for the upstream gradient
    `grad` of out, in the op-math dtype, cast to each input's dtype. The probabilities are recomputed
    from `lse` when given (as the kernel does), else by a softmax; `out` (the forward's output), when
    given, saves recomputing it for delta = sum_d grad * out. The tests hold it against autograd
    through `diag_attention_ref`; the reference backend runs it (custom ops run below autograd, so
    they cannot differentiate the reference themselves)."""
    compute = opmath(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = _logits_ref(q, k, mem_k, self_bias, compute)
    if lse is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.exp(logits - lse.to(compute).unsqueeze(-1))
    qc, kc, vc, mkc, mvc, g = (t.to(compute) for t in (q, k, v, mem_k, mem_v, grad))
    p_self, p_mem = probs[..., 0], probs[..., 1:]
    if out is None:
        out = p_self.unsqueeze(-1) * vc + torch.einsum("bnhm,hmd->bnhd", p_mem, mvc)
    delta = (g * out.to(compute)).sum(-1)
    ds_self = p_self * ((g * vc).sum(-1) - delta)
    ds_mem = p_mem * (torch.einsum("bnhd,hmd->bnhm", g, mvc) - delta.unsqueeze(-1))
    grad_q = scale * (ds_self.unsqueeze(-1) * kc + torch.einsum("bnhm,hmd->bnhd", ds_mem, mkc))
    grad_k = scale * ds_self.unsqueeze(-1) * qc
    grad_v = p_self.unsqueeze(-1) * g
    grad_mem_k = scale * torch.einsum("bnhm,bnhd->hmd", ds_mem, qc)
    grad_mem_v = torch.einsum("bnhm,bnhd->hmd", p_mem, g)
    return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_mem_k.to(mem_k.dtype),
            grad_mem_v.to(mem_v.dtype), ds_self.to(self_bias.dtype))


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------

def _forward_reference(q, k, v, mem_k, mem_v, self_bias):
    out, lse = diag_attention_ref(q, k, v, mem_k, mem_v, self_bias, return_lse=True)
    return out, lse.to(self_bias.dtype)


def _backward_reference(grad, q, k, v, mem_k, mem_v, self_bias, out, lse):
    return diag_attention_backward_ref(grad, q, k, v, mem_k, mem_v, self_bias, lse, out)


def _triton_limits():
    kernels = _ext.triton_kernels()
    return None if kernels is None else kernels.diag_attention.LIMITS


def _triton_unsupported(*args):
    """Why the Triton kernels cannot serve this call (head dims above their limit), or None."""
    q = args[1] if len(args) == 9 else args[0]  # the backward's first argument is the gradient
    return _ext.triton_kernels().diag_attention.unsupported(q.dtype, q.shape[-1])


KERNELS = Kernels("diag_attention", reference=_forward_reference,
                  triton=triton("diag_attention", "diag_attention_forward"),
                  unsupported={"triton": _triton_unsupported}, limits=_triton_limits)
KERNELS.add("backward", reference=_backward_reference, triton=triton("diag_attention", "diag_attention_backward"))


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("autoselect::diag_attention", mutates_args=())
def _diag_attention_op(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor,
                       self_bias: Tensor) -> tuple[Tensor, Tensor]:
    return KERNELS.run(q.device, q, k, v, mem_k, mem_v, self_bias)


@_diag_attention_op.register_fake
def _(q, k, v, mem_k, mem_v, self_bias):
    return torch.empty_like(q), torch.empty_like(self_bias)


@torch.library.custom_op("autoselect::diag_attention_backward", mutates_args=())
def _diag_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor,
                                self_bias: Tensor, out: Tensor,
                                lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return KERNELS.run(q.device, grad.contiguous(), q, k, v, mem_k, mem_v, self_bias, out, lse, table="backward")


@_diag_attention_backward_op.register_fake
def _(grad, q, k, v, mem_k, mem_v, self_bias, out, lse):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mem_k),
            torch.empty_like(mem_v), torch.empty_like(self_bias))


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.save_for_backward(*inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    # lse is an internal output (the functional never returns it): its gradient is ignored.
    q, k, v, mem_k, mem_v, self_bias, out, lse = ctx.saved_tensors
    grads = torch.ops.autoselect.diag_attention_backward(grad_out, q, k, v, mem_k, mem_v, self_bias, out, lse)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


_diag_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Functional
# ----------------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, mem_k, mem_v, self_bias):
    names = ("q", "k", "v", "mem_k", "mem_v", "self_bias")
    for name, t in zip(names, (q, k, v, mem_k, mem_v, self_bias)):
        if not isinstance(t, Tensor):
            raise TypeError(f"diag_attention: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"diag_attention: q must have shape (B, N, H, d), got {tuple(q.shape)}")
    B, N, H, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"diag_attention: {name} must have the shape of q (B, N, H, d) = {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    if mem_k.dim() != 3:
        raise ValueError(f"diag_attention: mem_k must have shape (H, M, d), got {tuple(mem_k.shape)}")
    if mem_k.shape[0] != H:
        raise ValueError(f"diag_attention: mem_k has {mem_k.shape[0]} heads but q has H = {H} "
                         f"(mem_k must have shape (H, M, d) = ({H}, M, {d}))")
    if mem_k.shape[2] != d:
        raise ValueError(f"diag_attention: mem_k has head dim {mem_k.shape[2]} but q has d = {d} "
                         f"(mem_k must have shape (H, M, d) = ({H}, M, {d}))")
    if mem_k.shape[1] == 0:
        raise ValueError("diag_attention: M = 0 memory slots; mem_k and mem_v need at least one slot (H, M >= 1, d)")
    if tuple(mem_v.shape) != tuple(mem_k.shape):
        raise ValueError(f"diag_attention: mem_v must have the shape of mem_k (H, M, d) = {tuple(mem_k.shape)}, "
                         f"got {tuple(mem_v.shape)}")
    if d == 0:
        raise ValueError("diag_attention: head dim d = 0; q, k and v need d >= 1")
    if tuple(self_bias.shape) != (B, N, H):
        raise ValueError(f"diag_attention: self_bias must have shape (B, N, H) = {(B, N, H)}, "
                         f"got {tuple(self_bias.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"diag_attention: q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    for name, t in zip(names[1:5], (k, v, mem_k, mem_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"diag_attention: q, k, v, mem_k and mem_v must share one dtype; q is {q.dtype}, "
                            f"{name} is {t.dtype}")
    if not self_bias.is_floating_point():
        raise TypeError(f"diag_attention: self_bias must be a floating-point tensor, got {self_bias.dtype}")
    for name, t in zip(names[1:], (k, v, mem_k, mem_v, self_bias)):
        if t.device != q.device:
            raise ValueError(f"diag_attention: all tensors must be on one device; q is on {q.device}, "
                             f"{name} on {t.device}")


def diag_attention(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor, mem_v: Tensor, self_bias: Tensor) -> Tensor:
    """Diagonal attention: each token attends to itself and to M memory slots of its head.

    For token i and head h: logits = [q_i . k_i / sqrt(d) + self_bias_ih] ++ [q_i . mem_k_hj / sqrt(d)]_j<M,
    out_i = softmax(logits) . [v_i ; mem_v_h]. No information moves between tokens.

    Args:
        q, k, v: (B, N, H, d); float32, float16, bfloat16 (or float64), one dtype.
        mem_k, mem_v: memory keys and values, (H, M, d) with M >= 1, the dtype of q.
        self_bias: per-token, per-head bias of the self logit, (B, N, H), any float dtype (computed in
            float32, or float64 for float64 q).

    Returns:
        out, (B, N, H, d) in q's dtype. Differentiable with respect to all six inputs; the memory
        gradients are sums over all B * N tokens. The backend (triton on a GPU, reference elsewhere)
        is chosen per device; the fused kernel never writes the (B, N, H, 1+M) logits to memory.
    """
    _check_inputs(q, k, v, mem_k, mem_v, self_bias)
    compute = opmath(q.dtype)
    out, _ = _diag_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), mem_k.contiguous(),
                                mem_v.contiguous(), self_bias.to(compute).contiguous())
    return out
