"""Where the time of select_topk (scores given) goes on the GPU: wall time per call (triton's do_bench,
which times whole calls, host work included) of the eager path (topk, sort, gather), the compiled
kernel called directly (torch.ops.autoselect_C.select_topk), the custom op (kernel + finiteness check)
and the public select_topk; then the device time of each path's kernels from torch.profiler."""
import torch
from triton.testing import do_bench

import autoselect  # noqa: F401  (registers the ops)
from autoselect import _ext
from autoselect.bench.select import eager_select
from autoselect.ops.select import _select_topk_op, select_topk

_ext.extension()
raw = torch.ops.autoselect_C.select_topk
D, K = 4096, 64
for B, N in ((1, 576), (8, 576), (64, 576), (8, 2880)):
    g = torch.Generator(device="cuda").manual_seed(B)
    x = torch.randn(B, N, D, device="cuda", generator=g).bfloat16()
    s = torch.randn(B, N, device="cuda", generator=g)
    xp, sp = x.reshape(B * N, D), s.reshape(B * N)
    paths = {"eager": lambda: eager_select(x, s, K), "kernel": lambda: raw(xp, sp, [N] * B, [K] * B),
             "custom_op": lambda: _select_topk_op(xp, sp, [N] * B, [K] * B), "select_topk": lambda: select_topk(x, s, K)}
    assert torch.equal(paths["kernel"]()[1].view(B, K), paths["eager"]()[1])
    walls = {name: do_bench(fn, warmup=25, rep=200)
             for name, fn in paths.items()}
    device = {}
    for name, fn in paths.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        device[name] = (sum(e.self_device_time_total for e in events) / 20 / 1e3,
                        "; ".join(f"{e.key[:40]} {e.self_device_time_total / 20 / 1e3:.4f}" for e in events))
    print(f"B={B} N={N} D={D} K={K} bf16  gathered {B * K * D * 2 / 2**20:.1f} MiB")
    for name in paths:
        print(f"  {name:12s} wall {walls[name]:.4f} ms   device {device[name][0]:.4f} ms   [{device[name][1]}]")
