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
"""

from typing import Optional

from ..conversation import IMAGE_TOKEN, llava_prompt
from .data import IMAGE_SIZE, PATCH_SIZE, vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PROMPT_WORDS = ("user", "assistant", ":")
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576

# Sizes of the shipped tiny VLM: small enough to train on two CPU cores, big enough to read the scenes.
DEFAULT_SIZES = dict(vision_hidden=96, vision_layers=3, vision_heads=4, text_hidden=160, text_layers=3,
                     text_heads=4)


def build_tokenizer():
    """A word-level fast tokenizer over the testbed vocabulary, with LLaVA's special tokens."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + [w for w in PROMPT_WORDS + tuple(vocabulary()) if w not in SPECIAL_TOKENS]
    words = list(dict.fromkeys(words))
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_processor(tokenizer=None):
    """LlavaProcessor: CLIPImageProcessorPil at 336 pixels (CLIP's normalisation) and the word tokenizer;
    each <image> in a prompt expands to 576 image tokens."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def build_config(tokenizer=None, **sizes):
    """LlavaConfig of the tiny VLM (sizes default to DEFAULT_SIZES)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = tokenizer or build_tokenizer()
    s = {**DEFAULT_SIZES, **sizes}
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=s["vision_hidden"],
                              intermediate_size=4 * s["vision_hidden"], num_hidden_layers=s["vision_layers"],
                              num_attention_heads=s["vision_heads"], projection_dim=s["vision_hidden"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["text_hidden"],
                       intermediate_size=4 * s["text_hidden"], num_hidden_layers=s["text_layers"],
                       num_attention_heads=s["text_heads"], num_key_value_heads=s["text_heads"],
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=NUM_PATCHES,
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       pad_token_id=tokenizer.pad_token_id)


def build_model(seed: int = 0, tokenizer=None, **sizes):
    """A freshly initialised tiny VLM (LlavaForConditionalGeneration), deterministic under `seed`."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config = build_config(tokenizer, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model


def image_question(question: str) -> str:
    """The testbed's first question: the question, then the image ("{question}\\n<image>")."""
    return f"{question}\n{IMAGE_TOKEN}"


def prompt(question: str, answer: Optional[str] = None) -> str:
    """LLaVA-1.5's single-turn prompt (`conversation.llava_prompt`) with the image after the question;
    with `answer`, the full training text ending in </s>."""
    return llava_prompt(image_question(question), answer=answer)
