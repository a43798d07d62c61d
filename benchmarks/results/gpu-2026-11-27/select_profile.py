"""Where the time of the inference selection goes on the GPU, after the finiteness check moved into the
kernels and the eager path stopped going through the custom op (fourth GPU session).

Per shape (bf16, D = 4096, K = 64), for select_topk (scores given) and score_select (Scorer + top-K):
  wall    triton's do_bench of whole calls (host work included: at these sizes the host issues slower
          than the GPU runs, so this is what a caller waits);
  host    time to issue one call, from perf_counter over 200 calls without a synchronisation;
  device  the summed device time of the call's kernels over 20 calls, from torch.profiler.
Paths: eager (what a user writes: topk, sort, gather; the Scorer module first), kernel (the compiled op
called directly, no checks), custom_op (the torch.library op: kernel + one device assert), public
(select_topk / Scorer.select as a user calls them, under no_grad).
"""
import time

import torch
from triton.testing import do_bench

import autoselect  # noqa: F401  (registers the ops)
from autoselect import _ext
from autoselect.bench.select import eager_select, make_inputs
from autoselect.ops.select import _first_layer, _score_select_op, _select_topk_op, select_topk

_ext.extension()
raw_select, raw_score = torch.ops.autoselect_C.select_topk, torch.ops.autoselect_C.score_select
D, K = 4096, 64


def host_us(fn, calls=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / calls * 1e6


def device_ms(fn):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in events) / 20 / 1e3, len(events)


torch.set_grad_enabled(False)
print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
print(f"{'shape':16s} {'path':22s} {'wall ms':>8s} {'host us':>8s} {'device ms':>9s} {'kernels':>7s}")
for B, N in ((1, 576), (8, 576), (64, 576), (8, 2880)):
    x, scorer, s = make_inputs(B, N, D, torch.bfloat16, "cuda", seed=B)
    xp, sp = x.reshape(B * N, D), s.reshape(B * N)
    weight, col_sum, bias, w2, b2, eps = scorer.fused_parameters(xp.dtype, xp.device)
    hidden = _first_layer(xp, weight).contiguous()
    lengths, ks = [N] * B, [K] * B
    paths = {
        "select eager": lambda: eager_select(x, s, K),
        "select kernel": lambda: raw_select(xp, sp, lengths, ks),
        "select custom_op": lambda: _select_topk_op(xp, sp, lengths, ks),
        "select public": lambda: select_topk(x, s, K),
        "score+select eager": lambda: eager_select(x, scorer(x).float(), K),
        "score+select kernel": lambda: raw_score(xp, _first_layer(xp, weight), col_sum, bias, w2, b2, eps, lengths, ks),
        "score+select op": lambda: _score_select_op(xp, _first_layer(xp, weight), col_sum, bias, w2, b2, eps,
                                                    lengths, ks),
        "score+select public": lambda: scorer.select(x, K),
    }
    assert torch.equal(paths["select public"]()[1], paths["select eager"]()[1])
    assert torch.equal(paths["select kernel"]()[1].view(B, K), paths["select eager"]()[1])
    assert bool(paths["select kernel"]()[2])
    for name, fn in paths.items():
        wall = do_bench(fn, warmup=25, rep=200)
        device, kernels = device_ms(fn)
        print(f"B={B:<3d} N={N:<6d}  {name:22s} {wall:8.4f} {host_us(fn):8.1f} {device:9.4f} {kernels:7d}", flush=True)
