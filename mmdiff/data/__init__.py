"""The synthetic multimodal world: shapes on a 3x3 grid, questions about them, spoken questions.

``scenes`` samples and renders scenes, ``questions`` asks and answers them, ``speech`` speaks
questions with espeak-ng, ``dataset`` streams examples for training and writes / reads the JSONL
format, ``cli`` is ``mmdiff data``.
"""
from __future__ import annotations

from .dataset import Row, RowError, iter_examples, read_rows, write_split
from .questions import QA, QUESTION_TYPES, ask, caption_json, caption_text, questions_for
from .scenes import (COLOURS, GRID, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, SPLITS, Obj, Scene, cell_labels, render,
                     sample_scene)
from .speech import HELDOUT_VOICES, TRAIN_VOICES, espeak_available, synthesize

__all__ = [
    "COLOURS", "GRID", "HELDOUT_VOICES", "IMAGE_SIZE", "POSITIONS", "QA", "QUESTION_TYPES", "Row", "RowError",
    "SHAPES", "SIZES", "SPLITS", "TRAIN_VOICES", "Obj", "Scene", "ask", "caption_json", "caption_text",
    "cell_labels", "espeak_available", "iter_examples", "questions_for", "read_rows", "render", "sample_scene",
    "synthesize", "write_split",
]
