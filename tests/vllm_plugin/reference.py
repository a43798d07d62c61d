"""Tiny VLMs and the Hugging Face references the vLLM plugin tests compare against.

Runs in the MAIN environment (transformers >= 5.24, which `autoselect.apply` needs; vLLM 0.32 pins
transformers < 5.20, so the two cannot share one environment):

    .venv/bin/python tests/vllm_plugin/reference.py OUT_DIR

writes under OUT_DIR: `llava/`, `qwen2_vl/` and `qwen2_5_vl/` (random tiny models with head size 32, which vLLM's CPU
attention supports, saved with their processors), selectors fitted to each (`selector-llava`, placement
projector_input; `selector-qwen2_vl` and `selector-qwen2_5_vl`, projector_output; `selector-wrong-width`), test images, and
`reference.json`: for each case (family, method, keep, positions), the greedy tokens and their
log-probabilities of `generate()` on the pruned Hugging Face model, one prompt per call, for every prompt
of the case; plus the same with the other position mode, which the tests use to show that they can
tell the modes apart.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

MAX_NEW_TOKENS = 6
QUESTIONS = ["what color is the circle?", "how many red objects are there?",
             "is there a blue square in the image?", "what shape is the green object?"]
QWEN_WORDS = ["user", "assistant", "what", "color", "is", "the", "circle", "how", "many", "red", "objects", "are",
              "there", "a", "blue", "square", "in", "image", "shape", "green", "object", "?", ":", "yes", "no"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]

# each case: one engine in the tests
CASES = [
    {"name": "llava-autoselect-16", "family": "llava", "method": "autoselect", "keep": 16, "positions": "compact"},
    {"name": "llava-divprune-frac", "family": "llava", "method": "divprune", "keep": 0.05, "positions": "compact"},
    {"name": "llava-random-16", "family": "llava", "method": "random", "keep": 16, "positions": "compact"},
    {"name": "llava-unpruned", "family": "llava", "method": None, "keep": None, "positions": "original"},
    {"name": "qwen2_vl-autoselect-frac", "family": "qwen2_vl", "method": "autoselect", "keep": 0.3,
     "positions": "original"},
    {"name": "qwen2_vl-norm-5", "family": "qwen2_vl", "method": "norm", "keep": 5, "positions": "original"},
    {"name": "llava_next-norm-frac", "family": "llava_next", "method": "norm", "keep": 0.25, "positions": "compact"},
    {"name": "qwen2_5_vl-autoselect-7", "family": "qwen2_5_vl", "method": "autoselect", "keep": 7,
     "positions": "original"},
]


def images(n=4, seed=0):
    """Seeded noise images with a few bright blocks (so that methods disagree), various sizes."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        size = [(336, 336), (112, 168), (168, 112), (140, 140)][i % 4]
        pixels = rng.random((size[1], size[0], 3)) * 120
        for _ in range(4):
            y, x = rng.integers(0, size[1] - 28), rng.integers(0, size[0] - 28)
            pixels[y:y + 28, x:x + 28] = rng.random(3) * 255
        out.append(Image.fromarray(pixels.astype("uint8")))
    return out


def build_llava(path):
    from autoselect.testbed import vlm

    tokenizer = vlm.build_tokenizer()
    model = vlm.build_model(seed=0, tokenizer=tokenizer, vision_hidden=64, vision_layers=2, vision_heads=2,
                            text_hidden=128, text_layers=2, text_heads=4)
    _sharpen(model)
    model.save_pretrained(path)
    vlm.build_processor(tokenizer).save_pretrained(path)
    assert model.config.text_config.head_dim == 32


def build_llava_next(path):
    """LLaVA-NeXT with a 56-pixel CLIP tower (16 tokens per view) and anyres crops up to 112 x 112."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    from autoselect.testbed import vlm

    tokenizer = vlm.build_tokenizer()
    pinpoints = [[56, 112], [112, 56], [112, 112]]
    vision = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                 image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


def _sharpen(model, scale=6.0):
    """Random weights give near-uniform attention, which hides positions; larger query/key weights make
    the outputs depend on them (the tests must tell compact from original positions)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(scale)


def build_qwen_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + QWEN_SPECIAL + QWEN_WORDS
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    return tokenizer


