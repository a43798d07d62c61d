"""Accuracy of the C++ noise against Box-Muller in float64 on the same Philox bits.

The RNG contract (DESIGN.md section 2) fixes the bits and the float32 steps that every backend
shares: Philox4x32-10, Triton's uint -> uniform map (float32 uniforms u0, u1) and Triton's
theta = float32(6.283185307179586 * u1). From there the exact normals are
    radius = sqrt(-2 log(max(u0, 1e-7))),   n0 = radius cos(theta),   n1 = radius sin(theta)
evaluated here in float64. (Taking theta = 2 pi u1 in float64 instead would score the float32 rounding
of theta, which the contract includes: then PyTorch's own float32 reference is more than 3 ulps off
on about 21% of draws, near the zeros of sin and cos.) The C++ kernel must be as good as ordinary
float32 math on these inputs: at most 0.1% of draws more than 3 float32 ulps (of the exact value)
off, and no draw more than 4e-7 * max(1, |value|) off.
"""

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from autoselect import force_backend, noise_gate
from autoselect.ops.noise_gate import _MASK32, _philox4x32_10, _uint_to_uniform

ULPS = 3
MAX_FRACTION_BEYOND = 1e-3
MAX_SCALED_ERROR = 4e-7


def cpp_noise(numel, seed, offset, width=1024):
    """eps as the C++ kernel draws it: alpha = 0, mean = 0, std = 1 makes the gate return eps exactly."""
    rows = numel // width
    with force_backend("cpp"):
        z = noise_gate(torch.zeros(rows, width), torch.zeros(rows), torch.zeros(width), torch.ones(width),
                       seed=seed, offset=offset)
    return z.reshape(-1)


def exact_noise(numel, seed, offset):
    """The contract's normals in float64 from the contract's float32 uniforms and theta."""
    counters = offset + torch.arange((numel + 3) // 4, dtype=torch.int64)
    zero = torch.zeros_like(counters)
    bits = _philox4x32_10(counters & _MASK32, counters >> 32, zero, zero, seed & _MASK32, seed >> 32)
    u = [_uint_to_uniform(b) for b in bits]  # float32, exactly as every backend sees them
    out = []
    for first, second in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(torch.clamp_min(first, 1.0e-7).double()))
        theta = (second * torch.tensor(6.283185307179586, dtype=torch.float32)).double()  # float32 product
        out += [radius * torch.cos(theta), radius * torch.sin(theta)]
    return torch.stack(out, dim=-1).reshape(-1)[:numel]


def float32_ulp(value: torch.Tensor) -> torch.Tensor:
    """The float32 ulp at each float64 value (2^-149 at zero and among subnormals)."""
    _, exponent = torch.frexp(value.abs())  # |v| = m 2^e, m in [0.5, 1): ulp = 2^(e - 24)
    return torch.ldexp(torch.ones_like(value), (exponent - 24).clamp_min(-149))


def noise_errors(numel, seed, offset):
    ours = cpp_noise(numel, seed, offset).double()
    exact = exact_noise(numel, seed, offset)
    error = (ours - exact).abs()
    beyond = (error > ULPS * float32_ulp(exact)).double().mean().item()
    scaled = (error / exact.abs().clamp_min(1.0)).max().item()
    return beyond, scaled


@pytest.mark.parametrize("seed,offset", [(2024, 0), (2**40 + 12345, 2**33 + 3)])
def test_cpp_noise_matches_float64_box_muller(seed, offset):
    beyond, scaled = noise_errors(1 << 20, seed, offset)
    assert beyond <= MAX_FRACTION_BEYOND, f"{beyond:.3%} of draws are more than {ULPS} ulps off"
    assert scaled <= MAX_SCALED_ERROR, f"max error {scaled:.3g} x max(1, |value|)"


# ---- every target_clones variant ------------------------------------------------------------------
# The extension runs the clone that the test machine's CPU picks (AVX-512 here, most likely), but users
# get the AVX2 or the baseline (SSE2, no FMA) clone on other CPUs, and rounding differs between them
# (FMA contraction). So the noise section of the C++ source is also compiled on its own for each
# clone this CPU can run, loaded with ctypes and held to the same bounds.

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "noise_gate_cpu.cpp"
WRAPPER = """
#include <algorithm>
#include <cmath>
#include <cstdint>
#define AUTOSELECT_TARGET_CLONES
namespace {{
{section}
}}  // namespace
extern "C" void fill_noise(float* out, uint64_t seed, uint64_t offset, int64_t groups) {{
  for (int64_t g = 0; g < groups; g += 8) randn4x_lanes(out + 4 * g, seed, offset + g);
}}
"""


def noise_section() -> str:
    """The torch-free noise code of noise_gate_cpu.cpp: from its "SIMD noise" banner to the end of
    randn4x_lanes."""
    text = SOURCE.read_text()
    start = text.index("// ---- SIMD noise")
    body = text.index("void randn4x_lanes(", start)
    end = text.index("\n}\n", body) + 3
    return text[start:end]


# The clones of AUTOSELECT_TARGET_CLONES (csrc/device_macros.h) as compiler flags, with the CPU flags
# each needs, best last. ("avx2" is target("avx2"): AVX2 without FMA.)
CLONES = [("default", ["-march=x86-64"], set()),
          ("avx2", ["-march=x86-64", "-mavx2"], {"avx2"}),
          ("x86-64-v4", ["-march=x86-64-v4"], {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})]


def _runnable_clones():
    """The clones this machine can run (none off x86-64), best last."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        return []
    with open("/proc/cpuinfo") as info:
        flags = next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    return [name for name, _, needs in CLONES if needs <= flags]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("noise_clones")


@pytest.mark.parametrize("clone", _runnable_clones())
def test_every_clone_matches_float64_box_muller(clone, build_dir):
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    source = build_dir / f"noise_{clone}.cpp"
    library = build_dir / f"noise_{clone}.so"
    source.write_text(WRAPPER.format(section=noise_section()))
    # The extension's flags (autoselect/_build_flags.py) and the clone's target.
    target = next(flags for name, flags, _ in CLONES if name == clone)
    cmd = [compiler, "-O3", "-std=c++20", "-fno-math-errno", "-Wno-psabi", *target, "-shared", "-fPIC",
           str(source), "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    fill = ctypes.CDLL(str(library)).fill_noise
    fill.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]
    for seed, offset in [(2024, 0), (2**40 + 12345, 2**33 + 3)]:
        numel = 1 << 20
        out = torch.empty(numel + 32)
        fill(out.data_ptr(), seed, offset, numel // 4)
        exact = exact_noise(numel, seed, offset)
        error = (out[:numel].double() - exact).abs()
        beyond = (error > ULPS * float32_ulp(exact)).double().mean().item()
        scaled = (error / exact.abs().clamp_min(1.0)).max().item()
        assert beyond <= MAX_FRACTION_BEYOND, f"{clone}: {beyond:.3%} of draws are more than {ULPS} ulps off"
        assert scaled <= MAX_SCALED_ERROR, f"{clone}: max error {scaled:.3g} x max(1, |value|)"
        if clone == _runnable_clones()[-1]:  # the clone that the extension itself runs here
            assert torch.equal(out[:numel], cpp_noise(numel, seed, offset)), (
                "the stand-alone build of the best clone differs from the extension: is the extension built "
                "from this source?")
