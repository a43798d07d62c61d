"""FastV baseline: keep the visual tokens that the last prompt token attends to most at an early
language-model layer.

Source: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024 (arXiv 2403.06764). FastV runs the first
K layers on every token, ranks the image tokens by the attention the LAST token pays them in layer
K-1 (averaged over heads) and drops the rest from layer K on (K=2 by default).

What is simplified: the scores come from our own scoring pass at prefill (layers 0..K-2 on the full
prompt, then the queries and keys of layer K-1, softmax over the keys in float32), not from switching
the whole model to eager attention, so the real forward keeps SDPA / FlashAttention; and the pruned
tokens are removed before the FIRST layer rather than from layer K on (so every layer, the KV cache
and decoding shrink, at the price of the scoring pass, which costs K-1 layers plus one attention
row). The "last token" is the last attended column of each row (left or right padding).
"""

import numbers
from typing import List, Tuple

import torch
from torch import Tensor

from ._common import Method, topk_per_image


class _Stop(Exception):
    pass


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_token_attention(language_model, inputs_embeds: Tensor, attention_mask, position_ids, layer: int) -> Tensor:
    """Attention of each row's last attended token over all columns at decoder layer `layer`,
    averaged over heads: (B, L) float32 (0 at padding).

    Runs the decoder layers before `layer` (the model's own code, any attention implementation),
    stops at the input of layer `layer`'s self-attention, and computes that attention row itself:
    q = q_proj(h), k = k_proj(h) (+ q_norm / k_norm where the layer has them), the rotary embedding
    the model passes (cos, sin), grouped-query heads repeated. Works for Llama-, Mistral- and
    Qwen2-style decoders (Qwen2-VL's M-RoPE arrives already folded into cos / sin)."""
    layers = language_model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"method='fastv': layer must lie in [0, {len(layers) - 1}], got {layer}")
    attn = layers[layer].self_attn
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs.get("position_embeddings")
        raise _Stop

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError("method='fastv': the scoring pass did not reach the scoring layer")
    hidden = captured["hidden"]
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    q = attn.q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.to(torch.float32), k.to(torch.float32)
    if captured["rope"] is not None:
        cos, sin = (t.to(torch.float32).unsqueeze(1) for t in captured["rope"])
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device) if attention_mask is None \
        else attention_mask.to(hidden.device).bool()
    last = (valid.long() * torch.arange(length, device=hidden.device)).argmax(1)  # last attended column
    q_last = q[torch.arange(batch, device=hidden.device), :, last]  # (B, H, d)
    logits = torch.einsum("bhd,bhld->bhl", q_last, k) * float(getattr(attn, "scaling", head_dim ** -0.5))
    allowed = valid & (torch.arange(length, device=hidden.device).unsqueeze(0) <= last.unsqueeze(1))
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(1)


def fastv_select(features, keep, scores: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """Top-`keep` of each image (features list of (N_i, D)) by its FastV scores (list of (N_i,))."""
    return topk_per_image(features, scores, keep)


class FastVMethod(Method):
    """FastV behind `autoselect.apply(..., method="fastv", layer=2)`: `layer` is FastV's K, counted from
    1 (the tokens are ranked by the attention of layer K-1, counted from 0); 1 <= K <= the number of
    language-model layers, checked at apply time."""

    name = "fastv"

    def __init__(self, layer: int = 2):
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 1:
            raise ValueError(f"method='fastv': layer (FastV's K, counted from 1) must be an int >= 1, got {layer!r}")
        self.layer = int(layer)

    def bind(self, adapter, core):
        count = len(adapter.language_model(core).layers)
        if not 1 <= self.layer <= count:
            raise ValueError(f"method='fastv': layer (FastV's K, counted from 1) must lie in [1, {count}] for this "
                             f"model's {count} language-model layers, got {self.layer}")

    def select(self, features, keep, ctx):
        core, adapter, kw = ctx.core, ctx.adapter, ctx.kwargs
        input_ids = kw["input_ids"]
        embeds = core.get_input_embeddings()(input_ids)
        image_mask = input_ids == adapter.image_token_id(core)
        merged = torch.cat(list(features), 0).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), merged)
        attention = last_token_attention(adapter.language_model(core), embeds, kw.get("attention_mask"),
                                         ctx.full_positions(), self.layer - 1)
        flat = attention.reshape(-1)
        scores = [flat[cols.to(flat.device)] for cols in ctx.image_cols]
        return fastv_select(features, keep, scores)
