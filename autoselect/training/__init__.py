"""Training an AutoSelector on a frozen VLM (`autoselect train`): LLaVA-format data, the trainer, and the
training loop (`Trainer`) it shares with the testbed's VLM training."""

from .data import IGNORE_INDEX, ConversationCollator, load_records
from .loop import Trainer
from .trainer import build_parser, main, train

__all__ = ["IGNORE_INDEX", "ConversationCollator", "Trainer", "build_parser", "load_records", "main", "train"]
