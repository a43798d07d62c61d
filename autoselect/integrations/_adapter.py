"""The interface between the family-independent core and one VLM family (DESIGN.md 5).

A family adapter answers three questions about a Hugging Face model, and nothing else:

1. Where are the vision features? `core(model)` (the inner model that owns the vision tower, the
   projector and the language model), `image_features(core, kw)` (the model's own
   `get_image_features` call: per image (N_i, D), as the projector gives them), the placeholder id
   and the inputs consumed by the encoding (`encoded_inputs`) or shrunk with input_ids
   (`per_token_inputs`).
2. How do positions work? `prefill_positions` (positions of the UNPRUNED prompt, as the unpatched
   model would compute them), `decode_positions` (positions of new tokens after an unpruned past)
   and the per-cache decoding state the model keeps on itself (`save_decode_state` /
   `restore_decode_state`: Qwen's rope deltas).
3. Where does a selector read the tokens? `placements` (the points of DESIGN.md 1 this family
   offers, the family's default first: LLaVA "projector_input", Qwen "projector_output", i.e. after
   the merger), `feature_width(core, placement)`, the `projector(core)` module and
   `projector_input_features` (the projector's captured input -> per image (N_i, D_in), aligned with
   the projector's output features).
4. Which signals can a selection method read? The language model (`language_model(core)`), the
   attention of the vision layer that produces the selected features (`vision_attention_module`,
   `vision_attention_inputs`: queries and keys per tower sequence) and the map from tower tokens to
   feature tokens (`tower_to_features`: CLS tokens dropped, LLaVA-NeXT packing, Qwen's 2x2 merge).

Methods never see a family: they ask the adapter. A new family is one file with a subclass and an
`ADAPTER` instance, plus one line in `autoselect.integrations.ADAPTERS`.
"""

import contextlib
from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor


@contextlib.contextmanager
def capture_inputs(module):
    """Record the inputs of every call of `module` while active: yields a list; each entry is
    (hidden_states, the other keyword inputs), detached."""
    captured = []

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class InputCapture:
    """A method's capture of one module's inputs while the patched model encodes the images: a
    subclass names the module (`module()`, through the adapter) and turns what was recorded into per
    image tensors (`finish(features)`). Used as a context manager around the encoding."""

    def __init__(self, adapter, core, call_kw):
        self.adapter, self.core, self.call_kw = adapter, core, call_kw

    def module(self):
        raise NotImplementedError

    def __enter__(self):
        self._capture = capture_inputs(self.module())
        self.captured = self._capture.__enter__()
        return self

    def __exit__(self, *exc):
        return self._capture.__exit__(*exc)


