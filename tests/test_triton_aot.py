"""The Triton kernels compiled ahead of time for sm_80 and sm_90 (Triton's own ptxas; no GPU needed):
every configuration the launchers can choose compiles, fits the per-block shared memory of the arch,
and keeps its registers without spills.

Each configuration is compiled once per test run: one session fixture starts one process per arch
(without TRITON_INTERPRET, which the test process sets on machines without a GPU), both at once, and
every test reads its results."""

import json
import os
import subprocess
import sys

import pytest
import torch

ARCHS = (80, 90)

triton_kernels = pytest.importorskip("autoselect.triton_kernels", reason="needs triton")
from autoselect.triton_kernels import aot, diag_attention, noise_gate  # noqa: E402

# Opt-in maximum of dynamic shared memory per block: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100/H200).
SHARED_MEMORY_PER_BLOCK = {80: 166_912, 90: 232_448}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """{arch: list of result dicts of aot.compile_ahead_of_time}, one fresh process per arch, run in
    parallel; a process that fails leaves its stderr instead."""
    folder = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    processes = {}
    for arch in ARCHS:
        out = folder / f"sm_{arch}.json"
        code = f"from autoselect.triton_kernels import aot; aot.main([{str(arch)!r}, '--json', {str(out)!r}])"
        # From an empty folder, so that the installed package is imported, not the source tree.
        processes[arch] = (out, subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=env, text=True,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for arch, (out, process) in processes.items():
        _, stderr = process.communicate()
        results[arch] = json.loads(out.read_text()) if process.returncode == 0 else stderr[-4000:]
    return results


def _results(compiled, arch):
    result = compiled[arch]
    assert isinstance(result, list), f"compiling for sm_{arch} failed:\n{result}"
    return result


def _name(row):
    first = next(iter(row["signature"].values()))  # the pointer type of the first tensor: the dtype served
    constexprs = ", ".join(f"{k}={v}" for k, v in row["constexprs"].items()
                           if k.startswith(("BLOCK", "HAS", "GROUPS")))
    options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
    return f"{row['kernel']}[{first}; {constexprs}; {options}]"


def test_aot_compiles_every_listed_configuration(compiled):
    """Every (kernel, constexprs, options) of both ops' aot_specs, once each, with a nonempty cubin."""
    expected = len(noise_gate.aot_specs()) + len(diag_attention.aot_specs())
    for arch in ARCHS:
        rows = _results(compiled, arch)
        assert len(rows) == expected
        keys = [json.dumps([r["kernel"], r["signature"], r["constexprs"], r["options"]], sort_keys=True) for r in rows]
        assert len(set(keys)) == len(keys), "a configuration is compiled twice"
        assert all(r["cubin_bytes"] > 0 for r in rows)


def test_diag_attention_specs_are_the_launch_configs():
    """aot_specs holds, for every dtype the op accepts and every head-dim block, exactly the blocks, warps
    and stages the launcher passes (launch_config), for all three kernels."""
    specs = diag_attention.aot_specs()
    listed = {(kernel.__name__, signature["q_ptr"], constexprs["BLOCK_D"], constexprs["BLOCK_T"],
               constexprs["BLOCK_M"], options["num_warps"], options["num_stages"])
              for kernel, signature, constexprs, options, _ in specs}
    types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
    kernels = {"forward": "_diag_attention_forward_kernel", "backward": "_diag_attention_backward_kernel",
               "memory_backward": "_diag_attention_memory_backward_kernel"}
    wanted = set()
    for dtype in types:
        for d in range(1, diag_attention.MAX_HEAD_DIM + 1):
            config = diag_attention.launch_config(dtype, d)
            for name in diag_attention.KERNELS:
                k = getattr(config, name)
                wanted.add((kernels[name], types[dtype], config.block_d, k.block_t, k.block_m, k.num_warps,
                            k.num_stages))
    assert listed == wanted
    assert len(specs) == len(listed)
    assert {constexprs["BLOCK_D"] for _, _, constexprs, _, _ in specs} == {32, 64, 128}


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits_a_block(compiled, arch):
    rows = _results(compiled, arch)
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    too_big = [f"{_name(r)}: {r['shared']} B" for r in rows if r["shared"] > limit]
    assert not too_big, f"over the {limit} B of shared memory per block of sm_{arch}:\n" + "\n".join(too_big)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(compiled, arch):
    """Registers per thread, stack frame and spills of every configuration, from ptxas's report, printed
    (run with -s to see the table); none may spill. (A 32-byte stack frame without spills is libdevice's
    sin/cos, in the noise gate's Box-Muller.)"""
    rows = _results(compiled, arch)
    if any(r["registers"] is None for r in rows):
        pytest.skip("no ptxas report (Triton's ptxas could not be run again on a cached kernel)")
    print(f"\nsm_{arch}:")
    for r in rows:
        print(f"  {_name(r)}: {r['registers']} registers, stack {r['stack_bytes']} B, spill stores "
              f"{r['spill_store_bytes']} B, spill loads {r['spill_load_bytes']} B, shared {r['shared']} B")
    spilling = [f"{_name(r)}: {r['spill_store_bytes']} B stored, {r['spill_load_bytes']} B loaded" for r in rows
                if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, f"register spills on sm_{arch}:\n" + "\n".join(spilling)
