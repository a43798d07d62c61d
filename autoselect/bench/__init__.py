"""Benchmarks of the ops, shared by `autoselect bench` and the scripts in benchmarks/.

Each op has one module with a `setup(...)` that builds every provider (ours and the eager reference)
the same way, and a `run(...)` that measures them and returns result rows.
"""

from . import noise_gate

OPS = {"noise_gate": noise_gate}

__all__ = ["OPS", "noise_gate"]
