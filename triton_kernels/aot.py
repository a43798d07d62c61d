"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, with no GPU present.

Triton ships its own ptxas, so a kernel can be lowered to PTX and assembled to a cubin for sm_80 or
sm_90 on a CPU-only machine. The tests use this to prove that every kernel compiles for the GPUs we
target, not only that it runs under the interpreter.
"""

import importlib


OPS = ("noise_gate", "diag_attention")


def compile_ahead_of_time(arch: int, ops=OPS):
    """Compile every kernel variant listed by each op module's `aot_specs()` for compute capability
    `arch` (e.g. 80, 90). Returns a list of (kernel name, constexprs, cubin size in bytes).

    Raises RuntimeError when called under TRITON_INTERPRET=1 (the kernels are then interpreter
    objects, not compilable functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    target = GPUTarget("cuda", arch, 32)
    for op in ops:
        module = importlib.import_module(f"{__package__}.{op}")
        for kernel, signature, constexprs in module.aot_specs():
            if not hasattr(kernel, "arg_names"):
                raise RuntimeError("compile_ahead_of_time needs compiled kernels: unset TRITON_INTERPRET")
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=target)
            results.append((kernel.__name__, dict(constexprs), len(compiled.asm["cubin"])))
    return results
