"""LLaVA-1.5 (`model_type == "llava"`, `LlavaForConditionalGeneration` / `LlavaModel`).

Where: `LlavaModel.forward` computes `get_image_features` (CLIP tower -> `vision_feature_layer` ->
CLS dropped -> projector), then `masked_scatter`s them into the `<image>` placeholders. We call the
same `get_image_features`, keep K of the 576 tokens per image, drop the other placeholder columns and
hand the kept features to the original forward as pre-encoded `mm_encoder_outputs`.

Positions: a Llama language model takes 1-D positions; unpatched, `generate` gives the cumsum of the
attention mask and a plain forward uses arange(L). We keep the kept columns of either, and decoding
continues at the unpruned length (so a text token sees each kept image token at its original distance).

Placements: "projector_input" (default: the `vision_feature_layer` features after the select strategy,
CLS dropped for "default", as `multi_modal_projector` receives them; the PAPER's "Pre") and
"projector_output" (the projector's output, the first release's selectors). The projector acts per
token, so indices chosen on its input prune its output.

Signals: the attention of the CLIP layer at `vision_feature_layer` (one sequence per image, CLS first).
"""

import torch
from torch import Tensor

from ._adapter import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    name = "llava"
    model_types = ("llava",)
    placements = ("projector_input", "projector_output")

    def core(self, model):
        if hasattr(model, "language_model") and hasattr(model, "get_placeholder_mask"):
            return model
        return model.model

    def image_features(self, core, kw):
        return core.get_image_features(
            pixel_values=kw["pixel_values"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            image_sizes=kw.get("image_sizes"),
            return_dict=True,
        )

    # -- placements --------------------------------------------------------------------------------

    def projector(self, core):
        return core.multi_modal_projector

    def feature_width(self, core, placement: str) -> int:
        if placement == "projector_input":
            first = getattr(self.projector(core), "linear_1", None)
            if first is not None and hasattr(first, "in_features"):
                return int(first.in_features)
            vision = core.config.vision_config
            layers = core.config.vision_feature_layer
            return int(vision.hidden_size) * (len(layers) if isinstance(layers, (list, tuple)) else 1)
        return super().feature_width(core, placement)

    def projector_input_features(self, core, call_kw, captured, features):
        per_image = list(captured)  # (B, N, D_in): one row per image
        if len(per_image) != len(features) or any(x.shape[0] != f.shape[0] for x, f in zip(per_image, features)):
            raise ValueError("autoselect: the projector's input and the image features do not line up "
                             f"({tuple(captured.shape)} for {[tuple(f.shape) for f in features]})")
        return per_image

    # -- signals -----------------------------------------------------------------------------------

    def vision_layers(self, core):
        tower = core.vision_tower
        model = getattr(tower, "vision_model", tower)
        return model.encoder.layers

    def vision_layer_index(self, core) -> int:
        """Index into the tower's encoder layers of the layer whose output is the selected feature."""
        layer = core.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        num_layers = len(self.vision_layers(core))
        return (layer % (num_layers + 1)) - 1

    def vision_attention_module(self, core):
        return self.vision_layers(core)[self.vision_layer_index(core)].self_attn

    def vision_attention_inputs(self, core, captured):
        attn = self.vision_attention_module(core)
        hidden = captured[0]  # (P, T, C): one CLIP sequence per image (or crop)
        p, t, _ = hidden.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q = attn.q_proj(hidden).view(p * t, heads, head_dim).transpose(0, 1).to(torch.float32)
        k = attn.k_proj(hidden).view(p * t, heads, head_dim).transpose(0, 1).to(torch.float32)
        segments = [(i * t, (i + 1) * t) for i in range(p)]
        return q, k, segments, float(getattr(attn, "scale", head_dim ** -0.5)), 0

    def strategy(self, core, kw):
        strategy = kw.get("vision_feature_select_strategy")
        return strategy if strategy is not None else core.config.vision_feature_select_strategy

    def tower_sequences(self, core, call_kw, values: Tensor) -> Tensor:
        """(S, ...) -> (P, T', ...): per tower sequence (CLS + patches), the CLS token dropped as the
        features drop it."""
        vision = core.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        values = values.reshape(-1, tokens, *values.shape[1:])
        return values[:, 1:] if self.strategy(core, call_kw) == "default" else values

    def tower_to_features(self, core, call_kw, values, features):
        mapped = self.tower_sequences(core, call_kw, values)
        if mapped.shape[0] != len(features) or any(m.shape[0] != f.shape[0] for m, f in zip(mapped, features)):
            raise ValueError("autoselect: vision tower sequences and images do not line up")
        return [m.unsqueeze(1) for m in mapped]


ADAPTER = LlavaAdapter()
