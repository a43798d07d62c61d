"""The testbed (DESIGN.md section 6): synthetic visual questions generated from a seed, in the LLaVA
conversation format, for training and measuring token selection where no VLM weights or benchmark
data can be downloaded."""

from .data import (COLORS, IMAGE_SIZE, QUESTION_TYPES, SHAPES, Question, Scene, SceneObject, generate, make_questions,
                   render, sample_scene, vocabulary, write_split)

__all__ = ["COLORS", "IMAGE_SIZE", "QUESTION_TYPES", "SHAPES", "Question", "Scene", "SceneObject", "generate",
           "make_questions", "render", "sample_scene", "vocabulary", "write_split"]
