"""DivPrune baseline: keep a maximally diverse subset of the visual tokens (max-min diversity).

Source: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025 (arXiv 2503.02175). The selection is the greedy solution of the Max-Min Diversity Problem
on cosine distance: the first token is the one farthest from its nearest neighbour, then each step
adds the token whose minimum distance to the tokens already chosen is largest.
What is simplified: nothing in the greedy rule; ties go to the lower index (the reference's argmax
does the same), already chosen tokens are excluded explicitly (the reference can re-pick a
duplicate token when all remaining distances are 0), distances are in float32 on the projector's
output, and the running minimum is updated per step (O(N K D) instead of re-reducing a K x N block).
The kept indices are returned sorted ascending (spatial order), as every method here.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ._common import Method, budgets


def divprune_index(x: Tensor, k: int) -> Tensor:
    """Greedy max-min diverse subset of x (N, D) of size k (1 <= k <= N): int64 (k,) ascending."""
    n = x.shape[0]
    unit = torch.nn.functional.normalize(x.to(torch.float32), dim=-1)
    distance = 1.0 - unit @ unit.T  # (N, N) cosine distance
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    picks = []
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).min(1).values
    first = int(torch.argmax(nearest))
    picks.append(first)
    chosen[first] = True
    running = distance[first].clone()
    for _ in range(k - 1):
        candidate = running.masked_fill(chosen, float("-inf"))
        pick = int(torch.argmax(candidate))
        picks.append(pick)
        chosen[pick] = True
        running = torch.minimum(running, distance[pick])
    return torch.sort(torch.tensor(picks, dtype=torch.long, device=x.device)).values


def divprune_select(features: Sequence[Tensor], keep) -> Tuple[List[Tensor], List[Tensor]]:
    """DivPrune on each image: features a list of (N_i, D), keep an int or a fraction in (0, 1].
    Returns (kept list of (K_i, D), index list of (K_i,) int64 ascending). Raises ValueError /
    TypeError for a budget out of range."""
    ks = budgets(features, keep, "method='divprune'")
    index = [divprune_index(f, k) for f, k in zip(features, ks)]
    return [f[i] for f, i in zip(features, index)], index


class DivPruneMethod(Method):
    name = "divprune"

    def select(self, features, keep, ctx=None):
        return divprune_select(features, keep)
