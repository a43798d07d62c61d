"""The ops of autoselect: references (`*_ref`), torch.library registration, autograd, backend
dispatch and the public functionals. One file per op."""

from .noise_gate import gate_noise_ref, noise_gate, noise_gate_backward_ref, noise_gate_ref, noise_offsets
from .select import resolve_k, select_topk, select_topk_ref

__all__ = ["gate_noise_ref", "noise_gate", "noise_gate_backward_ref", "noise_gate_ref", "noise_offsets", "resolve_k", "select_topk",
           "select_topk_ref"]
