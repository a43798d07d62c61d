"""The ops of autoselect: references (`*_ref`), torch.library registration, autograd, backend
dispatch and the public functionals. One file per op."""

from .diag_attention import diag_attention, diag_attention_backward_ref, diag_attention_ref
from .noise_gate import gate_noise_ref, noise_gate, noise_gate_backward_ref, noise_gate_ref, noise_offsets
from .select import resolve_k, score_select, select_topk, select_topk_ref
from .soft_topk import soft_topk

__all__ = ["diag_attention", "diag_attention_backward_ref", "diag_attention_ref",
           "gate_noise_ref", "noise_gate", "noise_gate_backward_ref", "noise_gate_ref", "noise_offsets", "resolve_k",
           "score_select", "select_topk", "select_topk_ref", "soft_topk"]
