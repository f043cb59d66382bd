"""Datasets of the synthetic world: an in-memory stream for training and a JSONL writer / reader.

On-disk layout written by :func:`write_split` (media paths are relative to ``data.jsonl``)::

    out_dir/data.jsonl       one row per line:
        {"id": str, "image": "images/<scene id>.png", "question": str, "answers": [str, ...],
         "type": str, "audio": "audio/<row id>.wav"}      # "audio" only on spoken rows
    out_dir/images/<scene id>.png
    out_dir/audio/<row id>.wav                             # only with audio=True

A row needs an image, audio or both, and a question, audio or both. Spoken-question rows have no
"question" (the model hears it), keep its text as "transcript", and their type is prefixed with
:data:`SPOKEN_PREFIX` ("spoken_count"). ASR rows have no image: type "asr", question
:data:`ASR_QUESTION`, answers [transcript of the spoken question].
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ..io import atomic_write_bytes
from .questions import QA, QUESTION_TYPES, questions_for
from .scenes import Scene, check_split, render, sample_scene
from .speech import speak

DATA_FILE = "data.jsonl"
ASR_QUESTION = "transcribe the audio."
SPOKEN_PREFIX = "spoken_"  # type of a row whose question is only spoken: "spoken_count", ...
#: the short families asked by voice (the shipped model is trained to hear these)
SPOKEN_TYPES = ("attribute", "existence", "count", "position", "relation", "comparison")
ROWS_PER_SCENE = 4  # question rows written per image (different families)
SPOKEN_RATE = 0.5  # with audio: share of question rows whose question is also spoken
ASR_RATE = 0.25  # with audio: share of scenes whose last row is an ASR row


def iter_examples(split: str, seed: int, *, types: Sequence[str] = QUESTION_TYPES,
                  per_type: int = 1) -> Iterator[tuple[Scene, Image.Image, list[QA]]]:
    """Endless deterministic stream of (scene, rendered image, questions) for ``split``.

    The same (split, seed) always gives the same stream; give each data-loader worker its own seed.

    Args:
        split: "train", "val" or "test".
        seed: stream seed.
        types: question families asked about each scene.
        per_type: questions tried per family and scene.
    """
    check_split(split)
    rng = random.Random(f"mmdiff-data:{split}:{seed}")
    while True:
        scene = sample_scene(rng, split)
        image = render(scene, rng)
        yield scene, image, questions_for(scene, rng, types, per_type)


def write_split(out_dir: str | Path, *, split: str, n: int, seed: int, audio: bool = False,
                progress: bool = True) -> Path:
    """Write ``n`` rows of ``split`` (JSONL + images [+ spoken questions]) and return the JSONL path.

    Each scene contributes up to ROWS_PER_SCENE rows of different, randomly chosen families. Media
    files are written first and ``data.jsonl`` last, atomically, so a crash never leaves a
    half-written or dangling index. Deterministic from (split, seed, audio).

    Args:
        out_dir: output folder (created).
        split: "train", "val" or "test" (test audio uses held-out voices).
        n: number of rows.
        seed: generation seed.
        audio: also synthesize spoken questions with espeak-ng (libespeak-ng, from the espeakng-loader package).
        progress: show a tqdm progress bar.
    """
    check_split(split)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if audio:
        (out / "audio").mkdir(exist_ok=True)
    pick = random.Random(f"mmdiff-rows:{split}:{seed}")  # row choice, apart from the scene stream
    rows: list[dict[str, Any]] = []
    with tqdm(total=n, disable=not progress, desc=f"mmdiff data {split}", unit="row") as bar:
        for index, (scene, image, qas) in enumerate(iter_examples(split, seed)):
            if len(rows) >= n:
                break
            scene_id = f"{split}-{seed}-{index:06d}"
            image_path = f"images/{scene_id}.png"
            image.save(out / image_path)
            chosen = pick.sample(qas, min(ROWS_PER_SCENE, len(qas), n - len(rows)))
            for k, qa in enumerate(chosen):
                row: dict[str, Any] = {"id": f"{scene_id}-{k}", "image": image_path, "question": qa.question,
                                       "answers": qa.answers, "type": qa.type}
                if audio:
                    asr = k == len(chosen) - 1 and k > 0 and qa.type in SPOKEN_TYPES and pick.random() < ASR_RATE
                    if asr or (qa.type in SPOKEN_TYPES and pick.random() < SPOKEN_RATE):
                        row["audio"] = f"audio/{row['id']}.wav"
                        speak(qa.question, out / row["audio"], split=split, rng=pick)
                        if asr:  # transcription needs no image
                            del row["image"]
                            row.update(question=ASR_QUESTION, answers=[qa.question], type="asr")
                        else:  # the question is only spoken; its text is kept as the transcript
                            del row["question"]
                            row.update(transcript=qa.question, type=f"{SPOKEN_PREFIX}{qa.type}")
                rows.append(row)
            bar.update(len(chosen))
    path = out / DATA_FILE
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    return path


@dataclass
class Row:
    """One valid dataset row, media paths resolved.

    Args:
        id: row id.
        image: absolute path of the image.
        question: question text; None on rows whose question is only spoken (their JSONL "transcript"
            is not part of the row).
        answers: accepted answers, first canonical.
        type: question family, or "asr".
        audio: path of the spoken question, or None.
        line_no: 1-based line in the JSONL file.
    """

    id: str
    image: Path | None
    question: str | None
    answers: list[str]
    type: str
    audio: Path | None
    line_no: int


@dataclass
class RowError:
    """A line of a JSONL file that could not be used.

    Args:
        line_no: 1-based line number.
        id: the row id when it could be read, else None.
        reason: what is wrong.
    """

    line_no: int
    id: str | None
    reason: str


def _parse_row(line: str, line_no: int, root: Path) -> Row | RowError:
    """Validate one JSONL line (see :func:`read_rows`)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        return RowError(line_no, None, f"invalid JSON: {e}")
    if not isinstance(data, dict):
        return RowError(line_no, None, f"expected a JSON object, got {type(data).__name__}")
    row_id = data.get("id")
    if not isinstance(row_id, str) or not row_id:
        return RowError(line_no, None, "missing or non-string 'id'")

    def error(reason: str) -> RowError:
        return RowError(line_no, row_id, reason)

    image, question, audio = data.get("image"), data.get("question"), data.get("audio")
    answers, qtype = data.get("answers"), data.get("type")
    if image is not None and (not isinstance(image, str) or not image):
        return error("'image' must be a non-empty string")
    if image is not None and not (root / image).is_file():
        return error(f"image file not found: {root / image}")
    if question is None and audio is None:
        return error("neither 'question' nor 'audio'")
    if question is not None and (not isinstance(question, str) or not question):
        return error("'question' must be a non-empty string")
    if audio is not None and (not isinstance(audio, str) or not (root / audio).is_file()):
        return error(f"audio file not found: {root / str(audio)}")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        return error("'answers' must be a non-empty list of non-empty strings")
    if not isinstance(qtype, str) or not qtype:
        return error("missing 'type'")
    return Row(row_id, root / image if image else None, question, answers, qtype, root / audio if audio else None,
               line_no)


def read_rows(path: str | Path) -> Iterator[Row | RowError]:
    """Parse a JSONL dataset, yielding a :class:`Row` per valid line and a :class:`RowError` per bad one.

    Blank lines are skipped. A line is bad when it is not a JSON object, lacks an id, its image (or
    audio) file is missing, it has neither question nor audio, or its answers are empty. A row
    without media is a text question (for a text-only model; a vision model refuses it row by row).

    Args:
        path: the ``data.jsonl`` file; media paths are resolved relative to its folder.

    Raises:
        FileNotFoundError: ``path`` does not exist (raised at the call, not at the first row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    root = path.resolve().parent

    def rows() -> Iterator[Row | RowError]:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield _parse_row(line, line_no, root)

    return rows()
