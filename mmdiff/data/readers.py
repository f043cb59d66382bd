"""Users' datasets behind one interface: :func:`read_dataset` -> :class:`Conversation` s and the bad rows.

Formats (``fmt="auto"`` tells them apart from the path and the first record):

* ``mmdiff``: mmdiff's own JSONL rows (:mod:`mmdiff.data.dataset`), one question per row;
* ``llava``: LLaVA conversations, a JSON list or JSONL of ``{"id", "image" | "images", "audio"?,
  "conversations": [{"from": "human", "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}, ...]}``
  (LLaVA-1.5's ``llava_v1_5_mix665k.json`` layout; roles ``human``/``user`` and ``gpt``/``assistant``;
  multi-turn). A ``type`` (or ``question_type`` / ``category``) on the record, or on a ``gpt`` turn,
  names the question kind; else ``vqa``;
* ``hf``: anything Hugging Face ``datasets`` reads: a folder (``imagefolder`` with ``metadata.jsonl``
  / ``.csv``, or a ``save_to_disk`` folder), ``.parquet``, ``.arrow``, ``.csv``. Columns: an image column
  (``image``, decoded by ``datasets`` or a path), ``question`` + ``answer`` / ``answers``, or a
  LLaVA ``conversations`` column; ``type`` optional.

A bad record never stops a read: it becomes a :class:`~mmdiff.data.dataset.RowError` with its reason
(missing image, unknown placeholder, empty conversation, non-UTF-8 text, ...); :func:`report` prints
the counts and the first reasons. :func:`as_rows` flattens conversations into the one-question
:class:`~mmdiff.data.dataset.Row` s that ``mmdiff eval`` answers (each turn asked on its own).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import special_tokens as st
from .dataset import Row, RowError, read_rows

FORMATS = ("auto", "mmdiff", "llava", "hf")
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
TYPE_KEYS = ("type", "question_type", "category")
DEFAULT_TYPE = "vqa"
#: what looks like a media placeholder (``<image>``, ``<video>``, ``<img>``); only IMAGE and AUDIO are known
PLACEHOLDER = re.compile(r"<(?:image|audio|video|img|speech|sound)[^>\s]*>", re.IGNORECASE)
HF_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
#: columns that hold a row's answer(s), first found wins (VQAv2 has both)
ANSWER_KEYS = ("answers", "answer", "multiple_choice_answer")
#: first reasons printed by :func:`report`
SHOWN_REASONS = 5


@dataclass
class Turn:
    """One user question and the assistant's answer (first answer canonical)."""

    question: str
    answers: list[str]
    type: str = DEFAULT_TYPE


@dataclass
class Conversation:
    """One usable record: media and one or more turns (the loss covers every answer).

    Args:
        id: record id (unique per file; turns add ``-<k>`` in :func:`as_rows`).
        image: a path or a decoded PIL image, or None.
        audio: a path, or None (a spoken question: the first turn's text may be "").
        turns: the question / answer turns, in order.
        line_no: 1-based line (JSONL) or record index + 1 (JSON list, ``datasets`` row).
    """

    id: str
    image: Any
    audio: Path | None
    turns: list[Turn]
    line_no: int


