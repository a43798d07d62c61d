"""The Scorer (DESIGN.md 1.1): one importance logit per visual token.

    s = Linear(H, 1)(GELU(Linear(D, H)(LayerNorm(D)(v))))

Token-wise, so permutation-equivariant, at cost O(N D H). At inference `select` runs it fused with
the top-K and the gather (`autoselect.ops.select.score_select`): the LayerNorm's affine is folded
into the first layer so that the raw tokens go through one GEMM, and one kernel does the rest.
"""

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from ..ops.select import score_select


class Scorer(nn.Module):
    """Per-token importance scorer: LayerNorm(dim) -> Linear(dim, hidden) -> GELU -> Linear(hidden, 1).

    Args:
        dim: token width D (the language model's embedding width for projector outputs).
        hidden: the hidden width H (default 256).
        eps: the LayerNorm epsilon.

    Call: `scorer(x)` with x (..., N, D) returns the logits (..., N) in x's dtype (the module
    computes in the dtype of its parameters, like any nn.Module). `scorer.select(x, k)` returns the
    top-k tokens (kept, index) through the fused inference path.
    """

    def __init__(self, dim: int, hidden: int = 256, eps: float = 1e-5):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Scorer: {name} must be a positive int, got {value!r}")
        self.dim, self.hidden, self.eps = dim, hidden, float(eps)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        self._fused_cache = None

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Scorer: expected tokens (..., N, {self.dim}), got {shape}")
        return self.fc2(self.act(self.fc1(self.norm(x)))).squeeze(-1)

    def _fused_key(self, dtype, device):
        params = (self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return (dtype, device) + tuple((p.data_ptr(), p._version) for p in params)

    @torch.no_grad()
    def fused_parameters(self, dtype: torch.dtype, device: torch.device):
        """The folded weights of the fused path, cached until a parameter changes:
        (W' (H, D) in `dtype`, c (H,), b' (H,), w2 (H,) float32, b2 float, eps float), with
        W' = W1 * gamma, c = rowsum(W' as used), b' = b1 + W1 @ beta (csrc/select.h)."""
        key = self._fused_key(dtype, torch.device(device))
        if self._fused_cache is not None and self._fused_cache[0] == key:
            return self._fused_cache[1]
        if self.fc1.weight.device != torch.device(device):
            raise ValueError(f"Scorer: the tokens are on {device}, the scorer on {self.fc1.weight.device}; move one")
        w1 = self.fc1.weight.to(device=device, dtype=torch.float64)
        gamma = self.norm.weight.to(device=device, dtype=torch.float64)
        beta = self.norm.bias.to(device=device, dtype=torch.float64)
        weight = (w1 * gamma).to(dtype)
        # c from the weight as the GEMM sees it (rounded to dtype), so that the mean cancels exactly.
        col_sum = weight.to(torch.float64).sum(1).to(torch.float32)
        bias = (self.fc1.bias.to(device=device, dtype=torch.float64) + w1 @ beta).to(torch.float32)
        w2 = self.fc2.weight.reshape(-1).to(device=device, dtype=torch.float32)
        b2 = float(self.fc2.bias.reshape(()).item())
        fused = (weight.contiguous(), col_sum.contiguous(), bias.contiguous(), w2.contiguous(),
                 b2, self.eps)
        self._fused_cache = (key, fused)
        return fused

    def select(self, x: Union[Tensor, Sequence[Tensor]], k, *, return_scores: bool = False):
        """The top-k tokens of each image by this scorer, through the fused path (`score_select`):
        (kept, index) as in `autoselect.select_topk`, plus the scores with return_scores."""
        return score_select(x, self, k, return_scores=return_scores)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"
