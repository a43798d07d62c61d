"""Shared pieces of the selection methods: the method interface and the per-image top-K through
`autoselect.select_topk`.

A method is one file under `autoselect/baselines/` with a `Method` subclass, plus one line in
`autoselect.baselines.BASELINES`. The integration calls, per model:

- `bind(adapter, core)` once, at `autoselect.apply`: check the options against the model (a clear
  ValueError at apply time, in the user's own terms);
- `encoding_capture(adapter, core)` once, at `autoselect.apply`: None, or a factory
  `capture(call_kwargs)` of context managers, entered around the model's `get_image_features` (the
  vision tower runs inside it), whose `finish(features)` returns one record per image (aligned with
  the features, (N_i, ...) each); the method reads them back with `ctx.encoding_records()`. Signals
  come through the family adapter (`adapter.vision_attention_module(core)`,
  `adapter.vision_attention_inputs`, `adapter.tower_to_features`, `adapter.language_model(core)`),
  never from a family's own classes;

and per prefill:

- `select(features, keep, ctx) -> (kept, index)` under no_grad: features a list of (N_i, D) (the
  projector's output), keep an int, a fraction, or a list with one int per image; index ascending,
  exactly K_i per image;
- `kept_tokens(features, index, ctx)` when gradients are on (training): the kept tokens as a function
  of the features, so they carry gradients to the projector and the vision tower (the index stays
  gradient-free). Default: the features at the index.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ..ops.select import resolve_k, select_topk


class Method:
    """Base class of the selection methods (see the module docstring)."""

    name = "method"

    def bind(self, adapter, core) -> None:
        """Validate the method's options against the model (called by `autoselect.apply`)."""

    def encoding_capture(self, adapter, core):
        """None, or a factory of captures run around the model's image encoding."""
        return None

    def select(self, features, keep, ctx) -> Tuple[List[Tensor], List[Tensor]]:
        raise NotImplementedError

    def kept_tokens(self, features, index, ctx) -> List[Tensor]:
        """The kept tokens with their gradients: the features at `index`."""
        return [f.index_select(0, i.to(f.device)) for f, i in zip(features, index)]


def topk_per_image(features: Sequence[Tensor], scores: Sequence[Tensor], keep) -> Tuple[List[Tensor], List[Tensor]]:
    """Per image i: the resolve_k(keep, N_i) highest-scoring of features[i] (N_i, D), ascending,
    ties to the lower index, through the fused `select_topk` (one ragged launch for all images).
    keep may also be a list with one budget per image. Returns (kept list of (K_i, D), index list
    of (K_i,) int64)."""
    features = list(features)
    scores = [s.to(torch.float32) for s in scores]
    if not features:
        return [], []
    kept, index = select_topk(features, scores, keep)
    return list(kept), list(index)


def budgets(features: Sequence[Tensor], keep, where: str) -> List[int]:
    """K_i per image with the uniform budget errors of `resolve_k` (keep: one budget for every image,
    or a list with one per image)."""
    if isinstance(keep, (list, tuple)):
        if len(keep) != len(features):
            raise ValueError(f"{where}: {len(keep)} budgets for {len(features)} images")
        return [resolve_k(k, int(f.shape[0]), where=where) for f, k in zip(features, keep)]
    return [resolve_k(keep, int(f.shape[0]), where=where) for f in features]
