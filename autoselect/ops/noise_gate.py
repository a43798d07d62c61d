"""Variance-preserving noise gate (DESIGN.md 1.3): the reference, the torch op and its autograd.

    z = mean + sqrt(alpha) * (x - mean) + sqrt(1 - alpha) * std * eps,     eps ~ N(0, 1)

alpha = 1 passes a token unchanged; alpha = 0 replaces it by noise with the tokens' own per-channel
statistics. Backward: dx = sqrt(alpha) * g and
dalpha = sum_D g * ((x - mean) / (2 sqrt(a_c)) - std * eps / (2 sqrt(1 - a_c))), a_c = clamp(alpha,
1e-6, 1 - 1e-6) inside the two denominators only. mean and std are running statistics: no gradient.

eps follows the RNG contract of DESIGN.md section 2: flat element i of a call with (seed, offset) gets
component i % 4 of Triton's tl.randn4x(seed, offset + i // 4); a call consumes ceil(numel / 4)
offsets (`noise_offsets`). Every backend draws the same noise, and the backward draws it again
instead of keeping it, so training keeps nothing of the size of x for this op.

Layers: `gate_noise_ref` / `noise_gate_ref` (the spec in PyTorch) -> the kernels (csrc/, and
triton_kernels/noise_gate.py) -> the torch ops `autoselect::noise_gate` and
`autoselect::noise_gate_backward` (backend choice, fake tensors, autograd) -> the functional
`noise_gate`, which checks its inputs and names what is wrong.
"""

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import Kernels, check_values, compiled, opmath, triton

ALPHA_GRAD_CLAMP = 1e-6
_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_INT64_LIMIT = 1 << 63

# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------

