"""Diagonal attention benchmark: fused op against the eager reference (forward, forward+backward).

    python benchmarks/bench_diag_attention.py [--shape B,N,H,d,M] [--dtype bf16] [--device cuda]
        prints the table and appends rows to benchmarks/results/diag_attention.csv (same as
        `autoselect bench --op diag_attention --results benchmarks/results`); default shape
        16,576,8,64,64 (the Denoiser's default at LLaVA-1.5's 576 tokens); on a GPU also peak memory
    pytest benchmarks --benchmark-only
        CPU timing of the same providers through pytest-benchmark

On the CPU the op runs its reference backend: the Triton kernel runs there only in its interpreter,
which is not a speed figure. The providers and inputs come from autoselect.bench.diag_attention.setup,
shared by both entry points.
"""

import os
import sys

import pytest
import torch

from autoselect.bench.diag_attention import PROVIDERS, setup

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_diag_attention_cpu(benchmark, mode, provider):
    """B=16, N=576, H=8, d=64, M=64, fp32 on the CPU: the shape of the Denoiser issue."""
    benchmark.group = f"diag_attention-{mode}"
    benchmark(setup(16, 576, 8, 64, 64, torch.float32, "cpu", mode, provider))


if __name__ == "__main__":
    from autoselect.cli import main

    sys.exit(main(["bench", "--op", "diag_attention", "--results", RESULTS, *sys.argv[1:]]))
