"""Diagonal attention of the Denoiser in Triton (DESIGN.md 1.4), forward and backward.

For token t and head h, with s = 1 / sqrt(d):

    logits = [q_t . k_t * s + bias_t] ++ [q_t . mem_k_j * s for j < M]
    out_t  = softmax(logits) . [v_t ; mem_v_0 .. mem_v_(M-1)]

Each token attends to itself and to the M memory slots of its head, nothing else, so the (T, H, 1+M)
logits are never written to device memory: the forward runs one program per (BLOCK_T tokens, head)
with an online softmax that starts from the self term and walks the memory in blocks of BLOCK_M
slots; it stores the output and the log-sum-exp `lse` (T, H). The backward recomputes the
probabilities from lse:

    delta_t = dout_t . out_t,   ds_tj = p_tj (dout_t . V_j - delta_t)       (V_0 = v_t, V_j = mem_v_(j-1))
    dq = s (ds_t0 k_t + sum_j ds_tj mem_k_j),  dk = s ds_t0 q_t,  dv = p_t0 dout_t,  dbias = ds_t0
    dmem_k_j = s sum_t ds_tj q_t,  dmem_v_j = sum_t p_tj dout_t            (sums over all B*N tokens)

in two kernels: `_diag_attention_backward_kernel` (one program per token block and head: the token
gradients and delta) and `_diag_attention_memory_backward_kernel` (one program per memory block,
head and chunk of tokens: it walks its chunk accumulating the memory gradients in registers and
writes one partial sum per chunk). The host sums the partials over chunks with torch: no atomics,
so the memory gradients are deterministic (the chunking depends only on the shape and the device).

Layout: q, k, v, out (T, H, d) contiguous with T = B*N; mem_k, mem_v (H, M, d) contiguous; bias and
lse (T, H) in the op-math dtype (float32; float64 for float64 inputs). Head dims that are not a power
of two are padded to BLOCK_D by masking. Under TRITON_INTERPRET=1, numpy has no bfloat16 matmul, so
the operands of tl.dot are upcast to float32 there (DOT_UPCAST).
"""

import contextlib
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with float32 (float64 for float64 operands) accumulation."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _diag_attention_forward_kernel(q_ptr, k_ptr, v_ptr, mem_k_ptr, mem_v_ptr, bias_ptr, out_ptr, lse_ptr,
                                   n_tokens, H, M, d, scale, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_D: tl.constexpr, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_tokens
    col_mask = cols < d
    mask = row_mask[:, None] & col_mask[None, :]
    row_head = rows * H + h
    index = row_head[:, None] * d + cols[None, :]

    bias = tl.load(bias_ptr + row_head, mask=row_mask, other=0.0)  # op-math dtype
    q = tl.load(q_ptr + index, mask=mask, other=0.0)
    k = tl.load(k_ptr + index, mask=mask, other=0.0)
    v = tl.load(v_ptr + index, mask=mask, other=0.0)
    # The self term opens the online softmax: running max = its logit, running sum = 1, acc = v.
    m_i = tl.sum(q.to(bias.dtype) * k.to(bias.dtype), axis=1) * scale + bias
    l_i = tl.zeros((BLOCK_T, ), dtype=bias.dtype) + 1.0
    acc = v.to(bias.dtype)

    mem_base = h.to(tl.int64) * M * d
    for m0 in range(0, M, BLOCK_M):
        slots = m0 + tl.arange(0, BLOCK_M)
        slot_mask = slots < M
        mem_mask = slot_mask[:, None] & col_mask[None, :]
        mem_index = mem_base + slots[:, None] * d + cols[None, :]
        mk = tl.load(mem_k_ptr + mem_index, mask=mem_mask, other=0.0)
        mv = tl.load(mem_v_ptr + mem_index, mask=mem_mask, other=0.0)
        s = _mma(q, tl.trans(mk), DOT_UPCAST, PRECISION).to(bias.dtype) * scale
        s = tl.where(slot_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        rescale = tl.exp(m_i - m_new)
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + _mma(p.to(mv.dtype), mv, DOT_UPCAST, PRECISION).to(bias.dtype)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + index, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + row_head, m_i + tl.log(l_i), mask=row_mask)