def _mul_wide(a: int, b: Tensor):
    """(hi32, lo32) of a * b for a < 2^32 and int64 tensor b < 2^32, without int64 overflow."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    high_part = a * b_hi  # < 2^48
    low = a * b_lo + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (low >> 32), low & _MASK32


def _philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    for _ in range(10):
        hi_b, lo_b = _mul_wide(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_wide(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint_to_uniform(bits: Tensor) -> Tensor:
    # int32 reinterpretation, x < 0 -> ~x, as float32, times the largest scale that stays below 1.
    folded = torch.where(bits >= (1 << 31), _MASK32 - bits, bits)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=bits.device)


def _box_muller(u0: Tensor, u1: Tensor):
    u0 = torch.clamp_min(u0, 1.0e-7)
    theta = u1 * torch.tensor(6.283185307179586, dtype=torch.float32, device=u1.device)
    radius = torch.sqrt(-2.0 * torch.log(u0))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def gate_noise_ref(numel: int, seed: int, offset: int = 0, *, device=None) -> Tensor:
    """The noise of the RNG contract in plain PyTorch: float32 tensor of `numel` normals, element i
    being component i % 4 of tl.randn4x(seed, offset + i // 4) (Philox4x32-10, Box-Muller)."""
    _check_seed_offset(seed, offset)
    groups = (numel + 3) // 4
    counters = offset + torch.arange(groups, dtype=torch.int64, device=device)
    zero = torch.zeros_like(counters)
    outputs = _philox4x32_10(counters & _MASK32, counters >> 32, zero, zero, seed & _MASK32, seed >> 32)
    u = [_uint_to_uniform(o) for o in outputs]
    n0, n1 = _box_muller(u[0], u[1])
    n2, n3 = _box_muller(u[2], u[3])
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(-1)[:numel]


def noise_gate_ref(x: Tensor, alpha: Tensor, mean: Tensor, std: Tensor, *, seed: Optional[int] = None,
                   offset: int = 0, noise: Optional[Tensor] = None, compute_dtype=None) -> Tensor:
    """The noise gate in plain PyTorch (the spec in code, and the fallback on any device).

    Differentiable with respect to x and alpha by autograd, giving exactly the backward of DESIGN.md
    1.3 (alpha clamped to [1e-6, 1 - 1e-6] inside the two denominators only). The noise comes from
    `noise`, else from `gate_noise_ref(seed, offset)`. Computes in `compute_dtype` (default: float32,
    or float64 for float64 x) and returns x's dtype; pass compute_dtype=x.dtype to get PyTorch's own
    low-precision rounding (the baseline of the error rule in DESIGN.md section 7).
    """
    if compute_dtype is None:
        compute_dtype = opmath(x.dtype)
    if noise is None:
        if seed is None:
            raise ValueError("noise_gate_ref: give a seed, or an explicit noise tensor")
        noise = gate_noise_ref(x.numel(), seed, offset, device=x.device).reshape(x.shape)
    a = alpha.to(compute_dtype).unsqueeze(-1)
    a_det = a.detach()
    # The clamp and the derivative denominators in at least float32: in fp16/bf16, 1 - 1e-6 rounds to
    # 1 and sqrt(1 - a_c) to 0, which would make the (zero) derivative term 0 / 0 = NaN.
    wide = opmath(compute_dtype)
    a_c = alpha.detach().to(wide).unsqueeze(-1).clamp(ALPHA_GRAD_CLAMP, 1 - ALPHA_GRAD_CLAMP)
    # sqrt(a) and sqrt(1 - a) with the spec's clamped derivatives: the value is exact, and autograd
    # sees d/da = 1 / (2 sqrt(a_c)) and -1 / (2 sqrt(1 - a_c)), finite at a = 0 and a = 1.
    delta = (a - a_det).to(wide)
    keep = torch.sqrt(a_det) + (delta / (2 * torch.sqrt(a_c))).to(compute_dtype)
    drop = torch.sqrt(1 - a_det) - (delta / (2 * torch.sqrt(1 - a_c))).to(compute_dtype)
    m = mean.to(compute_dtype).detach()
    s = std.to(compute_dtype).detach()
    z = m + keep * (x.to(compute_dtype) - m) + drop * s * noise.to(compute_dtype).detach()
    return z.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------

def _forward_reference(x, alpha, mean, std, noise, seed, offset):
    return noise_gate_ref(x, alpha, mean, std, seed=seed, offset=offset, noise=noise)


def noise_gate_backward_ref(grad: Tensor, x: Tensor, alpha: Tensor, mean: Tensor, std: Tensor, *,
                            seed: Optional[int] = None, offset: int = 0, noise: Optional[Tensor] = None):
    """The backward of DESIGN.md 1.3 written out: (dx, dalpha) for upstream gradient `grad`, in the
    op-math dtype, cast to x's and alpha's dtypes. The tests hold it against autograd through
    `noise_gate_ref`; the reference backend runs it (custom ops run below autograd, so they cannot
    differentiate the reference themselves)."""
    compute = opmath(x.dtype)
    if noise is None:
        noise = gate_noise_ref(x.numel(), seed, offset, device=x.device).reshape(x.shape)
    a = alpha.to(compute)
    a_c = a.clamp(ALPHA_GRAD_CLAMP, 1 - ALPHA_GRAD_CLAMP)
    g = grad.to(compute)
    m, s = mean.to(compute), std.to(compute)
    grad_x = (torch.sqrt(a).unsqueeze(-1) * g).to(x.dtype)
    signal = (g * (x.to(compute) - m)).sum(-1)
    noise_sum = (g * s * noise.to(compute)).sum(-1)
    grad_alpha = signal / (2 * torch.sqrt(a_c)) - noise_sum / (2 * torch.sqrt(1 - a_c))
    return grad_x, grad_alpha.to(alpha.dtype)


def _backward_reference(grad, x, alpha, mean, std, noise, seed, offset, need_x_grad, need_alpha_grad):
    grad_x, grad_alpha = noise_gate_backward_ref(grad, x, alpha, mean, std, seed=seed, offset=offset, noise=noise)
    return (grad_x if need_x_grad else x.new_empty(0), grad_alpha if need_alpha_grad else alpha.new_empty(0))


KERNELS = Kernels("noise_gate", reference=_forward_reference, cpp=compiled("noise_gate_forward"),
                  cuda=compiled("noise_gate_forward"), triton=triton("noise_gate", "noise_gate_forward"))
KERNELS.add("backward", reference=_backward_reference, cpp=compiled("noise_gate_backward"),
            cuda=compiled("noise_gate_backward"), triton=triton("noise_gate", "noise_gate_backward"))


def check_alpha(alpha: Tensor, where: str = "noise_gate"):
    """alpha in [0, 1] with no NaN (NaN fails both comparisons), as a device-side check."""
    if alpha.numel() == 0:
        return
    inside = (alpha >= 0) & (alpha <= 1)

    def details():
        bad = alpha[~inside]
        return f"{bad.numel()} value(s) outside, e.g. {bad.flatten()[:4].tolist()}"

    check_values(inside.all(), f"{where}: alpha must lie in [0, 1] with no NaN", details)


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("autoselect::noise_gate", mutates_args=())
def _noise_gate_op(x: Tensor, alpha: Tensor, mean: Tensor, std: Tensor, noise: Optional[Tensor], seed: int,
                   offset: int) -> Tensor:
    check_alpha(alpha)
    return KERNELS.run(x.device, x, alpha, mean, std, noise, seed, offset)


@_noise_gate_op.register_fake
def _(x, alpha, mean, std, noise, seed, offset):
    return torch.empty_like(x)


@torch.library.custom_op("autoselect::noise_gate_backward", mutates_args=())
def _noise_gate_backward_op(grad: Tensor, x: Tensor, alpha: Tensor, mean: Tensor, std: Tensor,
                            noise: Optional[Tensor], seed: int, offset: int, need_x_grad: bool,
                            need_alpha_grad: bool) -> tuple[Tensor, Tensor]:
    return KERNELS.run(x.device, grad.contiguous(), x, alpha, mean, std, noise, seed, offset, need_x_grad,
                       need_alpha_grad, table="backward")


@_noise_gate_backward_op.register_fake
def _(grad, x, alpha, mean, std, noise, seed, offset, need_x_grad, need_alpha_grad):
    grad_x = torch.empty_like(x) if need_x_grad else x.new_empty(0)
    grad_alpha = torch.empty_like(alpha) if need_alpha_grad else alpha.new_empty(0)
    return grad_x, grad_alpha


def _setup_context(ctx, inputs, output):
    x, alpha, mean, std, noise, seed, offset = inputs
    need_x_grad, need_alpha_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # x is needed only for the alpha gradient; the noise is regenerated, never saved (unless the
    # caller brought it, in which case it is their tensor, not a new one).
    ctx.save_for_backward(x if need_alpha_grad else None, alpha, mean, std, noise)
    ctx.seed, ctx.offset = seed, offset
    ctx.need = (need_x_grad, need_alpha_grad)


def _backward(ctx, grad):
    x, alpha, mean, std, noise = ctx.saved_tensors
    need_x_grad, need_alpha_grad = ctx.need
    if x is None:  # x is read only for the alpha gradient; grad stands in for it otherwise
        x = grad.contiguous()
    grad_x, grad_alpha = torch.ops.autoselect.noise_gate_backward(grad, x, alpha, mean, std, noise, ctx.seed,
                                                                 ctx.offset, need_x_grad, need_alpha_grad)
    return (grad_x if need_x_grad else None, grad_alpha if need_alpha_grad else None, None, None, None, None,
            None)


_noise_gate_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Functional
# ----------------------------------------------------------------------------------------------------

def _check_seed_offset(seed, offset):
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"noise_gate: {name} must be an int, got {type(value).__name__}")
        if not 0 <= value < _INT64_LIMIT:
            raise ValueError(f"noise_gate: {name} must lie in [0, 2**63), got {value}")


