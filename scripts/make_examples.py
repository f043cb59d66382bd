"""Write the demo's examples beside a model: test-split images, typed and spoken questions, answers.

    .venv/bin/python scripts/make_examples.py [--model checkpoints/mmdiff-tiny] [--spoken 2]

Writes ``<model>/examples/`` (replacing it)::

    examples.json   {"sampler": {...}, "source": {...}, "examples": [
                        {"image": "images/<id>.png", "question": str, "audio": "audio/<id>.wav" | null,
                         "answer": str, "type": str, "checked": bool}, ...]}
    images/*.png    64 x 64 scenes
    audio/*.wav     16 kHz spoken questions (espeak-ng, held-out test voices)

Rows come from the TEST split, so the scenes and voices were never trained on. There is one typed
example per question family (:data:`FAMILIES`), then up to ``--spoken`` spoken ones. When the model
can answer a row (weights present; an audio encoder for spoken rows), an example is the first row
of its family that the model answers correctly with the demo's default settings, and ``checked`` is
true: the demo's examples show answers that work. The script prints how many rows each family
needed, so the choice is visible (it is not an accuracy measurement). Otherwise an example is the
family's first row, unchecked.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from mmdiff import DEFAULT_MODEL_DIR
from mmdiff.data.dataset import SPOKEN_PREFIX, Row, RowError, read_rows, write_split
from mmdiff.data.speech import NO_SYNTHESISER, espeak_available
from mmdiff.io import WEIGHTS_NAME

#: question families shown as typed examples (captions are long: the caption tab uses the images)
FAMILIES: tuple[str, ...] = ("count", "position", "attribute", "relation", "existence", "comparison", "verify")
SPLIT = "test"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL_DIR),
                   help="model directory (examples/ goes inside)")
    p.add_argument("--pool", type=int, default=160, help="test rows to draw candidates from")
    p.add_argument("--spoken", type=int, default=2, help="spoken examples to add (needs espeak-ng)")
    p.add_argument("--seed", type=int, default=0, help="test-split generation seed")
    return p.parse_args(argv)


def load_checker(model_dir: Path):
    """``(model, decode config)`` to check answers with, or ``(None, config)`` without weights."""
    from mmdiff.commands.demo import load_demo_app

    defaults = load_demo_app().ASK_DEFAULTS
    if not (model_dir / WEIGHTS_NAME).is_file():
        print(f"no {model_dir / WEIGHTS_NAME}: examples are not checked against the model", file=sys.stderr)
        return None, defaults
    from mmdiff.model import MultimodalDiffusionLM

    return MultimodalDiffusionLM.from_pretrained(model_dir), defaults


def pick(rows: list[Row], *, spoken: bool, model, config) -> tuple[Row | None, str | None, int]:
    """The first row the model answers correctly (or the first row, unchecked): (row, answer, tries)."""
    can_check = model is not None and (not spoken or model.audio is not None)
    for tries, row in enumerate(rows, start=1):
        if not can_check:
            return row, None, tries
        question, audio = ("", row.audio) if spoken else (row.question, None)
        try:
            answer = model.generate([question], images=[row.image], audios=[audio], decode=config)[0].text
        except ValueError as e:  # media this model cannot take (e.g. a clip over its length limit)
            print(f"  skipping {row.id}: {e}", file=sys.stderr)
            continue
        if answer in row.answers:
            return row, answer, tries
    return None, None, len(rows)


def copy_example(row: Row, out: Path, *, spoken: bool, answer: str | None, transcript: str | None = None) -> dict:
    """Copy the row's media into ``out`` and return its examples.json entry (a spoken row's
    "question" is the transcript of its audio)."""
    image = Path("images") / row.image.name
    shutil.copyfile(row.image, out / image)
    audio = None
    if spoken:
        audio = Path("audio") / row.audio.name
        shutil.copyfile(row.audio, out / audio)
    return {"image": image.as_posix(), "question": row.question or transcript, "audio": audio and audio.as_posix(),
            "answer": answer or row.answers[0], "type": row.type, "checked": answer is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, config = load_checker(args.model)
    speak = args.spoken > 0 and espeak_available()
    if args.spoken > 0 and not speak:
        print(f"{NO_SYNTHESISER}: no spoken examples", file=sys.stderr)
    out = args.model / "examples"
    with tempfile.TemporaryDirectory() as tmp:
        data = write_split(tmp, split=SPLIT, n=args.pool, seed=args.seed, audio=speak, progress=False)
        rows = [r for r in read_rows(data) if not isinstance(r, RowError)]
        transcripts = {d["id"]: d["transcript"] for d in map(json.loads, data.read_text().splitlines())
                       if "transcript" in d}
        shutil.rmtree(out, ignore_errors=True)
        (out / "images").mkdir(parents=True)
        (out / "audio").mkdir()
        entries = []
        plan = [(f, False, [r for r in rows if r.type == f]) for f in FAMILIES]
        plan.append(("spoken", True, [r for r in rows if r.audio is not None
                                      and r.type.removeprefix(SPOKEN_PREFIX) in FAMILIES]))
        for name, spoken, candidates in plan:
            wanted = args.spoken if spoken else 1
            while wanted and candidates:
                row, answer, tries = pick(candidates, spoken=spoken, model=model, config=config)
                checked = "checked" if answer is not None else "unchecked"
                print(f"{name:<11} {checked if row else 'no correct answer'} after {tries} of {len(candidates)} rows")
                if row is None:
                    break
                entries.append(copy_example(row, out, spoken=spoken, answer=answer, transcript=transcripts.get(row.id)))
                candidates = candidates[candidates.index(row) + 1:]
                wanted -= 1
    (out / "examples.json").write_text(json.dumps({
        "sampler": config.sampler.to_dict(),
        "source": {"split": SPLIT, "seed": args.seed, "pool": args.pool},
        "examples": entries}, indent=1) + "\n")
    print(f"wrote {len(entries)} examples to {out / 'examples.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
