"""Benchmark of the inference-time selection: Scorer + top-K + gather.

Providers, built by one `setup` so they see the same inputs:
  eager       what a user writes in PyTorch: the Scorer module, torch.topk, a sort of the kept
              indices (spatial order) and torch.gather;
  autoselect  the fused path: `Scorer.select` for mode "score+select" (one GEMM with the LayerNorm
              folded in, then one launch for the scores, the top-K, the sort and the gather), and
              `select_topk` for mode "select" (scores given);
  copy        (GPU) x.clone(): one read and one write of x, the bandwidth limit (the fused path reads
              x at least once).
Shapes are B,N,D,K; the closing note of the Scorer issue uses B = 1, N = 576, D = 4096, K = 64.
"""

import torch

from .. import _backends
from ..modules.scorer import Scorer
from ..ops.select import select_topk
from ._timing import device_name, measure, today, versions

PROVIDERS = ("eager", "autoselect")
MODES = ("score+select", "select")
SHAPE_FIELDS = ("B", "N", "D", "K")
DEFAULT_SHAPES = {"cpu": ["1,576,4096,64", "8,576,4096,64"],
                  "cuda": ["1,576,4096,64", "8,576,4096,64", "32,576,4096,64"]}


def parse_shape(text: str):
    """'B,N,D,K' -> dict of ints; ValueError when it is not four positive ints with K <= N."""
    values = [int(v) for v in text.split(",")]
    if len(values) != 4 or min(values) < 1 or values[3] > values[1]:
        raise ValueError(f"expected B,N,D,K with 1 <= K <= N, got {text!r}")
    return dict(zip(SHAPE_FIELDS, values))


def make_inputs(B: int, N: int, D: int, dtype: torch.dtype, device, seed: int = 0, hidden: int = 256):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, N, D, generator=generator).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    scorer = Scorer(D, layers=0, hidden=hidden).to(device=device, dtype=dtype).eval()  # the fused light Scorer
    scores = torch.randn(B, N, generator=generator).to(device)
    return x, scorer, scores


def eager_select(x, scores, k):
    index = torch.topk(scores, k, dim=-1).indices.sort(-1).values
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1])), index


def setup(B: int, N: int, D: int, K: int, dtype: torch.dtype, device, mode: str, provider: str, inputs=None):
    """A zero-argument callable that runs `mode` of `provider` once on inputs of this shape (`inputs`:
    those of `make_inputs`, made here when not given)."""
    device = torch.device(device)
    x, scorer, scores = inputs if inputs is not None else make_inputs(B, N, D, dtype, device)
    if provider == "copy":
        return lambda: x.clone()
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if provider == "eager":
        if mode == "select":
            fn = lambda: eager_select(x, scores, K)  # noqa: E731
        else:
            fn = lambda: eager_select(x, scorer(x), K)  # noqa: E731
    elif provider == "autoselect":
        fn = (lambda: select_topk(x, scores, K)) if mode == "select" else (lambda: scorer.select(x, K))  # noqa: E731
    else:
        raise ValueError(f"unknown provider {provider!r}; choose one of {PROVIDERS} or copy")

    def run():
        with torch.no_grad():
            return fn()
    return run


def run(B: int = 1, N: int = 576, D: int = 4096, K: int = 64, dtype: torch.dtype = torch.float32, device="cpu",
        repeats: int = 20, backends=None):
    """Measure every provider and mode at one shape; returns result rows (see _timing.FIELDS).
    `backends`: the backends to measure the autoselect provider with (default: the one chosen per op)."""
    device = torch.device(device)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    read_bytes = B * N * D * element_bytes  # x is read at least once
    common = {"date": today(), "kernel": "select", "shape": f"B={B} N={N} D={D} K={K}",
              "dtype": str(dtype).split(".")[-1], "device": device.type, "device_name": device_name(device),
              **versions()}
    inputs = make_inputs(B, N, D, dtype, device)  # once per shape: large batches take seconds to draw
    rows = []
    if device.type == "cuda":
        median, p20, p80 = measure(setup(B, N, D, K, dtype, device, "select", "copy", inputs), device, repeats)
        rows.append({**common, "mode": "score+select", "provider": "copy", "backend": "torch", "median_ms": median,
                     "p20_ms": p20, "p80_ms": p80, "gbps": 2 * read_bytes / median / 1e6,
                     "note": "device-to-device copy of x: the bandwidth limit"})
    for mode in MODES:
        op = "score_select" if mode == "score+select" else "select_topk"
        cases = [("eager", None)] + [("autoselect", b) for b in (backends or [_backends.choose(op, device)])]
        for provider, backend in cases:
            with _backends.force_backend(backend):
                median, p20, p80 = measure(setup(B, N, D, K, dtype, device, mode, provider, inputs), device, repeats)
            note = "scorer: LayerNorm, Linear(D, 256), GELU, Linear(256, 1)" if mode == "score+select" else \
                "scores given"
            rows.append({**common, "mode": mode, "provider": provider, "backend": backend or "torch",
                         "median_ms": median, "p20_ms": p20, "p80_ms": p80,
                         "gbps": read_bytes / median / 1e6 if mode == "score+select" else "", "note": note})
    return rows
