"""Drop-in visual-token pruning for Hugging Face VLMs (DESIGN.md 4 and 5), on unmodified transformers.

    model = autoselect.apply(model, selector, keep=64)          # or method="fastv", "visionzip", ...
    out = model.generate(**inputs, max_new_tokens=32)            # as usual, with fewer visual tokens
    autoselect.revert(model)                                     # exactly the model it was

    with autoselect.pruned(model, method="divprune", keep=0.25):  # the same, reverted on exit
        ...

The patch is per instance: `model.forward`, `model.generate` and `model.prepare_inputs_for_generation`
become instance attributes (and, for a method that records a signal while the images are encoded,
the inner model's `get_image_features`); the class, the module globals and every other model are
untouched; one record `model._autoselect_patch` holds what was there; `revert` restores it all.
The family adapter comes from `config.model_type` through `ADAPTERS` (one small file per family,
a subclass of `FamilyAdapter`); the method from `autoselect.baselines.BASELINES` (one file per
method). Supported transformers: >= 5.24, < 6 (the `cache=` argument of 5.24 and `mm_encoder_outputs`;
5.18-5.23 ignore `cache=` and decode without the prompt's cache, 5.17 drops `mm_encoder_outputs`: the
integration tests fail on each, `make test-transformers-floor` runs them on the floor).
"""

import contextlib
import importlib
from typing import Union

from ._adapter import FamilyAdapter, capture_inputs
from ._core import (Patch, make_forward, make_generate, make_image_features, make_prepare_inputs,
                    normalize_keep)

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


POSITIONS = ("original", "compact")
COMPACT_FAMILIES = ("llava", "llava_next")


def apply(model, selector=None, *, method: str = "autoselect", keep: Union[int, float] = 64,
          positions: str = "original", **options):
    """Prune the visual tokens of `model` (per instance) and return it.

    Args:
        model: a Hugging Face LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL model
            (`*ForConditionalGeneration`, or the base `*Model`), as loaded by the user.
        selector: for method="autoselect": an `autoselect.AutoSelector` (or any object with
            `select(x, k) -> (kept, index)` as `autoselect.select_topk`), or the path of a folder saved
            with `AutoSelector.save_pretrained`. Must be None for the baselines.
        method: "autoselect", or a training-free baseline: "random", "norm", "fastv", "visionzip",
            "divprune" (see `autoselect.baselines`).
        keep: tokens kept per image: an integer >= 1 (any integral type: int, numpy integers, an
            integer torch scalar; an image with fewer tokens keeps them all), or a real in (0, 1]
            (a fraction of each image's tokens). LLaVA-NeXT: per image (base view + crops + newlines
            together), not per crop.
        positions: "original" (default): the kept tokens and the text keep the positions of the
            unpruned prompt (decoding continues at the unpruned length); "compact": the pruned prompt's
            own positions (each token moves back by the tokens dropped before it; decoding continues at
            the pruned length), as vLLM serves a pruned prompt (`autoselect.vllm`). 1-D position
            families only (LLaVA-1.5, LLaVA-NeXT): Qwen's M-RoPE keeps the original positions, in
            vLLM too.
        **options: method options: random `seed=0`; fastv `layer=2` (FastV's K, counted from 1, at most
            the number of language-model layers); visionzip `contextual=None` (contextual tokens;
            default round(K * 10 / 64)).

    Returns: the same model object. A call with images then keeps K tokens per image; `generate()`,
    a plain forward (with labels, gradients reaching the kept tokens) and the KV cache see only text +
    kept tokens.

    The selector scores the tokens at the placement its config records (`selector.config["placement"]`:
    "projector_input", the features the projector receives (LLaVA-1.5 / NeXT), or "projector_output",
    its output (Qwen's merger output; the first release's selectors, whose configs have none)); the same
    indices prune the projector's output.

    Raises: ValueError for a selector trained at a placement this family does not offer or with another
    token width there (naming both), for an unsupported model type (listing the supported ones), an unknown method,
    a bad `keep` or method option (checked against the model, e.g. FastV's layer), a missing selector;
    TypeError for a keep that is not a number; RuntimeError if the model is already patched (call
    `autoselect.revert(model)` first). At run time, ValueError for what pruning cannot support (see
    `autoselect.integrations._core`): static caches, chunked prefill, images in a call that continues
    a non-empty cache.
    """
    adapter = get_adapter(model)
    if is_applied(model):
        raise RuntimeError("autoselect.apply: this model is already patched; call autoselect.revert(model) first "
                           "(or use the autoselect.pruned(...) context manager)")
    keep = normalize_keep(keep)
    if positions not in POSITIONS:
        raise ValueError(f"autoselect.apply: positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "compact" and adapter.name not in COMPACT_FAMILIES:
        raise ValueError(f"autoselect.apply: positions='compact' is for 1-D position families "
                         f"({', '.join(COMPACT_FAMILIES)}); a {adapter.name} model keeps its original (M-RoPE) "
                         "positions, in vLLM too")
    from ..baselines import make_method

    method_obj = make_method(method, selector, **options)
    if method == "autoselect":  # the selector reads the tokens at its placement (checked by bind)
        from ._selector import PlacedSelectorMethod

        method_obj = PlacedSelectorMethod(method_obj.selector)
    core = adapter.core(model)
    bind = getattr(method_obj, "bind", None)
    if bind is not None:
        bind(adapter, core)  # validates the method's options against this model
    if method == "autoselect":
        _place_selector(method_obj.selector, model)
    patch = Patch(adapter=adapter, method=method_obj, keep=keep, original_forward=model.forward, positions=positions)
    _set(patch, model, "forward", make_forward(model, patch))
    if callable(getattr(model, "generate", None)):
        _set(patch, model, "generate", make_generate(model, patch))
    if callable(getattr(model, "prepare_inputs_for_generation", None)):
        _set(patch, model, "prepare_inputs_for_generation", make_prepare_inputs(model, patch))
    capture = getattr(method_obj, "encoding_capture", None)
    capture = capture(adapter, core) if capture is not None else None
    if capture is not None:
        _set(patch, core, "get_image_features", make_image_features(core, patch, capture))
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
def pruned(model, selector=None, *, method: str = "autoselect", keep: Union[int, float] = 64,
           positions: str = "original", **options):
    """Context manager form of `apply`: `with autoselect.pruned(model, keep=64) as m: m.generate(...)`;
    the model is reverted on exit, also when the block raises. Arguments as `apply`."""
    apply(model, selector, method=method, keep=keep, positions=positions, **options)
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


def _place_selector(selector, model):
    """Put an nn.Module selector on the model's device, in eval mode (it is not registered as a
    submodule, so the model's state_dict and save_pretrained are unchanged)."""
    import torch

    if isinstance(selector, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            selector.to(device)
        selector.eval()


__all__ = ["ADAPTERS", "FamilyAdapter", "apply", "capture_inputs", "get_adapter", "is_applied", "last_selection", "pruned", "revert",
           "supported_model_types"]
