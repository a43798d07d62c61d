"""Compiler flags of the extension, shared by setup.py (which loads this file by path) and the
compile checks in tests/test_build.py, so both compile the sources the same way."""

import os
import re

DEFAULT_CUDA_ARCHS = "80;90"

_FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """The one truthiness rule for the package's switches (AUTOSELECT_SKIP_CUDA_BUILD,
    AUTOSELECT_DEBUG_CHECKS, ...): unset, empty, 0, false, no and off (any case) are false, anything
    else is true."""
    return os.environ.get(name, "").strip().lower() not in _FALSE


def cuda_archs(raw=None):
    """Compute capabilities from AUTOSELECT_CUDA_ARCHS (default "80;90"), e.g. ["80", "90"]."""
    raw = os.environ.get("AUTOSELECT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS) if raw is None else raw
    archs = [a.strip() for a in re.split(r"[;, ]+", raw) if a.strip()]
    for arch in archs:
        if not re.fullmatch(r"\d+a?", arch):
            raise ValueError(f"AUTOSELECT_CUDA_ARCHS: bad arch {arch!r} in {raw!r}; expected e.g. '80;90'")
    if not archs:
        raise ValueError("AUTOSELECT_CUDA_ARCHS names no arch")
    return archs


def defines(version, torch_version, archs=None):
    flags = [f'-DAUTOSELECT_VERSION="{version}"', f'-DAUTOSELECT_TORCH_VERSION="{torch_version}"']
    if archs is not None:
        flags += ["-DAUTOSELECT_WITH_CUDA", f'-DAUTOSELECT_CUDA_ARCHS="{";".join(archs)}"']
    return flags


# -fopenmp: at::parallel_for is inline OpenMP code; compiled without it, the kernels run serially.
CXX_FLAGS = ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
LINK_FLAGS = ["-fopenmp"]


def nvcc_flags(archs):
    flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    return flags
