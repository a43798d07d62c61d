"""Build checks: the extension loads and reports itself; the C++ sources compile on the branch that
non-x86 machines (aarch64) take; the CUDA sources compile with nvcc for sm_80 and sm_90; the wheel
packs the extension and the Triton kernels (their ahead-of-time compile for sm_80 and sm_90 is
tests/test_triton_aot.py). All run on machines without a GPU, and none writes into the source tree.

Cost (CI runs on two cores): each CUDA source is compiled once per session (one nvcc call per file for
both archs, the files in parallel), and the wheel is packed around the extension that `make install`
already built (setup.py's AUTOSELECT_PREBUILT_EXTENSION) instead of compiling it a second time."""

import concurrent.futures
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
CUDA_SOURCES = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
CPU_SOURCES = sorted(p.name for p in (ROOT / "csrc").glob("*.cpp"))
# The C++ sources with per-architecture code: target_clones, through the guard of csrc/device_macros.h.
GUARDED_CPU_SOURCES = [s for s in CPU_SOURCES
                       if any(word in (ROOT / "csrc" / s).read_text() for word in ("AUTOSELECT_TARGET_CLONES",
                                                                                   "target_clones"))]
# Defined while checking the non-x86 branch: any `target_clones` left outside the guard then stops the
# compile with this message (an x86 compiler accepts it, an aarch64 one rejects "arch=x86-64-v4").
TARGET_CLONES_TRAP = ('-Dtarget_clones(...)=_Pragma("GCC error \\"target_clones outside the '
                      'AUTOSELECT_TARGET_CLONES guard of csrc/device_macros.h: it breaks the build on aarch64\\"")')


def _jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _run_parallel(commands: dict) -> dict:
    """{name: argv} -> {name: CompletedProcess}, as many at a time as there are cores."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(commands), _jobs()) or 1) as pool:
        futures = {name: pool.submit(subprocess.run, argv, capture_output=True, text=True)
                   for name, argv in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def _torch_compile_flags():
    """Include paths and defines with which setup.py's build compiles the C++ sources."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [*includes, abi]


def test_extension_loads_and_reports_build():
    info = _ext.build_info()
    assert info is not None, _ext.extension_error()
    assert info["version"] == autoselect.__version__
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] == (torch.version.cuda is not None and info["cuda_archs"] != "")


def test_extension_uses_the_shared_libstdcxx():
    """The extension must call the process's libstdc++, not carry a copy of it. On the H100 machine
    (torch 2.11+cu130, g++ 13; benchmarks/results/gpu-2026-11-26b/README.md) the built .so listed no
    libstdc++.so.6 among its NEEDED libraries and defined libstdc++'s own code (std::codecvt<char16_t>
    and num_put members): formatting an integer in a TORCH_CHECK message jumped from the ostream call
    into that copy and crashed (a segmentation fault on any bad direct call of torch.ops.autoselect_C.*).
    This fails on such a build instead of crashing later."""
    import autoselect._C as compiled

    readelf, nm = shutil.which("readelf"), shutil.which("nm")
    assert readelf and nm, "binutils (readelf, nm) are needed to inspect the extension's linkage"
    path = compiled.__file__
    needed = [line.split("[")[-1].rstrip("]") for line in subprocess.run(
        [readelf, "-d", path], capture_output=True, text=True, check=True).stdout.splitlines() if "(NEEDED)" in line]
    assert any(name.startswith("libstdc++.so") for name in needed), f"{path}: no libstdc++ in NEEDED {needed}"
    defined = subprocess.run([nm, "-DC", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    copied = [line for line in defined.splitlines() if "codecvt<char16_t" in line or "std::locale::" in line]
    assert not copied, f"{path} defines libstdc++'s own code: {copied[:3]}"


def _needed(path):
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[-1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("readelf") and _build_flags.loaded_libstdcxx()),
                    reason="needs g++, readelf and a loaded libstdc++.so.6 (Linux)")
def test_a_compiler_without_shared_libstdcxx_still_links_it_shared(tmp_path):
    """The GPU machine's CXX=/opt/gcc/bin/g++ (a wrapper script) finds only libstdc++.a, so its links
    carried a static copy of libstdc++ (benchmarks/results/gpu-2026-11-26c). A wrapper that does the same
    here: it answers -print-file-name=libstdc++.so with the bare name and links -static-libstdc++.
    Linked with `libstdcxx_link_args` the library NEEDs libstdc++.so.6; without them it does not."""
    wrapper = tmp_path / "g++-static"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -print-file-name=libstdc++.so ] && '
                       '{ echo libstdc++.so; exit 0; }; done\nexec g++ -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    source = tmp_path / "f.cpp"
    source.write_text("#include <string>\nstd::string f(long x) { return std::to_string(x); }\n")
    args = _build_flags.libstdcxx_link_args([str(wrapper)])
    assert args == [_build_flags.loaded_libstdcxx()]
    assert _build_flags.libstdcxx_link_args(["g++"]) == []  # this machine's g++ finds libstdc++.so
    for name, extra in (("static", []), ("fixed", args)):
        subprocess.run([str(wrapper), "-shared", "-fPIC", str(source), "-o", str(tmp_path / f"{name}.so"), *extra],
                       check=True, capture_output=True)
    assert not any(n.startswith("libstdc++.so") for n in _needed(tmp_path / "static.so"))  # the wrapper works
    assert "libstdc++.so.6" in _needed(tmp_path / "fixed.so")


