"""The family-independent part of the Hugging Face integration (DESIGN.md 5).

One patched `forward` per model instance. At prefill (a call that carries images, on an empty or no
cache) it

1. encodes the images with the model's own `get_image_features` (vision tower + projector),
2. selects K tokens per image (the method: AutoSelect or a baseline), ascending, spatial order kept;
   an int K larger than an image's N keeps that image whole (AutoSelect scores the tokens at its
   selector's placement: the projector's input, captured while the images are encoded, or its
   output; either way the indices prune the projector's output, `_selector.py`),
3. drops the placeholder columns of the pruned tokens from input_ids, attention_mask, labels,
   position ids and token-type ids together, so the model's own placeholder check holds and the
   KV cache holds text + kept tokens only,
4. calls the model's original forward with the kept features as pre-encoded `mm_encoder_outputs`.

Positions (`positions="original"`, the default) are those of the UNPRUNED sequence (the kept columns of the position ids the model would
have used): a text token sees every kept image token at its original distance, decoding continues
at the unpruned length (`generate` counts positions on its unpruned attention mask), and for M-RoPE
the rope deltas computed on the unpruned sequence stay valid. Rows of a batch that lose different
numbers of columns (different image counts) are re-aligned by extra padding slots on the left
(attention_mask 0, label -100). `positions="compact"` (1-D position families: LLaVA-1.5 / NeXT) gives
the pruned prompt its own positions instead: each column moves back by the columns dropped before it
in its row, and decoding continues at the pruned length; this is what vLLM does with a pruned prompt
(`autoselect.vllm`), so the two paths can be compared.

State per cache: what a pruned prefill did (`CacheState`: unpruned and pruned lengths, the column
map, the family's decoding state such as Qwen's rope deltas) is kept in a `WeakKeyDictionary` keyed
by the cache object, so several caches can be in flight. A call without images that continues a
known cache (a decode step, or a later turn) has its attention mask, given in unpruned coordinates
as `generate` keeps it, mapped onto the pruned cache, and its positions counted from the unpruned
length. `generate` itself counts the new tokens of a later turn as `input_ids.shape[1] -
cache.get_seq_length()`; the patched `prepare_inputs_for_generation` counts them from the unpruned
length instead, so a second turn feeds exactly its new tokens.

Selection methods: the core knows them only through their interface (see
`autoselect.baselines._common.Method`): `select` (under no_grad), `kept_tokens` (the kept tokens
with their gradients, in training), optionally `bind` (validation against the model at apply time)
and `encoding_capture` (a signal recorded while the patched model encodes the images; the core
wraps `get_image_features` for it and keeps the records with the encoder output, so they follow the
features through `generate`'s beam / num_return_sequences expansion).

Refused, with a ValueError that says so: images in a call that continues a non-empty cache (a new
image in a later turn, chunked prefill), static (compileable) caches, chunked prefill in `generate`.
"""

import copy
import functools
import inspect
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

from ..conversation import IGNORE_INDEX
from ..ops.select import resolve_k

RECORDS_ATTR = "_autoselect_records"


@dataclass
class CacheState:
    """What a pruned prefill did, for the calls that continue its cache."""

    prompt_len: int  # L: columns of the unpruned prompt
    pruned_len: int  # L': columns given to the language model
    gather: Optional[Tensor]  # (B, L') unpruned column of each pruned column, -1 for alignment slots; None: no change
    pruned_mask: Optional[Tensor]  # (B, L') the attention mask given to the language model at prefill
    decode_state: Any = None  # the family's state between prefill and decoding (Qwen: rope deltas)

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
class Memo:
    """The last selection, reused when the same encoded images come back with the same prompt plus new
    tokens (`generate(use_cache=False)` re-runs the whole sequence every step)."""

    source: Callable[[], Any]
    input_ids: Tensor
    attention_mask: Optional[Tensor]
    kept: List[Tensor]
    index: List[Tensor]


