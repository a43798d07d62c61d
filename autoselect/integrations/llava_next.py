"""LLaVA-NeXT (`model_type == "llava_next"`, anyres).

Where: `LlavaNextModel.get_image_features` runs the CLIP tower on the base view and every anyres crop,
projects, and `pack_image_features` lays each image out as [base view (576 tokens); the crops stitched
into one grid, unpadded to the image's aspect ratio, each grid row ended by the learned
`image_newline` token]. We prune that packed sequence, just before `masked_scatter`.

K is per IMAGE, not per crop: `keep=64` keeps 64 of the image's whole packed sequence (base view,
crops and newline tokens together). Why: (1) the budget is what the language model pays for, and
it pays per image; the number of crops (and of valid tokens in each, after unpadding) changes with
the image's size, so a per-crop K would make the cost depend on the image's shape; (2) it lets the
selector spend its budget where the content is (a crop of empty background can get nothing); (3) it
matches how budgets are reported for LLaVA-NeXT (tokens per image). A fractional keep (e.g. 0.25)
keeps that fraction of each image's packed tokens. Newline tokens are candidates like any other
token (after pruning the grid's rows no longer exist, so they keep no special role); a score-based
method ranks them like the rest, VisionZip never takes them as dominant (no attention of their own).
"""

import torch

from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    model_types = ("llava_next",)

    def has_images(self, kw) -> bool:
        pixels = kw.get("pixel_values")
        if pixels is not None and pixels.size(0) > 0:
            return True
        return bool(kw.get("mm_encoder_outputs")) and kw["mm_encoder_outputs"].get("image") is not None

    def _get_image_features(self, core, kw):
        return core.get_image_features(
            kw["pixel_values"],
            kw.get("image_sizes"),
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            return_dict=True,
        )

    def map_vision_stats(self, core, kw, scores, keys, features):
        """Tower statistics per crop (P_total, T) -> per packed image token, through the model's own
        `pack_image_features` (the same reshape, unpad and newline layout as the features)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if self._strategy(core, kw) == "default":
            scores, keys = scores[:, 1:], keys[:, 1:]
        image_sizes = kw["image_sizes"]
        num_patches = [image_size_to_num_patches(image_size=s, grid_pinpoints=core.config.image_grid_pinpoints,
                                                 patch_size=core.config.vision_config.image_size)
                       for s in image_sizes]
        stacked = torch.cat([scores.unsqueeze(-1).to(keys.dtype), keys], dim=-1)  # (P, T, 1 + d)
        marker = torch.zeros(stacked.shape[-1], dtype=stacked.dtype, device=stacked.device)
        marker[0] = float("-inf")  # newline tokens: never dominant, zero key
        packed, _ = core.pack_image_features(list(torch.split(stacked, num_patches, dim=0)), image_sizes,
                                             vision_feature_select_strategy=self._strategy(core, kw),
                                             image_newline=marker)
        stats = [(p[:, 0], p[:, 1:]) for p in packed]
        if [s.shape[0] for s, _ in stats] != [f.shape[0] for f in features]:
            raise ValueError("autoselect visionzip: packed statistics and features do not line up")
        return stats


ADAPTER = LlavaNextAdapter()
