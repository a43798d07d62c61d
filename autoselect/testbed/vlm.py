"""The testbed's tiny VLM: real transformers classes, built offline from configs.

`LlavaForConditionalGeneration` with a CLIP-style vision tower that gives 576 visual tokens like
LLaVA-1.5 (336 x 336 images, 14-pixel patches, the class token dropped by the "default" feature
strategy), the LLaVA two-layer projector, and a small Llama language model. The tokenizer is
word-level over the testbed's vocabulary (tokenizers' WordLevel model), the image processor is
transformers' `CLIPImageProcessorPil` (Pillow, no torchvision), and the prompt is LLaVA-1.5's template
with the question before the image: "USER: {question}\\n<image> ASSISTANT: {answer}</s>". LLaVA-format
data may put `<image>` anywhere in the first human turn; here it follows the question, so the visual
tokens are read with the question already in context. Together with train_vlm's background curriculum
this let the 3-layer language model learn to find the asked object on two CPU cores (with the image
first it stayed at validation accuracy 0.52 after 1,000 steps, colour questions at chance; see
weights/tiny-vlm/README.md).

Version 2 (testbed v2, `data_v2`; `version=2` in every builder here): the tokenizer covers
`data_v2.vocabulary()` (v1's words first, in v1's order, so v1's word ids are kept), the sizes are
`V2_SIZES` (a language model head size of 64, which vLLM's CPU attention supports; a deeper vision tower
that has to read digits), and the prompt is LLaVA-1.5's standard one with the image first:
"USER: <image>\\n{question} ASSISTANT: {answer}</s>" (as data_v2's records have it). Images, patches and
the 576 visual tokens are as in version 1.
"""

from typing import Optional

from ..conversation import IMAGE_TOKEN, llava_prompt
from .data import IMAGE_SIZE, PATCH_SIZE

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PROMPT_WORDS = ("user", "assistant", ":")
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576

# Sizes of the shipped tiny VLM: small enough to train on two CPU cores, big enough to read the scenes.
DEFAULT_SIZES = dict(vision_hidden=96, vision_layers=3, vision_heads=4, text_hidden=160, text_layers=3,
                     text_heads=4, rope_theta=10000.0, text_head_dim=None, vision_feature_layer=-1)
# Sizes of the testbed v2 VLM: language model head size 128 / 2 = 64 (vLLM's CPU attention supports it;
# v1's 160 / 4 = 40 it does not), vision head size 96 / 3 = 32, one more tower layer than v1 (digits, small
# objects). 1.39 M parameters; measured at about 0.8x v1's stage 2 step time (batch 32, all 576 tokens) on
# the same two cores: 256-wide, 4-layer sizes (5.3 M) took 2x v1's, too slow for a two-hour CPU budget.
# rope_theta: the language model's rotary base (Llama's 10000 in both; with 32-wide heads only the slowest
# few frequency pairs stay position-free across 576 image tokens, hence a size one can change).
# text_head_dim: the language model's head size when not text_hidden / text_heads (Llama's head_dim; None
# keeps the quotient), so the heads can be made wider (or more numerous) at the same width.
# vision_feature_layer: the tower's hidden state(s) the projector reads (LlavaConfig's; -1 the last, a list
# concatenates several, e.g. [0, -1]: the position-embedded patches beside the last layer, whose features hold
# an object's column only weakly, weights/tiny-vlm-v2-wip/diagnostics/layer_side_probe.txt).
V2_SIZES = dict(vision_hidden=96, vision_layers=4, vision_heads=3, text_hidden=128, text_layers=3, text_heads=2,
                rope_theta=10000.0, text_head_dim=None, vision_feature_layer=-1)
VERSIONS = (1, 2)


def _check_version(version: int) -> int:
    if version not in VERSIONS:
        raise ValueError(f"unknown testbed version {version!r}; choose one of {VERSIONS}")
    return version


def data_module(version: int = 1):
    """The testbed data module of `version`: `data` (1) or `data_v2` (2)."""
    if _check_version(version) == 1:
        from . import data
        return data
    from . import data_v2
    return data_v2


def default_sizes(version: int = 1) -> dict:
    """The sizes of `version`'s tiny VLM: DEFAULT_SIZES (1, the shipped weights') or V2_SIZES (2)."""
    return dict(DEFAULT_SIZES if _check_version(version) == 1 else V2_SIZES)


def build_tokenizer(version: int = 1):
    """A word-level fast tokenizer over the testbed vocabulary of `version` (`data.vocabulary()` or
    `data_v2.vocabulary()`, which starts with v1's words in v1's order), with LLaVA's special tokens."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocabulary = data_module(version).vocabulary
    words = list(SPECIAL_TOKENS) + [w for w in PROMPT_WORDS + tuple(vocabulary()) if w not in SPECIAL_TOKENS]
    words = list(dict.fromkeys(words))
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_processor(tokenizer=None, version: int = 1):
    """LlavaProcessor: CLIPImageProcessorPil at 336 pixels (CLIP's normalisation) and the word tokenizer
    (`build_tokenizer(version)` unless given); each <image> in a prompt expands to 576 image tokens."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer or build_tokenizer(version)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def build_config(tokenizer=None, version: int = 1, **sizes):
    """LlavaConfig of the tiny VLM (sizes default to `default_sizes(version)`: DEFAULT_SIZES for 1,
    V2_SIZES for 2; the tokenizer to `build_tokenizer(version)`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = tokenizer or build_tokenizer(version)
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; choose from {sorted(DEFAULT_SIZES)}")
    s = {**default_sizes(version), **sizes}
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=s["vision_hidden"],
                              intermediate_size=4 * s["vision_hidden"], num_hidden_layers=s["vision_layers"],
                              num_attention_heads=s["vision_heads"], projection_dim=s["vision_hidden"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["text_hidden"],
                       intermediate_size=4 * s["text_hidden"], num_hidden_layers=s["text_layers"],
                       num_attention_heads=s["text_heads"], num_key_value_heads=s["text_heads"],
                       head_dim=s["text_head_dim"],
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=NUM_PATCHES,
                       vision_feature_select_strategy="default", vision_feature_layer=s["vision_feature_layer"],
                       pad_token_id=tokenizer.pad_token_id)


def build_model(seed: int = 0, tokenizer=None, version: int = 1, **sizes):
    """A freshly initialised tiny VLM (LlavaForConditionalGeneration) of `version` (`build_config`),
    deterministic under `seed`."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config = build_config(tokenizer, version, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model


def image_question(question: str, version: int = 1) -> str:
    """The testbed's first question with the image placeholder: version 1 puts the question first
    ("{question}\\n<image>"), version 2 the image first ("<image>\\n{question}", LLaVA-1.5's standard
    layout, as `data_v2.image_first`)."""
    if _check_version(version) == 1:
        return f"{question}\n{IMAGE_TOKEN}"
    return f"{IMAGE_TOKEN}\n{question}"


def prompt(question: str, answer: Optional[str] = None, version: int = 1) -> str:
    """LLaVA-1.5's single-turn prompt (`conversation.llava_prompt`) with the image placed as
    `image_question(question, version)` has it (version 1: after the question; 2: before it); with
    `answer`, the full training text ending in </s>."""
    return llava_prompt(image_question(question, version), answer=answer)
