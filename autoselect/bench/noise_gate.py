"""Benchmark of the noise gate: the fused op against eager PyTorch.

Providers, built by one `setup` so they see the same inputs:
  eager       what a user writes in PyTorch: eps = torch.randn_like(x), then the formula through
              `noise_gate_ref` under autograd (which keeps eps and the products for backward);
  autoselect  `autoselect.noise_gate` with its chosen backend (noise drawn in the kernel and drawn
              again in backward);
  copy        (GPU) x.clone(): one read and one write of x, the bandwidth limit of the forward.
Modes: forward, backward (a retained graph, backward only), full (forward + backward). The training
case is measured: alpha requires grad, x (the frozen projector's output) does not.
"""

import torch

from .. import _backends
from ..ops.noise_gate import noise_gate, noise_gate_ref
from ._timing import device_name, measure, today, versions

PROVIDERS = ("eager", "autoselect")
MODES = ("forward", "backward", "full")


def make_inputs(B: int, N: int, D: int, dtype: torch.dtype, device, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, N, D, generator=generator).to(device=device, dtype=dtype)
    alpha = torch.rand(B, N, generator=generator).to(device)
    mean = (0.1 * torch.randn(D, generator=generator)).to(device)
    std = (0.5 + torch.rand(D, generator=generator)).to(device)
    return x, alpha, mean, std


def _forward_fn(provider, x, alpha, mean, std):
    if provider == "eager":
        return lambda: noise_gate_ref(x, alpha, mean, std, noise=torch.randn_like(x))
    if provider == "autoselect":
        return lambda: noise_gate(x, alpha, mean, std, seed=1234)
    raise ValueError(f"unknown provider {provider!r}; choose one of {PROVIDERS}")


def setup(B: int, N: int, D: int, dtype: torch.dtype, device, mode: str, provider: str):
    """A zero-argument callable that runs `mode` of `provider` once on fresh inputs of this shape."""
    device = torch.device(device)
    x, alpha, mean, std = make_inputs(B, N, D, dtype, device)
    if provider == "copy":
        return lambda: x.clone()
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    alpha.requires_grad_(mode != "forward")
    forward = _forward_fn(provider, x, alpha, mean, std)
    grad = torch.randn_like(x)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if mode == "full":
        def run():
            alpha.grad = None
            forward().backward(grad)
        return run
    z = forward()

    def run():
        alpha.grad = None
        z.backward(grad, retain_graph=True)
    return run


def saved_for_backward_bytes(provider: str, B: int, N: int, D: int, dtype: torch.dtype, device) -> int:
    """Bytes of tensors that autograd keeps between forward and backward for one call, counting each
    storage once and leaving out the inputs themselves (x, alpha, mean, std exist anyway)."""
    x, alpha, mean, std = make_inputs(B, N, D, dtype, torch.device(device))
    alpha.requires_grad_(True)
    inputs = {t.untyped_storage().data_ptr() for t in (x, alpha, mean, std)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward_fn(provider, x, alpha, mean, std)()
    return sum(storages.values())


def run(B: int = 4, N: int = 576, D: int = 1024, dtype: torch.dtype = torch.float32, device="cpu",
        repeats: int = 20, modes=MODES, backends=None):
    """Measure every provider and mode at one shape; returns result rows (see _timing.FIELDS).
    `backends`: the backends to measure the autoselect provider with (default: the one chosen); on a
    GPU the forward rows note the fraction of the copy bandwidth that the fused forward reaches (the
    copy moves the same bytes: x read, z written)."""
    device = torch.device(device)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    # Forward traffic: x read, z written (alpha, mean, std are negligible).
    forward_bytes = 2 * B * N * D * element_bytes
    backends = list(backends or [_backends.choose("noise_gate", device)])
    common = {"date": today(), "kernel": "noise_gate", "shape": f"B={B} N={N} D={D}", "dtype": str(dtype).split(".")[-1],
              "device": device.type, "device_name": device_name(device), **versions()}
    rows = []
    copy_ms = None
    if device.type == "cuda":
        copy_ms, p20, p80 = measure(setup(B, N, D, dtype, device, "forward", "copy"), device, repeats)
        rows.append({**common, "mode": "forward", "provider": "copy", "backend": "torch", "median_ms": copy_ms,
                     "p20_ms": p20, "p80_ms": p80, "gbps": forward_bytes / copy_ms / 1e6,
                     "note": "device-to-device copy of x: the bandwidth limit"})
    cases = [("eager", None)] + [("autoselect", backend) for backend in backends]
    for mode in modes:
        for provider, backend in cases:
            with _backends.force_backend(backend):
                median, p20, p80 = measure(setup(B, N, D, dtype, device, mode, provider), device, repeats)
            note = ""
            if mode == "forward" and copy_ms is not None:
                note = f"{copy_ms / median:.0%} of copy bandwidth"
            rows.append({**common, "mode": mode, "provider": provider, "backend": backend or "torch",
                         "median_ms": median, "p20_ms": p20, "p80_ms": p80,
                         "gbps": forward_bytes / median / 1e6 if mode == "forward" else "", "note": note})
    for provider, backend in cases:
        with _backends.force_backend(backend):
            saved = saved_for_backward_bytes(provider, B, N, D, dtype, device)
        rows.append({**common, "mode": "saved_for_backward", "provider": provider, "backend": backend or "torch",
                     "note": f"{saved / 2**20:.2f} MiB kept between forward and backward"})
    return rows
