"""Random baseline: keep K visual tokens per image uniformly at random (seeded), in spatial order.

Source: the random-pruning control used by FastV (Chen et al., ECCV 2024), VisionZip (Yang et al.,
CVPR 2025) and DivPrune (Alvar et al., CVPR 2025). What is simplified: nothing; the draw is
`torch.rand` on a CPU generator seeded with `seed` at every call, so the same seed and inputs give
the same selection on every device, and the images of one call get successive draws.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ._common import Method, topk_per_image


def random_select(features: Sequence[Tensor], keep, *, seed: int = 0) -> Tuple[List[Tensor], List[Tensor]]:
    """Keep `keep` (int, or fraction in (0, 1]) random tokens of each image.

    Args: features, a list of (N_i, D) tensors; keep, the budget per image; seed, the generator seed
    (int). Returns (kept list of (K_i, D), index list of (K_i,) int64 ascending). Deterministic for a
    given seed. Raises ValueError / TypeError for a budget out of range."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random baseline: seed must be an int, got {type(seed).__name__}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scores = [torch.rand(int(f.shape[0]), generator=generator).to(f.device) for f in features]
    return topk_per_image(features, scores, keep)


class RandomMethod(Method):
    name = "random"

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"method='random': seed must be an int, got {type(seed).__name__}")
        self.seed = seed

    def select(self, features, keep, ctx=None):
        return random_select(features, keep, seed=self.seed)
