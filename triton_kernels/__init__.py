"""Triton kernels of autoselect, one file per op. Installed as `autoselect.triton_kernels`.

Importing this package needs triton. On a machine without a GPU the kernels run only under
TRITON_INTERPRET=1 (set before triton is first imported) and can still be compiled ahead of time for
a chosen GPU architecture with `compile_ahead_of_time`.
"""

from . import diag_attention, noise_gate
from .aot import compile_ahead_of_time

__all__ = ["compile_ahead_of_time", "diag_attention", "noise_gate"]
