"""Variance-preserving noise gate in Triton (DESIGN.md 1.3), forward and backward.

    forward:  z  = mean + sqrt(a) * (x - mean) + sqrt(1 - a) * std * eps
    backward: dx = sqrt(a) * g
              da = sum_D g * (x - mean) / (2 sqrt(a_c)) - sum_D g * std * eps / (2 sqrt(1 - a_c))

with a_c = clamp(a, 1e-6, 1 - 1e-6). eps for flat element i is component i % 4 of
tl.randn4x(seed, offset + i // 4) (the RNG contract, DESIGN.md section 2). It is drawn in the kernel
and drawn again in backward, so nothing of the size of x is kept between the passes.

The 64-bit counter c = offset + i // 4 is split here into two uint32 words and Triton's Philox is
called with them (`_randn4x`): Philox4x32-10 with counter (lo(c), hi(c), 0, 0) and key (lo(seed),
hi(seed)), then Triton's uniform conversion and Box-Muller. That is what tl.randn4x does with an int64
offset from Triton 3.4 on; before 3.4, tl.randn4x switched to Philox4x64 for 64-bit offsets (another
stream), so calling it directly would tie the noise to the installed Triton.

Layout: x viewed as (rows, D), contiguous. The forward runs one program per (BLOCK_R x BLOCK_D) tile;
the backward one program per BLOCK_R rows, looping over D, because the alpha gradient sums over D.
When D % 4 == 0 every row starts a fresh group of four, so a tile draws one Philox evaluation per four
elements and interleaves the four outputs; otherwise each element evaluates its own group (4x the
RNG work, only for odd widths).
"""

import contextlib

import torch
import triton
import triton.language as tl

# Clamp applied to alpha inside the denominators of the alpha gradient only (DESIGN.md 1.3).
ALPHA_GRAD_CLAMP = 1e-6


@triton.jit
def _randn4x(seed, counters):
    """The four normals of the RNG contract for int64 `counters` >= 0, on every Triton version: Philox4x32-10
    on (lo32, hi32, 0, 0) with key (lo32(seed), hi32(seed)), as tl.randn4x computes it in Triton >= 3.4."""
    lo = (counters & 0xFFFFFFFF).to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    u0, u1 = tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1)
    u2, u3 = tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3)
    n0, n1 = tl.pair_uniform_to_normal(u0, u1)
    n2, n3 = tl.pair_uniform_to_normal(u2, u3)
    return n0, n1, n2, n3


