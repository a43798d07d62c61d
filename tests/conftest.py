"""Test setup: without a GPU, Triton kernels run in the interpreter (set before triton is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _share_cores_among_xdist_workers():
    """Under pytest-xdist (`-n W`) each worker gets cores / W intra-op threads, and the processes the tests
    start inherit it (OMP_NUM_THREADS). Left alone, every worker takes all the machine's cores: on a
    16-core GPU machine, 16 workers of 16 threads made the CPU-bound tests (training loops, the testbed)
    too slow for the whole suite to finish in 430 s (benchmarks/results/gpu-2026-11-27b)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cores // workers))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_among_xdist_workers()

from autoselect import _backends  # noqa: E402


def backend_cases(op: str):
    """(device, backend) pairs that can run `op` here: reference, C++ and the Triton interpreter on the
    CPU; CUDA and compiled Triton on a GPU when there is one."""
    cases = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in _backends._OPS[op]:
            if _backends.availability(backend, device)[0]:
                cases.append(pytest.param(device, backend, id=f"{device}-{backend}"))
    return cases


@pytest.fixture
def poison():
    """Fill and free a large block so that the next allocations are likely to start as NaN, not zeros:
    a kernel that leaves an element unwritten then fails the comparison."""
    def run(device):
        block = torch.full((1 << 22, ), float("nan"), device=device)
        del block
    return run


TINY_TESTBED_SIZES = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1,
                          text_heads=2)


def save_tiny_testbed_vlm(folder, seed: int = 0):
    """Write a tiny testbed VLM (LLaVA, 576 visual tokens, width 32) and its processor to `folder`, as
    `save_pretrained` does for a real checkpoint; returns the folder."""
    from autoselect.testbed import vlm

    processor = vlm.build_processor()
    model = vlm.build_model(seed=seed, tokenizer=processor.tokenizer, **TINY_TESTBED_SIZES)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# The first release's training options (per-token MLP scorer, running noise statistics, logistic soft
# top-K, geometric temperature 1 -> 0.05). The defaults are now the paper's (the ablation's choice);
# tests of the trainer's machinery (resume, processes, budgets, logs) pin these, which keep them fast.
FIRST_RELEASE_FLAGS = ["--scorer-layers", "0", "--noise-stats", "running", "--soft-topk", "logistic",
                       "--temperature-schedule", "geometric", "--temperature-start", "1.0", "--temperature-end", "0.05"]
