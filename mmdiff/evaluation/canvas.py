"""The response canvas of each question type in ``mmdiff eval``, chosen from the dataset.

A masked-diffusion model answers on a canvas of a fixed number of tokens: an answer longer than the
canvas is cut, silently. Short answers fit the 8 tokens mmdiff-tiny is trained on, captions need ~50
and JSON captions ~150. So each question type gets the canvas its longest reference answer in the
dataset needs: its length in the model's tokens, plus one for EOS, rounded up to a multiple of
:data:`CANVAS_MULTIPLE` (and of the block length). The length is a property of the type, taken over
all its rows: a canvas cut to each row's own reference would tell the model its answer's length.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..data.dataset import Row, RowError
from ..data.readers import iter_rows
from ..loading import text_tokenizer
from ..sampling import DecodeConfig

#: canvases are rounded up to a multiple of this many tokens
CANVAS_MULTIPLE = 8


def canvas_length(answer_tokens: int, multiple: int = CANVAS_MULTIPLE) -> int:
    """The canvas of an answer of ``answer_tokens`` tokens: them + EOS, rounded up to ``multiple``."""
    return multiple * math.ceil((answer_tokens + 1) / multiple)


@dataclass(frozen=True)
class Canvas:
    """The canvas of one question type and why."""

    length: int  # tokens of the response canvas
    longest: int  # tokens of the type's longest reference answer (EOS not counted)
    rows: int  # rows of the type in the dataset


def canvas_per_type(rows: Iterable[Row], tokenizer, *, multiple: int = CANVAS_MULTIPLE) -> dict[str, Canvas]:
    """Per question type, a canvas that holds every reference answer of the type, with its EOS.

    Args:
        rows: the dataset's valid rows (all of them: shards and ``--limit`` must agree on the canvas).
        tokenizer: the model's tokenizer (answers are measured in its tokens).
        multiple: lengths are rounded up to a multiple of this.

    Returns:
        ``{type: Canvas}``, types sorted by name.
    """
    longest: dict[str, int] = {}
    count: dict[str, int] = {}
    for row in rows:
        n = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in row.answers)
        longest[row.type] = max(longest.get(row.type, 0), n)
        count[row.type] = count.get(row.type, 0) + 1
    return {t: Canvas(canvas_length(longest[t], multiple), longest[t], count[t]) for t in sorted(longest)}


def choose_canvases(data: str | Path, model_dir: str | Path, decode: DecodeConfig, *,
                    rows: list[Row | RowError] | None = None) -> dict[str, Canvas]:
    """:func:`canvas_per_type` of a dataset (any format :func:`~mmdiff.data.readers.iter_rows` reads) for a
    model directory (any :func:`mmdiff.load` reads), rounded to a multiple of :data:`CANVAS_MULTIPLE` and of
    ``decode``'s block length (which must divide the canvas).

    Args:
        data: the dataset.
        model_dir: the model (its tokenizer counts the answers' tokens).
        decode: the decode settings (their block length).
        rows: ``data``'s rows when already read (:func:`~mmdiff.data.readers.iter_rows`), else read here.

    Raises:
        FileNotFoundError: the data file or the model directory does not exist.
    """
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    rows = [r for r in (iter_rows(data) if rows is None else rows) if isinstance(r, Row)]
    multiple = math.lcm(CANVAS_MULTIPLE, decode.sampler.block_length or 1)
    return canvas_per_type(rows, text_tokenizer(model_dir), multiple=multiple)
