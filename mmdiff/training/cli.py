"""``mmdiff train --config FILE``: run a committed training recipe."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.speech import NO_SYNTHESISER, espeak_available
from ..io import check_output_dir
from .recipe import TrainConfig
from .trainer import Trainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training recipe JSON (e.g. configs/mmdiff-tiny.json)")
    p.add_argument("--out", help="override the output model directory of the recipe")
    p.add_argument("--fresh", action="store_true", help="ignore an existing <out>.train_state and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--eval-every", type=int, help="override the recipe's validation interval in steps (0: "
                   "never); validation never changes the trained weights")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig.from_file(args.config)
    if args.out:
        cfg.out = args.out
    if args.eval_every is not None:
        cfg.eval_every = args.eval_every
    check_writable(cfg, flag="--out" if args.out else f"{args.config}: out")
    if cfg.speech_clips > 0 and not espeak_available():
        raise FileNotFoundError(f"{args.config} trains on spoken questions (speech_clips {cfg.speech_clips}): "
                                f"{NO_SYNTHESISER}")
    Trainer(cfg, resume=not args.fresh, progress=not args.no_progress).run()
    return 0


def check_writable(cfg: TrainConfig, *, flag: str) -> None:
    """Refuse, before the first step, outputs that cannot be written: the model folder, the resumable
    state and log beside it, and the stages' ``save_as`` exports."""
    out = Path(cfg.out)
    check_output_dir(out, flag=flag)
    check_output_dir(out.with_name(out.name + ".train_state"), flag=flag)
    for stage in cfg.stages:
        if stage.save_as:
            check_output_dir(stage.save_as, flag=f"stage {stage.name!r} save_as")
