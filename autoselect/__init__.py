"""autoselect: keep only the visual tokens that matter in vision-language models.

AutoSelect (arXiv 2603.07135) trains a small Scorer on a frozen VLM with the VLM's own next-token
loss, through a variance-preserving noise gate; at inference the Scorer and a hard top-K drop the
other visual tokens before the language model runs. This package holds the fused kernels (C++, CUDA,
Triton) as torch ops, the modules (Scorer, Denoiser, AutoSelector) and, in later releases, the
trainer and the Hugging Face integration.

The compiled extension `autoselect._C` is loaded lazily: `import autoselect` works where it was not
built; `python -m autoselect info` says what is built and which backend each op uses.
"""

__version__ = "0.1.0"

from ._backends import backends, force_backend
from .ops import (diag_attention, diag_attention_ref, gate_noise_ref, noise_gate, noise_gate_ref, noise_offsets,
                  score_select, select_topk, select_topk_ref, soft_topk)
from .modules import AutoSelector, Denoiser, Scorer
from .integrations import apply, pruned, revert

__all__ = [
    "__version__",
    "AutoSelector",
    "Denoiser",
    "Scorer",
    "apply",
    "backends",
    "diag_attention",
    "diag_attention_ref",
    "force_backend",
    "gate_noise_ref",
    "noise_gate",
    "noise_gate_ref",
    "noise_offsets",
    "pruned",
    "revert",
    "score_select",
    "select_topk",
    "select_topk_ref",
    "soft_topk",
]
