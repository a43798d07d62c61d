"""The Denoiser (DESIGN.md 1.4): restores the gated tokens z from themselves and a learned prior.

    h     = AdaLN_1(z; alpha)                          LayerNorm, then a per-token scale and shift from alpha
    q,k,v = h W_q, h W_k, h W_v                        (B, N, H, d)
    a     = diag_attention(q, k, v, mem_k, mem_v, self_bias),   self_bias_h = a_h * logit(alpha) + c_h
    z     = z + a W_o
    out   = z + MLP(AdaLN_2(z; alpha))

Every step is token-wise and the attention is diagonal (each token sees itself and M memory slots,
never another token), so no information moves between image positions: what a pruned token held
cannot reach a kept one. Clean tokens (alpha near 1, large logit) trust themselves; noisy ones fall
back to the memory, a prior shared across images. The output projections W_o and the MLP's last
layer start at zero, and so does the alpha modulation: the Denoiser starts as the identity.

Training only: at inference the pruned tokens are dropped and neither gate nor Denoiser runs. The
AutoSelector (DESIGN.md section 4) holds one as `denoiser` and calls `denoiser(z, alpha)` on the
noise gate's output; `config()` gives the constructor arguments it saves.

Variants (the paper's Table 5): `memory_slots=0` is the PAPER block, an identity attention mask (each
token attends only to itself, so the attention returns its own value, with no self bias);
`attention="global"` is full self-attention among the tokens of an image, the variant that leaks what
a pruned token held into the kept ones (an ablation, not for use).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._dispatch import opmath
from ..ops.diag_attention import diag_attention

# alpha is clamped to [ALPHA_CLAMP, 1 - ALPHA_CLAMP] before its logit, so alpha = 0 or 1 stays finite
# (|logit| <= 13.8); the gradient is zero outside the clamp.
ALPHA_CLAMP = 1e-6


class Denoiser(nn.Module):
    """Diagonal-attention denoiser conditioned on the keep fraction alpha.

    Args:
        dim: token width D.
        heads: attention heads H (default 8).
        head_dim: width d of each head (default 64): the attention works at width H * d.
        memory_slots: M, learned memory keys and values per head (default 64); 0 is the PAPER
            identity-mask block (no memory, no self bias).
        attention: "diagonal" (default: self + memory, no information between tokens) or "global"
            (full self-attention among the tokens of an image, without memory: the leaking variant).
        mlp_ratio: hidden width of the per-token MLP, as a multiple of dim (default 2).
        cond_dim: width of the alpha embedding that drives the adaptive LayerNorms (default 64).
        eps: the LayerNorm epsilon.

    Call: `denoiser(z, alpha)` with z (B, N, D) the gated tokens and alpha (B, N) their keep fraction
    in [0, 1] (values outside are clamped inside the logit); returns the denoised tokens (B, N, D) in
    z's dtype. Differentiable with respect to z, alpha and every parameter. The module computes in the
    dtype of its parameters, like any nn.Module; the self bias and alpha's logit in float32 (float64
    for a float64 module).
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, memory_slots: int = 64, mlp_ratio: int = 2,
                 *, attention: str = "diagonal", cond_dim: int = 64, eps: float = 1e-5):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("head_dim", head_dim), ("memory_slots", memory_slots),
                            ("mlp_ratio", mlp_ratio), ("cond_dim", cond_dim)):
            minimum = 0 if name == "memory_slots" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Denoiser: {name} must be an int >= {minimum}, got {value!r}")
        if attention not in ("diagonal", "global"):
            raise ValueError(f"Denoiser: attention must be 'diagonal' or 'global', got {attention!r}")
        if attention == "global" and memory_slots:
            raise ValueError("Denoiser: the global-attention variant has no memory; pass memory_slots=0")
        self.attention = attention
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.memory_slots, self.mlp_ratio, self.cond_dim, self.eps = memory_slots, mlp_ratio, cond_dim, float(eps)
        inner = heads * head_dim

        # alpha -> per-token (shift, scale) of both LayerNorms; features (alpha, logit(alpha)).
        self.condition = nn.Sequential(nn.Linear(2, cond_dim), nn.SiLU())
        self.modulation = nn.Linear(cond_dim, 4 * dim)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if memory_slots:
            self.memory_k = nn.Parameter(torch.randn(heads, memory_slots, head_dim))
            self.memory_v = nn.Parameter(torch.randn(heads, memory_slots, head_dim))
            # self_bias_h = a_h * logit(alpha) + c_h
            self.self_bias_scale = nn.Parameter(torch.ones(heads))
            self.self_bias_shift = nn.Parameter(torch.zeros(heads))
        self.proj = nn.Linear(inner, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        for layer in (self.modulation, self.proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def config(self) -> dict:
        """The constructor arguments: `Denoiser(**d.config())` builds the same architecture."""
        return {"dim": self.dim, "heads": self.heads, "head_dim": self.head_dim, "memory_slots": self.memory_slots,
                "mlp_ratio": self.mlp_ratio, "attention": self.attention, "cond_dim": self.cond_dim, "eps": self.eps}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, memory_slots={self.memory_slots}, "
                f"mlp_ratio={self.mlp_ratio}, attention={self.attention}")

    def _opmath(self):
        return opmath(self.to_q.weight.dtype)

    def alpha_logit(self, alpha: Tensor) -> Tensor:
        """logit(clamp(alpha, 1e-6, 1 - 1e-6)) in float32 (float64 for a float64 module), shape of alpha."""
        return torch.logit(alpha.to(self._opmath()), eps=ALPHA_CLAMP)

    def self_bias(self, alpha: Tensor) -> Tensor:
        """The bias of each token's self logit, a_h * logit(alpha) + c_h: (B, N) -> (B, N, H)."""
        return self._self_bias_from_logit(self.alpha_logit(alpha))

    def _self_bias_from_logit(self, logit: Tensor) -> Tensor:
        return self.self_bias_scale.to(logit.dtype) * logit.unsqueeze(-1) + self.self_bias_shift.to(logit.dtype)

    def forward(self, z: Tensor, alpha: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 3 or z.shape[-1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"Denoiser: expected tokens z of shape (B, N, {self.dim}), got {shape}")
        if not isinstance(alpha, Tensor) or tuple(alpha.shape) != tuple(z.shape[:2]):
            shape = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
            raise ValueError(f"Denoiser: alpha must have shape (B, N) = {tuple(z.shape[:2])} (one keep fraction "
                             f"per token of z), got {shape}")
        if not alpha.is_floating_point():
            raise TypeError(f"Denoiser: alpha must be a floating-point tensor, got {alpha.dtype}")
        B, N, D = z.shape
        H, d = self.heads, self.head_dim
        logit = self.alpha_logit(alpha)
        features = torch.stack((alpha.to(logit.dtype), logit), dim=-1).to(self.modulation.weight.dtype)
        shift1, scale1, shift2, scale2 = self.modulation(self.condition(features)).chunk(4, dim=-1)

        h = F.layer_norm(z, (D, ), eps=self.eps) * (1 + scale1) + shift1
        q = self.to_q(h).view(B, N, H, d)
        k = self.to_k(h).view(B, N, H, d)
        v = self.to_v(h).view(B, N, H, d)
        if self.attention == "global":  # every token of the image: leaks across positions (ablation)
            attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        elif self.memory_slots == 0:  # identity mask: a softmax over the token's own logit alone is 1
            attended = v
        else:
            attended = diag_attention(q, k, v, self.memory_k, self.memory_v, self._self_bias_from_logit(logit))
        z = z + self.proj(attended.reshape(B, N, H * d))
        h = F.layer_norm(z, (D, ), eps=self.eps) * (1 + scale2) + shift2
        return z + self.mlp(h)
