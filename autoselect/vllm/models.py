"""vLLM model classes that prune visual tokens: subclasses of vLLM's own, registered by the plugin
under the same architecture names (this module imports vLLM; `autoselect.vllm.register` loads it
lazily, by name).

Per family, three things change, and nothing else:

1. the multimodal processor counts K_i placeholders per image instead of N_i (`PrunedInfo`), so the
   scheduler, the KV cache and the encoder cache see the pruned prompt;
2. `embed_multimodal` encodes the images as vLLM does, then keeps K_i rows of each (`Pruner`);
3. positions: LLaVA's 1-D positions are vLLM's (the pruned prompt's token index: "compact", the same
   as `autoselect.apply(..., positions="compact")`); Qwen2-VL / Qwen2.5-VL keep the kept tokens'
   unpruned M-RoPE positions (the Hugging Face path's default): the prompt's layout is the unpruned
   one (`mrope_layout`) and the kept tokens' grid offsets ride with their embeddings to
   `recompute_mrope_positions`, the hook vLLM calls for models that prune multimodal tokens.

With no pruning configured the classes behave as vLLM's. LLaVA checkpoints saved by transformers 5.x
(`vision_tower.*`, without `vision_model.`) load either way.
"""

import dataclasses
from typing import Iterable, Tuple

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration,
                                                   LlavaNextMultiModalProcessor, LlavaNextProcessingInfo)
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from .config import WHERE, from_hf_config
from .select import POSITION_CHANNELS, Pruner, grid_offsets, mrope_layout, place_kept_tokens

# vLLM 0.32 enables its multimodal-pruning hook (`recompute_mrope_positions`) only while
# `video_pruning_rate` > 0; a rate this small makes Efficient Video Sampling keep every video token
MRoPE_HOOK_RATE = 1e-9


def _config_of(info):
    return from_hf_config(info.ctx.model_config.hf_config)


# ---------------------------------------------------------------------------------------------------
# LLaVA-1.5 and LLaVA-NeXT: 1-D positions, compact
# ---------------------------------------------------------------------------------------------------

class PrunedLlavaInfo(LlavaProcessingInfo):
    """LLaVA's processing info, counting K = budget(N) placeholders per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = _config_of(self)
        return n if config is None else config.budget(n)


class PrunedLlavaNextInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info, counting K = budget(N) per image (base view, crops and newlines
    together, as `autoselect.apply`)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = _config_of(self)
        return n if config is None else config.budget(n)


def _map_vision_tower_names(model, weights: Iterable[Tuple[str, torch.Tensor]]):
    """transformers 5.x saves LLaVA's CLIP / SigLIP tower as `vision_tower.*`; vLLM's tower module
    holds it under `vision_tower.vision_model.*`."""
    if not hasattr(getattr(model, "vision_tower", None), "vision_model"):
        yield from weights
        return
    for name, tensor in weights:
        for prefix in ("model.vision_tower.", "vision_tower."):
            if name.startswith(prefix) and not name[len(prefix):].startswith("vision_model."):
                name = prefix + "vision_model." + name[len(prefix):]
                break
        yield name, tensor


class _Configured:
    """The engine's pruning configuration on the model (`autoselect_config`; None: no pruning) and its
    `autoselect_pruner`, set by the family's `_init_pruner`."""

    autoselect_config = None
    autoselect_pruner = None

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # vLLM's model
        self._init_pruner(vllm_config)

    def _init_pruner(self, vllm_config):
        raise NotImplementedError

    def _read_config(self, vllm_config):
        self.autoselect_config = from_hf_config(vllm_config.model_config.hf_config)
        self.autoselect_pruner = None
        return self.autoselect_config


