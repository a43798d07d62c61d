"""Qwen2-VL and Qwen2.5-VL (`model_type` in {"qwen2_vl", "qwen2_5_vl"}), M-RoPE.

Where: `Qwen2VLModel.get_image_features` runs the vision transformer and its 2x2 patch merger; the
forward `masked_scatter`s the merged tokens into the `<|image_pad|>` placeholders. We prune the
merged tokens of each image (K per image; the image's N = t * h * w / merge^2; an int K larger
than a small image's N keeps that image whole).

Positions (M-RoPE): every token has a (temporal, height, width) position; `get_rope_index` computes
them from the placeholder layout of the UNPRUNED prompt, so we compute them there (or take the ones
`generate` computed, shape (4, B, L): text positions + the three M-RoPE rows), keep the kept columns,
and set `model.rope_deltas` from the unpruned sequence exactly as the unpatched model does. The rope
deltas are saved with each pruned cache (`save_decode_state`) and put back before its decode steps,
so several caches can be in flight. Decoding continues with `generate`'s unpruned positions
(last + 1), or, in a manual loop without position_ids, with (unpruned cache length + step) +
rope_deltas, which is what the unpatched model would compute. Videos are encoded but not pruned.

Placement: "projector_output" only: the merger is Qwen's projector, and a selector scores the merged
tokens (one per language-model token), DESIGN.md 1.

Signals: the attention of the last vision block (one sequence per image, no CLS token; Qwen2.5-VL's
blocks see the patches in window order, `tower_to_features` undoes it), merge^2 patches per token.
"""

import sys

import torch
from torch import Tensor

from ._adapter import FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    encoded_inputs = ("pixel_values", "pixel_values_videos")
    per_token_inputs = ("mm_token_type_ids", "token_type_ids")

    def core(self, model):
        if hasattr(model, "language_model") and hasattr(model, "get_rope_index"):
            return model
        return model.model

    def image_features(self, core, kw):
        return core.get_image_features(kw["pixel_values"], kw.get("image_grid_thw"), return_dict=True)

    def extra_encoded(self, core, kw) -> dict:
        videos = kw.get("pixel_values_videos")
        if videos is None:
            return {}
        return {"video": core.get_video_features(videos, kw.get("video_grid_thw"), return_dict=True)}

    def projector(self, core):
        return core.visual.merger

    # -- positions ---------------------------------------------------------------------------------

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

    def decode_positions(self, core, unpruned_mask, past: int, q: int, batch: int, device, saved=None) -> Tensor:
        if unpruned_mask is not None:
            text = unpruned_mask.long().cumsum(-1) - 1
            text = text.masked_fill(unpruned_mask == 0, 0)[:, -q:]
        else:
            text = (torch.arange(q, device=device) + past).unsqueeze(0).expand(batch, -1)
        positions = text.unsqueeze(0).expand(3, -1, -1)
        deltas = saved if saved is not None else core.rope_deltas
        if deltas is not None:
            delta = deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
            positions = positions + delta.to(positions.device)
        return positions

    def save_decode_state(self, core):
        return core.rope_deltas

    def restore_decode_state(self, core, saved) -> None:
        core.rope_deltas = saved

    # -- signals -----------------------------------------------------------------------------------

    def vision_attention_module(self, core):
        return core.visual.blocks[-1].attn

    def vision_attention_inputs(self, core, captured):
        attn = self.vision_attention_module(core)
        hidden, kwargs = captured
        seq = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        cos, sin = kwargs["position_embeddings"]
        q, k = rotary(q, k, cos, sin)
        q, k = q.to(torch.float32).transpose(0, 1), k.to(torch.float32).transpose(0, 1)  # (H, S, d)
        bounds = kwargs["cu_seqlens"].tolist()
        return q, k, list(zip(bounds[:-1], bounds[1:])), float(attn.scaling), None

    def tower_to_features(self, core, call_kw, values, features):
        visual = core.visual
        unit = visual.spatial_merge_size ** 2
        merged = values.reshape(-1, unit, *values.shape[1:])  # patches of one merged token are contiguous
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: the blocks see the tokens in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(call_kw["image_grid_thw"],
                                                      spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size, patch_size=visual.patch_size)
            merged = merged[torch.argsort(window_index.to(merged.device))]
        sizes = [f.shape[0] for f in features]
        if sum(sizes) != merged.shape[0]:
            raise ValueError("autoselect: vision tower tokens and image features do not line up")
        return list(torch.split(merged, sizes))


ADAPTER = Qwen2VLAdapter()