@dataclass
class Patch:
    """The record of one `autoselect.apply` on one model instance (stored as `model._autoselect_patch`)."""

    adapter: Any
    method: Any
    keep: Any
    original_forward: Callable
    saved_attrs: List[Any] = field(default_factory=list)  # (object, name, had it in __dict__, previous value)
    states: "weakref.WeakKeyDictionary" = field(default_factory=weakref.WeakKeyDictionary)
    selection: Optional[Selection] = None
    memo: Optional[Memo] = None
    positions: str = "original"  # or "compact": the pruned prompt's own positions (1-D families)

    @property
    def where(self) -> str:
        return f"autoselect ({self.adapter.name})"

    def state_of(self, cache) -> Optional[CacheState]:
        if cache is None:
            return None
        try:
            return self.states.get(cache)
        except TypeError:  # an unhashable cache object: never one we recorded
            return None


# ----------------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------------

def normalize_keep(keep, where: str = "autoselect.apply"):
    """`keep` as a Python int or float: any integral (int, numpy integers, an integer torch scalar)
    or real (float, numpy floats, a floating torch scalar) value; bool and anything else is a TypeError."""
    if isinstance(keep, Tensor):
        if keep.numel() != 1 or keep.dim() != 0:
            raise TypeError(f"{where}: keep must be a scalar, got a tensor of shape {tuple(keep.shape)}")
        if keep.dtype == torch.bool:
            raise TypeError(f"{where}: keep must be an int or a float, got a bool tensor")
        keep = keep.item()
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or type(keep).__name__ == "bool_":
        raise TypeError(f"{where}: keep must be an int (tokens per image) or a float in (0, 1] (fraction), "
                        f"got {type(keep).__name__}")
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if keep < 1:
            raise ValueError(f"{where}: keep must be >= 1 token per image, got {keep}")
        return keep
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{where}: a fractional keep must lie in (0, 1], got {keep}")
    return keep


def image_budget(keep, n: int) -> int:
    """Tokens kept of an image of n tokens: min(keep, n) for an int keep (a budget larger than the
    image keeps it whole), round(keep * n) (at least 1) for a fraction."""
    if isinstance(keep, int):
        return min(keep, n)
    return resolve_k(keep, n, where=f"autoselect.apply(keep=...) for an image of {n} tokens")


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


def map_mask_to_pruned(mask: Tensor, state: CacheState) -> Tensor:
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


def is_static_cache(cache) -> bool:
    """Whether `cache` is a static (fixed-size, compileable) cache."""
    from transformers.cache_utils import StaticCache

    return isinstance(cache, StaticCache) or bool(getattr(cache, "is_compileable", False))


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


STATIC_CACHE_ERROR = ("static (fixed-size, compileable) caches are not supported with visual-token pruning: the "
                      "pruned prompt's length differs from what the cache and its 4-D masks are laid out for; use the "
                      "default dynamic cache (no cache_implementation, or a DynamicCache)")
CHUNKED_PREFILL_ERROR = ("chunked prefill (generate(prefill_chunk_size=...)) is not supported with visual-token "
                         "pruning: a chunk holds part of an image, and an image's tokens are selected together; "
                         "generate without prefill_chunk_size")


# ----------------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------------

