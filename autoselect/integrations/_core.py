"""The family-independent part of the Hugging Face integration (DESIGN.md 5).

One patched `forward` per model instance. At prefill (a call that carries images) it

1. encodes the images with the model's own `get_image_features` (vision tower + projector),
2. selects K tokens per image (the method: AutoSelect or a baseline), ascending, spatial order kept,
3. drops the placeholder columns of the pruned tokens from input_ids, attention_mask, labels,
   position ids and token-type ids together, so the model's own placeholder check holds and the
   KV cache holds text + kept tokens only,
4. calls the model's original forward with the kept features as pre-encoded `mm_encoder_outputs`.

Positions are those of the UNPRUNED sequence (the kept columns of the position ids the model would
have used): a text token sees every kept image token at its original distance, decoding continues
at the unpruned length (`generate` counts positions on its unpruned attention mask), and for M-RoPE
the rope deltas computed on the unpruned sequence stay valid. Rows of a batch that lose different
numbers of columns (different image counts) are re-aligned by extra padding slots on the left
(attention_mask 0, label -100).

At decode (a call without images that continues the cache of the pruned prefill) the caller's
attention mask, in unpruned coordinates as `generate` keeps it, is mapped onto the pruned cache.
"""

import copy
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..ops.select import resolve_k

IGNORE_INDEX = -100


@dataclass
class PruneState:
    """What the last pruned prefill did, for the decode steps that continue its cache."""

    prompt_len: int  # L: columns of the unpruned prompt
    pruned_len: int  # L': columns given to the language model
    gather: Optional[Tensor]  # (B, L') unpruned column of each pruned column, -1 for alignment slots; None: no change
    pruned_mask: Optional[Tensor]  # (B, L') the attention mask given to the language model at prefill
    cache_ref: Optional[Callable[[], Any]] = None  # weak reference to the cache the prefill filled

    @property
    def removed(self) -> int:
        return self.prompt_len - self.pruned_len


@dataclass
class Selection:
    """The tokens kept at the last prefill: per image (in placeholder order over (batch, sequence)),
    the kept indices (ascending, into that image's N tokens), N, and the (B, L) boolean map of the
    unpruned columns that reached the language model."""

    index: List[Tensor]
    num_tokens: List[int]
    keep_columns: Tensor


@dataclass
class Patch:
    """The record of one `autoselect.apply` on one model instance (stored as `model._autoselect_patch`)."""

    adapter: Any
    method: Any
    keep: Any
    original_forward: Callable
    saved_attrs: List[Any] = field(default_factory=list)  # (object, name, had it in __dict__, previous value)
    state: Optional[PruneState] = None
    selection: Optional[Selection] = None
    extras: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Sequence pruning
# ----------------------------------------------------------------------------------------------------

def image_columns(input_ids: Tensor, image_token_id: int, num_tokens: List[int], where: str) -> List[Tensor]:
    """Flat (b * L + s) column of every placeholder of each image, in placeholder order over (batch,
    sequence), which is the order in which the model's `masked_scatter` fills them."""
    flat = (input_ids == image_token_id).reshape(-1).nonzero().squeeze(1)
    total = sum(num_tokens)
    if flat.numel() != total:
        raise ValueError(f"{where}: the prompt holds {flat.numel()} image placeholder tokens but the images give "
                         f"{total} features ({num_tokens}); the processor and the model disagree")
    return list(torch.split(flat, num_tokens))


def keep_columns(input_ids: Tensor, image_cols: List[Tensor], index: List[Tensor], image_token_id: int) -> Tensor:
    """(B, L) bool: True for every non-image column and for the kept placeholder of each image."""
    keep = (input_ids != image_token_id).reshape(-1).clone()
    for cols, idx in zip(image_cols, index):
        keep[cols[idx.to(cols.device)]] = True
    return keep.view_as(input_ids)


