"""Token-selection methods behind `autoselect.apply(model, method=...)` (DESIGN.md 4).

Every method takes the image features after the projector (a list of (N_i, D), one per image) and a
budget `keep` (an int per image or a fraction in (0, 1]) and returns the kept tokens and their
indices (ascending, spatial order kept), exactly K_i = resolve_k(keep, N_i) per image:

- `autoselect`: a trained `AutoSelector` (Scorer + fused top-K gather), the method of this package;
- `random` (seeded), `norm` (L2 norm), `fastv` (attention of the last prompt token at an early
  language-model layer), `visionzip` (vision-tower attention + merged contextual tokens),
  `divprune` (max-min diversity). Each module documents its source paper and what is simplified.

A method is one file here with a `Method` subclass (`_common.py` documents the interface the
integration calls) plus one line in `BASELINES` ("name": "module:Class"). `make_method(name,
selector, **options)` builds the method object the integration calls; the functional forms (`norm_select`, `random_select`, `divprune_select`, `visionzip_select`,
`fastv_select`) work on plain tensors.
"""

import importlib
import os

from ._common import Method
from .divprune import DivPruneMethod, divprune_select
from .fastv import FastVMethod, fastv_select, last_token_attention
from .norm import NormMethod, norm_select
from .random import RandomMethod, random_select
from .visionzip import VisionZipMethod, visionzip_select

# name -> "module:Class" under autoselect.baselines (or a Method class)
BASELINES = {
    "random": "random:RandomMethod",
    "norm": "norm:NormMethod",
    "fastv": "fastv:FastVMethod",
    "visionzip": "visionzip:VisionZipMethod",
    "divprune": "divprune:DivPruneMethod",
}
METHODS = ("autoselect",) + tuple(BASELINES)


def method_class(name: str):
    """The class registered for baseline `name` in BASELINES."""
    entry = BASELINES[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        return getattr(importlib.import_module(f".{module}", __name__), cls)
    return entry


class AutoSelectMethod(Method):
    """method="autoselect": the selector's Scorer + fused top-K (`selector.select(features, keep)`)."""

    name = "autoselect"

    def __init__(self, selector):
        self.selector = selector

    def select(self, features, keep, ctx=None):
        kept, index = self.selector.select(list(features), keep)
        return list(kept), list(index)


def load_selector(selector):
    """An object with a `select(x, k)` method, or a path (str / os.PathLike) to a folder written by
    `AutoSelector.save_pretrained`, which is loaded. None is a ValueError that says what to pass."""
    if selector is None:
        raise ValueError("autoselect.apply(method='autoselect') needs a selector: an autoselect.AutoSelector or "
                         "the path of one saved with save_pretrained (or pick a training-free baseline: "
                         f"method in {list(BASELINES)})")
    if isinstance(selector, (str, os.PathLike)):
        from ..modules.selector import AutoSelector

        return AutoSelector.from_pretrained(selector)
    if not callable(getattr(selector, "select", None)):
        raise TypeError(f"autoselect.apply: selector must have a select(x, k) method or be a path, got "
                        f"{type(selector).__name__}")
    return selector


def make_method(name: str, selector=None, **options):
    """The method object for `name` (see METHODS). Options: random: seed=0; fastv: layer=2 (FastV's K);
    visionzip: contextual=None. Unknown names and options raise ValueError / TypeError."""
    if not isinstance(name, str) or (name != "autoselect" and name not in BASELINES):
        raise ValueError(f"autoselect.apply: unknown method {name!r}; choose one of {['autoselect', *BASELINES]}")
    if name == "autoselect":
        if options:
            raise TypeError(f"autoselect.apply: method='autoselect' takes no options, got {sorted(options)}")
        return AutoSelectMethod(load_selector(selector))
    if selector is not None:
        raise ValueError(f"autoselect.apply: method={name!r} is training-free and takes no selector")
    try:
        return method_class(name)(**options)
    except TypeError as error:
        raise TypeError(f"autoselect.apply: bad options for method={name!r}: {error}") from None


__all__ = ["BASELINES", "METHODS", "AutoSelectMethod", "Method", "method_class", "DivPruneMethod", "FastVMethod", "NormMethod",
           "RandomMethod", "VisionZipMethod", "divprune_select", "fastv_select", "last_token_attention",
           "load_selector", "make_method", "norm_select", "random_select", "visionzip_select"]