class Context:
    """What a selection method may ask about the current prefill: the model (`core`, the adapter), the
    forward's arguments, the placeholder columns of each image, the unpruned positions, and the
    records its `encoding_capture` made when the images were encoded."""

    def __init__(self, model, core, adapter, kwargs, image_cols, num_tokens, source, features, where):
        self.model, self.core, self.adapter, self.kwargs = model, core, adapter, kwargs
        self.image_cols, self.num_tokens = image_cols, num_tokens
        self.unpruned_positions = None
        self._source, self._features, self._where = source, features, where

    def full_positions(self) -> Optional[Tensor]:
        """Position ids of the unpruned prompt (what the language model would get unpatched)."""
        return self.unpruned_positions

    def encoding_records(self) -> list:
        """The method's encoding records, one per image of this call, aligned with the features (also
        after `generate` repeated the features for beams or num_return_sequences)."""
        recorded = getattr(self._source, RECORDS_ATTR, None)
        if recorded is None:
            raise ValueError(f"{self._where}: this method needs a signal recorded when the patched model encodes the "
                             "images; these image features were encoded elsewhere (pass pixel_values, or encode "
                             "them with the patched model's get_image_features)")
        encoded, records = recorded
        out = []
        for feature in self._features:
            match = next((r for f, r in zip(encoded, records) if f is feature), None)
            if match is None:  # a copy (e.g. a stacked pooler_output repeated by generate): match by value
                match = next((r for f, r in zip(encoded, records)
                              if f.shape == feature.shape and torch.equal(f, feature.detach())), None)
            if match is None:
                raise ValueError(f"{self._where}: an image's features match none of the recorded encodings")
            out.append(match)
        return out


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
        cache = kw.get("cache")
        if cache is not None and is_static_cache(cache):
            raise ValueError(f"{patch.where}: {STATIC_CACHE_ERROR} (got a {type(cache).__name__})")
        core = adapter.core(model_)
        if adapter.has_images(kw):
            past = cache.get_seq_length() if cache is not None else 0
            if past > 0:
                raise ValueError(f"{patch.where}: images in a call that continues a cache (it holds {past} tokens) "
                                 "are not supported: pruning selects an image's tokens at the prefill of an empty "
                                 "cache, so pass every image in the first call (a new image in a later turn, or "
                                 "chunked prefill, needs a new cache)")
            return _prefill(model_, core, patch, kw)
        state = patch.state_of(cache)
        if state is not None:
            return _decode(core, patch, state, kw)
        return original(**kw)

    return forward


