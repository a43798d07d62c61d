"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, with no GPU present.

Triton ships its own ptxas, so a kernel can be lowered to PTX and assembled to a cubin for sm_80 or
sm_90 on a CPU-only machine. The tests use this to prove that every kernel configuration the
launchers can choose compiles for the GPUs we target and fits their per-block limits (shared memory,
registers without spills), not only that it runs under the interpreter.

Each op module lists its configurations with `aot_specs()`: tuples (kernel, signature, constexprs)
optionally followed by options (num_warps, num_stages: what the launcher passes) and hints (argument
names a typical launch specialises as divisible by 16). From the command line (a fresh process, without
TRITON_INTERPRET):

    python -m autoselect.triton_kernels.aot 90 --json sm_90.json
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OPS = ("noise_gate", "diag_attention")


_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def _parse_ptxas_report(log: str):
    """{registers, stack_bytes, spill_store_bytes, spill_load_bytes} from ptxas -v output for one kernel,
    or None. The stack frame is not a spill by itself: libdevice's sin/cos reserve 32 bytes for their
    slow-path argument reduction."""
    frame, registers = _FRAME.findall(log), _REGISTERS.findall(log)
    if not frame or not registers:
        return None
    stack, stores, loads = (int(v) for v in frame[-1])
    return {"registers": int(registers[-1]), "stack_bytes": stack, "spill_store_bytes": stores,
            "spill_load_bytes": loads}


def _ptxas_report(ptx: str, arch: int):
    """Run Triton's ptxas -v on `ptx` (the cubin came from Triton's cache, so its log is not at hand)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        ptxas = get_ptxas(arch).path
        gpu = sm_arch_from_capability(arch)
    except (ImportError, AttributeError, RuntimeError):
        return None
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", source, "-o",
                              os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
    return _parse_ptxas_report(run.stdout + run.stderr) if run.returncode == 0 else None


_REPORT_FILE = "autoselect_ptxas_report.json"


def _cached_report(compiled, report, arch):
    """The ptxas report of `compiled`, kept next to the kernel in Triton's cache: a fresh compile brings
    its report (stored here), a cache hit reads the stored one (or runs ptxas -v again)."""
    try:
        from triton.runtime.cache import get_cache_manager

        manager = get_cache_manager(compiled.hash)
    except (ImportError, AttributeError):
        manager = None
    if report is None and manager is not None:
        path = manager.get_file(_REPORT_FILE)
        if path is not None:
            with open(path) as f:
                report = json.load(f)
    if report is None:  # a cache hit from before the report was stored
        report = _ptxas_report(compiled.asm["ptx"], arch)
        if report is not None and manager is not None:
            manager.put(json.dumps(report), _REPORT_FILE, binary=False)
    elif manager is not None and manager.get_file(_REPORT_FILE) is None:
        manager.put(json.dumps(report), _REPORT_FILE, binary=False)
    return report or dict.fromkeys(("registers", "stack_bytes", "spill_store_bytes", "spill_load_bytes"))


def _compile(triton, source, target, options):
    """triton.compile with ptxas's resource report captured (Triton prints it when asked to)."""
    from triton import knobs

    log = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    return compiled, _parse_ptxas_report(log.getvalue())


def _spec_parts(spec):
    kernel, signature, constexprs = spec[:3]
    options = dict(spec[3]) if len(spec) > 3 else {}
    hints = list(spec[4]) if len(spec) > 4 else []
    return kernel, signature, constexprs, options, hints


def compile_ahead_of_time(arch: int, ops=OPS, specs=None):
    """Compile every kernel configuration listed by each op module's `aot_specs()` (or the given `specs`,
    {op: [spec, ...]}) for compute capability `arch` (e.g. 80, 90), each once.

    Returns a list of dicts: op, kernel, signature, constexprs, options, cubin_bytes, shared (dynamic
    shared memory per block, bytes), and from ptxas's report: registers (per thread), stack_bytes,
    spill_store_bytes and spill_load_bytes (None where no report could be had).

    Raises RuntimeError when called under TRITON_INTERPRET=1 (the kernels are then interpreter
    objects, not compilable functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if specs is None:
        specs = {op: importlib.import_module(f"{__package__}.{op}").aot_specs() for op in ops}
    results = []
    target = GPUTarget("cuda", arch, 32)
    for op, op_specs in specs.items():
        for spec in op_specs:
            kernel, signature, constexprs, options, hints = _spec_parts(spec)
            if not hasattr(kernel, "arg_names"):
                raise RuntimeError("compile_ahead_of_time needs compiled kernels: unset TRITON_INTERPRET")
            attrs = {(kernel.arg_names.index(name), ): [["tt.divisibility", 16]] for name in hints}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled, report = _compile(triton, source, target, options)
            report = _cached_report(compiled, report, arch)
            results.append({"op": op, "kernel": kernel.__name__, "signature": dict(signature),
                            "constexprs": dict(constexprs), "options": options,
                            "cubin_bytes": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared,
                            **report})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compile the Triton kernels ahead of time for one GPU arch.")
    parser.add_argument("arch", type=int, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--json", help="write the results here (default: stdout)")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the results
        results = compile_ahead_of_time(args.arch)
    text = json.dumps(results, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