class _PrunedLlavaMixin(_Configured):
    """The pruning of LLaVA-like models: the tower's selected features -> projector -> K rows."""

    family = "llava"

    def _init_pruner(self, vllm_config):
        config = self._read_config(vllm_config)
        if config is None:
            return
        hf = vllm_config.model_config.hf_config
        if getattr(hf.vision_config, "model_type", None) == "pixtral":
            raise ValueError(f"{WHERE}: Pixtral towers are not supported (LLaVA-1.5 / NeXT with CLIP or SigLIP)")
        pruner = Pruner(config)
        pruner.check_width({"projector_input": int(hf.vision_config.hidden_size),
                            "projector_output": int(hf.text_config.hidden_size)}, self.family)
        self.autoselect_pruner = pruner

    def load_weights(self, weights):
        return super().load_weights(_map_vision_tower_names(self, weights))


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=PrunedLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class AutoSelectLlavaForConditionalGeneration(_PrunedLlavaMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with AutoSelect / baseline pruning (see the module docstring)."""

    def _process_image_input(self, image_input):
        pruner = self.autoselect_pruner
        if pruner is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)  # given embeddings are counted and kept whole
        features = self._process_image_pixels(image_input)
        features = list(features.unbind(0)) if isinstance(features, torch.Tensor) else list(features)
        sizes = [f.shape[0] for f in features]
        outputs = list(torch.split(self.multi_modal_projector(torch.cat(features)), sizes))
        index = pruner.select(outputs, features)
        return tuple(o.index_select(0, i.to(o.device)) for o, i in zip(outputs, index))


class AutoSelectLlavaNextForConditionalGeneration(_PrunedLlavaMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with pruning: K = budget(N) of each image's packed tokens (base view, crops,
    newlines). A projector_input selector needs the per-token projector inputs, which NeXT's packing
    does not keep: such a selector is refused; projector_output selectors and the baselines work."""

    family = "llava_next"

    def _init_pruner(self, vllm_config):
        super()._init_pruner(vllm_config)
        pruner = self.autoselect_pruner
        if pruner is not None and pruner.placement == "projector_input":
            raise ValueError(f"{WHERE}: LLaVA-NeXT in vLLM supports projector_output selectors and the "
                             "baselines; this selector reads the projector's input (use autoselect.apply)")

    def _process_image_input(self, image_input):
        embeds = super()._process_image_input(image_input)
        pruner = self.autoselect_pruner
        if pruner is None or image_input["type"] != "pixel_values":
            return embeds
        embeds = list(embeds)
        index = pruner.select(embeds)
        return [e.index_select(0, i.to(e.device)) for e, i in zip(embeds, index)]


MULTIMODAL_REGISTRY.register_processor(LlavaNextMultiModalProcessor, info=PrunedLlavaNextInfo,
                                       dummy_inputs=LlavaDummyInputsBuilder)(
    AutoSelectLlavaNextForConditionalGeneration)


# ---------------------------------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL: M-RoPE, the kept tokens keep their unpruned positions
# ---------------------------------------------------------------------------------------------------

class _QwenBudgetInfo:
    """Qwen's processing info, counting K = budget(N) per image (N after the 2x2 merge)."""

    def get_num_image_tokens(self, **kwargs) -> int:
        n = super().get_num_image_tokens(**kwargs)
        config = _config_of(self)
        return n if config is None else config.budget(n)


class PrunedQwen2VLInfo(_QwenBudgetInfo, Qwen2VLProcessingInfo):
    pass


class PrunedQwen2_5_VLInfo(_QwenBudgetInfo, Qwen2_5_VLProcessingInfo):
    pass


class _PrunedQwenProcessor:
    """Each image's placeholder becomes K image tokens; videos keep all theirs (the small
    video_pruning_rate that switches vLLM's pruning hook on must not make EVS drop any)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        config = _config_of(self.info)
        if config is None:
            return updates
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)

        def pruned(replace):
            def replacement(item_idx: int):
                tokens = list(replace(item_idx))
                return tokens[: config.budget(len(tokens))]
            return replacement

        def whole(replace):
            def replacement(item_idx: int):
                tokens = list(replace(item_idx))
                grid = out_mm_kwargs["video"][item_idx]["video_grid_thw"].data
                return tokens[:1] * (int(grid.prod()) // (merge * merge))
            return replacement

        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=(pruned if u.modality == "image" else whole)(u.replacement))
                for u in updates]


class PrunedQwen2VLProcessor(_PrunedQwenProcessor, Qwen2VLMultiModalProcessor):
    pass


class PrunedQwen2_5_VLProcessor(_PrunedQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


class _PrunedQwenMixin(_Configured):
    """Pruning for Qwen2-VL / Qwen2.5-VL (projector_output: the merger's output)."""

    supports_multimodal_pruning = True  # vLLM then calls recompute_mrope_positions (below)
    family = "qwen2_vl"

    def _init_pruner(self, vllm_config):
        config = self._read_config(vllm_config)
        if config is None:
            return
        mm = vllm_config.model_config.multimodal_config
        if mm is not None and mm.is_multimodal_pruning_enabled() and mm.video_pruning_rate != MRoPE_HOOK_RATE:
            raise ValueError(f"{WHERE}: image pruning and vLLM's video pruning (video_pruning_rate="
                             f"{mm.video_pruning_rate}) cannot be combined: both use the M-RoPE pruning hook")
        pruner = Pruner(config)
        pruner.check_width({"projector_output": int(vllm_config.model_config.hf_config.text_config.hidden_size)},
                           self.family)
        self.autoselect_pruner = pruner
        if mm is not None:
            mm.video_pruning_rate = MRoPE_HOOK_RATE

    def _merge(self):
        return int(self.config.vision_config.spatial_merge_size)

    def _process_image_input(self, image_input):
        embeds = super()._process_image_input(image_input)
        pruner = self.autoselect_pruner
        if pruner is None:
            return embeds
        embeds = list(embeds)
        grids = image_input["image_grid_thw"].tolist()
        index = pruner.select(embeds)
        merge = self._merge()
        out = []
        for e, i, (t, h, w) in zip(embeds, index, grids):
            i = i.to(e.device)
            offsets = grid_offsets(i, t, h // merge, w // merge).to(e.dtype)
            out.append(torch.cat([e.index_select(0, i), offsets], dim=1))
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.autoselect_pruner is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        items = []
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features)):
            n = t * h * w
            k = self.autoselect_pruner.budget(n) if feature.modality == "image" else n
            items.append((offset, t, h, w, k, t_factor))
        positions, delta = mrope_layout(len(input_tokens), items)
        return torch.from_numpy(positions), delta

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        width = int(self.config.text_config.hidden_size)
        device = mrope_positions.device
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
        ids = ids.to(device)
        out, offsets = [], []
        for emb in multimodal_embeddings:
            if emb.shape[-1] == width + POSITION_CHANNELS:  # a pruned image: strip its offsets
                out.append(emb[:, :width])
                offsets.append(emb[:, width:].round().to(torch.long))
            else:
                out.append(emb)
        with gpu_sync_allowed():  # as vLLM's own pruning hook: finding the placeholders reads them back
            positions = place_kept_tokens(ids, int(self.config.image_token_id), offsets, mrope_positions,
                                          num_computed_tokens)
            delta = int(positions.max().item() + 1 - ids.numel()) if positions.numel() else 0
        return out, positions, delta

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        if self.autoselect_pruner is None or not dataclasses.is_dataclass(config):
            return config
        # the encoder CUDA graph path skips _process_image_input's pruning: images run eagerly
        return dataclasses.replace(config, modalities=[m for m in config.modalities if m != "image"])


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2VLProcessor, info=PrunedQwen2VLInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class AutoSelectQwen2VLForConditionalGeneration(_PrunedQwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with pruning; the kept tokens keep their unpruned M-RoPE positions."""


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2_5_VLProcessor, info=PrunedQwen2_5_VLInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class AutoSelectQwen2_5_VLForConditionalGeneration(_PrunedQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with pruning; the kept tokens keep their unpruned M-RoPE positions."""

    family = "qwen2_5_vl"


ARCHITECTURES = {
    "LlavaForConditionalGeneration": AutoSelectLlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": AutoSelectLlavaNextForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": AutoSelectQwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": AutoSelectQwen2_5_VLForConditionalGeneration,
}
