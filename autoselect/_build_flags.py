"""Compiler flags of the extension, shared by setup.py (which loads this file by path) and the
compile checks in tests/test_build.py, so both compile the sources the same way."""

import os
import re
import shlex
import subprocess
import sys
import sysconfig

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


def linking_compiler():
    """The C++ compiler that links the extension: $CXX when set (setuptools links with it), else the
    one Python was built with."""
    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")


def loaded_libstdcxx(maps="/proc/self/maps"):
    """The path of the libstdc++.so.6 this process has loaded (torch's C++ runtime, once torch is
    imported), or None (not Linux, or not loaded)."""
    try:
        with open(maps) as f:
            paths = [line.split()[-1] for line in f if "/libstdc++.so.6" in line]
    except OSError:
        return None
    return paths[0] if paths else None


def libstdcxx_link_args(compiler=None, loaded=None):
    """Extra link arguments that keep the extension on the shared libstdc++.

    A compiler that finds no libstdc++.so (only libstdc++.a; seen with a wrapper compiler, the
    environment's CXX=/opt/gcc/bin/g++ on a GPU machine) links a private copy of the C++ runtime into the
    extension. That copy shares the locale facets of the libstdc++ that torch loaded, and formatting
    a number in a TORCH_CHECK message then crashes (benchmarks/results/gpu-2026-11-26b, -26c). In that
    case the libstdc++.so.6 that torch runs with (`loaded`, default: this process's) is linked by
    path; it comes before the driver's implicit static -lstdc++, so nothing is taken from the archive.
    Returns [] when the compiler finds a shared libstdc++, or when no loaded one is known."""
    compiler = linking_compiler() if compiler is None else compiler
    try:
        found = subprocess.run([*compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    loaded = loaded_libstdcxx() if loaded is None else loaded
    if not loaded:
        return []
    print(f"autoselect build: {' '.join(compiler)} finds no shared libstdc++ (it would link a static copy into "
          f"the extension); linking torch's {loaded} instead", file=sys.stderr)
    return [loaded]
