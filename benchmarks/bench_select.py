"""Selection benchmark: Scorer + top-K + gather, fused against eager PyTorch.

    python benchmarks/bench_select.py [--shape B,N,D,K] [--dtype bf16] [--device cuda]
        prints the table and appends rows to benchmarks/results/select.csv (same as
        `autoselect bench --op select --results benchmarks/results`); by default B in {1, 8} on the
        CPU (fp32) and B in {1, 8, 32} on a GPU (bf16), N = 576, D = 4096, K = 64
    pytest benchmarks --benchmark-only
        CPU timing of the same providers through pytest-benchmark

The providers and inputs come from autoselect.bench.select.setup, shared by both entry points.
"""

import os
import sys

import pytest
import torch

from autoselect.bench.select import PROVIDERS, setup

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["score+select", "select"])
def test_select_cpu(benchmark, mode, provider):
    """B=1, N=576, D=4096, K=64, fp32 on the CPU: the shape of the Scorer issue's closing note."""
    benchmark.group = f"select-{mode}"
    benchmark(setup(1, 576, 4096, 64, torch.float32, "cpu", mode, provider))


if __name__ == "__main__":
    from autoselect.cli import main

    argv = sys.argv[1:]
    if "--shape" not in argv and "--device" not in argv:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        shapes = ["1,576,4096,64", "8,576,4096,64"] + (["32,576,4096,64"] if device == "cuda" else [])
        argv = [a for s in shapes for a in ("--shape", s)] + argv
    sys.exit(main(["bench", "--op", "select", "--results", RESULTS, *argv]))
