"""method="autoselect" with the selector's placement (DESIGN.md 1, 5).

A selector reads the VLM's tokens at one point, recorded in its config as `placement`:

- "projector_output": the projector's output per image (the features the language model receives;
  Qwen2-VL / 2.5-VL's merger output). The first release's selectors, whose configs have no
  placement, are read this way, unchanged.
- "projector_input": the selected vision layer's features as the projector receives them (LLaVA-1.5
  and LLaVA-NeXT: after the select strategy, CLS dropped for "default"). The projector's input is
  captured (a forward pre-hook on `adapter.projector(core)`) while the patched model encodes the
  images; the selector scores it, and the same indices prune the projector's output (the projector
  acts per token). LLaVA-NeXT's newline tokens have no projector input and are never kept.

`bind` refuses, at `apply` time, a selector whose placement the family does not offer or whose
`dim` differs from the token width there, with a ValueError naming both.
"""

from typing import List

import torch
from torch import Tensor

from ..baselines import AutoSelectMethod
from ..baselines._common import budgets
from ._adapter import InputCapture

DEFAULT_PLACEMENT = "projector_output"  # a selector without a recorded placement: the first release


def selector_config(selector) -> dict:
    config = getattr(selector, "config", None)
    return config if isinstance(config, dict) else {}


def selector_placement(selector) -> str:
    """The placement a selector was trained for ("projector_output" when its config records none)."""
    return selector_config(selector).get("placement") or DEFAULT_PLACEMENT


def selector_dim(selector):
    """The token width a selector reads (None when it does not say: a plain `select(x, k)` object)."""
    dim = selector_config(selector).get("dim", getattr(selector, "dim", None))
    return int(dim) if isinstance(dim, int) and not isinstance(dim, bool) else None


def check_placement(adapter, core, placement: str, dim, where: str = "autoselect.apply") -> None:
    """ValueError unless the family offers `placement` with token width `dim` (None: not checked)."""
    offered = {p: adapter.feature_width(core, p) for p in adapter.placements}
    described = ", ".join(f"{p} (dim {w})" for p, w in offered.items())
    if placement not in offered:
        raise ValueError(f"{where}: the selector was trained at placement {placement!r} (dim {dim}), which a "
                         f"{adapter.name} model does not offer; it offers {described}")
    if dim is not None and dim != offered[placement]:
        raise ValueError(f"{where}: the selector was trained at placement {placement!r} with dim {dim}, but this "
                         f"{adapter.name} model's tokens there have dim {offered[placement]} (it offers "
                         f"{described}); use a selector trained on this model")


class ProjectorInputCapture(InputCapture):
    """Records the projector's input while the images are encoded; `finish(features)` gives it per
    image, aligned with the projector's output features."""

    def module(self):
        return self.adapter.projector(self.core)

    def finish(self, features) -> List[Tensor]:
        if len(self.captured) != 1:
            raise RuntimeError(f"autoselect: expected one projector call while encoding the images, saw "
                               f"{len(self.captured)}")
        return self.adapter.projector_input_features(self.core, self.call_kw, self.captured[0][0], features)


class PlacedSelectorMethod(AutoSelectMethod):
    """The AutoSelect method of `autoselect.apply`: the selector scores the tokens at its placement,
    and the kept indices prune the projector's output (see the module docstring)."""

    def __init__(self, selector):
        super().__init__(selector)
        self.placement = selector_placement(selector)
        self.dim = selector_dim(selector)

    def bind(self, adapter, core) -> None:
        check_placement(adapter, core, self.placement, self.dim)

    def encoding_capture(self, adapter, core):
        if self.placement != "projector_input":
            return None
        return lambda call_kw: ProjectorInputCapture(adapter, core, call_kw)

    def select(self, features, keep, ctx=None):
        if self.placement == "projector_output":
            return super().select(features, keep, ctx)
        features = list(features)
        inputs = ctx.encoding_records()  # per image (N_i, D_in), NaN rows: tokens without a projector input
        ks = budgets(features, keep, "autoselect.apply")
        valid = [~torch.isnan(x).any(-1) if x.is_floating_point() else None for x in inputs]
        if all(v is None or bool(v.all()) for v in valid):
            _, index = self.selector.select(list(inputs), ks)
        else:  # score only the tokens the projector produced; map back to the image's positions
            rows = [v.nonzero().squeeze(1) for v in valid]
            ks = [min(k, int(r.numel())) for k, r in zip(ks, rows)]
            _, picked = self.selector.select([x[r] for x, r in zip(inputs, rows)], ks)
            index = [r[p.to(r.device)] for r, p in zip(rows, picked)]
        index = [i.to(torch.long) for i in index]
        kept = [f.index_select(0, i.to(f.device)) for f, i in zip(features, index)]
        return kept, index
