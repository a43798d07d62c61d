"""Norm baseline: keep the K visual tokens of largest L2 norm.

Source: the token-norm heuristic used as a training-free reference in the token-pruning literature
(e.g. the "high-norm tokens" observation of Darcet et al., "Vision Transformers Need Registers",
ICLR 2024, and its use as a baseline in VLM token-pruning papers). What is simplified: nothing to
simplify; the norm is taken on the projector's output (the language model's input space), in float32.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ._common import Method, topk_per_image


def norm_scores(x: Tensor) -> Tensor:
    """L2 norm of each token: x (..., N, D) -> (..., N) float32."""
    return x.to(torch.float32).norm(dim=-1)


def norm_select(features: Sequence[Tensor], keep) -> Tuple[List[Tensor], List[Tensor]]:
    """Keep the `keep` (int, or fraction in (0, 1]) largest-norm tokens of each image.

    Args: features, a list of (N_i, D) tensors (one per image); keep, the budget per image.
    Returns (kept list of (K_i, D), index list of (K_i,) int64 ascending). Raises ValueError /
    TypeError for a budget out of range (as `autoselect.select_topk`)."""
    return topk_per_image(features, [norm_scores(f) for f in features], keep)


class NormMethod(Method):
    name = "norm"

    def select(self, features, keep, ctx=None):
        return norm_select(features, keep)
