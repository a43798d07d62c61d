"""Benchmarks of the ops, shared by `autoselect bench` and the scripts in benchmarks/.

Each op has one module with a `setup(...)` that builds every provider (ours and the eager reference)
the same way, and a `run(...)` that measures them and returns result rows.
"""

from . import diag_attention, noise_gate, prefill, select

OPS = {"noise_gate": noise_gate, "diag_attention": diag_attention, "select": select, "prefill": prefill}

__all__ = ["OPS", "diag_attention", "noise_gate", "prefill", "select"]