def build_qwen2_vl(path, kind="qwen2_vl"):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    tokenizer = build_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    if kind == "qwen2_vl":
        Config, Model = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    else:
        Config, Model = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = {"depth": 2, "hidden_size": 64, "out_hidden_size": 128, "intermediate_size": 128, "num_heads": 2,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                  "window_size": 56, "fullatt_block_indexes": [1]}
    text = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "pad_token_id": ids("<pad>"), "eos_token_id": ids("<|im_end|>"), "bos_token_id": None}
    config = Config(vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
                    video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                    vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    model = Model(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    # the processor is saved as its parts: Qwen2VLProcessor itself wants a video processor, which needs
    # torchvision (absent from the main environment; vLLM's environment builds it from these files)
    tokenizer.save_pretrained(path)
    qwen_image_processor().save_pretrained(path)
    with open(os.path.join(path, "processor_config.json"), "w") as handle:
        json.dump({"processor_class": "Qwen2VLProcessor" if kind == "qwen2_vl" else "Qwen2_5_VLProcessor"}, handle)
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == 32


def qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)


def qwen_inputs(path, text, image):
    """Qwen2-VL's processor, by hand: the image processor's patches and grid, and the prompt with its
    image placeholder expanded to grid / merge^2 tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pixels = qwen_image_processor()(images=image, return_tensors="pt")
    n = int(pixels["image_grid_thw"].prod()) // 4
    ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == image_id).long(),
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


def prompt(family, question):
    if family.startswith("qwen"):
        return f"user : <|vision_start|><|image_pad|><|vision_end|> {question} assistant :"
    return f"USER: <image>\n{question} ASSISTANT:"


def build_selectors(out):
    from autoselect import AutoSelector

    scorer = {"layers": 1, "width": 32, "heads": 2, "mlp_ratio": 2}
    for name, dim, placement in (("llava", 64, "projector_input"), ("qwen2_vl", 128, "projector_output"),
                                 ("qwen2_5_vl", 128, "projector_output"), ("wrong-width", 48, "projector_input")):
        torch.manual_seed(1)
        selector = AutoSelector(dim, scorer=scorer, denoiser="none", placement=placement)
        with torch.no_grad():
            for p in selector.parameters():
                p.add_(torch.randn_like(p) * 0.5)  # scores far from ties
        selector.save_pretrained(os.path.join(out, f"selector-{name}"))


def hf_generate(family, path, case, imgs, selector_dir, positions):
    import autoselect
    from autoselect.integrations import last_selection
    from transformers import (AutoProcessor, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

    from transformers import LlavaNextForConditionalGeneration

    cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[family]
    model = cls.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path) if family.startswith("llava") else None
    if case["method"] is not None:
        selector = selector_dir if case["method"] == "autoselect" else None
        autoselect.apply(model, selector, method=case["method"], keep=case["keep"], positions=positions)
    results = []
    for i, image in enumerate(imgs):
        text = prompt(family, QUESTIONS[i % len(QUESTIONS)])
        if processor is not None:
            inputs = processor(text=text, images=image, return_tensors="pt")
        else:
            inputs = qwen_inputs(path, text, image)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, eos_token_id=None)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
        length = inputs["input_ids"].shape[1]
        if case["method"] is not None:  # the prompt the language model saw: text + kept tokens
            length = int(last_selection(model).keep_columns.sum())
        results.append({"prompt_len": length, "tokens": tokens, "logprobs": logprobs})
    return results


def main(out):
    os.makedirs(out, exist_ok=True)
    build_llava(os.path.join(out, "llava"))
    build_llava_next(os.path.join(out, "llava_next"))
    build_qwen2_vl(os.path.join(out, "qwen2_vl"))
    build_qwen2_vl(os.path.join(out, "qwen2_5_vl"), kind="qwen2_5_vl")
    build_selectors(out)
    imgs = images()
    for i, image in enumerate(imgs):
        image.save(os.path.join(out, f"image{i}.png"))
    reference = {"questions": QUESTIONS, "max_new_tokens": MAX_NEW_TOKENS, "cases": []}
    for case in CASES:
        family = case["family"]
        path = os.path.join(out, family)
        selector_dir = os.path.join(out, f"selector-{family}")
        entry = dict(case, model=path, selector=selector_dir if case["method"] == "autoselect" else None,
                     prompts=[prompt(family, QUESTIONS[i % len(QUESTIONS)]) for i in range(len(imgs))],
                     images=[os.path.join(out, f"image{i}.png") for i in range(len(imgs))])
        entry["hf"] = hf_generate(family, path, case, imgs, selector_dir, case["positions"])
        if case["method"] is not None and family.startswith("llava"):
            other = "original" if case["positions"] == "compact" else "compact"
            entry["hf_other_positions"] = hf_generate(family, path, case, imgs, selector_dir, other)
        reference["cases"].append(entry)
        print(case["name"], [r["tokens"] for r in entry["hf"]], flush=True)
    with open(os.path.join(out, "reference.json"), "w") as handle:
        json.dump(reference, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