@triton.jit
def _diag_attention_backward_kernel(grad_ptr, q_ptr, k_ptr, v_ptr, mem_k_ptr, mem_v_ptr, bias_ptr, out_ptr,
                                    lse_ptr, grad_q_ptr, grad_k_ptr, grad_v_ptr, grad_bias_ptr, delta_ptr,
                                    n_tokens, H, M, d, scale, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_D: tl.constexpr, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_tokens
    col_mask = cols < d
    mask = row_mask[:, None] & col_mask[None, :]
    row_head = rows * H + h
    index = row_head[:, None] * d + cols[None, :]

    bias = tl.load(bias_ptr + row_head, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + row_head, mask=row_mask, other=0.0)
    q = tl.load(q_ptr + index, mask=mask, other=0.0)
    k = tl.load(k_ptr + index, mask=mask, other=0.0)
    v = tl.load(v_ptr + index, mask=mask, other=0.0)
    do = tl.load(grad_ptr + index, mask=mask, other=0.0)
    o = tl.load(out_ptr + index, mask=mask, other=0.0)
    q_f, k_f, do_f = q.to(bias.dtype), k.to(bias.dtype), do.to(bias.dtype)

    delta = tl.sum(do_f * o.to(bias.dtype), axis=1)
    p_self = tl.exp(tl.sum(q_f * k_f, axis=1) * scale + bias - lse)
    ds_self = p_self * (tl.sum(do_f * v.to(bias.dtype), axis=1) - delta)
    dq = (ds_self * scale)[:, None] * k_f

    mem_base = h.to(tl.int64) * M * d
    for m0 in range(0, M, BLOCK_M):
        slots = m0 + tl.arange(0, BLOCK_M)
        slot_mask = slots < M
        mem_mask = slot_mask[:, None] & col_mask[None, :]
        mem_index = mem_base + slots[:, None] * d + cols[None, :]
        mk = tl.load(mem_k_ptr + mem_index, mask=mem_mask, other=0.0)
        mv = tl.load(mem_v_ptr + mem_index, mask=mem_mask, other=0.0)
        s = _mma(q, tl.trans(mk), DOT_UPCAST, PRECISION).to(bias.dtype) * scale
        p = tl.where(slot_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _mma(do, tl.trans(mv), DOT_UPCAST, PRECISION).to(bias.dtype)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(mk.dtype), mk, DOT_UPCAST, PRECISION).to(bias.dtype) * scale

    tl.store(grad_q_ptr + index, dq.to(grad_q_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_k_ptr + index, ((ds_self * scale)[:, None] * q_f).to(grad_k_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_v_ptr + index, (p_self[:, None] * do_f).to(grad_v_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_bias_ptr + row_head, ds_self, mask=row_mask)
    tl.store(delta_ptr + row_head, delta, mask=row_mask)


@triton.jit
def _diag_attention_memory_backward_kernel(grad_ptr, q_ptr, mem_k_ptr, mem_v_ptr, lse_ptr, delta_ptr,
                                           part_k_ptr, part_v_ptr, n_tokens, tokens_per_chunk, H, M, d, scale,
                                           BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                           DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    h = tl.program_id(1)
    chunk = tl.program_id(2)
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    slot_mask = slots < M
    col_mask = cols < d
    mem_mask = slot_mask[:, None] & col_mask[None, :]
    mem_index = h.to(tl.int64) * M * d + slots[:, None] * d + cols[None, :]
    mk = tl.load(mem_k_ptr + mem_index, mask=mem_mask, other=0.0)
    mv = tl.load(mem_v_ptr + mem_index, mask=mem_mask, other=0.0)
    lse_dtype = lse_ptr.dtype.element_ty
    grad_mk = tl.zeros((BLOCK_M, BLOCK_D), dtype=lse_dtype)
    grad_mv = tl.zeros((BLOCK_M, BLOCK_D), dtype=lse_dtype)

    start = chunk.to(tl.int64) * tokens_per_chunk
    end = tl.minimum(start + tokens_per_chunk, n_tokens)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_mask = rows < end
        mask = row_mask[:, None] & col_mask[None, :]
        row_head = rows * H + h
        index = row_head[:, None] * d + cols[None, :]
        q = tl.load(q_ptr + index, mask=mask, other=0.0)
        do = tl.load(grad_ptr + index, mask=mask, other=0.0)
        lse = tl.load(lse_ptr + row_head, mask=row_mask, other=0.0)
        delta = tl.load(delta_ptr + row_head, mask=row_mask, other=0.0)
        s = _mma(q, tl.trans(mk), DOT_UPCAST, PRECISION).to(lse_dtype) * scale
        p = tl.where(row_mask[:, None] & slot_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _mma(do, tl.trans(mv), DOT_UPCAST, PRECISION).to(lse_dtype)
        ds = p * (dp - delta[:, None])
        grad_mv += _mma(tl.trans(p.to(do.dtype)), do, DOT_UPCAST, PRECISION).to(lse_dtype)
        grad_mk += _mma(tl.trans(ds.to(q.dtype)), q, DOT_UPCAST, PRECISION).to(lse_dtype)

    part_index = chunk.to(tl.int64) * H * M * d + mem_index
    tl.store(part_k_ptr + part_index, grad_mk * scale, mask=mem_mask)
    tl.store(part_v_ptr + part_index, grad_mv, mask=mem_mask)


# ----------------------------------------------------------------------------------------------------
# Launch configurations: one table, used by the launcher and by the ahead-of-time compile check
# ----------------------------------------------------------------------------------------------------

# The largest head dim the kernels serve. Wider heads run on the reference (the op says so in
# `autoselect.backends()`): their float32 and float64 blocks would not fit a block's registers and shared
# memory without shrinking the tiles below what tl.dot accepts (16).
MAX_HEAD_DIM = 128

LIMITS = (f"triton serves head dims d <= {MAX_HEAD_DIM} (float32, float16, bfloat16, float64); wider heads "
          f"run on the reference (their tiles would not fit a GPU block's registers and shared memory)")

KERNELS = ("forward", "backward", "memory_backward")


class KernelConfig(NamedTuple):
    """Launch parameters of one kernel: token block, memory-slot block, warps, software-pipeline stages."""
    block_t: int
    block_m: int
    num_warps: int
    num_stages: int


class LaunchConfig(NamedTuple):
    """Head-dim block (d padded to a power of two, at least 32) and the parameters of the three kernels."""
    block_d: int
    forward: KernelConfig
    backward: KernelConfig
    memory_backward: KernelConfig


_DTYPE_CLASS = {torch.float16: "16-bit", torch.bfloat16: "16-bit", torch.float32: "fp32", torch.float64: "fp64"}

# (dtype class, BLOCK_D) -> (forward, backward, memory backward), each (BLOCK_T, BLOCK_M, num_warps,
# num_stages). Chosen by compiling for sm_80 and sm_90 and reading registers, spills and shared memory
# (tests/test_triton_aot.py compiles every entry and checks them against the shared memory a block may
# use, 163 KiB on sm_80 and 227 KiB on sm_90, and for spills). float32 runs three tf32 products per
# dot (tf32x3) and float64 twice-wide registers, so their tiles are smaller than the 16-bit ones.
_CONFIGS = {
    ("16-bit", 32): ((64, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3)),
    ("16-bit", 64): ((64, 64, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)),
    # The memory backward at 16-bit d = 128 runs unpipelined: on an H100 (Triton 3.6, 2026-11-26) its
    # software-pipelined variants (BLOCK_T 16 or 32 with 2 or 3 stages) gave wrong mem_k gradients on
    # some inputs (errors 0.03-0.23 of the largest, against 0.002 for PyTorch at fp16), 1 stage none.
    ("16-bit", 128): ((32, 64, 8, 3), (16, 64, 8, 3), (32, 64, 8, 1)),
    ("fp32", 32): ((64, 32, 8, 2), (64, 32, 8, 2), (32, 16, 4, 2)),
    ("fp32", 64): ((32, 32, 8, 2), (16, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 128): ((16, 32, 8, 1), (16, 32, 8, 1), (16, 32, 8, 1)),
    ("fp64", 32): ((32, 32, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2)),
    ("fp64", 64): ((16, 32, 8, 2), (16, 32, 8, 2), (16, 32, 8, 2)),
    # The fp64 d = 128 forward runs unpipelined: with 2 stages it spilled 4 bytes on sm_90 under Triton 3.6.
    ("fp64", 128): ((16, 16, 8, 1), (16, 32, 8, 1), (16, 32, 8, 1)),
}


def _block_d(d: int) -> int:
    # tl.dot needs every block dimension >= 16; head dims up to 32 share the 32-wide kernels.
    return max(32, triton.next_power_of_2(d))


def unsupported(dtype: torch.dtype, d: int) -> Optional[str]:
    """Why the kernels cannot serve q of `dtype` with head dim `d` (one line), or None when they can.
    The number of memory slots M and of tokens never matters: both are walked in blocks."""
    if dtype not in _DTYPE_CLASS:
        return f"no Triton kernel for dtype {dtype}"
    if d > MAX_HEAD_DIM:
        return (f"head dim d = {d} > {MAX_HEAD_DIM}, the widest the Triton kernels serve (their tiles would "
                f"not fit a GPU block's registers and shared memory)")
    return None


def launch_config(dtype: torch.dtype, d: int) -> LaunchConfig:
    """The blocks, warps and stages of the three kernels for q of `dtype` and head dim `d`. The launcher
    and `aot_specs` both read this, so the ahead-of-time check compiles what is launched. Raises
    ValueError (with the reason of `unsupported`) for inputs the kernels do not serve."""
    reason = unsupported(dtype, d)
    if reason is not None:
        raise ValueError(f"diag_attention: {reason}")
    block_d = _block_d(d)
    forward, backward, memory_backward = (KernelConfig(*c) for c in _CONFIGS[(_DTYPE_CLASS[dtype], block_d)])
    return LaunchConfig(block_d, forward, backward, memory_backward)


def served_configs():
    """[(dtype, d)] with one head dim per distinct launch configuration: every dtype the op accepts at
    d = 32, 64 and 128 (the BLOCK_D of every head dim up to MAX_HEAD_DIM)."""
    return [(dtype, d) for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            for d in (32, 64, MAX_HEAD_DIM)]


# ----------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: three tf32 products (about fp32 accuracy on tensor cores); fp64: exact FMAs.
    # For fp16 / bf16 operands the setting has no effect.
    return {torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32")


def _dot_upcast(t: torch.Tensor) -> bool:
    # The interpreter multiplies with numpy, which has no bfloat16 (it stores bf16 as uint16).
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _meta(config: LaunchConfig, kernel: KernelConfig, q: torch.Tensor):
    return dict(BLOCK_T=kernel.block_t, BLOCK_M=kernel.block_m, BLOCK_D=config.block_d, DOT_UPCAST=_dot_upcast(q),
                PRECISION=_precision(q.dtype), num_warps=kernel.num_warps, num_stages=kernel.num_stages)


def _memory_chunks(n_tokens: int, H: int, M: int, block_t: int, block_m: int, device: torch.device) -> int:
    """Token chunks of the memory backward: enough programs to fill the GPU, and few partial sums.
    On the CPU (the interpreter) three chunks at most, so the partial-sum path is exercised."""
    token_blocks = triton.cdiv(n_tokens, block_t)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(target, H * triton.cdiv(M, block_m))
    else:
        wanted = 3
    return max(1, min(token_blocks, wanted))


def diag_attention_forward(q, k, v, mem_k, mem_v, bias):
    """(out, lse) for contiguous q, k, v (T, H, d) or (B, N, H, d), mem_k, mem_v (H, M, d) in the dtype
    of q, and bias (..., H) in the op-math dtype (float32, or float64 for float64 q). Raises ValueError
    for a dtype or head dim the kernels do not serve (`unsupported`)."""
    H, d = q.shape[-2], q.shape[-1]
    M = mem_k.shape[1]
    config = launch_config(q.dtype, d)
    n_tokens = q.numel() // (H * d) if H * d else 0
    out = q.new_empty(q.shape)
    lse = bias.new_empty(bias.shape)
    if n_tokens == 0 or out.numel() == 0:
        return out, lse
    grid = (triton.cdiv(n_tokens, config.forward.block_t), H)
    with _device_of(q):
        _diag_attention_forward_kernel[grid](
            q, k, v, mem_k, mem_v, bias, out, lse, n_tokens, H, M, d, 1.0 / math.sqrt(d),
            **_meta(config, config.forward, q))
    return out, lse


def diag_attention_backward(grad, q, k, v, mem_k, mem_v, bias, out, lse):
    """(grad_q, grad_k, grad_v, grad_mem_k, grad_mem_v, grad_bias) for a contiguous upstream gradient
    `grad` of out; the memory gradients are summed over every token (deterministically)."""
    H, d = q.shape[-2], q.shape[-1]
    M = mem_k.shape[1]
    config = launch_config(q.dtype, d)
    n_tokens = q.numel() // (H * d) if H * d else 0
    grad_q, grad_k, grad_v = q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)
    grad_bias = bias.new_empty(bias.shape)
    if n_tokens == 0 or q.numel() == 0:
        grad_bias.zero_()
        return grad_q, grad_k, grad_v, torch.zeros_like(mem_k), torch.zeros_like(mem_v), grad_bias
    scale = 1.0 / math.sqrt(d)
    delta = torch.empty_like(lse)
    mem_cfg = config.memory_backward
    chunks = _memory_chunks(n_tokens, H, M, mem_cfg.block_t, mem_cfg.block_m, q.device)
    tokens_per_chunk = triton.cdiv(triton.cdiv(n_tokens, chunks), mem_cfg.block_t) * mem_cfg.block_t
    chunks = triton.cdiv(n_tokens, tokens_per_chunk)
    part_k = lse.new_empty((chunks, H, M, d))
    part_v = lse.new_empty((chunks, H, M, d))
    with _device_of(q):
        _diag_attention_backward_kernel[(triton.cdiv(n_tokens, config.backward.block_t), H)](
            grad, q, k, v, mem_k, mem_v, bias, out, lse, grad_q, grad_k, grad_v, grad_bias, delta, n_tokens, H,
            M, d, scale, **_meta(config, config.backward, q))
        _diag_attention_memory_backward_kernel[(triton.cdiv(M, mem_cfg.block_m), H, chunks)](
            grad, q, mem_k, mem_v, lse, delta, part_k, part_v, n_tokens, tokens_per_chunk, H, M, d, scale,
            **_meta(config, mem_cfg, q))
    grad_mem_k = part_k.sum(0).to(mem_k.dtype)
    grad_mem_v = part_v.sum(0).to(mem_v.dtype)
    return grad_q, grad_k, grad_v, grad_mem_k, grad_mem_v, grad_bias


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def aot_specs():
    """(kernel, signature, constexprs, options, hints) for every launch configuration the launcher can
    choose (`served_configs`: each dtype at d = 32, 64, 128), for the ahead-of-time compile check
    (triton_kernels/aot.py): the constexprs and options (num_warps, num_stages) are those of
    `launch_config`. `hints` names the integer and pointer arguments that a typical launch specialises as
    divisible by 16 (16-byte aligned tensors, d = BLOCK_D, M and the token chunk multiples of 16), so the
    compile sees the code a launch at the Denoiser's shapes gets."""
    specs = []
    for dtype, d in served_configs():
        config = launch_config(dtype, d)
        ptr = f"*{_TRITON_TYPES[dtype]}"
        opmath = "*fp64" if dtype == torch.float64 else "*fp32"
        sizes = {"n_tokens": "i32", "H": "i32", "M": "i32", "d": "i32", "scale": "fp32"}
        names = ("BLOCK_T", "BLOCK_M", "BLOCK_D", "DOT_UPCAST", "PRECISION")
        tail = {**sizes, **{name: "constexpr" for name in names}}
        signatures = {
            "forward": {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "mem_k_ptr": ptr, "mem_v_ptr": ptr,
                        "bias_ptr": opmath, "out_ptr": ptr, "lse_ptr": opmath, **tail},
            "backward": {"grad_ptr": ptr, "q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "mem_k_ptr": ptr,
                         "mem_v_ptr": ptr, "bias_ptr": opmath, "out_ptr": ptr, "lse_ptr": opmath, "grad_q_ptr": ptr,
                         "grad_k_ptr": ptr, "grad_v_ptr": ptr, "grad_bias_ptr": opmath, "delta_ptr": opmath,
                         **tail},
            "memory_backward": {"grad_ptr": ptr, "q_ptr": ptr, "mem_k_ptr": ptr, "mem_v_ptr": ptr, "lse_ptr": opmath,
                                "delta_ptr": opmath, "part_k_ptr": opmath, "part_v_ptr": opmath, "n_tokens": "i32",
                                "tokens_per_chunk": "i32", **{k: v for k, v in tail.items() if k != "n_tokens"}},
        }
        kernels = {"forward": _diag_attention_forward_kernel, "backward": _diag_attention_backward_kernel,
                   "memory_backward": _diag_attention_memory_backward_kernel}
        for name in KERNELS:
            kernel_config = getattr(config, name)
            constexprs = {"BLOCK_T": kernel_config.block_t, "BLOCK_M": kernel_config.block_m,
                          "BLOCK_D": config.block_d, "DOT_UPCAST": False, "PRECISION": _precision(dtype)}
            options = {"num_warps": kernel_config.num_warps, "num_stages": kernel_config.num_stages}
            signature = signatures[name]
            hints = [arg for arg, kind in signature.items()
                     if kind.startswith("*") or arg in ("d", "M", "tokens_per_chunk")]
            specs.append((kernels[name], signature, constexprs, options, hints))
    return specs