def make_prepare_inputs(model, patch: Patch):
    """The per-instance `prepare_inputs_for_generation`: when `generate` continues a pruned cache with
    the whole conversation (a later turn), it counts the new tokens as `input_ids.shape[1] -
    cache.get_seq_length()`, i.e. from the PRUNED length, and would feed old tokens again; count them
    from the unpruned length the cache stands for."""
    original = model.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare_inputs_for_generation(input_ids, *args, next_sequence_length=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state = patch.state_of(cache)
        if state is not None and state.removed > 0 and next_sequence_length is not None and input_ids is not None:
            cached = cache.get_seq_length()
            if next_sequence_length == input_ids.shape[1] - cached:
                next_sequence_length = input_ids.shape[1] - (cached + state.removed)
                if next_sequence_length < 1:
                    raise ValueError(f"{patch.where}: the input holds {input_ids.shape[1]} tokens, no new one after "
                                     f"the {cached + state.removed} (unpruned) tokens of the pruned cache")
        return original(input_ids, *args, next_sequence_length=next_sequence_length, **kwargs)

    return prepare_inputs_for_generation


def make_generate(model, patch: Patch):
    """The per-instance `generate`: refuses what pruning cannot support before anything runs
    (chunked prefill, static caches), then calls the original."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if chunk is not None:
            raise ValueError(f"{patch.where}: {CHUNKED_PREFILL_ERROR}")
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and is_static_cache(cache):
            raise ValueError(f"{patch.where}: {STATIC_CACHE_ERROR} (got a {type(cache).__name__})")
        if implementation is not None and implementation not in ("dynamic", "offloaded", "quantized"):
            raise ValueError(f"{patch.where}: {STATIC_CACHE_ERROR} (got cache_implementation={implementation!r})")
        state = patch.state_of(cache)
        if state is not None:  # a later turn: generate reads the model's decoding state (rope deltas) first
            patch.adapter.restore_decode_state(patch.adapter.core(model), state.decode_state)
        return original(*args, **kwargs)

    return generate


def _select(patch: Patch, ctx: Context, features: List[Tensor], keep_arg, source, kw):
    """(kept, index) per image: reused from the memo when the same encoded images come back with the
    same prompt and new tokens after it, else the method's selection (indices without gradient)."""
    input_ids, mask = kw["input_ids"], kw.get("attention_mask")
    memo = patch.memo
    if memo is not None and memo.source() is source and len(memo.index) == len(features) and \
            input_ids.shape[0] == memo.input_ids.shape[0] and input_ids.shape[1] >= memo.input_ids.shape[1]:
        length = memo.input_ids.shape[1]
        same_mask = (memo.attention_mask is None and (mask is None or bool(mask[:, :length].all()))) or \
            (memo.attention_mask is not None and mask is not None and
             torch.equal(mask[:, :length].to(memo.attention_mask.dtype), memo.attention_mask))
        if same_mask and torch.equal(input_ids[:, :length], memo.input_ids):
            return memo.kept, memo.index
    with torch.no_grad():
        kept, index = patch.method.select(features, keep_arg, ctx)
    kept, index = list(kept), list(index)
    patch.memo = Memo(_weak(source), input_ids.clone(), None if mask is None else mask.clone(),
                      [k.detach() for k in kept], index)
    return kept, index


def _prefill(model, core, patch: Patch, kw: dict):
    adapter, method, where = patch.adapter, patch.method, patch.where
    input_ids = kw.get("input_ids")
    if input_ids is None:
        raise ValueError(f"{where}: pruning needs input_ids (to find the image placeholders); inputs_embeds "
                         "alone are not supported")
    if kw.get("inputs_embeds") is not None:
        raise ValueError(f"{where}: pass input_ids or inputs_embeds, not both")
    attention_mask = kw.get("attention_mask")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        raise ValueError(f"{where}: pruning needs a 2-D attention mask (batch, sequence), got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")

    source = adapter.encode(core, kw)
    image_output = copy.copy(source)  # the caller's output object is not changed
    features = list(source.pooler_output)
    num_tokens = [int(f.shape[0]) for f in features]
    budgets = [image_budget(patch.keep, n) for n in num_tokens]
    # methods get the user's keep, or one budget per image where an int keep exceeds an image's N
    keep_arg = budgets if isinstance(patch.keep, int) and any(k < patch.keep for k in budgets) else patch.keep
    image_token_id = adapter.image_token_id(core)
    image_cols = image_columns(input_ids, image_token_id, num_tokens, where)

    ctx = Context(model, core, adapter, kw, image_cols, num_tokens, source, features, where)
    ctx.unpruned_positions = adapter.prefill_positions(core, kw)
    kept, index = _select(patch, ctx, features, keep_arg, source, kw)
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):  # the same tokens, with gradients
        with_grad = getattr(method, "kept_tokens", None)
        kept = list(with_grad(features, index, ctx)) if with_grad is not None else \
            [f.index_select(0, i.to(f.device)) for f, i in zip(features, index)]
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
        _remember(patch, core, out, CacheState(length, length, None, None))
        return out

    plan = gather_plan(keep)
    kw["input_ids"] = gather_columns(input_ids, plan, adapter.pad_token_id(core))
    base_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    kw["attention_mask"] = gather_columns(base_mask, plan, 0)
    if kw.get("labels") is not None:
        labels = gather_columns(kw["labels"], plan, IGNORE_INDEX)
        # the loss predicts column j from column j - 1: a row's first column has no predecessor unpruned,
        # so it must not get one in the alignment slots on its left
        after_slot = torch.zeros_like(plan, dtype=torch.bool)
        after_slot[:, 1:] = (plan[:, :-1] < 0) & (plan[:, 1:] >= 0)
        kw["labels"] = labels.masked_fill(after_slot.to(labels.device), IGNORE_INDEX)
    positions = kw.get("position_ids")
    if positions is None:
        positions = ctx.unpruned_positions
    if positions.shape[-1] != length:
        raise ValueError(f"{where}: position_ids cover {positions.shape[-1]} columns, the prompt {length}")
    kw["position_ids"] = gather_columns(positions.expand(*positions.shape[:-2], batch, length), plan, 0)
    if patch.positions == "compact":  # close the gaps: each column moves back by the columns dropped before it
        dropped = torch.cumsum((~keep).to(torch.long), dim=-1).to(kw["position_ids"].device)
        kw["position_ids"] = kw["position_ids"] - gather_columns(dropped, plan, 0)
    for name in adapter.per_token_inputs:
        if kw.get(name) is not None:
            kw[name] = gather_columns(kw[name], plan, 0)

    out = patch.original_forward(**kw)
    _remember(patch, core, out, CacheState(length, plan.shape[1], plan, kw["attention_mask"]))
    return out


