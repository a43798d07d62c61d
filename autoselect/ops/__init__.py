"""The ops of autoselect: references (`*_ref`), torch.library registration, autograd, backend
dispatch and the public functionals. One file per op."""

from .noise_gate import gate_noise_ref, noise_gate, noise_gate_backward_ref, noise_gate_ref, noise_offsets

__all__ = ["gate_noise_ref", "noise_gate", "noise_gate_backward_ref", "noise_gate_ref", "noise_offsets"]
