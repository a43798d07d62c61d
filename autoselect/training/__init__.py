"""Training an AutoSelector on a frozen VLM (`autoselect train`): LLaVA-format data, the trainer."""

from .data import IGNORE_INDEX, ConversationCollator, load_records
from .trainer import build_parser, main, train

__all__ = ["IGNORE_INDEX", "ConversationCollator", "build_parser", "load_records", "main", "train"]