def _remember(patch: Patch, core, out, state: CacheState):
    cache = find_cache(out)
    if cache is None:
        return
    state.decode_state = patch.adapter.save_decode_state(core)
    try:
        patch.states[cache] = state
    except TypeError:
        raise ValueError(f"{patch.where}: the cache object ({type(cache).__name__}) cannot be tracked "
                         "(not weak-referenceable)") from None


def _decode(core, patch: Patch, state: CacheState, kw: dict):
    """A call without images that continues a cache of a pruned prefill: a decode step, or the new
    tokens of a later turn."""
    where = patch.where
    patch.adapter.restore_decode_state(core, state.decode_state)
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
            raise ValueError(f"{where}: continuing a pruned cache needs a 2-D attention mask (batch, sequence)")
        if mask.shape[1] == cache_len + q + state.removed:
            unpruned_mask = mask
            kw["attention_mask"] = map_mask_to_pruned(mask, state)
        elif mask.shape[1] == cache_len + q:
            pass  # already in the pruned coordinates of the cache
        else:
            raise ValueError(f"{where}: the attention mask has {mask.shape[1]} columns; the pruned cache holds "
                             f"{cache_len} tokens for an unpruned {cache_len + state.removed}, plus {q} new")
    else:
        ones = torch.ones(batch, cache_len + q - state.pruned_len, dtype=state.pruned_mask.dtype,
                          device=state.pruned_mask.device)
        kw["attention_mask"] = torch.cat([state.pruned_mask.expand(batch, -1), ones], dim=1)
    if patch.positions == "compact":  # the pruned sequence's own positions: its mask's running count
        kw["position_ids"] = (kw["attention_mask"].to(torch.long).cumsum(-1) - 1).clamp(min=0)[:, -q:]
    elif kw.get("position_ids") is None:
        kw["position_ids"] = patch.adapter.decode_positions(core, unpruned_mask, cache_len + state.removed, q,
                                                            batch, ref.device, saved=state.decode_state)
    return patch.original_forward(**kw)


def make_image_features(core, patch: Patch, capture):
    """A per-instance `get_image_features` for a method that records a signal while the images are
    encoded (`method.encoding_capture`): the original, run inside the method's capture; the records
    (one per image, aligned with the features) are kept on the returned output object, so they also
    serve `generate`, which encodes the images before its prefill call and may repeat the features."""
    original = core.get_image_features

    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        call_kw = _bind(original, args, kwargs)
        with capture(call_kw) as recorder:
            out = original(**call_kw)
        features = list(out.pooler_output if hasattr(out, "pooler_output") else out[1])
        with torch.no_grad():
            records = recorder.finish(features)
        try:
            object.__setattr__(out, RECORDS_ATTR, (features, list(records)))
        except AttributeError:
            raise ValueError(f"{patch.where}: get_image_features returned a {type(out).__name__}, which cannot "
                             "carry the method's records; call it with return_dict=True") from None
        return out

    return get_image_features
