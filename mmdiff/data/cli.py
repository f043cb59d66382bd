"""``mmdiff data``: write a synthetic scene dataset (JSONL + images [+ spoken questions])."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ..io import check_output_dir
from .dataset import RowError, read_rows, write_split
from .scenes import SPLITS
from .speech import NO_SYNTHESISER, espeak_available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mmdiff data`` options to ``parser``.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (data.jsonl, images/, audio/); an existing data.jsonl is replaced")
    parser.add_argument("--split", choices=SPLITS, default="train", help="which split's scenes to draw")
    parser.add_argument("--n", type=int, default=1000, help="number of rows (several rows per image)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--audio", action="store_true", help="also speak questions with espeak-ng (libespeak-ng; 16 kHz wav)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Write the dataset, re-read it, and print where it went and the row count per type.

    Args:
        args: parsed ``mmdiff data`` arguments.
    """
    if args.audio and not espeak_available():
        raise FileNotFoundError(f"--audio: {NO_SYNTHESISER}")
    check_output_dir(args.out)
    path = write_split(args.out, split=args.split, n=args.n, seed=args.seed, audio=args.audio,
                       progress=not args.quiet)
    rows = list(read_rows(path))
    errors = [r for r in rows if isinstance(r, RowError)]
    counts = Counter(r.type for r in rows if not isinstance(r, RowError))
    images = len({r.image for r in rows if not isinstance(r, RowError)})
    print(f"wrote {len(rows)} {args.split} rows ({images} images) to {path}")
    for qtype, count in sorted(counts.items()):
        print(f"  {qtype:<13} {count}")
    for e in errors:
        print(f"  invalid row at line {e.line_no} ({e.id}): {e.reason}", file=sys.stderr)
    return 1 if errors else 0
