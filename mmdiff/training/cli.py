"""``mmdiff train --config FILE``: run a committed training recipe."""
from __future__ import annotations

import argparse
import logging

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
    Trainer(cfg, resume=not args.fresh, progress=not args.no_progress).run()
    return 0
