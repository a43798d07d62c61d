"""Drop-in visual-token pruning for Hugging Face VLMs (DESIGN.md 4 and 5), on unmodified transformers.

    model = autoselect.apply(model, selector, keep=64)          # or method="fastv", "visionzip", ...
    out = model.generate(**inputs, max_new_tokens=32)            # as usual, with fewer visual tokens
    autoselect.revert(model)                                     # exactly the model it was

    with autoselect.pruned(model, method="divprune", keep=0.25):  # the same, reverted on exit
        ...

The patch is per instance: `model.forward` becomes an instance attribute (the class, the module
globals and every other model are untouched) and one record `model._autoselect_patch`; `revert`
deletes both. The family adapter comes from `config.model_type` through `ADAPTERS` (one small file
per family). Supported transformers: >= 5.0, < 6 (the `cache` / `mm_encoder_outputs` interface of
5.x; verified on 5.24).
"""

import contextlib
import importlib
from typing import Union

from ._core import Patch, make_forward, make_image_features

# model_type -> module (under autoselect.integrations) that defines ADAPTER
ADAPTERS = {
    "llava": "llava",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
}

PATCH_ATTR = "_autoselect_patch"


def supported_model_types():
    """The `config.model_type` values that `apply` accepts."""
    return sorted(ADAPTERS)


def get_adapter(model):
    """The family adapter of `model`, from `model.config.model_type`. Raises ValueError naming the
    supported types for any other model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"autoselect: model_type {model_type!r} is not supported; supported: "
                         f"{supported_model_types()} (a Hugging Face *ForConditionalGeneration or its base *Model)")
    return importlib.import_module(f".{ADAPTERS[model_type]}", __name__).ADAPTER


def is_applied(model) -> bool:
    """Whether `autoselect.apply` patched this model instance (and it was not reverted)."""
    return PATCH_ATTR in getattr(model, "__dict__", {})


def apply(model, selector=None, *, method: str = "autoselect", keep: Union[int, float] = 64, **options):
    """Prune the visual tokens of `model` (per instance) and return it.

    Args:
        model: a Hugging Face LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL model
            (`*ForConditionalGeneration`, or the base `*Model`), as loaded by the user.
        selector: for method="autoselect": an `autoselect.AutoSelector` (or any object with
            `select(x, k) -> (kept, index)` as `autoselect.select_topk`), or the path of a folder saved
            with `AutoSelector.save_pretrained`. Must be None for the baselines.
        method: "autoselect", or a training-free baseline: "random", "norm", "fastv", "visionzip",
            "divprune" (see `autoselect.baselines`).
        keep: tokens kept per image: an int >= 1, or a float in (0, 1] (a fraction of each image's
            tokens). LLaVA-NeXT: per image (base view + crops + newlines together), not per crop.
        **options: method options: random `seed=0`; fastv `layer=2` (FastV's K); visionzip
            `contextual=None` (contextual tokens; default round(K * 10 / 64)).

    Returns: the same model object. A call with images then keeps K tokens per image; `generate()`,
    a plain forward (with labels) and the KV cache see only text + kept tokens.

    Raises: ValueError for an unsupported model type (listing the supported ones), an unknown method,
    a bad `keep` (checked again per image at run time: keep > N is an error), a missing selector;
    RuntimeError if the model is already patched (call `autoselect.revert(model)` first).
    """
    adapter = get_adapter(model)
    if is_applied(model):
        raise RuntimeError("autoselect.apply: this model is already patched; call autoselect.revert(model) first "
                           "(or use the autoselect.pruned(...) context manager)")
    _check_keep(keep)
    from ..baselines import make_method

    method_obj = make_method(method, selector, **options)
    if method == "autoselect":
        _place_selector(method_obj.selector, model)
    patch = Patch(adapter=adapter, method=method_obj, keep=keep, original_forward=model.forward)
    _set(patch, model, "forward", make_forward(model, patch))
    if method_obj.needs_vision_attention:
        core = adapter.core(model)
        _set(patch, core, "get_image_features", make_image_features(core, patch))
    object.__setattr__(model, PATCH_ATTR, patch)
    return model


def _set(patch, obj, name, value):
    """Set an instance attribute and remember what was there, for an exact revert."""
    patch.saved_attrs.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
    object.__setattr__(obj, name, value)


def revert(model):
    """Undo `apply` on this instance exactly: `model.forward` and `model.__dict__` are as before.
    Returns the model. Raises RuntimeError if the model is not patched."""
    if not is_applied(model):
        raise RuntimeError("autoselect.revert: this model is not patched by autoselect.apply")
    patch = model.__dict__[PATCH_ATTR]
    for obj, name, had, previous in reversed(patch.saved_attrs):
        if had:
            object.__setattr__(obj, name, previous)
        else:
            del obj.__dict__[name]
    del model.__dict__[PATCH_ATTR]
    return model


@contextlib.contextmanager
def pruned(model, selector=None, *, method: str = "autoselect", keep: Union[int, float] = 64, **options):
    """Context manager form of `apply`: `with autoselect.pruned(model, keep=64) as m: m.generate(...)`;
    the model is reverted on exit, also when the block raises. Arguments as `apply`."""
    apply(model, selector, method=method, keep=keep, **options)
    try:
        yield model
    finally:
        revert(model)


def last_selection(model):
    """What the last pruned prefill kept: a `Selection` with, per image (placeholder order over
    (batch, sequence)), `index` (kept token indices, ascending) and `num_tokens` (N), and
    `keep_columns` (B, L) bool over the unpruned prompt. None before the first call."""
    if not is_applied(model):
        raise RuntimeError("autoselect.last_selection: this model is not patched by autoselect.apply")
    return model.__dict__[PATCH_ATTR].selection


def _check_keep(keep):
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"autoselect.apply: keep must be an int (tokens per image) or a float in (0, 1] "
                        f"(fraction), got {type(keep).__name__}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"autoselect.apply: keep must be >= 1 token per image, got {keep}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"autoselect.apply: a fractional keep must lie in (0, 1], got {keep}")


def _place_selector(selector, model):
    """Put an nn.Module selector on the model's device, in eval mode (it is not registered as a
    submodule, so the model's state_dict and save_pretrained are unchanged)."""
    import torch

    if isinstance(selector, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            selector.to(device)
        selector.eval()


__all__ = ["ADAPTERS", "apply", "get_adapter", "is_applied", "last_selection", "pruned", "revert",
           "supported_model_types"]
