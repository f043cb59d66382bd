"""``mmdiff ask``: answer one question about an image and/or a spoken question."""
from __future__ import annotations

import argparse
import json
import sys

from .. import DEFAULT_MODEL_DIR
from .options import add_sampler_arguments, sampler_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", nargs="?", default="", help="the question (optional when --audio is given)")
    p.add_argument("--image", help="image file (png, jpg, ...)")
    p.add_argument("--audio", help="spoken question (wav, flac, ogg)")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"model directory (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--json", action="store_true", help="print one JSON object with answer, nfe, latency_s")
    add_sampler_arguments(p, gen_length=8)


def run(args: argparse.Namespace) -> int:
    from ..model import MultimodalDiffusionLM

    if not args.question.strip() and not args.audio:
        raise ValueError("give a question, --audio, or both")
    model = MultimodalDiffusionLM.from_pretrained(args.model)
    cfg = sampler_config_from_args(args)
    res = model.generate([args.question], images=[args.image], audios=[args.audio], config=cfg, cache=args.cache)[0]
    if args.json:
        print(json.dumps({"answer": res.text, "nfe": res.nfe, "latency_s": round(res.latency_s, 4),
                          "sampler": cfg.to_dict(), "cache": args.cache}))
    else:
        print(res.text)
        print(f"(nfe {res.nfe}, {res.latency_s * 1000:.0f} ms)", file=sys.stderr)
    return 0
