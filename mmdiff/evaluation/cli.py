"""``mmdiff eval``: batch VQA evaluation with resumable predictions, shards and merging.

Single process::

    mmdiff eval --data data/test/data.jsonl --out runs/test [--batch-size 16] [sampler flags]

``--engine [--max-batch N]`` answers through the step-batching engine (:mod:`mmdiff.serving.engine`):
rows of every canvas share one pool, join and leave it between denoising steps and are written as
they finish; same predictions, same resume. Settings it cannot batch (caches other than prefix /
none, pruning, search) are refused in one line before any work.

Rerunning the same command resumes. Each question type is answered on a canvas long enough for the
type's longest reference answer (:mod:`mmdiff.evaluation.canvas`; one line per type on stderr, and
``canvas`` in run.json / metrics.json) unless ``--gen-length N`` sets one canvas for every row.
``--search best_of_n|hierarchical`` answers each row through the test-time search (row by row; the
search settings are part of the run's identity).
Scaled out by hand (any machines sharing the folder)::

    mmdiff eval --data ... --out runs/test --shard 0/2      # and --shard 1/2 elsewhere
    mmdiff eval --merge runs/test

or with torchrun, which shards by rank and merges on rank 0 at the end (gloo barrier)::

    torchrun --nproc_per_node 4 -m mmdiff eval --data ... --out runs/test
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

from .. import DEFAULT_MODEL_DIR
from ..commands.options import MODEL_HELP, add_decode_arguments, decode_config_from_args
from ..data.readers import check_rows, iter_rows
from ..io import check_output_dir
from ..loading import DTYPE_CHOICES, load, resolve_device, resolve_dtype
from ..serving.engine import DEFAULT_MAX_BATCH
from .canvas import CANVAS_MULTIPLE, Canvas, choose_canvases
from .runner import METRICS_FILE, Shard, check_engine, evaluate, merge_shards

#: how long torchrun ranks wait for the slowest shard before the merge
BARRIER_TIMEOUT = timedelta(hours=24)
#: --engine: rows stepped at once unless --max-batch says otherwise


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``mmdiff eval`` options to ``p``."""
    p.add_argument("--data", type=Path, help="VQA rows: mmdiff JSONL, LLaVA JSON/JSONL (each turn a row) or a folder / "
                   ".parquet / .arrow read by HF datasets (media paths relative to it)")
    p.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL_DIR),
                   help=f"{MODEL_HELP} (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--out", type=Path, help="output folder; rerunning into it resumes")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per generate call (default: 8; a --search answers row by row; not with --engine)")
    p.add_argument("--engine", action="store_true",
                   help="answer through the step-batching engine: rows join and leave one batch between denoising "
                        "steps (caches prefix / none; no pruning or search)")
    p.add_argument("--max-batch", type=int, help=f"with --engine: rows stepped at once (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--limit", type=int, help="evaluate only the first N rows of the file")
    p.add_argument("--shard", help="i/n: evaluate rows with index %% n == i into OUT/shard-i-of-n")
    p.add_argument("--merge", type=Path, metavar="DIR", help="merge DIR/shard-*-of-n into DIR and exit")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... (default: auto = the rank's GPU if any, else cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="parameter dtype; auto: float32 on the CPU, the checkpoint's own dtype (e.g. bfloat16) on a "
                        "GPU (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_decode_arguments(p, chosen_later={
        "gen_length": f"per question type, the type's longest reference answer in --data + EOS, rounded up to "
                      f"a multiple of {CANVAS_MULTIPLE}"})


def _say_canvases(canvases: dict[str, Canvas]) -> None:
    """One line per question type on stderr: its canvas and why."""
    for qtype, c in canvases.items():
        rows, tokens = f"{c.rows} row{'s' * (c.rows != 1)}", f"{c.longest} token{'s' * (c.longest != 1)}"
        print(f"mmdiff eval: {qtype}: {c.length}-token canvas (longest answer in its {rows}: {tokens} + EOS; "
              "--gen-length N overrides)", file=sys.stderr)


def _report(metrics: dict, out: Path) -> None:
    acc = "n/a" if metrics["accuracy"] is None else f"{metrics['accuracy']:.4f}"
    vqa = "n/a" if metrics["vqa_accuracy"] is None else f"{metrics['vqa_accuracy']:.4f}"
    state = "" if metrics["complete"] else " (unfinished: rerun to resume)"
    print(f"accuracy {acc}  vqa_accuracy {vqa}  rows {metrics['n']}  errors {metrics['errors']}{state} -> {out}")


def run(args: argparse.Namespace) -> int:
    """Evaluate (one process, one shard, or a torchrun rank), or merge shards."""

    if args.merge is not None:
        metrics = merge_shards(args.merge)
        _report(metrics, args.merge / METRICS_FILE)
        return 0
    if args.data is None or args.out is None:
        raise ValueError("--data and --out are required (or --merge DIR)")
    check_output_dir(args.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard = Shard.parse(args.shard) if args.shard else None
    if world > 1 and shard is not None:
        raise ValueError(f"--shard cannot be combined with torchrun (WORLD_SIZE={world} shards by rank)")
    if world > 1:
        shard = Shard(int(os.environ["RANK"]), world)
    if args.max_batch is not None and not args.engine:
        raise ValueError("--max-batch sets the engine's batch: give --engine too (or --batch-size without it)")
    decode = decode_config_from_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rows = iter_rows(args.data)  # a file with no usable row stops here, before any model loads
    check_rows(rows, args.data, name="--data")
    model = None
    if args.engine:  # refused before the data is read
        model = load(args.model, dtype=dtype, device=device)
        check_engine(model, decode)
    canvases = None
    if args.gen_length is None:
        chosen = choose_canvases(args.data, args.model, decode, rows=rows)
        if int(os.environ.get("RANK", "0")) == 0:
            _say_canvases(chosen)
        canvases = {t: c.length for t, c in chosen.items()}
    kwargs = dict(model_dir=args.model, decode=decode, canvases=canvases, batch_size=args.batch_size,
                  limit=args.limit, device=device, dtype=dtype, progress=not args.quiet,
                  engine_batch=(args.max_batch or DEFAULT_MAX_BATCH) if args.engine else None, model=model)
    if world == 1:
        metrics = evaluate(args.data, args.out, shard=shard, **kwargs)
        _report(metrics, args.out / (shard.dirname if shard else "") / METRICS_FILE)
        return 0
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        evaluate(args.data, args.out, shard=shard, **kwargs)
        dist.barrier()
        if shard.index == 0:
            metrics = merge_shards(args.out)
            _report(metrics, args.out / METRICS_FILE)
    finally:
        dist.destroy_process_group()
    return 0
