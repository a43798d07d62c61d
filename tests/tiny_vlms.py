"""Tiny VLMs built from configs (offline, random weights) and seeded inputs, for the integration tests.

Each builder returns (model, make_inputs); make_inputs(rows, padding) gives a batch whose row r holds
rows[r] images, left or right padded to a common length with attention_mask 0.
"""

import torch

IMAGE = 60  # image placeholder id in every tiny vocabulary
VIDEO = 61
VISION_START, VISION_END = 58, 59
PAD = 0
VOCAB = 64


def _llama_text(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)


def _clip_vision(image_size=28, patch_size=7):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=2, projection_dim=32)


def _pad_rows(rows, padding, device="cpu"):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        t = torch.tensor(r, dtype=torch.long)
        if padding == "left":
            ids[i, length - len(r):], mask[i, length - len(r):] = t, 1
        else:
            ids[i, :len(r)], mask[i, :len(r)] = t, 1
    return ids, mask


def _text(gen, n):
    return torch.randint(3, 50, (n,), generator=gen).tolist()


def build_llava(seed=0, attn="sdpa"):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=_clip_vision(), text_config=_llama_text(), image_token_id=IMAGE,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    n_tokens = 16  # (28 / 7)^2

    def make_inputs(rows=(1, 1), padding="left", seed=1, text=(3, 5)):
        gen = torch.Generator().manual_seed(seed)
        seqs, images = [], []
        for r, n_images in enumerate(rows):
            seq = [1] + _text(gen, text[0] + r)
            for _ in range(n_images):
                seq += [IMAGE] * n_tokens + _text(gen, 2)
                images.append(torch.randn(3, 28, 28, generator=gen))
            seqs.append(seq + _text(gen, text[1]))
        ids, mask = _pad_rows(seqs, padding)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if images:
            inputs["pixel_values"] = torch.stack(images)
        return inputs

    return model, make_inputs, n_tokens


def build_llava_next(seed=0, attn="sdpa"):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pinpoints = [[28, 56], [56, 28], [56, 56]]
    config = LlavaNextConfig(vision_config=_clip_vision(), text_config=_llama_text(), image_token_id=IMAGE,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints, image_seq_length=16)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()

    def count_tokens(size):
        feats = model.model.pack_image_features(
            [torch.zeros(image_size_to_num_patches(size, pinpoints, 28), 16, 1)], torch.tensor([size]),
            "default", image_newline=torch.zeros(1))[0][0]
        return feats.shape[0]

    sizes_cycle = [[30, 60], [50, 40], [28, 28]]

    def make_inputs(rows=(1, 1), padding="left", seed=1, text=(3, 5)):
        gen = torch.Generator().manual_seed(seed)
        seqs, pixels, sizes = [], [], []
        k = 0
        for r, n_images in enumerate(rows):
            seq = [1] + _text(gen, text[0] + r)
            for _ in range(n_images):
                size = sizes_cycle[k % len(sizes_cycle)]
                k += 1
                seq += [IMAGE] * count_tokens(size) + _text(gen, 2)
                pixels.append(torch.randn(5, 3, 28, 28, generator=gen))
                sizes.append(size)
            seqs.append(seq + _text(gen, text[1]))
        ids, mask = _pad_rows(seqs, padding)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if pixels:
            inputs["pixel_values"] = torch.stack(pixels)
            inputs["image_sizes"] = torch.tensor(sizes)
        return inputs

    return model, make_inputs, count_tokens


def build_qwen(kind="qwen2_vl", seed=0, attn="sdpa"):
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    else:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model
        vision = {"depth": 2, "hidden_size": 32, "out_hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                  "window_size": 56, "fullatt_block_indexes": [1]}
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2}
    config = Config(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
                    vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Model(config).eval()
    grids = [(1, 4, 6), (1, 6, 4), (1, 4, 4)]
    patch_dim = 3 * 2 * 14 * 14

    def make_inputs(rows=(1, 1), padding="left", seed=1, text=(3, 5)):
        gen = torch.Generator().manual_seed(seed)
        seqs, types, pixels, thw = [], [], [], []
        k = 0
        for r, n_images in enumerate(rows):
            seq = [1] + _text(gen, text[0] + r)
            for _ in range(n_images):
                t, h, w = grids[k % len(grids)]
                k += 1
                n = t * h * w // 4
                seq += [VISION_START] + [IMAGE] * n + [VISION_END] + _text(gen, 2)
                pixels.append(torch.randn(t * h * w, patch_dim, generator=gen))
                thw.append([t, h, w])
            seqs.append(seq + _text(gen, text[1]))
        ids, mask = _pad_rows(seqs, padding)
        inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE).long()}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels)
            inputs["image_grid_thw"] = torch.tensor(thw)
        return inputs

    return model, make_inputs, None


FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


def build(family, seed=0, attn="sdpa"):
    """(model, make_inputs) of a tiny model of `family`."""
    if family == "llava":
        model, make_inputs, _ = build_llava(seed, attn)
    elif family == "llava_next":
        model, make_inputs, _ = build_llava_next(seed, attn)
    else:
        model, make_inputs, _ = build_qwen(family, seed, attn)
    return model, make_inputs


def unpruned_positions(model, inputs):
    """The position ids the unpatched model uses for `inputs` at prefill (Qwen: M-RoPE (3, B, L))."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if "image_grid_thw" in inputs:
        return model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                          attention_mask=mask)[0]
    return (mask.cumsum(-1) - 1).clamp(min=0)


class RecordLanguageModel:
    """Records the position_ids and sequence length of every language-model call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({"position_ids": kwargs.get("position_ids"), "length": kwargs["inputs_embeds"].shape[1],
                           "attention_mask": kwargs.get("attention_mask")})

    def remove(self):
        self.handle.remove()