@triton.jit
def _gate_noise(seed, offset, rows, col0, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                GROUPS_ALIGNED: tl.constexpr):
    """eps for the tile rows x [col0, col0 + BLOCK_D) of a (rows, D) tensor: shape (BLOCK_R, BLOCK_D)."""
    if GROUPS_ALIGNED:
        # Row r, columns col0 + 4q .. col0 + 4q + 3 are one group: counter offset + (r*D + col0)/4 + q.
        groups = (col0 // 4) + tl.arange(0, BLOCK_D // 4)
        counters = offset + rows[:, None] * (D // 4) + groups[None, :]  # int64: rows is int64
        n0, n1, n2, n3 = _randn4x(seed, counters)
        # join(join(n0, n2), join(n1, n3)) has shape (R, Q, 2, 2) holding n_(2j+k) at [.., q, j, k],
        # so row-major flattening of (q, j, k) gives element 4q + 2j + k its component 2j + k.
        eps = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK_R, BLOCK_D))
    else:
        flat = rows[:, None] * D + (col0 + tl.arange(0, BLOCK_D))[None, :]
        n0, n1, n2, n3 = _randn4x(seed, offset + flat // 4)
        component = flat % 4
        eps = tl.where(component == 0, n0, tl.where(component == 1, n1, tl.where(component == 2, n2, n3)))
    return eps


@triton.jit
def _noise_gate_forward_kernel(x_ptr, alpha_ptr, mean_ptr, std_ptr, noise_ptr, out_ptr, n_rows, D, seed, offset,
                               HAS_NOISE: tl.constexpr, GROUPS_ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    index = rows[:, None] * D + cols[None, :]

    a = tl.load(alpha_ptr + rows, mask=row_mask, other=1.0)  # op-math dtype: fp32, or fp64 for fp64 x
    mu = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)[None, :]
    sd = tl.load(std_ptr + cols, mask=col_mask, other=0.0)[None, :]
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(a.dtype)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + index, mask=mask, other=0.0).to(a.dtype)
    else:
        eps = _gate_noise(seed, offset, rows, col0, D, BLOCK_R, BLOCK_D, GROUPS_ALIGNED).to(a.dtype)
    keep = tl.sqrt(a)[:, None]
    drop = tl.sqrt(1.0 - a)[:, None]
    z = mu + keep * (x - mu) + drop * sd * eps
    tl.store(out_ptr + index, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_gate_backward_kernel(grad_ptr, x_ptr, alpha_ptr, mean_ptr, std_ptr, noise_ptr, grad_x_ptr,
                                grad_alpha_ptr, n_rows, D, seed, offset, clamp_lo, HAS_NOISE: tl.constexpr,
                                GROUPS_ALIGNED: tl.constexpr, NEED_X_GRAD: tl.constexpr,
                                NEED_ALPHA_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    a = tl.load(alpha_ptr + rows, mask=row_mask, other=1.0)
    keep = tl.sqrt(a)[:, None]
    signal = tl.zeros((BLOCK_R, ), dtype=a.dtype)
    noise_sum = tl.zeros((BLOCK_R, ), dtype=a.dtype)
    for col0 in range(0, D, BLOCK_D):
        cols = col0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        index = rows[:, None] * D + cols[None, :]
        g = tl.load(grad_ptr + index, mask=mask, other=0.0).to(a.dtype)
        if NEED_X_GRAD:
            tl.store(grad_x_ptr + index, (keep * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_ALPHA_GRAD:
            mu = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)[None, :]
            sd = tl.load(std_ptr + cols, mask=col_mask, other=0.0)[None, :]
            x = tl.load(x_ptr + index, mask=mask, other=0.0).to(a.dtype)
            if HAS_NOISE:
                eps = tl.load(noise_ptr + index, mask=mask, other=0.0).to(a.dtype)
            else:
                eps = _gate_noise(seed, offset, rows, col0, D, BLOCK_R, BLOCK_D, GROUPS_ALIGNED).to(a.dtype)
            signal += tl.sum(g * (x - mu), axis=1)
            noise_sum += tl.sum(g * sd * eps, axis=1)
    if NEED_ALPHA_GRAD:
        a_c = tl.minimum(tl.maximum(a, clamp_lo), 1.0 - clamp_lo)
        grad_a = signal / (2.0 * tl.sqrt(a_c)) - noise_sum / (2.0 * tl.sqrt(1.0 - a_c))
        tl.store(grad_alpha_ptr + rows, grad_a, mask=row_mask)


def _device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' one (x on cuda:1 while cuda:0 is current).
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _forward_config(D: int):
    """(BLOCK_R, BLOCK_D, num_warps): 2048-element tiles on 4 warps (16 elements a thread). Widths that are
    not a multiple of 4 draw four normals per element (one Philox group each): their tiles hold 1024 elements
    on 4 warps. Both keep the kernel free of register spills on sm_80 and sm_90 under Triton 3.6 and 3.9
    (tests/test_triton_aot.py); 4096-element tiles on 8 warps, the same work per thread, spilled 16 bytes in
    fp32 under Triton 3.6."""
    block_d = min(triton.next_power_of_2(max(D, 4)), 1024)
    if D % 4:
        return max(1, 1024 // block_d), block_d, 4
    return max(1, 2048 // block_d), block_d, 4


def _backward_config(D: int):
    """(BLOCK_R, BLOCK_D, num_warps): 2048-element tiles on 8 warps, which keeps the kernel free of register
    spills on sm_80 and sm_90 under Triton 3.6 and 3.9 (on 4 warps the fp32 kernel spilled 16 bytes on sm_80
    under Triton 3.6)."""
    block_d = min(triton.next_power_of_2(max(D, 4)), 512)
    return max(1, 2048 // block_d), block_d, 8


def noise_gate_forward(x, alpha, mean, std, noise, seed: int, offset: int):
    """z for contiguous x (..., D); alpha (...), mean and std (D,) in the op-math dtype of x."""
    out = x.new_empty(x.shape)
    D = x.shape[-1]
    n_rows = x.numel() // D if D else 0
    if out.numel() == 0:
        return out
    block_r, block_d, num_warps = _forward_config(D)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(D, block_d))
    with _device_of(x):
        _noise_gate_forward_kernel[grid](
            x, alpha, mean, std, x if noise is None else noise, out, n_rows, D, seed, offset,
            HAS_NOISE=noise is not None, GROUPS_ALIGNED=D % 4 == 0, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=num_warps)
    return out


def noise_gate_backward(grad, x, alpha, mean, std, noise, seed: int, offset: int, need_x_grad: bool,
                        need_alpha_grad: bool):
    """(grad_x, grad_alpha); an unrequested gradient comes back as an empty tensor."""
    grad_x = x.new_empty(x.shape) if need_x_grad else x.new_empty(0)
    grad_alpha = alpha.new_empty(alpha.shape) if need_alpha_grad else alpha.new_empty(0)
    D = x.shape[-1]
    n_rows = x.numel() // D if D else 0
    if n_rows == 0 or D == 0:
        if need_alpha_grad:
            grad_alpha.zero_()
        return grad_x, grad_alpha
    block_r, block_d, num_warps = _backward_config(D)
    grid = (triton.cdiv(n_rows, block_r), )
    with _device_of(x):
        _noise_gate_backward_kernel[grid](
            grad, x, alpha, mean, std, x if noise is None else noise, grad_x if need_x_grad else grad,
            grad_alpha if need_alpha_grad else alpha, n_rows, D, seed, offset, ALPHA_GRAD_CLAMP,
            HAS_NOISE=noise is not None, GROUPS_ALIGNED=D % 4 == 0, NEED_X_GRAD=need_x_grad,
            NEED_ALPHA_GRAD=need_alpha_grad, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return grad_x, grad_alpha


def aot_specs():
    """(kernel, signature, constexprs, options, hints) covering the kernels' launch variants at D = 4096
    (LLaVA's width; seeded and with explicit noise) and D = 4095 (the path for widths that are not a
    multiple of 4), for the ahead-of-time compilation check (triton_kernels/aot.py) on machines without
    a GPU: the blocks and num_warps are those the launchers pick for those widths; hints name the
    arguments such a launch specialises as divisible by 16 (aligned tensors, D = 4096)."""
    specs = []
    for ptr in ("fp32", "fp16", "bf16"):
        for has_noise, D in ((False, 4096), (False, 4095), (True, 4096)):
            fwd_config, bwd_config = _forward_config(D), _backward_config(D)
            aligned = D % 4 == 0
            hinted_d = "D" if D % 16 == 0 else None  # a launch specialises D divisible by 16
            fwd_sig = {"x_ptr": f"*{ptr}", "alpha_ptr": "*fp32", "mean_ptr": "*fp32", "std_ptr": "*fp32",
                       "noise_ptr": f"*{ptr}", "out_ptr": f"*{ptr}", "n_rows": "i32", "D": "i32", "seed": "i64",
                       "offset": "i64", "HAS_NOISE": "constexpr", "GROUPS_ALIGNED": "constexpr",
                       "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
            specs.append((_noise_gate_forward_kernel, fwd_sig,
                          {"HAS_NOISE": has_noise, "GROUPS_ALIGNED": aligned, "BLOCK_R": fwd_config[0],
                           "BLOCK_D": fwd_config[1]}, {"num_warps": fwd_config[2]},
                          [name for name, kind in fwd_sig.items() if kind.startswith("*") or name == hinted_d]))
            bwd_sig = {"grad_ptr": f"*{ptr}", "x_ptr": f"*{ptr}", "alpha_ptr": "*fp32", "mean_ptr": "*fp32",
                       "std_ptr": "*fp32", "noise_ptr": f"*{ptr}", "grad_x_ptr": f"*{ptr}", "grad_alpha_ptr": "*fp32",
                       "n_rows": "i32", "D": "i32", "seed": "i64", "offset": "i64", "clamp_lo": "fp32",
                       "HAS_NOISE": "constexpr", "GROUPS_ALIGNED": "constexpr", "NEED_X_GRAD": "constexpr",
                       "NEED_ALPHA_GRAD": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
            specs.append((_noise_gate_backward_kernel, bwd_sig,
                          {"HAS_NOISE": has_noise, "GROUPS_ALIGNED": aligned, "NEED_X_GRAD": True,
                           "NEED_ALPHA_GRAD": True, "BLOCK_R": bwd_config[0], "BLOCK_D": bwd_config[1]},
                          {"num_warps": bwd_config[2]},
                          [name for name, kind in bwd_sig.items() if kind.startswith("*") or name == hinted_d]))
    return specs
