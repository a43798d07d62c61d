"""LLaVA-format conversation data for the trainer and the evaluator.

A record is what LLaVA's instruction data holds:
    {"id": ..., "image": "relative/path.png",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion?"}, {"from": "gpt", "value": "Answer"}, ...]}
Turns alternate human / gpt; the `<image>` placeholder comes once, in the first human turn. The prompt
follows LLaVA-1.5's template, "USER: {question} ASSISTANT: {answer}</s>" (`autoselect.conversation`, the one
place it is written), with an optional system line, and only the answer tokens (and their end-of-sequence
token) carry labels. `ConversationCollator` is the package's one collator: the selector trainer and the
evaluator give it records, the testbed's VLM training gives it loaded images and (question, answer) turns
with a per-row image-token count (its curriculum).
"""

import json
import os
from typing import List, Optional, Sequence, Tuple

import torch

from ..conversation import IGNORE_INDEX, IMAGE_TOKEN, llava_prompt

__all__ = ["IGNORE_INDEX", "ConversationCollator", "load_records", "record_turns"]


def load_records(path: str) -> List[dict]:
    """The records of a LLaVA-format JSON file (a list of conversations), checked for the fields the
    trainer reads; a ValueError names the first malformed record."""
    with open(path) as handle:
        records = json.load(handle)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA conversation records")
    for position, record in enumerate(records):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not turns or len(turns) % 2 or "image" not in record:
            raise ValueError(f"{path}: record {position} needs an 'image' and an even number of conversation turns "
                             f"(human, gpt, ...)")
        for index, turn in enumerate(turns):
            if turn.get("from") != ("human" if index % 2 == 0 else "gpt") or not isinstance(turn.get("value"), str):
                raise ValueError(f"{path}: record {position}, turn {index}: expected "
                                 f"{'human' if index % 2 == 0 else 'gpt'} with a string value")
    return records


def record_turns(record: dict) -> List[Tuple[str, Optional[str]]]:
    """[(question, answer), ...] of a LLaVA-format record, in order (human turns are questions)."""
    turns = record["conversations"]
    return [(turns[i]["value"], turns[i + 1]["value"] if i + 1 < len(turns) else None)
            for i in range(0, len(turns), 2)]


class ConversationCollator:
    """Turns conversations into model inputs: left-padded input_ids with each `<image>` expanded to the
    model's number of image tokens, attention_mask, labels on answers only, and pixel_values.

    Records go through `__call__` (images loaded from `image_root`); loaded images with
    [(question, answer), ...] turns go through `batch`, which also takes a per-row image-token count
    (fewer tokens than the processor gives, for a model fed a subset of its visual tokens).

    Args:
        processor: the model's processor (a tokenizer with an `<image>` token and an image processor).
        image_root: folder the records' image paths are relative to.
        system: optional system line put before the first turn (LLaVA-1.5 uses one).
    """

    def __init__(self, processor, image_root: str, system: Optional[str] = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_root = image_root
        self.system = system
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.bos_ids = [self.tokenizer.bos_token_id] if getattr(self.tokenizer, "add_bos_token", False) and \
            self.tokenizer.bos_token_id is not None else []
        self._image_tokens = None

    def load_image(self, record):
        """The record's image (RGB), read from `image_root`."""
        from PIL import Image

        with Image.open(os.path.join(self.image_root, record["image"])) as image:
            return image.convert("RGB")

    def image_tokens(self, image) -> int:
        """How many tokens the processor expands one `<image>` into (probed once)."""
        if self._image_tokens is None:
            probe = self.processor(images=[image], text=[self.image_token], return_tensors="pt")
            self._image_tokens = int((probe["input_ids"] == self.image_token_id).sum())
        return self._image_tokens

    def _ids(self, text: str):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_turns(self, turns: Sequence[Tuple[str, Optional[str]]], image_tokens: int, *, answers: bool = True):
        """(ids, labels) of [(question, answer), ...]: each turn is `llava_prompt(question.strip())` (the
        system line before the first), then the answer's ids and end-of-sequence token, which alone carry
        labels. The image placeholder stays where the first question has it ("<image>\n" is put before a
        first question without one) and expands to `image_tokens` tokens. With answers=False only the
        first turn's prompt, ending in "ASSISTANT:" (for generation)."""
        ids, labels = list(self.bos_ids), [IGNORE_INDEX] * len(self.bos_ids)
        for index, (question, answer) in enumerate(turns):
            if index == 0 and self.image_token not in question:
                question = f"{self.image_token}\n{question}"
            head = llava_prompt(question.strip(), system=self.system if index == 0 else None)
            head_ids = []
            for token in self._ids(head):
                head_ids += [self.image_token_id] * image_tokens if token == self.image_token_id else [token]
            ids += head_ids
            labels += [IGNORE_INDEX] * len(head_ids)
            if not answers:
                return ids, labels
            answer_ids = self._ids(answer.strip()) + [self.eos_id]
            ids += answer_ids
            labels += answer_ids
        return ids, labels

    def encode(self, record, image_tokens: int, *, answers: bool = True):
        """(ids, labels) of one record's conversation (`encode_turns` of its turns); with answers=False
        only the prompt of the first turn (for evaluation), ending in "ASSISTANT:"."""
        return self.encode_turns(record_turns(record), image_tokens, answers=answers)

    def pad(self, encoded: Sequence[Tuple[list, list]]) -> dict:
        """input_ids, attention_mask and labels of (ids, labels) rows, left-padded (as for generation)."""
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            labels[row, width - len(ids):] = torch.tensor(labs)
            attention_mask[row, width - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def batch(self, images: Sequence, conversations: Sequence[Sequence[Tuple[str, Optional[str]]]],
              image_tokens: Optional[Sequence[int]] = None, *, answers: bool = True) -> dict:
        """Model inputs of loaded images (PIL) and their conversations ([(question, answer), ...] each):
        input_ids, attention_mask, labels (`pad`) and pixel_values. Row i's image expands to
        image_tokens[i] tokens (default: the processor's count)."""
        if image_tokens is None:
            image_tokens = [self.image_tokens(images[0])] * len(conversations)
        batch = self.pad([self.encode_turns(turns, n, answers=answers)
                          for turns, n in zip(conversations, image_tokens)])
        batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch

    def __call__(self, records: Sequence[dict], *, answers: bool = True):
        """Model inputs of LLaVA-format records (see `batch`), images read from `image_root`."""
        return self.batch([self.load_image(r) for r in records], [record_turns(r) for r in records], answers=answers)
