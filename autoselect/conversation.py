"""The conversation format every part of the package shares: LLaVA-1.5's prompt template and the
label value the loss ignores.

    USER: {question} ASSISTANT: {answer}</s>

with an optional system line before the first turn. The `<image>` placeholder is part of the question
text, where the data puts it ("<image>\\nQuestion?" in LLaVA's data, "Question?\\n<image>" in the testbed's).
The collator (training.data.ConversationCollator), the evaluator (evaluation, through the collator), the
testbed's prompt (testbed.vlm.prompt) and `autoselect show` all build their text here; the shipped tiny
VLM (weights/tiny-vlm) was trained on exactly these strings.
"""

from typing import Optional

IGNORE_INDEX = -100  # label of the tokens without loss (prompt, image, padding): torch's cross-entropy default
IMAGE_TOKEN = "<image>"


def llava_prompt(question: str, *, system: Optional[str] = None, answer: Optional[str] = None) -> str:
    """LLaVA-1.5's text of one turn: "USER: {question} ASSISTANT:", after `system` and a space when
    given; with `answer`, the training text "... ASSISTANT: {answer}</s>". The question is used as is
    (callers strip it; its `<image>` stays where it is)."""
    text = f"USER: {question} ASSISTANT:"
    if system:
        text = f"{system} {text}"
    return text if answer is None else f"{text} {answer}</s>"
