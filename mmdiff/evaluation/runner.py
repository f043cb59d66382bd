"""Batch VQA evaluation that loses nothing: resumable, shardable, mergeable.

An output folder (one per run; one per shard under ``shard-i-of-n/``) holds::

    run.json            what is evaluated: model, data, sampler, cache, pruning, search and the canvas of
                        each question type (checked on every resume)
    predictions.jsonl   one record per answered row, appended and fsync'd after each batch
    errors.jsonl        one record per bad row: index, line, id, reason
    metrics.json        :func:`~mmdiff.evaluation.metrics.summarize` + the run's settings (atomic)

Rows are numbered by their position among the non-blank lines of the data file (``index``); shard
i/n takes the rows with ``index % n == i``. A rerun into the same folder skips every row already
in predictions.jsonl (by id) or errors.jsonl (by index), so an interrupted run finishes where it
stopped. Rows are batched by canvas length (one canvas per question type,
:mod:`~mmdiff.evaluation.canvas`, or the sampler's ``gen_length`` for all); when a run ends, both
JSONL files are rewritten in data order, so a resumed run's files equal an uninterrupted run's.
Sampling goes through :meth:`MultimodalDiffusionLM.generate` (batched), row by row through
:func:`mmdiff.search.search` when a test-time search is set, or through the step-batching
:class:`~mmdiff.serving.engine.Engine` (``engine_batch``: rows of every canvas join and leave one pool
between denoising steps and are written as they finish; a row's ``nfe`` is then its own, where a
``generate`` batch reports the batch's steps); nothing here samples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..data.dataset import Row, RowError
from ..data.readers import iter_rows
from ..io import atomic_write_bytes, check_output_dir, read_json, write_json
from ..loading import checkpoint_files, load
from ..model import MultimodalDiffusionLM
from ..sampling import DecodeConfig
from ..search import SearchResult, answer
from ..serving.engine import Engine
from .metrics import exact_match, summarize, vqa_accuracy

log = logging.getLogger("mmdiff")

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
ERRORS_FILE = "errors.jsonl"
METRICS_FILE = "metrics.json"
#: metrics.json is rewritten after a batch when at least this many seconds passed since the last write
METRICS_EVERY_S = 30.0
SHARD_DIR = re.compile(r"shard-(\d+)-of-(\d+)")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the rows whose index modulo ``count`` is ``index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid shard {self.index}/{self.count}: need 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"i/n"`` -> Shard(i, n)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"invalid shard {text!r}: expected i/n, e.g. 0/4")
        return cls(int(match[1]), int(match[2]))

    @property
    def dirname(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class Item:
    """One non-blank line of the data file: a row to answer or a row that cannot be used."""

    index: int  # position among the non-blank lines
    entry: Row | RowError

    def done(self, answered_ids: set[str], failed: set[int]) -> bool:
        """Already in predictions.jsonl (by id) or errors.jsonl (by index)."""
        return self.index in failed or (isinstance(self.entry, Row) and self.entry.id in answered_ids)


# -- data -----------------------------------------------------------------------------------------
def load_items(path: str | Path, *, limit: int | None = None, shard: Shard | None = None) -> list[Item]:
    """Read the data file and select the rows to evaluate.

    A valid row whose id was already used by an earlier valid row becomes a :class:`RowError`
    (ids identify finished rows on resume).

    Args:
        path: the dataset: mmdiff JSONL (:mod:`mmdiff.data.dataset`), LLaVA JSON / JSONL or a ``datasets``
            folder / file (:mod:`mmdiff.data.readers`; each turn of a conversation is a row).
        limit: keep only the first ``limit`` rows of the file (before sharding).
        shard: keep only this shard's rows.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    first_line: dict[str, int] = {}
    items = []
    for index, entry in enumerate(iter_rows(path)):
        if limit is not None and index >= limit:
            break
        if isinstance(entry, Row):
            if entry.id in first_line:
                entry = RowError(entry.line_no, entry.id, f"duplicate id (first used on line {first_line[entry.id]})")
            else:
                first_line[entry.id] = entry.line_no
        if shard is None or index % shard.count == shard.index:
            items.append(Item(index, entry))
    return items


