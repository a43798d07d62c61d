"""Shared pieces of the selection methods: the per-image top-K through `autoselect.select_topk`."""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ..ops.select import resolve_k, select_topk


def topk_per_image(features: Sequence[Tensor], scores: Sequence[Tensor], keep) -> Tuple[List[Tensor], List[Tensor]]:
    """Per image i: the resolve_k(keep, N_i) highest-scoring of features[i] (N_i, D), ascending,
    ties to the lower index, through the fused `select_topk` (one ragged launch for all images).
    Returns (kept list of (K_i, D), index list of (K_i,) int64)."""
    features = list(features)
    scores = [s.to(torch.float32) for s in scores]
    if not features:
        return [], []
    kept, index = select_topk(features, scores, keep)
    return list(kept), list(index)


def budgets(features: Sequence[Tensor], keep, where: str) -> List[int]:
    """K_i per image with the uniform budget errors of `resolve_k`."""
    return [resolve_k(keep, int(f.shape[0]), where=where) for f in features]
