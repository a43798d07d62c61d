"""The Scorer (DESIGN.md 1.1): one importance logit per visual token.

PAPER (layers >= 1, default layers=2): a pre-norm Transformer encoder over the tokens of ONE image,
then a linear head, so a token's score can depend on the rest of its image (it can see redundancy):

    h = Proj(x);  h = h + Attn(LN(h));  h = h + MLP(LN(h))  (x layers);  s = Linear(width, 1)(LN(h))

Attention runs through `F.scaled_dot_product_attention` (FlashAttention or the memory-efficient
kernel on a GPU), batched over images; a ragged batch (a list of (N_i, D)) is padded and masked so
that no image attends to another. `select` then runs the top-K and the gather as one fused kernel
(`select_topk`).

The light variant (layers=0) is per token: LayerNorm -> Linear(D, hidden) -> GELU -> Linear(hidden, 1),
O(N D hidden). Its `select` is fully fused (`autoselect.ops.select.score_select`): the LayerNorm's
affine is folded into the first layer so that the raw tokens go through one GEMM, and one kernel does
the rest.
"""

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.select import score_select, select_topk

DEFAULT_HIDDEN = 256


def _positive_int(where: str, name: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")


class ScorerBlock(nn.Module):
    """One pre-norm Transformer block: self-attention among the tokens of one image, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """h (B, N, width); key_mask (B, 1, 1, N) bool, True where a key is a real token of its image."""
        B, N, W = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        h = h + self.out(attended.transpose(1, 2).reshape(B, N, W))
        return h + self.mlp(self.norm2(h))


class Scorer(nn.Module):
    """Importance scorer: one logit per visual token (DESIGN.md 1.1).

    Args (keyword-only after dim):
        dim: token width D of the features the Scorer reads.
        layers: Transformer blocks (default 2, PAPER); 0 is the light per-token MLP.
        width: the blocks' width (default 1024, the paper's vision-tower width; scale it with a small
            VLM); an input projection Linear(dim, width) is added when dim != width.
        heads: attention heads (default 16); width must be a multiple of heads.
        mlp_ratio: the blocks' MLP expansion (default 4).
        hidden: the hidden width of the layers=0 MLP (default 256); only for layers=0.
        eps: the LayerNorm epsilon.

    Call: `scorer(x)` with x (B, N, D) or (N, D) returns the logits (B, N) or (N,); a list of (N_i, D)
    (a ragged batch: images with different token counts) returns a list of (N_i,). The module
    computes in the dtype of its parameters: tokens of another floating dtype (a float32 Scorer on a
    bfloat16 VLM's features) are cast to it, and the scores come back in it. `scorer.select(x, k)`
    returns the top-k tokens
    (kept, index) as `autoselect.select_topk` does.
    """

    def __init__(self, dim: int, *, layers: int = 2, width: int = 1024, heads: int = 16, mlp_ratio: int = 4,
                 hidden: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        where = "Scorer"
        _positive_int(where, "dim", dim)
        _positive_int(where, "layers", layers, minimum=0)
        self.dim, self.layers, self.eps = dim, layers, float(eps)
        self._fused_cache = None
        if layers == 0:
            hidden = DEFAULT_HIDDEN if hidden is None else hidden
            _positive_int(where, "hidden", hidden)
            self.hidden = hidden
            self.norm = nn.LayerNorm(dim, eps=eps)
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, 1)
            return
        if hidden is not None:
            raise ValueError(f"{where}: hidden is the width of the layers=0 MLP; with layers={layers} the blocks "
                             f"have width={width} and mlp_ratio={mlp_ratio}")
        for name, value in (("width", width), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            _positive_int(where, name, value)
        if width % heads:
            raise ValueError(f"{where}: width {width} must be a multiple of heads {heads}")
        self.width, self.heads, self.mlp_ratio = width, heads, mlp_ratio
        self.proj = nn.Linear(dim, width) if dim != width else nn.Identity()
        self.blocks = nn.ModuleList(ScorerBlock(width, heads, mlp_ratio, eps) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.head = nn.Linear(width, 1)

    @property
    def config(self) -> dict:
        """The constructor arguments (without dim), as AutoSelector saves them."""
        if self.layers == 0:
            return {"layers": 0, "hidden": self.hidden, "eps": self.eps}
        return {"layers": self.layers, "width": self.width, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
                "eps": self.eps}

    @property
    def output_bias(self) -> Tensor:
        """The bias of the last layer: it shifts every score of an image alike, so neither a top-K nor
        soft_topk sees it (AutoSelector freezes it)."""
        return self.fc2.bias if self.layers == 0 else self.head.bias

    def _check(self, x):
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Scorer: expected tokens (..., N, {self.dim}), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"Scorer: tokens must be a floating tensor, got {x.dtype}")

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> Union[Tensor, List[Tensor]]:
        dtype = self.norm.weight.dtype  # the Scorer computes in the dtype of its parameters
        if isinstance(x, (list, tuple)):
            for t in x:
                self._check(t)
                if t.dim() != 2:
                    raise ValueError(f"Scorer: a ragged batch is a list of (N_i, {self.dim}) tensors, got "
                                     f"{tuple(t.shape)}")
            x = [t.to(dtype) for t in x]
            if self.layers == 0:
                return [self(t) for t in x]
            lengths = [t.shape[0] for t in x]
            padded = nn.utils.rnn.pad_sequence(list(x), batch_first=True)
            position = torch.arange(padded.shape[1], device=padded.device)
            key_mask = (position < torch.tensor(lengths, device=padded.device).unsqueeze(1))[:, None, None, :]
            scores = self._transformer(padded, key_mask)
            return [scores[i, :n] for i, n in enumerate(lengths)]
        self._check(x)
        x = x.to(dtype)
        if self.layers == 0:
            return self.fc2(self.act(self.fc1(self.norm(x)))).squeeze(-1)
        if x.dim() == 2:
            return self._transformer(x.unsqueeze(0), None).squeeze(0)
        if x.dim() != 3:
            raise ValueError(f"Scorer: with layers={self.layers} the tokens are (B, N, {self.dim}), (N, {self.dim}) "
                             f"or a list of (N_i, {self.dim}); got {tuple(x.shape)}")
        return self._transformer(x, None)

    def _transformer(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        h = self.proj(x)
        for block in self.blocks:
            h = block(h, key_mask)
        return self.head(self.norm(h)).squeeze(-1)

    def _fused_key(self, dtype, device):
        params = (self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return (dtype, device) + tuple((p.data_ptr(), p._version) for p in params)

    @torch.no_grad()
    def fused_parameters(self, dtype: torch.dtype, device: torch.device):
        """(layers=0) The folded weights of the fused path, cached until a parameter changes:
        (W' (H, D) in `dtype`, c (H,), b' (H,), w2 (H,) float32, b2 (1,) float32, eps float), with
        W' = W1 * gamma, c = rowsum(W' as used), b' = b1 + W1 @ beta (csrc/select.h). Nothing is read
        back to the host. Under torch.compile the fold is traced into the graph instead of cached
        (a few (H, D) elementwise ops, small beside the (N, D) x (D, H) GEMM)."""
        if self.layers != 0:
            raise TypeError(f"Scorer.fused_parameters: the fully fused path is the layers=0 MLP's; this scorer has "
                            f"layers={self.layers} (its select runs the blocks, then select_topk)")
        if torch.compiler.is_compiling():
            return self._fold(dtype, device)
        key = self._fused_key(dtype, torch.device(device))
        if self._fused_cache is not None and self._fused_cache[0] == key:
            return self._fused_cache[1]
        fused = self._fold(dtype, device)
        self._fused_cache = (key, fused)
        return fused

    def _fold(self, dtype: torch.dtype, device: torch.device):
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
        b2 = self.fc2.bias.reshape(1).to(device=device, dtype=torch.float32)
        return (weight.contiguous(), col_sum.contiguous(), bias.contiguous(), w2.contiguous(), b2.contiguous(),
                self.eps)

    def select(self, x: Union[Tensor, Sequence[Tensor]], k, *, return_scores: bool = False):
        """The top-k tokens of each image by this scorer (inference: no gradient reaches the scorer):
        (kept, index) as in `autoselect.select_topk`, plus the scores (float32) with return_scores.
        layers=0: one GEMM, then one fused kernel (`score_select`). layers >= 1: the blocks (SDPA),
        then the top-K and the gather in one fused kernel (`select_topk`)."""
        if self.layers == 0:
            return score_select(x, self, k, return_scores=return_scores)
        with torch.no_grad():
            scores = self(x)
            scores = [s.float() for s in scores] if isinstance(scores, list) else scores.float()
        if isinstance(x, Tensor) and x.dim() != 3:
            raise ValueError(f"Scorer.select: x must be (B, N, {self.dim}) or a list of (N_i, {self.dim}), got "
                             f"{tuple(x.shape)}")
        kept, index = select_topk(x, scores, k)
        return (kept, index, scores) if return_scores else (kept, index)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in {"dim": self.dim, **self.config}.items())
