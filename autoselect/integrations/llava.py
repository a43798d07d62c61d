"""LLaVA-1.5 (`model_type == "llava"`, `LlavaForConditionalGeneration` / `LlavaModel`).

Where: `LlavaModel.forward` computes `get_image_features` (CLIP tower -> `vision_feature_layer` ->
CLS dropped -> projector), then `masked_scatter`s them into the `<image>` placeholders. We call the
same `get_image_features`, keep K of the 576 tokens per image, drop the other placeholder columns and
hand the kept features to the original forward as pre-encoded `mm_encoder_outputs`.

Positions: a Llama language model takes 1-D positions; unpatched, `generate` gives the cumsum of the
attention mask and a plain forward uses arange(L). We keep the kept columns of either, and decoding
continues at the unpruned length (so a text token sees each kept image token at its original distance).
"""

import torch
from torch import Tensor


class LlavaAdapter:
    """The LLaVA family adapter: what differs between VLM families, behind one small interface."""

    name = "llava"
    model_types = ("llava",)
    encoded_inputs = ("pixel_values",)  # consumed by the encoding, replaced by mm_encoder_outputs
    per_token_inputs = ("token_type_ids",)  # (B, L) inputs shrunk with input_ids

    # -- structure ---------------------------------------------------------------------------------

    def core(self, model):
        """The inner model that owns `get_image_features`, the vision tower and the language model."""
        if hasattr(model, "language_model") and hasattr(model, "get_placeholder_mask"):
            return model
        return model.model

    def image_token_id(self, core) -> int:
        return int(core.config.image_token_id)

    def pad_token_id(self, core) -> int:
        """The id written into alignment slots (masked out; anything but the image token)."""
        pad = getattr(core.config.get_text_config(), "pad_token_id", None)
        image = self.image_token_id(core)
        if pad is None or pad == image:
            pad = 0 if image != 0 else 1
        return int(pad)

    def language_model(self, core):
        return core.language_model

    def vision_layer_index(self, core) -> int:
        """Index into the tower's encoder layers of the layer whose output is the selected feature."""
        layer = core.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        num_layers = len(self.vision_layers(core))
        return (layer % (num_layers + 1)) - 1

    def vision_layers(self, core):
        tower = core.vision_tower
        model = getattr(tower, "vision_model", tower)
        return model.encoder.layers

    # -- prefill -----------------------------------------------------------------------------------

    def has_images(self, kw) -> bool:
        pixels = kw.get("pixel_values")
        if pixels is not None and pixels.numel() > 0:
            return True
        return bool(kw.get("mm_encoder_outputs")) and kw["mm_encoder_outputs"].get("image") is not None

    def _get_image_features(self, core, kw):
        return core.get_image_features(
            pixel_values=kw["pixel_values"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            image_sizes=kw.get("image_sizes"),
            return_dict=True,
        )

    def encode(self, core, kw):
        """The image features as the original forward would compute them (or the caller's pre-encoded
        `mm_encoder_outputs["image"]`, as `generate` passes them): an output object whose
        `pooler_output` is a list (or tuple) of (N_i, D), one per image."""
        given = (kw.get("mm_encoder_outputs") or {}).get("image")
        return given if given is not None and kw.get("pixel_values") is None else self._get_image_features(core, kw)

    def vision_attention_module(self, core):
        """The attention module whose inputs VisionZip's statistics are computed from."""
        return self.vision_layers(core)[self.vision_layer_index(core)].self_attn

    def vision_stats(self, core, call_kw, captured, features):
        """VisionZip statistics per image, aligned with `features` (list of (N_i, D)): a list of
        (dominant scores (N_i,), keys (N_i, d)), from the captured inputs of the attention module."""
        from ..baselines.visionzip import clip_attention_stats

        scores, keys = clip_attention_stats(self.vision_attention_module(core), captured[-1])  # (P, T), (P, T, d)
        return self.map_vision_stats(core, call_kw, scores, keys, features)

    def _strategy(self, core, kw):
        strategy = kw.get("vision_feature_select_strategy")
        return strategy if strategy is not None else core.config.vision_feature_select_strategy

    def map_vision_stats(self, core, kw, scores: Tensor, keys: Tensor, features):
        """Per-tower-token statistics (P, T) -> per image (N_i,) aligned with the features."""
        if self._strategy(core, kw) == "default":
            scores, keys = scores[:, 1:], keys[:, 1:]
        stats = [(s, k) for s, k in zip(scores, keys)]
        if len(stats) != len(features):
            raise ValueError("autoselect visionzip: vision tower rows and images do not line up")
        return stats

    def extra_encoded(self, core, kw) -> dict:
        return {}

    def prefill_positions(self, core, kw) -> Tensor:
        """Position ids of the unpruned prompt: the caller's, or the language model's default."""
        if kw.get("position_ids") is not None:
            return kw["position_ids"]
        ids = kw["input_ids"]
        cache = kw.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(ids.shape[1], device=ids.device) + past).unsqueeze(0).expand(ids.shape[0], -1)

    # -- decode ------------------------------------------------------------------------------------

    def decode_positions(self, core, unpruned_mask, past: int, q: int, batch: int, device) -> Tensor:
        """Positions of q new tokens after `past` unpruned ones, as the language model's default
        (arange after the cache) would give them without pruning."""
        return (torch.arange(q, device=device) + past).unsqueeze(0).expand(batch, -1)


ADAPTER = LlavaAdapter()
