"""Build checks: the extension loads and reports itself; the CUDA sources compile with nvcc for
sm_80 and sm_90; the Triton kernels compile ahead of time for sm_80 and sm_90. The last two run on
machines without a GPU."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import autoselect
from autoselect import _build_flags, _ext

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["80", "90"]


def test_extension_loads_and_reports_build():
    info = _ext.build_info()
    assert info is not None, _ext.extension_error()
    assert info["version"] == autoselect.__version__
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] == (torch.version.cuda is not None and info["cuda_archs"] != "")


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        found = os.path.join(CUDA_HOME, "bin", "nvcc")
    return found


def _triton_tool(name):
    """A CUDA binary utility shipped inside the triton wheel, when triton is installed."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc").glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor under CUDA_HOME): the CUDA compile check needs it")
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # A CPU build of torch ships the c10/cuda headers but not the one header that CMake generates for
    # CUDA builds; this stand-in has the content CUDA builds generate.
    generated = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        generated.parent.mkdir(parents=True)
        generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{tmp_path / 'include'}")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    defines = _build_flags.defines(autoselect.__version__, torch.__version__, ARCHS)
    out = tmp_path / (source + ".o")
    cmd = [nvcc, "-c", str(ROOT / "csrc" / source), "-o", str(out), *includes, abi, *defines,
           *_build_flags.nvcc_flags(ARCHS), "-Xcompiler", "-fPIC"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert out.stat().st_size > 0
    cuobjdump = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    if cuobjdump is not None:  # the object holds device code for each arch
        listing = subprocess.run([cuobjdump, "--list-elf", str(out)], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        for arch in ARCHS:
            assert f"sm_{arch}" in listing.stdout, listing.stdout


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_ahead_of_time(arch, tmp_path):
    """Compiled by Triton's own ptxas in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys; from autoselect.triton_kernels import compile_ahead_of_time as c; "
            f"r = c({arch}); print(len(r), min(size for _, _, size in r))")
    # From an empty folder, so that the installed package is imported, not the source tree.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    count, smallest = (int(v) for v in result.stdout.split())
    assert count >= 12 and smallest > 0


def test_wheel_holds_extension_and_namespaced_triton_kernels(tmp_path):
    """`pip wheel` (what `pip install .` installs) packs autoselect._C and the Triton kernels as
    autoselect.triton_kernels, and no top-level `triton_kernels` (a name other packages use)."""
    import zipfile

    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    (wheel, ) = tmp_path.glob("autoselect-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("autoselect/_C") and n.endswith(".so") for n in names), names
    assert "autoselect/triton_kernels/noise_gate.py" in names
    assert "autoselect/ops/noise_gate.py" in names
    assert not any(n.startswith("triton_kernels/") for n in names)
