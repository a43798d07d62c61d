"""VisionZip baseline: dominant tokens by the vision tower's attention + merged contextual tokens.

Source: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025 (arXiv 2412.04467). VisionZip keeps the `dominant` tokens that receive the most attention
in the vision encoder (for CLIP: the CLS token's attention in layer -2, summed over heads), then
merges the remaining tokens into `contextual` ones: `contextual` targets evenly spaced among the
remaining tokens, every other remaining token assigned to its most similar target by the layer's
key vectors (cosine), and each contextual token = target + mean of its assigned tokens.

What is simplified: (1) the budget split: `contextual` defaults to round(K * 10 / 64) (VisionZip's
54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192); (2) the merge is done on the projector's output
(the language model's input), not on the vision features before the projector, so that it runs at
the same place as every other method; a contextual token takes the position (and placeholder) of
its target; (3) the attention is recomputed by our own pass on the captured inputs of that layer's
attention (the tower keeps SDPA); (4) towers without a CLS token (Qwen2-VL, Qwen2.5-VL) rank a
merged token by the attention its patches RECEIVE in the last vision block (mean over heads and
queries, summed over the 2x2 patches it merges), with keys averaged over those patches;
(5) LLaVA-NeXT: the statistics of every crop are laid out by the model's own `pack_image_features`
(newline tokens are never dominant and have a zero key).
"""

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._common import budgets, topk_per_image


@contextlib.contextmanager
def capture_module_inputs(module):
    """Record the `hidden_states` input (and keyword inputs) of every call of `module` while active:
    yields a list; each entry is (hidden_states, kwargs)."""
    captured = []

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def clip_attention_stats(attn, captured) -> Tuple[Tensor, Tensor]:
    """CLIP-style attention module + its captured input (P, T, C) -> (CLS attention over the T tokens
    (P, T), mean over heads; keys (P, T, head_dim), mean over heads), float32."""
    hidden = captured[0]
    p, t, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(hidden).view(p, t, heads, head_dim).transpose(1, 2).to(torch.float32)
    k = attn.k_proj(hidden).view(p, t, heads, head_dim).transpose(1, 2).to(torch.float32)
    scale = float(getattr(attn, "scale", head_dim ** -0.5))
    cls = torch.softmax(torch.einsum("phd,phtd->pht", q[:, :, 0], k) * scale, dim=-1)  # (P, H, T)
    return cls.mean(1), k.mean(1)


def qwen_attention_stats(attn, captured, merge: int) -> Tuple[Tensor, Tensor]:
    """Qwen2-VL / Qwen2.5-VL vision attention + its captured input -> per MERGED token (in the order
    the block saw them): attention received (mean over heads and queries of its segment, summed over
    the merge^2 patches) and keys (mean over heads and patches), float32."""
    import sys

    hidden, kwargs = captured
    seq = hidden.shape[0]
    heads = attn.num_heads
    q, k, _ = attn.qkv(hidden).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    cos, sin = kwargs["position_embeddings"]
    q, k = rotary(q, k, cos, sin)
    q, k = q.to(torch.float32).transpose(0, 1), k.to(torch.float32).transpose(0, 1)  # (H, S, d)
    bounds = kwargs["cu_seqlens"].tolist()
    received = torch.empty(seq, dtype=torch.float32, device=hidden.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        probs = torch.softmax(q[:, start:end] @ k[:, start:end].transpose(1, 2) * float(attn.scaling), dim=-1)
        received[start:end] = probs.mean(dim=(0, 1))
    unit = merge * merge
    scores = received.view(-1, unit).sum(1)
    keys = k.mean(0).view(-1, unit, k.shape[-1]).mean(1)
    return scores, keys


def default_contextual(k: int) -> int:
    """VisionZip's split of a budget K into dominant + contextual (10 of every 64)."""
    return min(k - 1, int(round(k * 10 / 64))) if k > 1 else 0


def visionzip_image(x: Tensor, scores: Tensor, keys: Tensor, k: int, contextual: Optional[int] = None):
    """VisionZip on one image: x (N, D) tokens, scores (N,) dominance, keys (N, d) similarity, budget k.
    Returns (kept (k, D), index (k,) ascending): dominant tokens as they are, contextual tokens as
    target + mean of their assigned tokens, at the target's index."""
    n = x.shape[0]
    c = default_contextual(k) if contextual is None else contextual
    c = max(0, min(c, k - 1, n - (k - c)))
    dominant_k = k - c
    finite = torch.where(torch.isfinite(scores), scores.to(torch.float32), torch.full_like(scores, -1e30,
                                                                                            dtype=torch.float32))
    _, dominant = topk_per_image([x], [finite], dominant_k)
    dominant = dominant[0]
    if c == 0:
        return x[dominant], dominant
    rest_mask = torch.ones(n, dtype=torch.bool, device=x.device)
    rest_mask[dominant] = False
    rest = rest_mask.nonzero().squeeze(1)  # ascending
    step = max(1, rest.numel() // c)
    target_pos = torch.arange(0, rest.numel(), step, device=x.device)[:c]
    targets = rest[target_pos]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=x.device)
    is_target[target_pos] = True
    others = rest[~is_target]
    unit = torch.nn.functional.normalize(keys.to(torch.float32), dim=-1)
    assign = (unit[others] @ unit[targets].T).argmax(1) if others.numel() else \
        torch.empty(0, dtype=torch.long, device=x.device)
    sums = torch.zeros(c, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, assign, x[others].to(torch.float32))
    counts = torch.bincount(assign, minlength=c).clamp(min=1).to(torch.float32).unsqueeze(1)
    contextual_tokens = (x[targets].to(torch.float32) + sums / counts).to(x.dtype)
    index = torch.cat([dominant, targets])
    tokens = torch.cat([x[dominant], contextual_tokens])
    order = torch.argsort(index)
    return tokens[order], index[order]


def visionzip_select(features: Sequence[Tensor], stats: Sequence[Tuple[Tensor, Tensor]], keep,
                     contextual: Optional[int] = None) -> Tuple[List[Tensor], List[Tensor]]:
    """VisionZip per image: features (N_i, D), stats (scores (N_i,), keys (N_i, d)) per image, keep an
    int or a fraction. Returns (kept list (K_i, D), index list (K_i,) ascending)."""
    ks = budgets(features, keep, "method='visionzip'")
    out = [visionzip_image(f, s.to(f.device), kk.to(f.device), k, contextual)
           for f, (s, kk), k in zip(features, stats, ks)]
    return [o[0] for o in out], [o[1] for o in out]


class VisionZipMethod:
    """VisionZip behind `autoselect.apply(..., method="visionzip", contextual=None)`."""

    name = "visionzip"
    needs_vision_attention = True

    def __init__(self, contextual: Optional[int] = None):
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int)
                                       or contextual < 0):
            raise ValueError(f"method='visionzip': contextual must be an int >= 0 or None, got {contextual!r}")
        self.contextual = contextual

    def select(self, features, keep, ctx):
        stats = ctx.vision_records.get("visionzip")
        if stats is None:
            raise RuntimeError("method='visionzip': the vision tower's attention was not recorded")
        return visionzip_select(features, stats, keep, self.contextual)
