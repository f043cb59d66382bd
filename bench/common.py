"""What every bench script shares: its parser's common flags and their effect.

Bench scripts run as ``python bench/<name>.py`` (this folder is then on ``sys.path``) and import
this module as ``common``.
"""
from __future__ import annotations

import argparse
import time

import torch

from mmdiff.commands.options import add_model_arguments


def parser(doc: str, *, threads: int = 0, seed: bool = False) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc`` with ``--model``, ``--device``, ``--dtype``
    (:func:`mmdiff.commands.options.add_model_arguments`: any directory ``mmdiff.load`` reads) and
    ``--threads`` (and ``--seed``).

    Args:
        doc: the script's module docstring.
        threads: default torch CPU threads (0: torch's choice).
        seed: add ``--seed`` (default 0), the generation seed of the script's test data.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch CPU threads, 0 = torch's choice (default: {threads})")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="test data seed (default: 0)")
    return p


def start(p: argparse.ArgumentParser, args: argparse.Namespace, *, speech: bool = False) -> None:
    """Apply the common flags; with ``speech``, stop with the parser's error when no synthesiser exists."""
    if speech:
        from mmdiff.data.speech import NO_SYNTHESISER, espeak_available

        if not espeak_available():
            p.error(NO_SYNTHESISER)
    if args.threads:
        torch.set_num_threads(args.threads)


def load_model(args: argparse.Namespace, path: str | None = None):
    """``mmdiff.load`` of ``path`` (default ``--model``) with the parser's ``--device`` and ``--dtype``."""
    from mmdiff import load

    return load(path or args.model, dtype=args.dtype, device=args.device)


def matmul_peak(*, repeats: int = 5, n: int = 2048) -> float:
    """The machine's fp32 matmul peak in GFLOP/s with torch's current thread count: the fastest of
    ``repeats`` (n, n) x (n, n) products (2n^3 FLOPs each), after one warm-up product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