@pytest.fixture(scope="session")
def non_x86_compiles():
    """The C++ sources compiled by the host g++ on the branch that other architectures take: the guard
    switched off by AUTOSELECT_NO_TARGET_CLONES, with the trap for unguarded target_clones. (-U__x86_64__
    is no way to get there: glibc's headers then look for the 32-bit stubs.) The sources that use the
    guard are checked fully (-fsyntax-only, same flags as the build); the others are preprocessed, which
    is where the trap fires."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} not found")
    flags = [*_torch_compile_flags(), "-fPIC", *_build_flags.CXX_FLAGS,
             *_build_flags.defines(autoselect.__version__, torch.__version__),
             "-DAUTOSELECT_NO_TARGET_CLONES", TARGET_CLONES_TRAP]
    return _run_parallel({source: [cxx, "-fsyntax-only" if source in GUARDED_CPU_SOURCES else "-E",
                                   *flags, str(ROOT / "csrc" / source), *([] if source in GUARDED_CPU_SOURCES
                                                                          else ["-o", os.devnull])]
                          for source in CPU_SOURCES})


@pytest.mark.parametrize("source", CPU_SOURCES)
def test_cpu_sources_compile_without_x86_target_clones(source, non_x86_compiles):
    """`pip install` on aarch64: no x86-only target_clones outside the guard, and the other branch compiles."""
    result = non_x86_compiles[source]
    assert result.returncode == 0, result.stderr[-4000:]


def test_guarded_cpu_sources_compile_for_aarch64():
    """The same with a real aarch64 cross compiler (apt's g++-aarch64-linux-gnu), where one is installed:
    code generation, where GCC rejects target_clones("arch=x86-64-v4") for aarch64, at -O0 (the check
    does not depend on optimisation, and -O3 would only cost time)."""
    cross = shutil.which("aarch64-linux-gnu-g++")
    if cross is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu); the host "
                    "compiler's check of the non-x86 branch above still runs")
    flags = [*_torch_compile_flags(), "-fPIC", *_build_flags.CXX_FLAGS,
             *_build_flags.defines(autoselect.__version__, torch.__version__), "-O0"]
    results = _run_parallel({source: [cross, "-S", "-o", os.devnull, *flags, str(ROOT / "csrc" / source)]
                             for source in GUARDED_CPU_SOURCES})
    for source, result in results.items():
        assert result.returncode == 0, f"{source}:\n{result.stderr[-4000:]}"


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


@pytest.fixture(scope="session")
def nvcc_objects(tmp_path_factory):
    """Every CUDA source compiled once for this session: one nvcc call per file for all of ARCHS (the
    flags of setup.py's build), the files in parallel, a file's archs in parallel when cores are left.
    {source: (CompletedProcess, object path)}."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor under CUDA_HOME): the CUDA compile check needs it")
    from torch.utils.cpp_extension import include_paths

    folder = tmp_path_factory.mktemp("nvcc")
    includes = _torch_compile_flags()
    # A CPU build of torch ships the c10/cuda headers but not the one header that CMake generates for
    # CUDA builds; this stand-in has the content CUDA builds generate.
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        generated = folder / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        generated.parent.mkdir(parents=True)
        generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{folder / 'include'}")
    defines = _build_flags.defines(autoselect.__version__, torch.__version__, ARCHS)
    threads = max(1, _jobs() // max(1, len(CUDA_SOURCES)))
    commands, objects = {}, {}
    for source in CUDA_SOURCES:
        objects[source] = folder / (source + ".o")
        commands[source] = [nvcc, "-c", str(ROOT / "csrc" / source), "-o", str(objects[source]), *includes,
                            *defines, *_build_flags.nvcc_flags(ARCHS), "-Xcompiler", "-fPIC",
                            "--threads", str(threads)]
    results = _run_parallel(commands)
    return {source: (results[source], objects[source]) for source in CUDA_SOURCES}


@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_sources_compile_with_nvcc(source, nvcc_objects):
    result, out = nvcc_objects[source]
    assert result.returncode == 0, result.stderr[-4000:]
    assert out.stat().st_size > 0
    cuobjdump = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    if cuobjdump is not None:  # the object holds device code for each arch
        listing = subprocess.run([cuobjdump, "--list-elf", str(out)], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        for arch in ARCHS:
            assert f"sm_{arch}" in listing.stdout, listing.stdout


def _source_files():
    """The files of the source tree that a clone or an sdist has: git's tracked and untracked-but-not-
    ignored files when this is a git checkout, else everything but the usual build and cache outputs."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True) if shutil.which("git") else None
    if listing is not None and listing.returncode == 0 and listing.stdout:
        return [ROOT / name for name in listing.stdout.split("\0") if name]
    skip = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".benchmarks", "data", "checkpoints", "demo"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
            and not p.name.endswith((".so", ".o", ".pyc")) and ".egg-info" not in str(p)]


def _build_outputs():
    """What a build in the source tree would leave there, with modification times."""
    paths = [ROOT / "build", *ROOT.glob("*.egg-info"), *(ROOT / "autoselect").glob("_C*")]
    return {str(p): p.stat().st_mtime_ns for p in paths if p.exists()}


def test_wheel_holds_extension_and_namespaced_triton_kernels(tmp_path):
    """`pip wheel` (what `pip install .` installs) packs autoselect._C and the Triton kernels as
    autoselect.triton_kernels, and no top-level `triton_kernels` (a name other packages use).

    Built from a copy of the source tree (pip builds in the tree it is given; the source tree stays as
    it was) with setup.py's own configuration; the build_ext step packs the extension that `make
    install` compiled (AUTOSELECT_PREBUILT_EXTENSION) instead of compiling it again: that compile is
    checked by test_extension_loads_and_reports_build. The wheel lacks _C if setup.py stops declaring
    it (build_ext packs only declared extensions, and refuses a file not named as the one it would build)."""
    import importlib
    import zipfile

    assert _ext.build_info() is not None, _ext.extension_error()
    prebuilt = Path(importlib.import_module("autoselect._C").__file__)
    before = _build_outputs()
    source = tmp_path / "src"
    for path in _source_files():
        if path.is_file():
            (source / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / path.relative_to(ROOT))
    env = {**os.environ, "AUTOSELECT_PREBUILT_EXTENSION": str(prebuilt)}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    (wheel, ) = (tmp_path / "dist").glob("autoselect-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert f"autoselect/{prebuilt.name}" in names, names
    assert archive.read(f"autoselect/{prebuilt.name}") == prebuilt.read_bytes()
    assert "autoselect/triton_kernels/noise_gate.py" in names
    assert "autoselect/ops/noise_gate.py" in names
    assert not any(n.startswith("triton_kernels/") for n in names)
    # the testbed v2 weights are package data, so `autoselect demo` runs from a non-editable install
    for folder in ("tiny-vlm-v2", "tiny-vlm-v2-selector"):
        for name in ("config.json", "model.safetensors", "README.md"):
            member = f"autoselect/weights/{folder}/{name}"
            assert member in names and archive.read(member) == (ROOT / member).read_bytes(), member
    assert "autoselect/weights/tiny-vlm-v2/tokenizer.json" in names
    assert _build_outputs() == before, "building the wheel wrote into the source tree"

