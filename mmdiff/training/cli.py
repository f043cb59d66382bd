"""``mmdiff train``: run a committed training recipe (``--config``), or fine-tune a trained model on
your own data (``--data TRAIN --init MODEL --out DIR``, :mod:`mmdiff.training.finetune`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.speech import NO_SYNTHESISER, espeak_available
from ..io import check_output_dir, read_json
from .recipe import TrainConfig

#: fine-tune flags -> FinetuneConfig fields (None: the config's default)
FINETUNE_FLAGS = ("data", "val", "init", "format", "steps", "ar_steps", "batch_size", "lr", "replay",
                  "replay_scenes", "replay_spoken", "replay_clips", "eval_every", "seed", "lora_rank")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training recipe JSON (e.g. configs/mmdiff-tiny.json), or a fine-tune JSON "
                   "(keys of mmdiff.training.finetune.FinetuneConfig: data, init, out, ...)")
    p.add_argument("--out", help="output model directory (overrides the recipe's)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing <out>.train_state and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--eval-every", type=int, help="validation interval in steps (0: never / only at the end); "
                   "validation never changes the trained weights")
    g = p.add_argument_group("fine-tuning on your own data (instead of --config)")
    g.add_argument("--data", help="training data: mmdiff JSONL, LLaVA JSON/JSONL, or a folder / .parquet / .arrow "
                   "read by HF datasets")
    g.add_argument("--val", help="validation data (default: 300 questions held out from --data)")
    g.add_argument("--init", help="model directory to start from (e.g. checkpoints/mmdiff-tiny)")
    g.add_argument("--format", choices=("auto", "mmdiff", "llava", "hf"), help="dataset format (default: auto)")
    g.add_argument("--train", help="comma-separated parts with gradients: all (default: every part but the Whisper "
                   "encoder and a vision tower marked frozen), adapters, encoders, decoder, vision, vision_adapter, "
                   "audio_adapter, lora (LoRA on the decoder, via peft)")
    g.add_argument("--steps", type=int, help="masked-diffusion steps, at most (default 4000; it stops once validation reaches stop_at, 0.99)")
    g.add_argument("--ar-steps", type=int, help="autoregressive (phase-1) steps before them (default 0)")
    g.add_argument("--batch-size", type=int, help="questions per step (default 32)")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate, warmup then cosine (default 5e-4)")
    g.add_argument("--replay", type=float, help="share of each batch replayed from the original synthetic world "
                   "(default 0.25 for mmdiff models, 0 = off)")
    g.add_argument("--replay-scenes", type=int)
    g.add_argument("--replay-spoken", type=float, help="share of the replayed questions that are spoken, when the "
                   "model has an audio path and espeak-ng is installed (default 0.1, 0 = off)")
    g.add_argument("--replay-clips", type=int, help="spoken questions synthesised once for it (default 300)")
    g.add_argument("--lora-rank", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--also-eval", type=int, nargs="?", const=100, metavar="N",
                   help="after fine-tuning, score the original typed test split (N questions per type) before "
                   "and after, beside the new data's validation accuracy")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.data or args.init or (args.config and "data" in read_json(args.config)):
        return run_finetune(args)
    if not args.config:
        raise ValueError("give --config RECIPE, or --data TRAIN --init MODEL --out DIR to fine-tune")
    from .trainer import Trainer

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


def run_finetune(args: argparse.Namespace) -> int:
    """``mmdiff train --data ... --init ... --out ...`` (or a fine-tune ``--config``)."""
    from .finetune import FinetuneConfig, FineTuner, check_writable as check_ft, original_accuracy

    base = read_json(args.config) if args.config else {}
    values = {**base, **{k: getattr(args, k) for k in FINETUNE_FLAGS if getattr(args, k, None) is not None}}
    if args.out:
        values["out"] = args.out
    if args.train:
        values["train"] = [t.strip() for t in args.train.split(",") if t.strip()]
    if args.eval_every is not None:
        values["eval_every"] = args.eval_every
    missing = [f"--{k}" for k in ("data", "init", "out") if not values.get(k)]
    if missing:
        raise ValueError(f"fine-tuning needs {', '.join(missing)}")
    if args.also_eval is not None and args.also_eval < 1:
        raise ValueError(f"--also-eval {args.also_eval}: must be at least 1 question per type")
    cfg = FinetuneConfig.from_dict(values, source=args.config or "mmdiff train flags")
    check_ft(cfg)
    before = original_accuracy(cfg.init, per_type=args.also_eval) if args.also_eval else None
    val = FineTuner(cfg, resume=not args.fresh, progress=not args.no_progress).run()
    if args.also_eval:
        after = original_accuracy(cfg.out, per_type=args.also_eval)
        print(f"new data (validation): {val.get('overall', float('nan')):.1%}  "
              + " ".join(f"{k}={v:.1%}" for k, v in val.items() if k != "overall"))
        print(f"original typed test split ({args.also_eval} per type): before {before['typed']:.1%}, "
              f"after {after['typed']:.1%}")
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