@dataclass
class ReadResult:
    """What :func:`read_dataset` found."""

    path: str
    format: str
    conversations: list[Conversation] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)

    @property
    def questions(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def detect_format(path: str | Path) -> str:
    """``mmdiff``, ``llava`` or ``hf`` for a dataset path (see the module docstring)."""
    path = Path(path)
    if path.is_dir() or path.suffix in HF_SUFFIXES:
        return "hf"
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        return "llava"
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
    return "llava" if '"conversations"' in first else "mmdiff"


def read_dataset(path: str | Path, *, fmt: str = "auto") -> ReadResult:
    """Read a dataset in any supported format (module docstring); bad records are collected, not raised.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``fmt`` is unknown, or the file as a whole cannot be read as that format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    out = ReadResult(str(path), fmt)
    if fmt == "mmdiff":
        for entry in read_rows(path):
            if isinstance(entry, RowError):
                out.errors.append(entry)
            else:
                out.conversations.append(Conversation(entry.id, entry.image, entry.audio,
                                                      [Turn(entry.question or "", entry.answers, entry.type)],
                                                      entry.line_no))
        return out
    records = _llava_records(path) if fmt == "llava" else _hf_records(path)
    root = path.resolve().parent if path.is_file() else path.resolve()
    seen: set[str] = set()
    for line_no, record in records:
        got = record if isinstance(record, RowError) else parse_llava(record, line_no, root)
        if isinstance(got, Conversation):
            if got.id in seen:
                got = RowError(line_no, got.id, "duplicate id")
            else:
                seen.add(got.id)
        (out.conversations if isinstance(got, Conversation) else out.errors).append(got)
    return out


def _llava_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line / index + 1, record or RowError) of a LLaVA JSON list or JSONL file. Bytes that are not
    UTF-8 are kept as surrogates so that only the records holding them are refused."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list ({e})") from None
        yield from enumerate(records, start=1)
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, RowError(line_no, None, f"invalid JSON: {e}")


def _hf_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Records of a ``datasets``-readable path, as LLaVA-like dicts (image decoded by ``datasets``)."""
    import datasets

    if path.is_file() and path.suffix not in HF_SUFFIXES:
        raise ValueError(f"{path}: format hf reads a folder or a {', '.join(HF_SUFFIXES)} file, "
                         f"not {path.suffix or 'a file without a suffix'}")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log line would repeat the error
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        elif path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.load_dataset(HF_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many kinds; one line naming the file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not readable as a HF dataset ({reason})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    for i, rec in enumerate(ds, start=1):
        rec = dict(rec)
        if "conversations" not in rec:
            answers = next((rec[k] for k in ANSWER_KEYS if rec.get(k) is not None), None)
            answers = answers if isinstance(answers, list) else [answers]
            # VQAv2 layout: [{"answer": "2", "answer_confidence": "yes", ...}, ...]
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
            rec["conversations"] = [{"from": "human", "value": rec.get("question")}] + [
                {"from": "gpt", "value": answers[0] if answers else None, "answers": answers}]
        rec.setdefault("id", str(i))
        yield i, rec


def _bad_text(value: Any) -> str | None:
    """Why a text field is unusable, or None."""
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "non-UTF-8 text"
    return None


def parse_llava(record: Any, line_no: int, root: Path) -> Conversation | RowError:
    """Validate one LLaVA record (see the module docstring) into a :class:`Conversation`."""
    if not isinstance(record, dict):
        return RowError(line_no, None, f"expected a JSON object, got {type(record).__name__}")
    rid = record.get("id", str(line_no))
    rid = str(rid) if isinstance(rid, (str, int)) else str(line_no)

    def error(reason: str) -> RowError:
        return RowError(line_no, rid, reason)

    images = record.get("images", record.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    if len(images) > 1:
        return error(f"{len(images)} images: one image per conversation is supported")
    image = None
    if images:
        image = images[0]
        if isinstance(image, dict) and image.get("bytes"):  # datasets' undecoded Image feature
            import io

            from PIL import Image

            try:
                image = Image.open(io.BytesIO(image["bytes"]))
                image.load()
            except OSError as e:
                return error(f"unreadable image bytes ({e})")
        elif isinstance(image, dict) and image.get("path"):
            image = image["path"]
        if isinstance(image, str):
            if _bad_text(image):
                return error(f"image path: {_bad_text(image)}")
            image = Path(image) if Path(image).is_absolute() else root / image
            if not image.is_file():
                return error(f"image file not found: {image}")
        elif not hasattr(image, "convert"):
            return error(f"unreadable image entry of type {type(image).__name__}")
    audio = record.get("audio")
    if audio is not None:
        if not isinstance(audio, str) or _bad_text(audio) or not (root / audio).is_file():
            return error(f"audio file not found: {root / str(audio)}")
        audio = root / audio
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return error("empty or missing 'conversations'")
    row_type = next((record[k] for k in TYPE_KEYS if isinstance(record.get(k), str) and record[k]), DEFAULT_TYPE)
    turns: list[Turn] = []
    n_image = n_audio = 0
    pending: str | None = None
    for k, msg in enumerate(conv):
        if not isinstance(msg, dict):
            return error(f"turn {k}: expected an object with 'from' and 'value'")
        role, value = msg.get("from", msg.get("role")), msg.get("value", msg.get("content"))
        if _bad_text(value):
            return error(f"turn {k}: {_bad_text(value)}")
        if role == "system":  # mmdiff's chat template has no per-dataset system prompt: not used
            continue
        if role in HUMAN_ROLES:
            if pending is not None:
                return error(f"turn {k}: two user turns in a row")
            for ph in PLACEHOLDER.findall(value):
                if ph not in (st.IMAGE, st.AUDIO):
                    return error(f"turn {k}: unknown placeholder {ph}")
            n_image += value.count(st.IMAGE)
            n_audio += value.count(st.AUDIO)
            pending = " ".join(value.replace(st.IMAGE, " ").replace(st.AUDIO, " ").split())
        elif role in ASSISTANT_ROLES:
            if pending is None:
                return error(f"turn {k}: an answer without a question")
            answers = msg.get("answers") if isinstance(msg.get("answers"), list) else [value]
            answers = [a.strip() for a in answers if isinstance(a, str) and not _bad_text(a) and a.strip()]
            if not answers:
                return error(f"turn {k}: empty answer")
            if not pending and not (audio is not None and not turns):
                return error(f"turn {k - 1}: empty question")
            turn_type = msg.get("type") if isinstance(msg.get("type"), str) and msg.get("type") else row_type
            turns.append(Turn(pending, answers, turn_type))
            pending = None
        else:
            return error(f"turn {k}: unknown role {role!r} (known: {', '.join(HUMAN_ROLES + ASSISTANT_ROLES)})")
    if not turns:
        return error("no question / answer turn")
    if n_image > (1 if image is not None else 0):
        return error(f"{n_image} <image> placeholder(s) but {1 if image is not None else 0} image(s)")
    if n_audio > (1 if audio is not None else 0):
        return error(f"{n_audio} <audio> placeholder(s) but {1 if audio is not None else 0} audio clip(s)")
    if image is None and audio is None:
        return error("no image and no audio")
    return Conversation(rid, image, audio, turns, line_no)


def as_rows(result: ReadResult) -> list[Row | RowError]:
    """One :class:`Row` per turn (ids ``<id>-<k>`` for multi-turn records; each turn is asked on its
    own) followed by the bad records, in file order: what ``mmdiff eval`` answers."""
    out: list[tuple[int, Row | RowError]] = []
    for c in result.conversations:
        for k, t in enumerate(c.turns):
            rid = c.id if len(c.turns) == 1 else f"{c.id}-{k}"
            out.append((c.line_no, Row(rid, c.image, t.question or None, t.answers, t.type, c.audio, c.line_no)))
    out += [(e.line_no, e) for e in result.errors]
    return [r for _, r in sorted(out, key=lambda x: x[0])]


def iter_rows(path: str | Path) -> list[Row | RowError]:
    """Every question of any supported dataset as ``mmdiff eval``'s rows (:func:`as_rows`)."""
    if detect_format(path) == "mmdiff":
        return list(read_rows(path))
    return as_rows(read_dataset(path))


def report(result: ReadResult, *, name: str = "data", shown: int = SHOWN_REASONS) -> str:
    """One summary line, then the first ``shown`` bad records' reasons and the counts per reason."""
    lines = [f"{name}: {result.path} ({result.format}): {len(result.conversations)} usable records "
             f"({result.questions} questions), {len(result.errors)} skipped"]
    for e in result.errors[:shown]:
        lines.append(f"  skipped line {e.line_no}" + (f" (id {e.id})" if e.id else "") + f": {e.reason}")
    if len(result.errors) > shown:
        kinds = Counter(re.sub(r"(turn \d+: )|(: .*$)", "", e.reason) for e in result.errors)
        lines.append("  reasons: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()))
    return "\n".join(lines)


def check_usable(result: ReadResult, *, name: str = "--data") -> None:
    """One clear error when ``result`` has no usable record (before any training)."""
    if not result.conversations:
        raise no_usable_rows(name, result.path, result.errors)


def check_rows(rows: list[Row | RowError], path: str | Path, *, name: str = "--data") -> None:
    """:func:`check_usable` for :func:`iter_rows`' rows: one clear error when none is a :class:`Row`."""
    if not any(isinstance(r, Row) for r in rows):
        raise no_usable_rows(name, str(path), [r for r in rows if isinstance(r, RowError)])


def no_usable_rows(name: str, path: str, errors: list[RowError]) -> ValueError:
    """The one line naming a dataset with no usable row: how many were skipped and the first reason."""
    first = f"; first: line {errors[0].line_no}: {errors[0].reason}" if errors else ""
    return ValueError(f"{name} {path}: no usable rows ({len(errors)} skipped{first})")


def read_usable(path: str | Path, *, fmt: str = "auto", name: str = "--data",
                say: Callable[[str], None] = print) -> ReadResult:
    """What training reads: :func:`read_dataset` with its refusals (missing file, wrong format) named by the
    flag ``name``, its :func:`report` given to ``say``, then :func:`check_usable`.

    Raises:
        ValueError: the file is missing or unreadable as ``fmt``, or it has no usable record.
    """
    try:
        result = read_dataset(path, fmt=fmt)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{name}: {e}") from None
    say(report(result, name=name))
    check_usable(result, name=name)
    return result
