"""Modules of AutoSelect: the Scorer, the Denoiser and the AutoSelector that holds them."""

from .denoiser import Denoiser
from .scorer import Scorer
from .selector import AutoSelector

__all__ = ["AutoSelector", "Denoiser", "Scorer"]