class FamilyAdapter:
    """What differs between VLM families, behind one small interface (see the module docstring).
    Subclasses set `name`, `model_types` and override what their family does differently."""

    name = "base"
    model_types: Tuple[str, ...] = ()
    encoded_inputs: Tuple[str, ...] = ("pixel_values",)  # consumed by the encoding, replaced by mm_encoder_outputs
    per_token_inputs: Tuple[str, ...] = ("token_type_ids",)  # (B, L) inputs shrunk with input_ids
    # where a selector may read the tokens (DESIGN.md 1); the first is the family's default
    placements: Tuple[str, ...] = ("projector_output",)

    # -- where the vision features are ----------------------------------------------------------

    def core(self, model):
        """The inner model that owns `get_image_features`, the vision tower and the language model."""
        raise NotImplementedError

    def image_token_id(self, core) -> int:
        return int(core.config.image_token_id)

    def pad_token_id(self, core) -> int:
        """The id written into alignment slots (masked out; anything but a placeholder id)."""
        pad = getattr(core.config.get_text_config(), "pad_token_id", None)
        avoid = {self.image_token_id(core), getattr(core.config, "video_token_id", None)}
        if pad is None or pad in avoid:
            pad = next(i for i in range(3) if i not in avoid)
        return int(pad)

    def language_model(self, core):
        return core.language_model

    def has_images(self, kw) -> bool:
        """Whether a forward call carries images (raw pixels or pre-encoded image features)."""
        pixels = kw.get("pixel_values")
        if pixels is not None and pixels.numel() > 0:
            return True
        return bool(kw.get("mm_encoder_outputs")) and kw["mm_encoder_outputs"].get("image") is not None

    def image_features(self, core, kw):
        """The model's own `get_image_features` on the call's pixels (return_dict=True)."""
        raise NotImplementedError

    def encode(self, core, kw):
        """The image features as the original forward would compute them (or the caller's pre-encoded
        `mm_encoder_outputs["image"]`, as `generate` passes them): an output object whose
        `pooler_output` is a list (or tuple) of (N_i, D), one per image."""
        given = (kw.get("mm_encoder_outputs") or {}).get("image")
        return given if given is not None and kw.get("pixel_values") is None else self.image_features(core, kw)

    def extra_encoded(self, core, kw) -> dict:
        """Other modalities the call carries, encoded here and passed through unpruned (Qwen videos)."""
        return {}

    # -- where a selector reads the tokens ----------------------------------------------------------

    def projector(self, core):
        """The module that maps the selected vision features to language-model tokens."""
        raise NotImplementedError(f"autoselect: the {self.name} adapter exposes no projector")

    def feature_width(self, core, placement: str) -> int:
        """The token width D at `placement` (one of `placements`)."""
        if placement == "projector_output":
            return int(core.config.get_text_config().hidden_size)
        raise ValueError(f"autoselect: the {self.name} family has no placement {placement!r}; it offers "
                         f"{', '.join(self.placements)}")

    def projector_input_features(self, core, call_kw, captured: Tensor, features: Sequence[Tensor]) -> List[Tensor]:
        """The projector's input of one `get_image_features` call (as captured by a forward pre-hook
        on `projector(core)`) -> per image (N_i, D_in), aligned with `features` (the projector's
        output per image); rows of feature tokens the projector does not produce (LLaVA-NeXT's
        newlines) hold NaN."""
        raise NotImplementedError(f"autoselect: the {self.name} adapter has no projector_input placement")

    # -- how positions work ----------------------------------------------------------------------

    def prefill_positions(self, core, kw) -> Tensor:
        """Position ids of the unpruned prompt: the caller's, or the language model's default."""
        if kw.get("position_ids") is not None:
            return kw["position_ids"]
        ids = kw["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)

    def decode_positions(self, core, unpruned_mask, past: int, q: int, batch: int, device, saved=None) -> Tensor:
        """Positions of q new tokens after `past` unpruned ones, as the language model's default
        (arange after the cache) would give them without pruning."""
        return (torch.arange(q, device=device) + past).unsqueeze(0).expand(batch, -1)

    def save_decode_state(self, core) -> Any:
        """What the model keeps on itself between a prefill and its decode steps (None: nothing)."""
        return None

    def restore_decode_state(self, core, saved) -> None:
        """Put back what `save_decode_state` returned, before a decode step of that prefill's cache."""

    # -- signals a selection method may read ---------------------------------------------------------

    def vision_attention_module(self, core):
        """The attention module of the vision layer whose output becomes the selected features."""
        raise NotImplementedError(f"autoselect: the {self.name} adapter exposes no vision attention")

    def vision_attention_inputs(self, core, captured) -> Tuple[Tensor, Tensor, List[Tuple[int, int]], float, Any]:
        """From one captured call of `vision_attention_module` (hidden, kwargs): queries and keys
        (H, S, d) float32 over every tower token of the call (rotary applied), the (start, end) of each
        attention sequence (a crop, an image), the softmax scale, and the index of the CLS token in
        each sequence (None: the tower has none)."""
        raise NotImplementedError(f"autoselect: the {self.name} adapter exposes no vision attention")

    def tower_to_features(self, core, call_kw, values: Tensor, features: Sequence[Tensor]) -> List[Tensor]:
        """Per-tower-token values (S, ...) in the order of `vision_attention_inputs` -> per image
        (N_i, G, ...) aligned with `features`: G tower tokens feed each feature token (1, or Qwen's
        merge^2); feature tokens no tower token feeds (LLaVA-NeXT's newlines) hold NaN."""
        raise NotImplementedError(f"autoselect: the {self.name} adapter maps no tower tokens")
