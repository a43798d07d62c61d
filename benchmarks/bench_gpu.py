"""The GPU benchmarks of `make gpu`, in one process, results appended to benchmarks/results/<op>.csv
(date, GPU name with its compute capability and CUDA version, torch, triton and autoselect versions on
each row; DESIGN.md 7).

    python benchmarks/bench_gpu.py [--device cuda] [--quick] [--results DIR | --no-save] [--repeats N]

  noise_gate      forward, backward, forward+backward of each GPU backend (cuda, triton) against eager
                  PyTorch, and a device-to-device copy of the same bytes in the same run: the forward's
                  fraction of copy bandwidth (LLaVA-1.5 shape B=32, N=576, D=4096; bf16 and fp32)
  select          select_topk (scores given) and score_select (Scorer + top-K) latency on CUDA against
                  eager PyTorch at B = 1, 8, 64, N = 576, 2880, K = 64, D = 4096, bf16
  diag_attention  Triton forward and forward+backward against the eager reference at the Denoiser's
                  shape (B=16, N=576, H=8, M=64), d = 64 and 128, bf16; peak memory of one step

Timings are medians of triton.testing.do_bench (CUDA events). --quick runs tiny shapes with few
repeats, on any device: the code path checked on the CPU by tests/test_gpu.py so that it does not rot.
"""

import argparse
import os
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BF16, FP32 = torch.bfloat16, torch.float32
# (op, kwargs of autoselect.bench.<op>.run without dtype/device/repeats/backends, dtype)
FULL = ([("noise_gate", dict(B=32, N=576, D=4096), dtype) for dtype in (BF16, FP32)]
        + [("select", dict(B=B, N=N, D=4096, K=64), BF16) for N in (576, 2880) for B in (1, 8, 64)]
        + [("diag_attention", dict(B=16, N=576, H=8, d=d, M=64), BF16) for d in (64, 128)])
QUICK = [("noise_gate", dict(B=2, N=16, D=64), FP32), ("select", dict(B=2, N=64, D=32, K=8), FP32),
         ("diag_attention", dict(B=1, N=8, H=2, d=16, M=4), FP32)]
# The backends measured per op on a GPU (each one that is available); elsewhere the chosen one.
GPU_BACKENDS = {"noise_gate": ("cuda", "triton"), "select": ("cuda", ), "diag_attention": ("triton", )}
OP_OF = {"noise_gate": "noise_gate", "select": "select_topk", "diag_attention": "diag_attention"}


def backends_for(op: str, device: torch.device):
    from autoselect import _backends

    if device.type != "cuda":
        return None
    names = [b for b in GPU_BACKENDS[op] if _backends.availability(b, "cuda")[0]]
    missing = [b for b in GPU_BACKENDS[op] if b not in names]
    if missing:
        print(f"warning: {op}: backends {missing} unavailable on cuda; measuring {names or 'the chosen one'}",
              file=sys.stderr)
    return names or None


def summary(rows):
    """One line per fused case: eager / fused time, and for the noise gate forward the fraction of copy
    bandwidth."""
    times = {}
    for r in rows:
        if isinstance(r.get("median_ms"), float):
            times[(r["kernel"], r["mode"], r["shape"], r["dtype"], r["provider"], r["backend"])] = r["median_ms"]
    eager = {k[:4]: v for k, v in times.items() if k[4] == "eager"}
    copy = {k[:4]: v for k, v in times.items() if k[4] == "copy"}
    lines = []
    for (kernel, mode, shape, dtype, provider, backend), ours in times.items():
        if provider != "autoselect":
            continue
        line = f"{kernel:<14} {mode:<12} {shape:<24} {dtype:<9} {backend:<9} {ours:9.4f} ms"
        if (kernel, mode, shape, dtype) in eager:
            line += f"   eager/fused {eager[(kernel, mode, shape, dtype)] / ours:6.2f}x"
        if (kernel, mode, shape, dtype) in copy and kernel == "noise_gate":
            line += f"   {copy[(kernel, mode, shape, dtype)] / ours:.0%} of copy bandwidth"
        lines.append(line)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke test)")
    parser.add_argument("--results", default=RESULTS, help="folder whose <op>.csv get the rows appended")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case on the CPU")
    parser.add_argument("--op", action="append", choices=sorted(GPU_BACKENDS), help="only these ops (repeatable)")
    args = parser.parse_args(argv)

    from autoselect.bench import OPS
    from autoselect.bench._timing import append_rows
    from autoselect.cli import _format_table

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick for the smoke test", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 20)
    cases = [c for c in (QUICK if args.quick else FULL) if not args.op or c[0] in args.op]
    rows = []
    for op, kwargs, dtype in cases:
        start = time.perf_counter()
        backends = backends_for(op, device)
        print(f"benchmarking {op} {' '.join(f'{k}={v}' for k, v in kwargs.items())} {str(dtype)[6:]} on {device} "
              f"({', '.join(backends) if backends else 'chosen backend'}) ...", flush=True)
        new = OPS[op].run(**kwargs, dtype=dtype, device=device, repeats=repeats, backends=backends)
        rows += new
        saved = ""
        if not args.no_save:  # case by case: a run cut short by a timeout keeps what it measured
            path = os.path.join(args.results, f"{op}.csv")
            append_rows(path, new)
            saved = f", appended to {path}"
        print(f"  {len(new)} rows in {time.perf_counter() - start:.1f} s{saved}", flush=True)
    print("\n".join(_format_table(rows)))
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
