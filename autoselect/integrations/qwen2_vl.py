"""Qwen2-VL and Qwen2.5-VL (`model_type` in {"qwen2_vl", "qwen2_5_vl"}), M-RoPE.

Where: `Qwen2VLModel.get_image_features` runs the vision transformer and its 2x2 patch merger; the
forward `masked_scatter`s the merged tokens into the `<|image_pad|>` placeholders. We prune the
merged tokens of each image (K per image; the image's N = t * h * w / merge^2).

Positions (M-RoPE): every token has a (temporal, height, width) position; `get_rope_index` computes
them from the placeholder layout of the UNPRUNED prompt, so we compute them there (or take the ones
`generate` computed, shape (4, B, L): text positions + the three M-RoPE rows), keep the kept columns,
and set `model.rope_deltas` from the unpruned sequence exactly as the unpatched model does. Decoding
then continues with `generate`'s unpruned positions (last + 1), or, in a manual loop without
position_ids, with (unpruned cache length + step) + rope_deltas, which is what the unpatched model
would compute. Videos are encoded but not pruned.
"""

import torch
from torch import Tensor

from .llava import LlavaAdapter


class Qwen2VLAdapter(LlavaAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    encoded_inputs = ("pixel_values", "pixel_values_videos")
    per_token_inputs = ("mm_token_type_ids", "token_type_ids")

    def core(self, model):
        if hasattr(model, "language_model") and hasattr(model, "get_rope_index"):
            return model
        return model.model

    def pad_token_id(self, core) -> int:
        pad = getattr(core.config.get_text_config(), "pad_token_id", None)
        avoid = {self.image_token_id(core), getattr(core.config, "video_token_id", None)}
        if pad is None or pad in avoid:
            pad = next(i for i in range(3) if i not in avoid)
        return int(pad)

    def has_images(self, kw) -> bool:
        pixels = kw.get("pixel_values")
        if pixels is not None and pixels.numel() > 0:
            return True
        return bool(kw.get("mm_encoder_outputs")) and kw["mm_encoder_outputs"].get("image") is not None

    def _get_image_features(self, core, kw):
        return core.get_image_features(kw["pixel_values"], kw.get("image_grid_thw"), return_dict=True)

    def vision_attention_module(self, core):
        return core.visual.blocks[-1].attn

    def vision_stats(self, core, call_kw, captured, features):
        """VisionZip statistics per image (merged-token order of the features): attention received in
        the last vision block and keys, see `autoselect.baselines.visionzip.qwen_attention_stats`."""
        from ..baselines.visionzip import qwen_attention_stats

        visual = core.visual
        scores, keys = qwen_attention_stats(visual.blocks[-1].attn, captured[-1], visual.spatial_merge_size)
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: blocks see the patches in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(call_kw["image_grid_thw"],
                                                      spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size, patch_size=visual.patch_size)
            reverse = torch.argsort(window_index.to(scores.device))
            scores, keys = scores[reverse], keys[reverse]
        sizes = [f.shape[0] for f in features]
        return list(zip(torch.split(scores, sizes), torch.split(keys, sizes)))

    def extra_encoded(self, core, kw) -> dict:
        videos = kw.get("pixel_values_videos")
        if videos is None:
            return {}
        return {"video": core.get_video_features(videos, kw.get("video_grid_thw"), return_dict=True)}

    def prefill_positions(self, core, kw) -> Tensor:
        """(3, B, L) M-RoPE positions of the unpruned prompt (or the caller's, e.g. generate's (4, B, L));
        sets `rope_deltas` as the unpatched forward does."""
        if kw.get("position_ids") is not None:
            return kw["position_ids"]
        ids = kw["input_ids"]
        extra = {}
        if kw.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kw["second_per_grid_ts"]
        positions = core.compute_3d_position_ids(
            input_ids=ids, inputs_embeds=torch.empty(ids.shape[0], ids.shape[1], 0, device=ids.device),
            image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw.get("video_grid_thw"),
            attention_mask=kw.get("attention_mask"), cache=kw.get("cache"),
            mm_token_type_ids=kw.get("mm_token_type_ids"), **extra)
        if positions is None:
            positions = super().prefill_positions(core, kw).unsqueeze(0).expand(3, -1, -1)
        return positions

    def decode_positions(self, core, unpruned_mask, past: int, q: int, batch: int, device) -> Tensor:
        if unpruned_mask is not None:
            text = unpruned_mask.long().cumsum(-1) - 1
            text = text.masked_fill(unpruned_mask == 0, 0)[:, -q:]
        else:
            text = (torch.arange(q, device=device) + past).unsqueeze(0).expand(batch, -1)
        positions = text.unsqueeze(0).expand(3, -1, -1)
        if core.rope_deltas is not None:
            delta = core.rope_deltas.repeat_interleave(batch // core.rope_deltas.shape[0], dim=0)
            positions = positions + delta.to(positions.device)
        return positions


ADAPTER = Qwen2VLAdapter()