def gather_plan(keep: Tensor) -> Tensor:
    """(B, L') unpruned column of each pruned column; rows with fewer kept columns than the longest
    are right-aligned, with -1 (an alignment slot, masked out) on their left."""
    batch, length = keep.shape
    counts = keep.sum(1)
    pruned_len = int(counts.max()) if batch else 0
    rank = keep.long().cumsum(1) - 1 + (pruned_len - counts).unsqueeze(1)
    plan = torch.full((batch, pruned_len), -1, dtype=torch.long, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    plan[rows, rank[rows, cols]] = cols
    return plan


def gather_columns(t: Optional[Tensor], plan: Tensor, fill) -> Optional[Tensor]:
    """Columns `plan` of t's last dimension (t (..., B, L)), `fill` in the alignment slots."""
    if t is None:
        return None
    valid = plan >= 0
    index = plan.clamp(min=0)
    lead = t.dim() - 2
    index = index.view((1,) * lead + tuple(index.shape)).expand(*t.shape[:lead], *index.shape)
    out = torch.gather(t, t.dim() - 1, index.to(t.device))
    return torch.where(valid.to(t.device).view((1,) * lead + tuple(valid.shape)), out,
                       torch.as_tensor(fill, dtype=t.dtype, device=t.device))


def map_mask_to_pruned(mask: Tensor, state: PruneState) -> Tensor:
    """An unpruned (B, L + t) 2-D attention mask -> the pruned (B, L' + t) one of the cache."""
    prefix = gather_columns(mask[:, :state.prompt_len], state.gather, 0)
    return torch.cat([prefix, mask[:, state.prompt_len:]], dim=1)


def find_cache(output) -> Any:
    """The cache object of a model output (ModelOutput or tuple), or None."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    if cache is None and isinstance(output, tuple):
        from transformers.cache_utils import Cache

        cache = next((item for item in output if isinstance(item, Cache)), None)
    return cache


def _weak(obj):
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


# ----------------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------------

class Context:
    """What a selection method may ask about the current prefill, computed only when asked:
    the model (`core`, the adapter), the forward's arguments, and what the vision tower recorded."""

    def __init__(self, model, core, adapter, kwargs, image_cols, num_tokens, vision_records):
        self.model, self.core, self.adapter, self.kwargs = model, core, adapter, kwargs
        self.image_cols, self.num_tokens, self.vision_records = image_cols, num_tokens, vision_records
        self.unpruned_positions = None

    def full_positions(self) -> Optional[Tensor]:
        """Position ids of the unpruned prompt (what the language model would get unpatched)."""
        return self.unpruned_positions


def _bind(original_forward, args, kwargs) -> dict:
    if not args:
        return dict(kwargs)
    names = [p.name for p in inspect.signature(original_forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"forward: got {len(args)} positional arguments, accepts {len(names)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in bound:
            raise TypeError(f"forward: got multiple values for argument {key!r}")
        bound[key] = value
    return bound


def make_forward(model, patch: Patch):
    """The per-instance forward that replaces `model.forward` (the original stays in the patch)."""
    original = patch.original_forward
    adapter = patch.adapter
    model_ref = weakref.ref(model)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        model_ = model_ref()
        kw = _bind(original, args, kwargs)
        if "past_key_values" in kw and "cache" not in kw:
            kw["cache"] = kw.pop("past_key_values")
        core = adapter.core(model_)
        if adapter.has_images(kw):
            return _prefill(model_, core, patch, kw)
        state = patch.state
        cache = kw.get("cache")
        if state is not None and cache is not None and state.cache_ref is not None and state.cache_ref() is cache:
            return _decode(model_, core, patch, state, kw)
        return original(**kw)

    return forward


def _prefill(model, core, patch: Patch, kw: dict):
    adapter, method, where = patch.adapter, patch.method, f"autoselect ({patch.adapter.name})"
    input_ids = kw.get("input_ids")
    if input_ids is None:
        raise ValueError(f"{where}: pruning needs input_ids (to find the image placeholders); inputs_embeds "
                         "alone are not supported")
    if kw.get("inputs_embeds") is not None:
        raise ValueError(f"{where}: pass input_ids or inputs_embeds, not both")
    attention_mask = kw.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{where}: pruning needs a 2-D attention mask (batch, sequence), got "
                         f"{tuple(attention_mask.shape)}")

    source = adapter.encode(core, kw)
    records = {}
    if getattr(method, "needs_vision_attention", False):
        if patch.extras.get("vision_source") is not source:
            raise ValueError(f"{where}: method={method.name!r} needs the vision tower's attention, recorded when the "
                             "patched model encodes the images; these image features were encoded elsewhere")
        records["visionzip"] = patch.extras["vision_stats"]
    patch.extras.pop("vision_source", None), patch.extras.pop("vision_stats", None)
    image_output = copy.copy(source)  # the caller's output object is not changed
    features = list(source.pooler_output)
    num_tokens = [int(f.shape[0]) for f in features]
    for n in num_tokens:  # uniform, early errors for every budget
        resolve_k(patch.keep, n, where=f"autoselect.apply(keep=...) for an image of {n} tokens")
    image_token_id = adapter.image_token_id(core)
    image_cols = image_columns(input_ids, image_token_id, num_tokens, where)

    ctx = Context(model, core, adapter, kw, image_cols, num_tokens, records)
    ctx.unpruned_positions = adapter.prefill_positions(core, kw)
    with torch.no_grad():
        kept, index = method.select(features, patch.keep, ctx)
    image_output.pooler_output = list(kept)

    keep = keep_columns(input_ids, image_cols, index, image_token_id)
    patch.selection = Selection(index=[i.detach() for i in index], num_tokens=num_tokens, keep_columns=keep)

    mm = dict(kw.get("mm_encoder_outputs") or {})
    mm.update(adapter.extra_encoded(core, kw))  # e.g. Qwen videos: encoded here, not pruned
    mm["image"] = image_output
    for name in adapter.encoded_inputs:
        kw.pop(name, None)
    kw["mm_encoder_outputs"] = mm

    batch, length = input_ids.shape
    if bool(keep.all()):  # nothing dropped: the caller's tensors go through unchanged
        out = patch.original_forward(**kw)
        patch.state = PruneState(length, length, None, None, _weak(find_cache(out)))
        return out

    plan = gather_plan(keep)
    pad_id = adapter.pad_token_id(core)
    kw["input_ids"] = gather_columns(input_ids, plan, pad_id)
    base_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    kw["attention_mask"] = gather_columns(base_mask, plan, 0)
    if kw.get("labels") is not None:
        kw["labels"] = gather_columns(kw["labels"], plan, IGNORE_INDEX)
    positions = kw.get("position_ids")
    if positions is None:
        positions = ctx.unpruned_positions
    if positions is None:
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    if positions.shape[-1] != length:
        raise ValueError(f"{where}: position_ids cover {positions.shape[-1]} columns, the prompt {length}")
    kw["position_ids"] = gather_columns(positions.expand(*positions.shape[:-2], batch, length), plan, 0)
    for name in adapter.per_token_inputs:
        if kw.get(name) is not None:
            kw[name] = gather_columns(kw[name], plan, 0)

    out = patch.original_forward(**kw)
    patch.state = PruneState(length, plan.shape[1], plan, kw["attention_mask"], _weak(find_cache(out)))
    return out


def _decode(model, core, patch: Patch, state: PruneState, kw: dict):
    where = f"autoselect ({patch.adapter.name})"
    if state.gather is None:
        return patch.original_forward(**kw)
    ids = kw.get("input_ids")
    embeds = kw.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    batch, q = ref.shape[0], ref.shape[1]
    cache_len = kw["cache"].get_seq_length()
    mask = kw.get("attention_mask")
    unpruned_mask = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            raise ValueError(f"{where}: decoding a pruned cache needs a 2-D attention mask (static / compiled "
                             "caches with 4-D masks are not supported)")
        if mask.shape[1] == cache_len + q + state.removed:
            unpruned_mask = mask
            kw["attention_mask"] = map_mask_to_pruned(mask, state)
        elif state.removed > 0 and mask.shape[1] == cache_len + q:
            pass  # already in the pruned coordinates of the cache
        else:
            raise ValueError(f"{where}: the attention mask has {mask.shape[1]} columns; the pruned cache holds "
                             f"{cache_len} tokens for an unpruned {cache_len + state.removed}, plus {q} new")
    else:
        ones = torch.ones(batch, cache_len + q - state.pruned_len, dtype=state.pruned_mask.dtype,
                          device=state.pruned_mask.device)
        kw["attention_mask"] = torch.cat([state.pruned_mask, ones], dim=1)
    if kw.get("position_ids") is None:
        kw["position_ids"] = patch.adapter.decode_positions(core, unpruned_mask, cache_len + state.removed, q,
                                                            batch, ref.device)
    return patch.original_forward(**kw)


def make_image_features(core, patch: Patch):
    """A per-instance `get_image_features` for methods that need the vision tower's attention
    (VisionZip): the original, run with a hook that records the inputs of the scoring attention
    module; the statistics are kept in the patch, keyed by the returned output object (so they also
    serve `generate`, which encodes the images before its prefill call)."""
    from ..baselines.visionzip import capture_module_inputs

    original = core.get_image_features
    adapter = patch.adapter

    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        call_kw = _bind(original, args, kwargs)
        with capture_module_inputs(adapter.vision_attention_module(core)) as captured:
            out = original(**call_kw)
        features = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        with torch.no_grad():
            patch.extras["vision_stats"] = adapter.vision_stats(core, call_kw, captured, list(features))
        patch.extras["vision_source"] = out
        return out

    return get_image_features