def noise_offsets(numel: int) -> int:
    """How many Philox offsets a noise_gate call over `numel` elements consumes: ceil(numel / 4).
    Advance `offset` by this between calls that must draw independent noise with one seed."""
    return (numel + 3) // 4


def noise_gate(x: Tensor, alpha: Tensor, mean: Tensor, std: Tensor, *, seed: Optional[int],
               offset: int = 0, noise: Optional[Tensor] = None) -> Tensor:
    """Variance-preserving noise gate: z = mean + sqrt(alpha) (x - mean) + sqrt(1 - alpha) std eps.

    Args:
        x: visual tokens, (B, N, D) or (T, D); float32, float16, bfloat16 (or float64).
        alpha: keep fraction per token in [0, 1], (B, N) or (T,); computed in float32 (float64 for
            float64 x). Receives a gradient, as does x. A value outside [0, 1] or NaN is a ValueError,
            checked on the device without a host sync: at once on the CPU, at the next
            synchronisation on a GPU (AUTOSELECT_DEBUG_CHECKS=1 checks on the host, with details).
        mean, std: per-channel running statistics of the tokens, shape (D,); no gradient.
        seed: Philox seed in [0, 2**63); the noise is drawn in the kernel and drawn again in
            backward. May be None only when `noise` is given.
        offset: first Philox counter; a call consumes `noise_offsets(x.numel())` counters.
        noise: optional explicit eps, the shape of x (converted to x's dtype); then seed is unused.

    Returns:
        z, the shape and dtype of x. The backend (cpp, cuda, triton, reference) is chosen per device;
        see `autoselect.backends()`.
    """
    if not isinstance(x, Tensor) or not isinstance(alpha, Tensor):
        raise TypeError("noise_gate: x and alpha must be tensors")
    if x.dim() not in (2, 3):
        raise ValueError(f"noise_gate: x must have shape (B, N, D) or (T, D), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"noise_gate: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if tuple(alpha.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"noise_gate: alpha must have shape {tuple(x.shape[:-1])} (one value per token of x "
                         f"{tuple(x.shape)}), got {tuple(alpha.shape)}")
    D = x.shape[-1]
    for name, t in (("alpha", alpha), ("mean", mean), ("std", std), ("noise", noise)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"noise_gate: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"noise_gate: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"noise_gate: all tensors must be on one device; x is on {x.device}, "
                             f"{name} on {t.device}")
    for name, t in (("mean", mean), ("std", std)):
        if tuple(t.shape) != (D, ):
            raise ValueError(f"noise_gate: {name} must have shape ({D},) to match x's last dimension, "
                             f"got {tuple(t.shape)}")
    if noise is not None and tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise_gate: noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    for name, t in (("mean", mean), ("std", std), ("noise", noise)):
        if t is not None and t.requires_grad:
            raise ValueError(f"noise_gate: {name} receives no gradient (it is a statistic or a draw); "
                             f"pass {name}.detach()")
    if noise is None:
        if seed is None:
            raise ValueError("noise_gate: give a seed (the noise is drawn in the kernel) or an explicit noise tensor")
        _check_seed_offset(seed, offset)
    else:
        seed = 0 if seed is None else seed
        _check_seed_offset(seed, offset)
        noise = noise.to(x.dtype).contiguous()

    compute = opmath(x.dtype)
    return _noise_gate_op(x.contiguous(), alpha.to(compute).contiguous(), mean.to(compute).contiguous(),
                          std.to(compute).contiguous(), noise, seed, offset)
