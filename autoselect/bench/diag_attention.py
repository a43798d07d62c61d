"""Benchmark of diagonal attention: the fused op against the eager reference.

Providers, built by one `setup` so they see the same inputs:
  eager       `diag_attention_ref` under autograd at the inputs' precision (what a user writes in
              PyTorch: it materialises the (B, N, H, 1+M) logits and keeps the probabilities);
  autoselect  `autoselect.diag_attention` with its chosen backend (on a GPU the fused Triton kernels:
              no logits in memory, backward recomputed from the log-sum-exp).
Modes: forward, full (forward + backward). All six inputs require grad in `full` (the Denoiser trains
the projections that make q, k, v, the memory and the self bias). On a GPU, also the peak memory of
one full step above the inputs. On the CPU the op runs its reference backend: the Triton kernel runs
there only in its interpreter, which is not a speed figure and is not measured.

Shapes are B,N,H,d,M (the Denoiser's default at LLaVA-1.5's 576 tokens: 16,576,8,64,64).
"""

import torch

from .. import _backends
from ..ops.diag_attention import diag_attention, diag_attention_ref
from ._timing import device_name, measure, today, versions

PROVIDERS = ("eager", "autoselect")
MODES = ("forward", "full")
SHAPE_FIELDS = ("B", "N", "H", "d", "M")
DEFAULT_SHAPES = {"cpu": ["16,576,8,64,64"], "cuda": ["16,576,8,64,64"]}
CPU_NOTE = ("CPU: the op runs its reference backend; the Triton kernel runs on a CPU only in its interpreter, "
            "which is not a speed figure")


def make_inputs(B: int, N: int, H: int, d: int, M: int, dtype: torch.dtype, device, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors = [torch.randn(B, N, H, d, generator=generator) for _ in range(3)]
    tensors += [torch.randn(H, M, d, generator=generator) for _ in range(2)]
    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    self_bias = torch.randn(B, N, H, generator=generator).to(device)
    return tensors + [self_bias]


def _forward_fn(provider, inputs):
    if provider == "eager":
        dtype = inputs[0].dtype
        return lambda: diag_attention_ref(*inputs[:5], inputs[5].to(dtype), compute_dtype=dtype)
    if provider == "autoselect":
        return lambda: diag_attention(*inputs)
    raise ValueError(f"unknown provider {provider!r}; choose one of {PROVIDERS}")


def setup(B: int, N: int, H: int, d: int, M: int, dtype: torch.dtype, device, mode: str, provider: str):
    """A zero-argument callable that runs `mode` of `provider` once on fresh inputs of this shape."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    device = torch.device(device)
    inputs = make_inputs(B, N, H, d, M, dtype, device)
    for t in inputs:
        t.requires_grad_(mode == "full")
    forward = _forward_fn(provider, inputs)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return forward()
        return run
    grad = torch.randn_like(inputs[0])

    def run():
        for t in inputs:
            t.grad = None
        forward().backward(grad)
    return run


def peak_memory_bytes(provider: str, B: int, N: int, H: int, d: int, M: int, dtype: torch.dtype, device) -> int:
    """(GPU) Peak bytes allocated during one forward + backward, above what was allocated before it
    (the inputs and the upstream gradient)."""
    step = setup(B, N, H, d, M, dtype, device, "full", provider)
    step()  # warm-up: kernels compiled, caching allocator primed
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def parse_shape(text: str) -> dict:
    """'B,N,H,d,M' -> keyword arguments of `run`; ValueError when it does not have five integers."""
    values = [int(v) for v in text.split(",")]
    if len(values) != len(SHAPE_FIELDS):
        raise ValueError(f"diag_attention shapes are {','.join(SHAPE_FIELDS)}, got {text!r}")
    return dict(zip(SHAPE_FIELDS, values))


def run(B: int = 16, N: int = 576, H: int = 8, d: int = 64, M: int = 64, dtype: torch.dtype = torch.float32,
        device="cpu", repeats: int = 20, modes=MODES, backends=None):
    """Measure every provider and mode at one shape; returns result rows (see _timing.FIELDS).
    `backends`: the backends to measure the autoselect provider with (default: the one chosen)."""
    device = torch.device(device)
    cases = [("eager", None)] + [("autoselect", b) for b in (backends or [_backends.choose("diag_attention", device)])]
    common = {"date": today(), "kernel": "diag_attention", "shape": f"B={B} N={N} H={H} d={d} M={M}",
              "dtype": str(dtype).split(".")[-1], "device": device.type, "device_name": device_name(device),
              **versions()}
    rows = []
    for mode in modes:
        for provider, backend in cases:
            with _backends.force_backend(backend):
                median, p20, p80 = measure(setup(B, N, H, d, M, dtype, device, mode, provider), device, repeats)
            note = CPU_NOTE if device.type == "cpu" and provider == "autoselect" else ""
            rows.append({**common, "mode": mode, "provider": provider, "backend": backend or "torch",
                         "median_ms": median, "p20_ms": p20, "p80_ms": p80, "note": note})
    if device.type == "cuda":
        logits = B * N * H * (1 + M) * torch.empty((), dtype=dtype).element_size()
        for provider, backend in cases:
            with _backends.force_backend(backend):
                peak = peak_memory_bytes(provider, B, N, H, d, M, dtype, device)
            rows.append({**common, "mode": "peak_memory", "provider": provider, "backend": backend or "torch",
                         "note": f"{peak / 2**20:.2f} MiB peak above the inputs in one forward+backward "
                                 f"(one (B, N, H, 1+M) logits tensor: {logits / 2**20:.2f} MiB)"})
    return rows
