"""Noise gate benchmark: fused op against eager PyTorch (forward, backward, forward+backward).

    python benchmarks/bench_noise_gate.py [--shape B,N,D] [--dtype bf16] [--device cuda]
        prints the table and appends rows to benchmarks/results/noise_gate.csv (same as
        `autoselect bench --op noise_gate --results benchmarks/results`)
    pytest benchmarks --benchmark-only
        CPU timing of the same providers through pytest-benchmark

The providers and inputs come from autoselect.bench.noise_gate.setup, shared by both entry points.
"""

import os
import sys

import pytest
import torch

from autoselect.bench.noise_gate import PROVIDERS, setup

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_noise_gate_cpu(benchmark, mode, provider):
    """B=4, N=576, D=1024, fp32 on the CPU: the shape of the closing note of the foundation issue."""
    benchmark.group = f"noise_gate-{mode}"
    benchmark(setup(4, 576, 1024, torch.float32, "cpu", mode, provider))


if __name__ == "__main__":
    from autoselect.cli import main

    sys.exit(main(["bench", "--op", "noise_gate", "--results", RESULTS, *sys.argv[1:]]))
