"""Timing and result files shared by the op benchmarks.

GPU timings come from triton.testing.do_bench (CUDA events, cache flushed between runs); CPU timings
from time.perf_counter over repeats after a warm-up. Both report the median and the 20th/80th
percentiles in milliseconds. On a GPU the device name carries the compute capability and torch's
CUDA version. Rows are appended to CSV files keyed by kernel, shape, dtype, provider
and device, with the versions and the date, so results from different machines sit side by side.
"""

import csv
import datetime
import os
import platform
import statistics
import time

import torch

FIELDS = ["date", "kernel", "mode", "provider", "backend", "shape", "dtype", "device", "device_name", "median_ms",
          "p20_ms", "p80_ms", "gbps", "note", "autoselect", "torch", "triton"]


def measure(fn, device: torch.device, repeats: int = 20, warmup: int = 10):
    """(median, p20, p80) of fn() in milliseconds. On the CPU, `warmup` untimed calls first: the first
    calls of a process pay for page faults on fresh allocations."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=25, rep=max(100, repeats * 5), quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    quantile = lambda q: samples[min(len(samples) - 1, int(round(q * (len(samples) - 1))))]  # noqa: E731
    return statistics.median(samples), quantile(0.2), quantile(0.8)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}, CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions():
    import autoselect

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return {"autoselect": autoselect.__version__, "torch": torch.__version__, "triton": triton_version}


def append_rows(path: str, rows):
    """Append result rows (dicts with FIELDS) to the CSV at `path`, writing the header if new."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