# -- identity of a run ----------------------------------------------------------------------------
def _sha256(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in [f for p in paths for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]:
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent}: missing {path.name}")
        with path.open("rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


def run_identity(model_dir: str | Path, data: str | Path, decode: DecodeConfig,
                 canvases: Mapping[str, int] | None = None) -> dict[str, Any]:
    """What makes two evaluations comparable: model and data (path and content), sampler, cache,
    pruning and test-time search settings, and ``canvas``: {question type: canvas length}, or None
    when every row takes the sampler's ``gen_length`` (set to None when the types have their own)."""
    model_dir, data = Path(model_dir), Path(data)
    identity = {"model": str(model_dir.resolve()),
                "model_sha256": _sha256(checkpoint_files(model_dir)),  # config, weights, the CTC beam's LM
                "data": str(data.resolve()), "data_sha256": _sha256([data]), **decode.to_dict()}
    identity["canvas"] = None if canvases is None else dict(sorted(canvases.items()))
    if canvases is not None:
        identity["sampler"]["gen_length"] = None
    return json.loads(json.dumps(identity))  # as read back from run.json (tuples -> lists)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if key in ("sampler", "pruning", "search", "canvas") and isinstance(before, dict) and isinstance(value, dict):
            out += [f"{key} {k} {before.get(k)!r} -> {v!r}" for k, v in value.items() if before.get(k) != v]
        elif key.endswith("_sha256"):
            out.append(f"{key.removesuffix('_sha256')} content changed")
        else:
            out.append(f"{key} {before!r} -> {value!r}")
    return out


def check_identity(out: Path, identity: dict[str, Any]) -> None:
    """Write ``run.json``, or check that the folder's earlier run evaluated the same thing.

    Raises:
        ValueError: the folder holds results of a different model, data file or sampler, pruning or
            search settings.
    """
    path = out / RUN_FILE
    if not path.exists():
        if (out / PREDICTIONS_FILE).exists():
            raise ValueError(f"{out} has {PREDICTIONS_FILE} but no {RUN_FILE}: cannot tell what it evaluated; "
                             "use a new --out folder")
        write_json(path, identity)
        return
    diff = _differences(read_json(path), identity)
    if diff:
        raise ValueError(f"{out} holds results of a different run ({'; '.join(diff)}); refusing to mix them: "
                         f"use a new --out folder, or delete {out} to start over")


# -- JSONL files ----------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written by this module ([] when absent).

    A last line without its newline is the trace of a run killed mid-write: it is cut off the file
    (its rows are evaluated again). Any other unreadable line is an error.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a partially written last line (interrupted run)", path)
        with path.open("r+b") as f:
            f.truncate(end)
    records = []
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid JSON ({e}); fix or delete the file") from None
    return records


def _append(f: IO[str], records: Sequence[dict[str, Any]]) -> None:
    """Append records and force them to disk (a crash loses at most the batch being written)."""
    if records:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _jsonl_bytes(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


# -- answering ------------------------------------------------------------------------------------
def answer_batch(model, questions: Sequence[str], *, images: Sequence, audios: Sequence,
                 decode: DecodeConfig) -> list:
    """Answer a batch as ``decode`` says (:func:`mmdiff.search.answer`: one batched ``generate`` call,
    or a search per row); if that raises ValueError (a corrupt image, an unreadable clip) answer the
    samples one by one so that only the bad ones fail.

    Args:
        model: a :class:`~mmdiff.model.MultimodalDiffusionLM`.
        questions: text per sample ("" for a spoken-only question).
        images: per sample an image (path / PIL) or None.
        audios: per sample a clip (path / (array, rate)) or None.
        decode: the decode settings.

    Returns:
        Per sample a :class:`~mmdiff.model.GenerationResult` (or :class:`~mmdiff.search.SearchResult`),
        or the ValueError it raised.
    """
    try:
        return answer(model, questions, images=images, audios=audios, decode=decode)
    except ValueError as e:
        if len(questions) == 1:
            return [e]
    results: list = []
    for q, im, au in zip(questions, images, audios):
        try:
            results += answer(model, [q], images=[im], audios=[au], decode=decode)
        except ValueError as e:
            results.append(e)
    return results


def prediction_record(item: Item, result, *, canvas: int) -> dict[str, Any]:
    """One line of predictions.jsonl. ``canvas`` is the response length the row was answered on;
    ``latency_s`` is the wall time of the generate call that answered the row (shared by its batch),
    or of the row's search; a searched row also lists its scored candidates, best first."""
    row = item.entry
    record = {"index": item.index, "line": row.line_no, "id": row.id, "type": row.type, "question": row.question,
              "answers": row.answers, "prediction": result.text,
              "exact_match": exact_match(result.text, row.answers),
              "vqa_accuracy": vqa_accuracy(result.text, row.answers), "canvas": canvas, "nfe": result.nfe,
              "latency_s": round(result.latency_s, 6)}
    if isinstance(result, SearchResult):
        record["candidates"] = [{"text": text, "score": score} for text, score in result.candidates]
    return record


def error_record(item: Item, reason: str) -> dict[str, Any]:
    """One line of errors.jsonl."""
    return {"index": item.index, "line": item.entry.line_no, "id": item.entry.id, "reason": reason}


#: a finished row: the item, the canvas it was answered on, its result or the ValueError it raised
Answered = tuple[Item, int, Any]


def _on_canvas(decode: DecodeConfig, length: int) -> DecodeConfig:
    return decode.replace(sampler=dataclasses.replace(decode.sampler, gen_length=length))


def _batches(items: Sequence[Item], size: int, canvas_of: Mapping[str, int] | None,
             default: int) -> Iterator[tuple[int, Sequence[Item]]]:
    """(canvas length, batch) pairs: the rows grouped by the canvas of their type (data order within a
    group), then cut into batches of ``size``."""
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(default if canvas_of is None else canvas_of[it.entry.type], []).append(it)
    for length, group in sorted(groups.items()):
        for start in range(0, len(group), size):
            yield length, group[start:start + size]


def batch_answers(model, items: Sequence[Item], decode: DecodeConfig, *, canvas_of: Mapping[str, int] | None,
                  size: int) -> Iterator[list[Answered]]:
    """The rows answered batch by batch (:func:`answer_batch` over :func:`_batches`)."""
    for length, batch in _batches(items, size, canvas_of, decode.sampler.gen_length):
        rows = [it.entry for it in batch]
        results = answer_batch(model, [r.question or "" for r in rows], images=[r.image for r in rows],
                               audios=[r.audio for r in rows], decode=_on_canvas(decode, length))
        yield [(it, length, r) for it, r in zip(batch, results)]


def engine_answers(engine: Engine, items: Sequence[Item], decode: DecodeConfig, *,
                   canvas_of: Mapping[str, int] | None) -> Iterator[list[Answered]]:
    """The rows answered by the step-batching engine, stepped on this thread: its waiting line is
    kept full (rows in data order), so every step runs a full pool; after each step, the rows that
    finished. A row the engine refuses (a corrupt image, an unreadable clip) comes back with its
    ValueError."""
    todo = iter(items)
    flying: list[tuple[Item, int, Any]] = []  # (item, canvas, handle)
    while True:
        refused: list[Answered] = []
        while engine.load[1] < engine.max_queue and (it := next(todo, None)) is not None:
            row = it.entry
            length = decode.sampler.gen_length if canvas_of is None else canvas_of[row.type]
            try:
                flying.append((it, length, engine.submit(row.question or "", image=row.image, audio=row.audio,
                                                         decode=_on_canvas(decode, length))))
            except ValueError as e:
                refused.append((it, length, e))
        if refused:
            yield refused
        if not flying:
            return
        engine.step()
        done = [f for f in flying if f[2].done]
        if done:
            flying = [f for f in flying if not f[2].done]
            yield [(it, length, _engine_result(handle)) for it, length, handle in done]


def check_engine(model: MultimodalDiffusionLM, decode: DecodeConfig) -> None:
    """Refuse settings the step-batching engine cannot batch: a ValueError naming ``--engine``."""
    try:
        Engine(model).check(decode)
    except ValueError as e:
        raise ValueError(f"--engine: {e}") from None


def _engine_result(handle) -> Any:
    try:
        return handle.result(timeout=0)
    except ValueError as e:
        return e


def _metrics(predictions: Sequence[dict], errors: Sequence[dict], *, identity: dict[str, Any], rows: int,
             limit: int | None, shard: Shard | None) -> dict[str, Any]:
    return {**summarize(predictions, errors=len(errors)), "rows": rows,
            "complete": len(predictions) + len(errors) == rows, "limit": limit,
            "shard": None if shard is None else str(shard), "model": identity["model"], "data": identity["data"],
            "sampler": identity["sampler"], "canvas": identity.get("canvas"), "cache": identity["cache"],
            "pruning": identity["pruning"], "search": identity["search"]}


def evaluate(data: str | Path, out: str | Path, *, model_dir: str | Path, decode: DecodeConfig | None = None,
             canvases: Mapping[str, int] | None = None, batch_size: int = 8, limit: int | None = None,
             shard: Shard | None = None, device: str = "cpu", dtype: str | Any = "auto", progress: bool = True,
             engine_batch: int | None = None, model: MultimodalDiffusionLM | None = None) -> dict[str, Any]:
    """Evaluate a model on a JSONL VQA file, resuming whatever an earlier run into ``out`` left.

    Args:
        data: the JSONL file (media paths relative to it).
        out: output folder; a shard writes into ``out/shard-i-of-n``.
        model_dir: any directory :func:`mmdiff.load` reads (mmdiff's own, a released checkpoint).
        decode: sampler, cache, pruning and search settings; with a test-time search rows are
            answered one by one (``batch_size`` does not apply).
        canvases: question type -> response canvas length, for every type of the data
            (:func:`~mmdiff.evaluation.canvas.choose_canvases`); None: ``decode.sampler.gen_length``
            for every row.
        batch_size: rows per ``generate`` call.
        limit: evaluate only the first ``limit`` rows of the file (before sharding).
        shard: evaluate only this shard.
        device: where the model runs.
        dtype: its parameter dtype (:func:`mmdiff.loading.resolve_dtype`; ``auto``: float32 on the CPU).
        progress: show a tqdm progress bar.
        engine_batch: answer through the step-batching engine, this many rows stepped at once
            (``batch_size`` does not apply); None: ``generate`` batches. The predictions are the
            same; settings the engine cannot batch are refused before anything is read or written.
        model: the model of ``model_dir`` when the caller has loaded it already (loaded here when
            needed otherwise).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        FileNotFoundError: the data file or model directory does not exist.
        FileExistsError, NotADirectoryError, PermissionError: ``out`` cannot be written (checked first).
        ValueError: ``out`` holds a different run (model, data, sampler, pruning, search settings or
            canvases), ``canvases`` lacks a type of the data, or ``engine_batch`` is set with settings
            the engine cannot batch.
    """
    from tqdm import tqdm

    decode = decode or DecodeConfig()
    searching = decode.search.active
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if engine_batch is not None and engine_batch < 1:
        raise ValueError(f"--max-batch must be positive, got {engine_batch}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if engine_batch is not None:  # refuse what the engine cannot batch before any work
        if model is None:
            model = load(model_dir, dtype=dtype, device=device)
        check_engine(model, decode)
    out = check_output_dir(Path(out) / shard.dirname if shard is not None else Path(out))
    items = load_items(data, limit=limit, shard=shard)
    uncovered = sorted({it.entry.type for it in items if isinstance(it.entry, Row)} - set(canvases or {}))
    if canvases is not None and uncovered:
        raise ValueError(f"no canvas for question type(s) {uncovered}: give one per type of the data")
    identity = run_identity(model_dir, data, decode, canvases)
    out.mkdir(parents=True, exist_ok=True)
    check_identity(out, identity)
    predictions, errors = read_jsonl(out / PREDICTIONS_FILE), read_jsonl(out / ERRORS_FILE)
    answered, failed = {p["id"] for p in predictions}, {e["index"] for e in errors}
    todo = [it for it in items if not it.done(answered, failed)]
    selected = {it.index for it in items}

    def write_metrics() -> dict[str, Any]:
        metrics = _metrics([p for p in predictions if p["index"] in selected],
                           [e for e in errors if e["index"] in selected],
                           identity=identity, rows=len(items), limit=limit, shard=shard)
        write_json(out / METRICS_FILE, metrics)
        return metrics

    desc = "mmdiff eval" + ("" if shard is None else f" shard {shard}")
    with (out / PREDICTIONS_FILE).open("a", encoding="utf-8") as pf, \
            (out / ERRORS_FILE).open("a", encoding="utf-8") as ef, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="row", disable=not progress) as bar:
        unusable = [error_record(it, it.entry.reason) for it in todo if isinstance(it.entry, RowError)]
        _append(ef, unusable)
        errors += unusable
        bar.update(len(unusable))
        pending = [it for it in todo if isinstance(it.entry, Row)]
        if pending:
            if model is None:
                model = load(model_dir, dtype=dtype, device=device)
            last_write = time.monotonic()
            if engine_batch is not None:
                engine = Engine(model, max_batch=engine_batch, max_queue=engine_batch)
                finished = engine_answers(engine, pending, decode, canvas_of=canvases)
            else:  # a searched row is saved at once
                finished = batch_answers(model, pending, decode, canvas_of=canvases, size=1 if searching else batch_size)
            for done in finished:
                new_p = [prediction_record(it, r, canvas=length) for it, length, r in done
                         if not isinstance(r, Exception)]
                new_e = [error_record(it, str(r)) for it, _, r in done if isinstance(r, Exception)]
                _append(pf, new_p)
                _append(ef, new_e)
                predictions += new_p
                errors += new_e
                bar.update(len(new_p) + len(new_e))
                if time.monotonic() - last_write >= METRICS_EVERY_S:
                    write_metrics()
                    last_write = time.monotonic()
    _in_data_order(out / PREDICTIONS_FILE, predictions)
    _in_data_order(out / ERRORS_FILE, errors)
    return write_metrics()


def _in_data_order(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite a finished run's JSONL file in data order (atomically; only when out of order)."""
    ordered = sorted(records, key=lambda r: r["index"])
    if ordered != records:
        atomic_write_bytes(path, _jsonl_bytes(ordered))
        records[:] = ordered


def merge_shards(out: str | Path) -> dict[str, Any]:
    """Combine ``out/shard-i-of-n/`` folders into ``out/predictions.jsonl`` (data order),
    ``out/errors.jsonl`` and ``out/metrics.json``, as a single-process run would have written them
    (up to timing).

    Raises:
        FileNotFoundError: no shard folders in ``out``.
        ValueError: shards missing, incomplete, of different runs, or ``out`` holds a
            single-process run.
    """
    out = check_output_dir(out, flag="--merge")
    found = {}
    for d in sorted(out.glob("shard-*-of-*")):
        match = SHARD_DIR.fullmatch(d.name)
        if match and d.is_dir():
            found[Shard(int(match[1]), int(match[2]))] = d
    if not found:
        raise FileNotFoundError(f"no shard-i-of-n folders in {out}")
    counts = sorted({s.count for s in found})
    if len(counts) > 1:
        raise ValueError(f"{out} mixes shards of different counts {counts}; keep the folders of one run")
    n = counts[0]
    missing = [str(Shard(i, n)) for i in range(n) if Shard(i, n) not in found]
    if missing:
        raise ValueError(f"{out}: shard(s) {', '.join(missing)} missing; run `mmdiff eval --shard i/{n}` for each")
    dirs = [found[Shard(i, n)] for i in range(n)]
    identities = [read_json(d / RUN_FILE) for d in dirs]
    for d, identity in zip(dirs[1:], identities[1:]):
        diff = _differences(identities[0], identity)
        if diff:
            raise ValueError(f"{out}: {d.name} evaluated a different run than {dirs[0].name} ({'; '.join(diff)})")
    shard_metrics = [read_json(d / METRICS_FILE) if (d / METRICS_FILE).exists() else None for d in dirs]
    unfinished = [str(Shard(i, n)) for i, m in enumerate(shard_metrics) if m is None or not m["complete"]]
    if unfinished:
        raise ValueError(f"{out}: shard(s) {', '.join(unfinished)} unfinished; rerun `mmdiff eval --shard i/{n}` "
                         "with the same --out to finish them")
    limits = {m["limit"] for m in shard_metrics}
    if len(limits) > 1:
        raise ValueError(f"{out}: the shards were run with different --limit values {sorted(limits, key=str)}")
    limit = limits.pop()
    merged_before = (out / METRICS_FILE).exists() and "merged_shards" in read_json(out / METRICS_FILE)
    if (out / PREDICTIONS_FILE).exists() and not merged_before:
        raise ValueError(f"{out} already holds the predictions of a single-process run; refusing to overwrite them")

    def keep(r: dict) -> bool:
        return limit is None or r["index"] < limit

    def gather(name: str) -> list[dict[str, Any]]:
        return sorted((r for d in dirs for r in read_jsonl(d / name) if keep(r)), key=lambda r: r["index"])

    predictions, errors = gather(PREDICTIONS_FILE), gather(ERRORS_FILE)
    atomic_write_bytes(out / PREDICTIONS_FILE, _jsonl_bytes(predictions))
    atomic_write_bytes(out / ERRORS_FILE, _jsonl_bytes(errors))
    write_json(out / RUN_FILE, identities[0])
    metrics = {**_metrics(predictions, errors, identity=identities[0], rows=sum(m["rows"] for m in shard_metrics),
                          limit=limit, shard=None), "merged_shards": n}
    write_json(out / METRICS_FILE, metrics)
    return metrics

