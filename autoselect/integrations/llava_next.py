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
keeps that fraction of each image's packed tokens; an int keep larger than an image's packed length
keeps the whole image. Newline tokens are candidates like any other token (after pruning the grid's
rows no longer exist, so they keep no special role); no tower token feeds them, so tower signals
(`tower_to_features`) hold NaN there.

Placement "projector_input" (the default, as for LLaVA-1.5): the crops' projector inputs are laid out
like the packed features (the model's own `pack_image_features`); the newline tokens have no projector
input, so a selector placed there never keeps them (it picks its K among the image's other tokens).
"""

import torch

from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    model_types = ("llava_next",)

    def image_features(self, core, kw):
        return core.get_image_features(
            kw["pixel_values"],
            kw.get("image_sizes"),
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            return_dict=True,
        )

    def tower_to_features(self, core, call_kw, values, features):
        """Per crop (P_total sequences) -> per packed image token, through the model's own
        `pack_image_features` (the same reshape, unpad and newline layout as the features)."""
        return self.pack_per_crop(core, call_kw, self.tower_sequences(core, call_kw, values), features)

    def projector_input_features(self, core, call_kw, captured, features):
        packed = self.pack_per_crop(core, call_kw, captured, features)
        return [p.squeeze(1).to(captured.dtype) for p in packed]

    def pack_per_crop(self, core, call_kw, per_crop, features):
        """(P_total, T', ...) per crop feature token -> per image (N_i, 1, ...) in the packed layout of
        `features`, NaN at the newline tokens."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        trailing = per_crop.shape[2:]
        flat = per_crop.reshape(per_crop.shape[0], per_crop.shape[1], -1).to(torch.float32)
        image_sizes = call_kw["image_sizes"]
        num_patches = [image_size_to_num_patches(image_size=s, grid_pinpoints=core.config.image_grid_pinpoints,
                                                 patch_size=core.config.vision_config.image_size)
                       for s in image_sizes]
        newline = torch.full((flat.shape[-1],), float("nan"), dtype=flat.dtype, device=flat.device)
        packed, _ = core.pack_image_features(list(torch.split(flat, num_patches, dim=0)), image_sizes,
                                             vision_feature_select_strategy=self.strategy(core, call_kw),
                                             image_newline=newline)
        if [p.shape[0] for p in packed] != [f.shape[0] for f in features]:
            raise ValueError("autoselect: packed tower tokens and image features do not line up")
        return [p.reshape(p.shape[0], 1, *trailing) for p in packed]


ADAPTER = LlavaNextAdapter()
