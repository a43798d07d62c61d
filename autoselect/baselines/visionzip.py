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
attention (the tower keeps SDPA), recorded through the family adapter while the patched model
encodes the images; (4) towers without a CLS token (Qwen2-VL, Qwen2.5-VL) rank a
merged token by the attention its patches RECEIVE in the last vision block (mean over heads and
queries, summed over the 2x2 patches it merges), with keys averaged over those patches;
(5) LLaVA-NeXT: the statistics of every crop are laid out by the model's own `pack_image_features`
(newline tokens are never dominant and have a zero key).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..integrations._adapter import InputCapture
from ._common import Method, budgets, topk_per_image


def attention_stats(q: Tensor, k: Tensor, segments, scale: float, cls: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Per tower token, from the queries and keys (H, S, d) of the scoring layer and its attention
    sequences [(start, end)]: the dominance score (float32 (S,)) and the key (mean over heads, (S, d)).
    With a CLS token (index `cls` in each sequence): the attention the CLS query pays each token, mean
    over heads (VisionZip's rule); without: the attention each token receives, mean over heads and the
    queries of its sequence."""
    q, k = q.to(torch.float32), k.to(torch.float32)
    scores = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
    for start, end in segments:
        keys = k[:, start:end]
        if cls is not None:
            probs = torch.softmax(torch.einsum("hd,htd->ht", q[:, start + cls], keys) * scale, dim=-1)
            scores[start:end] = probs.mean(0)
        else:
            probs = torch.softmax(q[:, start:end] @ keys.transpose(1, 2) * scale, dim=-1)
            scores[start:end] = probs.mean(dim=(0, 1))
    return scores, k.mean(0)


class VisionCapture(InputCapture):
    """Records the input of the vision layer whose output becomes the features (through the adapter)
    while the patched model encodes the images; `finish` turns it into per image (scores (N_i,),
    keys (N_i, d)): tower tokens merged into one feature token add their scores and average their
    keys; feature tokens without a tower token (LLaVA-NeXT's newlines) are never dominant (score
    -inf) and have a zero key."""

    def module(self):
        return self.adapter.vision_attention_module(self.core)

    def finish(self, features):
        if not self.captured:
            raise RuntimeError("method='visionzip': the vision tower's scoring layer did not run")
        q, k, segments, scale, cls = self.adapter.vision_attention_inputs(self.core, self.captured[-1])
        scores, keys = attention_stats(q, k, segments, scale, cls)
        per_image_scores = self.adapter.tower_to_features(self.core, self.call_kw, scores, features)
        per_image_keys = self.adapter.tower_to_features(self.core, self.call_kw, keys, features)
        out = []
        for s, kk in zip(per_image_scores, per_image_keys):
            s = s.sum(1)
            kk = kk.mean(1)
            out.append((torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s),
                        torch.nan_to_num(kk, nan=0.0)))
        return out


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


class VisionZipMethod(Method):
    """VisionZip behind `autoselect.apply(..., method="visionzip", contextual=None)`."""

    name = "visionzip"

    def __init__(self, contextual: Optional[int] = None):
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int)
                                       or contextual < 0):
            raise ValueError(f"method='visionzip': contextual must be an int >= 0 or None, got {contextual!r}")
        self.contextual = contextual

    def bind(self, adapter, core):
        adapter.vision_attention_module(core)  # the family must expose the scoring layer

    def encoding_capture(self, adapter, core):
        return lambda call_kw: VisionCapture(adapter, core, call_kw)

    def select(self, features, keep, ctx):
        return visionzip_select(features, ctx.encoding_records(), keep, self.contextual)

    def kept_tokens(self, features, index, ctx):
        """The dominant tokens and the merged contextual tokens as functions of the features (the same
        selection, recomputed with gradients on)."""
        ks = [int(i.numel()) for i in index]
        kept, again = visionzip_select(features, ctx.encoding_records(), ks, self.contextual)
        if not all(torch.equal(a, b.to(a.device)) for a, b in zip(again, index)):
            raise RuntimeError("method='visionzip': the selection changed when recomputed with gradients")
        return kept
